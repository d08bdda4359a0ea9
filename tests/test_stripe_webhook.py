"""The Stripe webhook end to end: signed Stripe payloads (both API-version shapes) in
API Gateway v2 events -> handlers.stripe_webhook (Mangum) -> supabase-py -> the
local REST endpoint -> PostgreSQL.

Every test works on its own account, customer, subscription, payment and
catalog rows, and checks what the user would see: balances, ledger rows, the
account's plan and status, the recorded event, and what did NOT change after a
rejected delivery.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from devstack import rest, serve, tokens
from functions.stripe_events import normalize
from tests.lambda_events import LambdaContext, cold_start, http_event, response_json
from tests.stripe_support import OMIT, TEST_WEBHOOK_SECRET, body_of, render, sign, stripe_id
from tests.support import Db

PATH = "/stripe/webhook"
DAY = 86400
BOTH_VERSIONS = pytest.mark.parametrize("version", ["2024-06-20", "2025-03-31"])


@dataclass
class Reply:
    status: int
    body: Any


def webhook_env(rest_url: str) -> dict[str, str]:
    return {
        "SUPABASE_URL": rest_url,
        "SUPABASE_SERVICE_ROLE_KEY": tokens.service_role_key(),
        "STRIPE_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
        "RPC_TIMEOUT_SECONDS": "10",
    }


Deliver = Callable[..., Reply]


def make_deliver(handler: Callable[..., dict[str, Any]]) -> Deliver:
    def deliver(event: dict[str, Any] | None = None, *, body: str | bytes | None = None,
                signature: str | None = "sign", base64_body: bool = False) -> Reply:
        raw = body if body is not None else body_of(event or {})
        headers = {"content-type": "application/json; charset=utf-8", "user-agent": "Stripe/1.0"}
        if signature == "sign":
            signature = sign(raw)
        if signature is not None:
            headers["stripe-signature"] = signature
        response = handler(http_event("POST", PATH, headers=headers, raw_body=raw, base64_body=base64_body),
                           LambdaContext(function_name="credits-test-stripeWebhook"))
        return Reply(response["statusCode"], response_json(response))

    return deliver


@pytest.fixture(scope="module")
def deliver(rest_url: str) -> Iterator[Deliver]:
    with cold_start("handlers.stripe_webhook", webhook_env(rest_url)) as handler:
        yield make_deliver(handler)


# --- one customer's world: account, catalog rows, Stripe ids -----------------------


@dataclass
class World:
    db: Db
    account: str
    plan: str
    plan_price: str
    big_plan: str
    big_plan_price: str
    pack_price: str
    customer: str = field(default_factory=lambda: stripe_id("cus"))
    subscription: str = field(default_factory=lambda: stripe_id("sub"))
    session: str = field(default_factory=lambda: stripe_id("cs_test"))
    payment_intent: str = field(default_factory=lambda: stripe_id("pi"))
    charge: str = field(default_factory=lambda: stripe_id("ch"))
    invoice: str = field(default_factory=lambda: stripe_id("in"))
    period_start: int = field(default_factory=lambda: int(time.time()) - 60)

    def event(self, fixture: str, **values: Any) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "EVENT_ID": stripe_id("evt"), "CREATED": int(time.time()),
            "ACCOUNT_ID": self.account, "SUB_ACCOUNT_ID": self.account,
            "CUSTOMER": self.customer, "SUBSCRIPTION": self.subscription, "SESSION": self.session,
            "INVOICE": self.invoice, "PAYMENT_INTENT": self.payment_intent, "CHARGE": self.charge,
            "DISPUTE": stripe_id("dp"), "PRICE": self.plan_price, "CREDITS": "25", "QUANTITY": OMIT,
            "AMOUNT": 2900, "AMOUNT_REFUNDED": 0, "REFUNDED": False, "PAYMENT_STATUS": "paid",
            "BILLING_REASON": "subscription_create", "PERIOD_START": self.period_start,
            "PERIOD_END": self.period_start + 30 * DAY, "STATUS": "active", "CANCEL_AT_PERIOD_END": False,
        }
        defaults.update(values)
        return render(fixture, **defaults)

    # account state as the user sees it
    def balance(self) -> dict[str, Any]:
        return self.db.balance(self.account)

    def pools(self) -> tuple[int, int]:
        b = self.balance()
        return b["subscription"], b["purchased"]

    def account_row(self) -> tuple[Any, ...]:
        return self.db.one(
            "select plan_id, subscription_status, stripe_customer_id, stripe_subscription_id "
            "from public.credit_accounts where id = %s", self.account)

    def recorded(self, event_id: str) -> dict[str, Any] | None:
        rows = self.db.sql("select to_jsonb(e) from public.stripe_events e where event_id = %s", event_id)
        return rows[0][0] if rows else None

    def ledger_sum(self) -> dict[str, int]:
        rows = self.db.sql("select pool, sum(amount)::bigint from public.credit_ledger "
                           "where account_id = %s group by pool", self.account)
        return {pool: int(total) for pool, total in rows}


def make_world(database: Db) -> World:
    tag = uuid.uuid4().hex[:10]
    _, account = database.new_user()
    plan, big_plan = f"pro_{tag}", f"team_{tag}"
    plan_price, big_price, pack_price = f"price_pro_{tag}", f"price_team_{tag}", f"price_pack_{tag}"
    database.sql("insert into public.credit_plans (id, name, monthly_credits, stripe_price_id) "
                 "values (%s, 'Pro', 100, %s), (%s, 'Team', 500, %s)", plan, plan_price, big_plan, big_price)
    database.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, 50, 'Pack')",
                 pack_price)
    return World(database, account, plan, plan_price, big_plan, big_price, pack_price)


@pytest.fixture
def world(database: Db) -> World:
    return make_world(database)


def link_subscription(deliver: Deliver, w: World) -> None:
    reply = deliver(w.event("checkout.session.completed.subscription", PRICE=w.plan_price))
    assert (reply.status, reply.body["outcome"]) == (200, "applied")


# --- signatures -------------------------------------------------------------------


def test_a_valid_delivery_is_applied_and_answers_200(deliver: Deliver, world: World) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="25")
    reply = deliver(event)
    assert reply.status == 200
    assert reply.body == {"received": True, "event_id": event["id"], "outcome": "applied"}
    assert world.pools() == (3, 25)


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong_secret", "stale", "future_only_v0",
                                  "far_future"])
def test_bad_signatures_are_rejected_and_change_nothing(deliver: Deliver, world: World, case: str) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="25")
    body = body_of(event)
    signature = {
        "missing": None,
        "garbage": "t=oops,v1=nothex",
        "wrong_secret": sign(body, "whsec_someone_else_entirely_0123456789"),
        "stale": sign(body, timestamp=int(time.time()) - 301),
        "future_only_v0": sign(body).replace("v1=", "v0="),
        "far_future": sign(body, timestamp=int(time.time()) + 301),
    }[case]
    reply = deliver(body=body, signature=signature)
    assert reply.status == 400
    assert reply.body["error"] == "invalid_signature"
    assert TEST_WEBHOOK_SECRET not in str(reply.body)
    assert world.recorded(event["id"]) is None
    assert world.pools() == (3, 0)


@pytest.mark.parametrize("skew", [-240, 240])
def test_a_timestamp_within_tolerance_is_accepted(deliver: Deliver, world: World, skew: int) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="7")
    body = body_of(event)
    reply = deliver(body=body, signature=sign(body, timestamp=int(time.time()) + skew))
    assert (reply.status, reply.body["outcome"]) == (200, "applied")
    assert world.pools() == (3, 7)


def test_a_reserialized_body_fails_verification(deliver: Deliver, world: World) -> None:
    """The signature covers the exact bytes: the same JSON with other whitespace is rejected."""
    event = world.event("checkout.session.completed.payment", CREDITS="25")
    signed_body = body_of(event)
    compact = body_of(event).replace("\n", "").replace("  ", "")
    assert compact != signed_body
    reply = deliver(body=compact, signature=sign(signed_body))
    assert reply.status == 400
    assert world.recorded(event["id"]) is None
    assert world.pools() == (3, 0)


def test_a_base64_encoded_body_is_verified_on_the_decoded_bytes(deliver: Deliver, world: World) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="12")
    reply = deliver(event, base64_body=True)
    assert (reply.status, reply.body["outcome"]) == (200, "applied")
    assert world.pools() == (3, 12)


def test_a_signed_body_that_is_not_an_event_is_rejected(deliver: Deliver, world: World) -> None:
    for body in ("not json at all", '{"object": "event"}', "[1, 2]"):
        reply = deliver(body=body)
        assert reply.status == 400, body
        assert reply.body["error"] == "invalid_payload"
    assert world.pools() == (3, 0)


# --- credit packs -----------------------------------------------------------------


def test_pack_purchase_grants_once_with_the_payment_intent_as_reference(
        deliver: Deliver, world: World) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="40")
    assert deliver(event).body["outcome"] == "applied"
    assert deliver(event).body["outcome"] == "duplicate"
    assert world.pools() == (3, 40)
    purchases = [r for r in world.db.ledger(world.account) if r["type"] == "purchase"]
    assert len(purchases) == 1
    assert purchases[0]["stripe_ref"] == world.payment_intent
    assert (purchases[0]["idempotency_key"], purchases[0]["origin"]) == (
        f"checkout:{world.session}", "stripe")
    recorded = world.recorded(event["id"])
    assert recorded is not None
    assert (recorded["outcome"], recorded["deliveries"]) == ("applied", 2)


def test_pack_credits_come_from_the_pack_price_times_quantity(deliver: Deliver, world: World) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS=OMIT, PRICE=world.pack_price,
                        QUANTITY="3")
    assert deliver(event).body["outcome"] == "applied"
    assert world.pools() == (3, 150)


def test_a_checkout_for_something_else_is_ignored(deliver: Deliver, world: World) -> None:
    unknown = world.event("checkout.session.completed.payment", CREDITS=OMIT, PRICE="price_tshirt")
    reply = deliver(unknown)
    assert (reply.status, reply.body["outcome"]) == (200, "ignored")
    assert world.recorded(unknown["id"])["reason"] == "unknown_price"
    assert world.pools() == (3, 0)


def test_unpaid_checkout_grants_only_when_the_async_payment_succeeds(deliver: Deliver, world: World) -> None:
    pending = world.event("checkout.session.completed.payment", PAYMENT_STATUS="unpaid", CREDITS="30")
    assert deliver(pending).body["outcome"] == "ignored"
    assert world.pools() == (3, 0)
    succeeded = world.event("checkout.session.async_payment_succeeded", CREDITS="30")
    assert deliver(succeeded).body["outcome"] == "applied"
    assert world.pools() == (3, 30)
    # A paid "completed" for the same session (e.g. replayed from the dashboard) grants nothing more.
    paid = world.event("checkout.session.completed.payment", CREDITS="30")
    assert deliver(paid).body["outcome"] == "applied"
    assert world.pools() == (3, 30)


@pytest.mark.parametrize(("values", "error"), [
    ({"ACCOUNT_ID": "00000000-0000-4000-8000-000000000000"}, "account_not_found"),
    ({"ACCOUNT_ID": "not-a-uuid"}, "invalid_argument"),
    ({"CREDITS": "lots"}, "invalid_argument"),
    ({"CREDITS": "0"}, "invalid_argument"),
])
def test_a_refused_event_is_recorded_failed_and_changes_nothing(
        deliver: Deliver, world: World, values: dict[str, Any], error: str) -> None:
    event = world.event("checkout.session.completed.payment", **values)
    reply = deliver(event)
    # Recorded (so Stripe stops retrying identical bytes); visible to operators.
    assert (reply.status, reply.body["outcome"]) == (200, "failed")
    recorded = world.recorded(event["id"])
    assert recorded["outcome"] == "failed"
    assert recorded["error"]["message"] == error
    assert world.pools() == (3, 0)
    # A redelivery tries again (it is not a duplicate) and still changes nothing.
    again = deliver(event)
    assert again.body["outcome"] == "failed"
    assert world.recorded(event["id"])["attempts"] == 2


# --- subscriptions ------------------------------------------------------------------


@BOTH_VERSIONS
def test_subscription_checkout_links_and_invoice_starts_the_period(
        deliver: Deliver, world: World, version: str) -> None:
    link_subscription(deliver, world)
    plan, status, customer, subscription = world.account_row()
    assert (status, customer, subscription) == ("active", world.customer, world.subscription)
    assert plan == world.plan

    invoice = world.event(f"invoice.paid.{version}", SUB_ACCOUNT_ID=OMIT)  # found through the link
    reply = deliver(invoice)
    assert (reply.status, reply.body["outcome"]) == (200, "applied")
    balance = world.balance()
    # The signup allowance expired, the plan's monthly credits granted for the line's period.
    assert (balance["subscription"], balance["purchased"]) == (100, 0)
    assert balance["period_start"].startswith(time.strftime("%Y-%m-%d", time.gmtime(world.period_start)))
    grants = [r for r in world.db.ledger(world.account) if r["type"] == "grant"]
    assert grants[-1]["amount"] == 100
    assert (grants[-1]["idempotency_key"], grants[-1]["origin"]) == (f"invoice:{world.invoice}", "stripe")
    assert deliver(invoice).body["outcome"] == "duplicate"
    assert world.pools() == (100, 0)


@BOTH_VERSIONS
def test_invoice_metadata_names_the_account_without_a_checkout(
        deliver: Deliver, world: World, version: str) -> None:
    reply = deliver(world.event(f"invoice.paid.{version}", BILLING_REASON="subscription_cycle"))
    assert reply.body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    plan, status, customer, subscription = world.account_row()
    assert (plan, status) == (world.plan, "active")
    assert (customer, subscription) == (world.customer, world.subscription)


@BOTH_VERSIONS
def test_invoice_with_an_unknown_price_is_ignored(deliver: Deliver, world: World, version: str) -> None:
    event = world.event(f"invoice.paid.{version}", PRICE="price_not_a_plan")
    reply = deliver(event)
    assert (reply.status, reply.body["outcome"]) == (200, "ignored")
    assert world.recorded(event["id"])["reason"] == "unknown_price"
    assert world.pools() == (3, 0)
    assert world.account_row()[0] == "free"


def test_a_late_invoice_for_an_older_period_grants_nothing(deliver: Deliver, world: World) -> None:
    current = world.event("invoice.paid.2025-03-31", INVOICE=stripe_id("in"),
                          PERIOD_START=world.period_start, PERIOD_END=world.period_start + 30 * DAY)
    older = world.event("invoice.paid.2024-06-20", INVOICE=stripe_id("in"),
                        PERIOD_START=world.period_start - 2 * DAY, PERIOD_END=world.period_start + 28 * DAY)
    assert deliver(current).body["outcome"] == "applied"
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=str(uuid.uuid4()),
                  p_amount=10)
    assert deliver(older).body["outcome"] == "applied"
    assert world.pools() == (90, 0)


@BOTH_VERSIONS
def test_subscription_update_moves_the_plan_and_status(deliver: Deliver, world: World, version: str) -> None:
    link_subscription(deliver, world)
    reply = deliver(world.event(f"customer.subscription.updated.{version}", PRICE=world.big_plan_price,
                                STATUS="past_due"))
    assert reply.body["outcome"] == "applied"
    assert world.account_row()[:2] == (world.big_plan, "past_due")


@pytest.mark.parametrize("status", ["unpaid", "canceled", "paused"])
def test_a_subscription_that_stops_paying_puts_the_account_on_free(
        deliver: Deliver, world: World, status: str) -> None:
    link_subscription(deliver, world)
    deliver(world.event("invoice.paid.2025-03-31"))
    reply = deliver(world.event("customer.subscription.updated.2025-03-31", STATUS=status))
    assert reply.body["outcome"] == "applied"
    assert world.account_row()[:2] == ("free", status)
    assert world.pools() == (100, 0)  # the paid period's credits stay until it is renewed


def test_an_older_subscription_update_does_not_undo_a_newer_one(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    now = int(time.time())
    newer = world.event("customer.subscription.updated.2025-03-31", PRICE=world.big_plan_price, CREATED=now)
    older = world.event("customer.subscription.updated.2024-06-20", PRICE=world.plan_price,
                        STATUS="incomplete", CREATED=now - 30)
    assert deliver(newer).body["outcome"] == "applied"
    reply = deliver(older)
    assert reply.body["outcome"] == "ignored"
    assert world.recorded(older["id"])["reason"] == "stale"
    assert world.account_row()[:2] == (world.big_plan, "active")


@BOTH_VERSIONS
def test_deletion_returns_to_free_and_keeps_purchased_credits(
        deliver: Deliver, world: World, version: str) -> None:
    link_subscription(deliver, world)
    deliver(world.event(f"invoice.paid.{version}"))
    deliver(world.event("checkout.session.completed.payment", SESSION=stripe_id("cs_test"),
                        PAYMENT_INTENT=stripe_id("pi"), CREDITS="20"))
    assert world.pools() == (100, 20)
    reply = deliver(world.event(f"customer.subscription.deleted.{version}"))
    assert reply.body["outcome"] == "applied"
    assert world.account_row()[:2] == ("free", "canceled")
    # What is left of the paid period stays until it ends; purchased credits are untouched.
    assert world.pools() == (100, 20)
    # An update that arrives after the deletion does not bring the plan back.
    late = world.event(f"customer.subscription.updated.{version}", CREATED=int(time.time()) + 5)
    assert deliver(late).body["outcome"] == "ignored"
    assert world.account_row()[:2] == ("free", "canceled")


# --- refunds and disputes ------------------------------------------------------------


def test_partial_refunds_claw_back_proportionally_and_cumulatively(deliver: Deliver, world: World) -> None:
    deliver(world.event("checkout.session.completed.payment", CREDITS="100", AMOUNT=1000))
    assert world.pools() == (3, 100)
    # 333/1000 of 100 credits = 33.3 -> 33 (half up on whole credits).
    first = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=333)
    assert deliver(first).body["outcome"] == "applied"
    assert world.pools() == (3, 67)
    assert deliver(first).body["outcome"] == "duplicate"
    # Stripe reports the running total: 335/1000 -> 33.5 -> 34 in total, so 1 more now.
    second = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=335)
    assert deliver(second).body["outcome"] == "applied"
    assert world.pools() == (3, 66)
    # A different event reporting the same running total takes nothing more.
    same_total = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=335)
    assert deliver(same_total).body["outcome"] == "applied"
    assert world.pools() == (3, 66)
    full = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=1000, REFUNDED=True)
    assert deliver(full).body["outcome"] == "applied"
    assert world.pools() == (3, 0)
    clawbacks = [r for r in world.db.ledger(world.account) if r["type"] == "clawback"]
    assert sum(r["amount"] for r in clawbacks) == -100
    assert {r["stripe_ref"] for r in clawbacks} == {world.payment_intent}


def test_a_dispute_claws_back_everything_the_payment_granted(deliver: Deliver, world: World) -> None:
    deliver(world.event("checkout.session.completed.payment", CREDITS="60", AMOUNT=1500))
    deliver(world.event("charge.refunded", AMOUNT=1500, AMOUNT_REFUNDED=500))
    assert world.pools() == (3, 40)
    dispute = world.event("charge.dispute.created", AMOUNT=1000)
    assert deliver(dispute).body["outcome"] == "applied"
    assert world.pools() == (3, 0)
    assert deliver(dispute).body["outcome"] == "duplicate"


def test_a_refund_never_takes_more_than_is_left(deliver: Deliver, world: World) -> None:
    deliver(world.event("checkout.session.completed.payment", CREDITS="50", AMOUNT=500))
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=str(uuid.uuid4()),
                  p_amount=43)  # 3 subscription + 40 purchased spent
    reply = deliver(world.event("charge.refunded", AMOUNT=500, AMOUNT_REFUNDED=500, REFUNDED=True))
    assert reply.body["outcome"] == "applied"
    assert world.pools() == (0, 0)


# --- other types, unknown accounts ----------------------------------------------------


def test_other_event_types_are_recorded_and_ignored(deliver: Deliver, world: World) -> None:
    event = world.event("customer.created")
    reply = deliver(event)
    assert reply.status == 200
    assert reply.body["outcome"] == "ignored"
    recorded = world.recorded(event["id"])
    assert (recorded["type"], recorded["reason"]) == ("customer.created", "unhandled_type")
    assert world.pools() == (3, 0)


@BOTH_VERSIONS
def test_an_unknown_account_is_parked_then_applied_when_the_link_arrives(
        deliver: Deliver, world: World, version: str) -> None:
    invoice = world.event(f"invoice.paid.{version}", SUB_ACCOUNT_ID=OMIT)
    update = world.event(f"customer.subscription.updated.{version}", SUB_ACCOUNT_ID=OMIT,
                         PRICE=world.plan_price, CREATED=int(time.time()) - 5)
    for event in (invoice, update):
        reply = deliver(event)
        assert (reply.status, reply.body["outcome"]) == (200, "parked")
    assert world.pools() == (3, 0)
    assert world.recorded(invoice["id"])["parked_on"] == [f"customer:{world.customer}",
                                                          f"subscription:{world.subscription}"]

    link = world.event("checkout.session.completed.subscription")
    reply = deliver(link)
    assert reply.body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    assert world.account_row()[:2] == (world.plan, "active")
    assert world.recorded(invoice["id"])["outcome"] == "applied"
    assert world.recorded(update["id"])["outcome"] == "applied"
    # Applied once: a redelivery of the parked event is now a duplicate.
    assert deliver(invoice).body["outcome"] == "duplicate"
    assert world.pools() == (100, 0)


def test_a_refund_before_its_purchase_waits_for_it(deliver: Deliver, world: World) -> None:
    refund = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=500)
    assert deliver(refund).body["outcome"] == "parked"
    purchase = world.event("checkout.session.completed.payment", CREDITS="80")
    assert deliver(purchase).body["outcome"] == "applied"
    assert world.pools() == (3, 40)
    assert world.recorded(refund["id"])["outcome"] == "applied"


# --- retries, order and concurrency -----------------------------------------------------


def lifecycle(w: World) -> list[dict[str, Any]]:
    """A subscriber's month: link, invoice (parked until linked), plan change, two packs,
    a partial refund, a dispute, an unrelated event, cancellation."""
    t = int(time.time()) - 100
    pack2_pi = stripe_id("pi")
    return [
        w.event("checkout.session.completed.subscription", CREATED=t),
        w.event("invoice.paid.2025-03-31", SUB_ACCOUNT_ID=OMIT, CREATED=t + 1),
        w.event("customer.subscription.updated.2024-06-20", PRICE=w.big_plan_price, CREATED=t + 2),
        w.event("checkout.session.completed.payment", CREDITS="100", AMOUNT=1000, CREATED=t + 3),
        w.event("checkout.session.completed.payment", SESSION=stripe_id("cs_test"), PAYMENT_INTENT=pack2_pi,
                CREDITS=OMIT, PRICE=w.pack_price, QUANTITY="2", CREATED=t + 4),
        w.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=250, CREATED=t + 5),
        w.event("charge.dispute.created", PAYMENT_INTENT=pack2_pi, CHARGE=stripe_id("ch"), CREATED=t + 6),
        w.event("customer.created", CREATED=t + 7),
        w.event("customer.subscription.deleted.2025-03-31", CREATED=t + 8),
    ]


def final_state(w: World) -> dict[str, Any]:
    b = w.balance()
    plan, status, customer, subscription = w.account_row()
    return {"subscription": b["subscription"], "purchased": b["purchased"], "plan": plan,
            "status": status, "linked": (customer == w.customer, subscription == w.subscription),
            "ledger": w.ledger_sum()}


def deliver_concurrently(deliver: Deliver, events: list[dict[str, Any]], threads: int = 4) -> list[int]:
    """Deliver ``events`` from ``threads`` threads at once (each one Lambda container: its own
    event loop); the statuses answered."""
    statuses: list[int] = []
    lock = threading.Lock()
    queue = list(events)

    def worker() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        while True:
            with lock:
                if not queue:
                    return
                event = queue.pop()
            reply = deliver(event)
            with lock:
                statuses.append(reply.status)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    return statuses


def test_redelivered_shuffled_and_concurrent_events_apply_once(
        deliver: Deliver, rest_url: str, database: Db) -> None:
    ordered, chaotic = make_world(database), make_world(database)
    for event in lifecycle(ordered):
        assert deliver(event).status == 200
    expected = final_state(ordered)
    assert expected["purchased"] == 75 and expected["subscription"] == 100
    assert expected["plan"] == "free"

    deliveries = lifecycle(chaotic) * 3
    random.Random(20261121).shuffle(deliveries)
    assert deliver_concurrently(deliver, deliveries) == [200] * len(deliveries)
    assert final_state(chaotic) == expected
    outcomes = database.sql("select outcome, count(*) from public.stripe_events where account_id = %s "
                            "group by outcome", chaotic.account)
    assert dict(outcomes).get("parked") is None


# --- failures ---------------------------------------------------------------------------


def test_rest_unreachable_answers_500_and_a_redelivery_applies_once(
        deliver: Deliver, world: World) -> None:
    sock = serve.bind()  # a free port, closed again: nothing listens there
    dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    env = {**webhook_env(dead_url), "RPC_TIMEOUT_SECONDS": "2"}
    event = world.event("checkout.session.completed.payment", CREDITS="9")
    with cold_start("handlers.stripe_webhook", env) as handler:
        reply = make_deliver(handler)(event)
    assert reply.status == 500
    assert reply.body["error"] == "event_not_recorded"
    assert world.recorded(event["id"]) is None
    assert world.pools() == (3, 0)
    assert deliver(event).body["outcome"] == "applied"
    assert deliver(event).body["outcome"] == "duplicate"
    assert world.pools() == (3, 9)


def test_database_down_answers_500(db_dsn: str, world: World) -> None:
    """A REST layer whose database is gone (PostgREST answers 503): the webhook says 500."""
    gone = psycopg.conninfo.make_conninfo(db_dsn, dbname=f"missing_{uuid.uuid4().hex[:8]}")
    app = rest.create_app(gone)
    event = world.event("checkout.session.completed.payment", CREDITS="9")
    with serve.serve_in_thread(app) as url, \
            cold_start("handlers.stripe_webhook", webhook_env(url)) as handler:
        reply = make_deliver(handler)(event)
    assert reply.status == 500
    assert "password" not in str(reply.body) and "select" not in str(reply.body).lower()
    assert world.recorded(event["id"]) is None
    assert world.pools() == (3, 0)


def test_database_failure_mid_event_rolls_everything_back(
        deliver: Deliver, world: World, db_dsn: str) -> None:
    """The connection dies after the credits were written but before the event was
    recorded: nothing of it stays, the webhook answers 500, Stripe's retry applies it once."""
    event = world.event("checkout.session.completed.payment", CREDITS="15")
    blocker = psycopg.connect(db_dsn)  # holds an uncommitted row with this event id
    try:
        blocker.execute("insert into public.stripe_events (event_id, type, outcome, payload) "
                        "values (%s, 'x', 'ignored', '{}')", (event["id"],))
        result: dict[str, Reply] = {}

        def run() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            result["reply"] = deliver(event)

        thread = threading.Thread(target=run)
        thread.start()
        with psycopg.connect(db_dsn, autocommit=True) as admin:
            pid = None
            for _ in range(200):  # wait until the webhook's transaction waits on that row
                row = admin.execute(
                    "select pid from pg_stat_activity where wait_event_type = 'Lock' "
                    "and pid <> %s and query ilike %s", (blocker.info.backend_pid, "%handle_stripe_event%"),
                ).fetchone()
                if row:
                    pid = row[0]
                    break
                time.sleep(0.05)
            assert pid is not None, "the webhook's transaction never reached the event log"
            # It has already written the purchase: the account row is locked by it.
            with pytest.raises(psycopg.errors.LockNotAvailable):
                admin.execute("select 1 from public.credit_wallets where account_id = %s for update nowait",
                              (world.account,))
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        thread.join(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
    assert result["reply"].status == 500
    assert world.recorded(event["id"]) is None
    assert world.pools() == (3, 0)
    assert [r for r in world.db.ledger(world.account) if r["type"] == "purchase"] == []
    assert deliver(event).body["outcome"] == "applied"
    assert deliver(event).body["outcome"] == "duplicate"
    assert world.pools() == (3, 15)


# --- both API versions read the same ---------------------------------------------------------


def test_both_invoice_shapes_normalise_to_the_same_facts(world: World) -> None:
    old = normalize(world.event("invoice.paid.2024-06-20", EVENT_ID="evt_1", CREATED=1))
    new = normalize(world.event("invoice.paid.2025-03-31", EVENT_ID="evt_1", CREATED=1))
    for facts in (old, new):
        facts.pop("api_version")
    assert old.pop("payment_intent") == world.payment_intent  # gone from the invoice in 2025-03-31
    assert new.pop("payment_intent") is None
    assert old == new
    assert new["subscription"] == world.subscription
    assert new["lines"][0]["price_id"] == world.plan_price
    assert new["lines"][0]["period_start"] == world.period_start
    assert new["account_id"] == world.account


def test_both_subscription_shapes_normalise_to_the_same_facts(world: World) -> None:
    old = normalize(world.event("customer.subscription.updated.2024-06-20", CREATED=1))
    new = normalize(world.event("customer.subscription.updated.2025-03-31", CREATED=1))
    for facts in (old, new):
        facts.pop("api_version")
    # 2025-03-31 moved the period onto the items; both yield the period end.
    assert old["current_period_end"] == new["current_period_end"] == world.period_start + 30 * DAY
    old_items = [{k: v for k, v in i.items() if not k.startswith("period")} for i in old.pop("items")]
    new_items = [{k: v for k, v in i.items() if not k.startswith("period")} for i in new.pop("items")]
    assert old_items == new_items == [{"price_id": world.plan_price, "quantity": 1}]
    assert old == new


# --- who may call it ----------------------------------------------------------------------


def test_only_the_service_role_may_record_events_or_read_the_log(database: Db, world: World) -> None:
    from tests.support import Caller

    user, _ = database.new_user()
    args = {"p_event_id": stripe_id("evt"), "p_type": "checkout.session.completed",
            "p_payload": normalize(world.event("checkout.session.completed.payment", CREDITS="500"))}
    for caller in (Caller.anon(), user):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            database.call("handle_stripe_event", caller, **args)
    with database.connect() as conn, conn.transaction():
        conn.execute("set local role authenticated")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select count(*) from public.stripe_events")
    assert world.pools() == (3, 0)
    assert world.recorded(args["p_event_id"]) is None


def test_an_invoice_acts_on_its_customers_account_whatever_its_metadata_names(
        deliver: Deliver, world: World, database: Db) -> None:
    link_subscription(deliver, world)
    _, other_account = database.new_user()
    event = world.event("invoice.paid.2025-03-31", SUB_ACCOUNT_ID=other_account)
    reply = deliver(event)
    assert (reply.status, reply.body["outcome"]) == (200, "applied")
    # The invoice's customer is this world's: its account gets the period, the named one nothing.
    assert database.balance(other_account)["subscription"] == 3
    assert world.pools() == (100, 0)
    # A subscription already linked to this account is never moved by another account's metadata.
    assert database.one("select stripe_subscription_id from public.credit_accounts where id = %s",
                        other_account) is None


def test_no_key_a_license_holder_chooses_can_block_a_stripe_grant_or_refund(
        deliver: Deliver, world: World) -> None:
    # The license-key deduct runs as service_role; any key its caller chooses
    # lives in the callers' key space, apart from the records Stripe events make.
    key = world.db.call("create_license_key", p_account_id=world.account, p_name="attacker")["key"]
    world.db.fund(world.account, purchased=10)
    for taken in (f"refund:{world.charge}:1000", f"stripe:refund:{world.charge}:1000",
                  f"checkout:{world.session}", f"stripe:checkout:{world.session}",
                  f"invoice:{world.invoice}", f"stripe:invoice:{world.invoice}"):
        spent = world.db.call("deduct_credits_by_license", p_license_key=key, p_idempotency_key=taken,
                              p_amount=1)
        assert spent["charged"] == 1
    assert world.pools() == (0, 7)
    checkout = world.event("checkout.session.completed.payment", CREDITS="100", AMOUNT=1000)
    assert deliver(checkout).body["outcome"] == "applied"
    assert world.pools() == (0, 107)
    refund = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=1000, REFUNDED=True)
    assert deliver(refund).body["outcome"] == "applied"
    assert world.pools() == (0, 7)
    reasons = [(world.recorded(e["id"]) or {}).get("reason") for e in (checkout, refund)]
    assert reasons == ["credits_purchased", "clawed_back"]


