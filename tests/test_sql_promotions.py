"""The promotional pool: grants with their own expiry, spent first (soonest
expiry first), expired whether or not a job runs, rollover of unused
allowance, and the sign-up bonus."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Db, expect_error, new_key, select_as, snapshot

GRANT_KEYS = {"transaction_id", "granted", "expires_at", "replayed", "balance"}


def later(**delta: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(**delta)).isoformat()


def grant(database: Db, account_id: str, amount: int, expires_at: str, key: str | None = None,
          **args: Any) -> dict[str, Any]:
    return database.call("grant_promotional_credits", p_account_id=account_id, p_amount=amount,
                         p_expires_at=expires_at, p_idempotency_key=key or new_key(), **args)


def travel(database: Db, account_id: str, days: float) -> None:
    """Move the account `days` into the future: every expiry it knows comes that much sooner
    (grants, holds and the wallet's cached next expiries, all shifted together)."""
    shift = dt.timedelta(days=days)
    database.sql("update private.grants set expires_at = expires_at - %s "
                 "where account_id = %s and pool = 'promotional'",
                 shift, account_id)
    database.sql("update public.credit_holds set expires_at = expires_at - %s "
                 "where account_id = %s and status = 'active'", shift, account_id)
    database.sql("update public.credit_wallets set promo_front_at = promo_front_at - %s, "
                 "next_hold_expiry = next_hold_expiry - %s where account_id = %s", shift, shift, account_id)


def empty_allowance(database: Db, account_id: str) -> None:
    database.call("admin_adjust_credits", p_account_id=account_id, p_pool="subscription", p_amount=-3,
                  p_reason="start from promotional credits only", p_idempotency_key=new_key())


def promo_rows(database: Db, account_id: str) -> list[tuple]:
    return [(r["type"], r["amount"], r["balance_after"]) for r in database.ledger(account_id)
            if r["pool"] == "promotional"]


def test_a_grant_adds_promotional_credits_with_their_expiry(database: Db) -> None:
    _, account_id = database.new_user()
    expires = later(days=10)
    result = grant(database, account_id, 5, expires, p_reason="launch week", p_metadata={"campaign": "w1"})
    assert set(result) == GRANT_KEYS
    assert (result["granted"], result["replayed"]) == (5, False)
    assert dt.datetime.fromisoformat(result["expires_at"]) == dt.datetime.fromisoformat(expires)
    balance = result["balance"]
    assert (balance["promotional"], balance["subscription"]) == (5, 3)
    assert (balance["total"], balance["available"]) == (8, 8)
    assert balance["next_expiry"] == {"amount": 5, "at": result["expires_at"]}
    assert balance == database.balance(account_id)
    [row] = [r for r in database.ledger(account_id) if r["pool"] == "promotional"]
    assert (row["type"], row["amount"], row["balance_after"], row["metadata"]) == (
        "promotion", 5, 5, {"campaign": "w1"})


def test_grants_replay_and_conflict_like_every_change(database: Db) -> None:
    _, account_id = database.new_user()
    expires, key = later(days=3), new_key()
    first = grant(database, account_id, 4, expires, key)
    assert grant(database, account_id, 4, expires, key) == {**first, "replayed": True}
    expect_error(grant, "PT409", "idempotency_conflict", database, account_id, 5, expires, key)
    assert database.balance(account_id)["promotional"] == 4


@pytest.mark.parametrize(("amount", "expires", "argument"), [
    (5, later(seconds=-1), "p_expires_at"),
    (5, None, "p_expires_at"),
    (0, later(days=1), "p_amount"),
    (1000000001, later(days=1), "p_amount"),
])
def test_invalid_grants_change_nothing(database: Db, amount: int, expires: str | None, argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "grant_promotional_credits",
                          p_account_id=account_id, p_amount=amount, p_expires_at=expires,
                          p_idempotency_key=new_key())
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_users_cannot_grant_themselves_credits(database: Db) -> None:
    caller, account_id = database.new_user()
    expect_error(database.call, "42501", "permission denied for function grant_promotional_credits",
                 "grant_promotional_credits", caller, p_account_id=account_id, p_amount=5,
                 p_expires_at=later(days=1), p_idempotency_key=new_key())
    assert database.balance(account_id)["promotional"] == 0


def test_spending_takes_promotional_first_soonest_expiry_first(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    grant(database, account_id, 5, later(days=20))
    soon = grant(database, account_id, 3, later(days=10))
    result = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=4)
    assert (result["from_promotional"], result["from_subscription"], result["from_purchased"]) == (4, 0, 0)
    # The soonest grant (3) was used up, one came from the later one:
    # what expires next is the later grant's 4.
    assert result["balance"]["next_expiry"]["amount"] == 4
    assert result["balance"]["next_expiry"]["at"] != soon["expires_at"]
    spend = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_amount=9)
    assert (spend["from_promotional"], spend["from_subscription"], spend["from_purchased"]) == (4, 3, 2)
    assert spend["balance"] == database.balance(account_id)
    assert spend["balance"]["next_expiry"] is None  # purchased credits never expire


