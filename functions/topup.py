"""Auto top-up: the worker step of notify, which charges the top-ups the database started.

The database decides everything but the payment: a top-up is started (a
``credit_topups`` row, ``pending``) by the transaction that took ``available``
below the account's threshold, at most one in flight per account, within its
cooldown and monthly cap; ``claim_topups`` also starts the ones due on accounts
nobody writes to, then leases pending top-ups to this run. For each one this
module makes the payment on Stripe and reports its outcome with
``record_topup_result``, where the first report wins (the webhook's
``payment_intent.*`` events report through the same function, so the credits
are granted once, whoever reports first).

The payment, with stripe-python's ``StripeClient`` (never the global
``stripe.api_key``), at ``STRIPE_API_BASE``:

1. A top-up whose PaymentIntent is already known (an earlier attempt left it
   ``processing``) takes that PaymentIntent's outcome.
2. A top-up older than 23 hours first looks for a PaymentIntent of the
   customer carrying ``metadata.topup_id`` (Stripe keeps an idempotency key
   for 24 hours) and takes its outcome when there is one.
3. The pack's Price gives ``unit_amount`` and ``currency`` (none: failed,
   ``price_without_amount``); the customer's
   ``invoice_settings.default_payment_method``, else its newest card, pays (none:
   failed, ``no_payment_method``).
4. The PaymentIntent is created off-session and confirmed, with metadata
   ``topup_id`` and ``account_id`` and the top-up's id as idempotency key, so
   a retry after a network error never charges twice.

Outcomes: ``succeeded`` (the PaymentIntent's id is reported with it);
``requires_action``, or a 402 with code ``authentication_required``, is
``action_required`` (auto top-up pauses), never a decline; any other card
error is ``failed`` with its code (``card_declined``, ``expired_card``, …);
``processing`` stays pending (``retry``, the webhook reports it later); a
network error, a rate limit, a Stripe 5xx, a rejected or unauthorised key is
``retry`` (the same idempotency key next run). Without ``STRIPE_API_KEY``
every claimed top-up ends ``not_configured`` (failed, auto top-up disabled).
Logs name the top-up, the outcome and Stripe's error type, code, status and
request id; never the key or Stripe's message.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import stripe

from functions.observability import logger
from functions.settings import NotifySettings

CLAIM = "claim_topups"
RECORD = "record_topup_result"
# A claimed top-up is this run's for this long: more than its Stripe requests can take
# (at most 5, each within 3 s to connect + STRIPE_TIMEOUT_SECONDS, at most 15).
LEASE_SECONDS = 120
CONNECT_TIMEOUT_SECONDS = 3.0
# Stripe keeps an idempotency key for 24 hours; past this age a PaymentIntent of the top-up
# is looked for before one is created.
IDEMPOTENCY_WINDOW = dt.timedelta(hours=23)
# PaymentIntents are looked for from this long before the top-up started (clock skew).
SEARCH_SLACK = dt.timedelta(minutes=5)
AUTHENTICATION_REQUIRED = "authentication_required"
TOPUP_KEY = "topup_id"
ACCOUNT_KEY = "account_id"
# Reasons (text of the topup.failed event) for what the worker itself finds.
PRICE_WITHOUT_AMOUNT = "price_without_amount"
NO_PAYMENT_METHOD = "no_payment_method"

Outcome = Literal["succeeded", "failed", "action_required", "not_configured", "retry"]

# stripe-python logs each request and Stripe's error messages at INFO (a message may name a masked
# key): only its warnings reach the function's logs.
logging.getLogger("stripe").setLevel(logging.WARNING)


class Database(Protocol):
    """The service-role calls the worker makes (``functions.notify.RpcDatabase``)."""

    def call(self, fn: str, params: Mapping[str, Any] | None = None) -> Any: ...

    def call_if_present(self, fn: str, params: Mapping[str, Any] | None = None) -> tuple[bool, Any]: ...


# --- what a claim hands out, and what a top-up came to ----------------------------------------


@dataclass(frozen=True)
class Topup:
    """One leased top-up, as ``claim_topups`` hands it out."""

    topup_id: str
    account_id: str
    customer: str | None
    pack: str
    credits: int
    created_at: dt.datetime
    attempts: int
    payment_intent: str | None

    @classmethod
    def from_claim(cls, row: Mapping[str, Any]) -> Topup:
        created = dt.datetime.fromisoformat(str(row["created_at"]))
        return cls(topup_id=str(row["topup_id"]), account_id=str(row["account_id"]),
                   customer=row.get("customer") or None, pack=str(row["pack"]),
                   credits=int(row["credits"]), created_at=created,
                   attempts=int(row.get("attempts") or 0), payment_intent=row.get("payment_intent") or None)


@dataclass(frozen=True)
class Result:
    """What one attempt at a top-up came to: the report ``record_topup_result`` gets."""

    topup_id: str
    outcome: Outcome
    payment_intent: str | None = None
    reason: str | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"p_topup_id": self.topup_id, "p_outcome": self.outcome}
        if self.payment_intent is not None:
            params["p_payment_intent"] = self.payment_intent
        if self.reason is not None:
            params["p_reason"] = self.reason
        return params


# --- how a payment attempt ends, as named exceptions ------------------------------------------


class TopupEnded(Exception):
    """The attempt has an outcome before (or instead of) a succeeded PaymentIntent."""

    outcome: Outcome = "failed"

    def __init__(self, reason: str | None, payment_intent: str | None = None) -> None:
        super().__init__(reason or self.outcome)
        self.reason = reason
        self.payment_intent = payment_intent


class Paid(TopupEnded):
    """The PaymentIntent succeeded: the pack's credits are granted."""

    outcome = "succeeded"


