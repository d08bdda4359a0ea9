"""A receiver of credit events: verify the signature, then handle each event once.

Run it with the same secret as notify's NOTIFY_SIGNING_SECRET:

    NOTIFY_SIGNING_SECRET=... python docs/examples/verify_signature.py 8080

and point NOTIFY_WEBHOOK_URL at http://<this host>:8080/. It answers 2xx only
once an event is handled (or was handled before), so notify retries the rest.
Standard library only; ``verify`` is what any framework's endpoint needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SIGNATURE_HEADER = "Credits-Signature"
TOLERANCE_SECONDS = 300  # refuse signatures older than 5 minutes (a replayed request)
MAX_BODY_BYTES = 1_000_000


class InvalidSignature(ValueError):
    """The request was not signed by notify with this secret, or is too old."""


def verify(body: bytes, header: str | None, secret: str, *, tolerance: int = TOLERANCE_SECONDS,
           now: float | None = None) -> dict[str, Any]:
    """The event in ``body`` if ``header`` (``t=<unix time>,v1=<hex>``) signs it with ``secret``
    and is at most ``tolerance`` seconds old; else ``InvalidSignature``.

    The signature is the hex HMAC-SHA256 of ``"<t>.<body>"``, over the raw bytes
    received: verify before parsing, and never re-serialize the JSON first.
    """
    if not header:
        raise InvalidSignature("no Credits-Signature header")
    timestamp, signatures = None, []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not timestamp.isdigit() or not signatures:
        raise InvalidSignature("malformed Credits-Signature header")
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    # Constant-time comparison; several v1 values may be present (accept any).
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise InvalidSignature("signature does not match")
    age = (time.time() if now is None else now) - int(timestamp)
    if age > tolerance:
        raise InvalidSignature("signature is too old")
    if age < -tolerance:
        raise InvalidSignature("signature is from the future (check the clock)")
    event: dict[str, Any] = json.loads(body)
    return event


class Deduplicator:
    """Handles each ``event_id`` once: delivery is at least once, so duplicates do arrive.

    In memory for the example; a real receiver records the event_id in its own
    database (a unique key) in the same transaction as what the event changes.
    """

    def __init__(self, handle: Callable[[dict[str, Any]], None]) -> None:
        self._handle = handle
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> bool:
        """Handle the event unless it was handled before; True if handled now."""
        with self._lock:
            if event["event_id"] in self._seen:
                return False
            self._handle(event)  # raises: not recorded, so the retry handles it
            self._seen.add(event["event_id"])
            return True


def make_handler(secret: str, on_event: Callable[[dict[str, Any]], object]) -> type[BaseHTTPRequestHandler]:
    """A request handler that verifies each POST and passes its event to ``on_event``."""

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413)
                return
            body = self.rfile.read(length)
            try:
                event = verify(body, self.headers.get(SIGNATURE_HEADER), secret)
            except (InvalidSignature, ValueError):
                self._answer(400)  # not from notify (or tampered with): never handled
                return
            try:
                on_event(event)
            except Exception:
                self._answer(500)  # notify retries it later
                return
            self._answer(204)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Receiver


def handle(event: dict[str, Any]) -> None:
    """What the application does with an event; unknown types are ignored."""
    if event["type"] in ("balance.low", "balance.depleted"):
        print(f"account {event['account_id']}: {event['type']}, {event['payload']['available']} available")
    elif event["type"] == "balance.recovered":
        print(f"account {event['account_id']}: recovered")


def main() -> None:
    secret = os.environ["NOTIFY_SIGNING_SECRET"]
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(secret, Deduplicator(handle)))
    print(f"receiving credit events on http://127.0.0.1:{port}/")
    server.serve_forever()


if __name__ == "__main__":
    main()
