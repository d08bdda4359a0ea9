"""The Stripe webhook: verify, normalise, hand to the database in one call.

A thin edge over ``handle_stripe_event``: the signature is checked on the raw
body exactly as received (a re-serialised body fails), the event is reduced to
version-independent facts (``functions.stripe_events``), and one service-role
RPC records and applies it in a single transaction. What the event does, and
whether it already happened, is the database's decision.

Answers (Stripe retries every non-2xx answer for up to three days):
- 413 for a body over 1 MB (refused before it is read: no Stripe event is that big).
- 400 for a missing/invalid signature, a stale timestamp or a body that is not
  an event: nothing is recorded, and a retry of the same bytes cannot succeed.
- 200 once the event is recorded, whatever the outcome: applied, duplicate,
  ignored, parked, or failed. A failed event was refused for good (a contract
  error such as an unknown account, a value the database refuses, a shape or
  text no Stripe event has); the same bytes would be refused again, so it is
  kept in ``stripe_events`` for an operator, and a redelivery (e.g. "Resend"
  in the Stripe dashboard after fixing the cause) tries again.
- 500 when the event could not be recorded (database or REST layer down,
  timeout), or when applying it failed transiently (a deadlock, a lock or
  statement timeout: outcome ``retrying``, counted on the event): nothing was
  applied, and Stripe's retry applies it once. The fifth transient failure
  records the event as failed (``transient_repeated``) and answers 200.

Parked events that a delivery unblocks (``ready``) are applied after the
delivery's transaction, by a second call (``release_stripe_events``); its
failure never changes the delivery's answer: the schedule releases them later.
"""

from __future__ import annotations

import json
import time
from typing import Any

import stripe
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from functions.errors import ApiError, BadRequest, ServiceUnavailable
from functions.http import install_body_limit, install_error_handlers, install_request_logging
from functions.observability import count, logger
from functions.rpc import Rpc, get_rpc
from functions.settings import SettingsSource, WebhookSettings, settings_source
from functions.stripe_events import normalize

SIGNATURE_TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 1_000_000  # Stripe events are far smaller; anything bigger is not one.
OUTCOMES = ("applied", "duplicate", "ignored", "parked", "failed", "retrying")
# Parked events a delivery made ready are applied right after it, in a call of
# their own (never inside the delivery's transaction); the schedule does the rest.
RELEASE_AFTER_DELIVERY = 500


def _not_recorded(retry_after: str | None) -> JSONResponse:
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(
        {"error": "event_not_recorded",
         "message": "the event could not be recorded, deliver it again later", "detail": {}},
        status_code=500, headers=headers,
    )


def _signed_at(signature: str) -> int:
    """The ``t=`` timestamp of a Stripe-Signature header (already verified to be well-formed)."""
    for part in signature.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    return 0


