"""Holds (v3): holds priced from tokens, overage policies (reject, if_available,
overdraft), debt and how arriving credits pay it, extend_hold and
estimate_cost, called as the REST layer calls them."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.support import Caller, Db, expect_error, new_key, select_as, snapshot

HOLD_KEYS = {"hold_id", "account_id", "amount", "expires_at", "overage", "replayed", "balance"}
CAPTURE_KEYS = {"transaction_id", "hold_id", "requested", "charged", "released", "uncovered", "debt_added",
                "from_promotional", "from_subscription", "from_purchased", "replayed", "balance"}
EXTEND_KEYS = {"hold_id", "amount", "expires_at", "replayed", "balance"}
ESTIMATE_KEYS = {"cost", "available", "affordable", "max_output_tokens", "limit_remaining"}

# Operations priced for this module: (flat credits, per 1k input tokens, per 1k output tokens).
PRICES = {
    "v3-llm": (1, 1, 2),
    "v3-tokens-only": (0, 1, 2),   # costs nothing without tokens (not marked free)
    "v3-flat": (4, 0, 0),          # no output rate
    "v3-repriced": (1, 1, 2),      # changed by one test after its hold is made
}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    for operation, (credits, rate_in, rate_out) in PRICES.items():
        database.sql(
            "insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
            "credits_per_1k_output_tokens) values (%s, %s, %s, %s) on conflict (operation) do nothing",
            operation, credits, rate_in, rate_out)


# --- helpers --------------------------------------------------------------------------

def reserve(database: Db, caller: Caller, account_id: str, key: str | None = None, **args: Any) -> Any:
    return database.call("reserve_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key(), **args)


def capture(database: Db, caller: Caller, hold_id: str, **args: Any) -> Any:
    return database.call("capture_hold", caller, p_hold_id=hold_id, **args)


def extend(database: Db, caller: Caller, hold_id: str, key: str | None = None, **args: Any) -> Any:
    return database.call("extend_hold", caller, p_hold_id=hold_id, p_idempotency_key=key or new_key(), **args)


def estimate(database: Db, caller: Caller, account_id: str | None, **args: Any) -> Any:
    return database.call("estimate_cost", caller, p_account_id=account_id, **args)


def lapse(database: Db, hold_id: str) -> None:
    """Move a hold's expiry into the past, as if its ttl had run out (the
    account's cached next expiry moves with it, as it would have been)."""
    database.sql("update public.credit_holds set expires_at = now() - interval '1 second' where id = %s",
                 hold_id)
    database.sql("update public.credit_wallets w set next_hold_expiry = now() - interval '1 second' "
                 "from public.credit_holds h where h.id = %s and w.account_id = h.account_id", hold_id)


def hold_row(database: Db, hold_id: str) -> tuple[str, int]:
    return database.one("select status, amount from public.credit_holds where id = %s", hold_id)


def set_overdraft_limit(database: Db, account_id: str, limit: int) -> None:
    database.sql("update public.credit_accounts set overdraft_limit = %s where id = %s", limit, account_id)


def rows(database: Db, account_id: str, *types: str) -> list[tuple]:
    """(type, pool, amount) of the account's ledger rows, of the given types (all if none)."""
    return [(r["type"], r["pool"], r["amount"]) for r in database.ledger(account_id)
            if not types or r["type"] in types]


def debt_rows(database: Db, account_id: str) -> list[tuple]:
    return [(r["type"], r["amount"], r["balance_after"]) for r in database.ledger(account_id)
            if r["pool"] == "debt"]


def check_figures(result: dict[str, Any], held: int) -> None:
    """The contract's arithmetic of a capture's answer."""
    assert set(result) == CAPTURE_KEYS
    assert result["charged"] == (result["from_promotional"] + result["from_subscription"]
                                 + result["from_purchased"] + result["debt_added"])
    assert result["uncovered"] == result["requested"] - result["charged"]
    assert result["released"] == held - min(result["requested"], held)
    assert min(result["charged"], result["uncovered"], result["debt_added"], result["released"]) >= 0


def usage(database: Db, transaction_id: str) -> dict[str, Any]:
    rows_ = database.sql("select to_jsonb(u) from public.credit_usage u where transaction_id = %s",
                         transaction_id)
    assert len(rows_) == 1, rows_
    return rows_[0][0]


def assert_books_balance(database: Db) -> None:
    result = database.call("reconcile_credit_balances")
    assert result["mismatches"] == [], result


def in_debt(database: Db, debt: int = 5) -> tuple[Caller, str, dict[str, Any]]:
    """A user whose 3 allowance credits went to an overdraft capture of 3 + ``debt``
    (limit ``debt``): nothing left, ``debt`` owed. Returns (caller, account, capture)."""
    caller, account_id = database.new_user()
    set_overdraft_limit(database, account_id, debt)
    hold = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    captured = capture(database, caller, hold["hold_id"], p_amount=3 + debt)
    assert (captured["charged"], captured["debt_added"], captured["uncovered"]) == (3 + debt, debt, 0)
    balance = database.balance(account_id)
    assert (balance["total"], balance["debt"], balance["available"]) == (0, debt, 0)
    return caller, account_id, captured


# --- reserve --------------------------------------------------------------------------