# --- events that can never apply: recorded as failed, answered 200 -----------------------

def _failed_without_change(deliver: Deliver, world: World, event: dict[str, Any], *,
                           body: str | None = None) -> dict[str, Any]:
    before = (world.pools(), world.account_row(), len(world.db.ledger(world.account)))
    reply = deliver(event, body=body) if body is not None else deliver(event)
    assert (reply.status, reply.body["outcome"]) == (200, "failed"), reply
    assert (world.pools(), world.account_row(), len(world.db.ledger(world.account))) == before
    recorded = world.recorded(event["id"])
    assert recorded is not None and recorded["outcome"] == "failed"
    return recorded


def test_an_event_of_an_unexpected_shape_is_recorded_failed_not_retried(deliver: Deliver,
                                                                        world: World) -> None:
    link_subscription(deliver, world)
    event = world.event("invoice.paid.2025-03-31")
    event["data"]["object"]["lines"]["data"] = 12345  # not a list
    recorded = _failed_without_change(deliver, world, event)
    assert recorded["error"]["detail"]["reason"] == "unexpected event shape"


def test_a_nul_character_is_recorded_failed_not_retried(deliver: Deliver, world: World) -> None:
    event = world.event("checkout.session.completed.payment", CREDITS="25")
    body = body_of(event).replace(world.session, world.session + "\\u0000", 1)
    recorded = _failed_without_change(deliver, world, event, body=body)
    assert recorded["error"]["detail"]["reason"] == "text contains a NUL character"


