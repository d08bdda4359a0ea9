"""Parked Stripe events at scale: a release is bounded per call and finishes
over later calls, a subscription's superseded updates are collapsed, and a
per-customer cap keeps the log bounded. (A database of its own: the counts of
ready events are global.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Db, own_database


@pytest.fixture(scope="module")
def sdb(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_parked") as handle:
        yield handle


def event(database: Db, event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}", p_type=event_type,
                         p_payload={"created": int(time.time()), **payload})


def pack(database: Db, customer: str, credits: int = 1) -> dict[str, Any]:
    return event(database, "checkout.session.completed", {
        "session": f"cs_{uuid.uuid4().hex}", "mode": "payment", "payment_status": "paid", "credits": credits,
        "customer": customer, "payment_intent": f"pi_{uuid.uuid4().hex}"})


def link(database: Db, customer: str, account_id: str, subscription: str | None = None) -> dict[str, Any]:
    return event(database, "checkout.session.completed", {
        "session": f"cs_{uuid.uuid4().hex}", "mode": "subscription", "customer": customer,
        "subscription": subscription or f"sub_{uuid.uuid4().hex}", "account_id": account_id})


def test_a_large_release_is_bounded_per_call_and_never_inside_another_delivery(sdb: Db) -> None:
    _, account_id = sdb.new_user()
    customer = f"cus_{uuid.uuid4().hex}"
    assert all(pack(sdb, customer)["outcome"] == "parked" for _ in range(650))
    linked = link(sdb, customer, account_id)
    # The link applies itself only: what it unblocks is ready, released by calls of its own.
    assert (linked["outcome"], linked["ready"]) == ("applied", 650)
    assert sdb.balance(account_id)["purchased"] == 0
    other = pack(sdb, f"cus_{uuid.uuid4().hex}")
    assert (other["outcome"], other["ready"]) == ("parked", 0)
    assert sdb.balance(account_id)["purchased"] == 0
    assert sdb.call("release_stripe_events", p_limit=500) == {"released": 500, "remaining": 150}
    assert sdb.balance(account_id)["purchased"] == 500
    assert sdb.call("release_stripe_events", p_limit=1000) == {"released": 150, "remaining": 0}
    assert sdb.balance(account_id)["purchased"] == 650
    assert sdb.one("select count(*) from public.stripe_events where customer_id = %s and outcome = 'parked'",
                   customer) == 0


def test_only_a_subscriptions_newest_parked_update_is_applied(sdb: Db) -> None:
    _, account_id = sdb.new_user()
    sdb.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) values "
            "('parked_a', 1, 'price_parked_a'), ('parked_b', 2, 'price_parked_b') on conflict do nothing")
    customer, subscription = f"cus_{uuid.uuid4().hex}", f"sub_{uuid.uuid4().hex}"
    now = int(time.time())
    updates = []
    for offset, price in ((0, "price_parked_a"), (10, "price_parked_b"), (5, "price_parked_a")):
        updates.append(event(sdb, "customer.subscription.updated", {
            "subscription": subscription, "customer": customer, "status": "active", "created": now + offset,
            "items": [{"price_id": price, "quantity": 1}]}))
    assert [u["outcome"] for u in updates] == ["parked"] * 3
    assert link(sdb, customer, account_id, subscription)["ready"] == 3
    sdb.call("release_stripe_events", p_limit=500)  # as the webhook does after the delivery
    outcomes = dict(sdb.sql("select event_id, reason from public.stripe_events where event_id = any(%s)",
                            [u["event_id"] for u in updates]))
    assert sorted(outcomes.values()) == ["subscription_updated", "superseded", "superseded"]
    assert outcomes[updates[1]["event_id"]] == "subscription_updated"  # the newest
    assert sdb.one("select plan_id from public.credit_accounts where id = %s", account_id) == "parked_b"


def test_a_customer_may_park_only_so_many_events(sdb: Db) -> None:
    sdb.sql("create or replace function private.stripe_parked_cap() returns integer language plpgsql "
            "immutable set search_path = pg_catalog, pg_temp as $$ begin return 3; end $$")
    try:
        customer = f"cus_{uuid.uuid4().hex}"
        outcomes = [pack(sdb, customer)["outcome"] for _ in range(5)]
        assert outcomes == ["parked", "parked", "parked", "failed", "failed"]
        failed = sdb.one("select error ->> 'message' from public.stripe_events "
                         "where customer_id = %s and outcome = 'failed' limit 1", customer)
        assert failed == "too_many_parked"
    finally:
        sdb.sql("create or replace function private.stripe_parked_cap() returns integer language plpgsql "
                "immutable set search_path = pg_catalog, pg_temp as $$ begin return 10000; end $$")
