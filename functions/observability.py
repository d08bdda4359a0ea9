"""Structured logs (Powertools Logger) and EMF metrics (Powertools Metrics) shared by the functions.

One logger and one metrics object per process: Powertools keeps the metric set
per namespace anyway, and the handlers flush it after each invocation
(``@metrics.log_metrics``). Log lines carry names, ids, statuses and timings,
never a token, key, SQL text or stack trace.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from fastapi import FastAPI, Request, Response

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "credits")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Credits")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)

__all__ = ["NAMESPACE", "SERVICE", "MetricUnit", "count", "install_request_logging", "logger", "metrics"]


def count(name: str, value: float = 1) -> None:
    """Add to a count metric; a metrics failure must never fail a request."""
    try:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
    except Exception:  # noqa: S110 - metrics are best effort
        pass


def _request_id(request: Request) -> str:
    # API Gateway's id when Mangum passes the event along, else the caller's, else a new one.
    event = request.scope.get("aws.event") or {}
    gateway_id = (event.get("requestContext") or {}).get("requestId") if isinstance(event, dict) else None
    supplied = request.headers.get("x-request-id", "")
    if gateway_id:
        return str(gateway_id)
    if supplied and len(supplied) <= 128 and supplied.replace("-", "").isalnum():
        return supplied
    return str(uuid.uuid4())


def install_request_logging(app: FastAPI, app_name: str) -> None:
    """One log line per request (method, route, status, duration, request id) and
    a catch-all that turns an unexpected exception into a bare 500 without a trace."""

    @app.middleware("http")
    async def _log_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        request_id = _request_id(request)
        request.state.request_id = request_id
        from functions.errors import InternalError  # errors.py logs through this module

        try:
            response = await call_next(request)
        except Exception as exc:
            logger.error("unhandled error",
                         extra={"error_type": type(exc).__name__, "request_id": request_id})
            response = InternalError().response()
        route = request.scope.get("route")
        logger.info(
            "request",
            extra={
                "app": app_name,
                "request_id": request_id,
                "method": request.method,
                "route": getattr(route, "path", "unmatched"),
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        response.headers["X-Request-Id"] = request_id
        if response.status_code >= 500:
            count(f"{app_name}ServerErrors")
        return response
