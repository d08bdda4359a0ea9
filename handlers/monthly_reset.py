"""Lambda entry point of the monthly reset (an EventBridge schedule; see serverless.yml).

Settings are loaded at import (once per cold start) and a missing one fails the
cold start naming it. The event may carry ``period_start`` (``YYYY-MM-01``, at
the top level or in ``detail``) to re-run a month by hand; the schedule sends none
and the current UTC month is renewed.
"""

from __future__ import annotations

from typing import Any

from functions.observability import logger, metrics
from functions.reset import current_period_start, emit, period_from_event, run_reset
from functions.rpc import service_rpc
from functions.settings import ResetSettings, load_settings

settings = load_settings(ResetSettings)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    period_start = period_from_event(event) or current_period_start()
    summary = run_reset(
        lambda params: service_rpc(settings, "run_monthly_reset", params),
        period_start,
        batch_size=settings.reset_batch_size,
        remaining_ms=context.get_remaining_time_in_millis,
        safety_margin_ms=settings.reset_safety_margin_ms,
    )
    emit(summary)
    return summary
