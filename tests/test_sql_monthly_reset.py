"""run_monthly_reset: batches by id, one renewal per period, Stripe-renewed
accounts left alone, lapsed holds released, each plan's allowance.

The reset walks every account in the database, so this module runs in a
database of its own that each test empties first: counts can be exact.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from tests.support import Caller, Db, expect_error, new_key, own_database, snapshot


@pytest.fixture(scope="module")
def reset_db(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_reset") as handle:
        yield handle


@pytest.fixture
def database(reset_db: Db) -> Iterator[Db]:
    """The module's database, emptied (deletes cascade), checked against its ledger afterwards."""
    reset_db.sql("delete from auth.users")
    reset_db.sql("delete from public.tenants")
    reset_db.sql("delete from public.credit_plans where id <> 'free'")
    reset_db.sql("update public.credit_plans set monthly_credits = 3 where id = 'free'")
    yield reset_db
    assert reset_db.call("reconcile_credit_balances")["mismatches"] == []


def month_start(months_ahead: int) -> dt.date:
    today = dt.datetime.now(dt.UTC).date().replace(day=1)
    month = today.month - 1 + months_ahead
    return dt.date(today.year + month // 12, month % 12 + 1, 1)


def utc(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def reset(database: Db, period: dt.date, **args: Any) -> dict[str, Any]:
    return database.call("run_monthly_reset", p_period_start=period.isoformat(), **args)


def run_to_end(database: Db, period: dt.date, batch: int) -> list[dict[str, Any]]:
    results, after = [], None
    while True:
        result = reset(database, period, p_batch_size=batch, p_after=after)
        results.append(result)
        if result["done"]:
            return results
        after = result["next_after"]


def account_row(database: Db, account_id: str) -> tuple:
    return database.one("select subscription, purchased, "
                        "held_promotional + held_subscription + held_purchased, period_start, period_end "
                        "from public.credit_wallets where account_id = %s", account_id)


def lapse(database: Db, hold_id: str) -> None:
    """Move a hold's expiry into the past, as if its ttl had run out."""
    database.sql("update public.credit_holds set expires_at = now() - interval '1 second' where id = %s",
                 hold_id)
    database.sql("update public.credit_wallets w set next_hold_expiry = now() - interval '1 second' "
                 "from public.credit_holds h where h.id = %s and w.account_id = h.account_id", hold_id)


# --- renewing -------------------------------------------------------------------------

def test_reset_expires_the_old_allowance_and_grants_the_plans(database: Db) -> None:
    spender, spent = database.new_user()
    _, buyer = database.new_user()
    _, tenant = database.new_tenant()
    database.call("deduct_credits", spender, p_account_id=spent, p_idempotency_key=new_key(), p_amount=1)
    database.fund(buyer, purchased=5)
    old = database.balance(buyer)
    period = month_start(1)

    result = reset(database, period)
    assert result == {"processed": 3, "expired": 2 + 3 + 3, "granted": 9, "done": True,
                      "next_after": max(spent, buyer, tenant)}
    for account_id, purchased in ((spent, 0), (buyer, 5), (tenant, 0)):
        assert account_row(database, account_id) == (3, purchased, 0, utc(period), utc(month_start(2)))
    expire, grant = database.ledger(buyer)[-2:]
    assert (expire["pool"], expire["amount"], expire["balance_after"], expire["type"]) == (
        "subscription", -3, 0, "expire")
    assert (expire["period_start"], expire["period_end"]) == (old["period_start"], old["period_end"])
    assert (grant["pool"], grant["amount"], grant["balance_after"], grant["type"]) == (
        "subscription", 3, 3, "grant")
    assert dt.datetime.fromisoformat(grant["period_start"]) == utc(period)
    assert {expire["metadata"]["reason"], grant["metadata"]["reason"]} == {"monthly_reset"}
    assert [r["amount"] for r in database.ledger(spent)[-2:]] == [-2, 3]


def test_running_a_period_twice_grants_nothing_twice(database: Db) -> None:
    users = [database.new_user()[1] for _ in range(3)]
    period = month_start(1)
    assert reset(database, period)["granted"] == 9
    before = [snapshot(database, a) for a in users]
    again = reset(database, period)
    assert (again["processed"], again["expired"], again["granted"], again["done"]) == (0, 0, 0, True)
    assert [snapshot(database, a) for a in users] == before
    # An older period is no renewal either.
    assert reset(database, month_start(0))["processed"] == 0
    assert [snapshot(database, a) for a in users] == before
    # A period more than a month ahead is refused and changes nothing.
    expect_error(database.call, "22023", "invalid_argument", "run_monthly_reset", Caller.service(),
                 p_period_start=month_start(2).isoformat())
    assert [snapshot(database, a) for a in users] == before


def test_batches_walk_the_accounts_in_id_order(database: Db) -> None:
    accounts = sorted(database.new_user()[1] for _ in range(5))
    results = run_to_end(database, month_start(1), 2)
    assert [(r["processed"], r["next_after"], r["done"]) for r in results] == [
        (2, accounts[1], False), (2, accounts[3], False), (1, accounts[4], True)]
    assert sum(r["granted"] for r in results) == 15
    assert all(account_row(database, a)[3] == utc(month_start(1)) for a in accounts)


def test_a_batch_that_ends_exactly_at_the_last_account(database: Db) -> None:
    accounts = sorted(database.new_user()[1] for _ in range(4))
    results = run_to_end(database, month_start(1), 2)
    assert [(r["processed"], r["next_after"], r["done"]) for r in results] == [
        (2, accounts[1], False), (2, accounts[3], False), (0, None, True)]


def test_a_resumed_run_picks_up_where_it_stopped(database: Db) -> None:
    accounts = sorted(database.new_user()[1] for _ in range(3))
    period = month_start(1)
    first = reset(database, period, p_batch_size=1)
    assert (first["processed"], first["next_after"]) == (1, accounts[0])
    # Starting over from the beginning (say, after a timeout) renews only the rest.
    results = run_to_end(database, period, 100)
    assert sum(r["processed"] for r in results) == 2
    assert all(account_row(database, a)[0] == 3 for a in accounts)


def test_only_active_or_trialing_subscriptions_are_left_to_stripe(database: Db) -> None:
    """A subscription that does not pay is renewed by the reset, with the free plan's allowance."""
    database.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) "
                 "values ('paid', 50, 'price_paid')")
    statuses = {"active": False, "trialing": False, "past_due": True, "canceled": True, "unpaid": True,
                "incomplete": True, "incomplete_expired": True, "paused": True}
    accounts = {}
    for status, renewed in statuses.items():
        _, account_id = database.new_user()
        database.sql("update public.credit_accounts set stripe_subscription_id = %s, plan_id = 'paid', "
                     "subscription_status = %s where id = %s", f"sub_{uuid.uuid4().hex}", status, account_id)
        accounts[account_id] = renewed
    _, unlinked = database.new_user()  # a status without a subscription is no Stripe renewal
    database.sql("update public.credit_accounts set subscription_status = 'active' where id = %s", unlinked)
    accounts[unlinked] = True
    database.fund(unlinked, purchased=1)
    before = {a: snapshot(database, a) for a in accounts}

    result = reset(database, month_start(1))
    assert result["processed"] == sum(accounts.values())
    for account_id, renewed in accounts.items():
        if renewed:
            assert account_row(database, account_id)[3] == utc(month_start(1))
            if account_id != unlinked:  # never the paid plan's 50 for a subscription that does not pay
                assert account_row(database, account_id)[0] == 3
        else:
            assert snapshot(database, account_id) == before[account_id]