class PaymentFailed(TopupEnded):
    """The payment cannot be made or was declined: the failure counts (the third in a row disables)."""

    outcome = "failed"


class ActionRequired(TopupEnded):
    """The payment needs the customer (3-D Secure): auto top-up pauses."""

    outcome = "action_required"


class TryAgain(TopupEnded):
    """Nothing is known yet (a network error, a rate limit, Stripe unavailable, a payment
    processing): the top-up stays pending and is tried again with the same idempotency key."""

    outcome = "retry"


# --- Stripe -----------------------------------------------------------------------------------


def _field(obj: Any, name: str) -> Any:
    """A field of a Stripe object or of plain JSON (``None`` when absent)."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    if isinstance(obj, stripe.StripeObject) and name in obj:
        return obj[name]
    return None


def _id(value: Any) -> str | None:
    """An expandable field: its id, or the expanded object's."""
    if isinstance(value, str):
        return value or None
    inner = _field(value, "id")
    return inner if isinstance(inner, str) and inner else None


def _error_fields(exc: stripe.StripeError) -> dict[str, Any]:
    """What may be logged of a Stripe error: never its message (it may echo a masked key)."""
    return {"error_type": type(exc).__name__, "http_status": exc.http_status, "code": exc.code,
            "request_id": exc.request_id}


def _error_payment_intent(exc: stripe.StripeError) -> Any:
    """The PaymentIntent a 402 answer carries (``error.payment_intent``), if any."""
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return error.get("payment_intent") if isinstance(error, dict) else None


def outcome_of(intent: Any) -> TopupEnded:
    """A PaymentIntent's status as the top-up's outcome."""
    pi_id = _id(intent)
    status = _field(intent, "status")
    if status == "succeeded":
        return Paid(None, pi_id)
    if status == "requires_action":
        return ActionRequired(AUTHENTICATION_REQUIRED, pi_id)
    if status == "processing":
        return TryAgain("processing", pi_id)
    error_code = _field(_field(intent, "last_payment_error"), "code")
    if error_code == AUTHENTICATION_REQUIRED:
        return ActionRequired(AUTHENTICATION_REQUIRED, pi_id)
    if status == "requires_payment_method":
        return PaymentFailed(error_code or "payment_failed", pi_id)
    return PaymentFailed(error_code or str(status or "payment_failed"), pi_id)