def test_a_value_the_database_refuses_is_recorded_failed_not_retried(deliver: Deliver, world: World) -> None:
    # A period start no timestamp can hold: the database's own 22008, not a contract error.
    link_subscription(deliver, world)
    event = world.event("invoice.paid.2025-03-31", PERIOD_START=999_999_999_999_999_999)
    recorded = _failed_without_change(deliver, world, event)
    assert recorded["error"]["code"].startswith("22")


def test_another_customers_checkout_never_relinks_an_account_with_an_active_subscription(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    before = (world.account_row(), world.pools())
    intruder_customer, intruder_subscription = stripe_id("cus"), stripe_id("sub")
    checkout = world.event("checkout.session.completed.subscription", PRICE=world.big_plan_price,
                           CUSTOMER=intruder_customer, SUBSCRIPTION=intruder_subscription,
                           SESSION=stripe_id("cs_test"))
    reply = deliver(checkout)
    assert (reply.status, reply.body["outcome"]) == (200, "failed")
    assert world.recorded(checkout["id"])["error"]["message"] == "account_has_active_subscription"
    assert (world.account_row(), world.pools()) == before
    # Cancelling the intruder's subscription cannot put the paying account on free.
    gone = world.event("customer.subscription.deleted.2025-03-31", CUSTOMER=intruder_customer,
                       SUBSCRIPTION=intruder_subscription, SUB_ACCOUNT_ID=OMIT)
    assert deliver(gone).status == 200
    assert world.account_row() == before[0]


def test_the_same_customers_new_checkout_replaces_its_subscription(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    upgraded = stripe_id("sub")
    reply = deliver(world.event("checkout.session.completed.subscription", PRICE=world.big_plan_price,
                                SUBSCRIPTION=upgraded, SESSION=stripe_id("cs_test")))
    assert reply.body["outcome"] == "applied"
    assert world.account_row()[3] == upgraded


# --- seats and plan changes ---------------------------------------------------------------

def _with_lines(event: dict[str, Any], *lines: dict[str, Any]) -> dict[str, Any]:
    """The invoice event with its one line replaced by ``lines`` (each a dict of overrides)."""
    template = event["data"]["object"]["lines"]["data"][0]
    out = []
    for overrides in lines:
        line = json.loads(json.dumps(template))
        if "pricing" in line:  # 2025-03-31 and later
            line["parent"]["subscription_item_details"]["proration"] = overrides.get("proration", False)
            line["pricing"]["price_details"]["price"] = overrides["price"]
        else:
            line["proration"] = overrides.get("proration", False)
            line["price"]["id"] = line["plan"]["id"] = overrides["price"]
        line["amount"] = overrides.get("amount", line["amount"])
        line["quantity"] = overrides.get("quantity", 1)
        line["period"] = {"start": overrides.get("start", line["period"]["start"]),
                          "end": overrides.get("end", line["period"]["end"])}
        out.append(line)
    event["data"]["object"]["lines"]["data"] = out
    event["data"]["object"]["lines"]["total_count"] = len(out)
    return event


@BOTH_VERSIONS
def test_seats_multiply_the_plans_monthly_credits(deliver: Deliver, world: World, version: str) -> None:
    link_subscription(deliver, world)
    invoice = _with_lines(world.event(f"invoice.paid.{version}"), {"price": world.plan_price, "quantity": 3})
    assert deliver(invoice).body["outcome"] == "applied"
    assert world.pools() == (300, 0)


def _start_period(deliver: Deliver, world: World, price: str, allowance: int) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31", PRICE=price)).body["outcome"] == "applied"
    assert world.balance()["subscription"] == allowance


def _change(world: World, old: str, new: str, *, left: float, quantity: int = 1,
            version: str = "2025-03-31") -> dict[str, Any]:
    """A subscription_update invoice: credit for the old plan's unused time, charge for the new one's."""
    end = world.period_start + 30 * DAY
    changed_at = int(end - left * 30 * DAY)
    event = world.event(f"invoice.paid.{version}", BILLING_REASON="subscription_update",
                        INVOICE=stripe_id("in"))
    return _with_lines(event,
                       {"price": old, "proration": True, "amount": -1000, "start": changed_at, "end": end},
                       {"price": new, "proration": True, "amount": 2500, "start": changed_at, "end": end,
                        "quantity": quantity})


@BOTH_VERSIONS
def test_an_upgrade_mid_period_grants_the_prorated_difference_without_restarting_it(
        deliver: Deliver, world: World, version: str) -> None:
    _start_period(deliver, world, world.plan_price, 100)
    period = (world.balance()["period_start"], world.balance()["period_end"])
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=str(uuid.uuid4()),
                  p_amount=90)
    upgrade = _change(world, world.plan_price, world.big_plan_price, left=0.5, version=version)
    reply = deliver(upgrade)
    assert reply.body["outcome"] == "applied"
    balance = world.balance()
    # (500 - 100) x half the period left = 200: a grant of the period's allowance that ends with it;
    # the spent allowance stays spent.
    assert (balance["promotional"], balance["subscription"]) == (0, 210)
    assert (balance["period_start"], balance["period_end"]) == period
    assert balance["next_expiry"] == {"amount": 210, "at": period[1]}
    assert world.db.sql("select pool, source, granted, remaining from public.credit_grants "
                        "where account_id = %s and source in ('invoice', 'plan_change') order by created_at",
                        world.account) == [("subscription", "invoice", 100, 10),
                                           ("subscription", "plan_change", 200, 200)]
    assert deliver(upgrade).body["outcome"] == "duplicate"
    assert world.balance()["subscription"] == 210


def test_toggling_plans_never_beats_the_best_single_plan(deliver: Deliver, world: World) -> None:
    _start_period(deliver, world, world.plan_price, 100)
    up = deliver(_change(world, world.plan_price, world.big_plan_price, left=0.5))
    assert up.body["outcome"] == "applied"
    # Back down: 1,000 of the upgrade's 2,500 come back, so 200 x 1000 / 2500 = 80 of its credits do.
    down = deliver(_change(world, world.big_plan_price, world.plan_price, left=0.4))
    assert down.body["outcome"] == "applied"
    again = deliver(_change(world, world.plan_price, world.big_plan_price, left=0.3))
    assert again.body["outcome"] == "ignored"
    balance = world.balance()
    assert balance["total"] == 100 + 200 - 80 <= 500
    # A seat added later raises the best allowance again: 2 x 500 - 500, a tenth of the period left.
    seats = deliver(_change(world, world.big_plan_price, world.big_plan_price, left=0.1, quantity=2))
    assert seats.body["outcome"] == "applied"
    assert world.balance()["subscription"] == 100 + 200 - 80 + 50


def test_a_downgrade_grants_nothing_now(deliver: Deliver, world: World) -> None:
    _start_period(deliver, world, world.big_plan_price, 500)
    reply = deliver(_change(world, world.big_plan_price, world.plan_price, left=0.5))
    assert reply.body["outcome"] == "ignored"
    assert world.pools() == (500, 0)
    assert world.balance()["promotional"] == 0


# --- refunds and disputes of subscription payments, disputes won ---------------------------

def _invoice_payment(world: World) -> dict[str, Any]:
    """``invoice_payment.paid`` (API 2025-03-31+): which payment paid the world's invoice."""
    return {
        "id": stripe_id("evt"), "object": "event", "api_version": "2025-03-31.basil",
        "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": "invoice_payment.paid",
        "data": {"object": {
            "id": stripe_id("inpay"), "object": "invoice_payment", "amount_paid": 2900,
            "amount_requested": 2900, "currency": "usd", "invoice": world.invoice, "is_default": True,
            "livemode": False,
            "payment": {"type": "payment_intent", "payment_intent": world.payment_intent},
            "status": "paid", "status_transitions": {"canceled_at": None, "paid_at": int(time.time())},
        }},
    }


def test_a_refund_of_a_subscription_payment_waits_for_the_invoices_grant(deliver: Deliver,
                                                                         world: World) -> None:
    # Stripe does not guarantee order: the payment and its refund may come before the invoice.
    link_subscription(deliver, world)
    refund = world.event("charge.refunded", AMOUNT=2900, AMOUNT_REFUNDED=1450)
    assert deliver(_invoice_payment(world)).body["outcome"] == "applied"
    assert deliver(refund).body["outcome"] == "parked"
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    assert world.recorded(refund["id"])["outcome"] == "applied"
    assert world.pools() == (50, 0)


@pytest.mark.parametrize("payment_first", [True, False])
def test_a_refund_of_a_subscription_payment_applies_on_new_api_versions(
        deliver: Deliver, world: World, payment_first: bool) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    refund = world.event("charge.refunded", AMOUNT=2900, AMOUNT_REFUNDED=1450)  # half
    payment = _invoice_payment(world)
    if payment_first:
        assert deliver(payment).body["outcome"] == "applied"
        assert deliver(refund).body["outcome"] == "applied"
    else:
        assert deliver(refund).body["outcome"] == "parked"  # the charge names no invoice
        assert deliver(payment).body["outcome"] == "applied"
        assert world.recorded(refund["id"])["outcome"] == "applied"
    assert world.pools() == (50, 0)
    assert deliver(refund).body["outcome"] == "duplicate"
    assert world.pools() == (50, 0)


def _dispute(world: World, event_type: str, dispute: str, status: str) -> dict[str, Any]:
    event = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=1000)
    event["type"] = event_type
    event["data"]["object"]["status"] = status
    return event


