"""Lambda entry point of notify (an EventBridge schedule, every minute; see serverless.yml).

Settings are loaded at import (the cold start) and a missing one fails the
cold start naming it; they are read again when older than 5 minutes and after
each SnapStart restore. Each run sweeps what lapsed, rolls usage up when the
database can, charges the pending auto top-ups on Stripe (``functions.topup``)
and delivers pending credit events to ``NOTIFY_WEBHOOK_URL`` until none is due
or the time is nearly up (``functions.notify``). Runs may overlap: the database
leases each event and each top-up to one run.
"""

from __future__ import annotations

from typing import Any

from functions.notify import RpcDatabase, emit, run_notify
from functions.observability import logger, metrics
from functions.settings import LiveSettings, NotifySettings
from functions.snapstart import refresh_after_restore

settings = LiveSettings(NotifySettings)
refresh_after_restore(settings)
database = RpcDatabase(settings)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    current = settings.get()
    summary = run_notify(database, current, remaining_ms=context.get_remaining_time_in_millis)
    emit(summary, current)
    return summary
