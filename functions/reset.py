"""The monthly reset: renew every account not renewed by Stripe, in batches, within the time limit.

``run_monthly_reset`` in the database does one batch per call and is idempotent
per period (an account already renewed for the month is skipped), so this loop
needs no state of its own: it calls batch after batch until the database says
``done``, and stops early when the Lambda's remaining time could not fit
another batch. The next invocation (the schedule retries hourly each morning)
simply starts from the beginning; already-renewed accounts cost almost nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from functions.errors import ApiError
from functions.observability import count, logger

RunBatch = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_PERIOD = re.compile(r"^\d{4}-\d{2}-01$")


def current_period_start(now: datetime | None = None) -> date:
    """The first day of the current month in UTC (the period the reset grants)."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).date().replace(day=1)


def period_from_event(event: Any) -> date | None:
    """An explicit ``period_start`` (``YYYY-MM-01``) in the event or its ``detail``, for re-running a
    month by hand; None for the plain scheduled event."""
    if not isinstance(event, Mapping):
        return None
    detail = event.get("detail")
    value = event.get("period_start")
    if value is None and isinstance(detail, Mapping):
        value = detail.get("period_start")
    if value is None:
        return None
    if not isinstance(value, str) or not _PERIOD.match(value):
        raise ValueError("period_start must be the first day of a month as YYYY-MM-01")
    return date.fromisoformat(value)


def run_reset(
    run_batch: RunBatch,
    period_start: date,
    *,
    batch_size: int,
    remaining_ms: Callable[[], int],
    safety_margin_ms: int,
) -> dict[str, Any]:
    """Call ``run_batch`` (the ``run_monthly_reset`` RPC) until done or out of time.

    Before each batch, the remaining time must cover the safety margin plus the
    longest batch seen so far; otherwise stop with ``done = False``.
    """
    summary: dict[str, Any] = {"period_start": period_start.isoformat(), "processed": 0, "expired": 0,
                               "granted": 0, "batches": 0, "done": False}
    after: str | None = None
    longest_ms = 0.0
    while True:
        left = remaining_ms()
        if left < safety_margin_ms + longest_ms:
            logger.warning("monthly reset stopping before the time limit",
                           extra={"remaining_ms": left, "batches": summary["batches"]})
            break
        params: dict[str, Any] = {"p_period_start": summary["period_start"], "p_batch_size": batch_size}
        if after is not None:
            params["p_after"] = after
        started = time.monotonic()
        try:
            result = run_batch(params)
        except Exception as exc:
            # Work done so far is committed (each batch is its own transaction); say how far we got.
            logger.error("monthly reset failed", extra={"summary": dict(summary),
                                                        "error_type": type(exc).__name__})
            raise
        longest_ms = max(longest_ms, (time.monotonic() - started) * 1000)
        summary["batches"] += 1
        for field in ("processed", "expired", "granted"):
            summary[field] += int(result.get(field) or 0)
        if result.get("done"):
            summary["done"] = True
            break
        next_after = result.get("next_after")
        if next_after is None or next_after == after:
            # The database promised more but gave no way forward: stop rather than loop.
            raise RuntimeError("run_monthly_reset returned done=false without a new next_after")
        after = str(next_after)
    return summary


def emit(summary: Mapping[str, Any]) -> None:
    """One summary log line and the run's metrics."""
    logger.info("monthly reset", extra={"summary": dict(summary)})
    count("MonthlyResetProcessed", summary["processed"])
    count("MonthlyResetGranted", summary["granted"])
    count("MonthlyResetExpired", summary["expired"])
    count("MonthlyResetBatches", summary["batches"])
    count("MonthlyResetIncomplete", 0 if summary["done"] else 1)


def refusal(exc: Exception) -> dict[str, Any] | None:
    """The contract's error body when the run was refused for its input (a malformed
    ``period_start``, or one the database refuses, e.g. more than a month ahead): running
    it again cannot help, so the handler answers this instead of failing for a retry.
    None for every other failure."""
    if isinstance(exc, ValueError):
        return {"error": "invalid_argument", "message": str(exc), "detail": {"argument": "period_start"}}
    if isinstance(exc, ApiError) and exc.status in (400, 422):
        reason = exc.detail.get("reason")
        message = f"period_start refused: {reason}" if isinstance(reason, str) else exc.message
        return {"error": exc.error, "message": message, "detail": dict(exc.detail)}
    return None