def test_reserve_answers_its_overage_policy_and_a_debt_free_balance(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    assert database.balance(account_id)["debt"] == 0
    default = reserve(database, caller, account_id, p_amount=1)
    assert set(default) == HOLD_KEYS
    assert (default["overage"], default["replayed"], default["amount"]) == ("reject", False, 1)
    assert default["balance"]["debt"] == 0
    assert default["balance"] == database.balance(account_id)
    lenient = reserve(database, caller, account_id, p_amount=1, p_overage="if_available")
    assert lenient["overage"] == "if_available"
    served = reserve(database, Caller.service(), account_id, p_amount=1, p_overage="overdraft")
    assert served["overage"] == "overdraft"
    balance = database.balance(account_id)
    assert (balance["held"], balance["available"], balance["debt"]) == (3, 10, 0)
    [row] = select_as(database, caller, "select debt from public.credit_balances where account_id = %s",
                      account_id)
    assert row["debt"] == 0


def test_reserve_replays_its_overage_and_conflicts_on_another(database: Db) -> None:
    caller, account_id = database.new_user()
    key = new_key()
    first = reserve(database, caller, account_id, key, p_amount=1, p_overage="if_available")
    after = snapshot(database, account_id)
    assert reserve(database, caller, account_id, key, p_amount=1, p_overage="if_available") == {
        **first, "replayed": True}
    for other in ("reject", "overdraft"):
        expect_error(reserve, "PT409", "idempotency_conflict", database, Caller.service(), account_id, key,
                     p_amount=1, p_overage=other)
    assert snapshot(database, account_id) == after


@pytest.mark.parametrize("overage", ["sometimes", "", "Overdraft", "allow"])
def test_an_unknown_overage_policy_is_invalid(database: Db, overage: str) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    for who in (caller, Caller.service()):
        detail = expect_error(reserve, "22023", "invalid_argument", database, who, account_id,
                              p_amount=1, p_overage=overage)
        assert detail["argument"] == "p_overage"
    assert snapshot(database, account_id) == before


def test_only_the_service_may_reserve_with_overdraft(database: Db) -> None:
    caller, account_id = database.new_user()
    owner, _ = database.new_user()
    _, tenant_account = database.new_tenant({owner.user_id: "owner"})  # type: ignore[dict-item]
    database.fund(tenant_account, purchased=5)
    before = snapshot(database, account_id)
    tenant_before = snapshot(database, tenant_account)
    expect_error(reserve, "PT403", "forbidden", database, caller, account_id, p_amount=1,
                 p_overage="overdraft")
    expect_error(reserve, "PT403", "forbidden", database, owner, tenant_account, p_amount=1,
                 p_overage="overdraft")
    assert snapshot(database, account_id) == before
    assert snapshot(database, tenant_account) == tenant_before
    # Nor may a user raise their own overdraft limit; the service may.
    for who, limit in ((caller, 100), (Caller.service(), 7)):
        try:
            with database.conn.transaction():
                database.conn.execute(f"set local role {who.role}")
                database.conn.execute("select set_config('request.jwt.claims', %s, true)",
                                      (json.dumps(who.claims),))
                database.conn.execute("update public.credit_accounts set overdraft_limit = %s where id = %s",
                                      (limit, account_id))
        except psycopg.Error:
            pass
    assert database.one("select overdraft_limit from public.credit_accounts where id = %s", account_id) == 7
    # The service makes overdraft holds.
    assert reserve(database, Caller.service(), account_id, p_amount=1, p_overage="overdraft")["overage"] == (
        "overdraft")


@pytest.mark.parametrize(("tokens", "amount"), [
    ({"p_input_tokens": 1000, "p_output_tokens": 1000}, 4),   # 1 + 1 + 2
    ({"p_input_tokens": 1500, "p_output_tokens": 250}, 3),    # 1 + 1.5 + 0.5: the total is rounded up
    ({"p_input_tokens": 1, "p_output_tokens": 1}, 2),         # 1.003 -> 2
    ({}, 1),                                                  # the flat price alone
])
def test_a_priced_reserve_holds_the_cost_of_the_estimate(database: Db, tokens: dict[str, int],
                                                         amount: int) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_model="gpt-est", **tokens)
    assert (hold["amount"], hold["overage"]) == (amount, "reject")
    assert (hold["balance"]["held"], hold["balance"]["available"]) == (amount, 13 - amount)
    assert hold_row(database, hold["hold_id"]) == ("active", amount)


@pytest.mark.parametrize(("held_first", "tokens", "detail"), [
    # available 3: 1 + 2n/1000 <= 3
    (0, {"p_output_tokens": 5000}, {"required": 11, "available": 3, "max_output_tokens": 1000}),
    # 1 + 1.5 + 2n/1000 <= 3: the total is rounded, not each rate
    (0, {"p_input_tokens": 1500, "p_output_tokens": 5000},
     {"required": 13, "available": 3, "max_output_tokens": 250}),
    # 2.001 + 2n/1000 <= 3
    (0, {"p_input_tokens": 1001, "p_output_tokens": 2000},
     {"required": 7, "available": 3, "max_output_tokens": 499}),
    # the input alone does not fit
    (0, {"p_input_tokens": 5000, "p_output_tokens": 1},
     {"required": 7, "available": 3, "max_output_tokens": 0}),
    # what other holds reserve is not available
    (2, {"p_output_tokens": 3000}, {"required": 7, "available": 1, "max_output_tokens": 0}),
    (1, {"p_output_tokens": 3000}, {"required": 7, "available": 2, "max_output_tokens": 500}),
])
def test_a_priced_reserve_that_does_not_fit_says_how_many_output_tokens_would(
        database: Db, held_first: int, tokens: dict[str, int], detail: dict[str, int]) -> None:
    caller, account_id = database.new_user()
    if held_first:
        reserve(database, caller, account_id, p_amount=held_first)
    before = snapshot(database, account_id)
    assert expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id,
                        p_operation="v3-llm", **tokens) == detail
    assert snapshot(database, account_id) == before
    # The advice is right: that many output tokens fit, one more does not.
    most = detail["max_output_tokens"]
    if most:
        fits = estimate(database, caller, account_id, p_operation="v3-llm",
                        **{**tokens, "p_output_tokens": most})
        assert (fits["cost"] <= detail["available"], fits["affordable"]) == (True, True)
    over = estimate(database, caller, account_id, p_operation="v3-llm",
                    **{**tokens, "p_output_tokens": most + 1})
    assert (over["cost"] > detail["available"], over["affordable"]) == (True, False)


def test_a_reserve_without_an_output_rate_advises_no_output_tokens(database: Db) -> None:
    caller, account_id = database.new_user()
    detail = expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id,
                          p_operation="v3-flat", p_output_tokens=10)
    assert (detail["required"], detail["available"], detail.get("max_output_tokens")) == (4, 3, None)
    # An unpriced reserve's refusal is as before.
    assert expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id,
                        p_amount=4) == {"required": 4, "available": 3}


# --- capture priced from tokens ---------------------------------------------------------

