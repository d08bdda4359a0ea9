"""Request bodies are refused over a limit before they are read, not after.

An ASGI layer: a ``Content-Length`` over the limit is answered 413 at once,
without reading a byte of the body; a body without one (chunked) is counted
as the app reads it, and reading stops at the first chunk past the limit.
The server stops reading the socket when the app stops asking (uvicorn's flow
control), so memory stays bounded by the limit whatever the client sends.

Each app renders the 413 in its own error shape (``render``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Render = Callable[[int], Response]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body read so far is over the limit.

    An ``HTTPException`` so that FastAPI passes it through its body parsing
    (other errors there become a 400) to the app's handler for it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")
        self.limit = limit


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            # The server has already refused a malformed length; be safe anyway.
            return int(text) if text.isdigit() else None
    return None


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with ``render(max_bytes)`` (a 413), reading at most that much."""

    def __init__(self, app: Any, *, max_bytes: int, render: Render) -> None:
        self.app, self.max_bytes, self.render = app, max_bytes, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self.render(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except BodyTooLarge:
            # Only when the app let it through (an app without a handler for it).
            if not started:
                await self.render(self.max_bytes)(scope, receive, send)


def install_body_limit(app: Any, max_bytes: int, render: Render) -> None:
    """Add the limit to a Starlette/FastAPI ``app``: the layer, and the handler that renders
    ``BodyTooLarge`` raised while the app reads (so inner middleware sees a normal 413)."""

    async def handle(_request: Request, exc: Exception) -> Response:
        limit = exc.limit if isinstance(exc, BodyTooLarge) else max_bytes
        return render(limit)

    app.add_exception_handler(BodyTooLarge, handle)
    app.add_middleware(BodyLimit, max_bytes=max_bytes, render=render)
