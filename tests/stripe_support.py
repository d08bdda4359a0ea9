"""Stripe test helpers: realistic event payloads and Stripe's signing scheme.

The fixtures in ``tests/fixtures/stripe`` are event payloads as Stripe sends
them (both API-version shapes). Values that differ per test are placeholders
(``"{{NAME}}"``); :func:`render` fills them so every test works on its own
customer, subscription and payment. A string that is exactly one placeholder
takes the value as-is (so numbers stay numbers); the value :data:`OMIT`
removes the key, the way Stripe leaves a metadata key out.

:func:`sign` computes the ``Stripe-Signature`` header exactly as Stripe does
(``t=<ts>,v1=<hex hmac_sha256(secret, "<ts>.<body>")>``), so the webhook's
verification with the ``stripe`` library is exercised for real.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stripe"
TEST_WEBHOOK_SECRET = "whsec_test_0123456789abcdefghijklmnopqrstuv"

OMIT = object()
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def sign(body: str | bytes, secret: str = TEST_WEBHOOK_SECRET, *, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``body``."""
    ts = int(time.time()) if timestamp is None else timestamp
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    mac = hmac.new(secret.encode(), f"{ts}.{text}".encode(), hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            filled = _fill(value, values)
            if filled is not OMIT:
                out[key] = filled
        return out
    if isinstance(node, list):
        return [item for item in (_fill(v, values) for v in node) if item is not OMIT]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


def render(name: str, **values: Any) -> dict[str, Any]:
    """Load fixture ``name`` (without .json) with its placeholders filled."""
    template = json.loads((FIXTURES / f"{name}.json").read_text())
    return _fill(template, values)


def stripe_id(prefix: str) -> str:
    """A fresh Stripe-looking id (``cus_…``, ``pi_…``), unique per call."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def body_of(event: dict[str, Any]) -> str:
    """Serialise like Stripe does (pretty-printed JSON; the signature covers these exact bytes)."""
    return json.dumps(event, indent=2)