def test_capture_prices_the_actual_tokens_and_logs_the_model_used(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_model="gpt-est",
                   p_input_tokens=1000, p_output_tokens=1000)
    assert hold["amount"] == 4
    result = capture(database, caller, hold["hold_id"], p_input_tokens=500, p_output_tokens=250,
                     p_model="gpt-real")
    check_figures(result, 4)
    assert (result["requested"], result["charged"], result["released"], result["uncovered"],
            result["debt_added"], result["from_subscription"], result["replayed"]) == (
        2, 2, 2, 0, 0, 2, False)
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["available"], balance["debt"]) == (11, 0, 11, 0)
    assert balance == database.balance(account_id)
    assert rows(database, account_id, "spend") == [("spend", "subscription", -2)]
    row = usage(database, result["transaction_id"])
    assert (row["operation"], row["model"], row["credits"], row["input_tokens"], row["output_tokens"]) == (
        "v3-llm", "gpt-real", 2, 500, 250)
    assert hold_row(database, hold["hold_id"]) == ("captured", 4)


@pytest.mark.parametrize(("tokens", "requested"), [
    ({"p_output_tokens": 250}, 3),     # input from the estimate: 1 + 1 + 0.5 = 2.5 -> 3
    ({"p_input_tokens": 0}, 3),        # output from the estimate: 1 + 0 + 2
    ({"p_input_tokens": 3000}, None),  # above the hold (6): refused, see the overage tests
    ({}, 4),                           # neither: the whole hold
])
def test_a_missing_token_count_is_priced_from_the_holds_estimate(database: Db, tokens: dict[str, int],
                                                                 requested: int | None) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_input_tokens=1000,
                   p_output_tokens=1000)
    if requested is None:
        before = snapshot(database, account_id)
        expect_error(capture, "22023", "invalid_argument", database, caller, hold["hold_id"], **tokens)
        assert snapshot(database, account_id) == before
        return
    result = capture(database, caller, hold["hold_id"], **tokens)
    check_figures(result, 4)
    assert (result["requested"], result["charged"], result["released"]) == (
        requested, requested, 4 - requested)
    assert result["balance"]["total"] == 13 - requested


def test_the_price_is_fixed_when_the_hold_is_made(database: Db) -> None:
    database.sql("update public.credit_prices set credits = 1, credits_per_1k_input_tokens = 1, "
                 "credits_per_1k_output_tokens = 2 where operation = 'v3-repriced'")
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=50)
    hold = reserve(database, caller, account_id, p_operation="v3-repriced", p_input_tokens=1000,
                   p_output_tokens=1000)
    assert hold["amount"] == 4
    # The operator raises the price while the work runs.
    database.sql("update public.credit_prices set credits = 10, credits_per_1k_input_tokens = 10, "
                 "credits_per_1k_output_tokens = 10 where operation = 'v3-repriced'")
    result = capture(database, caller, hold["hold_id"], p_input_tokens=1000, p_output_tokens=500)
    # 1 + 1 + 1 at the old price
    assert (result["requested"], result["charged"], result["released"]) == (3, 3, 1)
    assert result["balance"]["total"] == 53 - 3
    # A new spend pays the new price.
    spend = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_operation="v3-repriced", p_input_tokens=1000, p_output_tokens=500)
    assert spend["charged"] == 25


def test_a_capture_that_costs_nothing_releases_everything(database: Db) -> None:
    caller, account_id = database.new_user()
    ledger_before = database.ledger(account_id)
    hold = reserve(database, caller, account_id, p_operation="v3-tokens-only", p_input_tokens=2000)
    assert hold["amount"] == 2
    result = capture(database, caller, hold["hold_id"], p_input_tokens=0, p_output_tokens=0)
    check_figures(result, 2)
    assert (result["requested"], result["charged"], result["released"], result["uncovered"],
            result["debt_added"]) == (0, 0, 2, 0, 0)
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["available"]) == (3, 0, 3)
    assert balance == database.balance(account_id)
    assert database.ledger(account_id) == ledger_before  # nothing was spent
    assert hold_row(database, hold["hold_id"])[0] == "captured"
    after = snapshot(database, account_id)
    assert capture(database, caller, hold["hold_id"], p_input_tokens=0, p_output_tokens=0) == {
        **result, "replayed": True}
    assert expect_error(database.call, "PT409", "hold_not_active", "release_hold", caller,
                        p_hold_id=hold["hold_id"]) == {"status": "captured"}
    assert snapshot(database, account_id) == after


def test_capture_takes_an_amount_or_tokens_never_both_and_tokens_only_on_a_priced_hold(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    priced = reserve(database, caller, account_id, p_operation="v3-llm", p_input_tokens=1000,
                     p_output_tokens=1000)
    plain = reserve(database, caller, account_id, p_amount=3)
    before = snapshot(database, account_id)
    for args in ({"p_amount": 2, "p_output_tokens": 10}, {"p_amount": 2, "p_input_tokens": 10}):
        expect_error(capture, "22023", "invalid_argument", database, caller, priced["hold_id"], **args)
    for args in ({"p_output_tokens": 10}, {"p_input_tokens": 10}, {"p_amount": 1, "p_input_tokens": 10}):
        expect_error(capture, "22023", "invalid_argument", database, caller, plain["hold_id"], **args)
    for argument in ("p_output_tokens", "p_input_tokens"):
        detail = expect_error(capture, "22023", "invalid_argument", database, caller, priced["hold_id"],
                              **{argument: -1})
        assert detail["argument"] == argument
    assert snapshot(database, account_id) == before
    assert hold_row(database, priced["hold_id"]) == ("active", 4)
    assert hold_row(database, plain["hold_id"]) == ("active", 3)
    # Both holds can still be captured as the contract allows.
    assert capture(database, caller, priced["hold_id"], p_output_tokens=500)["charged"] == 3  # 1 + 1 + 1
    assert capture(database, caller, plain["hold_id"], p_amount=2)["charged"] == 2


# --- overage policies ---------------------------------------------------------------------

def test_reject_refuses_a_capture_above_the_hold_and_keeps_it_active(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_output_tokens=1000)  # 3
    assert hold["overage"] == "reject"
    before = snapshot(database, account_id)
    for args in ({"p_output_tokens": 2000}, {"p_input_tokens": 1}, {"p_amount": 4}):
        detail = expect_error(capture, "22023", "invalid_argument", database, caller, hold["hold_id"], **args)
        assert "argument" in detail
    assert snapshot(database, account_id) == before
    assert hold_row(database, hold["hold_id"]) == ("active", 3)
    result = capture(database, caller, hold["hold_id"], p_output_tokens=1000)
    assert (result["requested"], result["charged"], result["uncovered"], result["released"]) == (3, 3, 0, 0)


def test_if_available_charges_the_hold_and_what_is_available_and_writes_off_the_rest(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=7)  # 10 in all
    hold = reserve(database, caller, account_id, p_amount=4, p_overage="if_available")
    other = reserve(database, caller, account_id, p_amount=3)
    assert hold["balance"]["available"] == 6
    result = capture(database, caller, hold["hold_id"], p_amount=9)
    check_figures(result, 4)
    assert (result["requested"], result["charged"], result["uncovered"], result["debt_added"],
            result["released"]) == (9, 7, 2, 0, 0)
    assert (result["from_subscription"], result["from_purchased"]) == (3, 4)
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["available"], balance["debt"]) == (3, 3, 0, 0)
    assert balance == database.balance(account_id)
    assert sum(amount for _, _, amount in rows(database, account_id, "spend")) == -7
    assert debt_rows(database, account_id) == []
    assert usage(database, result["transaction_id"])["credits"] == 7
    # The other hold was not touched: it is captured in full.
    assert capture(database, caller, other["hold_id"])["charged"] == 3
    assert database.balance(account_id)["total"] == 0


