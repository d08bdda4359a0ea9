"""Lambda entry point of the Stripe webhook (API Gateway HTTP API -> Mangum -> FastAPI).

Settings are loaded at import, once per cold start; a missing one (e.g.
STRIPE_WEBHOOK_SECRET) fails the cold start with an error that names it.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from mangum import Mangum

from functions.observability import logger, metrics
from functions.settings import WEBHOOK_SETTINGS, load_settings
from functions.webhook_app import create_app

settings = load_settings(WEBHOOK_SETTINGS)
app = create_app(settings)
_asgi = Mangum(app, lifespan="off")


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _asgi(event, context)
