"""Holds: reserve_credits, capture_hold, release_hold, and holds that lapse."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest

from tests.support import Caller, Db, expect_error, new_key, select_as, snapshot

HOLD_KEYS = {"hold_id", "account_id", "amount", "expires_at", "overage", "replayed", "balance"}
CAPTURE_KEYS = {"transaction_id", "hold_id", "requested", "charged", "released", "uncovered", "debt_added",
                "from_promotional", "from_subscription", "from_purchased", "replayed", "balance"}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    database.sql("insert into public.credit_prices (operation, credits) values ('hold-op', 2), "
                 "('hold-free', 0) on conflict (operation) do nothing")


def reserve(database: Db, caller: Caller, account_id: str, key: str | None = None, **args: Any) -> Any:
    return database.call("reserve_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key(), **args)


def lapse(database: Db, hold_id: str) -> None:
    """Move a hold's expiry into the past, as if its ttl had run out (the
    account's cached next expiry moves with it, as it would have been)."""
    database.sql("update public.credit_holds set expires_at = now() - interval '1 second' where id = %s",
                 hold_id)
    database.sql("update public.credit_wallets w set next_hold_expiry = now() - interval '1 second' "
                 "from public.credit_holds h where h.id = %s and w.account_id = h.account_id", hold_id)


def hold_status(database: Db, hold_id: str) -> str:
    return database.one("select status from public.credit_holds where id = %s", hold_id)


def spends(database: Db, account_id: str) -> list[tuple]:
    return [(r["pool"], r["amount"], r["balance_after"]) for r in database.ledger(account_id)
            if r["type"] == "spend"]


# --- reserve ------------------------------------------------------------------------

def test_reserve_holds_credits_without_touching_the_pools(database: Db) -> None:
    caller, account_id = database.new_user()
    ledger_before = database.ledger(account_id)
    result = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=60, p_metadata={"job": 1})
    assert set(result) == HOLD_KEYS
    assert (result["account_id"], result["amount"], result["replayed"]) == (account_id, 2, False)
    balance = result["balance"]
    assert (balance["subscription"], balance["purchased"], balance["held"], balance["available"],
            balance["total"]) == (3, 0, 2, 1, 3)
    assert balance == database.balance(account_id)
    expires = dt.datetime.fromisoformat(result["expires_at"])
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 60) < 10
    assert database.ledger(account_id) == ledger_before  # a hold is not a ledger change
    assert database.one("select status, amount, metadata from public.credit_holds where id = %s",
                        result["hold_id"]) == ("active", 2, {"job": 1})


def test_reserve_default_ttl_is_fifteen_minutes(database: Db) -> None:
    caller, account_id = database.new_user()
    result = reserve(database, caller, account_id, p_amount=1)
    expires = dt.datetime.fromisoformat(result["expires_at"])
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 900) < 10


def test_reserve_by_operation_holds_its_flat_cost(database: Db) -> None:
    caller, account_id = database.new_user()
    result = reserve(database, caller, account_id, p_operation="hold-op")
    assert (result["amount"], result["balance"]["available"]) == (2, 1)
    detail = expect_error(reserve, "22023", "invalid_argument", database, caller, account_id,
                          p_operation="hold-free")
    assert detail["argument"] == "p_operation"
    expect_error(reserve, "PT404", "unknown_operation", database, caller, account_id,
                 p_operation="no-such-operation")


def test_holds_add_up_and_cannot_overcommit(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2)
    reserve(database, caller, account_id, p_amount=3)
    reserve(database, caller, account_id, p_amount=1)
    before = snapshot(database, account_id)
    detail = expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id, p_amount=2)
    assert detail == {"required": 2, "available": 1}
    assert snapshot(database, account_id) == before
    assert before.balance["held"] == 4


def test_reserve_replays_and_conflicts(database: Db) -> None:
    caller, account_id = database.new_user()
    key = new_key()
    first = reserve(database, caller, account_id, key, p_amount=1, p_ttl_seconds=30)
    after = snapshot(database, account_id)
    assert reserve(database, caller, account_id, key, p_amount=1, p_ttl_seconds=30) == {
        **first, "replayed": True}
    for changed in ({"p_amount": 2, "p_ttl_seconds": 30}, {"p_amount": 1, "p_ttl_seconds": 31},
                    {"p_amount": 1, "p_ttl_seconds": 30, "p_metadata": {"a": 1}}):
        expect_error(reserve, "PT409", "idempotency_conflict", database, caller, account_id, key, **changed)
    # A reservation key cannot be reused for a spend either.
    expect_error(database.call, "PT409", "idempotency_conflict", "deduct_credits", caller,
                 p_account_id=account_id, p_idempotency_key=key, p_amount=1)
    assert snapshot(database, account_id) == after
    assert after.balance["held"] == 1