def test_if_available_charges_everything_when_there_is_enough(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_amount=2, p_overage="if_available")
    result = capture(database, caller, hold["hold_id"], p_amount=5)
    check_figures(result, 2)
    assert (result["requested"], result["charged"], result["uncovered"], result["released"]) == (5, 5, 0, 0)
    priced = reserve(database, caller, account_id, p_operation="v3-llm", p_output_tokens=1000,
                     p_overage="if_available")  # 3
    result = capture(database, caller, priced["hold_id"], p_output_tokens=3000, p_model="m")  # 1 + 6
    check_figures(result, 3)
    assert (result["requested"], result["charged"], result["uncovered"]) == (7, 7, 0)
    assert result["balance"]["total"] == 13 - 5 - 7
    assert usage(database, result["transaction_id"])["credits"] == 7


def test_if_available_with_nothing_available_charges_the_hold_only(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=3, p_overage="if_available")
    result = capture(database, caller, hold["hold_id"], p_amount=5)
    check_figures(result, 3)
    assert (result["requested"], result["charged"], result["uncovered"], result["debt_added"]) == (5, 3, 2, 0)
    assert (result["balance"]["total"], result["balance"]["debt"]) == (0, 0)


def test_overdraft_turns_the_shortfall_into_debt_up_to_the_limit(database: Db) -> None:
    caller, account_id = database.new_user()
    set_overdraft_limit(database, account_id, 5)
    hold = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    assert hold["balance"]["available"] == 1
    result = capture(database, caller, hold["hold_id"], p_amount=10)
    check_figures(result, 2)
    assert (result["requested"], result["charged"], result["debt_added"], result["uncovered"],
            result["released"]) == (10, 8, 5, 2, 0)
    assert (result["from_promotional"], result["from_subscription"], result["from_purchased"]) == (0, 3, 0)
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["debt"], balance["available"]) == (0, 0, 5, 0)
    assert balance == database.balance(account_id)
    assert debt_rows(database, account_id) == [("overdraft", 5, 5)]
    assert rows(database, account_id, "spend") == [("spend", "subscription", -3)]
    assert usage(database, result["transaction_id"])["credits"] == 8  # usage counts what was charged
    [row] = select_as(database, caller, "select debt, available from public.credit_balances "
                                        "where account_id = %s", account_id)
    assert (row["debt"], row["available"]) == (5, 0)
    assert_books_balance(database)
    # Replays answer the same, and the debt is not made twice.
    assert capture(database, caller, hold["hold_id"], p_amount=10) == {**result, "replayed": True}
    assert debt_rows(database, account_id) == [("overdraft", 5, 5)]


def test_overdraft_within_the_limit_covers_everything(database: Db) -> None:
    _, account_id = database.new_user()
    set_overdraft_limit(database, account_id, 100)
    hold = reserve(database, Caller.service(), account_id, p_operation="v3-llm", p_output_tokens=500,
                   p_overage="overdraft")  # 2
    result = capture(database, Caller.service(), hold["hold_id"], p_output_tokens=3000)  # 7
    check_figures(result, 2)
    assert (result["requested"], result["charged"], result["debt_added"], result["uncovered"]) == (7, 7, 4, 0)
    assert (result["balance"]["debt"], result["balance"]["total"]) == (4, 0)


def test_overdraft_with_the_default_limit_is_if_available(database: Db) -> None:
    caller, account_id = database.new_user()
    assert database.one("select overdraft_limit from public.credit_accounts where id = %s", account_id) == 0
    hold = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    result = capture(database, caller, hold["hold_id"], p_amount=6)
    check_figures(result, 2)
    assert (result["charged"], result["debt_added"], result["uncovered"]) == (3, 0, 3)
    assert result["balance"]["debt"] == 0
    assert debt_rows(database, account_id) == []


def test_the_limit_caps_the_debt_not_each_capture(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)  # 13
    set_overdraft_limit(database, account_id, 5)
    first = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    second = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    result = capture(database, caller, first["hold_id"], p_amount=14)  # 2 held + 9 available + 3 owed
    check_figures(result, 2)
    assert (result["charged"], result["debt_added"], result["uncovered"]) == (14, 3, 0)
    result = capture(database, caller, second["hold_id"], p_amount=7)  # 2 held + 0 available + 5 missing
    check_figures(result, 2)
    assert (result["charged"], result["debt_added"], result["uncovered"]) == (4, 2, 3)
    balance = result["balance"]
    assert (balance["total"], balance["debt"], balance["available"]) == (0, 5, 0)
    assert debt_rows(database, account_id) == [("overdraft", 3, 3), ("overdraft", 2, 5)]


# --- debt ---------------------------------------------------------------------------------

