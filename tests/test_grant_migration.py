"""Upgrading a 0.2.0 database: today's balances become grants.

A database is built with exactly the migrations 0.2.0 shipped, used through
its own functions (sign-ups, credit packs, a subscription period, spends, a
refund, a clawback, promotions, holds left active), and then upgraded with
every later migration, as ``supabase db push`` would. Nothing a user holds
may change, every credit must sit in a grant with the source it came from,
and the grants must carry on working: a clawback after the upgrade takes
only what is left of its own pack, and holds made before it end normally.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from devstack import db
from tests.support import Db, new_key

RELEASED = json.loads((db.ROOT / "supabase" / "released-migrations.json").read_text())


def _split_migrations() -> tuple[list[Path], list[Path]]:
    shipped = set(RELEASED["0.2.0"])
    files = db.migration_files()
    return [f for f in files if f.name in shipped], [f for f in files if f.name not in shipped]


@pytest.fixture(scope="module")
def old_database(pg_server: str) -> Iterator[Db]:
    name = f"credits_upgrade_{os.getpid()}"
    dsn = db.create_database(pg_server, name)
    released, _ = _split_migrations()
    db.apply_sql_files(dsn, [db.BOOTSTRAP, *released])
    handle = Db(dsn)
    yield handle
    handle.close()
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def _grants(database: Db, account_id: str) -> list[tuple]:
    return database.sql(
        "select pool, source, stripe_ref, granted, remaining from public.credit_grants "
        "where account_id = %s and (remaining > 0 or stripe_ref is not null) "
        "order by pool, created_at, grant_id", account_id)


def _pool_sums(database: Db, account_id: str) -> dict[str, int]:
    rows = database.sql("select pool, sum(remaining)::bigint from public.credit_grants "
                        "where account_id = %s group by pool", account_id)
    return {pool: amount for pool, amount in rows}


def test_a_020_database_upgrades_with_every_credit_in_a_grant(old_database: Db) -> None:
    database = old_database
    in_a_week = (dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).isoformat()

    # --- 0.2.0, used as its users did -------------------------------------
    _, packs = database.new_user()           # buys two packs, spends, gets a refund and a clawback
    _, subscriber = database.new_user()      # a Stripe period, an adjustment, an active hold
    _, promoted = database.new_user()        # a promotion, part of it under an active hold
    database.call("add_purchased_credits", p_account_id=packs, p_amount=100, p_idempotency_key="pack-1",
                  p_stripe_ref="pi_pack_1")
    database.call("add_purchased_credits", p_account_id=packs, p_amount=50, p_idempotency_key="pack-2",
                  p_stripe_ref="pi_pack_2")
    spend = database.call("deduct_credits", p_account_id=packs, p_idempotency_key=new_key(), p_amount=120)
    assert (spend["from_subscription"], spend["from_purchased"]) == (3, 117)
    database.call("refund_credits", p_transaction_id=spend["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=7)
    database.call("clawback_credits", p_stripe_ref="pi_pack_2", p_idempotency_key="refund-1", p_amount=10)

    now = dt.datetime.now(dt.UTC)
    period_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    database.call("add_subscription_credits", p_account_id=subscriber, p_amount=500,
                  p_period_start=period_start.isoformat(),
                  p_period_end=(period_start + dt.timedelta(days=31)).isoformat(),
                  p_idempotency_key="invoice-1", p_stripe_ref="in_sub_1")
    database.call("deduct_credits", p_account_id=subscriber, p_idempotency_key=new_key(), p_amount=100)
    database.call("admin_adjust_credits", p_account_id=subscriber, p_pool="subscription", p_amount=20,
                  p_reason="goodwill", p_idempotency_key=new_key())
    sub_hold = database.call("reserve_credits", p_account_id=subscriber, p_idempotency_key=new_key(),
                             p_amount=30)

    database.call("grant_promotional_credits", p_account_id=promoted, p_amount=10, p_expires_at=in_a_week,
                  p_idempotency_key="promo-1")
    database.call("deduct_credits", p_account_id=promoted, p_idempotency_key=new_key(), p_amount=4)
    promo_hold = database.call("reserve_credits", p_account_id=promoted, p_idempotency_key=new_key(),
                               p_amount=5)

    accounts = [packs, subscriber, promoted]
    before = {a: database.balance(a) for a in accounts}

    # --- the upgrade --------------------------------------------------------
    _, later = _split_migrations()
    assert later, "no migration after 0.2.0"
    db.apply_sql_files(database.dsn, later)

    # Nothing a user holds changed (the balance object gained debt, 0), and the books agree with the grants.
    assert {a: database.balance(a) for a in accounts} == {a: {**b, "debt": 0} for a, b in before.items()}
    assert database.call("reconcile_credit_balances")["mismatches"] == []
    for account in accounts:
        balance = before[account]
        sums = _pool_sums(database, account)
        assert {pool: sums.get(pool, 0) for pool in ("promotional", "subscription", "purchased")} == {
            "promotional": balance["promotional"], "subscription": balance["subscription"],
            "purchased": balance["purchased"]}, account

    # Each credit sits in the grant it came from: the newest pack keeps what
    # spends left of it less its clawback; the oldest was spent in full.
    assert _grants(database, packs) == [
        ("purchased", "checkout", "pi_pack_1", 100, 0),
        ("purchased", "checkout", "pi_pack_2", 50, 23),
        ("purchased", "refund", None, 7, 7),
    ]
    assert [g for g in _grants(database, subscriber) if g[0] == "subscription"] == [
        ("subscription", "invoice", "in_sub_1", 500, 400),
        ("subscription", "adjustment", None, 20, 20),
    ]
    assert [g for g in _grants(database, promoted) if g[0] == "promotional"] == [
        ("promotional", "promotion", None, 10, 6),
    ]

    # --- the grants carry on ------------------------------------------------
    # A dispute of the second pack takes what is left of it, never the refund's credits.
    taken = database.call("clawback_credits", p_stripe_ref="pi_pack_2", p_idempotency_key="dispute-1")
    assert (taken["clawed_back"], taken["shortfall"]) == (23, 17)
    assert taken["balance"]["purchased"] == 7
    # Holds made before the upgrade end as they would have.
    released = database.call("release_hold", p_hold_id=promo_hold["hold_id"])
    assert released["balance"]["promotional"] == 6 and released["balance"]["held"] == 0
    captured = database.call("capture_hold", p_hold_id=sub_hold["hold_id"], p_amount=10)
    assert captured["balance"]["subscription"] == 410
    database.call("deduct_credits", p_account_id=promoted, p_idempotency_key=new_key(), p_amount=2)
    assert database.call("reconcile_credit_balances")["mismatches"] == []
    assert [g for g in _grants(database, promoted) if g[0] == "promotional"] == [
        ("promotional", "promotion", None, 10, 4),
    ]
