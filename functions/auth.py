"""Who is calling: a Supabase user (access token) or a server (license key).

Access tokens are verified here, before any database work, with PyJWT: HS256
with the project's JWT secret, or ES256/RS256 with the project's published JWKS.
The accepted algorithms are fixed by configuration, never taken from the token,
so ``alg=none`` and algorithm confusion (an HMAC token "signed" with a public
key) are rejected. The verified token is then forwarded to the REST layer so
row-level security and ``auth.uid()`` apply to the user.

License keys are not checked here: only their hash is stored, and the database
checks existence, status and expiry in the same call that spends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from functions.errors import BadRequest, ServiceUnavailable, Unauthorized
from functions.settings import CreditsApiSettings, SettingsSource, settings_source

AUDIENCE = "authenticated"
SYMMETRIC_ALGORITHMS = ["HS256"]
ASYMMETRIC_ALGORITHMS = ["ES256", "RS256"]
MAX_CREDENTIAL_LENGTH = 8192
# The JWKS is used for KEYS_LIFESPAN_SECONDS, then fetched again (a key removed
# from it stops being trusted within that time); a token naming an unknown kid
# (a new key) fetches it again at once, at most once per
# REFRESH_COOLDOWN_SECONDS, so a stream of made-up kids cannot turn every
# request into a fetch.
KEYS_LIFESPAN_SECONDS = 600.0
REFRESH_COOLDOWN_SECONDS = 30.0


@dataclass(frozen=True)
class User:
    """A Supabase user; ``token`` is forwarded to the REST layer as is."""

    user_id: str
    token: str = field(repr=False)
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LicenseKey:
    """A server holding a license key (checked by the database when it spends)."""

    key: str = field(repr=False)


Caller = User | LicenseKey


class SigningKeys:
    """The project's JWKS, by ``kid``, fetched again when older than ``lifespan`` seconds or when
    a token names a ``kid`` it does not have (at most once per ``cooldown`` seconds).

    PyJWT's client fetches; the cache is ours, on ``clock`` (monotonic seconds),
    because PyJWT's per-kid cache never expires: a key removed from the JWKS
    would stay trusted until the next cold start.
    """

    def __init__(self, url: str, *, lifespan: float = KEYS_LIFESPAN_SECONDS,
                 cooldown: float = REFRESH_COOLDOWN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self._client = jwt.PyJWKClient(url, cache_keys=False, cache_jwk_set=False, timeout=5)
        self._lifespan, self._cooldown, self._clock = lifespan, cooldown, clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        # PyJWKClientConnectionError (unreachable) propagates: the caller answers 503.
        data = self._client.fetch_data()
        keys: dict[str, jwt.PyJWK] = {}
        try:
            found = jwt.PyJWKSet.from_dict(data).keys
        except jwt.PyJWKSetError:  # no usable key: cached as such, not fetched per request
            found = []
        for jwk in found:
            if jwk.key_id and jwk.public_key_use in (None, "sig"):
                keys[jwk.key_id] = jwk
        self._keys, self._fetched_at = keys, self._clock()

    def get(self, kid: str) -> jwt.PyJWK:
        """The key ``kid`` of the current JWKS; ``jwt.PyJWKClientError`` if there is none."""
        with self._lock:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self._lifespan:
                self._fetch()
            elif kid not in self._keys and now - self._fetched_at >= self._cooldown:
                self._fetch()
            key = self._keys.get(kid)
        if key is None:
            raise jwt.PyJWKClientError(f"no signing key {kid[:64]!r} in the JWKS")
        return key


class TokenVerifier:
    """Verifies access tokens; one per cold start.

    Asymmetric tokens (ES256/RS256) are checked against the project's JWKS
    (``SigningKeys``). HS256 is accepted only when the legacy shared secret is
    configured. The settings are looked up per token, so a rotated secret
    (``LiveSettings``) applies without a cold start.
    """

    def __init__(self, settings: CreditsApiSettings | SettingsSource[CreditsApiSettings], *,
                 refresh_cooldown: float = REFRESH_COOLDOWN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings_source(settings)
        self._cooldown, self._clock = refresh_cooldown, clock
        self._jwks = self._signing_keys(self._settings.get().signing_keys_url)

    def _signing_keys(self, url: str) -> SigningKeys:
        return SigningKeys(url, cooldown=self._cooldown, clock=self._clock)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("invalid access token") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        settings = self._settings.get()
        key: Any
        if algorithm in SYMMETRIC_ALGORITHMS and settings.jwt_secret:
            key, algorithms = settings.jwt_secret, SYMMETRIC_ALGORITHMS
        elif algorithm in ASYMMETRIC_ALGORITHMS and isinstance(kid, str) and kid:
            jwks = self._jwks
            if jwks.url != settings.signing_keys_url:
                jwks = self._jwks = self._signing_keys(settings.signing_keys_url)
            try:
                key = jwks.get(kid).key
            except jwt.PyJWKClientConnectionError:
                # Our dependency is down, the token may well be fine: let the client retry.
                raise ServiceUnavailable("the signing keys could not be fetched") from None
            except jwt.PyJWTError:
                raise Unauthorized("invalid access token") from None
            algorithms = ASYMMETRIC_ALGORITHMS
        else:
            raise Unauthorized("invalid access token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=algorithms, audience=AUDIENCE, issuer=settings.issuer,
                options={"require": ["exp", "sub", "aud", "iss"]}, leeway=10,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("access token expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid access token") from None
        if claims.get("role") != AUDIENCE or not isinstance(claims.get("sub"), str):
            raise Unauthorized("invalid access token")
        return claims


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Works with Starlette's case-insensitive headers and with plain dicts.
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def authenticate(request_headers: Mapping[str, str], verifier: TokenVerifier) -> Caller:
    """The caller of a request, or ``Unauthorized`` (401) for missing/invalid/expired credentials."""
    authorization = _header(request_headers, "authorization")
    license_key = _header(request_headers, "x-license-key")
    if authorization and license_key:
        raise BadRequest("send either Authorization or X-License-Key, not both",
                         error="ambiguous_credentials")
    if license_key is not None:
        license_key = license_key.strip()
        if not license_key or len(license_key) > MAX_CREDENTIAL_LENGTH:
            raise Unauthorized("invalid license key")
        return LicenseKey(license_key)
    if not authorization:
        raise Unauthorized("missing credentials: send Authorization: Bearer <access token> or X-License-Key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_CREDENTIAL_LENGTH:
        raise Unauthorized("invalid authorization header")
    claims = verifier.verify(token)
    return User(user_id=claims["sub"], token=token, claims=claims)
