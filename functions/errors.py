"""HTTP errors of the function apps and the one table that maps database errors to them.

Every error response has the contract's shape ``{"error", "message", "detail"}``.
Database errors arrive through the REST layer as PostgREST bodies (``code`` is
the SQLSTATE or a ``PGRSTxxx`` code); the contract's own errors carry their name
as the message and JSON in the detail, which we pass on. Anything we do not
recognise becomes a bare 500 so no SQL text or internals reach a client.
"""

from __future__ import annotations

import json
from typing import Any

from functions.observability import logger as log

RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    """An error with its HTTP status and the contract's body."""

    status: int = 500
    error: str = "internal_error"
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: dict[str, Any] | None = None,
        status: int | None = None,
        error: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status or type(self).status
        self.error = error or type(self).error
        self.message = message or type(self).default_message
        self.detail = detail or {}
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "detail": self.detail}


class BadRequest(ApiError):
    status, error, default_message = 400, "invalid_argument", "invalid request"


class Unauthorized(ApiError):
    status, error, default_message = 401, "unauthorized", "missing or invalid credentials"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(ApiError):
    status, error, default_message = 403, "forbidden", "not allowed"


class NotFound(ApiError):
    status, error, default_message = 404, "not_found", "not found"


class Conflict(ApiError):
    status, error, default_message = 409, "conflict", "conflict"


class ServiceUnavailable(ApiError):
    status, error, default_message = 503, "service_unavailable", "the database is unavailable, retry later"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(RETRY_AFTER_SECONDS)})
        super().__init__(message, **kwargs)


class InternalError(ApiError):
    status, error, default_message = 500, "internal_error", "internal error"


# PostgREST / gateway codes that mean "the database or the REST layer cannot serve now".
_UNAVAILABLE_CODES = {"PGRST000", "PGRST001", "PGRST002", "PGRST003", "502", "503", "504", "520"}
# JWT problems reported by the REST layer (expired, invalid, bad claims).
_REST_AUTH_CODES = {"PGRST300", "PGRST301", "PGRST302", "PGRST303", "401"}
# SQLSTATE classes/codes that are transient: connection, resources, cancel, shutdown, serialization.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P")
_UNAVAILABLE_SQLSTATES = {"57014", "40001", "40P01", "55P03"}


def _detail_object(details: Any) -> dict[str, Any]:
    """The contract puts JSON text in the detail; anything else is not shown."""
    if isinstance(details, dict):
        return details
    if isinstance(details, str) and details.strip().startswith("{"):
        try:
            parsed = json.loads(details)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def from_database_error(code: str | None, message: str | None, details: Any = None) -> ApiError:
    """THE mapping from a database/REST error (code + message) to an HTTP error.

    - ``PTxxx`` (the contract's errors): status xxx, error = message, detail = the JSON detail.
    - ``22023``: 400 ``invalid_argument`` with its detail; other ``22xxx`` (bad uuid, bad number): 400.
    - ``42501`` (insufficient privilege): 403.
    - connection failures, timeouts, resource exhaustion, cancelled statements: 503 + Retry-After.
    - everything else: 500 ``internal_error`` without detail.
    """
    code = (code or "").strip()
    message = (message or "").strip()
    if len(code) == 5 and code.startswith("PT") and code[2:].isdigit():
        status = int(code[2:])
        if 400 <= status <= 599:
            name = message if message.replace("_", "").isalnum() and message else "error"
            error_cls = ServiceUnavailable if status == 503 else ApiError
            detail = _detail_object(details)
            # A rate bound (429) says when to come back: as a header too, the way clients look for it.
            retry_after = detail.get("retry_after") if status == 429 else None
            headers = {"Retry-After": str(retry_after)} if isinstance(retry_after, int) else None
            return error_cls(name.replace("_", " "), status=status, error=name, detail=detail,
                             headers=headers)
    if code == "22023":
        name = message if message.replace("_", "").isalnum() and message else "invalid_argument"
        return BadRequest("invalid argument", error=name, detail=_detail_object(details))
    if code.startswith("22"):
        # e.g. 22P02 "invalid input syntax for type uuid": the database's text names types, not secrets,
        # but it is SQL-speak, so only the class is reported.
        return BadRequest("invalid argument value", error="invalid_argument")
    if code == "42501":
        return Forbidden()
    if code in _REST_AUTH_CODES:
        return Unauthorized()
    if code == "23505":
        return Conflict()
    if (
        code in _UNAVAILABLE_CODES
        or code in _UNAVAILABLE_SQLSTATES
        or code.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES)
    ):
        return ServiceUnavailable()
    log.warning("unmapped database error", extra={"db_code": code or "none"})
    return InternalError()
