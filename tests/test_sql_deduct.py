"""deduct_credits and deduct_credits_by_license: spending order, prices and
tokens, idempotency, every error, and what a rejected call leaves untouched."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Caller, Db, expect_error, new_key, snapshot

# Operations priced for this module (names unique to it, so other modules' prices never collide).
PRICES = {
    "ded-flat": (5, 0, 0, False),
    "ded-tokens": (2, "0.5", "1.5", False),
    "ded-exact": (0, 1, 0, False),
    "ded-free": (0, 0, 0, True),
    "ded-huge": (1000000000, 1, 0, False),
}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    for operation, (credits, rate_in, rate_out, free) in PRICES.items():
        database.sql(
            "insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
            "credits_per_1k_output_tokens, free) values (%s, %s, %s, %s, %s) "
            "on conflict (operation) do nothing",
            operation, credits, rate_in, rate_out, free)


def spent(rows: list[dict[str, Any]]) -> list[tuple]:
    return [(r["pool"], r["amount"], r["balance_after"], r["type"]) for r in rows]


def deduct(database: Db, caller: Caller, account_id: str, key: str | None = None, **args: Any) -> Any:
    return database.call("deduct_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key(), **args)


# --- spending ----------------------------------------------------------------------

def test_deduct_takes_the_subscription_pool_first(database: Db) -> None:
    caller, account_id = database.new_user()
    result = deduct(database, caller, account_id, p_amount=2)
    assert set(result) == {"transaction_id", "account_id", "charged", "from_promotional", "from_subscription",
                           "from_purchased", "replayed", "balance"}
    assert (result["account_id"], result["charged"], result["from_subscription"], result["from_purchased"],
            result["replayed"]) == (account_id, 2, 2, 0, False)
    assert result["balance"] == database.balance(account_id)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (1, 0)
    rows = database.ledger(account_id)[1:]
    assert spent(rows) == [("subscription", -2, 1, "spend")]
    assert {str(r["transaction_id"]) for r in rows} == {result["transaction_id"]}
    assert rows[0]["actor_id"] == caller.user_id


def test_deduct_splits_across_pools_when_the_subscription_runs_out(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    result = deduct(database, caller, account_id, p_amount=5)
    assert (result["charged"], result["from_subscription"], result["from_purchased"]) == (5, 3, 2)
    assert (result["balance"]["subscription"], result["balance"]["purchased"]) == (0, 8)
    assert spent(database.ledger(account_id)[2:]) == [
        ("subscription", -3, 0, "spend"), ("purchased", -2, 8, "spend")]

    result = deduct(database, caller, account_id, p_amount=8)
    assert (result["from_subscription"], result["from_purchased"]) == (0, 8)
    assert result["balance"]["total"] == 0
    assert spent(database.ledger(account_id)[4:]) == [("purchased", -8, 0, "spend")]


def test_deduct_records_the_usage(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    result = deduct(database, caller, account_id, p_operation="ded-tokens", p_model="gpt-x",
                    p_input_tokens=1001, p_output_tokens=1, p_metadata={"request": "r-1"})
    row = database.one(
        "select kind::text, -(promotional + subscription + purchased), operation, model, input_tokens, "
        "output_tokens, metadata, actor_id from public.credit_transactions where id = %s",
        result["transaction_id"])
    assert row == ("spend", 3, "ded-tokens", "gpt-x", 1001, 1, {"request": "r-1"}, uuid.UUID(caller.user_id))
    assert all(r["metadata"] == {"request": "r-1"} for r in database.ledger(account_id)[2:])


def test_service_deducts_for_any_account_with_no_actor(database: Db) -> None:
    _, account_id = database.new_user()
    result = deduct(database, Caller.service(), account_id, p_amount=1)
    assert result["balance"]["subscription"] == 2
    assert database.ledger(account_id)[-1]["actor_id"] is None


def test_deduct_may_spend_the_last_credit(database: Db) -> None:
    caller, account_id = database.new_user()
    assert deduct(database, caller, account_id, p_amount=3)["balance"]["available"] == 0
    expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id, p_amount=1)


# --- prices and tokens ---------------------------------------------------------------

@pytest.mark.parametrize(("operation", "tokens", "cost"), [
    ("ded-flat", {}, 5),
    ("ded-flat", {"p_input_tokens": 100000, "p_output_tokens": 100000}, 5),  # no rates: tokens are free
    ("ded-tokens", {}, 2),
    ("ded-tokens", {"p_input_tokens": 1000}, 3),          # 2 + 0.5 = 2.5 -> 3
    ("ded-tokens", {"p_input_tokens": 1001, "p_output_tokens": 1}, 3),  # 2.502 -> 3
    ("ded-tokens", {"p_input_tokens": 2000, "p_output_tokens": 2000}, 6),  # exactly 2 + 1 + 3
    ("ded-tokens", {"p_output_tokens": 1}, 3),            # any fraction rounds up
    ("ded-exact", {"p_input_tokens": 3000}, 3),
])
def test_operation_cost_is_flat_plus_token_rates_rounded_up(database: Db, operation: str,
                                                             tokens: dict[str, int], cost: int) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=20)
    result = deduct(database, caller, account_id, p_operation=operation, **tokens)
    assert result["charged"] == cost
    assert result["balance"]["total"] == 23 - cost
    assert -sum(r["amount"] for r in database.ledger(account_id) if r["type"] == "spend") == cost


@pytest.mark.parametrize(("operation", "tokens"), [
    ("ded-exact", {"p_input_tokens": 0, "p_output_tokens": 0}),
    ("ded-exact", {}),
])
def test_a_spend_that_costs_nothing_is_refused_unless_the_price_is_free(
        database: Db, operation: str, tokens: dict[str, int]) -> None:
    # Priced per token only: with no tokens it would log usage for free, forever.
    caller, account_id = database.new_user()
    database.call("admin_adjust_credits", p_account_id=account_id, p_pool="subscription", p_amount=-3,
                  p_reason="empty", p_idempotency_key=new_key())
    before = snapshot(database, account_id)
    detail = expect_error(deduct, "22023", "invalid_argument", database, caller, account_id,
                          p_operation=operation, **tokens)
    assert detail["argument"] == "p_operation"
    assert snapshot(database, account_id) == before


def test_a_free_operation_is_logged_without_ledger_rows(database: Db) -> None:
    caller, account_id = database.new_user()
    rows = len(database.ledger(account_id))
    result = deduct(database, caller, account_id, p_operation="ded-free", p_model="tiny")
    assert (result["charged"], result["balance"]["total"]) == (0, 3)
    assert len(database.ledger(account_id)) == rows
    assert database.one("select count(*) from public.credit_usage where transaction_id = %s",
                        result["transaction_id"]) == 1


def test_tokens_with_an_amount_are_recorded_but_not_priced(database: Db) -> None:
    caller, account_id = database.new_user()
    result = deduct(database, caller, account_id, p_amount=1, p_model="m", p_input_tokens=50000,
                    p_output_tokens=7)
    assert result["charged"] == 1
    assert database.one("select input_tokens, output_tokens from public.credit_transactions where id = %s",
                        result["transaction_id"]) == (50000, 7)


def test_unknown_operation(database: Db) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(deduct, "PT404", "unknown_operation", database, caller, account_id,
                          p_operation="no-such-operation")
    assert detail == {"operation": "no-such-operation"}
    assert snapshot(database, account_id) == before


def test_a_cost_above_the_limit_is_invalid(database: Db) -> None:
    caller, account_id = database.new_user()
    detail = expect_error(deduct, "22023", "invalid_argument", database, caller, account_id,
                          p_operation="ded-huge", p_input_tokens=1000)
    assert detail["argument"] == "p_operation"


# --- idempotency -------------------------------------------------------------------

def test_same_key_and_arguments_replay_the_first_result(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    key = new_key()
    args = {"p_operation": "ded-tokens", "p_model": "m", "p_input_tokens": 10, "p_metadata": {"a": 1}}
    first = deduct(database, caller, account_id, key, **args)
    after_first = snapshot(database, account_id)

    again = deduct(database, caller, account_id, key, **args)
    assert again == {**first, "replayed": True}
    assert snapshot(database, account_id) == after_first


def test_replay_still_answers_when_the_balance_could_not_pay_again(database: Db) -> None:
    caller, account_id = database.new_user()
    key = new_key()
    first = deduct(database, caller, account_id, key, p_amount=3)
    after_first = snapshot(database, account_id)
    assert after_first.balance["available"] == 0
    assert deduct(database, caller, account_id, key, p_amount=3) == {**first, "replayed": True}
    assert snapshot(database, account_id) == after_first


def test_replay_returns_the_first_result_even_after_other_changes(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    key = new_key()
    first = deduct(database, caller, account_id, key, p_amount=1)
    deduct(database, caller, account_id, p_amount=4)
    after = snapshot(database, account_id)
    again = deduct(database, caller, account_id, key, p_amount=1)
    assert again == {**first, "replayed": True}
    assert again["balance"]["total"] == 12  # the balance as the first call left it
    assert snapshot(database, account_id) == after
    assert after.balance["total"] == 8


@pytest.mark.parametrize("changed", [
    {"p_amount": 2}, {"p_amount": None, "p_operation": "ded-flat"}, {"p_model": "other"},
    {"p_input_tokens": 1}, {"p_metadata": {"x": 2}},
])
def test_same_key_with_other_arguments_conflicts(database: Db, changed: dict[str, Any]) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    key = new_key()
    deduct(database, caller, account_id, key, p_amount=1)
    before = snapshot(database, account_id)
    args = {"p_amount": 1, **changed}
    detail = expect_error(deduct, "PT409", "idempotency_conflict", database, caller, account_id, key, **args)
    assert detail == {"idempotency_key": key}
    assert snapshot(database, account_id) == before


def test_keys_are_per_account(database: Db) -> None:
    caller, account_id = database.new_user()
    other, other_account = database.new_user()
    key = new_key()
    deduct(database, caller, account_id, key, p_amount=1)
    second = deduct(database, other, other_account, key, p_amount=2)
    assert (second["replayed"], second["balance"]["subscription"]) == (False, 1)
    assert database.balance(account_id)["subscription"] == 2


def test_keys_that_look_like_stripes_are_ordinary_keys_of_the_caller(database: Db) -> None:
    # Stripe's records live in a key space of their own: a caller's key, whatever
    # it looks like, neither is refused nor occupies a Stripe grant's key.
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    mine = deduct(database, caller, account_id, "checkout:cs_taken", p_amount=1)
    assert mine["charged"] == 1
    served = deduct(database, Caller.service(), account_id, "stripe:checkout:cs_taken", p_amount=1)
    assert served["charged"] == 1
    pack = database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                         p_type="checkout.session.completed",
                         p_payload={"session": "cs_taken", "mode": "payment", "payment_status": "paid",
                                    "credits": 7, "account_id": account_id, "payment_intent": "pi_taken"})
    assert (pack["outcome"], pack["reason"]) == ("applied", "credits_purchased")
    assert database.balance(account_id)["total"] == 3 + 5 - 2 + 7


# --- rejected calls ----------------------------------------------------------------

def test_insufficient_credits_reports_required_and_available(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2)
    before = snapshot(database, account_id)
    detail = expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id, p_amount=6)
    assert detail == {"required": 6, "available": 5}
    assert snapshot(database, account_id) == before
    # The failed key was not used up: it works once there is money.
    key = new_key()
    expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id, key, p_amount=6)
    database.fund(account_id, purchased=1)
    assert deduct(database, caller, account_id, key, p_amount=6)["replayed"] is False


def test_held_credits_cannot_be_spent(database: Db) -> None:
    caller, account_id = database.new_user()
    database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2)
    before = snapshot(database, account_id)
    detail = expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id, p_amount=2)
    assert detail == {"required": 2, "available": 1}
    assert snapshot(database, account_id) == before
    assert deduct(database, caller, account_id, p_amount=1)["balance"]["available"] == 0


@pytest.mark.parametrize(("args", "argument"), [
    ({"p_amount": 1, "p_operation": "ded-flat"}, "p_amount"),
    ({}, "p_amount"),
    ({"p_amount": 0}, "p_amount"),
    ({"p_amount": -5}, "p_amount"),
    ({"p_amount": 1000000001}, "p_amount"),
    ({"p_amount": 1, "p_input_tokens": -1}, "p_input_tokens"),
    ({"p_operation": "ded-tokens", "p_output_tokens": -1}, "p_output_tokens"),
    ({"p_operation": ""}, "p_operation"),
    ({"p_operation": "x" * 129}, "p_operation"),
    ({"p_amount": 1, "p_idempotency_key": ""}, "p_idempotency_key"),
    ({"p_amount": 1, "p_idempotency_key": "k" * 256}, "p_idempotency_key"),
    ({"p_amount": 1, "p_idempotency_key": None}, "p_idempotency_key"),
])
def test_invalid_arguments(database: Db, args: dict[str, Any], argument: str) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    call_args = {"p_account_id": account_id, "p_idempotency_key": new_key(), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "deduct_credits", caller, **call_args)
    assert detail["argument"] == argument
    assert detail["reason"]
    assert snapshot(database, account_id) == before


def test_boundary_amount_and_key_lengths_are_accepted(database: Db) -> None:
    caller, account_id = database.new_user()
    detail = expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id,
                          p_amount=1000000000)
    assert detail["required"] == 1000000000
    assert deduct(database, caller, account_id, "k" * 255, p_amount=1)["charged"] == 1
    assert deduct(database, caller, account_id, "k", p_amount=1)["charged"] == 1


def test_unknown_or_missing_account(database: Db) -> None:
    expect_error(deduct, "PT404", "account_not_found", database, Caller.service(), str(uuid.uuid4()),
                 p_amount=1)
    detail = expect_error(database.call, "22023", "invalid_argument", "deduct_credits", Caller.service(),
                          p_account_id=None, p_idempotency_key=new_key(), p_amount=1)
    assert detail["argument"] == "p_account_id"


# --- license keys ------------------------------------------------------------------

def license_key(database: Db, account_id: str, **args: Any) -> dict[str, Any]:
    return database.call("create_license_key", p_account_id=account_id, p_name="server", **args)


def by_license(database: Db, key: str, idem: str | None = None, **args: Any) -> Any:
    return database.call("deduct_credits_by_license", p_license_key=key,
                         p_idempotency_key=idem or new_key(), **args)


def test_license_deduct_spends_from_the_keys_account(database: Db) -> None:
    _, account_id = database.new_user()
    _, bystander = database.new_user()
    database.fund(account_id, purchased=4)
    key = license_key(database, account_id)["key"]
    result = by_license(database, key, p_operation="ded-flat", p_model="m", p_input_tokens=3)
    assert (result["account_id"], result["charged"]) == (account_id, 5)
    assert (result["from_subscription"], result["from_purchased"]) == (3, 2)
    assert result["balance"] == database.balance(account_id)
    assert spent(database.ledger(account_id)[2:]) == [
        ("subscription", -3, 0, "spend"), ("purchased", -2, 2, "spend")]
    assert database.one("select operation, model, input_tokens from public.credit_usage "
                        "where transaction_id = %s", result["transaction_id"]) == ("ded-flat", "m", 3)
    assert database.balance(bystander)["total"] == 3


def test_license_deduct_replays_and_conflicts(database: Db) -> None:
    _, account_id = database.new_user()
    key = license_key(database, account_id)["key"]
    idem = new_key()
    first = by_license(database, key, idem, p_amount=1)
    after = snapshot(database, account_id)
    assert by_license(database, key, idem, p_amount=1) == {**first, "replayed": True}
    expect_error(by_license, "PT409", "idempotency_conflict", database, key, idem, p_amount=2)
    assert snapshot(database, account_id) == after


def test_license_and_user_deducts_share_the_accounts_keys(database: Db) -> None:
    caller, account_id = database.new_user()
    key = license_key(database, account_id)["key"]
    idem = new_key()
    first = deduct(database, caller, account_id, idem, p_amount=1)
    assert by_license(database, key, idem, p_amount=1) == {**first, "replayed": True}
    assert database.balance(account_id)["total"] == 2


def test_license_deduct_insufficient(database: Db) -> None:
    _, account_id = database.new_user()
    key = license_key(database, account_id)["key"]
    before = snapshot(database, account_id)
    assert expect_error(by_license, "PT402", "insufficient_credits", database, key, p_amount=4) == {
        "required": 4, "available": 3}
    assert snapshot(database, account_id) == before


def test_license_key_checks_in_order(database: Db) -> None:
    _, account_id = database.new_user()
    created = license_key(database, account_id)
    key = created["key"]
    before = snapshot(database, account_id)
    for bad in ("ck_" + "0" * 64, "short", key[:-1], key + "x", None):
        expect_error(by_license, "PT403", "invalid_license_key", database, bad, p_amount=1)
    # An expired key is expired...
    database.sql("update public.credit_license_keys set expires_at = now() - interval '1 second' "
                 "where id = %s", created["key_id"])
    expect_error(by_license, "PT403", "license_key_expired", database, key, p_amount=1)
    # ...but a revoked one is inactive first, whatever its expiry.
    database.call("revoke_license_key", p_key_id=created["key_id"])
    expect_error(by_license, "PT403", "license_key_inactive", database, key, p_amount=1)
    assert snapshot(database, account_id) == before


def test_license_key_is_checked_before_the_arguments(database: Db) -> None:
    expect_error(by_license, "PT403", "invalid_license_key", database, "ck_" + "1" * 64, "", p_amount=0)
    _, account_id = database.new_user()
    key = license_key(database, account_id)["key"]
    detail = expect_error(by_license, "22023", "invalid_argument", database, key, p_amount=0)
    assert detail["argument"] == "p_amount"
    expect_error(by_license, "PT404", "unknown_operation", database, key, p_operation="no-such-operation")


def test_a_key_with_a_future_expiry_works(database: Db) -> None:
    _, account_id = database.new_user()
    key = database.call("create_license_key", p_account_id=account_id, p_name="ci",
                        p_expires_at="2999-01-01T00:00:00Z")["key"]
    assert by_license(database, key, p_amount=2)["balance"]["total"] == 1


# --- the books always balance ------------------------------------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("buy"), st.integers(1, 20)),
        st.tuples(st.just("spend"), st.integers(1, 25)),
        st.tuples(st.just("refund"), st.integers(0, 30)),
        st.tuples(st.just("adjust"), st.sampled_from(["subscription", "purchased"]), st.integers(-10, 10)),
    ),
    min_size=1, max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_any_sequence_keeps_balance_equal_to_the_ledger(database: Db, operations: list[tuple]) -> None:
    caller, account_id = database.new_user()
    expected = {"subscription": 3, "purchased": 0}
    spends: list[tuple[str, int]] = []  # (transaction id, refundable)
    for op in operations:
        if op[0] == "buy":
            database.fund(account_id, purchased=op[1])
            expected["purchased"] += op[1]
        elif op[0] == "spend":
            total = expected["subscription"] + expected["purchased"]
            if op[1] > total:
                expect_error(deduct, "PT402", "insufficient_credits", database, caller, account_id,
                             p_amount=op[1])
                continue
            result = deduct(database, caller, account_id, p_amount=op[1])
            from_sub = min(expected["subscription"], op[1])
            assert (result["from_subscription"], result["from_purchased"]) == (from_sub, op[1] - from_sub)
            expected["subscription"] -= from_sub
            expected["purchased"] -= op[1] - from_sub
            spends.append((result["transaction_id"], op[1]))
        elif op[0] == "refund" and spends:
            tx, left = spends[-1]
            if op[1] == 0 or op[1] > left:
                expect_error(database.call, "22023", "invalid_argument", "refund_credits",
                             p_transaction_id=tx, p_idempotency_key=new_key(), p_amount=op[1])
                continue
            database.call("refund_credits", p_transaction_id=tx, p_idempotency_key=new_key(), p_amount=op[1])
            spends[-1] = (tx, left - op[1])
            expected["purchased"] += op[1]
        elif op[0] == "adjust" and op[2] != 0:
            pool, amount = op[1], op[2]
            call = {"p_account_id": account_id, "p_pool": pool, "p_amount": amount, "p_reason": "property",
                    "p_idempotency_key": new_key()}
            if expected[pool] + amount < 0:
                expect_error(database.call, "PT402", "insufficient_credits", "admin_adjust_credits", **call)
                continue
            database.call("admin_adjust_credits", **call)
            expected[pool] += amount

    balance = database.balance(account_id)
    assert {"subscription": balance["subscription"], "purchased": balance["purchased"]} == expected
    for pool in ("subscription", "purchased"):
        rows = [r for r in database.ledger(account_id) if r["pool"] == pool]
        assert sum(r["amount"] for r in rows) == expected[pool]
        assert all(r["balance_after"] >= 0 for r in rows)
        # Each row's balance_after is the running sum: the ledger tells the story in order.
        running = 0
        for r in rows:
            running += r["amount"]
            assert r["balance_after"] == running


def test_any_fresh_key_is_a_first_call(database: Db) -> None:
    caller, account_id = database.new_user()
    # The account's opening grant is not a call of the user's: its key must not be in the way.
    for key in ("signup", "grant", "monthly_reset"):
        result = deduct(database, caller, account_id, key, p_amount=1)
        assert result["replayed"] is False
    assert database.balance(account_id)["total"] == 0


def test_null_metadata_is_an_empty_object(database: Db) -> None:
    caller, account_id = database.new_user()
    key = database.call("create_license_key", p_account_id=account_id, p_name="k")["key"]
    first = deduct(database, caller, account_id, p_amount=1, p_metadata=None)
    second = by_license(database, key, p_amount=1, p_metadata=None)
    assert (first["charged"], second["balance"]["total"]) == (1, 1)
    assert [r["metadata"] for r in database.ledger(account_id)[1:]] == [{}, {}]
    assert database.one("select metadata from public.credit_usage where transaction_id = %s",
                        first["transaction_id"]) == {}


# --- a null account: the caller's personal account ---------------------------------


def test_a_null_account_is_the_callers_own_for_users_only(database: Db) -> None:
    caller, account_id = database.new_user()
    other, other_account = database.new_user()
    spend = deduct(database, caller, None, p_amount=1)  # type: ignore[arg-type]
    assert (spend["account_id"], spend["charged"]) == (account_id, 1)
    hold = database.call("reserve_credits", caller, p_account_id=None, p_idempotency_key=new_key(),
                         p_amount=1)
    assert hold["account_id"] == account_id
    assert database.balance(account_id)["available"] == 1
    assert database.balance(other_account)["available"] == 3  # nobody else's
    # The service has no personal account: it must say which.
    before = snapshot(database, account_id)
    detail = expect_error(deduct, "22023", "invalid_argument", database, Caller.service(), None, p_amount=1)
    assert detail.get("argument") == "p_account_id"
    expect_error(database.call, "22023", "invalid_argument", "reserve_credits", Caller.service(),
                 p_account_id=None, p_idempotency_key=new_key(), p_amount=1)
    assert snapshot(database, account_id) == before
    assert other.user_id != caller.user_id
