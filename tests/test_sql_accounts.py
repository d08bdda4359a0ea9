"""Accounts: opening them (signup, tenant), the balance object, get_credit_balance,
the frontend views, user deletion and the append-only ledger."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.support import Caller, Db, expect_error, new_key, select_as

BALANCE_KEYS = {"account_id", "promotional", "subscription", "purchased", "held", "debt", "available",
                "total", "period_start", "period_end", "next_expiry"}


def month_bounds() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


@pytest.fixture
def free_plan_credits(database: Db) -> Iterator[None]:
    """Lets a test change the free plan's allowance; puts it back afterwards."""
    before = database.one("select monthly_credits from public.credit_plans where id = 'free'")
    yield
    database.sql("update public.credit_plans set monthly_credits = %s where id = 'free'", before)


# --- opening accounts ------------------------------------------------------------

def test_signup_opens_a_free_account_with_its_first_month_granted(database: Db) -> None:
    caller, account_id = database.new_user()
    start, end = month_bounds()

    row = database.one("select user_id, tenant_id, plan_id from public.credit_accounts where id = %s",
                       account_id)
    assert row == (uuid.UUID(caller.user_id), None, "free")

    balance = database.balance(account_id)
    assert set(balance) == BALANCE_KEYS
    assert (balance["subscription"], balance["purchased"], balance["held"]) == (3, 0, 0)
    assert (balance["available"], balance["total"]) == (3, 3)
    assert (ts(balance["period_start"]), ts(balance["period_end"])) == (start, end)

    [grant] = database.ledger(account_id)
    assert (grant["pool"], grant["amount"], grant["balance_after"], grant["type"]) == (
        "subscription", 3, 3, "grant")
    assert (ts(grant["period_start"]), ts(grant["period_end"])) == (start, end)
    assert database.one("select kind::text, subscription from public.credit_transactions "
                        "where account_id = %s", account_id) == ("grant", 3)


def test_signup_grant_follows_the_free_plan_setting(database: Db, free_plan_credits: None) -> None:
    database.sql("update public.credit_plans set monthly_credits = 7 where id = 'free'")
    _, generous = database.new_user()
    assert database.balance(generous)["subscription"] == 7
    assert [(r["amount"], r["balance_after"]) for r in database.ledger(generous)] == [(7, 7)]

    database.sql("update public.credit_plans set monthly_credits = 0 where id = 'free'")
    _, stingy = database.new_user()
    assert database.balance(stingy)["total"] == 0
    assert database.ledger(stingy) == []  # a zero grant writes no ledger row


def test_each_user_gets_exactly_one_personal_account(database: Db) -> None:
    caller, _ = database.new_user()
    assert database.one("select count(*) from public.credit_accounts where user_id = %s",
                        caller.user_id) == 1
    with pytest.raises(psycopg.errors.UniqueViolation):
        database.sql("insert into public.credit_accounts (user_id) values (%s)", caller.user_id)


def test_an_account_belongs_to_exactly_one_user_or_tenant(database: Db) -> None:
    caller, _ = database.new_user()
    tenant_id, _ = database.new_tenant()
    with pytest.raises(psycopg.errors.CheckViolation):
        database.sql("insert into public.credit_accounts (user_id, tenant_id) values (%s, %s)",
                     caller.user_id, tenant_id)
    with pytest.raises(psycopg.errors.CheckViolation):
        database.sql("insert into public.credit_accounts (plan_id) values ('free')")


def test_creating_a_tenant_opens_its_account(database: Db) -> None:
    owner, owner_account = database.new_user()
    tenant_id, account_id = database.new_tenant({owner.user_id: "owner"})
    assert account_id != owner_account
    row = database.one("select user_id, tenant_id, plan_id from public.credit_accounts where id = %s",
                       account_id)
    assert row == (None, uuid.UUID(tenant_id), "free")
    balance = database.balance(account_id)
    assert (balance["subscription"], balance["purchased"], balance["available"]) == (3, 0, 3)
    assert [(r["pool"], r["amount"], r["type"]) for r in database.ledger(account_id)] == [
        ("subscription", 3, "grant")]
    # The owner's personal account is a separate purse.
    assert database.balance(owner_account)["total"] == 3


# --- the balance object and get_credit_balance -------------------------------------

