"""serverless.yml names handlers and routes that exist, reads settings only from SSM
parameters of its stage, and grants each function only those parameters."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.package import load_serverless_yml

ROOT = Path(__file__).resolve().parent.parent
SECRET_SETTINGS = ("SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
                   "SUPABASE_PUBLISHABLE_KEY", "SUPABASE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET",
                   "NOTIFY_SIGNING_SECRET", "STRIPE_API_KEY")
HANDLER_ENV = {
    "SUPABASE_URL": "https://abcd.supabase.co",
    "SUPABASE_ANON_KEY": "anon-key-value-0123456789",
    "SUPABASE_SERVICE_ROLE_KEY": "service-role-key-value-0123456789",
    "SUPABASE_JWT_SECRET": "jwt-secret-value-of-at-least-32-characters",
    "STRIPE_WEBHOOK_SECRET": "whsec_0123456789abcdef",
    "CORS_ALLOW_ORIGINS": "https://app.example.com",
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_serverless_yml()


def import_handler(handler: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in HANDLER_ENV.items():
        monkeypatch.setenv(name, value)
    path, _, attribute = handler.rpartition(".")
    module_name = path.replace("/", ".")
    assert (ROOT / f"{path}.py").is_file(), handler
    sys.modules.pop(module_name, None)
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.modules.pop(module_name, None)
    target = getattr(module, attribute)
    assert callable(target)
    return module


def http_routes(function: dict[str, Any]) -> set[tuple[str, str]]:
    routes = set()
    for event in function.get("events", []):
        if "httpApi" in event:
            spec = event["httpApi"]
            method, path = spec.split(" ", 1) if isinstance(spec, str) else (spec["method"], spec["path"])
            routes.add((method.upper(), path))
    return routes


def app_routes(app: Any) -> set[tuple[str, str]]:
    """Every (method, path) the app serves: its OpenAPI operations (routes of included
    routers too) and FastAPI's own documentation pages."""
    found = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
             for method in operations}
    return found | {("GET", url) for url in (app.openapi_url, app.docs_url) if url}


