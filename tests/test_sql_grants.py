"""Money in and out by the service: purchased credits, subscription periods,
expiring the allowance, and admin adjustments."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from tests.support import Db, expect_error, new_key, snapshot

UTC = dt.UTC


def period(year: int, month: int, day: int = 1) -> tuple[str, str]:
    """A one-month period starting at the given day (ISO strings, UTC)."""
    start = dt.datetime(year, month, day, tzinfo=UTC)
    end = dt.datetime(year + month // 12, month % 12 + 1, day, tzinfo=UTC)
    return start.isoformat(), end.isoformat()


def rows(database: Db, account_id: str, skip: int = 0) -> list[tuple]:
    return [(r["pool"], r["amount"], r["balance_after"], r["type"])
            for r in database.ledger(account_id)[skip:]]


def purchase(database: Db, account_id: str, amount: int, key: str | None = None, **args: Any) -> Any:
    return database.call("add_purchased_credits", p_account_id=account_id, p_amount=amount,
                         p_idempotency_key=key or new_key(), **args)


def subscription(database: Db, account_id: str, amount: int, when: tuple[str, str], key: str | None = None,
                 **args: Any) -> Any:
    return database.call("add_subscription_credits", p_account_id=account_id, p_amount=amount,
                         p_period_start=when[0], p_period_end=when[1], p_idempotency_key=key or new_key(),
                         **args)


def adjust(database: Db, account_id: str, pool: str, amount: int, key: str | None = None,
           reason: str | None = "support ticket 42") -> Any:
    return database.call("admin_adjust_credits", p_account_id=account_id, p_pool=pool, p_amount=amount,
                         p_reason=reason, p_idempotency_key=key or new_key())


# --- purchased credits ---------------------------------------------------------------

def test_purchase_adds_to_the_purchased_pool(database: Db) -> None:
    _, account_id = database.new_user()
    result = purchase(database, account_id, 50, p_stripe_ref="pi_grant_1", p_description="50 pack",
                      p_metadata={"price": "price_50"})
    assert set(result) == {"transaction_id", "added", "replayed", "balance"}
    assert (result["added"], result["replayed"]) == (50, False)
    assert result["balance"] == database.balance(account_id)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (3, 50)
    [row] = database.ledger(account_id)[1:]
    assert (row["pool"], row["amount"], row["balance_after"], row["type"], row["stripe_ref"]) == (
        "purchased", 50, 50, "purchase", "pi_grant_1")
    assert row["metadata"] == {"price": "price_50"}
    assert (row["period_start"], row["actor_id"]) == (None, None)
    assert database.one("select kind::text, purchased, stripe_ref, description "
                        "from public.credit_transactions where id = %s",
                        result["transaction_id"]) == ("purchase", 50, "pi_grant_1", "50 pack")
    assert purchase(database, account_id, 7)["balance"]["purchased"] == 57
    assert rows(database, account_id, 2) == [("purchased", 7, 57, "purchase")]


def test_purchase_replays_and_conflicts(database: Db) -> None:
    _, account_id = database.new_user()
    key = new_key()
    first = purchase(database, account_id, 10, key, p_stripe_ref="pi_grant_2")
    after = snapshot(database, account_id)
    assert purchase(database, account_id, 10, key, p_stripe_ref="pi_grant_2") == {**first, "replayed": True}
    for amount, changed in ((11, {"p_stripe_ref": "pi_grant_2"}), (10, {"p_stripe_ref": "pi_other"}),
                            (10, {"p_stripe_ref": "pi_grant_2", "p_description": "x"}),
                            (10, {"p_stripe_ref": "pi_grant_2", "p_metadata": {"a": 1}})):
        assert expect_error(purchase, "PT409", "idempotency_conflict", database, account_id, amount, key,
                            **changed) == {"idempotency_key": key}
    assert snapshot(database, account_id) == after
    assert after.balance["purchased"] == 10


@pytest.mark.parametrize(("amount", "key", "argument"), [
    (0, None, "p_amount"), (-1, None, "p_amount"), (1000000001, None, "p_amount"), (None, None, "p_amount"),
    (1, "", "p_idempotency_key"), (1, "k" * 256, "p_idempotency_key"),
])
def test_purchase_rejects_invalid_arguments(database: Db, amount: int | None, key: str | None,
                                            argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "add_purchased_credits",
                          p_account_id=account_id, p_amount=amount,
                          p_idempotency_key=new_key() if key is None else key)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_purchase_limits_and_unknown_account(database: Db) -> None:
    _, account_id = database.new_user()
    assert purchase(database, account_id, 1000000000)["balance"]["purchased"] == 1000000000
    expect_error(purchase, "PT404", "account_not_found", database, str(uuid.uuid4()), 1)


# --- subscription periods ------------------------------------------------------------

def test_a_new_period_expires_the_leftover_and_grants(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=4)
    database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=1)
    old = database.balance(account_id)
    when = period(2099, 1, 15)
    result = subscription(database, account_id, 100, when, p_stripe_ref="in_grant_1")
    assert {"expired", "granted", "replayed", "balance"} <= set(result)
    assert (result["expired"], result["granted"], result["replayed"]) == (2, 100, False)
    balance = result["balance"]
    assert balance == database.balance(account_id)
    assert (balance["subscription"], balance["purchased"]) == (100, 4)
    assert (dt.datetime.fromisoformat(balance["period_start"]).isoformat(),
            dt.datetime.fromisoformat(balance["period_end"]).isoformat()) == when

    expire, grant = database.ledger(account_id)[-2:]
    assert (expire["pool"], expire["amount"], expire["balance_after"], expire["type"]) == (
        "subscription", -2, 0, "expire")
    # The expiry belongs to the old period, the grant to the new one.
    assert (expire["period_start"], expire["period_end"]) == (old["period_start"], old["period_end"])
    assert (grant["pool"], grant["amount"], grant["balance_after"], grant["type"]) == (
        "subscription", 100, 100, "grant")
    assert dt.datetime.fromisoformat(grant["period_start"]).isoformat() == when[0]
    assert {expire["stripe_ref"], grant["stripe_ref"]} == {"in_grant_1"}


def test_an_older_period_changes_nothing(database: Db) -> None:
    _, account_id = database.new_user()
    subscription(database, account_id, 50, period(2099, 3))
    before = snapshot(database, account_id)
    result = subscription(database, account_id, 80, period(2099, 2))
    assert (result["expired"], result["granted"], result["replayed"]) == (0, 0, False)
    after = snapshot(database, account_id)
    assert (after.balance, after.ledger_rows) == (before.balance, before.ledger_rows)
    assert after.balance["subscription"] == 50


def test_a_second_grant_for_the_same_period_replaces_the_allowance(database: Db) -> None:
    _, account_id = database.new_user()
    when = period(2099, 5)
    subscription(database, account_id, 50, when)
    result = subscription(database, account_id, 70, when)
    assert (result["expired"], result["granted"], result["balance"]["subscription"]) == (50, 70, 70)
    assert rows(database, account_id, -2) == [("subscription", -50, 0, "expire"),
                                              ("subscription", 70, 70, "grant")]


def test_a_zero_grant_still_starts_the_period(database: Db) -> None:
    _, account_id = database.new_user()
    when = period(2099, 6)
    result = subscription(database, account_id, 0, when)
    assert (result["expired"], result["granted"], result["balance"]["subscription"]) == (3, 0, 0)
    assert dt.datetime.fromisoformat(result["balance"]["period_start"]).isoformat() == when[0]
    assert rows(database, account_id, 1) == [("subscription", -3, 0, "expire")]


def test_a_new_period_does_not_expire_held_credits(database: Db) -> None:
    caller, account_id = database.new_user()
    hold = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=2)
    result = subscription(database, account_id, 10, period(2099, 7))
    assert (result["expired"], result["balance"]["subscription"], result["balance"]["held"]) == (1, 12, 2)
    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"])
    assert captured["balance"]["subscription"] == 10


def test_subscription_grant_replays_and_conflicts(database: Db) -> None:
    _, account_id = database.new_user()
    key = new_key()
    when = period(2099, 8)
    first = subscription(database, account_id, 30, when, key, p_stripe_ref="in_grant_2")
    database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=5)
    after = snapshot(database, account_id)
    # A retried invoice does not grant again, and does not expire what was spent meanwhile.
    assert subscription(database, account_id, 30, when, key, p_stripe_ref="in_grant_2") == {
        **first, "replayed": True}
    for amount, other, changed in ((31, when, {}), (30, period(2099, 9), {}),
                                   (30, when, {"p_stripe_ref": "in_other"}),
                                   (30, when, {"p_metadata": {"a": 1}})):
        args = {"p_stripe_ref": "in_grant_2", **changed}
        expect_error(subscription, "PT409", "idempotency_conflict", database, account_id, amount, other, key,
                     **args)
    assert snapshot(database, account_id) == after
    assert after.balance["subscription"] == 25


@pytest.mark.parametrize(("amount", "when", "argument"), [
    (-1, period(2099, 10), "p_amount"),
    (1000000001, period(2099, 10), "p_amount"),
    (5, ("2099-10-01T00:00:00Z", "2099-10-01T00:00:00Z"), "p_period_end"),
    (5, ("2099-10-01T00:00:00Z", "2099-09-01T00:00:00Z"), "p_period_end"),
    (5, (None, "2099-10-01T00:00:00Z"), "p_period_start"),
    (5, ("2099-10-01T00:00:00Z", None), "p_period_end"),
])
def test_subscription_grant_rejects_invalid_arguments(database: Db, amount: int, when: tuple,
                                                      argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(subscription, "22023", "invalid_argument", database, account_id, amount, when)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


# --- expiring the allowance ----------------------------------------------------------

def test_expire_empties_the_subscription_pool_only(database: Db) -> None:
    _, account_id = database.new_user()
    database.fund(account_id, purchased=6)
    key = new_key()
    result = database.call("expire_subscription_credits", p_account_id=account_id, p_idempotency_key=key)
    assert {"expired", "replayed", "balance"} <= set(result)
    assert (result["expired"], result["replayed"]) == (3, False)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (0, 6)
    assert rows(database, account_id, 2) == [("subscription", -3, 0, "expire")]
    after = snapshot(database, account_id)
    assert database.call("expire_subscription_credits", p_account_id=account_id, p_idempotency_key=key) == {
        **result, "replayed": True}
    assert snapshot(database, account_id) == after
    # Nothing left: a new key expires nothing and writes no ledger row.
    again = database.call("expire_subscription_credits", p_account_id=account_id, p_idempotency_key=new_key())
    assert again["expired"] == 0
    assert snapshot(database, account_id).ledger_rows == after.ledger_rows


def test_expire_errors(database: Db) -> None:
    _, account_id = database.new_user()
    key = new_key()
    database.fund(account_id, purchased=1)
    purchase(database, account_id, 1, key)
    before = snapshot(database, account_id)
    expect_error(database.call, "PT409", "idempotency_conflict", "expire_subscription_credits",
                 p_account_id=account_id, p_idempotency_key=key)
    detail = expect_error(database.call, "22023", "invalid_argument", "expire_subscription_credits",
                          p_account_id=account_id, p_idempotency_key="")
    assert detail["argument"] == "p_idempotency_key"
    assert snapshot(database, account_id) == before
    expect_error(database.call, "PT404", "account_not_found", "expire_subscription_credits",
                 p_account_id=str(uuid.uuid4()), p_idempotency_key=new_key())


# --- admin adjustments -----------------------------------------------------------------

@pytest.mark.parametrize("pool", ["subscription", "purchased"])
def test_adjust_either_pool_up_and_down(database: Db, pool: str) -> None:
    _, account_id = database.new_user()
    up = adjust(database, account_id, pool, 10)
    assert set(up) == {"transaction_id", "replayed", "balance"}
    start = 3 if pool == "subscription" else 0
    assert up["balance"][pool] == start + 10
    down = adjust(database, account_id, pool, -4)
    assert down["balance"][pool] == start + 6
    assert down["balance"] == database.balance(account_id)
    assert rows(database, account_id, 1) == [(pool, 10, start + 10, "adjustment"),
                                             (pool, -4, start + 6, "adjustment")]
    assert all(r["metadata"] == {"reason": "support ticket 42"} for r in database.ledger(account_id)[1:])
    other = "purchased" if pool == "subscription" else "subscription"
    assert down["balance"][other] == 3 - start


def test_adjust_never_goes_below_zero_or_into_held_credits(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2)
    before = snapshot(database, account_id)
    assert expect_error(adjust, "PT402", "insufficient_credits", database, account_id, "subscription",
                        -2) == {"required": 2, "available": 1}
    assert expect_error(adjust, "PT402", "insufficient_credits", database, account_id, "purchased",
                        -1) == {"required": 1, "available": 0}
    assert snapshot(database, account_id) == before
    assert adjust(database, account_id, "subscription", -1)["balance"]["subscription"] == 2


def test_adjust_replays_and_conflicts(database: Db) -> None:
    _, account_id = database.new_user()
    key = new_key()
    first = adjust(database, account_id, "purchased", 5, key)
    after = snapshot(database, account_id)
    assert adjust(database, account_id, "purchased", 5, key) == {**first, "replayed": True}
    for pool, amount, reason in (("purchased", 6, "support ticket 42"),
                                 ("subscription", 5, "support ticket 42"),
                                 ("purchased", 5, "another reason")):
        expect_error(adjust, "PT409", "idempotency_conflict", database, account_id, pool, amount, key, reason)
    assert snapshot(database, account_id) == after


@pytest.mark.parametrize(("pool", "amount", "reason", "key", "argument"), [
    ("bonus", 1, "r", None, "p_pool"),
    (None, 1, "r", None, "p_pool"),
    ("purchased", 0, "r", None, "p_amount"),
    ("purchased", None, "r", None, "p_amount"),
    ("purchased", 1000000001, "r", None, "p_amount"),
    ("purchased", -1000000001, "r", None, "p_amount"),
    ("purchased", 1, "", None, "p_reason"),
    ("purchased", 1, "   ", None, "p_reason"),
    ("purchased", 1, None, None, "p_reason"),
    ("purchased", 1, "r" * 1001, None, "p_reason"),
    ("purchased", 1, "r", "", "p_idempotency_key"),
])
def test_adjust_rejects_invalid_arguments(database: Db, pool: str | None, amount: int | None,
                                          reason: str | None, key: str | None, argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", "admin_adjust_credits",
                          p_account_id=account_id, p_pool=pool, p_amount=amount, p_reason=reason,
                          p_idempotency_key=new_key() if key is None else key)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_adjust_limits(database: Db) -> None:
    _, account_id = database.new_user()
    assert adjust(database, account_id, "purchased", 1000000000)["balance"]["purchased"] == 1000000000
    assert adjust(database, account_id, "purchased", -1000000000)["balance"]["purchased"] == 0
    expect_error(adjust, "PT404", "account_not_found", database, str(uuid.uuid4()), "purchased", 1)
