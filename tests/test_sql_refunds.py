"""Giving back and taking back: refund_credits (of spends) and clawback_credits
(of Stripe payments, cumulative, never below zero)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support import Caller, Db, expect_error, new_key, snapshot


def refund(database: Db, transaction_id: str, key: str | None = None, **args: Any) -> Any:
    return database.call("refund_credits", p_transaction_id=transaction_id,
                         p_idempotency_key=key or new_key(), **args)


def clawback(database: Db, stripe_ref: str, key: str | None = None, **args: Any) -> Any:
    return database.call("clawback_credits", p_stripe_ref=stripe_ref, p_idempotency_key=key or new_key(),
                         **args)


def spend(database: Db, caller: Caller, account_id: str, amount: int) -> str:
    return database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=amount)["transaction_id"]


def last_rows(database: Db, account_id: str, count: int) -> list[tuple]:
    return [(r["pool"], r["amount"], r["balance_after"], r["type"])
            for r in database.ledger(account_id)[-count:]]


def ref() -> str:
    return f"pi_{uuid.uuid4().hex}"


# --- refunds ---------------------------------------------------------------------------

def test_refund_gives_the_whole_spend_back_into_purchased(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=4)
    tx = spend(database, caller, account_id, 5)  # 3 from subscription, 2 from purchased
    result = refund(database, tx, p_reason="model failed")
    assert set(result) == {"transaction_id", "refunded", "replayed", "balance"}
    assert (result["refunded"], result["replayed"]) == (5, False)
    assert result["balance"] == database.balance(account_id)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (0, 7)
    [row] = database.ledger(account_id)[-1:]
    assert (row["pool"], row["amount"], row["balance_after"], row["type"]) == ("purchased", 5, 7, "refund")
    assert row["metadata"] == {"refund_of": tx, "reason": "model failed"}
    assert str(row["transaction_id"]) == result["transaction_id"]
    assert database.one("select refunded from public.credit_usage where transaction_id = %s", tx) == 5


def test_partial_refunds_add_up_to_the_spend(database: Db) -> None:
    caller, account_id = database.new_user()
    tx = spend(database, caller, account_id, 3)
    assert refund(database, tx, p_amount=1)["refunded"] == 1
    before = snapshot(database, account_id)
    detail = expect_error(refund, "22023", "invalid_argument", database, tx, p_amount=3)
    assert (detail["argument"], detail["refundable"]) == ("p_amount", 2)
    assert snapshot(database, account_id) == before
    assert refund(database, tx)["refunded"] == 2  # default: all that is left
    assert database.balance(account_id)["purchased"] == 3
    detail = expect_error(refund, "22023", "invalid_argument", database, tx)
    assert detail["argument"] == "p_transaction_id"
    expect_error(refund, "22023", "invalid_argument", database, tx, p_amount=1)
    assert last_rows(database, account_id, 2) == [("purchased", 1, 1, "refund"),
                                                  ("purchased", 2, 3, "refund")]


def test_a_captured_hold_can_be_refunded(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=3)
    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=2)
    result = refund(database, captured["transaction_id"])
    assert (result["refunded"], result["balance"]["purchased"], result["balance"]["total"]) == (2, 2, 3)


def test_refund_replays_and_conflicts(database: Db) -> None:
    caller, account_id = database.new_user()
    tx = spend(database, caller, account_id, 3)
    key = new_key()
    first = refund(database, tx, key, p_amount=1, p_reason="r")
    refund(database, tx)  # the rest, under another key
    after = snapshot(database, account_id)
    # The retry answers as before although nothing is left to refund now.
    assert refund(database, tx, key, p_amount=1, p_reason="r") == {**first, "replayed": True}
    for changed in ({"p_amount": 2, "p_reason": "r"}, {"p_amount": 1, "p_reason": "other"},
                    {"p_amount": None}):
        assert expect_error(refund, "PT409", "idempotency_conflict", database, tx, key,
                            **changed) == {"idempotency_key": key}
    assert snapshot(database, account_id) == after
    assert after.balance["purchased"] == 3


def test_only_spends_can_be_refunded(database: Db) -> None:
    caller, account_id = database.new_user()
    purchase = database.call("add_purchased_credits", p_account_id=account_id, p_amount=5,
                             p_idempotency_key=new_key())
    adjust = database.call("admin_adjust_credits", p_account_id=account_id, p_pool="purchased", p_amount=1,
                           p_reason="r", p_idempotency_key=new_key())
    reserve = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                            p_amount=1)
    reserve_tx = database.one("select transaction_id from public.credit_holds where id = %s",
                              reserve["hold_id"])
    before = snapshot(database, account_id)
    for tx in (purchase["transaction_id"], adjust["transaction_id"], str(reserve_tx), str(uuid.uuid4()),
               None):
        expect_error(refund, "PT404", "transaction_not_found", database, tx)
    assert snapshot(database, account_id) == before


@pytest.mark.parametrize(("args", "argument"), [
    ({"p_amount": 0}, "p_amount"), ({"p_amount": -1}, "p_amount"), ({"p_amount": 1000000001}, "p_amount"),
    ({"p_idempotency_key": ""}, "p_idempotency_key"), ({"p_idempotency_key": "k" * 256}, "p_idempotency_key"),
])
def test_refund_rejects_invalid_arguments(database: Db, args: dict[str, Any], argument: str) -> None:
    caller, account_id = database.new_user()
    tx = spend(database, caller, account_id, 2)
    before = snapshot(database, account_id)
    call = {"p_transaction_id": tx, "p_idempotency_key": new_key(), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "refund_credits", **call)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_a_free_spend_has_nothing_to_refund(database: Db) -> None:
    caller, account_id = database.new_user()
    database.sql("insert into public.credit_prices (operation, credits, free) "
                 "values ('refund-free', 0, true) on conflict (operation) do nothing")
    tx = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                       p_operation="refund-free")["transaction_id"]
    before = snapshot(database, account_id)
    assert expect_error(refund, "22023", "invalid_argument", database, tx)["argument"] == "p_transaction_id"
    assert snapshot(database, account_id) == before


# --- clawbacks ---------------------------------------------------------------------------

def test_clawback_takes_back_a_whole_purchase(database: Db) -> None:
    _, account_id = database.new_user()
    stripe_ref = ref()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref=stripe_ref)
    database.fund(account_id, purchased=5)
    result = clawback(database, stripe_ref, p_reason="refunded")
    assert {"clawed_back", "shortfall", "replayed", "balance"} <= set(result)
    assert (result["clawed_back"], result["shortfall"], result["replayed"]) == (10, 0, False)
    assert result["balance"] == database.balance(account_id)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (3, 5)
    [row] = database.ledger(account_id)[-1:]
    assert (row["pool"], row["amount"], row["balance_after"], row["type"], row["stripe_ref"]) == (
        "purchased", -10, 5, "clawback", stripe_ref)
    assert row["metadata"] == {"reason": "refunded"}


def test_clawback_amounts_are_cumulative(database: Db) -> None:
    _, account_id = database.new_user()
    stripe_ref = ref()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref=stripe_ref)
    # Stripe reports 40% refunded, then the same 40% again (another event), then 100%.
    assert clawback(database, stripe_ref, p_amount=4)["clawed_back"] == 4
    same = clawback(database, stripe_ref, p_amount=4)
    assert (same["clawed_back"], same["shortfall"], same["replayed"]) == (0, 0, False)
    assert clawback(database, stripe_ref, p_amount=10)["clawed_back"] == 6
    # Asking for more than was granted takes nothing more.
    assert clawback(database, stripe_ref, p_amount=50)["clawed_back"] == 0
    assert clawback(database, stripe_ref, p_amount=0)["clawed_back"] == 0
    assert database.balance(account_id)["purchased"] == 0
    assert last_rows(database, account_id, 2) == [("purchased", -4, 6, "clawback"),
                                                  ("purchased", -6, 0, "clawback")]


def test_clawback_never_goes_below_zero_and_reports_the_shortfall(database: Db) -> None:
    caller, account_id = database.new_user()
    stripe_ref = ref()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref=stripe_ref)
    spend(database, caller, account_id, 11)  # 3 subscription + 8 purchased: 2 purchased left
    result = clawback(database, stripe_ref)
    assert (result["clawed_back"], result["shortfall"]) == (2, 8)
    assert (result["balance"]["purchased"], result["balance"]["total"]) == (0, 0)
    assert last_rows(database, account_id, 1) == [("purchased", -2, 0, "clawback")]
    # What was spent stays the shortfall: credits that arrive later belong to other grants.
    database.fund(account_id, purchased=5)
    later = clawback(database, stripe_ref)
    assert (later["clawed_back"], later["shortfall"], later["balance"]["purchased"]) == (0, 8, 5)


def test_clawback_of_a_subscription_grant_takes_from_the_subscription_pool(database: Db) -> None:
    _, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    stripe_ref = f"in_{uuid.uuid4().hex}"
    database.call("add_subscription_credits", p_account_id=account_id, p_amount=30,
                  p_period_start="2099-01-01T00:00:00Z", p_period_end="2099-02-01T00:00:00Z",
                  p_idempotency_key=new_key(), p_stripe_ref=stripe_ref)
    result = clawback(database, stripe_ref, p_amount=20)
    assert (result["clawed_back"], result["balance"]["subscription"], result["balance"]["purchased"]) == (
        20, 10, 5)
    assert last_rows(database, account_id, 1) == [("subscription", -20, 10, "clawback")]


def test_clawback_replays_and_conflicts(database: Db) -> None:
    _, account_id = database.new_user()
    stripe_ref = ref()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref=stripe_ref)
    key = new_key()
    first = clawback(database, stripe_ref, key, p_amount=3, p_reason="dispute")
    after = snapshot(database, account_id)
    assert clawback(database, stripe_ref, key, p_amount=3, p_reason="dispute") == {**first, "replayed": True}
    for changed in ({"p_amount": 4, "p_reason": "dispute"}, {"p_amount": 3, "p_reason": "refund"}, {}):
        assert expect_error(clawback, "PT409", "idempotency_conflict", database, stripe_ref, key,
                            **changed) == {"idempotency_key": key}
    assert snapshot(database, account_id) == after
    assert after.balance["purchased"] == 7


def test_clawback_of_an_unknown_payment(database: Db) -> None:
    stripe_ref = ref()
    assert expect_error(clawback, "PT404", "transaction_not_found", database, stripe_ref) == {
        "stripe_ref": stripe_ref}


@pytest.mark.parametrize(("args", "argument"), [
    ({"p_stripe_ref": ""}, "p_stripe_ref"), ({"p_stripe_ref": None}, "p_stripe_ref"),
    ({"p_stripe_ref": "x" * 256}, "p_stripe_ref"), ({"p_amount": -1}, "p_amount"),
    ({"p_amount": 1000000001}, "p_amount"), ({"p_idempotency_key": ""}, "p_idempotency_key"),
])
def test_clawback_rejects_invalid_arguments(database: Db, args: dict[str, Any], argument: str) -> None:
    _, account_id = database.new_user()
    stripe_ref = ref()
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=10, p_idempotency_key=new_key(),
                  p_stripe_ref=stripe_ref)
    before = snapshot(database, account_id)
    call = {"p_stripe_ref": stripe_ref, "p_idempotency_key": new_key(), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "clawback_credits", **call)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before