def test_a_won_dispute_gives_back_exactly_what_it_took_once(deliver: Deliver, world: World) -> None:
    deliver(world.event("checkout.session.completed.payment", CREDITS="60", AMOUNT=1000))
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=str(uuid.uuid4()),
                  p_amount=13)
    assert world.pools() == (0, 50)  # 3 allowance + 10 of the pack spent
    dispute = stripe_id("dp")
    for event_type in ("charge.dispute.created", "charge.dispute.funds_withdrawn"):
        assert deliver(_dispute(world, event_type, dispute, "needs_response")).body["outcome"] == "applied"
    assert world.pools() == (0, 0)  # 50 taken back once (10 were already spent)
    won = [_dispute(world, "charge.dispute.funds_reinstated", dispute, "won"),
           _dispute(world, "charge.dispute.closed", dispute, "won")]
    for event in won + won:
        assert deliver(event).status == 200
    assert world.pools() == (0, 50)
    rows = [r for r in world.db.ledger(world.account) if r["type"] == "reinstate"]
    assert [(r["pool"], r["amount"]) for r in rows] == [("purchased", 50)]


def test_a_lost_dispute_changes_nothing_more(deliver: Deliver, world: World) -> None:
    deliver(world.event("checkout.session.completed.payment", CREDITS="40", AMOUNT=1000))
    dispute = stripe_id("dp")
    deliver(_dispute(world, "charge.dispute.created", dispute, "needs_response"))
    assert world.pools() == (3, 0)
    lost = _dispute(world, "charge.dispute.closed", dispute, "lost")
    assert deliver(lost).body["outcome"] == "ignored"
    assert world.pools() == (3, 0)


