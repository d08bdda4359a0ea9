"""Settings: from the environment or from SSM Parameter Store (through moto), and a
missing or placeholder setting fails the cold start naming it, never showing a value.
A secret rotated in SSM is used within 5 minutes, and at once after a SnapStart restore."""

from __future__ import annotations

import importlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import snapshot_restore_py
from moto import mock_aws

from devstack import tokens
from functions import settings as settings_module
from functions.settings import (
    RETRY_SECONDS,
    SECRETS_MAX_AGE_SECONDS,
    CreditsApiSettings,
    LiveSettings,
    ResetSettings,
    SettingsError,
    WebhookSettings,
    load_settings,
)
from tests.lambda_events import LambdaContext, http_event, response_json
from tests.stripe_support import sign
from tests.support import Db

ORIGIN = "https://app.example.com"

SECRET = "a-very-secret-jwt-secret-of-sufficient-length"
SERVICE_KEY = "service-role-key-value-0123456789"

ENV = {
    "SUPABASE_URL": "https://abcd.supabase.co",
    "SUPABASE_ANON_KEY": "anon-key-value-0123456789",
    "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
    "SUPABASE_JWT_SECRET": SECRET,
    "STRIPE_WEBHOOK_SECRET": "whsec_0123456789",
    "CORS_ALLOW_ORIGINS": " https://app.example.com/ ,http://localhost:3000,",
}


def without(*names: str) -> dict[str, str]:
    return {k: v for k, v in ENV.items() if k not in names}


def test_values_from_the_environment() -> None:
    settings = load_settings(CreditsApiSettings, ENV)
    assert settings.supabase_url == "https://abcd.supabase.co"
    assert settings.service_key == SERVICE_KEY
    assert settings.cors_allow_origins == ("https://app.example.com", "http://localhost:3000")
    assert settings.rpc_timeout_seconds == 10.0
    # User tokens: issued by the project's Auth, verified against its published keys by default.
    assert settings.issuer == "https://abcd.supabase.co/auth/v1"
    assert settings.signing_keys_url == "https://abcd.supabase.co/auth/v1/.well-known/jwks.json"
    assert settings.jwt_secret == SECRET
    tuned = load_settings(ResetSettings, {**ENV, "RPC_TIMEOUT_SECONDS": "60", "RESET_BATCH_SIZE": "250"})
    assert tuned.rpc_timeout_seconds == 60.0 and tuned.reset_batch_size == 250
    # Secrets stay out of repr/str, so they cannot reach a log line that way.
    for text in (repr(settings), str(settings)):
        assert SECRET not in text and SERVICE_KEY not in text and ENV["SUPABASE_ANON_KEY"] not in text


def test_supabases_newer_api_keys_or_the_legacy_ones() -> None:
    newer = {**without("SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY"),
             "SUPABASE_PUBLISHABLE_KEY": "sb_publishable_0123456789",
             "SUPABASE_SECRET_KEY": "sb_secret_0123456789"}
    settings = load_settings(CreditsApiSettings, newer)
    assert settings.public_key == "sb_publishable_0123456789"
    assert settings.service_key == "sb_secret_0123456789"
    assert "sb_secret_0123456789" not in repr(settings)
    legacy = load_settings(CreditsApiSettings, ENV)
    assert (legacy.public_key, legacy.service_key) == (ENV["SUPABASE_ANON_KEY"], SERVICE_KEY)
    both = load_settings(CreditsApiSettings, {**ENV, "SUPABASE_SECRET_KEY": "sb_secret_0123456789"})
    assert both.service_key == "sb_secret_0123456789"  # the newer key wins
    with pytest.raises(SettingsError, match="SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY"):
        load_settings(CreditsApiSettings, without("SUPABASE_SERVICE_ROLE_KEY"))
    with pytest.raises(SettingsError, match="SUPABASE_PUBLISHABLE_KEY or SUPABASE_ANON_KEY"):
        load_settings(CreditsApiSettings, without("SUPABASE_ANON_KEY"))


@pytest.mark.parametrize("name", ["SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY",
                                  "CORS_ALLOW_ORIGINS"])