def test_balance_object_adds_up_with_both_pools_and_a_hold(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                  p_amount=2)
    balance = database.call("get_credit_balance", caller, p_account_id=account_id)
    assert balance == {**balance, "account_id": account_id, "subscription": 3, "purchased": 10,
                       "held": 2, "total": 13, "available": 11}


def test_get_credit_balance_without_an_id_reads_the_callers_personal_account(database: Db) -> None:
    caller, account_id = database.new_user()
    database.new_tenant({caller.user_id: "owner"})
    database.fund(account_id, purchased=4)
    mine = database.call("get_credit_balance", caller)
    assert mine["account_id"] == account_id
    assert mine["total"] == 7


def test_get_credit_balance_for_service_requires_an_account(database: Db) -> None:
    detail = expect_error(database.call, "22023", "invalid_argument", "get_credit_balance", Caller.service())
    assert detail["argument"] == "p_account_id"


def test_get_credit_balance_of_an_unknown_account(database: Db) -> None:
    caller, _ = database.new_user()
    missing = str(uuid.uuid4())
    expect_error(database.call, "PT404", "account_not_found", "get_credit_balance", Caller.service(),
                 p_account_id=missing)
    expect_error(database.call, "PT404", "account_not_found", "get_credit_balance", caller,
                 p_account_id=missing)


def test_any_tenant_member_reads_the_tenant_balance(database: Db) -> None:
    member, _ = database.new_user()
    _, account_id = database.new_tenant({member.user_id: "member"})
    database.fund(account_id, purchased=20)
    balance = database.call("get_credit_balance", member, p_account_id=account_id)
    assert (balance["account_id"], balance["total"]) == (account_id, 23)
    stranger, _ = database.new_user()
    expect_error(database.call, "PT403", "forbidden", "get_credit_balance", stranger, p_account_id=account_id)


def test_reading_a_balance_changes_nothing(database: Db) -> None:
    caller, account_id = database.new_user()
    rows = len(database.ledger(account_id))
    for _ in range(3):
        database.call("get_credit_balance", caller)
    assert len(database.ledger(account_id)) == rows
    assert database.one("select count(*) from public.credit_transactions where account_id = %s",
                        account_id) == 1


# --- views -----------------------------------------------------------------------

def test_credit_balances_view_matches_get_credit_balance(database: Db) -> None:
    caller, account_id = database.new_user()
    _, tenant_account = database.new_tenant({caller.user_id: "member"})
    database.new_user()  # someone else's account must stay invisible
    database.fund(account_id, purchased=5)
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=4)

    rows = select_as(database, caller, "select * from public.credit_balances order by account_id")
    assert sorted(str(r["account_id"]) for r in rows) == sorted([account_id, tenant_account])
    for row in rows:
        expected = database.balance(str(row["account_id"]))
        for key in ("subscription", "purchased", "held", "available", "total"):
            assert row[key] == expected[key], key
        assert row["period_start"] == ts(expected["period_start"])
    own = next(r for r in rows if str(r["account_id"]) == account_id)
    assert (own["user_id"], own["tenant_id"], own["plan_id"]) == (uuid.UUID(caller.user_id), None, "free")
    assert (own["held"], own["available"], own["total"]) == (4, 4, 8)


