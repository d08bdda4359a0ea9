"""Test helpers for notify: the documented example receiver's ``verify``, and a webhook
receiver (a real HTTP server on a free port) that checks every signature and records
what it received, and answers each account's events as a test tells it to."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "verify_signature.py"


def load_example() -> ModuleType:
    """docs/examples/verify_signature.py, as a receiver would copy it."""
    spec = importlib.util.spec_from_file_location("verify_signature_example", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


@dataclass(frozen=True)
class Receipt:
    event: dict[str, Any]
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float


@dataclass
class Receiver:
    """What the test's webhook got. ``answers[account_id]`` is ``"ok"`` (204, the default),
    an HTTP status to answer instead, or ``"hang"`` (answer 204 after ``hang_seconds``)."""

    secret: str
    url: str = ""
    answers: dict[str, Any] = field(default_factory=dict)
    hang_seconds: float = 3.0
    delay_seconds: float = 0.0
    receipts: list[Receipt] = field(default_factory=list)
    refused: list[bytes] = field(default_factory=list)  # bodies whose signature did not verify
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, account_id: str) -> list[Receipt]:
        with self.lock:
            return [r for r in self.receipts if r.event["account_id"] == account_id]

    def seqs(self, account_id: str, *, delivered_only: bool = False) -> list[int]:
        return [r.event["seq"] for r in self.of(account_id) if not delivered_only or 200 <= r.status < 300]

    def count(self, event_id: str) -> int:
        with self.lock:
            return sum(1 for r in self.receipts if r.event["event_id"] == event_id)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                event = example.verify(body, self.headers.get(example.SIGNATURE_HEADER), receiver.secret)
            except example.InvalidSignature:
                with receiver.lock:
                    receiver.refused.append(body)
                self._answer(400)
                return
            answer = receiver.answers.get(event["account_id"], "ok")
            if receiver.delay_seconds:
                time.sleep(receiver.delay_seconds)
            if answer == "hang":
                time.sleep(receiver.hang_seconds)
            status = answer if isinstance(answer, int) else 204
            with receiver.lock:
                receiver.receipts.append(Receipt(event, dict(self.headers.items()), body, status,
                                                 time.monotonic()))
            self._answer(status)

        def _answer(self, status: int) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the client gave up (a timeout under test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def receiving(secret: str, path: str = "/hooks/credits") -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 (a free port) until the block ends."""
    receiver = Receiver(secret)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def parse(body: bytes) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(body)
    return loaded
