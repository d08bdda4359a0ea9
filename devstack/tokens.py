"""Supabase-style JWTs for the local stack and the tests.

Supabase's anon and service keys are HS256 JWTs signed with the project's JWT
secret whose ``role`` claim is ``anon`` / ``service_role``; a user's access
token carries ``sub``, ``role = authenticated``, ``aud = authenticated`` and
``app_metadata`` / ``user_metadata``. These helpers mint the same shapes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import jwt

LOCAL_JWT_SECRET = "local-development-jwt-secret-at-least-32-characters"  # local development only


def mint(claims: dict[str, Any], secret: str = LOCAL_JWT_SECRET, *, ttl: int = 3600,
         algorithm: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    now = int(time.time())
    body = {"iat": now, "exp": now + ttl, "iss": "supabase-local", **claims}
    return jwt.encode(body, secret, algorithm=algorithm, headers=headers)


def anon_key(secret: str = LOCAL_JWT_SECRET) -> str:
    return mint({"role": "anon"}, secret, ttl=10 * 365 * 86400)


def service_role_key(secret: str = LOCAL_JWT_SECRET) -> str:
    return mint({"role": "service_role"}, secret, ttl=10 * 365 * 86400)


def _new_key(kind: str, secret: str) -> str:
    # Supabase's newer API keys are opaque strings, not JWTs; the local ones are
    # derived from the local secret, so they are stable across starts.
    digest = hmac.new(secret.encode(), f"local-{kind}-key".encode(), hashlib.sha256).hexdigest()[:32]
    return f"sb_{kind}_{digest}"


def publishable_key(secret: str = LOCAL_JWT_SECRET) -> str:
    """The local ``sb_publishable_…`` key: acts as ``anon``."""
    return _new_key("publishable", secret)


def secret_key(secret: str = LOCAL_JWT_SECRET) -> str:
    """The local ``sb_secret_…`` key: acts as ``service_role``."""
    return _new_key("secret", secret)


def user_token(user_id: str, secret: str = LOCAL_JWT_SECRET, *, ttl: int = 3600,
               app_metadata: dict[str, Any] | None = None,
               user_metadata: dict[str, Any] | None = None, email: str | None = None) -> str:
    return mint({
        "sub": user_id, "role": "authenticated", "aud": "authenticated",
        "email": email or f"{user_id}@example.test",
        "app_metadata": app_metadata or {"provider": "email"},
        "user_metadata": user_metadata or {},
    }, secret, ttl=ttl)
