"""Stripe events reduced to the few facts the credits engine acts on.

Stripe's API version 2025-03-31 ("basil") moved an invoice's subscription
under ``parent.subscription_details``, a line's price under
``pricing.price_details`` and its subscription under
``parent.subscription_item_details``, dropped ``invoice.payment_intent`` and
``invoice.charge``, and moved a subscription's current period onto its items.
Webhook endpoints receive whichever version they were created with, so this
module reads both shapes and hands the database one small, version-independent
object. The database function decides everything else (what to grant, to whom,
whether it already happened), in one transaction.

Only what is needed leaves this module: ids, amounts, periods, statuses and our
own metadata keys; no names, e-mail addresses or card details are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Metadata keys our checkout creation sets (documented in docs/stripe.md).
ACCOUNT_KEY = "account_id"
CREDITS_KEY = "credits"
PRICE_KEY = "price_id"
QUANTITY_KEY = "quantity"
# Metadata the auto top-up worker sets on its PaymentIntents.
TOPUP_KEY = "topup_id"


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _id(value: Any) -> str | None:
    """An expandable field: either the id string or the expanded object."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _int(value: Any) -> int | None:
    """Whole numbers only (Stripe amounts and timestamps are integers; metadata is text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _metadata_number(metadata: Mapping[str, Any], key: str) -> int | str | None:
    """A number from metadata, or the raw text when it is not one (the database rejects it
    visibly instead of the event silently granting nothing)."""
    raw = metadata.get(key)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    number = _int(raw)
    return number if number is not None else str(raw)[:64]


def _checkout(session: Mapping[str, Any]) -> dict[str, Any]:
    metadata = _obj(session.get("metadata"))
    return {
        "session": _id(session.get("id")),
        "mode": _text(session.get("mode")),
        "payment_status": _text(session.get("payment_status")),
        # client_reference_id is what Checkout carries for us; metadata is the fallback.
        "account_id": _text(session.get("client_reference_id")) or _text(metadata.get(ACCOUNT_KEY)),
        "customer": _id(session.get("customer")),
        "subscription": _id(session.get("subscription")),
        "payment_intent": _id(session.get("payment_intent")),
        "credits": _metadata_number(metadata, CREDITS_KEY),
        "price_id": _text(metadata.get(PRICE_KEY)),
        "quantity": _metadata_number(metadata, QUANTITY_KEY),
        "amount_total": _int(session.get("amount_total")),
    }


def _line_price(line: Mapping[str, Any]) -> str | None:
    # 2025-03-31 and later: pricing.price_details.price; before: price.id (or the legacy plan.id).
    pricing = _obj(line.get("pricing"))
    return (
        _id(_obj(pricing.get("price_details")).get("price"))
        or _id(line.get("price"))
        or _id(line.get("plan"))
    )


def _line_subscription(line: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(subscription id, is proration) of an invoice line, in either shape."""
    parent = _obj(line.get("parent"))
    details = _obj(parent.get("subscription_item_details")) or _obj(parent.get("invoice_item_details"))
    if details:
        return _id(details.get("subscription")), bool(details.get("proration"))
    return _id(line.get("subscription")), bool(line.get("proration"))


def _invoice(invoice: Mapping[str, Any]) -> dict[str, Any]:
    parent = _obj(_obj(invoice.get("parent")).get("subscription_details"))
    legacy = _obj(invoice.get("subscription_details"))
    lines_out: list[dict[str, Any]] = []
    line_subscription: str | None = None
    line_account: str | None = None
    for line in _obj(invoice.get("lines")).get("data") or []:
        line = _obj(line)
        subscription, proration = _line_subscription(line)
        line_subscription = line_subscription or subscription
        # A subscription line's metadata mirrors the subscription's metadata.
        line_account = line_account or _text(_obj(line.get("metadata")).get(ACCOUNT_KEY))
        period = _obj(line.get("period"))
        lines_out.append({
            "price_id": _line_price(line),
            "quantity": _int(line.get("quantity")),
            "amount": _int(line.get("amount")),
            "period_start": _int(period.get("start")),
            "period_end": _int(period.get("end")),
            "proration": proration,
            "subscription": subscription,
        })
    sub_metadata = _obj(parent.get("metadata")) or _obj(legacy.get("metadata"))
    payment_intent = _id(invoice.get("payment_intent"))
    if payment_intent is None:
        # 2025-03-31+: payments are a list (present when the endpoint includes it).
        for payment in _obj(invoice.get("payments")).get("data") or []:
            payment_intent = _id(_obj(_obj(payment).get("payment")).get("payment_intent"))
            if payment_intent:
                break
    return {
        "invoice": _id(invoice.get("id")),
        "customer": _id(invoice.get("customer")),
        "subscription": (
            _id(parent.get("subscription")) or _id(invoice.get("subscription")) or line_subscription
        ),
        "account_id": _text(sub_metadata.get(ACCOUNT_KEY)) or line_account,
        "billing_reason": _text(invoice.get("billing_reason")),
        "status": _text(invoice.get("status")),
        "payment_intent": payment_intent,
        "amount_paid": _int(invoice.get("amount_paid")),
        "lines": lines_out,
    }