@pytest.mark.parametrize(("args", "argument"), [
    ({"p_amount": 1, "p_ttl_seconds": 0}, "p_ttl_seconds"),
    ({"p_amount": 1, "p_ttl_seconds": 86401}, "p_ttl_seconds"),
    ({"p_amount": 1, "p_ttl_seconds": None}, "p_ttl_seconds"),
    ({"p_amount": 0}, "p_amount"),
    ({"p_amount": 1000000001}, "p_amount"),
    ({}, "p_amount"),
    ({"p_amount": 1, "p_operation": "hold-op"}, "p_amount"),
    ({"p_amount": 1, "p_idempotency_key": ""}, "p_idempotency_key"),
])
def test_reserve_rejects_invalid_arguments(database: Db, args: dict[str, Any], argument: str) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    call_args = {"p_account_id": account_id, "p_idempotency_key": new_key(), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "reserve_credits", caller, **call_args)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_reserve_ttl_bounds_are_accepted(database: Db) -> None:
    caller, account_id = database.new_user()
    assert reserve(database, caller, account_id, p_amount=1, p_ttl_seconds=1)["amount"] == 1
    assert reserve(database, caller, account_id, p_amount=1, p_ttl_seconds=86400)["amount"] == 1


# --- capture ------------------------------------------------------------------------

def test_capture_all_charges_the_hold_subscription_first(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    hold = reserve(database, caller, account_id, p_amount=4, p_operation=None, p_metadata={"job": "a"})
    result = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_metadata={"step": 2})
    assert set(result) == CAPTURE_KEYS
    assert (result["hold_id"], result["charged"], result["released"], result["from_subscription"],
            result["from_purchased"], result["replayed"]) == (hold["hold_id"], 4, 0, 3, 1, False)
    balance = result["balance"]
    assert (balance["subscription"], balance["purchased"]) == (0, 4)
    assert (balance["held"], balance["available"]) == (0, 4)
    assert balance == database.balance(account_id)
    assert spends(database, account_id) == [("subscription", -3, 0), ("purchased", -1, 4)]
    rows = [r for r in database.ledger(account_id) if r["type"] == "spend"]
    assert all(r["metadata"] == {"job": "a", "step": 2} for r in rows)
    assert {r["transaction_id"] for r in rows} == {result["transaction_id"]}
    assert hold_status(database, hold["hold_id"]) == "captured"
    usage = database.one("select credits, account_id from public.credit_usage where transaction_id = %s",
                         result["transaction_id"])
    assert usage == (4, uuid.UUID(account_id))


def test_partial_capture_releases_the_rest(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=7)
    hold = reserve(database, caller, account_id, p_operation="hold-op")
    reserve(database, caller, account_id, p_amount=5)
    result = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=1)
    assert (result["charged"], result["released"], result["from_subscription"]) == (1, 1, 1)
    balance = result["balance"]
    assert (balance["total"], balance["held"], balance["available"]) == (9, 5, 4)
    assert spends(database, account_id) == [("subscription", -1, 2)]
    assert database.one("select operation from public.credit_usage where transaction_id = %s",
                        result["transaction_id"]) == "hold-op"


def test_capturing_twice_replays_the_first_capture(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=3)
    first = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=2)
    after = snapshot(database, account_id)
    assert database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=2) == {
        **first, "replayed": True}
    # Whatever the second call asks for, the first capture stands.
    assert database.call("capture_hold", Caller.service(), p_hold_id=hold["hold_id"]) == {
        **first, "replayed": True}
    assert snapshot(database, account_id) == after
    assert after.balance["total"] == 1


@pytest.mark.parametrize("amount", [0, -1, 4])
def test_capture_amount_must_be_within_the_hold(database: Db, amount: int) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=3)
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "capture_hold", caller,
                          p_hold_id=hold["hold_id"], p_amount=amount)
    assert detail["argument"] == "p_amount"
    assert snapshot(database, account_id) == before
    assert hold_status(database, hold["hold_id"]) == "active"


def test_a_hold_survives_every_decrease_so_its_capture_never_fails(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2)
    charge = database.call("add_purchased_credits", p_account_id=account_id, p_amount=4,
                           p_idempotency_key=new_key(), p_stripe_ref="pi_hold_guard")
    hold = reserve(database, caller, account_id, p_amount=8)  # all but one of its 9 credits
    assert hold["balance"]["available"] == 1

    expired = database.call("expire_subscription_credits", p_account_id=account_id,
                            p_idempotency_key=new_key())
    clawed = database.call("clawback_credits", p_stripe_ref="pi_hold_guard", p_idempotency_key=new_key())
    expect_error(database.call, "PT402", "insufficient_credits", "admin_adjust_credits",
                 p_account_id=account_id, p_pool="purchased", p_amount=-2, p_reason="test",
                 p_idempotency_key=new_key())
    # The hold reserved the whole allowance (3) and 5 purchased credits: the
    # expiry finds no free allowance, the clawback takes the one free purchased
    # credit and claims 3 on the hold (taken if it ends uncaptured).
    assert (expired["expired"], clawed["clawed_back"], clawed["pending"], clawed["shortfall"]) == (0, 1, 3, 0)
    assert charge["added"] == 4

    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"])
    assert (captured["charged"], captured["from_subscription"], captured["from_purchased"]) == (8, 3, 5)
    assert captured["balance"]["total"] == 0