def test_credit_usage_logs_each_spend_with_its_operation_and_tokens(database: Db) -> None:
    owner, _ = database.new_user()
    tenant_id, account_id = database.new_tenant({owner.user_id: "owner"})
    database.fund(account_id, purchased=5)
    database.sql("insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens) "
                 "values (%s, 1, 1) on conflict (operation) do nothing", "acct-usage-op")
    spend = database.call("deduct_credits", owner, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_operation="acct-usage-op", p_model="m-large", p_input_tokens=1500,
                          p_output_tokens=10, p_metadata={"job": "j1"})
    hold = database.call("reserve_credits", owner, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=1)
    database.call("capture_hold", owner, p_hold_id=hold["hold_id"])
    database.call("refund_credits", p_transaction_id=spend["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=1)

    rows = select_as(database, owner, "select * from public.credit_usage where tenant_id = %s "
                     "order by created_at", tenant_id)
    assert len(rows) == 2
    first, second = rows
    assert str(first["transaction_id"]) == spend["transaction_id"]
    assert (first["operation"], first["model"], first["input_tokens"], first["output_tokens"]) == (
        "acct-usage-op", "m-large", 1500, 10)
    assert (first["credits"], first["refunded"], first["metadata"]) == (3, 1, {"job": "j1"})
    assert first["actor_id"] == uuid.UUID(owner.user_id)
    assert first["user_id"] is None
    assert (second["credits"], second["operation"]) == (1, None)
    # A stranger sees none of it.
    stranger, _ = database.new_user()
    assert select_as(database, stranger, "select * from public.credit_usage where tenant_id = %s",
                     tenant_id) == []


def test_credit_pool_usage_per_period(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2)
    start, end = month_bounds()
    next_end = (end + dt.timedelta(days=32)).replace(day=1)
    database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                  p_period_start=end.isoformat(), p_period_end=next_end.isoformat(),
                  p_idempotency_key=new_key())
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=4)

    rows = select_as(database, caller, "select * from public.credit_pool_usage where account_id = %s "
                     "order by period_start", account_id)
    got = [(r["period_start"], r["period_end"], r["total_credits"], r["used_credits"], r["expired_credits"])
           for r in rows]
    assert got == [(start, end, 3, 2, 1), (end, next_end, 10, 4, 0)]
    assert all(r["tenant_id"] is None for r in rows)


# --- deletion and immutability ---------------------------------------------------

def test_deleting_a_user_removes_the_personal_account_and_its_rows(database: Db) -> None:
    caller, account_id = database.new_user()
    _, tenant_account = database.new_tenant({caller.user_id: "owner"})
    database.fund(account_id, purchased=5)
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    database.call("create_license_key", caller, p_account_id=account_id, p_name="laptop")
    database.call("deduct_credits", caller, p_account_id=tenant_account, p_idempotency_key=new_key(),
                  p_amount=1)
    tenant_rows = len(database.ledger(tenant_account))

    database.sql("delete from auth.users where id = %s", caller.user_id)

    for table in ("credit_accounts", "credit_ledger", "credit_transactions", "credit_holds",
                  "credit_license_keys"):
        column = "id" if table == "credit_accounts" else "account_id"
        left = database.one(f"select count(*) from public.{table} where {column} = %s", account_id)
        assert left == 0, table
    assert database.one("select count(*) from public.tenant_members where user_id = %s", caller.user_id) == 0
    # The tenant's purse is not the user's: it and its history stay.
    assert database.balance(tenant_account)["total"] == 2
    assert len(database.ledger(tenant_account)) == tenant_rows


def test_the_ledger_is_append_only_even_for_the_owner(database: Db) -> None:
    _, account_id = database.new_user()
    before = database.ledger(account_id)
    # The ledger view reads credit_transactions, where every row lives.
    for statement in ("update public.credit_transactions set purchased = 100 where account_id = %s",
                      "delete from public.credit_transactions where account_id = %s"):
        expect_error(database.sql, "42501", "credit_transactions is append-only", statement, account_id)
    expect_error(database.sql, "42501", "credit_transactions is append-only",
                 "truncate public.credit_transactions")
    assert database.ledger(account_id) == before



def test_reconcile_finds_a_balance_the_ledger_does_not_explain(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    clean = database.call("reconcile_credit_balances")
    assert clean["mismatches"] == []
    # Per account: three pools and debt against the ledger, three held counters, three pools against
    # their grants, and debt left unpaid beside free credits.
    assert clean["checked"] == 11 * database.one("select count(*) from public.credit_accounts")
    # Tamper behind the functions' back (as only the database owner could), then put it right.
    database.sql("update public.credit_wallets set purchased = 5, subscription = 3, held_subscription = 0 "
                 "where account_id = %s", account_id)
    try:
        found = database.call("reconcile_credit_balances")["mismatches"]
    finally:
        database.sql("update public.credit_wallets set purchased = 0, held_subscription = 1 "
                     "where account_id = %s", account_id)
    assert sorted(found, key=lambda m: m["pool"]) == [
        # Purchased credits with no grant behind them, and no ledger row.
        {"account_id": account_id, "pool": "grants_purchased", "balance": 5, "ledger": 0},
        {"account_id": account_id, "pool": "held_subscription", "balance": 0, "ledger": 1},
        {"account_id": account_id, "pool": "purchased", "balance": 5, "ledger": 0},
    ]
    assert database.call("reconcile_credit_balances")["mismatches"] == []
