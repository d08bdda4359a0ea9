"""What Serverless makes of serverless.yml: the CloudFormation template `serverless
package` generates (offline) and what `serverless deploy --package` accepts.

Each run packages a copy of the service whose zips are small stand-ins, so the
template's CORS, concurrency and code hashes can be read without building the
real zips. Deploy runs have no AWS credentials: a package that passes every
check stops at "credentials not found", one that fails a check stops before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy import checks
from deploy.package import read_service

ROOT = Path(__file__).resolve().parent.parent
SERVERLESS = ROOT / "node_modules" / ".bin" / "serverless"
FUNCTIONS = ("deduct", "stripeWebhook", "monthlyReset", "notify")
NO_AWS = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off", "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass(frozen=True)
class Service:
    root: Path
    zips: dict[str, Path]


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    if not SERVERLESS.exists():
        pytest.skip("Serverless is not installed (npm ci)")
    root = tmp_path_factory.mktemp("service")
    shutil.copy(ROOT / "serverless.yml", root / "serverless.yml")
    (root / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "cors_origins.js", root / "deploy" / "cors_origins.js")
    (root / "node_modules").symlink_to(ROOT / "node_modules")
    arch = read_service().architecture
    zips = {}
    for name in FUNCTIONS:
        zips[name] = root / ".build" / arch / f"{name}.zip"
        zips[name].parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zips[name], "w") as archive:
            archive.writestr("handler.py", f"# {name}\n")
    return Service(root, zips)


def serverless(service: Service, *args: str, origins: str | None = None) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in (*AWS_KEYS, "CREDITS_CORS_ALLOW_ORIGINS")}
    env.update(NO_AWS)
    if origins is not None:
        env["CREDITS_CORS_ALLOW_ORIGINS"] = origins
    done = subprocess.run([str(SERVERLESS), *args], cwd=service.root, env=env,  # noqa: S603 - fixed arguments
                          capture_output=True, text=True, timeout=180, check=False)
    return Run(done.returncode, done.stdout + done.stderr)


def package(service: Service, stage: str, *extra: str, origins: str | None = None) -> tuple[Run, Path]:
    runs = len(list(service.root.glob("packages/*")))
    out = service.root / "packages" / f"{stage}-{runs}"
    run = serverless(service, "package", "--stage", stage, "--package", str(out), *extra, origins=origins)
    return run, out


def template(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / checks.TEMPLATE_NAME).read_text())
    return loaded


def functions(resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {key: r["Properties"] for key, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}


@pytest.fixture(scope="module")
def prod(service: Service) -> Path:
    run, out = package(service, "prod", origins="https://app.example.com, https://admin.example.com/")
    assert run.returncode == 0, run.output[-3000:]
    return out


def test_a_comma_separated_list_reaches_api_gateway_as_separate_origins(prod: Path) -> None:
    resources = template(prod)["Resources"]
    cors = resources["HttpApi"]["Properties"]["CorsConfiguration"]
    assert cors["AllowOrigins"] == ["https://app.example.com", "https://admin.example.com"]
    # The function answers non-preflight requests itself, from the same list.
    deduct = resources["DeductLambdaFunction"]["Properties"]
    joined = "https://app.example.com,https://admin.example.com"
    assert deduct["Environment"]["Variables"]["CORS_ALLOW_ORIGINS"] == joined
    assert checks.check_cors(template(prod), "prod") == []


def test_no_reserved_concurrency_unless_a_stage_asks_for_it(service: Service, prod: Path) -> None:
    for properties in functions(template(prod)["Resources"]).values():
        assert "ReservedConcurrentExecutions" not in properties
    run, out = package(service, "dev", "--param=monthlyResetReservedConcurrency=1")
    assert run.returncode == 0, run.output[-3000:]
    resources = template(out)["Resources"]
    assert resources["MonthlyResetLambdaFunction"]["Properties"]["ReservedConcurrentExecutions"] == 1
    others = {k: p for k, p in functions(resources).items() if k != "MonthlyResetLambdaFunction"}
    assert others and all("ReservedConcurrentExecutions" not in p for p in others.values())
    # dev alone defaults to the local app.
    assert resources["HttpApi"]["Properties"]["CorsConfiguration"]["AllowOrigins"] == ["http://localhost:3000"]


def test_notify_gets_its_receiver_from_the_stage_and_a_role_of_its_own(service: Service, prod: Path) -> None:
    resources = template(prod)["Resources"]
    variables = resources["NotifyLambdaFunction"]["Properties"]["Environment"]["Variables"]
    # A stage that names no receiver sends nothing (events stay readable) and reads no signing secret;
    # one that names no Stripe key charges no auto top-up (due ones fail, not_configured).
    assert variables["NOTIFY_WEBHOOK_URL"] == "" and variables["NOTIFY_SIGNING_SECRET_PARAM"] == ""
    assert variables["STRIPE_API_KEY_PARAM"] == "" and "STRIPE_API_BASE" not in variables
    rule = next(r["Properties"] for key, r in resources.items()
                if key.startswith("NotifyEventsRuleSchedule") and r["Type"] == "AWS::Events::Rule")
    assert rule["ScheduleExpression"] == "rate(1 minute)" and rule["State"] == "ENABLED"

    run, out = package(service, "prod", "--param=notifyWebhookUrl=https://hooks.example.com/credits",
                       "--param=notifySigningSecretParam=/credits/prod/notify-signing-secret",
                       "--param=stripeApiKeyParam=/credits/prod/stripe-api-key",
                       origins="https://app.example.com")
    assert run.returncode == 0, run.output[-3000:]
    resources = template(out)["Resources"]
    variables = resources["NotifyLambdaFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["NOTIFY_WEBHOOK_URL"] == "https://hooks.example.com/credits"
    assert variables["NOTIFY_SIGNING_SECRET_PARAM"] == "/credits/prod/notify-signing-secret"
    assert variables["STRIPE_API_KEY_PARAM"] == "/credits/prod/stripe-api-key"
    # Its own role: its own log group, the parameters it reads, decryption through SSM; nothing else.
    role = resources["NotifyIamRoleLambdaExecution"]["Properties"]
    assert resources["NotifyLambdaFunction"]["Properties"]["Role"] == {
        "Fn::GetAtt": ["NotifyIamRoleLambdaExecution", "Arn"]}
    statements = [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]
    granted = {action: [r["Fn::Sub"] if isinstance(r, dict) else r
                        for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])]
               for s in statements for action in s["Action"]}
    logs = ("arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}"
            ":log-group:/aws/lambda/credits-prod-notify")
    assert {a for a in granted if a.startswith("logs:")} <= {"logs:CreateLogGroup", "logs:CreateLogStream",
                                                              "logs:PutLogEvents"}
    assert all(r.startswith(logs + ":") for a, rs in granted.items() if a.startswith("logs:") for r in rs)
    ssm = "arn:aws:ssm:${AWS::Region}:${AWS::AccountId}:parameter/credits/prod/"
    assert sorted(granted["ssm:GetParameter"]) == sorted(
        ssm + name
        for name in ("supabase-url", "supabase-secret-key", "notify-signing-secret", "stripe-api-key"))
    assert set(granted) - {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"} == {
        "ssm:GetParameter", "ssm:GetParameters", "kms:Decrypt"}
    invoke = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig"
                  and r["Properties"]["FunctionName"] == {"Ref": "NotifyLambdaFunction"})
    assert invoke["MaximumRetryAttempts"] == 0


def test_each_version_pins_the_sha256_of_the_zip_that_was_checked(service: Service, prod: Path) -> None:
    resources = template(prod)["Resources"]
    assert checks.check_code_hashes(template(prod), service.zips) == []
    for name, path in service.zips.items():
        digest = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
        pinned = [r["Properties"]["CodeSha256"] for key, r in resources.items()
                  if r["Type"] == "AWS::Lambda::Version" and key.startswith(name[0].upper() + name[1:])]
        assert pinned == [digest], name
    other = {**service.zips, "deduct": service.zips["monthlyReset"]}
    assert checks.check_code_hashes(template(prod), other) == [
        "the template does not publish deduct with the code of monthlyReset.zip"]


@pytest.mark.parametrize("origins", [None, "", "http://localhost:3000", "https://localhost:3000",
                                     "https://app.example.com,http://127.0.0.1:3000", "http://app.example.com",
                                     "https://app.example.com/path"])
def test_a_stage_but_dev_is_not_packaged_without_https_origins(service: Service, origins: str | None) -> None:
    run, out = package(service, "prod", origins=origins)
    assert run.returncode != 0
    assert "CORS origins for stage prod" in run.output and "CREDITS_CORS_ALLOW_ORIGINS" in run.output
    assert not out.exists()


def test_deploying_a_package_takes_its_origins_not_the_shells(service: Service, prod: Path) -> None:
    # No CREDITS_CORS_ALLOW_ORIGINS at deploy time: the package's checked template is what goes up,
    # so the only thing missing is AWS credentials.
    run = serverless(service, "deploy", "--stage", "prod", "--package", str(prod))
    assert "credentials not found" in run.output and "CORS origins" not in run.output, run.output[-2000:]
    assert run.returncode != 0
    # A package is deployed to its own stage only.
    run = serverless(service, "deploy", "--stage", "staging", "--package", str(prod),
                     origins="https://app.example.com")
    assert run.returncode != 0 and "was made for stage prod, not staging" in run.output


def test_a_package_with_local_origins_is_not_deployed(service: Service, prod: Path) -> None:
    tampered = prod.with_name("tampered")
    shutil.copytree(prod, tampered)
    state_path = tampered / "serverless-state.json"
    state = json.loads(state_path.read_text())
    api = state["service"]["provider"]["compiledCloudFormationTemplate"]["Resources"]["HttpApi"]
    api["Properties"]["CorsConfiguration"]["AllowOrigins"] = ["http://localhost:3000"]
    state_path.write_text(json.dumps(state))
    run = serverless(service, "deploy", "--stage", "prod", "--package", str(tampered),
                     origins="https://app.example.com")
    assert run.returncode != 0
    assert "http://localhost:3000 is not https" in run.output and "credentials not found" not in run.output


def test_the_checks_compare_the_template_with_the_one_deploy_uploads(prod: Path, tmp_path: Path) -> None:
    assert checks.check_state(template(prod), prod / checks.STATE_NAME) == []
    edited = template(prod)
    edited["Resources"]["HttpApi"]["Properties"]["CorsConfiguration"]["AllowOrigins"] = ["https://a,https://b"]
    assert checks.check_state(edited, prod / checks.STATE_NAME) == [
        "the template in serverless-state.json is not the one checked"]
    assert checks.check_cors(edited, "prod") == ["CORS origin 'https://a,https://b' is not one origin"]
    assert checks.check_state(template(prod), tmp_path / checks.STATE_NAME) == [
        "serverless-state.json is missing next to the template"]