def test_arriving_credits_pay_the_debt_first(database: Db) -> None:
    _, account_id, _ = in_debt(database, 5)
    paid = database.call("add_purchased_credits", p_account_id=account_id, p_amount=3,
                         p_idempotency_key=new_key())
    assert paid["added"] == 3
    balance = paid["balance"]
    assert (balance["purchased"], balance["debt"], balance["available"], balance["total"]) == (0, 2, 0, 0)
    assert balance == database.balance(account_id)
    tail = rows(database, account_id)[-3:]
    assert sorted(tail) == sorted([("purchase", "purchased", 3), ("debt_payment", "purchased", -3),
                                   ("debt_payment", "debt", -3)])
    assert_books_balance(database)

    paid = database.call("add_purchased_credits", p_account_id=account_id, p_amount=10,
                         p_idempotency_key=new_key())
    balance = paid["balance"]
    assert (balance["purchased"], balance["debt"], balance["available"], balance["total"]) == (8, 0, 8, 8)
    assert sorted(rows(database, account_id)[-3:]) == sorted([
        ("purchase", "purchased", 10), ("debt_payment", "purchased", -2), ("debt_payment", "debt", -2)])
    assert debt_rows(database, account_id) == [("overdraft", 5, 5), ("debt_payment", -3, 2),
                                               ("debt_payment", -2, 0)]
    # Once paid, nothing more is taken.
    again = database.call("add_purchased_credits", p_account_id=account_id, p_amount=1,
                          p_idempotency_key=new_key())
    assert (again["balance"]["purchased"], again["balance"]["debt"]) == (9, 0)
    assert rows(database, account_id)[-1] == ("purchase", "purchased", 1)
    assert_books_balance(database)


def test_a_promotional_grant_pays_the_debt_too(database: Db) -> None:
    _, account_id, _ = in_debt(database, 5)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).isoformat()
    granted = database.call("grant_promotional_credits", p_account_id=account_id, p_amount=7,
                            p_expires_at=expires, p_idempotency_key=new_key())
    balance = granted["balance"]
    assert (balance["promotional"], balance["debt"], balance["available"]) == (2, 0, 2)
    assert ("debt_payment", "promotional", -5) in rows(database, account_id, "debt_payment")
    assert debt_rows(database, account_id)[-1] == ("debt_payment", -5, 0)
    assert_books_balance(database)


def test_a_debt_leaves_nothing_to_spend(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)  # 13
    set_overdraft_limit(database, account_id, 5)
    first = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    other = reserve(database, caller, account_id, p_amount=10)
    captured = capture(database, caller, first["hold_id"], p_amount=8)  # 2 held + 1 available + 5 debt
    assert (captured["charged"], captured["debt_added"], captured["uncovered"]) == (8, 5, 0)
    balance = database.balance(account_id)
    assert (balance["total"], balance["held"], balance["debt"], balance["available"]) == (10, 10, 5, 0)
    before = snapshot(database, account_id)
    assert expect_error(database.call, "PT402", "insufficient_credits", "deduct_credits", caller,
                        p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1) == {
        "required": 1, "available": 0}
    expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id, p_amount=1)
    cost = estimate(database, caller, account_id, p_amount=1)
    assert (cost["available"], cost["affordable"]) == (0, False)
    assert snapshot(database, account_id) == before
    # Releasing the other hold frees credits: they pay the debt first.
    released = database.call("release_hold", caller, p_hold_id=other["hold_id"])
    assert released["released"] == 10
    balance = released["balance"]
    assert (balance["total"], balance["held"], balance["debt"], balance["available"]) == (5, 0, 0, 5)
    payments = rows(database, account_id, "debt_payment")
    assert sum(a for _, pool, a in payments if pool == "debt") == -5
    assert sum(a for _, pool, a in payments if pool != "debt") == -5
    assert_books_balance(database)


def test_a_lapsed_hold_pays_the_debt_and_available_reads_the_same_before_and_after(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    set_overdraft_limit(database, account_id, 5)
    first = reserve(database, Caller.service(), account_id, p_amount=2, p_overage="overdraft")
    other = reserve(database, caller, account_id, p_amount=10)
    capture(database, caller, first["hold_id"], p_amount=8)
    lapse(database, other["hold_id"])
    assert database.balance(account_id)["available"] == 5  # before any write settles it
    result = database.call("add_purchased_credits", p_account_id=account_id, p_amount=1,
                           p_idempotency_key=new_key())
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["debt"], balance["available"]) == (6, 0, 0, 6)
    assert hold_row(database, other["hold_id"])[0] == "expired"
    assert debt_rows(database, account_id)[-1][1:] == (-5, 0)
    assert_books_balance(database)


def test_admin_adjust_writes_debt_off(database: Db) -> None:
    caller, account_id, _ = in_debt(database, 5)
    off = database.call("admin_adjust_credits", p_account_id=account_id, p_pool="debt", p_amount=-2,
                        p_reason="goodwill", p_idempotency_key=new_key())
    balance = off["balance"]
    assert (balance["debt"], balance["total"], balance["available"]) == (3, 0, 0)
    assert debt_rows(database, account_id)[-1] == ("adjustment", -2, 3)
    assert rows(database, account_id, "adjustment") == [("adjustment", "debt", -2)]  # no pool moved
    database.call("admin_adjust_credits", p_account_id=account_id, p_pool="debt", p_amount=-3,
                  p_reason="goodwill", p_idempotency_key=new_key())
    assert database.balance(account_id)["debt"] == 0
    # Never below zero.
    before = snapshot(database, account_id)
    with pytest.raises(psycopg.Error) as refused:
        database.call("admin_adjust_credits", p_account_id=account_id, p_pool="debt", p_amount=-1,
                      p_reason="goodwill", p_idempotency_key=new_key())
    assert (refused.value.sqlstate, refused.value.diag.message_primary) in {
        ("PT402", "insufficient_credits"), ("22023", "invalid_argument")}
    assert snapshot(database, account_id) == before
    # Only the service writes debt off.
    with pytest.raises(psycopg.Error):
        database.call("admin_adjust_credits", caller, p_account_id=account_id, p_pool="debt", p_amount=-1,
                      p_reason="mine", p_idempotency_key=new_key())
    assert snapshot(database, account_id) == before
    # With the debt written off, the next purchase is all the account's.
    bought = database.call("add_purchased_credits", p_account_id=account_id, p_amount=4,
                           p_idempotency_key=new_key())
    assert (bought["balance"]["purchased"], bought["balance"]["available"]) == (4, 4)
    assert_books_balance(database)


