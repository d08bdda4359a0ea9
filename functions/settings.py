"""Settings of the Lambda functions, read once per cold start.

Each value comes from its environment variable, or from SSM Parameter Store when
``<NAME>_PARAM`` names a parameter instead (secrets stay out of the function's
configuration). Every function loads only what it needs, and a missing or
placeholder value stops the cold start with an error that names the setting but
never shows a value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Environment variable -> Settings field. Only these can be loaded.
ENV_FIELDS: dict[str, str] = {
    "SUPABASE_URL": "supabase_url",
    "SUPABASE_PUBLISHABLE_KEY": "supabase_publishable_key",
    "SUPABASE_SECRET_KEY": "supabase_secret_key",
    "SUPABASE_ANON_KEY": "supabase_anon_key",
    "SUPABASE_SERVICE_ROLE_KEY": "supabase_service_role_key",
    "SUPABASE_JWT_SECRET": "supabase_jwt_secret",
    "SUPABASE_JWKS_URL": "supabase_jwks_url",
    "STRIPE_WEBHOOK_SECRET": "stripe_webhook_secret",
    "CORS_ALLOW_ORIGINS": "cors_allow_origins",
    "RPC_TIMEOUT_SECONDS": "rpc_timeout_seconds",
    "RESET_BATCH_SIZE": "reset_batch_size",
    "RESET_SAFETY_MARGIN_MS": "reset_safety_margin_ms",
}

# Either name satisfies these requirements: a project signs tokens with the
# legacy shared secret or with asymmetric keys published as a JWKS; its API keys
# are the newer sb_publishable_/sb_secret_ ones or the legacy JWT-shaped ones.
JWT_VERIFIER: tuple[str, str] = ("SUPABASE_JWT_SECRET", "SUPABASE_JWKS_URL")
PUBLIC_KEY: tuple[str, str] = ("SUPABASE_PUBLISHABLE_KEY", "SUPABASE_ANON_KEY")
SERVICE_KEY: tuple[str, str] = ("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY")

# What each function needs (the webhook needs no JWT secret, the reset no public key).
CREDITS_API_SETTINGS: tuple[str | tuple[str, ...], ...] = (
    "SUPABASE_URL", PUBLIC_KEY, SERVICE_KEY, JWT_VERIFIER, "CORS_ALLOW_ORIGINS",
)
WEBHOOK_SETTINGS: tuple[str | tuple[str, ...], ...] = ("SUPABASE_URL", SERVICE_KEY, "STRIPE_WEBHOOK_SECRET")
MONTHLY_RESET_SETTINGS: tuple[str | tuple[str, ...], ...] = ("SUPABASE_URL", SERVICE_KEY)

_PLACEHOLDER = re.compile(r"^(change[-_ ]?me|todo|xxx+|<.*>|your[-_].*|\$\{.*\})$", re.IGNORECASE)


class SettingsError(RuntimeError):
    """A setting is missing or unusable. The message names it, never its value."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    supabase_url: str = ""
    supabase_publishable_key: str = ""
    supabase_secret_key: str = ""
    supabase_anon_key: str = ""
    supabase_service_role_key: str = ""
    supabase_jwt_secret: str | None = None
    supabase_jwks_url: str | None = None
    stripe_webhook_secret: str | None = None
    cors_allow_origins: list[str] = Field(default_factory=list)
    # Below API Gateway's 30 s so a slow database is a clean 503, not a gateway timeout.
    rpc_timeout_seconds: float = Field(default=10.0, gt=0, le=900)
    # A batch keeps its accounts locked until it commits: 1,000 keeps spends that
    # land on them waiting tens of milliseconds at most (docs/benchmarks.md).
    reset_batch_size: int = Field(default=1000, ge=1, le=100_000)
    reset_safety_margin_ms: int = Field(default=15_000, ge=0)

    @property
    def public_key(self) -> str:
        """The key sent as ``apikey`` with users' calls: the publishable key, else the legacy anon key."""
        return self.supabase_publishable_key or self.supabase_anon_key

    @property
    def service_key(self) -> str:
        """The service role's key: the secret key, else the legacy service_role key."""
        return self.supabase_secret_key or self.supabase_service_role_key

    @property
    def rest_url(self) -> str:
        return self.supabase_url.rstrip("/") + "/rest/v1"

    def __repr__(self) -> str:  # secrets never end up in a log line through repr()
        return f"Settings(supabase_url={self.supabase_url!r}, cors_allow_origins={self.cors_allow_origins!r})"

    __str__ = __repr__


def is_placeholder(value: str | None) -> bool:
    """True for values nobody would deploy on purpose (empty, "changeme", "<...>", "your-...")."""
    return value is None or not value.strip() or bool(_PLACEHOLDER.match(value.strip()))


def _from_ssm(setting: str, parameter: str) -> str:
    # Imported lazily: the local stack and most tests never touch AWS.
    from aws_lambda_powertools.utilities.parameters import SSMProvider

    try:
        return str(SSMProvider().get(parameter, decrypt=True))
    except Exception as exc:  # the SDK's errors carry no secret, but keep only their type
        raise SettingsError(
            f"setting {setting}: SSM parameter {parameter} could not be read ({type(exc).__name__})"
        ) from None


def _raw_value(name: str, environ: Mapping[str, str]) -> str | None:
    """The value of one setting: its env var, else the SSM parameter named by ``<NAME>_PARAM``."""
    direct = environ.get(name)
    if not is_placeholder(direct):
        return direct
    parameter = environ.get(f"{name}_PARAM")
    if is_placeholder(parameter):
        return None
    value = _from_ssm(name, str(parameter).strip())
    if is_placeholder(value):
        raise SettingsError(f"setting {name}: SSM parameter {parameter} holds an empty or placeholder value")
    return value


def _convert(name: str, value: str) -> Any:
    if name == "CORS_ALLOW_ORIGINS":
        return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
    if name == "SUPABASE_URL" and not re.match(r"^https?://[^\s/]+", value.strip()):
        raise SettingsError("setting SUPABASE_URL is not an http(s) URL")
    if name == "SUPABASE_JWKS_URL" and not value.strip().startswith(("https://", "http://")):
        raise SettingsError("setting SUPABASE_JWKS_URL is not an http(s) URL")
    return value.strip()


def load_settings(
    required: Iterable[str | tuple[str, ...]],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read every known setting; fail naming the first required one that is missing.

    ``required`` holds env names; a tuple means "at least one of these".
    Optional settings are read too when present (e.g. the JWKS URL next to the secret).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, field_name in ENV_FIELDS.items():
        raw = _raw_value(name, env)
        if raw is not None:
            values[field_name] = _convert(name, raw)

    for requirement in required:
        names = (requirement,) if isinstance(requirement, str) else tuple(requirement)
        unknown = [n for n in names if n not in ENV_FIELDS]
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]}")
        if not any(ENV_FIELDS[n] in values and values[ENV_FIELDS[n]] not in ([], "") for n in names):
            wanted = " or ".join(names)
            raise SettingsError(
                f"missing setting {wanted}: set the environment variable"
                f" (or {names[0]}_PARAM naming an SSM parameter)"
            )
    try:
        return Settings(**values)
    except ValueError as exc:
        # pydantic's message would echo the input; name the fields only.
        fields = sorted({str(err["loc"][0]) for err in getattr(exc, "errors", list)()} or {"?"})
        names = [env_name for env_name, f in ENV_FIELDS.items() if f in fields]
        raise SettingsError(f"invalid setting {', '.join(names) or fields[0]}") from None
