"""Lambda entry point of the credits API (API Gateway HTTP API -> Mangum -> FastAPI).

Settings are loaded at import, i.e. at the cold start: a missing one fails the
cold start with an error naming it, instead of failing every request later.
They are read again when older than 5 minutes and after each SnapStart
restore (``functions.settings.LiveSettings``), so a rotated secret needs no deploy.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from mangum import Mangum

from functions.credits_app import create_app
from functions.observability import logger, metrics
from functions.settings import CreditsApiSettings, LiveSettings
from functions.snapstart import refresh_after_restore

settings = LiveSettings(CreditsApiSettings)
refresh_after_restore(settings)
app = create_app(settings)
_asgi = Mangum(app, lifespan="off")


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _asgi(event, context)