def test_a_refund_of_an_overdraft_capture_counts_what_was_charged(database: Db) -> None:
    _, account_id, captured = in_debt(database, 5)
    tx = captured["transaction_id"]
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "refund_credits", p_transaction_id=tx,
                          p_idempotency_key=new_key(), p_amount=9)
    assert detail["argument"] == "p_amount"
    assert snapshot(database, account_id) == before
    refund = database.call("refund_credits", p_transaction_id=tx, p_idempotency_key=new_key())
    assert refund["refunded"] == 8
    balance = refund["balance"]
    # The refund arrives as purchased credits and pays the 5 owed first.
    assert (balance["purchased"], balance["debt"], balance["available"]) == (3, 0, 3)
    assert usage(database, tx)["refunded"] == 8
    assert debt_rows(database, account_id)[-1][1:] == (-5, 0)
    assert_books_balance(database)


def test_a_captured_priced_hold_refunds_as_before(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_output_tokens=1000)  # 3
    captured = capture(database, caller, hold["hold_id"], p_output_tokens=500)  # 2
    assert captured["charged"] == 2
    key = new_key()
    refund = database.call("refund_credits", p_transaction_id=captured["transaction_id"],
                           p_idempotency_key=key)
    assert refund["refunded"] == 2
    assert (refund["balance"]["subscription"], refund["balance"]["purchased"], refund["balance"]["debt"]) == (
        1, 2, 0)
    assert rows(database, account_id)[-1] == ("refund", "purchased", 2)
    assert usage(database, captured["transaction_id"])["refunded"] == 2
    assert database.call("refund_credits", p_transaction_id=captured["transaction_id"],
                         p_idempotency_key=key) == {**refund, "replayed": True}
    detail = expect_error(database.call, "22023", "invalid_argument", "refund_credits",
                          p_transaction_id=captured["transaction_id"], p_idempotency_key=new_key(),
                          p_amount=1)
    assert detail["argument"] == "p_amount"


# --- extend_hold ------------------------------------------------------------------------

def test_extend_grows_the_hold_from_available_credits(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=60)
    ledger_before = database.ledger(account_id)
    result = extend(database, caller, hold["hold_id"], p_add_amount=3)
    assert set(result) == EXTEND_KEYS
    assert (result["hold_id"], result["amount"], result["replayed"]) == (hold["hold_id"], 5, False)
    assert dt.datetime.fromisoformat(result["expires_at"]) == dt.datetime.fromisoformat(hold["expires_at"])
    balance = result["balance"]
    assert (balance["held"], balance["available"], balance["total"]) == (5, 8, 13)
    assert balance == database.balance(account_id)
    assert hold_row(database, hold["hold_id"]) == ("active", 5)
    assert database.ledger(account_id) == ledger_before  # holding more spends nothing
    captured = capture(database, caller, hold["hold_id"])
    assert (captured["requested"], captured["charged"], captured["released"]) == (5, 5, 0)
    assert captured["balance"]["total"] == 8


def test_extend_grows_a_priced_hold_and_its_capture_may_use_it(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_output_tokens=1000)  # 3
    assert extend(database, caller, hold["hold_id"], p_add_amount=4)["amount"] == 7
    result = capture(database, caller, hold["hold_id"], p_output_tokens=3000)  # 7: within the grown hold
    check_figures(result, 7)
    assert (result["requested"], result["charged"], result["released"], result["uncovered"]) == (7, 7, 0, 0)


def test_extend_moves_the_expiry(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=60)
    result = extend(database, caller, hold["hold_id"], p_ttl_seconds=3600)
    expires = dt.datetime.fromisoformat(result["expires_at"])
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 3600) < 10
    assert (result["amount"], result["balance"]["held"], result["balance"]["available"]) == (2, 2, 1)
    assert database.one("select expires_at from public.credit_holds where id = %s",
                        hold["hold_id"]) == expires
    # Earlier too: the expiry is now + ttl, whatever it was.
    result = extend(database, caller, hold["hold_id"], p_ttl_seconds=30)
    expires = dt.datetime.fromisoformat(result["expires_at"])
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 30) < 10
    assert extend(database, caller, hold["hold_id"], p_ttl_seconds=86400)["amount"] == 2
    both = extend(database, Caller.service(), hold["hold_id"], p_add_amount=1, p_ttl_seconds=120)
    assert both["amount"] == 3
    assert abs((dt.datetime.fromisoformat(both["expires_at"]) - dt.datetime.now(dt.UTC)).total_seconds()
               - 120) < 10


@pytest.mark.parametrize(("args", "arguments"), [
    ({}, {"p_add_amount", "p_ttl_seconds"}),
    ({"p_add_amount": 0, "p_ttl_seconds": None}, {"p_add_amount", "p_ttl_seconds"}),
    ({"p_add_amount": -1}, {"p_add_amount"}),
    ({"p_add_amount": 1000000001}, {"p_add_amount"}),
    ({"p_ttl_seconds": 0}, {"p_ttl_seconds"}),
    ({"p_ttl_seconds": 86401}, {"p_ttl_seconds"}),
    ({"p_add_amount": 1, "p_ttl_seconds": -5}, {"p_ttl_seconds"}),
    ({"p_add_amount": 1, "p_idempotency_key": ""}, {"p_idempotency_key"}),
    ({"p_add_amount": 1, "p_idempotency_key": None}, {"p_idempotency_key"}),
])
def test_extend_rejects_invalid_arguments(database: Db, args: dict[str, Any], arguments: set[str]) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=1, p_ttl_seconds=60)
    before = snapshot(database, account_id)
    call_args = {"p_hold_id": hold["hold_id"], "p_idempotency_key": new_key(), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "extend_hold", caller, **call_args)
    assert detail["argument"] in arguments
    assert snapshot(database, account_id) == before


def test_extend_is_all_or_nothing(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=60)
    before = snapshot(database, account_id)
    assert expect_error(extend, "PT402", "insufficient_credits", database, caller, hold["hold_id"],
                        p_add_amount=5, p_ttl_seconds=3600) == {"required": 5, "available": 1}
    assert snapshot(database, account_id) == before  # neither grown nor moved
    key = new_key()
    expect_error(extend, "PT402", "insufficient_credits", database, caller, hold["hold_id"], key,
                 p_add_amount=2)
    # The failed key was not used up.
    result = extend(database, caller, hold["hold_id"], key, p_add_amount=1)
    assert (result["amount"], result["replayed"], result["balance"]["available"]) == (3, False, 0)