@BOTH_VERSIONS
def test_a_yearly_invoice_grants_the_first_month(deliver: Deliver, world: World, version: str) -> None:
    link_subscription(deliver, world)
    invoice = world.event(f"invoice.paid.{version}", PERIOD_END=world.period_start + 365 * DAY)
    assert deliver(invoice).body["outcome"] == "applied"
    balance = world.balance()
    assert world.pools() == (100, 0)
    month = (datetime.fromisoformat(balance["period_end"]) - datetime.fromisoformat(balance["period_start"]))
    assert timedelta(days=28) <= month <= timedelta(days=31)
    paid_through = world.db.one("select stripe_paid_through from public.credit_accounts where id = %s",
                                world.account)
    assert paid_through.timestamp() == world.period_start + 365 * DAY


def later_lifecycle(w: World) -> list[dict[str, Any]]:
    """Seats, a subscription payment refunded on API 2025-03-31, a pack disputed and won."""
    t = int(time.time()) - 100
    pack_pi, pack_ch, dispute = stripe_id("pi"), stripe_id("ch"), stripe_id("dp")
    invoice = _with_lines(w.event("invoice.paid.2025-03-31", SUB_ACCOUNT_ID=OMIT, CREATED=t + 1),
                          {"price": w.plan_price, "quantity": 2})
    payment = _invoice_payment(w)
    payment["created"] = t + 2
    won = [_dispute(w, kind, dispute, status) for kind, status in (
        ("charge.dispute.created", "needs_response"), ("charge.dispute.funds_reinstated", "won"),
        ("charge.dispute.closed", "won"))]
    for i, event in enumerate(won):
        event["data"]["object"].update({"payment_intent": pack_pi, "charge": pack_ch})
        event["created"] = t + 6 + i
    return [
        w.event("checkout.session.completed.subscription", CREATED=t),
        invoice,
        payment,
        w.event("charge.refunded", AMOUNT=2900, AMOUNT_REFUNDED=725, CREATED=t + 3),  # a quarter
        w.event("checkout.session.completed.payment", SESSION=stripe_id("cs_test"), PAYMENT_INTENT=pack_pi,
                CREDITS="40", AMOUNT=1000, CREATED=t + 4),
        *won,
    ]


