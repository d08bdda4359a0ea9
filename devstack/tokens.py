"""The local stack's keys and Supabase-style tokens, for the local stack and the tests.

A Supabase project has, today: an ES256 signing key whose public half is
published at ``/auth/v1/.well-known/jwks.json`` (user access tokens are signed
with it, ``kid`` in the header); the legacy JWT secret (HS256), which signed the
legacy ``anon``/``service_role`` API keys and older user tokens; and the newer
opaque API keys ``sb_publishable_…`` (acts as ``anon``) and ``sb_secret_…``
(acts as ``service_role``). ``LocalKeys`` holds the same set, generated at
random: once per data directory for ``./dev start`` (kept in ``.local/``), once
per process for the tests; and the seeded user's demo license key, so that
nothing in the repository can spend from a local stack's accounts. A user's
token carries ``sub``, ``role`` and ``aud`` = ``authenticated``, ``iss`` =
``<SUPABASE_URL>/auth/v1`` and the metadata objects, as Supabase Auth issues them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

LEGACY_KEY_TTL = 10 * 365 * 86400


def new_demo_license_key() -> str:
    """A license key as ``create_license_key`` makes them (256 random bits), marked as the demo's."""
    return f"ck_demo_{secrets.token_hex(32)}"


@dataclass(frozen=True)
class LocalKeys:
    jwt_secret: str       # legacy HS256 secret
    signing_key: str      # ES256 private key (PEM)
    kid: str
    publishable_key: str  # sb_publishable_…
    secret_key: str       # sb_secret_…
    webhook_secret: str   # whsec_… (the local Stripe endpoint's signing secret)
    # The seeded user's license key (ck_demo_…); the local stack stores its hash.
    demo_license_key: str = ""

    @classmethod
    def generate(cls) -> LocalKeys:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return cls(jwt_secret=secrets.token_urlsafe(40), signing_key=pem, kid=secrets.token_hex(8),
                   publishable_key=f"sb_publishable_{secrets.token_urlsafe(24)}",
                   secret_key=f"sb_secret_{secrets.token_urlsafe(24)}",
                   webhook_secret=f"whsec_{secrets.token_hex(24)}",
                   demo_license_key=new_demo_license_key())

    @classmethod
    def load_or_create(cls, path: Path) -> LocalKeys:
        """The keys kept at ``path`` (readable by the owner only), made on first use; a
        file from before the demo license key was kept here gets one."""
        if path.exists():
            keys = cls(**json.loads(path.read_text()))
            if keys.demo_license_key:
                return keys
            keys = replace(keys, demo_license_key=new_demo_license_key())
            path.unlink()
        else:
            keys = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(keys), out, indent=1)
        return keys

    @cached_property
    def _private(self) -> Any:
        return serialization.load_pem_private_key(self.signing_key.encode(), password=None)

    @cached_property
    def public_key(self) -> Any:
        return self._private.public_key()

    def jwks(self) -> dict[str, Any]:
        """The public signing key as Supabase publishes it."""
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.public_key))
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig", "key_ops": ["verify"]})
        return {"keys": [jwk]}

    def mint(self, claims: dict[str, Any], *, ttl: int = 3600, algorithm: str = "ES256",
             headers: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        body = {"iat": now, "exp": now + ttl, **claims}
        if algorithm.startswith("HS"):
            return jwt.encode(body, self.jwt_secret, algorithm=algorithm, headers=headers)
        return jwt.encode(body, self._private, algorithm=algorithm,
                          headers={"kid": self.kid, **(headers or {})})

    def anon_key(self) -> str:
        """The legacy ``anon`` API key (an HS256 JWT)."""
        return self.mint({"iss": "supabase", "role": "anon"}, ttl=LEGACY_KEY_TTL, algorithm="HS256")

    def service_role_key(self) -> str:
        """The legacy ``service_role`` API key (an HS256 JWT)."""
        return self.mint({"iss": "supabase", "role": "service_role"}, ttl=LEGACY_KEY_TTL, algorithm="HS256")

    def user_token(self, user_id: str, *, issuer: str, ttl: int = 3600, algorithm: str = "ES256",
                   app_metadata: dict[str, Any] | None = None,
                   user_metadata: dict[str, Any] | None = None, email: str | None = None) -> str:
        return self.mint({
            "iss": issuer, "sub": user_id, "role": "authenticated", "aud": "authenticated",
            "email": email or f"{user_id}@example.test",
            "app_metadata": app_metadata or {"provider": "email"},
            "user_metadata": user_metadata or {},
        }, ttl=ttl, algorithm=algorithm)

    def verify(self, token: str) -> dict[str, Any]:
        """Check a token the way the project's REST layer does: ES256 with the signing
        key (matching ``kid``) or HS256 with the legacy secret; ``exp`` enforced."""
        header = jwt.get_unverified_header(token)
        if header.get("alg") == "ES256":
            if header.get("kid") != self.kid:
                raise jwt.InvalidSignatureError("unknown signing key")
            key: Any = self.public_key
            algorithms = ["ES256"]
        else:
            key, algorithms = self.jwt_secret, ["HS256"]
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=algorithms, options={"verify_aud": False})
        return claims


# --- the process's keys (tests, benchmarks): one random set, and the issuer -------------

_process_keys: LocalKeys | None = None
_issuer = "http://127.0.0.1/auth/v1"


def default_keys() -> LocalKeys:
    global _process_keys
    if _process_keys is None:
        _process_keys = LocalKeys.generate()
    return _process_keys


def use_issuer(supabase_url: str) -> None:
    """Mint user tokens for the project at ``supabase_url`` (their ``iss``)."""
    global _issuer
    _issuer = f"{supabase_url.rstrip('/')}/auth/v1"


def issuer_for(supabase_url: str) -> str:
    return f"{supabase_url.rstrip('/')}/auth/v1"


def mint(claims: dict[str, Any], secret: str | None = None, *, ttl: int = 3600,
         algorithm: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    """An arbitrary token: HS256 with the legacy secret (or ``secret``), or ES256 with the signing key."""
    if secret is not None:
        now = int(time.time())
        body = {"iat": now, "exp": now + ttl, **claims}
        return jwt.encode(body, secret, algorithm=algorithm, headers=headers)
    return default_keys().mint({"iss": _issuer, **claims}, ttl=ttl, algorithm=algorithm, headers=headers)


def anon_key() -> str:
    return default_keys().anon_key()


def service_role_key() -> str:
    return default_keys().service_role_key()


def publishable_key() -> str:
    return default_keys().publishable_key


def secret_key() -> str:
    return default_keys().secret_key


def user_token(user_id: str, *, ttl: int = 3600, algorithm: str = "ES256", issuer: str | None = None,
               app_metadata: dict[str, Any] | None = None,
               user_metadata: dict[str, Any] | None = None, email: str | None = None) -> str:
    return default_keys().user_token(user_id, issuer=issuer or _issuer, ttl=ttl, algorithm=algorithm,
                                     app_metadata=app_metadata, user_metadata=user_metadata, email=email)