def test_extend_replays_and_conflicts(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    hold = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=60)
    key = new_key()
    first = extend(database, caller, hold["hold_id"], key, p_add_amount=1, p_ttl_seconds=600)
    after = snapshot(database, account_id)
    assert extend(database, caller, hold["hold_id"], key, p_add_amount=1, p_ttl_seconds=600) == {
        **first, "replayed": True}
    assert snapshot(database, account_id) == after
    assert hold_row(database, hold["hold_id"]) == ("active", 3)  # grown once
    for changed in ({"p_add_amount": 2, "p_ttl_seconds": 600}, {"p_add_amount": 1, "p_ttl_seconds": 601},
                    {"p_add_amount": 1}):
        expect_error(extend, "PT409", "idempotency_conflict", database, caller, hold["hold_id"], key,
                     **changed)
    other = reserve(database, caller, account_id, p_amount=1)
    after = snapshot(database, account_id)
    expect_error(extend, "PT409", "idempotency_conflict", database, caller, other["hold_id"], key,
                 p_add_amount=1, p_ttl_seconds=600)
    assert snapshot(database, account_id) == after
    assert hold_row(database, other["hold_id"]) == ("active", 1)
    # Whatever the hold's state, the same call replays.
    capture(database, caller, hold["hold_id"])
    settled = snapshot(database, account_id)
    assert extend(database, caller, hold["hold_id"], key, p_add_amount=1, p_ttl_seconds=600) == {
        **first, "replayed": True}
    assert snapshot(database, account_id) == settled


def test_the_101st_extension_is_refused(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=1, p_ttl_seconds=600)
    keys = [new_key() for _ in range(100)]
    for n, key in enumerate(keys):
        assert extend(database, caller, hold["hold_id"], key, p_ttl_seconds=600 + n)["replayed"] is False
    before = snapshot(database, account_id)
    for args in ({"p_ttl_seconds": 900}, {"p_add_amount": 1}):
        for who in (caller, Caller.service()):
            expect_error(extend, "PT409", "hold_extension_limit", database, who, hold["hold_id"], **args)
    assert snapshot(database, account_id) == before
    # A replay still replays; the hold still captures and releases as before.
    assert extend(database, caller, hold["hold_id"], keys[-1], p_ttl_seconds=699)["replayed"] is True
    assert capture(database, caller, hold["hold_id"])["charged"] == 1


def test_only_active_holds_extend(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    captured = reserve(database, caller, account_id, p_amount=1)
    capture(database, caller, captured["hold_id"])
    released = reserve(database, caller, account_id, p_amount=1)
    database.call("release_hold", caller, p_hold_id=released["hold_id"])
    lapsed = reserve(database, caller, account_id, p_amount=4)
    lapse(database, lapsed["hold_id"])
    before = snapshot(database, account_id)
    for hold, status in ((captured, "captured"), (released, "released"), (lapsed, "expired")):
        for args in ({"p_add_amount": 1}, {"p_ttl_seconds": 600}):
            detail = expect_error(extend, "PT409", "hold_not_active", database, caller, hold["hold_id"],
                                  **args)
            assert detail.get("status", status) == status
    assert snapshot(database, account_id) == before
    # The lapsed hold's credits are back, it did not come back to life.
    balance = database.balance(account_id)
    assert (balance["held"], balance["available"]) == (0, 12)
    assert hold_row(database, lapsed["hold_id"])[1] == 4


def test_extend_of_an_unknown_hold_or_by_a_stranger(database: Db) -> None:
    caller, account_id = database.new_user()
    stranger, _ = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=1)
    before = snapshot(database, account_id)
    expect_error(extend, "PT403", "forbidden", database, stranger, hold["hold_id"], p_add_amount=1)
    expect_error(extend, "PT404", "hold_not_found", database, caller, str(uuid.uuid4()), p_add_amount=1)
    expect_error(extend, "PT404", "hold_not_found", database, Caller.service(), str(uuid.uuid4()),
                 p_add_amount=1)
    detail = expect_error(database.call, "22023", "invalid_argument", "extend_hold", Caller.service(),
                          p_hold_id=None, p_idempotency_key=new_key(), p_add_amount=1)
    assert detail["argument"] == "p_hold_id"
    assert snapshot(database, account_id) == before


# --- late captures ------------------------------------------------------------------------

def test_a_late_capture_is_refused_and_the_credits_come_back(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=4)
    hold = reserve(database, caller, account_id, p_operation="v3-llm", p_output_tokens=2000,
                   p_overage="if_available")  # 5
    assert hold["balance"]["available"] == 2
    lapse(database, hold["hold_id"])
    for args in ({"p_output_tokens": 1000}, {"p_amount": 9}, {}):
        assert expect_error(capture, "PT409", "hold_not_active", database, caller, hold["hold_id"],
                            **args) == {"status": "expired"}
    balance = database.balance(account_id)
    assert (balance["held"], balance["available"], balance["total"]) == (0, 7, 7)
    assert rows(database, account_id, "spend") == []
    # The next write settles it as expired, and all 7 credits are spendable.
    spend = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_amount=7)
    assert spend["balance"]["available"] == 0
    assert hold_row(database, hold["hold_id"]) == ("expired", 5)


# --- estimate_cost ------------------------------------------------------------------------

def test_estimate_prices_an_operation_and_writes_nothing(database: Db) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    result = estimate(database, caller, account_id, p_operation="v3-llm", p_input_tokens=1000,
                      p_output_tokens=1000)
    assert result == {"cost": 4, "available": 3, "affordable": False, "max_output_tokens": 500,
                      "limit_remaining": None}
    result = estimate(database, caller, account_id, p_operation="v3-llm", p_output_tokens=500)
    assert (result["cost"], result["affordable"], result["max_output_tokens"]) == (2, True, 1000)
    result = estimate(database, caller, account_id, p_operation="v3-llm", p_input_tokens=1500)
    assert (result["cost"], result["max_output_tokens"]) == (3, 250)  # the total is rounded up
    assert snapshot(database, account_id) == before