def test_four_python312_functions_with_real_handlers(config: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert config["provider"]["runtime"] == "python3.12"
    functions = config["functions"]
    assert set(functions) == {"deduct", "stripeWebhook", "monthlyReset", "notify"}
    assert functions["deduct"]["handler"] == "handlers/deduct.handler"
    assert functions["stripeWebhook"]["handler"] == "handlers/stripe_webhook.handler"
    assert functions["monthlyReset"]["handler"] == "handlers/monthly_reset.handler"
    assert functions["notify"]["handler"] == "handlers/notify.handler"
    for name, function in functions.items():
        assert "${sls:stage}" in function["name"], name  # one set of functions per stage
        import_handler(function["handler"], monkeypatch)


def test_http_routes_exist_in_the_apps(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    deduct = import_handler("handlers/deduct.handler", monkeypatch)
    declared = http_routes(config["functions"]["deduct"])
    assert declared <= app_routes(deduct.app), declared - app_routes(deduct.app)
    assert app_routes(deduct.app) <= declared, app_routes(deduct.app) - declared  # all reachable

    webhook = import_handler("handlers/stripe_webhook.handler", monkeypatch)
    assert http_routes(config["functions"]["stripeWebhook"]) == {("POST", "/stripe/webhook")}
    assert ("POST", "/stripe/webhook") in app_routes(webhook.app)
    assert not http_routes(config["functions"]["monthlyReset"])
    assert not http_routes(config["functions"]["notify"])


def test_the_webhook_releases_ready_parked_events_on_a_schedule(config: dict[str, Any]) -> None:
    webhook = config["functions"]["stripeWebhook"]
    schedules = [event["schedule"] for event in webhook["events"] if "schedule" in event]
    assert [s["rate"] for s in schedules] == ["rate(5 minutes)"]
    assert schedules[0]["input"] == {"source": "aws.events"}


def test_monthly_reset_schedule(config: dict[str, Any]) -> None:
    reset = config["functions"]["monthlyReset"]
    rates = [event["schedule"]["rate"] for event in reset["events"] if "schedule" in event]
    assert "cron(5 0 * * ? *)" in rates  # 00:05 UTC every day (yearly anniversaries, stopped payments)
    assert any(re.fullmatch(r"cron\(5 \d+-\d+ \* \* \? \*\)", rate) for rate in rates)  # retries each morning
    assert reset["timeout"] == 900
    margin_ms = int(reset["environment"]["RESET_SAFETY_MARGIN_MS"])
    assert margin_ms > int(reset["environment"]["RPC_TIMEOUT_SECONDS"]) * 1000
    assert margin_ms < reset["timeout"] * 1000


def test_notify_runs_every_minute_and_sends_only_where_a_stage_says(config: dict[str, Any]) -> None:
    notify = config["functions"]["notify"]
    schedules = [event["schedule"] for event in notify["events"] if "schedule" in event]
    assert [s["rate"] for s in schedules] == ["rate(1 minute)"]
    assert not [event for event in notify["events"] if "schedule" not in event]
    env = function_env(config, "notify")
    # A run stops claiming while a delivery and its record still fit in the function's time...
    margin_ms = int(env["NOTIFY_SAFETY_MARGIN_MS"])
    one_delivery_s = float(env["NOTIFY_CONNECT_TIMEOUT_SECONDS"]) + 2 * float(env["NOTIFY_TIMEOUT_SECONDS"])
    assert one_delivery_s * 1000 < margin_ms < notify["timeout"] * 1000 <= 60_000
    # ...and an event stays leased to it longer than that delivery can take.
    assert one_delivery_s < int(env["NOTIFY_LEASE_SECONDS"]) <= 900
    assert notify["maximumRetryAttempts"] == 0  # the next minute's run is the retry
    # Nothing is sent unless a stage names the receiver and the signing secret's parameter.
    assert env["NOTIFY_WEBHOOK_URL"] == "${param:notifyWebhookUrl}"
    assert env["NOTIFY_SIGNING_SECRET_PARAM"] == "${param:notifySigningSecretParam}"
    assert config["params"]["default"]["notifyWebhookUrl"] == ""
    assert config["params"]["default"]["notifySigningSecretParam"] == ""


def test_notify_charges_auto_top_ups_only_where_a_stage_names_the_stripe_key(config: dict[str, Any]) -> None:
    from functions.settings import NotifySettings
    from functions.topup import CONNECT_TIMEOUT_SECONDS, LEASE_SECONDS

    env = function_env(config, "notify")
    # The key only from the parameter a stage names (none by default: due top-ups fail not_configured).
    assert env["STRIPE_API_KEY_PARAM"] == "${param:stripeApiKeyParam}"
    assert config["params"]["default"]["stripeApiKeyParam"] == ""
    assert "STRIPE_API_BASE" not in env  # Stripe's API
    # A claimed top-up stays this run's while its requests (at most 5) can still be running.
    timeout = float(env["STRIPE_TIMEOUT_SECONDS"])
    limit = NotifySettings.model_fields["stripe_timeout_seconds"].metadata
    assert 0 < timeout <= next(m.le for m in limit if getattr(m, "le", None) is not None)
    assert 5 * (CONNECT_TIMEOUT_SECONDS + timeout) < LEASE_SECONDS
    # The notify zip ships stripe-python.
    assert "stripe" in config["custom"]["packages"]["notify"]["requirements"]


def function_env(config: dict[str, Any], name: str) -> dict[str, str]:
    return {**config["provider"].get("environment", {}), **config["functions"][name].get("environment", {})}


def resolve(value: str, config: dict[str, Any]) -> str:
    return value.replace("${self:custom.ssmPrefix}", config["custom"]["ssmPrefix"]).replace(
        "${param:jwtSecretParam}", config["params"]["default"]["jwtSecretParam"]).replace(
        "${param:notifySigningSecretParam}", config["params"]["default"]["notifySigningSecretParam"]).replace(
        "${param:stripeApiKeyParam}", config["params"]["default"]["stripeApiKeyParam"])


def test_secrets_only_from_this_stages_ssm_with_least_privilege(config: dict[str, Any]) -> None:
    assert "iam" not in config["provider"]  # no shared role: each function has its own statements
    prefix = "arn:aws:ssm:${AWS::Region}:${AWS::AccountId}:parameter"
    for name, function in config["functions"].items():
        env = function_env(config, name)
        for secret in SECRET_SETTINGS:
            assert secret not in env, (name, secret)  # never a value, only a parameter name
        # An empty parameter name is a setting left off (the legacy JWT secret by default).
        params = {k: resolve(v, config) for k, v in env.items() if k.endswith("_PARAM")}
        params = {k: v for k, v in params.items() if v}
        assert params, name
        for setting, parameter in params.items():
            assert parameter.startswith("/credits/${sls:stage}/"), (name, setting, parameter)

        statements = function["iamRoleStatements"]
        actions = {action for s in statements for action in s["Action"]}
        assert actions == {"ssm:GetParameter", "ssm:GetParameters", "kms:Decrypt"}, name
        assert all(s["Effect"] == "Allow" for s in statements)
        # ARNs are filled in by CloudFormation (Fn::Sub), never looked up while packaging.
        ssm_resources = {r["Fn::Sub"] for s in statements if "ssm:GetParameter" in s["Action"]
                         for r in s["Resource"]}
        # Exactly the parameters this function reads, nothing else.
        # (deduct may also read the legacy JWT secret, and notify the signing secret of its
        # events and the Stripe key of auto top-ups, when a stage names those parameters.)
        optional = {"deduct": {"/credits/${sls:stage}/supabase-jwt-secret"},
                    "notify": {"/credits/${sls:stage}/notify-signing-secret",
                               "/credits/${sls:stage}/stripe-api-key"}}
        legacy = {prefix + parameter for parameter in optional.get(name, set())}
        assert ssm_resources == {prefix + p for p in params.values()} | legacy, name
        kms = [s for s in statements if "kms:Decrypt" in s["Action"]]
        assert len(kms) == 1
        assert kms[0]["Condition"]["StringEquals"]["kms:ViaService"]["Fn::Sub"].startswith("ssm.")


def test_each_function_reads_only_what_it_needs(config: dict[str, Any]) -> None:
    def settings(name: str) -> set[str]:
        return {k.removesuffix("_PARAM") for k in function_env(config, name) if k.endswith("_PARAM")}

    # Supabase's current API keys; the legacy JWT secret only where a project still has one.
    assert settings("deduct") == {"SUPABASE_URL", "SUPABASE_SECRET_KEY", "SUPABASE_PUBLISHABLE_KEY",
                                  "SUPABASE_JWT_SECRET"}
    assert config["params"]["default"]["jwtSecretParam"] == ""
    assert settings("stripeWebhook") == {"SUPABASE_URL", "SUPABASE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"}
    assert settings("monthlyReset") == {"SUPABASE_URL", "SUPABASE_SECRET_KEY"}
    assert settings("notify") == {"SUPABASE_URL", "SUPABASE_SECRET_KEY", "NOTIFY_SIGNING_SECRET",
                                  "STRIPE_API_KEY"}
    assert "CORS_ALLOW_ORIGINS" in function_env(config, "deduct")


def test_packaging_and_cors(config: dict[str, Any]) -> None:
    # Each function uploads the zip ./dev package built for it; nothing else packs Python.
    assert config["plugins"] == ["serverless-iam-roles-per-function"]
    assert config["package"] == {"individually": True}
    arch = config["provider"]["architecture"]
    for name, function in config["functions"].items():
        assert function["package"] == {"artifact": f".build/{arch}/{name}.zip"}, name
        assert config["custom"]["packages"][name]["requirements"], name
        assert 0 < config["custom"]["packages"][name]["max_zip_mb"] <= 50, name
    # Nothing is resolved from AWS while packaging (no credentials needed).
    text = (ROOT / "serverless.yml").read_text()
    assert "${aws:" not in text and "${ssm:" not in text and "${cf:" not in text
    # SnapStart for the HTTP functions.
    assert config["functions"]["deduct"]["snapStart"] is True
    assert config["functions"]["stripeWebhook"]["snapStart"] is True
    assert "snapStart" not in config["functions"]["monthlyReset"]
    assert "snapStart" not in config["functions"]["notify"]
    cors = config["provider"]["httpApi"]["cors"]
    assert {"Authorization", "Idempotency-Key", "X-License-Key"} <= set(cors["allowedHeaders"])
    # One list for API Gateway and the function alike (tests/test_serverless_template.py reads
    # what Serverless makes of it); no default outside deploy/cors_origins.js's dev stage.
    assert config["custom"]["cors"] == "${file(./deploy/cors_origins.js)}"
    assert cors["allowedOrigins"] == "${self:custom.cors.origins}"
    assert function_env(config, "deduct")["CORS_ALLOW_ORIGINS"] == "${self:custom.cors.joined}"
    assert "corsAllowOrigins" not in config["params"]["default"]


def test_no_function_reserves_concurrency_by_default(config: dict[str, Any]) -> None:
    # Reserving needs unreserved concurrency a new account does not have; a stage may ask for it.
    reserved = {name: f["reservedConcurrency"] for name, f in config["functions"].items()
                if "reservedConcurrency" in f}
    assert reserved == {"monthlyReset": "${param:monthlyResetReservedConcurrency, null}"}
    assert "monthlyResetReservedConcurrency" not in config["params"]["default"]