@pytest.mark.parametrize(("monthly", "expected"), [(250, 250), (0, 0)])
def test_each_plan_grants_its_monthly_credits(database: Db, monthly: int, expected: int) -> None:
    database.sql("insert into public.credit_plans (id, name, monthly_credits) values ('pro', 'Pro', %s)",
                 monthly)
    _, pro = database.new_user()
    _, free = database.new_user()
    database.sql("update public.credit_accounts set plan_id = 'pro' where id = %s", pro)
    database.sql("update public.credit_plans set monthly_credits = 10 where id = 'free'")
    result = reset(database, month_start(1))
    assert (result["processed"], result["expired"], result["granted"]) == (2, 6, expected + 10)
    assert account_row(database, pro)[0] == expected
    assert account_row(database, free)[0] == 10
    kinds = [r["type"] for r in database.ledger(pro)]
    assert kinds == (["grant", "expire", "grant"] if expected else ["grant", "expire"])


def test_accounts_already_in_a_later_period_are_skipped(database: Db) -> None:
    _, ahead = database.new_user()
    _, behind = database.new_user()
    later = month_start(3)
    database.call("add_subscription_credits", p_account_id=ahead, p_amount=40,
                  p_period_start=utc(later).isoformat(), p_period_end=utc(month_start(4)).isoformat(),
                  p_idempotency_key=new_key())
    before = snapshot(database, ahead)
    assert reset(database, month_start(1))["processed"] == 1
    assert snapshot(database, ahead) == before
    assert account_row(database, behind)[3] == utc(month_start(1))


