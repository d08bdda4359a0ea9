"""Settings of the Lambda functions, one type per function.

Each field names the environment variable(s) it comes from; a value may also
come from SSM Parameter Store when ``<NAME>_PARAM`` names a parameter instead
(secrets stay out of the function's configuration). Required fields have no
default: a missing or placeholder value stops the cold start with an error that
names the setting but never shows a value.

The functions hold their settings in a ``LiveSettings``: read at the cold
start, read again when older than ``SECRETS_MAX_AGE_SECONDS`` (5 minutes) and
after each SnapStart restore (a snapshot would otherwise keep the values of the
deploy forever), so a secret rotated in SSM is picked up without a redeploy.

Supabase issues two generations of API keys; each key field accepts the newer
name first and the legacy one second (``SUPABASE_SECRET_KEY`` or
``SUPABASE_SERVICE_ROLE_KEY``), so a project can switch without a redeploy of
this code.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


@dataclass(frozen=True)
class Env:
    """The environment variables a field is read from, preferred first."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        object.__setattr__(self, "names", names)


_PLACEHOLDER = re.compile(r"^(change[-_ ]?me|todo|xxx+|<.*>|your[-_].*|\$\{.*\})$", re.IGNORECASE)
_HTTP_URL = re.compile(r"^https?://[^\s/]+")


class SettingsError(RuntimeError):
    """A setting is missing or unusable. The message names it, never its value."""


def _http_url(value: str) -> str:
    if not _HTTP_URL.match(value):
        raise ValueError("not an http(s) URL")
    return value.rstrip("/")


class FunctionSettings(BaseModel):
    """What every function needs: where the project is and the service role's key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    supabase_url: Annotated[str, Env("SUPABASE_URL")]
    service_key: Annotated[str, Env("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"), Field(repr=False)]
    # Below API Gateway's 30 s so a slow database is a clean 503, not a gateway timeout.
    rpc_timeout_seconds: Annotated[float, Env("RPC_TIMEOUT_SECONDS"), Field(gt=0, le=900)] = 10.0

    @field_validator("supabase_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


class CreditsApiSettings(FunctionSettings):
    """The credits API: users' calls go out with the public key and their own token."""

    public_key: Annotated[str, Env("SUPABASE_PUBLISHABLE_KEY", "SUPABASE_ANON_KEY"), Field(repr=False)]
    cors_allow_origins: Annotated[tuple[str, ...], Env("CORS_ALLOW_ORIGINS"), Field(min_length=1)]
    # The project's signing keys; default: SUPABASE_URL/auth/v1/.well-known/jwks.json.
    jwks_url: Annotated[str | None, Env("SUPABASE_JWKS_URL")] = None
    # Only for projects still signing with the legacy shared secret (HS256).
    jwt_secret: Annotated[str | None, Env("SUPABASE_JWT_SECRET"), Field(repr=False)] = None

    @field_validator("jwks_url")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        return value

    @property
    def issuer(self) -> str:
        """The ``iss`` of the project's user tokens."""
        return f"{self.supabase_url}/auth/v1"

    @property
    def signing_keys_url(self) -> str:
        return self.jwks_url or f"{self.issuer}/.well-known/jwks.json"


class WebhookSettings(FunctionSettings):
    """The Stripe webhook: the endpoint's signing secret."""

    stripe_webhook_secret: Annotated[str, Env("STRIPE_WEBHOOK_SECRET"), Field(repr=False)]


class ResetSettings(FunctionSettings):
    """The monthly reset's batching."""

    # A batch keeps its accounts locked until it commits: 1,000 keeps spends that
    # land on them waiting tens of milliseconds at most (docs/benchmarks.md).
    reset_batch_size: Annotated[int, Env("RESET_BATCH_SIZE"), Field(ge=1, le=100_000)] = 1000
    reset_safety_margin_ms: Annotated[int, Env("RESET_SAFETY_MARGIN_MS"), Field(ge=0)] = 15_000


STRIPE_API = "https://api.stripe.com"