def test_estimate_of_an_amount_or_a_flat_price(database: Db) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    assert estimate(database, caller, account_id, p_amount=3) == {
        "cost": 3, "available": 3, "affordable": True, "max_output_tokens": None, "limit_remaining": None}
    assert estimate(database, caller, account_id, p_amount=4)["affordable"] is False
    flat = estimate(database, caller, account_id, p_operation="v3-flat", p_output_tokens=99)
    assert set(flat) == ESTIMATE_KEYS
    assert (flat["cost"], flat["affordable"], flat["max_output_tokens"]) == (4, False, None)
    assert snapshot(database, account_id) == before


def test_estimate_counts_holds_and_defaults_to_the_callers_account(database: Db) -> None:
    caller, account_id = database.new_user()
    reserve(database, caller, account_id, p_amount=2)
    result = estimate(database, caller, None, p_operation="v3-llm")
    assert result == {"cost": 1, "available": 1, "affordable": True, "max_output_tokens": 0,
                      "limit_remaining": None}
    assert estimate(database, Caller.service(), account_id, p_amount=2)["affordable"] is False
    detail = expect_error(estimate, "22023", "invalid_argument", database, Caller.service(), None, p_amount=1)
    assert detail["argument"] == "p_account_id"


@pytest.mark.parametrize("args", [
    {"p_amount": 1, "p_operation": "v3-llm"},
    {},
    {"p_amount": 0},
    {"p_amount": -3},
    {"p_amount": 1000000001},
    {"p_operation": "v3-llm", "p_input_tokens": -1},
    {"p_operation": "v3-llm", "p_output_tokens": -1},
    {"p_operation": ""},
    {"p_operation": "no-such-operation-v3"},
    {"p_operation": "v3-tokens-only"},
])
def test_estimate_refuses_what_a_deduct_refuses(database: Db, args: dict[str, Any]) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    with pytest.raises(psycopg.Error) as deducted:
        database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), **args)
    with pytest.raises(psycopg.Error) as estimated:
        estimate(database, caller, account_id, **args)
    assert (estimated.value.sqlstate, estimated.value.diag.message_primary) == (
        deducted.value.sqlstate, deducted.value.diag.message_primary)
    assert estimated.value.sqlstate in {"22023", "PT404"}
    if deducted.value.sqlstate == "22023":
        deduct_detail = json.loads(deducted.value.diag.message_detail or "{}")
        estimate_detail = json.loads(estimated.value.diag.message_detail or "{}")
        assert estimate_detail["argument"] == deduct_detail["argument"]
    else:
        assert estimated.value.diag.message_primary == "unknown_operation"
    assert snapshot(database, account_id) == before


def test_estimate_is_refused_to_those_who_may_not_spend(database: Db) -> None:
    caller, account_id = database.new_user()
    stranger, _ = database.new_user()
    member, _ = database.new_user()
    admin, _ = database.new_user()
    _, tenant_account = database.new_tenant({
        caller.user_id: "owner", member.user_id: "member", admin.user_id: "admin"})  # type: ignore[dict-item]
    expect_error(estimate, "PT403", "forbidden", database, stranger, account_id, p_amount=1)
    expect_error(estimate, "PT403", "forbidden", database, stranger, account_id, p_operation="v3-llm")
    # Authorization comes before the arguments, so a stranger learns nothing from them either.
    expect_error(estimate, "PT403", "forbidden", database, stranger, account_id,
                 p_operation="no-such-operation-v3")
    expect_error(estimate, "PT403", "forbidden", database, member, tenant_account, p_amount=1)
    with pytest.raises(psycopg.Error) as anonymous:
        estimate(database, Caller.anon(), account_id, p_amount=1)
    assert anonymous.value.sqlstate in {"42501", "PT403"}
    available = database.balance(tenant_account)["available"]
    for spender in (admin, caller):
        result = estimate(database, spender, tenant_account, p_amount=1)
        assert (result["available"], result["affordable"]) == (available, available >= 1)


# --- extend racing capture ----------------------------------------------------------------

def _attempt(conn: psycopg.Connection, fn: str, caller: Caller, **args: Any) -> tuple[str, Any]:
    try:
        return "ok", db.call_function(conn, fn, args, role=caller.role, claims=caller.claims)
    except psycopg.Error as exc:
        return "error", (exc.sqlstate, exc.diag.message_primary)


def test_extend_racing_capture_settles_one_way(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=500)
    rounds = 40
    outcomes: list[tuple[tuple[str, Any], tuple[str, Any], str]] = []
    with database.connect() as first, database.connect() as second:
        for n in range(rounds):
            hold = reserve(database, Caller.service(), account_id, p_amount=2)["hold_id"]
            barrier = threading.Barrier(2)
            answers: dict[str, tuple[str, Any]] = {}

            def run(name: str, conn: psycopg.Connection, fn: str, args: dict[str, Any],
                    barrier: threading.Barrier = barrier,
                    answers: dict[str, tuple[str, Any]] = answers) -> None:
                barrier.wait(timeout=30)
                answers[name] = _attempt(conn, fn, caller if name == "extend" else Caller.service(), **args)

            threads = [
                threading.Thread(target=run, args=("extend", first, "extend_hold",
                                                   {"p_hold_id": hold, "p_idempotency_key": f"race-{n}",
                                                    "p_add_amount": 3, "p_ttl_seconds": 600})),
                threading.Thread(target=run, args=("capture", second, "capture_hold", {"p_hold_id": hold})),
            ]
            if n % 2:
                threads.reverse()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a call hung"
            outcomes.append((answers["extend"], answers["capture"], hold))

    spent = 0
    for extended, captured, hold in outcomes:
        assert captured[0] == "ok", captured  # a capture never fails
        status, amount = hold_row(database, hold)
        assert status == "captured"
        if extended[0] == "ok":
            # The extension came first: the capture charged it too.
            assert extended[1]["amount"] == 5
            assert (captured[1]["requested"], captured[1]["charged"], amount) == (5, 5, 5)
        else:
            # The capture came first: the extension found the hold settled.
            assert extended[1] == ("PT409", "hold_not_active")
            assert (captured[1]["requested"], captured[1]["charged"], amount) == (2, 2, 2)
        spent += captured[1]["charged"]
    balance = database.balance(account_id)
    assert (balance["held"], balance["total"], balance["available"], balance["debt"]) == (
        0, 503 - spent, 503 - spent, 0)
    assert -sum(a for _, _, a in rows(database, account_id, "spend")) == spent
    assert_books_balance(database)
