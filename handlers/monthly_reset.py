"""Lambda entry point of the monthly reset (an EventBridge schedule; see serverless.yml).

Settings are loaded at import (the cold start) and a missing one fails the
cold start naming it; they are read again when older than 5 minutes and after
each SnapStart restore. The event may carry ``period_start`` (``YYYY-MM-01``, at
the top level or in ``detail``) to re-run a month by hand; the schedule sends none
and the current UTC month is renewed. A period that is malformed or that the
database refuses (e.g. more than one month ahead) is answered with the
contract's error body (``{"error", "message", "detail"}``) rather than raised:
a retry of the same event could never succeed.
"""

from __future__ import annotations

from typing import Any

from functions.observability import count, logger, metrics
from functions.reset import current_period_start, emit, period_from_event, refusal, run_reset
from functions.rpc import service_rpc
from functions.settings import LiveSettings, ResetSettings
from functions.snapstart import refresh_after_restore

settings = LiveSettings(ResetSettings)
refresh_after_restore(settings)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    current = settings.get()
    try:
        period_start = period_from_event(event) or current_period_start()
        summary = run_reset(
            lambda params: service_rpc(settings, "run_monthly_reset", params),
            period_start,
            batch_size=current.reset_batch_size,
            remaining_ms=context.get_remaining_time_in_millis,
            safety_margin_ms=current.reset_safety_margin_ms,
        )
    except Exception as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        logger.warning("monthly reset refused",
                       extra={"error": refused["error"], "detail": refused["detail"]})
        count("MonthlyResetRefused")
        return refused
    emit(summary)
    return summary
