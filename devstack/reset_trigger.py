"""Locally, EventBridge's monthly schedule is an HTTP call.

``POST /monthly-reset`` invokes the monthly-reset Lambda handler exactly as the
schedule does (a "Scheduled Event" plus a Lambda context with a time limit) and
answers with what the handler returned. An optional JSON body
``{"period_start": "YYYY-MM-01"}`` is passed in the event's ``detail`` for
re-running a past month; a period the handler refuses (malformed, or more than
one month ahead) is answered 400 with its error body.

Only the project's secret key may trigger it (``apikey`` header, or
``Authorization: Bearer``): in AWS only the scheduler can invoke the function,
and a local endpoint open to any page in the browser should not renew months.
"""

from __future__ import annotations

import hmac
import importlib.util
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from functions.http import install_body_limit

HANDLER = Path(__file__).resolve().parent.parent / "handlers" / "monthly_reset.py"
# A scheduled Lambda gets up to 15 minutes; the handler stops itself before that.
TIME_LIMIT_MS = 15 * 60 * 1000
# The body is at most {"period_start": "YYYY-MM-01"}; larger ones are refused unread.
MAX_BODY_BYTES = 4096


@dataclass
class LambdaContext:
    """The attributes of AWS's context object that handlers and Powertools read."""

    function_name: str = "monthly-reset-local"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:000000000000:function:monthly-reset-local"
    log_group_name: str = "/aws/lambda/monthly-reset-local"
    log_stream_name: str = "local"
    time_limit_ms: int = TIME_LIMIT_MS
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self.time_limit_ms - (time.monotonic() - self.started) * 1000))


def scheduled_event(detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The event EventBridge sends for a schedule rule."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/monthly-reset-local"],
        "detail": detail or {},
    }


def cold_start(env: Mapping[str, str], path: Path = HANDLER) -> Callable[[dict[str, Any], Any], Any]:
    """Load the handler module as a Lambda cold start would, with ``env`` as its
    environment: a private copy of the module (its settings are read at import),
    leaving ``sys.modules`` and this process's environment as they were."""
    if not path.exists():
        raise ImportError("the monthly reset handler is not there", name=path.stem)
    spec = importlib.util.spec_from_file_location(f"_local_{path.stem}_{uuid.uuid4().hex}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.copy()
    os.environ.update(env)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module.handler


def create_app(env: Mapping[str, str]) -> FastAPI:
    """Cold-starts the handler now, so a missing setting fails here as in Lambda."""
    handler = cold_start(env)
    candidates = (env.get("SUPABASE_SECRET_KEY"), env.get("SUPABASE_SERVICE_ROLE_KEY"))
    allowed = [k.encode() for k in candidates if k]

    def authorized(request: Request) -> bool:
        presented = request.headers.get("apikey") or ""
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if not presented and scheme.lower() == "bearer":
            presented = token.strip()
        # Every candidate is compared, in constant time, so timing tells nothing.
        return bool(presented) and sum(hmac.compare_digest(presented.encode(), k) for k in allowed) > 0

    app = FastAPI(title="monthly reset trigger", docs_url=None, redoc_url=None, openapi_url=None)
    install_body_limit(app, MAX_BODY_BYTES)

    @app.post("/monthly-reset")
    async def trigger(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized", "message": "send the secret key as apikey",
                                 "detail": {}}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        try:
            body = await request.json() if raw.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "invalid_argument", "message": "the body must be a JSON object",
                                 "detail": {}}, status_code=400)
        result = await run_in_threadpool(handler, scheduled_event(body), LambdaContext())
        # The handler answers a refused period (malformed, or refused by the database) with the
        # contract's error body instead of failing: the caller's input, so 400.
        return JSONResponse(result, status_code=400 if "error" in result else 200)

    return app
