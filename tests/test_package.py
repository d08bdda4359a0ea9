"""What `./dev package` builds: one zip per function with only what it imports, native
code for the function's architecture, bytecode for Lambda's Python, and handlers that
start from their zip alone.

The zips are built here for x86_64 (this machine's architecture) so they can also be
run; CI builds and checks the arm64 ones with ./dev package.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from deploy import checks, package
from devstack import tokens
from tests.lambda_events import http_event
from tests.support import Db


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return package.build("x86_64", out=tmp_path_factory.mktemp("build"))


def names(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        return set(archive.namelist())


def top_level(path: Path) -> set[str]:
    return {name.split("/", 1)[0] for name in names(path)}


def test_each_function_ships_only_what_it_imports(built: dict[str, Path]) -> None:
    reset, deduct, webhook = (names(built[n]) for n in ("monthlyReset", "deduct", "stripeWebhook"))
    # The reset ships neither FastAPI nor stripe, nor the HTTP apps' modules.
    assert not top_level(built["monthlyReset"]) & {"fastapi", "starlette", "stripe", "mangum", "jwt"}
    assert "functions/reset.py" in reset and "handlers/monthly_reset.py" in reset
    assert not {"functions/credits_app.py", "functions/webhook_app.py", "handlers/deduct.py"} & reset
    # notify, like the reset, ships no HTTP framework and none of the other functions' modules;
    # it ships stripe, which charges auto top-ups.
    notify = names(built["notify"])
    assert not top_level(built["notify"]) & {"fastapi", "starlette", "mangum", "jwt"}
    assert "stripe" in top_level(built["notify"])
    assert {"functions/notify.py", "functions/topup.py", "handlers/notify.py", "functions/rpc.py"} <= notify
    assert "functions/topup.py" not in reset | deduct | webhook
    assert not {"functions/credits_app.py", "functions/webhook_app.py", "functions/reset.py"} & notify
    assert not {"functions/notify.py", "handlers/notify.py"} & (reset | deduct | webhook)
    # The credits API has no stripe; the webhook no token verification.
    assert "stripe" not in top_level(built["deduct"]) and "functions/stripe_events.py" not in deduct
    assert "jwt" not in top_level(built["stripeWebhook"]) and "functions/auth.py" not in webhook
    # supabase-py's PostgREST client, not the whole client with auth/storage/realtime.
    for path in built.values():
        assert "postgrest" in top_level(path)
        unused = {"supabase", "realtime", "storage3", "supabase_auth", "boto3", "botocore"}
        assert not top_level(path) & unused
        assert checks.check_zip(path, "x86_64", max_zip_mb=50) == []


def test_bytecode_is_compiled_for_lambdas_python_and_never_invalidated(built: dict[str, Path]) -> None:
    service = package.read_service()
    tag = "cpython-" + service.python_version.replace(".", "")
    with zipfile.ZipFile(built["deduct"]) as archive:
        sources = [n for n in archive.namelist()
                   if n.endswith(".py") and n.startswith(("functions/", "handlers/"))]
        assert "handlers/deduct.py" in sources
        for source in sources:
            folder, _, file = source.rpartition("/")
            compiled = f"{folder}/__pycache__/{file[:-3]}.{tag}.pyc"
            header = archive.read(compiled)[:8]
            # PEP 552 flags: 0b01 = hash-based, check_source off (the zip's timestamps do not matter).
            assert int.from_bytes(header[4:8], "little") == 1, compiled


def test_the_same_commit_builds_byte_identical_zips(built: dict[str, Path],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """A rebuild publishes no new Lambda version: same bytes, whatever the build directory."""
    again = package.build("x86_64", out=tmp_path_factory.mktemp("rebuild"), only=("monthlyReset",))
    assert set(again) == {"monthlyReset"}
    assert package.sha256(again["monthlyReset"]) == package.sha256(built["monthlyReset"])
    assert again["monthlyReset"].read_bytes() == built["monthlyReset"].read_bytes()
    manifest = json.loads((built["monthlyReset"].parent / "manifest.json").read_text())
    assert manifest["functions"]["monthlyReset"]["sha256"] == package.sha256(built["monthlyReset"])
    tag = "cpython-" + package.read_service().python_version.replace(".", "")
    with zipfile.ZipFile(built["monthlyReset"]) as archive:
        # Bytecode names its source where Lambda unpacks it, not the temporary build directory.
        own = archive.read(f"handlers/__pycache__/monthly_reset.{tag}.pyc")
        assert b"/var/task/handlers/monthly_reset.py" in own
        third_party = archive.read(f"httpx/__pycache__/_client.{tag}.pyc")
        assert b"/var/task/httpx/_client.py" in third_party
        assert b"credits-package-" not in own + third_party
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename
            assert info.external_attr >> 16 in (0o100644, 0o100755), info.filename


def test_the_checks_catch_foreign_native_code_and_oversized_zips(built: dict[str, Path]) -> None:
    problems = checks.check_zip(built["deduct"], "arm64", max_zip_mb=50)
    assert problems and all("built for x86_64, not arm64" in p for p in problems)
    assert any("_pydantic_core" in p for p in problems)
    over = checks.check_zip(built["monthlyReset"], "x86_64", max_zip_mb=0.5)
    assert over == [f"monthlyReset.zip: {built['monthlyReset'].stat().st_size / 1e6:.1f} MB is over its "
                    "budget of 0.5 MB"]
    assert checks.elf_machine(b"\x7fELF\x02\x01\x01" + b"\x00" * 11 + (183).to_bytes(2, "little")) == 183
    assert checks.elf_machine(b"#!/bin/sh\n" + b"\x00" * 10) is None


def _unpack(path: Path, into: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(into)
    return into


def test_the_credits_handler_runs_from_its_zip_alone(built: dict[str, Path], tmp_path: Path, rest_url: str,
                                                     database: Db) -> None:
    """Lambda's view: /var/task is the unpacked zip, nothing of this checkout or its virtualenv."""
    task = _unpack(built["deduct"], tmp_path / "task")
    caller, account_id = database.new_user()
    assert caller.user_id
    event = http_event("GET", "/credits/balance",
                       headers={"authorization": f"Bearer {tokens.user_token(caller.user_id)}"})
    keys = tokens.default_keys()
    env = {"SUPABASE_URL": rest_url, "SUPABASE_PUBLISHABLE_KEY": keys.publishable_key,
           "SUPABASE_SECRET_KEY": keys.secret_key, "CORS_ALLOW_ORIGINS": "https://app.example.test",
           "POWERTOOLS_METRICS_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "ERROR",
           "AWS_DEFAULT_REGION": "us-east-1"}
    script = (
        "import json, sys\n"
        "from handlers.deduct import handler\n"
        "class Context:\n"
        "    function_name = 'deduct'; function_version = '$LATEST'; memory_limit_in_mb = 512\n"
        "    invoked_function_arn = 'arn:aws:lambda:us-east-1:123456789012:function:deduct'\n"
        "    aws_request_id = 'test'; log_group_name = 'g'; log_stream_name = 's'\n"
        "    def get_remaining_time_in_millis(self): return 30000\n"
        "response = handler(json.loads(sys.stdin.read()), Context())\n"
        "print(json.dumps(response))\n"
    )
    python = package.find_python(package.read_service().python_version)
    # -I: no user site, no environment's PYTHON* variables, and not this checkout on sys.path.
    command = [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(task)!r})\n{script}"]
    done = subprocess.run(command,  # noqa: S603 - our own script
                          input=json.dumps(event), capture_output=True, text=True, env=env, cwd=task,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    response: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert response["statusCode"] == 200, response
    assert json.loads(response["body"])["account_id"] == account_id
