"""FastAPI wiring shared by the function apps: error rendering and request logs.

Kept apart from ``functions.errors`` and ``functions.observability`` so that a
function without an HTTP app (the monthly reset) never imports FastAPI.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from functions.errors import ApiError, BadRequest, InternalError
from functions.observability import count, logger


def error_response(error: ApiError) -> JSONResponse:
    """The contract's error body with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def body_too_large(limit: int) -> JSONResponse:
    """413 in the contract's shape (``functions.body_limit`` answers it before reading the body)."""
    return error_response(ApiError(f"the request body is larger than {limit} bytes", status=413,
                                   error="payload_too_large", detail={"limit_bytes": limit}))


def install_body_limit(app: FastAPI, max_bytes: int) -> None:
    """Refuse bodies over ``max_bytes`` (413) before reading them. Call it before
    ``install_request_logging``, so the refusals are logged like any answer."""
    from functions import body_limit

    body_limit.install_body_limit(app, max_bytes, body_too_large)


_STATUS_NAMES = {
    400: "invalid_argument", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
    415: "unsupported_media_type", 429: "too_many_requests",
}


def _validation_detail(exc: RequestValidationError) -> dict[str, Any]:
    # Only where and what; never the submitted values (they may hold secrets).
    return {
        "errors": [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")),
             "type": str(err.get("type", ""))}
            for err in exc.errors()
        ]
    }


def install_error_handlers(app: FastAPI) -> None:
    """Render every error in the contract's shape; unknown failures as a bare 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(BadRequest("the body is not valid JSON", error="invalid_json"))
        return error_response(ApiError("the request does not match the schema", status=422,
                                       error="invalid_request", detail=_validation_detail(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        name = _STATUS_NAMES.get(status, "internal_error" if status >= 500 else "error")
        message = exc.detail if isinstance(exc.detail, str) and status < 500 else name.replace("_", " ")
        return error_response(ApiError(message.lower(), status=status, error=name,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The type only: a stack trace or the exception text could carry SQL or secrets.
        logger.error("unhandled error", extra={"error_type": type(exc).__name__})
        return error_response(InternalError())


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
        try:
            response = await call_next(request)
        except Exception as exc:
            logger.error("unhandled error",
                         extra={"error_type": type(exc).__name__, "request_id": request_id})
            response = error_response(InternalError())
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
