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
from typing import Any, Literal

import jwt

from functions.errors import BadRequest, ServiceUnavailable, Unauthorized
from functions.settings import Settings

AUDIENCE = "authenticated"
SYMMETRIC_ALGORITHMS = ["HS256"]
ASYMMETRIC_ALGORITHMS = ["ES256", "RS256"]
MAX_CREDENTIAL_LENGTH = 8192


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. ``token`` is forwarded to the REST layer as is."""

    kind: Literal["user", "license"]
    user_id: str | None = None
    token: str | None = field(default=None, repr=False)
    license_key: str | None = field(default=None, repr=False)
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


class TokenVerifier:
    """Verifies access tokens; one per cold start (the JWKS client caches keys)."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.supabase_jwt_secret
        self._jwks: jwt.PyJWKClient | None = None
        if settings.supabase_jwks_url:
            self._jwks = jwt.PyJWKClient(
                settings.supabase_jwks_url, cache_keys=True, lifespan=600, timeout=5
            )
        if not self._secret and self._jwks is None:
            raise ValueError("no JWT secret and no JWKS URL configured")

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("invalid access token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm in SYMMETRIC_ALGORITHMS and self._secret:
            key, algorithms = self._secret, SYMMETRIC_ALGORITHMS
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
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
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=AUDIENCE,
                options={"require": ["exp", "sub", "aud"]}, leeway=10,
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


def authenticate(
    request_headers: Mapping[str, str],
    settings: Settings,
    verifier: TokenVerifier | None = None,
) -> Caller:
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
        return Caller(kind="license", license_key=license_key)
    if not authorization:
        raise Unauthorized("missing credentials: send Authorization: Bearer <access token> or X-License-Key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_CREDENTIAL_LENGTH:
        raise Unauthorized("invalid authorization header")
    claims = (verifier or TokenVerifier(settings)).verify(token)
    return Caller(kind="user", user_id=claims["sub"], token=token, claims=claims)