class StripeCharger:
    """Charges top-ups through one ``StripeClient`` (its own connection pool; ``close()`` it)."""

    def __init__(self, api_key: str, api_base: str, *, timeout: float,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self._http = stripe.HTTPXClient(
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_SECONDS, timeout)),
            allow_sync_methods=True)
        # No retries inside a run: the next run retries, with the same idempotency key.
        self.client = stripe.StripeClient(api_key, base_addresses={"api": api_base}, http_client=self._http,
                                          max_network_retries=0)
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def close(self) -> None:
        self._http.close()  # type: ignore[no-untyped-call]

    # The steps (each raises a TopupEnded, or a StripeError that charge() maps).

    def price(self, topup: Topup) -> tuple[int, str]:
        """(unit amount, currency) of the pack's Price."""
        try:
            price = self.client.v1.prices.retrieve(topup.pack)
        except stripe.InvalidRequestError as exc:
            missing = exc.http_status == 404
            raise PaymentFailed("price_not_found" if missing else exc.code or "invalid_price") from None
        amount, currency = _field(price, "unit_amount"), _field(price, "currency")
        if not isinstance(amount, int) or amount <= 0 or not isinstance(currency, str) or not currency:
            raise PaymentFailed(PRICE_WITHOUT_AMOUNT)
        return amount, currency

    def payment_method(self, customer_id: str) -> str:
        """The customer's default payment method, else its newest card."""
        try:
            customer = self.client.v1.customers.retrieve(customer_id)
        except stripe.InvalidRequestError as exc:
            missing = exc.http_status == 404
            raise PaymentFailed("customer_not_found" if missing else exc.code or "invalid_customer") from None
        if _field(customer, "deleted"):
            raise PaymentFailed("customer_not_found")
        default = _id(_field(_field(customer, "invoice_settings"), "default_payment_method"))
        if default:
            return default
        newest: tuple[int, str] | None = None
        cards = self.client.v1.payment_methods.list(params={"customer": customer_id, "type": "card",
                                                            "limit": 100})
        # Stripe lists newest first; on equal times the first listed wins.
        for card in cards.auto_paging_iter():
            created, card_id = _field(card, "created"), _id(card)
            if card_id and isinstance(created, int) and (newest is None or created > newest[0]):
                newest = (created, card_id)
        if newest is None:
            raise PaymentFailed(NO_PAYMENT_METHOD)
        return newest[1]

    def existing_intent(self, topup: Topup, customer_id: str) -> Any | None:
        """The customer's PaymentIntent carrying this top-up's id, if Stripe has one
        (a succeeded one first, else the newest)."""
        since = int((topup.created_at - SEARCH_SLACK).timestamp())
        intents = self.client.v1.payment_intents.list(
            params={"customer": customer_id, "created": {"gte": since}, "limit": 100})
        found = [pi for pi in intents.auto_paging_iter()
                 if _field(_field(pi, "metadata"), TOPUP_KEY) == topup.topup_id]
        succeeded = [pi for pi in found if _field(pi, "status") == "succeeded"]
        candidates = succeeded or found
        return candidates[0] if candidates else None

    def create_intent(self, topup: Topup, customer_id: str, amount: int, currency: str, method: str) -> Any:
        # Only what the off-session charge needs (no description, no automatic_payment_methods).
        return self.client.v1.payment_intents.create(
            params={"amount": amount, "currency": currency, "customer": customer_id, "payment_method": method,
                    "off_session": True, "confirm": True,
                    "metadata": {TOPUP_KEY: topup.topup_id, ACCOUNT_KEY: topup.account_id}},
            options={"idempotency_key": topup.topup_id})

    def _attempt(self, topup: Topup, customer_id: str) -> Any:
        if topup.payment_intent:
            return self.client.v1.payment_intents.retrieve(topup.payment_intent)
        if self._clock() - topup.created_at > IDEMPOTENCY_WINDOW:
            found = self.existing_intent(topup, customer_id)
            if found is not None:
                return found
        amount, currency = self.price(topup)
        method = self.payment_method(customer_id)
        try:
            return self.create_intent(topup, customer_id, amount, currency, method)
        except stripe.IdempotencyError:
            # The key was used with other arguments (the price or card changed since a lost
            # answer): that PaymentIntent is this top-up's.
            found = self.existing_intent(topup, customer_id)
            if found is None:
                raise TryAgain("idempotency_error") from None
            return found

    def charge(self, topup: Topup) -> Result:
        """One attempt at a top-up; never raises for what Stripe answers."""
        if not topup.customer:
            return _ended(topup, PaymentFailed(NO_PAYMENT_METHOD))
        try:
            intent = self._attempt(topup, topup.customer)
        except TopupEnded as ended:
            return _ended(topup, ended)
        except stripe.CardError as exc:
            intent_of_error = _error_payment_intent(exc)
            pi_id = _id(intent_of_error)
            code = exc.code or _field(_field(intent_of_error, "last_payment_error"), "code")
            logger.info("auto top-up: card error", extra={"topup_id": topup.topup_id, **_error_fields(exc)})
            if code == AUTHENTICATION_REQUIRED:
                return _ended(topup, ActionRequired(AUTHENTICATION_REQUIRED, pi_id))
            return _ended(topup, PaymentFailed(code or "card_declined", pi_id))
        except stripe.InvalidRequestError as exc:
            logger.warning("auto top-up: request refused", extra={"topup_id": topup.topup_id,
                                                                  **_error_fields(exc)})
            return _ended(topup, PaymentFailed(exc.code or "invalid_request"))
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            # The key is wrong or lacks a permission: the operator's to fix, not the customer's failure.
            logger.error("auto top-up: Stripe refused the API key", extra={"topup_id": topup.topup_id,
                                                                           **_error_fields(exc)})
            return _ended(topup, TryAgain("stripe_" + ("authentication" if isinstance(
                exc, stripe.AuthenticationError) else "permission")))
        except stripe.StripeError as exc:  # connection, rate limit, 5xx, 409: the same key next run
            logger.warning("auto top-up: Stripe unavailable, tried again next run",
                           extra={"topup_id": topup.topup_id, **_error_fields(exc)})
            reason = "rate_limited" if isinstance(exc, stripe.RateLimitError) else (
                "network_error" if isinstance(exc, stripe.APIConnectionError) else "stripe_unavailable")
            return _ended(topup, TryAgain(reason))
        return _ended(topup, outcome_of(intent))