def test_what_is_left_of_a_grant_expires_on_its_date_without_any_job(database: Db) -> None:
    caller, account_id = database.new_user()
    grant(database, account_id, 3, later(days=10))
    grant(database, account_id, 5, later(days=20))
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=4)
    # 3 from the first grant, 1 from the second; the first has nothing left to expire.
    travel(database, account_id, 15)
    assert database.balance(account_id)["promotional"] == 4
    travel(database, account_id, 10)
    # Reads already leave out what expired, before anything is written.
    read = database.balance(account_id)
    assert (read["promotional"], read["total"], read["next_expiry"]["amount"]) == (0, 3, 3)
    [view] = select_as(database, caller, "select promotional, total from public.credit_balances "
                                         "where account_id = %s", account_id)
    assert (view["promotional"], view["total"]) == (0, 3)
    assert [t for t, *_ in promo_rows(database, account_id)] == ["promotion", "promotion", "spend"]
    # The next write records the expiry: one row per grant, for what was left of it.
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    assert promo_rows(database, account_id)[-1] == ("expire", -4, 0)
    assert database.balance(account_id)["total"] == 2


def test_a_spend_across_grants_takes_the_slow_path_and_keeps_the_next_expiry_right(database: Db) -> None:
    caller, account_id = database.new_user()
    empty_allowance(database, account_id)
    first = grant(database, account_id, 2, later(days=5))
    second = grant(database, account_id, 10, later(days=9))
    assert first["balance"]["next_expiry"]["amount"] == 2
    result = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=5)
    assert result["balance"]["next_expiry"] == {"amount": 7, "at": second["expires_at"]}
    assert result["balance"] == database.balance(account_id)
    assert database.sql("select granted, remaining from public.credit_grants where account_id = %s "
                        "and pool = 'promotional' order by expires_at", account_id) == [(2, 0), (10, 7)]


def test_an_earlier_grant_after_spends_is_not_charged_for_them(database: Db) -> None:
    # Spends are attributed lazily; a new grant expiring sooner must not absorb
    # what was spent from a later grant before it came.
    caller, account_id = database.new_user()
    empty_allowance(database, account_id)
    grant(database, account_id, 10, later(days=30))
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=5)
    grant(database, account_id, 10, later(days=10))
    travel(database, account_id, 15)
    # The 10-day grant expires whole; the 30-day grant keeps its 5.
    assert database.balance(account_id)["promotional"] == 5


# --- rollover --------------------------------------------------------------------------

@pytest.fixture
def rollover_plan(database: Db) -> Iterator[str]:
    plan = f"roll_{new_key()[2:10]}"
    database.sql("insert into public.credit_plans (id, monthly_credits, rollover_cap) values (%s, 5, 2)",
                 plan)
    yield plan


def renew(database: Db, account_id: str, months_ahead: int) -> dict[str, Any]:
    start = dt.datetime.now(dt.UTC).date().replace(day=1)
    for _ in range(months_ahead):
        start = (start + dt.timedelta(days=32)).replace(day=1)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return database.call("add_subscription_credits", p_account_id=account_id, p_amount=5,
                         p_period_start=f"{start}T00:00:00Z", p_period_end=f"{end}T00:00:00Z",
                         p_idempotency_key=new_key())


def test_rollover_moves_up_to_the_cap_into_a_grant_expiring_with_the_new_period(
        database: Db, rollover_plan: str) -> None:
    caller, account_id = database.new_user()
    database.sql("update public.credit_accounts set plan_id = %s where id = %s", rollover_plan, account_id)
    first = renew(database, account_id, 1)
    # The sign-up month's 3 unused credits: 2 roll over, 1 expires.
    assert (first["rolled_over"], first["expired"], first["granted"]) == (2, 1, 5)
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=3)
    result = renew(database, account_id, 2)
    # Promotional first: the 2 rolled credits and 1 of the allowance were spent; of the 4 left, 2 roll over.
    assert (result["rolled_over"], result["expired"], result["granted"]) == (2, 2, 5)
    balance = result["balance"]
    assert (balance["promotional"], balance["subscription"]) == (2, 5)
    assert balance["next_expiry"] == {"amount": 7, "at": balance["period_end"]}
    # Rolled-over credits are promotional: they never roll again, only allowance does.
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    again = renew(database, account_id, 3)
    assert (again["rolled_over"], again["expired"]) == (2, 3)
    assert again["balance"]["promotional"] == 1 + 2
    rows = [(r["pool"], r["amount"]) for r in database.ledger(account_id) if r["type"] == "rollover"]
    assert sorted(rows) == sorted([("promotional", 2), ("subscription", -2)] * 3)