class NotifySettings(FunctionSettings):
    """notify: where credit events are delivered and how they are signed, and the Stripe key
    that pays auto top-ups.

    Without ``NOTIFY_WEBHOOK_URL`` nothing is sent (events stay pending and
    readable) but the sweep still runs; with it, ``NOTIFY_SIGNING_SECRET`` is
    required. Deliveries get ``NOTIFY_CONNECT_TIMEOUT_SECONDS`` to connect and
    ``NOTIFY_TIMEOUT_SECONDS`` for each read or write, and a claimed event stays
    leased to this run for ``NOTIFY_LEASE_SECONDS``, which must outlast one delivery.
    Auto top-ups are charged with ``STRIPE_API_KEY`` at ``STRIPE_API_BASE`` (default
    Stripe's API), each request within ``STRIPE_TIMEOUT_SECONDS``.
    """

    notify_webhook_url: Annotated[str | None, Env("NOTIFY_WEBHOOK_URL"), Field(repr=False)] = None
    notify_signing_secret: Annotated[str | None, Env("NOTIFY_SIGNING_SECRET"), Field(repr=False)] = None
    notify_batch_size: Annotated[int, Env("NOTIFY_BATCH_SIZE"), Field(ge=1, le=1000)] = 100
    notify_concurrency: Annotated[int, Env("NOTIFY_CONCURRENCY"), Field(ge=1, le=64)] = 8
    notify_connect_timeout_seconds: Annotated[float, Env("NOTIFY_CONNECT_TIMEOUT_SECONDS"),
                                              Field(gt=0, le=30)] = 3.0
    notify_timeout_seconds: Annotated[float, Env("NOTIFY_TIMEOUT_SECONDS"), Field(gt=0, le=60)] = 10.0
    notify_lease_seconds: Annotated[int, Env("NOTIFY_LEASE_SECONDS"), Field(ge=1, le=900)] = 60
    # No new claim once less than this is left of the Lambda's time (a delivery and its record fit in it).
    notify_safety_margin_ms: Annotated[int, Env("NOTIFY_SAFETY_MARGIN_MS"), Field(ge=0)] = 25_000
    # Auto top-up (functions.topup): the Stripe secret or restricted key that charges the saved
    # payment methods. Without it a due top-up ends failed (not_configured) and auto top-up is
    # disabled for that account.
    stripe_api_key: Annotated[str | None, Env("STRIPE_API_KEY"), Field(repr=False)] = None
    # Where Stripe's API is (tests and the local stack point it at a Stripe stand-in).
    stripe_api_base: Annotated[str, Env("STRIPE_API_BASE")] = STRIPE_API
    # Each Stripe request's limit after connecting (3 s at most); a top-up makes at most 5 requests,
    # all within its lease (functions.topup.LEASE_SECONDS).
    stripe_timeout_seconds: Annotated[float, Env("STRIPE_TIMEOUT_SECONDS"), Field(gt=0, le=15)] = 10.0

    @field_validator("stripe_api_base")
    @classmethod
    def _stripe_base(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("notify_webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        # Used exactly as given (a trailing slash may matter to the receiver's routes).
        if value is not None and not _HTTP_URL.match(value):
            raise ValueError("not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NotifySettings:
        # Raised as SettingsError (not ValueError): pydantic passes it on as it is, with its message.
        if self.notify_webhook_url is not None and self.notify_signing_secret is None:
            raise SettingsError("missing setting NOTIFY_SIGNING_SECRET: required when NOTIFY_WEBHOOK_URL is"
                                " set (set the environment variable, or NOTIFY_SIGNING_SECRET_PARAM naming"
                                " an SSM parameter)")
        if self.notify_lease_seconds <= self.notify_connect_timeout_seconds + 2 * self.notify_timeout_seconds:
            raise SettingsError("invalid setting NOTIFY_LEASE_SECONDS: it must outlast one delivery"
                                " (NOTIFY_CONNECT_TIMEOUT_SECONDS + 2 x NOTIFY_TIMEOUT_SECONDS)")
        return self

    @property
    def sends(self) -> bool:
        """True when events are delivered (a webhook URL is set)."""
        return self.notify_webhook_url is not None


S = TypeVar("S", bound=FunctionSettings)
S_co = TypeVar("S_co", bound=FunctionSettings, covariant=True)

# How long a value read from SSM (or the environment) is used before it is read again.
SECRETS_MAX_AGE_SECONDS = 300.0
# After a failed re-read the values in use are kept; the next attempt waits this long.
RETRY_SECONDS = 30.0


def is_placeholder(value: str | None) -> bool:
    """True for values nobody would deploy on purpose (empty, "changeme", "<...>", "your-...")."""
    return value is None or not value.strip() or bool(_PLACEHOLDER.match(value.strip()))


_ssm: Any = None


def _ssm_provider() -> Any:
    """One SSM client per process (building a boto3 client costs more than a read)."""
    global _ssm
    if _ssm is None:
        # Imported lazily: the local stack and most tests never touch AWS.
        from aws_lambda_powertools.utilities.parameters import SSMProvider
        from botocore.config import Config  # type: ignore[import-untyped]

        # Short timeouts: a re-read runs inside a request or the after-restore hook (10 s budget).
        _ssm = SSMProvider(boto_config=Config(connect_timeout=2, read_timeout=3,
                                              retries={"max_attempts": 2, "mode": "standard"}))
    return _ssm


def _from_ssm(setting: str, parameter: str) -> str:
    try:
        # LiveSettings decides when to read again; Powertools' own cache must not answer for it.
        return str(_ssm_provider().get(parameter, decrypt=True, force_fetch=True))
    except Exception as exc:  # the SDK's errors carry no secret, but keep only their type
        raise SettingsError(
            f"setting {setting}: SSM parameter {parameter} could not be read ({type(exc).__name__})"
        ) from None


def _raw_value(name: str, environ: Mapping[str, str]) -> str | None:
    """The value of one variable: itself, else the SSM parameter named by ``<NAME>_PARAM``."""
    direct = environ.get(name)
    if direct is not None and not is_placeholder(direct):
        return direct.strip()
    parameter = environ.get(f"{name}_PARAM")
    if parameter is None or is_placeholder(parameter):
        return None
    value = _from_ssm(name, parameter.strip())
    if is_placeholder(value):
        raise SettingsError(f"setting {name}: SSM parameter {parameter} holds an empty or placeholder value")
    return value.strip()


def _env_of(model: type[BaseModel], field: str) -> Env:
    for item in model.model_fields[field].metadata:
        if isinstance(item, Env):
            return item
    raise TypeError(f"{model.__name__}.{field} names no environment variable")


def load_settings(model: type[S], environ: Mapping[str, str] | None = None) -> S:
    """The settings of one function; fails naming the first missing or unusable one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for field, info in model.model_fields.items():
        wanted = _env_of(model, field)
        for name in wanted.names:
            raw = _raw_value(name, env)
            if raw is not None:
                values[field], names[field] = raw, name
                break
        else:
            if info.is_required():
                raise SettingsError(
                    f"missing setting {' or '.join(wanted.names)}: set the environment variable"
                    f" (or {wanted.names[0]}_PARAM naming an SSM parameter)")
    try:
        return model(**values)
    except ValidationError as exc:
        # pydantic's message would echo the input; name the variable only.
        field = str(exc.errors()[0]["loc"][0]) if exc.errors() else ""
        raise SettingsError(f"invalid setting {names.get(field, field)}") from None


class SettingsSource(Protocol[S_co]):
    """Where an app gets its settings for each request: fixed, or a ``LiveSettings``."""

    def get(self) -> S_co: ...


class FixedSettings(Generic[S]):
    """Settings that never change (tests, the local stack without SSM)."""

    def __init__(self, value: S) -> None:
        self._value = value

    def get(self) -> S:
        return self._value


class LiveSettings(Generic[S]):
    """A function's settings, read again when older than ``max_age`` seconds and on ``refresh()``
    (the SnapStart after-restore hook calls it).

    The first read happens here, so a missing setting still fails the cold start.
    A later read that fails (SSM unreachable, a parameter deleted) keeps the
    values in use, logs the setting's name, and is tried again ``RETRY_SECONDS``
    later. ``clock`` is a monotonic clock in seconds (tests move it forward).
    """

    def __init__(self, model: type[S], environ: Mapping[str, str] | None = None, *,
                 max_age: float = SECRETS_MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._model, self._environ, self._max_age = model, environ, max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._value = load_settings(model, environ)
        self._next_read = clock() + max_age

    def get(self) -> S:
        if self.clock() < self._next_read:
            return self._value
        return self.refresh()

    def refresh(self, *, retry_in: float = RETRY_SECONDS) -> S:
        """Read every setting again now; on failure keep the values in use and try again
        ``retry_in`` seconds later (0: at the next ``get()``)."""
        if not self._lock.acquire(blocking=False):
            return self._value  # another thread is reading them; its result will be used next
        try:
            try:
                self._value = load_settings(self._model, self._environ)
                self._next_read = self.clock() + self._max_age
            except SettingsError as exc:
                from functions.observability import logger

                # The message names the setting and parameter, never a value.
                logger.warning("settings could not be read again; the values in use are kept",
                               extra={"reason": str(exc)})
                self._next_read = self.clock() + retry_in
            return self._value
        finally:
            self._lock.release()

    def after_restore(self) -> None:
        """SnapStart resumed a snapshot: read again now, and should that fail, at the next
        ``get()`` rather than keep the snapshot's values for long."""
        self.refresh(retry_in=0)


def settings_source(settings: S | SettingsSource[S]) -> SettingsSource[S]:
    """A settings object as a source (fixed), or the source as it is."""
    if isinstance(settings, FunctionSettings):
        return FixedSettings(settings)
    return settings