# --- holds -----------------------------------------------------------------------------

def test_reset_releases_lapsed_holds_and_spares_live_ones(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=4)
    lapsed = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=4)
    live = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=2, p_ttl_seconds=3600)
    lapse(database, lapsed["hold_id"])
    result = reset(database, month_start(1))
    # 7 credits, 2 held by the live hold: all 3 subscription credits are free to expire.
    assert (result["processed"], result["expired"], result["granted"]) == (1, 3, 3)
    statuses = dict(database.sql("select id::text, status from public.credit_holds where account_id = %s",
                                 account_id))
    assert statuses == {lapsed["hold_id"]: "expired", live["hold_id"]: "active"}
    assert account_row(database, account_id)[:3] == (3, 4, 2)
    assert database.call("capture_hold", caller, p_hold_id=live["hold_id"])["charged"] == 2


def test_reset_never_expires_credits_a_live_hold_reserves(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                  p_amount=2, p_ttl_seconds=3600)
    result = reset(database, month_start(1))
    assert (result["expired"], result["granted"]) == (1, 3)
    assert account_row(database, account_id)[:3] == (5, 0, 2)


def test_lapsed_holds_are_released_on_accounts_not_due(database: Db) -> None:
    caller, account_id = database.new_user()
    period = month_start(1)
    reset(database, period)
    hold = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=3)
    lapse(database, hold["hold_id"])
    before = database.ledger(account_id)
    result = reset(database, period)
    assert (result["processed"], result["granted"]) == (0, 0)
    assert database.one("select status from public.credit_holds where id = %s", hold["hold_id"]) == "expired"
    assert account_row(database, account_id)[:3] == (3, 0, 0)
    assert database.ledger(account_id) == before


# --- arguments and keys ---------------------------------------------------------------

@pytest.mark.parametrize(("args", "argument"), [
    ({"p_period_start": "2026-01-02"}, "p_period_start"),
    ({"p_period_start": None}, "p_period_start"),
    # A month too far: every free account's allowance would expire and renewals freeze until then.
    ({"p_period_start": "2999-01-01"}, "p_period_start"),
    ({"p_period_start": month_start(2).isoformat()}, "p_period_start"),
    ({"p_period_start": month_start(1).isoformat(), "p_batch_size": 0}, "p_batch_size"),
    ({"p_period_start": month_start(1).isoformat(), "p_batch_size": 100001}, "p_batch_size"),
    ({"p_period_start": month_start(1).isoformat(), "p_batch_size": None}, "p_batch_size"),
])
def test_reset_rejects_invalid_arguments(database: Db, args: dict[str, Any], argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "run_monthly_reset", Caller.service(),
                          **args)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_a_users_own_idempotency_keys_never_block_the_reset(database: Db) -> None:
    caller, account_id = database.new_user()
    _, bystander = database.new_user()
    period = month_start(1)
    # Keys are the caller's to choose; one that looks like the reset's must not get in its way.
    database.call("deduct_credits", caller, p_account_id=account_id,
                  p_idempotency_key=f"monthly_reset:{period.isoformat()}", p_amount=1)
    result = reset(database, period)
    assert (result["processed"], result["granted"]) == (2, 6)
    assert account_row(database, account_id)[:2] == (3, 0)
    assert account_row(database, bystander)[:2] == (3, 0)


