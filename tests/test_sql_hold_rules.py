"""Holds keep the rules of the credits they reserve: a renewal, an expiry or a
clawback that passes while credits are held applies when the hold ends, and
no cached counter drifts when holds lapse while other calls race."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from typing import Any

import psycopg

from devstack import db
from tests.support import Caller, Db, new_key
from tests.test_sql_promotions import grant, later, travel


def month(ahead: int) -> dt.datetime:
    start = dt.datetime.now(dt.UTC).date().replace(day=1)
    for _ in range(ahead):
        start = (start + dt.timedelta(days=32)).replace(day=1)
    return dt.datetime(start.year, start.month, 1, tzinfo=dt.UTC)


def renew(database: Db, account_id: str, amount: int, ahead: int = 1) -> dict[str, Any]:
    return database.call("add_subscription_credits", p_account_id=account_id, p_amount=amount,
                         p_period_start=month(ahead).isoformat(), p_period_end=month(ahead + 1).isoformat(),
                         p_idempotency_key=new_key())


def reserve(database: Db, caller: Caller, account_id: str, amount: int, ttl: int = 86400) -> dict[str, Any]:
    return database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=amount, p_ttl_seconds=ttl)


def test_a_hold_across_a_renewal_cannot_double_the_allowance(database: Db) -> None:
    # Reserve what is left of this month's allowance, let the renewal pass, release.
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, 3)
    renewal = renew(database, account_id, 3)
    assert (renewal["expired"], renewal["granted"]) == (0, 3)  # the held 3 are not free to expire now
    released = database.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert released["released"] == 3
    # ... they expire as the hold ends: the new month's 3, not 6.
    assert (released["balance"]["subscription"], released["balance"]["total"]) == (3, 3)
    expire = database.ledger(account_id)[-1]
    assert (expire["pool"], expire["type"], expire["amount"]) == ("subscription", "expire", -3)
    assert dt.datetime.fromisoformat(expire["period_start"]) == month(0)


def test_the_monthly_reset_cannot_be_dodged_with_a_hold_either(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2)
    hold = reserve(database, caller, account_id, 4)  # 3 allowance + 1 purchased
    database.sql("update public.credit_wallets set period_start = %s, period_end = %s where account_id = %s",
                 month(-1), month(0), account_id)
    out = database.call("run_monthly_reset", p_period_start=month(0).date().isoformat(), p_batch_size=100000)
    assert out["done"]
    released = database.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert (released["balance"]["subscription"], released["balance"]["purchased"]) == (3, 2)


def test_a_capture_after_the_renewal_charges_the_old_allowance(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, 3)
    renew(database, account_id, 3)
    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=2)
    assert (captured["charged"], captured["from_subscription"], captured["released"]) == (2, 2, 1)
    # The uncaptured old credit expired; the new allowance is whole.
    assert (captured["balance"]["subscription"], captured["balance"]["held"]) == (3, 0)
    spend = [r for r in database.ledger(account_id) if r["type"] == "spend"][-1]
    assert dt.datetime.fromisoformat(spend["period_start"]) == month(0)


def test_promotional_credits_whose_grant_expired_while_held_expire_when_the_hold_ends(database: Db) -> None:
    caller, account_id = database.new_user()
    grant(database, account_id, 5, later(hours=12))
    hold = reserve(database, caller, account_id, 4, ttl=86400)
    assert hold["balance"]["promotional"] == 5
    travel(database, account_id, 0.75)  # the grant expired; the hold (one day) has not
    # The unheld credit expires now; the 4 held ones wait for the hold.
    assert database.balance(account_id)["promotional"] == 4
    released = database.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert (released["balance"]["promotional"], released["balance"]["total"]) == (0, 3)
    rows = [(r["type"], r["amount"]) for r in database.ledger(account_id) if r["pool"] == "promotional"]
    assert rows == [("promotion", 5), ("expire", -1), ("expire", -4)]


def test_a_clawback_under_a_hold_is_taken_when_the_hold_ends(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref="pi_under_hold")
    hold = reserve(database, caller, account_id, 13)  # everything, before the dispute
    key = new_key()
    clawed = database.call("clawback_credits", p_stripe_ref="pi_under_hold", p_idempotency_key=key)
    assert (clawed["clawed_back"], clawed["pending"], clawed["shortfall"]) == (0, 10, 0)
    # A redelivery replays; another clawback for the same payment finds nothing more to take.
    assert database.call("clawback_credits", p_stripe_ref="pi_under_hold", p_idempotency_key=key)["replayed"]
    other = database.call("clawback_credits", p_stripe_ref="pi_under_hold", p_idempotency_key=new_key())
    assert (other["clawed_back"], other["pending"], other["shortfall"]) == (0, 0, 0)
    released = database.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert (released["balance"]["purchased"], released["balance"]["total"]) == (0, 3)
    row = database.ledger(account_id)[-1]
    assert (row["type"], row["pool"], row["amount"], row["stripe_ref"]) == (
        "clawback", "purchased", -10, "pi_under_hold")


def test_a_lapsed_hold_reads_released_before_any_write_and_the_sweep_agrees(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=4)
    reserve(database, caller, account_id, 5, ttl=1)
    time.sleep(1.1)
    read = database.balance(account_id)
    assert (read["held"], read["available"]) == (0, 7)
    assert database.one("select held_subscription + held_purchased from public.credit_wallets "
                        "where account_id = %s", account_id) == 5  # not swept yet
    after = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_amount=1)
    assert after["balance"]["available"] == read["available"] - 1


# --- the race that made `held` drift ---------------------------------------------------

def _call_in_open_transaction(conn: psycopg.Connection, fn: str, args: dict[str, Any]) -> Any:
    conn.execute("begin")
    conn.execute("set local role service_role")
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"role": "service_role"}),))
    names = ", ".join(f"{k} => %({k})s" for k in args)
    return conn.execute(f"select public.{fn}({names})", args).fetchone()[0]  # type: ignore[index]


def test_a_reserve_committing_while_the_reset_waits_keeps_held_exact(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=20)
    lapsing = reserve(database, caller, account_id, 5, ttl=1)
    database.sql("update public.credit_wallets set period_start = %s, period_end = %s where account_id = %s",
                 month(-1), month(0), account_id)
    time.sleep(1.1)  # the first hold lapses
    holder = psycopg.connect(database.dsn, autocommit=True)
    resetter = psycopg.connect(database.dsn, autocommit=True)
    try:
        # A reserve sweeps the lapsed hold and makes a new one, and stays open...
        new_hold = _call_in_open_transaction(holder, "reserve_credits", {
            "p_account_id": account_id, "p_idempotency_key": new_key(), "p_amount": 12})
        # ... while the reset of this account's month waits for the wallet's lock.
        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(db.call_function(
            resetter, "run_monthly_reset", {"p_period_start": month(0).date().isoformat(),
                                             "p_batch_size": 100000}, role="service_role",
            claims={"role": "service_role"})))
        worker.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not database.one(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                "and query like '%%run_monthly_reset%%'"):
            time.sleep(0.02)
        holder.execute("commit")
        worker.join(timeout=30)
    finally:
        holder.close()
        resetter.close()
    assert result and result[0]["done"]
    assert database.call("reconcile_credit_balances")["mismatches"] == []
    held = database.one("select held_promotional + held_subscription + held_purchased "
                        "from public.credit_wallets where account_id = %s", account_id)
    assert held == 12 == database.balance(account_id)["held"]
    status = database.one("select status from public.credit_holds where id = %s", lapsing["hold_id"])
    assert status == "expired"
    captured = database.call("capture_hold", p_hold_id=new_hold["hold_id"])
    assert captured["charged"] == 12
