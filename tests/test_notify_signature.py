"""The signature notify puts on each event verifies with the receiver documented in
docs/events.md (docs/examples/verify_signature.py), and nothing else does: a changed
body, an old timestamp or another secret is refused. The example receiver handles
each event_id once and answers 2xx only when it did (or had)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from functions.notify import EVENT_FIELDS, SIGNATURE_HEADER, Sender, event_body, signature_header
from tests.notify_support import example

SECRET = "whsec-like-notify-signing-secret-0123456789"
EVENT = {"event_id": "0193a6a2-7c1e-7a53-9b61-3f0d7e2c9a10",
         "account_id": "3f6e2a8c-2b1d-4c55-9e0f-1a2b3c4d5e6f", "seq": 7, "type": "balance.low",
         "created_at": "2026-12-05T10:00:00.123456+00:00",
         "payload": {"threshold": 100, "rearm_at": 200, "available": 42,
                     "balance": {"available": 42, "note": "é"}},
         # Delivery state is not part of what a receiver gets.
         "attempts": 3, "status": "pending"}


def signed(event: dict[str, Any] = EVENT, *, secret: str = SECRET,
           at: int | None = None) -> tuple[bytes, str]:
    body = event_body(event)
    return body, signature_header(body, secret, int(time.time()) if at is None else at)


def test_a_body_signed_by_notify_verifies_with_the_documented_receiver() -> None:
    body, header = signed()
    assert header.startswith("t=") and ",v1=" in header
    received = example.verify(body, header, SECRET)
    assert received == {k: EVENT[k] for k in EVENT_FIELDS}
    # Compact JSON with sorted keys, UTF-8: the same event always signs the same bytes.
    assert body == json.dumps(received, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert body == event_body(dict(reversed(list(EVENT.items()))))
    # The scheme as documented: hex HMAC-SHA256 of "<t>.<body>".
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert v1 == hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("case", ["tampered body", "old timestamp", "future timestamp", "wrong secret",
                                  "changed timestamp", "no header", "no v1", "garbage"])
def test_anything_else_is_refused(case: str) -> None:
    body, header = signed()
    if case == "tampered body":
        body = body.replace(b'"available":42', b'"available":4200')
    elif case == "old timestamp":
        body, header = signed(at=int(time.time()) - 301)
    elif case == "future timestamp":
        body, header = signed(at=int(time.time()) + 3600)
    elif case == "wrong secret":
        body, header = signed(secret=SECRET + "x")
    elif case == "changed timestamp":
        t, v1 = header.split(",")
        header = f"t={int(t[2:]) + 1},{v1}"
    elif case == "no header":
        header = ""
    elif case == "no v1":
        header = header.split(",")[0]
    elif case == "garbage":
        header = "v1=abc,t=yesterday"
    with pytest.raises(example.InvalidSignature):
        example.verify(body, header, SECRET)


def test_within_five_minutes_a_signature_still_verifies() -> None:
    body, header = signed(at=int(time.time()) - 290)
    assert example.verify(body, header, SECRET)["seq"] == 7
    # Two v1 values (e.g. while a receiver rotates): either may match.
    assert example.verify(body, header + ",v1=" + "0" * 64, SECRET)["seq"] == 7


@pytest.fixture
def example_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    handled: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 example.make_handler(SECRET, example.Deduplicator(handled.append)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handled
    finally:
        server.shutdown()
        server.server_close()


def test_notify_delivers_to_the_example_receiver_which_handles_each_event_once(
        example_receiver: tuple[str, list[dict[str, Any]]]) -> None:
    url, handled = example_receiver
    sender = Sender(url, SECRET, connect_timeout=3, timeout=10, concurrency=2)
    try:
        first = sender.deliver(EVENT)
        again = sender.deliver(EVENT)  # at least once: a duplicate is answered 2xx, not handled again
        other = Sender(url, SECRET + "x", connect_timeout=3, timeout=10, concurrency=1)
        refused = other.deliver({**EVENT, "event_id": "0193a6a2-7c1e-7a53-9b61-3f0d7e2c9a11"})
        other.close()
    finally:
        sender.close()
    assert first.delivered and again.delivered
    assert not refused.delivered and refused.error == "HTTP 400"
    assert [e["event_id"] for e in handled] == [EVENT["event_id"]]

    # A request without a valid signature is refused before anything is handled.
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    body = event_body({**EVENT, "event_id": "0193a6a2-7c1e-7a53-9b61-3f0d7e2c9a12"})
    conn.request("POST", "/", body=body, headers={"Content-Type": "application/json",
                                                   SIGNATURE_HEADER: f"t={int(time.time())},v1={'0' * 64}"})
    assert conn.getresponse().status == 400
    conn.close()
    assert len(handled) == 1


def test_the_verify_shown_in_the_docs_is_the_example_module_s() -> None:
    """docs/events.md shows ``verify`` as docs/examples/verify_signature.py has it (line for line)."""
    import re

    from tests.notify_support import EXAMPLE, ROOT

    docs = (ROOT / "docs" / "events.md").read_text()
    (shown,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "def verify(" in block]
    source = [line.strip() for line in EXAMPLE.read_text().splitlines()]
    missing = [line for line in shown.splitlines() if line.strip() and line.strip() not in source]
    assert missing == []