def _verified_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event as JSON, once its signature and timestamp check out; else BadRequest."""
    if len(payload) > MAX_BODY_BYTES:
        raise BadRequest("the body is too large for a Stripe event", error="invalid_payload")
    try:
        stripe.Webhook.construct_event(payload, signature, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS)
    except stripe.SignatureVerificationError:
        raise BadRequest("the Stripe-Signature header does not match the body",
                         error="invalid_signature") from None
    except Exception:
        # Signed but not an event object (not UTF-8, not JSON, a JSON list, ...).
        raise BadRequest("the body is not a JSON event", error="invalid_payload") from None
    # The library refuses signatures older than the tolerance; one dated further
    # ahead than that is no more Stripe's (a clock that far off, or a replay kit).
    if _signed_at(signature or "") > time.time() + SIGNATURE_TOLERANCE_SECONDS:
        raise BadRequest("the Stripe-Signature timestamp is in the future", error="invalid_signature")
    event = json.loads(payload)
    if (not isinstance(event, dict) or not isinstance(event.get("id"), str)
            or not isinstance(event.get("type"), str)
            or not 1 <= len(event["id"]) <= 255 or not 1 <= len(event["type"]) <= 255
            or "\x00" in event["id"] or "\x00" in event["type"]):
        raise BadRequest("the body is not a Stripe event", error="invalid_payload")
    return event


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _facts(event: dict[str, Any]) -> dict[str, Any]:
    """The event's facts for the database; an event that cannot be reduced to
    facts is sent as ``{"invalid": reason}``, which the database records as
    failed (a retry of the same bytes could never succeed)."""
    try:
        facts = normalize(event)
    except Exception:  # a shape no Stripe API version sends
        return {"invalid": "unexpected event shape", "created": None}
    if _has_nul(facts):
        return {"invalid": "text contains a NUL character", "created": facts.get("created")}
    return facts


router = APIRouter()


@router.post("/stripe/webhook")
async def stripe_webhook(request: Request) -> JSONResponse:
    settings: WebhookSettings = request.app.state.settings.get()
    rpc: Rpc = request.app.state.rpc
    # The raw bytes as delivered (Mangum has already undone API Gateway's base64).
    payload = await request.body()
    try:
        event = _verified_event(payload, request.headers.get("stripe-signature"),
                                settings.stripe_webhook_secret)
    except BadRequest as exc:
        count("StripeWebhookRejected")
        logger.warning("stripe event rejected", extra={"error": exc.error})
        raise
    event_id, event_type = event["id"], event["type"]
    params = {"p_event_id": event_id, "p_type": event_type, "p_payload": _facts(event)}
    try:
        result = await run_in_threadpool(rpc.service, "handle_stripe_event", params)
    except ApiError as exc:
        # Whatever the cause, the transaction did not commit: nothing is half-applied.
        logger.error("stripe event not recorded",
                     extra={"event_id": event_id, "event_type": event_type, "status": exc.status,
                            "error": exc.error})
        count("StripeEventNotRecorded")
        unavailable = isinstance(exc, ServiceUnavailable)
        return _not_recorded(exc.headers.get("Retry-After") if unavailable else None)
    outcome = str((result or {}).get("outcome", ""))
    if outcome not in OUTCOMES:
        logger.error("unexpected answer from handle_stripe_event", extra={"event_id": event_id})
        return _not_recorded(None)
    log = logger.warning if outcome in ("failed", "retrying") else logger.info
    log("stripe event", extra={
        "event_id": event_id, "event_type": event_type, "outcome": outcome,
        "reason": result.get("reason"), "ready": int(result.get("ready") or 0),
    })
    count(f"StripeEvent{outcome.capitalize()}")
    if outcome == "retrying":
        return JSONResponse(
            {"error": "event_not_applied",
             "message": "applying the event failed transiently, deliver it again",
             "detail": {"event_id": event_id}},
            status_code=500,
        )
    if int(result.get("ready") or 0) > 0:
        await run_in_threadpool(_release_ready, rpc, event_id)
    return JSONResponse({"received": True, "event_id": event_id, "outcome": outcome})


def _release_ready(rpc: Rpc, event_id: str) -> None:
    """Apply the parked events this delivery made ready; a failure only waits for the schedule."""
    try:
        out = rpc.service("release_stripe_events", {"p_limit": RELEASE_AFTER_DELIVERY})
    except ApiError as exc:
        logger.warning("parked stripe events left for the schedule",
                       extra={"event_id": event_id, "status": exc.status, "error": exc.error})
        return
    logger.info("parked stripe events released", extra={"event_id": event_id, **(out or {})})


def create_app(settings: WebhookSettings | SettingsSource[WebhookSettings], *,
               rpc: Rpc | None = None) -> FastAPI:
    """The webhook app (one per cold start; a ``LiveSettings`` is read per delivery)."""
    source = settings_source(settings)
    app = FastAPI(title="Credits Stripe webhook", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = source
    app.state.rpc = rpc or get_rpc(source)
    app.include_router(router)
    install_error_handlers(app)
    install_body_limit(app, MAX_BODY_BYTES)
    install_request_logging(app, "StripeWebhook")
    return app
