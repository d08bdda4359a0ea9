"""Bodies over a limit are refused before they are read: 150 MB sent to the local REST
endpoint and to each function served locally (with a Content-Length, and chunked) is
answered 413 while the serving process grows by far less than the body.

The servers run in threads of this process (``serve.serve_in_thread``), so the
process's peak resident memory (VmHWM, reset before each send) is theirs.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devstack import reset_trigger, rest, serve, tokens
from functions import credits_app, webhook_app
from functions.settings import CreditsApiSettings, WebhookSettings, load_settings

TOTAL = 150 * 1024 * 1024
CHUNK = b"x" * (1024 * 1024)  # one buffer, sent again and again: the client's memory stays flat
MAX_GROWTH = 64 * 1024 * 1024
PROC = Path("/proc/self")


def _status_kib(field: str) -> int:
    for line in (PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (bytes), as the kernel allows."""
    (PROC / "clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak() -> int:
    return _status_kib("VmHWM") * 1024


def send_huge(url: str, path: str, headers: dict[str, str], *, chunked: bool) -> tuple[int, Any, int]:
    """POST 150 MB to ``url + path``; (status, JSON body, bytes the client got to send)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=60)
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(TOTAL)}
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parts.netloc, "Content-Type": "application/json",
                                                  **framing, **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
    sent = 0

    def pump() -> None:
        nonlocal sent
        frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
        try:
            while sent < TOTAL:
                sock.sendall(frame)
                sent += len(CHUNK)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what we want

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = next((int(line.split(b":", 1)[1]) for line in answer[:head_end].split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(answer) >= head_end + 4 + length:
                    break
    finally:
        sock.close()
        sender.join(timeout=30)
    head_text, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ", 2)[1])
    return status, json.loads(body) if body else None, sent


@pytest.fixture(scope="module")
def function_urls(rest_url: str) -> Iterator[dict[str, str]]:
    env = {"SUPABASE_URL": rest_url, "SUPABASE_PUBLISHABLE_KEY": tokens.publishable_key(),
           "SUPABASE_SECRET_KEY": tokens.secret_key(), "STRIPE_WEBHOOK_SECRET": "whsec_test_0123456789",
           "CORS_ALLOW_ORIGINS": "http://localhost:3000"}
    apps = {
        "credits": credits_app.create_app(load_settings(CreditsApiSettings, env)),
        "webhook": webhook_app.create_app(load_settings(WebhookSettings, env)),
        "reset": reset_trigger.create_app(env),
    }
    with serve.serve_in_thread(apps["credits"]) as credits, serve.serve_in_thread(apps["webhook"]) as hook, \
            serve.serve_in_thread(apps["reset"]) as reset:
        yield {"credits": credits, "webhook": hook, "reset": reset}


def _targets(rest_url: str, urls: dict[str, str]) -> list[tuple[str, str, str, dict[str, str], int]]:
    user = tokens.user_token("11111111-1111-4111-8111-111111111111")
    return [
        ("rest rpc", rest_url, "/rest/v1/rpc/get_credit_balance",
         {"apikey": tokens.publishable_key(), "Authorization": f"Bearer {user}"}, rest.MAX_BODY_BYTES),
        ("rest table", rest_url, "/rest/v1/credit_prices", {"apikey": tokens.secret_key()},
         rest.MAX_BODY_BYTES),
        ("credits", urls["credits"], "/credits/deduct",
         {"Authorization": f"Bearer {user}", "Idempotency-Key": "big"}, credits_app.MAX_BODY_BYTES),
        ("webhook", urls["webhook"], "/stripe/webhook", {"Stripe-Signature": "t=1,v1=00"},
         webhook_app.MAX_BODY_BYTES),
        ("reset", urls["reset"], "/monthly-reset", {"apikey": tokens.secret_key()},
         reset_trigger.MAX_BODY_BYTES),
    ]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_150_mb_bodies_are_refused_without_being_read(rest_url: str, function_urls: dict[str, str],
                                                      chunked: bool) -> None:
    for name, url, path, headers, limit in _targets(rest_url, function_urls):
        before = reset_peak()
        status, body, sent = send_huge(url, path, headers, chunked=chunked)
        grown = peak() - before
        assert status == 413, (name, status, body)
        if name.startswith("rest"):
            assert body["code"] == "PGRST413" and str(limit) in body["message"], (name, body)
        else:
            assert set(body) == {"error", "message", "detail"}, (name, body)
            assert body["error"] == "payload_too_large" and body["detail"] == {"limit_bytes": limit}
        assert grown < MAX_GROWTH, f"{name}: the serving process grew by {grown // 2**20} MB"
        # The server stopped reading: the client could not push the whole body through.
        assert sent < TOTAL, name


def test_bodies_within_the_limit_are_still_read(function_urls: dict[str, str]) -> None:
    """The limit does not cut a body that fits: a chunked body just under it reaches the
    handler, whose answer (a period the database refuses) is a clear 400, not a bare 500."""
    import httpx

    def chunks() -> Iterator[bytes]:
        yield b'{"period_start": "2999-01-01"'
        yield b" " * (reset_trigger.MAX_BODY_BYTES - 64)
        yield b"}"

    reply = httpx.post(f"{function_urls['reset']}/monthly-reset", content=chunks(), timeout=60,
                       headers={"apikey": tokens.secret_key(), "content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["error"] == "invalid_argument" and body["detail"]["argument"] == "p_period_start"
    assert "one month ahead" in body["message"]
