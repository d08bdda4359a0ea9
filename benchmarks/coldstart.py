"""Benchmark 5: cold start of each Lambda handler from what ships, and the warm
per-request cost of the deduct handler through the local stack.

Cold start: each function's zip, built by ``deploy.package`` exactly as for
Lambda but for this machine's architecture (x86_64), is unpacked, and a fresh
Lambda-version interpreter (python3.12, isolated: nothing of this checkout or
its virtualenv on the path) imports the handler, which reads its settings at
import: the init phase a cold start pays once the runtime is up. Median of
``import_runs`` runs. The dev virtualenv's import is shown for reference only.

The warm cost runs the real handler (Mangum -> FastAPI -> supabase-py's
PostgREST client over HTTP -> the local REST endpoint -> PostgreSQL) in this
process and is reported next to the same RPC made directly with supabase-py,
and next to the bare SQL call.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.config import Config
from benchmarks.results import Result, Row, ms
from benchmarks.server import BenchDatabase
from benchmarks.stats import median, percentile
from deploy import package
from devstack import db, tokens

IMPORT_TARGET_MS = 400.0
ROOT = Path(__file__).resolve().parent.parent


def function_env(supabase_url: str) -> dict[str, str]:
    """The settings a deployed function gets (values, not SSM names), pointing at the local stack."""
    keys = tokens.default_keys()
    return {
        "SUPABASE_URL": supabase_url,
        "SUPABASE_PUBLISHABLE_KEY": keys.publishable_key,
        "SUPABASE_SECRET_KEY": keys.secret_key,
        "STRIPE_WEBHOOK_SECRET": keys.webhook_secret,
        "CORS_ALLOW_ORIGINS": "http://localhost:3000",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }


_PROBE = ("import time, importlib, sys; sys.path.insert(0, {task!r}); t = time.perf_counter(); "
          "importlib.import_module({mod!r}); print(time.perf_counter() - t)")


def import_ms(python: str, module: str, env: dict[str, str], task: Path | None = None) -> float:
    """One cold import of ``module``: from the unpacked zip ``task`` (isolated interpreter), or from
    this checkout with the dev virtualenv when ``task`` is None."""
    if task is None:
        command = [python, "-c", _PROBE.format(task=str(ROOT), mod=module)]
        environment = {**os.environ, **env}
    else:
        command = [python, "-I", "-c", _PROBE.format(task=str(task), mod=module)]
        environment = {"PATH": os.environ.get("PATH", ""), **env}
    out = subprocess.run(command, cwd=task or ROOT, env=environment, capture_output=True, text=True,
                         check=False, timeout=120)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"importing {module} failed: {last}")
    return float(out.stdout.strip().splitlines()[-1]) * 1000


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Context:
    """The attributes of Lambda's context object that handlers read."""

    function_name = "credits-deduct"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:credits-deduct"
    memory_limit_in_mb = 512
    log_group_name = "/aws/lambda/credits-deduct"
    log_stream_name = "local"

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def deduct_event(token: str, key: str) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event for POST /credits/deduct."""
    body = json.dumps({"amount": 1})
    now = time.time()
    headers = {"authorization": f"Bearer {token}", "idempotency-key": key, "content-type": "application/json",
               "host": "api.example.test", "content-length": str(len(body))}
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": "/credits/deduct", "rawQueryString": "",
        "headers": headers, "body": body, "isBase64Encoded": False,
        "requestContext": {
            "accountId": "123456789012", "apiId": "local", "domainName": "api.example.test",
            "domainPrefix": "api", "requestId": uuid.uuid4().hex, "routeKey": "$default", "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)), "timeEpoch": int(now * 1000),
            "http": {"method": "POST", "path": "/credits/deduct", "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.10", "userAgent": "benchmark"},
        },
    }


def _timed(n: int, call: Callable[[int], None], warmup: int = 3) -> list[float]:
    for i in range(warmup):
        call(-1 - i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _new_funded_user(bench: BenchDatabase) -> tuple[str, str]:
    user_id = str(uuid.uuid4())
    with bench.connect() as conn:
        conn.execute("insert into auth.users (id, email) values (%s, %s)",
                     (user_id, f"{user_id}@example.test"))
        account = conn.execute("select id from public.credit_accounts where user_id = %s",
                               (user_id,)).fetchone()
        assert account is not None
        db.call_function(conn, "add_purchased_credits", {"p_account_id": str(account[0]),
                                                         "p_amount": 1_000_000,
                                                         "p_idempotency_key": f"bench-{uuid.uuid4()}"})
    return user_id, str(account[0])


def warm_requests(bench: BenchDatabase, cfg: Config) -> dict[str, list[float]]:
    from devstack import rest, serve

    # The handler flushes an empty metric set per call; Powertools warns each time.
    warnings.filterwarnings("ignore", message="No application metrics")
    user_id, account_id = _new_funded_user(bench)
    app = rest.create_app(bench.dsn)
    with serve.serve_in_thread(app) as url, patched_env(function_env(url)):
        token = tokens.user_token(user_id, issuer=tokens.issuer_for(url))
        module = importlib.import_module("handlers.deduct")
        run = uuid.uuid4().hex[:8]
        sink = io.StringIO()

        def via_handler(i: int) -> None:
            with contextlib.redirect_stdout(sink):
                response = module.handler(deduct_event(token, f"h-{run}-{i}"), _Context())
            if response.get("statusCode") != 200:
                raise RuntimeError(f"deduct handler answered {response.get('statusCode')}")

        from supabase import create_client

        client = create_client(url, tokens.anon_key())
        client.postgrest.auth(token)

        def via_rpc(i: int) -> None:
            client.rpc("deduct_credits", {"p_account_id": account_id, "p_idempotency_key": f"r-{run}-{i}",
                                          "p_amount": 1}).execute()

        claims = {"sub": user_id, "role": "authenticated", "aud": "authenticated"}
        with psycopg.connect(bench.dsn, autocommit=True) as conn:

            def via_sql(i: int) -> None:
                db.call_function(conn, "deduct_credits", {"p_account_id": account_id,
                                                          "p_idempotency_key": f"s-{run}-{i}", "p_amount": 1},
                                 role="authenticated", claims=claims)

            results: dict[str, list[float]] = {"handler": [], "rpc": [], "sql": []}
            # Interleaved in small blocks, like the pgbench comparisons.
            block = max(1, cfg.warm_requests // 5)
            for _ in range(max(1, cfg.warm_requests // block)):
                results["handler"] += _timed(block, lambda i: via_handler(i + len(results["handler"])))
                results["rpc"] += _timed(block, lambda i: via_rpc(i + len(results["rpc"])))
                results["sql"] += _timed(block, lambda i: via_sql(i + len(results["sql"])))
    return results


def cold_start(bench: BenchDatabase, cfg: Config) -> Result:
    env = function_env("http://127.0.0.1:9")
    service = package.read_service()
    python = package.find_python(service.python_version)
    rows: list[Row] = []
    imports: dict[str, float] = {}
    reference: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="credits-coldstart-") as tmp:
        built = package.build("x86_64", out=Path(tmp) / "build")
        for function in service.functions:
            task = Path(tmp) / "task" / function.name
            with zipfile.ZipFile(built[function.name]) as archive:
                archive.extractall(task)
            module = function.handler_module
            runs = range(cfg.import_runs)
            imports[module] = median([import_ms(python, module, env, task) for _ in runs])
            reference[module] = median([import_ms(sys.executable, module, env) for _ in runs])
            size = built[function.name].stat().st_size / 1e6
            rows.append(Row(f"{function.name}: import + settings from its zip ({size:.1f} MB, "
                            f"python{service.python_version}, median of {cfg.import_runs})",
                            ms(imports[module]), f"<= {IMPORT_TARGET_MS:.0f} ms",
                            None if cfg.smoke else imports[module] <= IMPORT_TARGET_MS, timing=True))
            rows.append(Row(f"{function.name}: the same from the dev virtualenv (reference)",
                            ms(reference[module]), timing=True))
    warm = warm_requests(bench, cfg)
    labels = {"handler": "deduct handler end to end", "rpc": "supabase-py rpc deduct_credits",
              "sql": "SQL call (one transaction)"}
    for key, title in labels.items():
        values = warm[key]
        rows.append(Row(f"{title} p50 / p99 ({len(values)} calls)",
                        f"{ms(median(values))} / {ms(percentile(values, 99))}"))
    overhead = median(warm["handler"]) - median(warm["rpc"])
    rows.append(Row("handler cost over the direct RPC (p50)", ms(overhead)))
    slowest = max(imports.items(), key=lambda kv: kv[1]) if imports else ("none", float("nan"))
    summary = (f"5 cold start: slowest handler from its package {slowest[0]} {ms(slowest[1])} (target <= "
               f"{IMPORT_TARGET_MS:.0f} ms); warm deduct handler p50 {ms(median(warm['handler']))} vs direct "
               f"RPC {ms(median(warm['rpc']))} vs SQL {ms(median(warm['sql']))}")
    return Result("5 cold start", summary, rows, {
        "imports_ms": imports, "dev_virtualenv_imports_ms": reference,
        "warm_ms": {k: {"p50": median(v), "p99": percentile(v, 99), "n": len(v)} for k, v in warm.items()}})
