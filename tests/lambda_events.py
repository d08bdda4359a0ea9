"""API Gateway HTTP API (payload v2.0) events and Lambda contexts for handler tests.

The events have the shape API Gateway sends, so the real Mangum adapter in each
handler does the decoding (headers, query string, cookies, base64 bodies).
The context is a plain object with the attributes Lambda's context has; it
stands in for the runtime, not for anything under test.
"""

from __future__ import annotations

import base64
import importlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest

API_ID = "a1b2c3d4e5"
REGION = "us-east-1"


def http_event(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, Any] | None = None,
    body: Any = None,
    raw_body: bytes | str | None = None,
    base64_body: bool = False,
    route_key: str | None = None,
    path_parameters: dict[str, str] | None = None,
    source_ip: str = "203.0.113.10",
) -> dict[str, Any]:
    """One HTTP API v2 event.

    ``body`` is JSON-encoded (with a JSON content type); ``raw_body`` is sent
    exactly as given (bytes/str), e.g. a signed Stripe payload. ``base64_body``
    makes API Gateway's base64 encoding of the body explicit.
    """
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    content: bytes | None = None
    if raw_body is not None:
        content = raw_body.encode() if isinstance(raw_body, str) else raw_body
    elif body is not None:
        content = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    hdrs.setdefault("host", f"{API_ID}.execute-api.{REGION}.amazonaws.com")
    hdrs.setdefault("user-agent", "pytest")
    if content is not None:
        hdrs.setdefault("content-length", str(len(content)))
    query_items = {k: str(v) for k, v in (query or {}).items() if v is not None}
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key or "$default",
        "rawPath": path,
        "rawQueryString": urlencode(query_items),
        "headers": hdrs,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": API_ID,
            "domainName": hdrs["host"],
            "domainPrefix": API_ID,
            "http": {
                "method": method.upper(),
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": hdrs["user-agent"],
            },
            "requestId": f"req-{uuid.uuid4().hex[:16]}",
            "routeKey": route_key or "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if query_items:
        event["queryStringParameters"] = query_items
    if path_parameters:
        event["pathParameters"] = path_parameters
    if content is not None:
        if base64_body:
            event["body"] = base64.b64encode(content).decode()
            event["isBase64Encoded"] = True
        else:
            event["body"] = content.decode()
    return event


def scheduled_event(time_iso: str | None = None, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """An EventBridge scheduled event ("Scheduled Event", source aws.events)."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": time_iso or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:123456789012:rule/credits-test-monthly-reset"],
        "detail": detail or {},
    }


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object; remaining time counts down from ``timeout_ms``
    (or is fixed by ``remaining_ms`` / a callable for tests of the time limit)."""

    function_name: str = "credits-test-function"
    timeout_ms: int = 30_000
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    remaining_ms: Any = None
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:123456789012:function:{self.function_name}"

    @property
    def function_version(self) -> str:
        return "$LATEST"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return "2026/01/01/[$LATEST]0123456789abcdef"

    def get_remaining_time_in_millis(self) -> int:
        if callable(self.remaining_ms):
            return int(self.remaining_ms())
        if self.remaining_ms is not None:
            return int(self.remaining_ms)
        elapsed = (time.monotonic() - self._started) * 1000
        return max(0, int(self.timeout_ms - elapsed))


def response_json(response: dict[str, Any]) -> Any:
    """The JSON body of a Mangum response (decoding base64 when Mangum used it)."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return json.loads(body) if body else None


def response_header(response: dict[str, Any], name: str) -> str | None:
    """A response header, case-insensitively (HTTP API v2 responses use ``headers``)."""
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name.lower():
            return value
    return None


# Every setting a handler reads at import; a cold start sees only the ones a test gives it.
SETTING_NAMES = ("SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
                 "SUPABASE_JWKS_URL", "STRIPE_WEBHOOK_SECRET", "CORS_ALLOW_ORIGINS")


@contextmanager
def cold_start(module: str, env: Mapping[str, str]) -> Iterator[Callable[..., dict[str, Any]]]:
    """Import ``handlers.<name>`` afresh, as a Lambda cold start with exactly the
    settings in ``env`` (settings are read at import), and yield its ``handler``."""
    with pytest.MonkeyPatch.context() as mp:
        for name in SETTING_NAMES:
            mp.delenv(name, raising=False)
            mp.delenv(f"{name}_PARAM", raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        sys.modules.pop(module, None)
        try:
            yield importlib.import_module(module).handler
        finally:
            sys.modules.pop(module, None)