def test_two_runs_of_one_period_at_once_grant_once(database: Db) -> None:
    accounts = [database.new_user()[1] for _ in range(3)]
    period = month_start(1).isoformat()
    with psycopg.connect(database.dsn) as first, psycopg.connect(database.dsn) as second:
        first.execute("set role service_role")
        second.execute("set role service_role")
        assert first.execute("select public.run_monthly_reset(%s)", (period,)).fetchone()[0]["granted"] == 9
        # The second run waits for the first one's row locks, then sees those accounts renewed.
        second.execute("set lock_timeout = '5s'")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: second.execute("select public.run_monthly_reset(%s)",
                                                         (period,)).fetchone()[0])
            time.sleep(0.3)
            assert not pending.done()
            first.commit()
            late = pending.result(timeout=10)
        second.commit()
    assert (late["processed"], late["granted"]) == (0, 0)
    assert [account_row(database, a)[0] for a in accounts] == [3, 3, 3]


# --- plans priced yearly ---------------------------------------------------------------

def _stripe_invoice(database: Db, account_id: str, price: str, days: int,
                    quantity: int = 1) -> dict[str, Any]:
    """A paid subscription invoice (the webhook's normalised facts) for ``days`` from now."""
    now = int(time.time()) - 60
    payload = {"invoice": f"in_{uuid.uuid4().hex}", "customer": f"cus_{uuid.uuid4().hex}",
               "subscription": f"sub_{uuid.uuid4().hex}", "account_id": account_id,
               "billing_reason": "subscription_create", "created": now,
               "lines": [{"price_id": price, "quantity": quantity, "period_start": now,
                          "period_end": now + days * 86400, "proration": False, "amount": 1000}]}
    return database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}", p_type="invoice.paid",
                         p_payload=payload)


def _yearly_state(database: Db, account_id: str) -> tuple:
    return database.one("select stripe_period_start, stripe_paid_through, stripe_quantity, stripe_paid_scale "
                        "from public.credit_accounts where id = %s", account_id)


def _months_pass(database: Db, account_id: str, months: int = 1) -> None:
    """As if ``months`` had passed for this account: its periods and paid year move back."""
    shift = f"{months} months"
    database.sql("update public.credit_wallets set period_start = period_start - %s::interval, "
                 "period_end = period_end - %s::interval where account_id = %s", shift, shift, account_id)
    database.sql("update public.credit_accounts "
                 "set stripe_period_start = stripe_period_start - %s::interval, "
                 "stripe_paid_through = stripe_paid_through - %s::interval, "
                 "stripe_paid_until = stripe_paid_until - %s::interval where id = %s",
                 shift, shift, shift, account_id)


def _anniversary(start: dt.datetime, months: int) -> dt.datetime:
    """``start`` + ``months`` in UTC, the day clipped to the month's end."""
    start = start.astimezone(dt.UTC)
    month = start.month - 1 + months
    year, month = start.year + month // 12, month % 12 + 1
    last = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return start.replace(year=year, month=month, day=min(start.day, last))


