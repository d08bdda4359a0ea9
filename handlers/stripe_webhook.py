"""Lambda entry point of the Stripe webhook (API Gateway HTTP API -> Mangum -> FastAPI).

Settings are loaded at import, at the cold start; a missing one (e.g.
STRIPE_WEBHOOK_SECRET) fails the cold start with an error that names it. They
are read again when older than 5 minutes and after each SnapStart restore, so
a rolled signing secret needs no deploy.

The same function also runs on a schedule (EventBridge, see serverless.yml):
then it applies the parked events whose link arrived but which the linking
call left for later (``release_stripe_events``), until none is left or its
time is nearly up.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from mangum import Mangum

from functions.observability import logger, metrics
from functions.rpc import service_rpc
from functions.settings import LiveSettings, WebhookSettings
from functions.snapstart import refresh_after_restore
from functions.webhook_app import create_app

settings = LiveSettings(WebhookSettings)
refresh_after_restore(settings)
app = create_app(settings)
_asgi = Mangum(app, lifespan="off")

RELEASE_BATCH = 500
# Stop while more than one release call's time (RPC_TIMEOUT_SECONDS, 20 s) is left
# of the function's 29 s: a few batches of 500 per run, every 5 minutes.
RELEASE_MARGIN_MS = 22_000


def release_ready(context: Any) -> dict[str, Any]:
    """Release ready parked events in batches while time allows."""
    released, calls, remaining = 0, 0, None
    while context.get_remaining_time_in_millis() > RELEASE_MARGIN_MS:
        out = service_rpc(settings, "release_stripe_events", {"p_limit": RELEASE_BATCH})
        calls += 1
        released += int(out["released"])
        remaining = int(out["remaining"])
        if remaining == 0 or int(out["released"]) == 0:
            break
    summary = {"released": released, "remaining": remaining, "calls": calls}
    logger.info("parked stripe events released", extra=summary)
    return summary


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if event.get("source") == "aws.events":  # the schedule, not a delivery
        return release_ready(context)
    return _asgi(event, context)
