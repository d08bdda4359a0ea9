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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from functions.errors import BadRequest, ServiceUnavailable, Unauthorized
from functions.settings import CreditsApiSettings

AUDIENCE = "authenticated"
SYMMETRIC_ALGORITHMS = ["HS256"]
ASYMMETRIC_ALGORITHMS = ["ES256", "RS256"]
MAX_CREDENTIAL_LENGTH = 8192
# Keys are cached for KEYS_LIFESPAN_SECONDS; a token naming an unknown kid (a
# rotation) fetches them again, at most once per REFRESH_COOLDOWN_SECONDS, so
# a stream of made-up kids cannot turn every request into a fetch.
KEYS_LIFESPAN_SECONDS = 600
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


class TokenVerifier:
    """Verifies access tokens; one per cold start.

    Asymmetric tokens (ES256/RS256) are checked against the project's JWKS:
    PyJWT's client caches the keys and fetches them again when a token names a
    ``kid`` it does not know (a key rotation). HS256 is accepted only when the
    legacy shared secret is configured.
    """

    def __init__(self, settings: CreditsApiSettings, *,
                 refresh_cooldown: float = REFRESH_COOLDOWN_SECONDS) -> None:
        self._secret = settings.jwt_secret
        self._issuer = settings.issuer
        self._jwks = jwt.PyJWKClient(settings.signing_keys_url, cache_keys=True,
                                     lifespan=KEYS_LIFESPAN_SECONDS, timeout=5,
                                     cooldown_duration=refresh_cooldown)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("invalid access token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm in SYMMETRIC_ALGORITHMS and self._secret:
            key, algorithms = self._secret, SYMMETRIC_ALGORITHMS
        elif algorithm in ASYMMETRIC_ALGORITHMS:
            try:
                key = self._jwks.get_signing_key_from_jwt(token).key
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
                token, key, algorithms=algorithms, audience=AUDIENCE, issuer=self._issuer,
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