def test_a_missing_setting_is_named(name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(CreditsApiSettings, without(name))


@pytest.mark.parametrize("placeholder", ["", "   ", "changeme", "CHANGE_ME", "<your anon key>",
                                         "your-service-role-key", "${SUPABASE_ANON_KEY}", "xxxx"])
def test_placeholders_count_as_missing_and_are_not_echoed(placeholder: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(CreditsApiSettings, {**ENV, "SUPABASE_ANON_KEY": placeholder})
    assert "SUPABASE_ANON_KEY" in str(raised.value)
    if placeholder.strip():
        assert placeholder not in str(raised.value)


def test_each_function_needs_only_its_own_settings() -> None:
    # The JWT secret is optional (projects on signing keys have none); the JWKS URL has a default.
    jwks_only = load_settings(CreditsApiSettings, without("SUPABASE_JWT_SECRET"))
    assert jwks_only.jwt_secret is None
    custom = load_settings(CreditsApiSettings, {**ENV, "SUPABASE_JWKS_URL": "https://keys.example.com/jwks"})
    assert custom.signing_keys_url == "https://keys.example.com/jwks"
    # The webhook has no JWT secret or public key, the reset neither those nor a webhook secret.
    webhook = load_settings(WebhookSettings, without("SUPABASE_JWT_SECRET", "SUPABASE_ANON_KEY",
                                                     "CORS_ALLOW_ORIGINS"))
    assert webhook.stripe_webhook_secret == ENV["STRIPE_WEBHOOK_SECRET"]
    load_settings(ResetSettings, without("SUPABASE_JWT_SECRET", "SUPABASE_ANON_KEY",
                                         "STRIPE_WEBHOOK_SECRET", "CORS_ALLOW_ORIGINS"))
    with pytest.raises(SettingsError, match="STRIPE_WEBHOOK_SECRET"):
        load_settings(WebhookSettings, without("STRIPE_WEBHOOK_SECRET"))
    # Required fields have no defaults: a settings object cannot exist without them.
    with pytest.raises(ValueError):
        WebhookSettings(supabase_url="https://abcd.supabase.co", service_key="k")  # type: ignore[call-arg]


@pytest.mark.parametrize(("name", "value"), [
    ("SUPABASE_URL", "abcd.supabase.co"),
    ("SUPABASE_JWKS_URL", "file:///etc/keys.json"),
    ("RPC_TIMEOUT_SECONDS", "soon"),
    ("RPC_TIMEOUT_SECONDS", "-1"),
    ("RESET_BATCH_SIZE", "0"),
])
def test_unusable_values_are_named_not_shown(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        model = ResetSettings if name == "RESET_BATCH_SIZE" else CreditsApiSettings
        load_settings(model, {**ENV, name: value})
    assert name in str(raised.value) and value not in str(raised.value)


# --- SSM Parameter Store ---------------------------------------------------------------------


@pytest.fixture
def ssm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setattr(settings_module, "_ssm", None)  # the process's SSM client, made inside the mock
    with mock_aws():
        client = boto3.client("ssm", region_name="us-east-1")
        yield client


def put(ssm: Any, name: str, value: str, secure: bool = True) -> None:
    ssm.put_parameter(Name=name, Value=value, Type="SecureString" if secure else "String", Overwrite=True)


def test_secrets_resolved_from_ssm(ssm: Any) -> None:
    put(ssm, "/credits/test/supabase-url", "https://abcd.supabase.co", secure=False)
    put(ssm, "/credits/test/supabase-service-role-key", SERVICE_KEY)
    put(ssm, "/credits/test/supabase-jwt-secret", SECRET)
    put(ssm, "/credits/test/supabase-anon-key", "anon-from-ssm-0123456789")
    env = {
        "SUPABASE_URL_PARAM": "/credits/test/supabase-url",
        "SUPABASE_ANON_KEY_PARAM": "/credits/test/supabase-anon-key",
        "SUPABASE_SERVICE_ROLE_KEY_PARAM": "/credits/test/supabase-service-role-key",
        "SUPABASE_JWT_SECRET": "changeme",  # a placeholder value falls through to the parameter
        "SUPABASE_JWT_SECRET_PARAM": "/credits/test/supabase-jwt-secret",
        "CORS_ALLOW_ORIGINS": "https://app.example.com",
    }
    settings = load_settings(CreditsApiSettings, env)
    assert settings.supabase_url == "https://abcd.supabase.co"
    assert settings.service_key == SERVICE_KEY  # decrypted
    assert settings.jwt_secret == SECRET
    assert settings.public_key == "anon-from-ssm-0123456789"


def test_missing_or_placeholder_ssm_parameter_is_named(ssm: Any) -> None:
    env = {**without("SUPABASE_SERVICE_ROLE_KEY"),
           "SUPABASE_SERVICE_ROLE_KEY_PARAM": "/credits/test/does-not-exist"}
    with pytest.raises(SettingsError) as raised:
        load_settings(CreditsApiSettings, env)
    message = str(raised.value)
    assert "SUPABASE_SERVICE_ROLE_KEY" in message and "/credits/test/does-not-exist" in message

    put(ssm, "/credits/test/placeholder", "<paste the service role key here>")
    env["SUPABASE_SERVICE_ROLE_KEY_PARAM"] = "/credits/test/placeholder"
    with pytest.raises(SettingsError) as raised:
        load_settings(CreditsApiSettings, env)
    assert "SUPABASE_SERVICE_ROLE_KEY" in str(raised.value) and "paste" not in str(raised.value)


# --- cold starts ---------------------------------------------------------------------------------


def cold_import(module: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in ("SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
                 "SUPABASE_PUBLISHABLE_KEY", "SUPABASE_SECRET_KEY",
                 "SUPABASE_JWKS_URL", "STRIPE_WEBHOOK_SECRET", "CORS_ALLOW_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_PARAM", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop(module, None)
    try:
        return importlib.import_module(module)
    finally:
        sys.modules.pop(module, None)


def test_handlers_fail_their_cold_start_naming_the_missing_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="SUPABASE_ANON_KEY"):
        cold_import("handlers.deduct", without("SUPABASE_ANON_KEY"), monkeypatch)
    with pytest.raises(SettingsError, match="SUPABASE_SERVICE_ROLE_KEY"):
        cold_import("handlers.monthly_reset", without("SUPABASE_SERVICE_ROLE_KEY"), monkeypatch)
    module = cold_import("handlers.monthly_reset", {"SUPABASE_URL": ENV["SUPABASE_URL"],
                                                    "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY}, monkeypatch)
    assert callable(module.handler)


def test_handler_cold_start_reads_ssm(ssm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    put(ssm, "/credits/dev/supabase-url", "https://abcd.supabase.co", secure=False)
    put(ssm, "/credits/dev/supabase-anon-key", "anon-from-ssm-0123456789")
    put(ssm, "/credits/dev/supabase-service-role-key", SERVICE_KEY)
    put(ssm, "/credits/dev/supabase-jwt-secret", SECRET)
    module = cold_import("handlers.deduct", {
        "SUPABASE_URL_PARAM": "/credits/dev/supabase-url",
        "SUPABASE_ANON_KEY_PARAM": "/credits/dev/supabase-anon-key",
        "SUPABASE_SERVICE_ROLE_KEY_PARAM": "/credits/dev/supabase-service-role-key",
        "SUPABASE_JWT_SECRET_PARAM": "/credits/dev/supabase-jwt-secret",
        "CORS_ALLOW_ORIGINS": "https://app.example.com",
    }, monkeypatch)
    assert module.settings.get().jwt_secret == SECRET
    assert module.settings.get().public_key == "anon-from-ssm-0123456789"


# --- secrets that rotate: read again when older than 5 minutes and after a SnapStart restore ---------


class Clock:
    """A monotonic clock the test moves forward (no sleeping); whole seconds, so sums are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_live_settings_read_ssm_again_only_when_older_than_five_minutes(
        ssm: Any, caplog: pytest.LogCaptureFixture) -> None:
    put(ssm, "/credits/test/stripe-webhook-secret", "whsec_first_0123456789")
    env = {"SUPABASE_URL": ENV["SUPABASE_URL"], "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
           "STRIPE_WEBHOOK_SECRET_PARAM": "/credits/test/stripe-webhook-secret"}
    clock = Clock()
    live = LiveSettings(WebhookSettings, env, clock=clock)
    assert live.get().stripe_webhook_secret == "whsec_first_0123456789"

    put(ssm, "/credits/test/stripe-webhook-secret", "whsec_second_0123456789")
    clock.advance(SECRETS_MAX_AGE_SECONDS - 1)
    assert live.get().stripe_webhook_secret == "whsec_first_0123456789"  # not read again yet
    clock.advance(1)
    assert live.get().stripe_webhook_secret == "whsec_second_0123456789"

    # A failed read keeps the values in use, names the parameter (never a value), retries later.
    ssm.delete_parameter(Name="/credits/test/stripe-webhook-secret")
    clock.advance(SECRETS_MAX_AGE_SECONDS)
    assert live.get().stripe_webhook_secret == "whsec_second_0123456789"
    warned = [r for r in caplog.records if "could not be read again" in r.getMessage()]
    assert warned and "/credits/test/stripe-webhook-secret" in str(warned[-1].__dict__.get("reason"))
    assert not any("whsec_" in str(r.__dict__) for r in caplog.records)
    put(ssm, "/credits/test/stripe-webhook-secret", "whsec_third_0123456789")
    clock.advance(RETRY_SECONDS - 1)
    assert live.get().stripe_webhook_secret == "whsec_second_0123456789"
    clock.advance(1)
    assert live.get().stripe_webhook_secret == "whsec_third_0123456789"

    # After a restore, a failed read is tried again at the next request, not 30 s later.
    put(ssm, "/credits/test/stripe-webhook-secret", "<rotating>")  # a placeholder: refused
    live.after_restore()
    put(ssm, "/credits/test/stripe-webhook-secret", "whsec_fourth_0123456789")
    assert live.get().stripe_webhook_secret == "whsec_fourth_0123456789"


def test_a_rotated_secret_key_is_used_within_five_minutes_without_a_deploy(
        ssm: Any, monkeypatch: pytest.MonkeyPatch, rest_url: str, database: Db) -> None:
    """The old secret key was revoked at Supabase and the new one put in SSM: the warm function
    keeps failing until its copy is 5 minutes old, then spends with the new one."""
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    license_key = database.call("create_license_key", caller, p_account_id=account_id,
                                p_name="rotation")["key"]
    put(ssm, "/credits/dev/supabase-secret-key", "sb_secret_revoked_0123456789")
    module = cold_import("handlers.deduct", {
        "SUPABASE_URL": rest_url, "SUPABASE_PUBLISHABLE_KEY": tokens.publishable_key(),
        "SUPABASE_SECRET_KEY_PARAM": "/credits/dev/supabase-secret-key", "CORS_ALLOW_ORIGINS": ORIGIN,
    }, monkeypatch)
    clock = Clock()
    module.settings.clock = clock
    module.settings.refresh()  # as read at the cold start, on this clock

    def spend() -> int:
        event = http_event("POST", "/credits/deduct", body={"amount": 1},
                           headers={"x-license-key": license_key, "idempotency-key": str(uuid.uuid4())})
        return int(module.handler(event, LambdaContext())["statusCode"])

    total = database.balance(account_id)["total"]
    assert spend() == 401  # the REST layer refuses the revoked key
    put(ssm, "/credits/dev/supabase-secret-key", tokens.secret_key())
    clock.advance(SECRETS_MAX_AGE_SECONDS - 1)
    assert spend() == 401
    assert database.balance(account_id)["total"] == total
    clock.advance(1)
    assert spend() == 200
    assert database.balance(account_id)["total"] == total - 1


def test_the_after_restore_hook_reads_the_secrets_again(
        ssm: Any, monkeypatch: pytest.MonkeyPatch, rest_url: str) -> None:
    """SnapStart resumes every new environment from the deploy's memory: the hook the handler
    registers with the runtime's library makes a rolled webhook secret apply at once."""
    registry = snapshot_restore_py.get_after_restore()
    before = len(registry)
    put(ssm, "/credits/dev/stripe-webhook-secret", "whsec_deployed_0123456789")
    module = cold_import("handlers.stripe_webhook", {
        "SUPABASE_URL": rest_url, "SUPABASE_SECRET_KEY": tokens.secret_key(),
        "STRIPE_WEBHOOK_SECRET_PARAM": "/credits/dev/stripe-webhook-secret",
    }, monkeypatch)
    hooks = registry[before:]
    assert len(hooks) == 1  # registered at import, once
    module.settings.clock = Clock()  # time stands still: only the hook can read again

    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "test.rotation",
                       "api_version": "2024-06-20", "created": int(time.time()), "livemode": False,
                       "data": {"object": {"object": "balance"}}})

    def deliver(secret: str) -> tuple[int, Any]:
        event = http_event("POST", "/stripe/webhook", raw_body=body,
                           headers={"stripe-signature": sign(body, secret),
                                    "content-type": "application/json"})
        reply = module.handler(event, LambdaContext())
        return int(reply["statusCode"]), response_json(reply)

    put(ssm, "/credits/dev/stripe-webhook-secret", "whsec_rolled_0123456789")
    assert deliver("whsec_rolled_0123456789")[0] == 400  # the snapshot's secret is still in use
    func, args, kwargs = hooks[0]
    func(*args, **kwargs)  # what the runtime does after a restore
    status, answer = deliver("whsec_rolled_0123456789")
    assert status == 200 and answer["outcome"] == "ignored"
    assert deliver("whsec_deployed_0123456789")[0] == 400