def _subscription(subscription: Mapping[str, Any]) -> dict[str, Any]:
    items_out: list[dict[str, Any]] = []
    for item in _obj(subscription.get("items")).get("data") or []:
        item = _obj(item)
        items_out.append({
            "price_id": _id(item.get("price")) or _id(item.get("plan")),
            "quantity": _int(item.get("quantity")),
            # 2025-03-31+: the period lives on each item; before: on the subscription.
            "period_start": _int(item.get("current_period_start")),
            "period_end": _int(item.get("current_period_end")),
        })
    period_end = _int(subscription.get("current_period_end"))
    if period_end is None:
        ends = [i["period_end"] for i in items_out if i["period_end"] is not None]
        period_end = max(ends) if ends else None
    return {
        "subscription": _id(subscription.get("id")),
        "customer": _id(subscription.get("customer")),
        "account_id": _text(_obj(subscription.get("metadata")).get(ACCOUNT_KEY)),
        "status": _text(subscription.get("status")),
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
        "current_period_end": period_end,
        "ended_at": _int(subscription.get("ended_at")),
        "items": items_out,
    }


def _charge(charge: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "charge": _id(charge.get("id")),
        "payment_intent": _id(charge.get("payment_intent")),
        "customer": _id(charge.get("customer")),
        "amount": _int(charge.get("amount")),
        "amount_refunded": _int(charge.get("amount_refunded")),
        "refunded": bool(charge.get("refunded")),
    }


def _dispute(dispute: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "dispute": _id(dispute.get("id")),
        "charge": _id(dispute.get("charge")),
        "payment_intent": _id(dispute.get("payment_intent")),
        "amount": _int(dispute.get("amount")),
        "reason": _text(dispute.get("reason")),
        "status": _text(dispute.get("status")),
    }


def _invoice_payment(payment: Mapping[str, Any]) -> dict[str, Any]:
    # 2025-03-31+: which payment paid which invoice (charges no longer name their invoice).
    paid_by = _obj(payment.get("payment"))
    return {
        "invoice": _id(payment.get("invoice")),
        "payment_intent": _id(paid_by.get("payment_intent")),
        "charge": _id(paid_by.get("charge")),
        "status": _text(payment.get("status")),
    }


def _payment_intent(intent: Mapping[str, Any]) -> dict[str, Any]:
    # An auto top-up's payment names its top-up in metadata (the notify worker sets it).
    metadata = _obj(intent.get("metadata"))
    error = _obj(intent.get("last_payment_error"))
    return {
        "payment_intent": _id(intent.get("id")),
        "customer": _id(intent.get("customer")),
        "status": _text(intent.get("status")),
        "topup_id": _text(metadata.get(TOPUP_KEY)),
        "account_id": _text(metadata.get(ACCOUNT_KEY)),
        "error_code": _text(error.get("code")),
        "decline_code": _text(error.get("decline_code")),
    }


def normalize(event: Mapping[str, Any]) -> dict[str, Any]:
    """The version-independent facts of one Stripe event (a verified ``Event`` as JSON)."""
    event_type = str(event.get("type") or "")
    data_object = _obj(_obj(event.get("data")).get("object"))
    facts: dict[str, Any] = {
        "created": _int(event.get("created")),
        "livemode": bool(event.get("livemode")),
        "api_version": _text(event.get("api_version")),
        "object": _text(data_object.get("object")),
    }
    if event_type.startswith("checkout.session."):
        facts.update(_checkout(data_object))
    elif event_type.startswith("invoice_payment."):
        facts.update(_invoice_payment(data_object))
    elif event_type.startswith("invoice."):
        facts.update(_invoice(data_object))
    elif event_type.startswith("customer.subscription."):
        facts.update(_subscription(data_object))
    elif event_type.startswith("charge.dispute."):
        facts.update(_dispute(data_object))
    elif event_type.startswith("charge."):
        facts.update(_charge(data_object))
    elif event_type.startswith("payment_intent."):
        facts.update(_payment_intent(data_object))
    return facts