def test_a_yearly_plan_renews_on_its_monthly_anniversaries_within_the_paid_year(database: Db) -> None:
    database.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) values "
                 "('yearly', 10, 'price_yearly'), ('monthly', 40, 'price_monthly')")
    _, yearly = database.new_user()
    _, monthly = database.new_user()
    assert _stripe_invoice(database, yearly, "price_yearly", 365, quantity=2)["outcome"] == "applied"
    assert _stripe_invoice(database, monthly, "price_monthly", 30)["outcome"] == "applied"
    first = database.balance(yearly)
    # The first month of the year, not the year: 10 credits x 2 seats.
    assert first["subscription"] == 20
    start = dt.datetime.fromisoformat(first["period_start"])
    assert dt.datetime.fromisoformat(first["period_end"]) == _anniversary(start, 1)
    # A month later (the reset runs daily, with the current month's first day): the next anniversary month.
    _months_pass(database, yearly)
    database.call("deduct_credits", p_account_id=yearly, p_idempotency_key=new_key(), p_amount=5)
    monthly_before = snapshot(database, monthly)
    assert reset(database, month_start(0))["processed"] == 1
    shifted_start = _yearly_state(database, yearly)[0]
    subscription, _, _, period_start, period_end = account_row(database, yearly)
    assert subscription == 20
    assert (period_start, period_end) == (_anniversary(shifted_start, 1), _anniversary(shifted_start, 2))
    assert period_start <= dt.datetime.now(dt.UTC) < period_end  # an allowance today
    assert snapshot(database, monthly) == monthly_before  # its invoices renew it
    # Run again the same day: nothing twice.
    assert reset(database, month_start(0))["processed"] == 0


def test_the_reset_never_renews_past_the_paid_period(database: Db) -> None:
    database.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) values "
                 "('yearly', 10, 'price_yearly')")
    _, ending = database.new_user()
    _, ended = database.new_user()
    for account_id in (ending, ended):
        _stripe_invoice(database, account_id, "price_yearly", 365)
        _months_pass(database, account_id)
    reaches = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=10)
    database.sql("update public.credit_accounts set stripe_paid_through = %s where id = %s", reaches, ending)
    database.sql("update public.credit_accounts set stripe_paid_through = now() - interval '1 day', "
                 "stripe_paid_until = now() - interval '1 day' where id = %s", ended)
    before = snapshot(database, ended)
    reset(database, month_start(0))
    assert account_row(database, ending)[4] == reaches  # the month stops where the payment does
    # The year ended a day ago: its renewal invoice may still come (72 hours), so nothing yet.
    assert snapshot(database, ended) == before



def test_a_renewal_under_the_free_plans_cap_attributes_earlier_promotional_spends(database: Db) -> None:
    # A subscription that stopped paying is renewed with the free plan's allowance and
    # rollover cap, whatever its own plan's: the rollover grant must not inherit spends.
    database.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id, rollover_cap) "
                 "values ('pro_no_rollover', 100, 'price_pro_no_rollover', 0)")
    database.sql("update public.credit_plans set rollover_cap = 3 where id = 'free'")
    try:
        _, account_id = database.new_user()
        database.sql("update public.credit_accounts set plan_id = 'pro_no_rollover', "
                     "stripe_subscription_id = %s, subscription_status = 'past_due' where id = %s",
                     f"sub_{uuid.uuid4().hex[:12]}", account_id)
        database.call("grant_promotional_credits", p_account_id=account_id, p_amount=10,
                      p_expires_at=utc(month_start(3)).isoformat(), p_idempotency_key=new_key())
        database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=4)
        run_to_end(database, month_start(1), 1000)
    finally:
        database.sql("update public.credit_plans set rollover_cap = 0 where id = 'free'")
    assert database.sql("select source, granted, remaining from public.credit_grants "
                        "where account_id = %s and pool = 'promotional' order by expires_at",
                        account_id) == [("rollover", 3, 3), ("promotion", 10, 6)]


def test_the_reset_broadcasts_nothing_but_fires_alerts(database: Db) -> None:
    owner, account_id = database.new_user()
    database.call("deduct_credits", owner, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=3)
    database.call("set_balance_alert", owner, p_account_id=account_id, p_threshold=2, p_rearm_at=3)
    topic = f"credits:{account_id}"
    sent = database.one("select count(*) from realtime.messages where topic = %s", topic)
    assert reset(database, month_start(1))["granted"] >= 3
    assert database.balance(account_id)["available"] == 3
    assert database.one("select count(*) from realtime.messages where topic = %s", topic) == sent
    assert database.sql("select type, payload ->> 'available' from public.credit_events"
                        " where account_id = %s", account_id) == [("balance.recovered", "3")]