def test_the_monthly_reset_rolls_over_too(database: Db, rollover_plan: str) -> None:
    caller, account_id = database.new_user()
    database.sql("update public.credit_accounts set plan_id = %s where id = %s", rollover_plan, account_id)
    grant(database, account_id, 4, later(days=90))  # an open grant the rollover joins
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2)
    next_month = (dt.datetime.now(dt.UTC).date().replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    after = None
    while True:
        out = database.call("run_monthly_reset", p_period_start=next_month.isoformat(), p_batch_size=5000,
                            p_after=after)
        if out["done"]:
            break
        after = out["next_after"]
    balance = database.balance(account_id)
    # 3 allowance credits unused: 2 roll over, joining the open grant; the plan's 5 are granted.
    assert (balance["promotional"], balance["subscription"]) == (2 + 2, 5)


# --- sign-up bonus ---------------------------------------------------------------------

@pytest.fixture
def signup_bonus(database: Db) -> Iterator[None]:
    database.sql("update public.credit_plans set signup_bonus = 10, signup_bonus_days = 7 where id = 'free'")
    yield
    database.sql("update public.credit_plans set signup_bonus = 0, signup_bonus_days = 30 where id = 'free'")


@pytest.mark.usefixtures("signup_bonus")
def test_a_new_user_gets_the_signup_bonus_once(database: Db) -> None:
    caller, account_id = database.new_user()
    balance = database.balance(account_id)
    assert (balance["promotional"], balance["subscription"], balance["total"]) == (10, 3, 13)
    at = dt.datetime.fromisoformat(balance["next_expiry"]["at"])
    assert dt.timedelta(days=6.9) < at - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    assert [(r["type"], r["pool"], r["amount"]) for r in database.ledger(account_id)] == [
        ("grant", "subscription", 3), ("promotion", "promotional", 10)]
    # A tenant is no new user: its account gets the allowance only.
    _, tenant_account = database.new_tenant({caller.user_id: "owner"})  # type: ignore[dict-item]
    assert database.balance(tenant_account)["promotional"] == 0
    # Only the user's creation grants it: nothing else can make it happen again.
    assert len([r for r in database.ledger(account_id) if r["type"] == "promotion"]) == 1


def test_a_spend_across_grants_into_the_allowance_takes_every_pool_once(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    grant(database, account_id, 2, later(days=5))
    grant(database, account_id, 3, later(days=9))
    result = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=7)
    assert (result["from_promotional"], result["from_subscription"], result["from_purchased"]) == (5, 2, 0)
    balance = database.balance(account_id)
    assert (balance["promotional"], balance["subscription"], balance["purchased"]) == (0, 1, 10)
    assert result["balance"] == balance
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def _insert_user(database: Db, email: str | None, phone: str | None = None) -> str:
    user_id = str(uuid.uuid4())
    database.sql("insert into auth.users (id, email, phone, is_anonymous) values (%s, %s, %s, %s)",
                 user_id, email, phone, email is None and phone is None)
    return str(database.one("select id from public.credit_accounts where user_id = %s", user_id))


def _bonus(database: Db, account_id: str) -> int:
    return int(database.balance(account_id)["promotional"])


@pytest.mark.usefixtures("signup_bonus")
def test_the_signup_bonus_is_granted_once_per_email_address(database: Db) -> None:
    email = f"Someone.{uuid.uuid4().hex[:8]}@Example.test"
    first = _insert_user(database, email)
    assert _bonus(database, first) == 10
    # Deleted, then signed up again with the same address (in other letter case): no second bonus.
    database.sql("delete from auth.users where id = "
                 "(select user_id from public.credit_accounts where id = %s)", first)
    again = _insert_user(database, email.lower())
    assert _bonus(database, again) == 0
    assert database.balance(again)["subscription"] == 3  # the free allowance still comes
    # Another address gets its own bonus; the claims keep no address in the clear.
    assert _bonus(database, _insert_user(database, f"other.{uuid.uuid4().hex[:8]}@example.test")) == 10
    assert database.one("select count(*) from private.signup_bonus_claims "
                        "where position(convert_to(%s, 'UTF8') in identity_hash) > 0", email.lower()) == 0


@pytest.mark.usefixtures("signup_bonus")
def test_an_anonymous_user_gets_the_bonus_when_an_identity_is_first_set(database: Db) -> None:
    account_id = _insert_user(database, None)
    assert _bonus(database, account_id) == 0
    email = f"anon.{uuid.uuid4().hex[:8]}@example.test"
    database.sql("update auth.users set email = %s, is_anonymous = false "
                 "where id = (select user_id from public.credit_accounts where id = %s)", email, account_id)
    assert _bonus(database, account_id) == 10
    # A phone-only user is one identity too.
    phone = f"+1555{uuid.uuid4().int % 10**7:07d}"
    assert _bonus(database, _insert_user(database, None, phone)) == 10
    database.sql("delete from auth.users where phone = %s", phone)
    assert _bonus(database, _insert_user(database, None, phone)) == 0