def _ended(topup: Topup, ended: TopupEnded) -> Result:
    return Result(topup.topup_id, ended.outcome, ended.payment_intent, ended.reason)


# --- one run's share: claim, charge, record ---------------------------------------------------


@dataclass
class Tally:
    """What a run did with top-ups (notify's summary carries it)."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    action_required: int = 0
    retried: int = 0
    unrecorded: int = 0
    done: bool = True

    def add(self, result: Result, recorded: bool) -> None:
        if not recorded:
            self.unrecorded += 1
        if result.outcome == "succeeded":
            self.succeeded += 1
        elif result.outcome == "action_required":
            self.action_required += 1
        elif result.outcome == "retry":
            self.retried += 1
        else:
            self.failed += 1


_claim_missing_logged = False


@contextmanager
def charger_for(settings: NotifySettings) -> Iterator[StripeCharger | None]:
    """A charger for one run (None without ``STRIPE_API_KEY``), closed at the end."""
    if settings.stripe_api_key is None:
        yield None
        return
    charger = StripeCharger(settings.stripe_api_key, settings.stripe_api_base,
                            timeout=settings.stripe_timeout_seconds)
    try:
        yield charger
    finally:
        charger.close()


def settle(db: Database, charger: StripeCharger | None, topup: Topup) -> tuple[Result, bool]:
    """Charge one top-up and report it; (the result, whether the report reached the database)."""
    if charger is None:
        result = Result(topup.topup_id, "not_configured")
    else:
        try:
            result = charger.charge(topup)
        except Exception as exc:  # a bug, not Stripe's answer: drop the lease, try again next run
            logger.error("auto top-up attempt crashed", extra={"topup_id": topup.topup_id,
                                                               "error_type": type(exc).__name__})
            result = Result(topup.topup_id, "retry", reason="worker_error")
    try:
        db.call(RECORD, result.params())
    except Exception as exc:  # the lease runs out and a later run tries again (same idempotency key)
        logger.error("auto top-up outcome not recorded", extra={"topup_id": topup.topup_id,
                                                                "outcome": result.outcome,
                                                                "error_type": type(exc).__name__})
        return result, False
    logger.info("auto top-up", extra={"topup_id": topup.topup_id, "account_id": topup.account_id,
                                      "attempt": topup.attempts, "outcome": result.outcome,
                                      "reason": result.reason, "payment_intent": result.payment_intent})
    return result, True


def run_topups(db: Database, settings: NotifySettings, remaining_ms: Callable[[], int]) -> Tally:
    """Claim and settle top-ups until none is due or the run's time is short.

    Each claim leases as many top-ups as there are slots (``NOTIFY_CONCURRENCY``);
    they are charged concurrently, each reported as soon as Stripe answers.
    """
    global _claim_missing_logged
    tally = Tally()
    slots = settings.notify_concurrency
    seen: set[str] = set()
    with charger_for(settings) as charger, ThreadPoolExecutor(max_workers=slots,
                                                              thread_name_prefix="topup") as pool:
        while True:
            if remaining_ms() < settings.notify_safety_margin_ms:
                logger.warning("notify stopping top-ups before the time limit",
                               extra={"remaining_ms": remaining_ms()})
                tally.done = False
                break
            present, rows = db.call_if_present(CLAIM, {"p_limit": slots, "p_lease_seconds": LEASE_SECONDS})
            if not present:
                if not _claim_missing_logged:
                    _claim_missing_logged = True
                    logger.info("the database has no auto top-up; skipped", extra={"function": CLAIM})
                break
            claimed = [Topup.from_claim(row) for row in rows or []]
            # A top-up told to retry is claimable again at once: this run leaves it (leased) to a later one.
            fresh = [t for t in claimed if t.topup_id not in seen]
            tally.claimed += len(fresh)
            seen.update(t.topup_id for t in fresh)
            for result, recorded in pool.map(lambda t: settle(db, charger, t), fresh):
                tally.add(result, recorded)
            if len(claimed) < slots or not fresh:
                break
    return tally
