"""One Stripe event never blocks another: whatever goes wrong while applying one
event is recorded on that event, and every other delivery, release and the
release schedule go on answering 200 (signed events -> handlers.stripe_webhook
-> the local REST endpoint -> PostgreSQL).

Two kinds of failure are provoked for real:
- an error the engine has no name for (a bug: SQLSTATE XX000), by replacing
  the function that applies won disputes for the length of one test;
- a transient failure (a lock timeout), by holding the account's wallet lock
  on another connection while the event is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.lambda_events import LambdaContext, cold_start
from tests.stripe_support import OMIT, stripe_id
from tests.support import Db
from tests.test_stripe_webhook import Deliver, World, make_deliver, make_world, webhook_env

SCHEDULE = {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}


@pytest.fixture(scope="module")
def webhook(rest_url: str) -> Iterator[Any]:
    with cold_start("handlers.stripe_webhook", webhook_env(rest_url)) as handler:
        yield handler


@pytest.fixture(scope="module")
def deliver(webhook: Any) -> Deliver:
    return make_deliver(webhook)


def run_schedule(webhook: Any) -> dict[str, Any]:
    result: dict[str, Any] = webhook(SCHEDULE, LambdaContext(function_name="credits-test-stripeWebhook",
                                                             timeout_ms=29_000))
    return result


@contextmanager
def dispute_won_broken(database: Db) -> Iterator[None]:
    """Applying a won dispute raises an error no rule names (as a bug would)."""
    original = database.one(
        "select pg_get_functiondef('private.stripe_dispute_won(text, jsonb)'::regprocedure)")
    database.sql(
        "create or replace function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb "
        "language plpgsql set search_path = pg_catalog, pg_temp as $$ begin "
        "raise exception using errcode = 'XX000', message = 'promotional credits without a grant'; end $$")
    try:
        yield
    finally:
        database.sql(original)


@pytest.fixture
def broken_dispute_won(database: Db) -> Iterator[None]:
    with dispute_won_broken(database):
        yield


def pack(w: World, credits: int = 5) -> dict[str, Any]:
    return w.event("checkout.session.completed.payment", CREDITS=str(credits), SESSION=stripe_id("cs_test"),
                   PAYMENT_INTENT=stripe_id("pi"))


def dispute(w: World, dispute_id: str, status: str = "needs_response",
            event_type: str = "charge.dispute.created") -> dict[str, Any]:
    event = w.event("charge.dispute.created", DISPUTE=dispute_id, AMOUNT=1000)
    event["type"] = event_type
    event["data"]["object"]["status"] = status
    return event


def dispute_won(w: World, dispute_id: str | None = None) -> dict[str, Any]:
    return dispute(w, dispute_id or stripe_id("dp"), "won", "charge.dispute.closed")


@pytest.mark.usefixtures("broken_dispute_won")
def test_an_unexpected_error_fails_only_its_own_event(deliver: Deliver, webhook: Any, database: Db) -> None:
    victim, other = make_world(database), make_world(database)
    assert deliver(pack(victim, 10)).body["outcome"] == "applied"
    won = dispute_won(victim)
    reply = deliver(won)
    assert (reply.status, reply.body["outcome"]) == (200, "failed")
    recorded = victim.recorded(won["id"])
    assert recorded is not None and recorded["outcome"] == "failed"
    assert recorded["error"]["code"] == "XX000"
    assert recorded["error"]["message"] == "promotional credits without a grant"
    assert victim.pools() == (3, 10)  # nothing of the failed event stayed
    # Another customer's deliveries and the release schedule go on.
    assert deliver(pack(other, 7)).status == 200 and other.pools() == (3, 7)
    assert run_schedule(webhook)["remaining"] == 0
    # A redelivery fails the same way, and answers 200 again.
    assert deliver(won).status == 200 and victim.recorded(won["id"])["outcome"] == "failed"  # type: ignore[index]


def test_a_failing_parked_event_never_fails_its_release_nor_another_delivery(
        deliver: Deliver, webhook: Any, database: Db) -> None:
    w = make_world(database)
    # A customer not yet linked to an account: its pack and a won dispute of that payment wait, parked.
    unlinked_pack = w.event("checkout.session.completed.payment", ACCOUNT_ID=OMIT, SUB_ACCOUNT_ID=OMIT,
                            CREDITS="4")
    dispute_id = stripe_id("dp")
    won = dispute_won(w, dispute_id)
    assert deliver(unlinked_pack).body["outcome"] == "parked"
    assert deliver(dispute(w, dispute_id)).body["outcome"] == "parked"
    assert deliver(won).body["outcome"] == "parked"
    with dispute_won_broken(database):
        # The link applies; its release, a call of its own, applies the pack and fails the dispute.
        reply = deliver(w.event("checkout.session.completed.subscription", PRICE=w.plan_price))
        assert (reply.status, reply.body["outcome"]) == (200, "applied")
        assert w.pools()[1] == 0  # the pack applied, then its dispute took it back
        recorded = w.recorded(won["id"])
        assert recorded is not None, recorded
        assert (recorded["outcome"], (recorded["error"] or {}).get("code")) == ("failed", "XX000"), recorded
        assert run_schedule(webhook)["remaining"] == 0
        other = make_world(database)
        assert deliver(pack(other, 1)).body["outcome"] == "applied"


def test_a_transient_failure_asks_for_a_retry_five_times_then_records_failed(
        deliver: Deliver, database: Db, db_dsn: str) -> None:
    w = make_world(database)
    event = pack(w, 9)
    database.sql("alter function private.stripe_apply(text, jsonb) set lock_timeout = '100ms'")
    try:
        with psycopg.connect(db_dsn) as holder:
            holder.execute("select 1 from public.credit_wallets where account_id = %s for update",
                           (w.account,))
            replies = [deliver(event) for _ in range(5)]
            # Meanwhile another customer's events apply.
            other = make_world(database)
            assert deliver(pack(other, 2)).body["outcome"] == "applied"
            holder.rollback()
    finally:
        database.sql("alter function private.stripe_apply(text, jsonb) reset lock_timeout")
    assert [r.status for r in replies] == [500, 500, 500, 500, 200]
    assert replies[0].body["error"] == "event_not_applied"
    assert replies[4].body["outcome"] == "failed"
    recorded = w.recorded(event["id"])
    assert recorded is not None
    assert (recorded["outcome"], recorded["reason"], recorded["transient_failures"]) == (
        "failed", "transient_repeated", 5)
    assert recorded["error"]["code"] == "55P03"
    assert w.pools() == (3, 0)
    # After the cause is gone, the operator's replay (or Stripe's resend) applies it once.
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        from devstack.stripe_ops import replay
        assert replay(conn, event["id"])["outcome"] == "applied"
    assert deliver(event).body["outcome"] == "duplicate"
    assert w.pools() == (3, 9)


def test_a_transient_failure_in_a_release_leaves_the_event_ready_and_releases_the_rest(
        database: Db, db_dsn: str) -> None:
    _, first = database.new_user()
    _, second = database.new_user()
    customers = [stripe_id("cus"), stripe_id("cus")]

    def checkout(customer: str, **facts: Any) -> dict[str, Any]:
        result: dict[str, Any] = database.call(
            "handle_stripe_event", p_event_id=stripe_id("evt"), p_type="checkout.session.completed",
            p_payload={"session": stripe_id("cs"), "customer": customer, **facts})
        return result

    for customer in customers:
        assert checkout(customer, mode="payment", payment_status="paid", credits=3,
                        payment_intent=stripe_id("pi"))["outcome"] == "parked"
    for customer, account in zip(customers, (first, second), strict=True):
        assert checkout(customer, mode="subscription", subscription=stripe_id("sub"),
                        account_id=account)["ready"] == 1
    database.sql("alter function private.stripe_apply(text, jsonb) set lock_timeout = '100ms'")
    try:
        with psycopg.connect(db_dsn) as holder:
            holder.execute("select 1 from public.credit_wallets where account_id = %s for update", (first,))
            assert database.call("release_stripe_events", p_limit=500) == {"released": 2, "remaining": 1}
            holder.rollback()
    finally:
        database.sql("alter function private.stripe_apply(text, jsonb) reset lock_timeout")
    assert (database.balance(first)["purchased"], database.balance(second)["purchased"]) == (0, 3)
    waiting = database.one("select transient_failures from public.stripe_events "
                           "where customer_id = %s and outcome = 'parked'", customers[0])
    assert waiting == 1
    assert database.call("release_stripe_events", p_limit=500) == {"released": 1, "remaining": 0}
    assert database.balance(first)["purchased"] == 3
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        assert db.call_function(conn, "reconcile_credit_balances")["mismatches"] == []