# --- release ------------------------------------------------------------------------

def test_release_returns_the_credits_and_replays(database: Db) -> None:
    caller, account_id = database.new_user()
    ledger_before = database.ledger(account_id)
    hold = reserve(database, caller, account_id, p_amount=2)
    result = database.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert result == {"hold_id": hold["hold_id"], "released": 2, "replayed": False,
                      "balance": database.balance(account_id)}
    assert (result["balance"]["held"], result["balance"]["available"]) == (0, 3)
    assert hold_status(database, hold["hold_id"]) == "released"
    after = snapshot(database, account_id)
    assert database.call("release_hold", caller, p_hold_id=hold["hold_id"]) == {**result, "replayed": True}
    assert snapshot(database, account_id) == after
    assert database.ledger(account_id) == ledger_before


def test_settled_holds_cannot_change_their_fate(database: Db) -> None:
    caller, account_id = database.new_user()
    released = reserve(database, caller, account_id, p_amount=1)
    database.call("release_hold", caller, p_hold_id=released["hold_id"])
    captured = reserve(database, caller, account_id, p_amount=1)
    database.call("capture_hold", caller, p_hold_id=captured["hold_id"])
    before = snapshot(database, account_id)
    assert expect_error(database.call, "PT409", "hold_not_active", "capture_hold", caller,
                        p_hold_id=released["hold_id"]) == {"status": "released"}
    assert expect_error(database.call, "PT409", "hold_not_active", "release_hold", caller,
                        p_hold_id=captured["hold_id"]) == {"status": "captured"}
    assert snapshot(database, account_id) == before


def test_unknown_hold(database: Db) -> None:
    caller, _ = database.new_user()
    for fn in ("capture_hold", "release_hold"):
        expect_error(database.call, "PT404", "hold_not_found", fn, caller, p_hold_id=str(uuid.uuid4()))
        expect_error(database.call, "PT404", "hold_not_found", fn, Caller.service(),
                     p_hold_id=str(uuid.uuid4()))
        detail = expect_error(database.call, "22023", "invalid_argument", fn, Caller.service(),
                              p_hold_id=None)
        assert detail["argument"] == "p_hold_id"


# --- holds that lapse -----------------------------------------------------------------

def test_a_lapsed_hold_stops_counting_at_once(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=2, p_ttl_seconds=1)
    assert database.balance(account_id)["held"] == 2
    time.sleep(1.2)  # real time: no job runs in between
    balance = database.call("get_credit_balance", caller)
    assert (balance["held"], balance["available"]) == (0, 3)
    [row] = select_as(database, caller, "select held, available from public.credit_balances")
    assert (row["held"], row["available"]) == (0, 3)
    # Nothing swept it yet, but it is spendable, and spending settles the hold.
    assert hold_status(database, hold["hold_id"]) == "active"
    result = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=3)
    assert result["balance"]["available"] == 0
    assert hold_status(database, hold["hold_id"]) == "expired"


def test_a_lapsed_hold_cannot_be_captured_or_released(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = reserve(database, caller, account_id, p_amount=2)
    lapse(database, hold["hold_id"])
    for fn in ("capture_hold", "release_hold"):
        assert expect_error(database.call, "PT409", "hold_not_active", fn, caller,
                            p_hold_id=hold["hold_id"]) == {"status": "expired"}
    balance = database.balance(account_id)
    assert (balance["held"], balance["available"], balance["total"]) == (0, 3, 3)
    assert [r["type"] for r in database.ledger(account_id)] == ["grant"]


def test_only_the_lapsed_hold_stops_counting(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    early = reserve(database, caller, account_id, p_amount=2)
    late = reserve(database, caller, account_id, p_amount=3)
    lapse(database, early["hold_id"])
    balance = database.balance(account_id)
    assert (balance["held"], balance["available"]) == (3, 5)
    # A new reservation sweeps the lapsed one and keeps the live one.
    reserve(database, caller, account_id, p_amount=5)
    assert (hold_status(database, early["hold_id"]), hold_status(database, late["hold_id"])) == (
        "expired", "active")
    assert database.balance(account_id)["available"] == 0
    captured = database.call("capture_hold", caller, p_hold_id=late["hold_id"])
    assert captured["balance"]["held"] == 5


def test_a_callers_own_keys_never_block_a_capture(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    hold = reserve(database, caller, account_id, p_amount=2)
    # Keys are the caller's to choose, even ones that look like the engine's own.
    database.call("deduct_credits", caller, p_account_id=account_id,
                  p_idempotency_key=f"hold:{hold['hold_id']}:capture", p_amount=1)
    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"])
    assert (captured["charged"], captured["balance"]["total"]) == (2, 5)
