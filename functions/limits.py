"""Input limits, the same numbers as the database's ``private.limits()``.

The SQL function is the source of truth (every contract function enforces it);
the HTTP layer checks the same limits first so a bad request is answered
without a database round trip. ``tests/test_limits.py`` fails when the two
disagree.
"""

import json
from typing import Final

IDEMPOTENCY_KEY: Final = 255
OPERATION: Final = 128
MODEL: Final = 200
METADATA_BYTES: Final = 16384
DESCRIPTION: Final = 1000
REASON: Final = 1000
KEY_NAME: Final = 100
STRIPE_REF: Final = 255
AMOUNT: Final = 1_000_000_000
TOKENS: Final = 1_000_000_000
TTL_SECONDS: Final = 86400

ALL: Final[dict[str, int]] = {
    "idempotency_key": IDEMPOTENCY_KEY, "operation": OPERATION, "model": MODEL,
    "metadata_bytes": METADATA_BYTES, "description": DESCRIPTION, "reason": REASON, "key_name": KEY_NAME,
    "stripe_ref": STRIPE_REF, "amount": AMOUNT, "tokens": TOKENS, "ttl_seconds": TTL_SECONDS,
}


def metadata_bytes(value: object) -> int:
    """Size of a JSON value as the database measures it (the text of its jsonb)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode())