def test_the_later_flows_apply_once_in_any_order(deliver: Deliver, database: Db) -> None:
    ordered, chaotic = make_world(database), make_world(database)
    for event in later_lifecycle(ordered):
        assert deliver(event).status == 200

    def state(w: World) -> dict[str, Any]:
        # Each world has plans of its own: compare which of them, not their ids.
        found = final_state(w)
        return {**found, "plan": {w.plan: "plan", w.big_plan: "big_plan"}.get(found["plan"], found["plan"])}

    expected = state(ordered)
    assert (expected["subscription"], expected["purchased"]) == (150, 40)  # 200 - a quarter; the pack back
    deliveries = later_lifecycle(chaotic) * 3
    random.Random(20261205).shuffle(deliveries)
    assert deliver_concurrently(deliver, deliveries) == [200] * len(deliveries)
    assert state(chaotic) == expected
    parked = database.one("select count(*) from public.stripe_events where outcome = 'parked' "
                          "and (account_id = %s or customer_id = %s)", chaotic.account, chaotic.customer)
    assert parked == 0


def test_an_upgrade_delivered_before_its_periods_invoice_waits_for_it(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    upgrade = _change(world, world.plan_price, world.big_plan_price, left=0.5)
    assert deliver(upgrade).body["outcome"] == "parked"
    assert world.balance()["promotional"] == 0
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    assert world.recorded(upgrade["id"])["outcome"] == "applied"
    assert (world.balance()["promotional"], world.balance()["subscription"]) == (0, 300)


def test_the_schedule_releases_what_a_linking_event_left_ready(rest_url: str, database: Db) -> None:
    _, account_id = database.new_user()
    customer = stripe_id("cus")
    def checkout(**facts: Any) -> dict[str, Any]:
        return database.call("handle_stripe_event", p_event_id=stripe_id("evt"),
                             p_type="checkout.session.completed",
                             p_payload={"session": stripe_id("cs"), "customer": customer, **facts})

    for _ in range(520):
        parked = checkout(mode="payment", payment_status="paid", credits=1, payment_intent=stripe_id("pi"))
        assert parked["outcome"] == "parked"
    linked = checkout(mode="subscription", subscription=stripe_id("sub"), account_id=account_id)
    assert linked["ready"] == 520 and database.balance(account_id)["purchased"] == 0
    with cold_start("handlers.stripe_webhook", webhook_env(rest_url)) as handler:
        summary = handler({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}},
                          LambdaContext(function_name="credits-test-stripeWebhook", timeout_ms=29_000))
    assert summary["remaining"] == 0 and summary["released"] == 520
    assert database.balance(account_id)["purchased"] == 520
