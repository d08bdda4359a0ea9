"""The spend's fast paths write exactly what the checked paths write.

A reserve (private.reserve_credits) and a whole capture (private.capture_hold)
take a fast path in the common case and hand every other case to the checked
code (private.reserve_checked, private.settle_hold). Each scenario runs the
same call on two identical accounts, once through the fast path and once
through the checked code directly, and compares the answers, the hold, the
ledger row, the wallet and the grants. The session counts function calls
(track_functions) to prove which path ran.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support import Db, expect_error, new_key
from tests.test_sql_pg15 import pg15  # noqa: F401  (the PostgreSQL 15 cluster, when installed)

# Operations priced for this module (names unique to it).
PRICE = ("fp-llm", 1, "1", "2")  # 1 + 1 per 1,000 input + 2 per 1,000 output tokens

RESERVE_ARGS = ("p_account_id", "p_idempotency_key", "p_amount", "p_operation", "p_ttl_seconds", "p_metadata",
                "p_model", "p_input_tokens", "p_output_tokens", "p_overage")

# Columns that differ between two accounts by identity or by the instant of the call.
WALLET_NOISE = {"account_id", "period_grant", "next_hold_expiry", "hold_minute", "split_promotional",
                "split_subscription", "front_before", "period_start", "period_end"}
HOLD_NOISE = {"id", "account_id", "transaction_id", "created_at", "expires_at", "settled_at", "parts",
              "result",
              "period_start", "period_end"}
ROW_NOISE = {"seq", "id", "account_id", "created_at", "ref_id", "idempotency_key", "next_expiry_at",
             "period_start", "period_end",
             "outcome"}


def add_price(database: Db) -> None:
    operation, credits, rate_in, rate_out = PRICE
    database.sql("insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
                 "credits_per_1k_output_tokens) values (%s, %s, %s, %s) on conflict (operation) do nothing",
                 operation, credits, rate_in, rate_out)


@pytest.fixture(scope="module", autouse=True)
def _price(database: Db) -> None:
    add_price(database)


def counted(database: Db, function: str, call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()`` in one transaction that counts calls of ``private.<function>``."""
    query = ("select coalesce(sum(calls), 0) from pg_stat_xact_user_functions "
             "where schemaname = 'private' and funcname = %s")
    with database.conn.transaction():
        database.sql("set local track_functions = 'pl'")
        # (The counts are the session's not yet reported: the difference is this call's.)
        before = database.sql(query, function)[0][0]
        result = call()
        calls = database.sql(query, function)[0][0] - before
    return result, int(calls)


def reserve_sql(database: Db, function: str, args: dict[str, Any]) -> dict[str, Any]:
    full = {"p_amount": None, "p_operation": None, "p_ttl_seconds": 900, "p_metadata": {}, "p_model": None,
            "p_input_tokens": None, "p_output_tokens": None, "p_overage": "reject", **args}
    values = [json.dumps(full[a]) if a == "p_metadata" else full[a] for a in RESERVE_ARGS]
    return database.one(f"select private.{function}(%s::uuid, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)",
                        *values)


def capture_sql(database: Db, function: str, hold_id: str, amount: int | None = None,
                metadata: dict[str, Any] | None = None, input_tokens: int | None = None,
                output_tokens: int | None = None, model: str | None = None) -> dict[str, Any]:
    meta = json.dumps(metadata or {})
    if function == "capture_hold":
        return database.one("select private.capture_hold(%s::uuid, %s, %s::jsonb, %s, %s, %s)",
                            hold_id, amount, meta, input_tokens, output_tokens, model)
    return database.one("select private.settle_hold(%s::uuid, %s, %s::jsonb, true, %s, %s, %s)",
                        hold_id, amount, meta, input_tokens, output_tokens, model)


def twins(database: Db, purchased: int = 100, spent: int = 0) -> tuple[str, str]:
    """Two accounts in the same state: a new user's allowance, ``purchased`` bought, ``spent`` deducted."""
    accounts = []
    for _ in range(2):
        _, account_id = database.new_user()
        database.fund(account_id, purchased=purchased)
        if spent:
            database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key(),
                          p_amount=spent)
        accounts.append(account_id)
    return accounts[0], accounts[1]


def state(database: Db, account_id: str) -> dict[str, Any]:
    """What a call leaves behind, without what differs by identity or time."""
    wallet = database.one("select to_jsonb(w) from public.credit_wallets w where account_id = %s", account_id)
    grants = database.sql("select pool, source, granted, remaining from private.grants where account_id = %s "
                          "order by created_at, pool", account_id)
    holds = database.sql("select to_jsonb(h) from public.credit_holds h where account_id = %s "
                         "order by created_at",
                         account_id)
    rows = database.sql("select to_jsonb(t) from public.credit_transactions t where account_id = %s "
                        "order by seq",
                        account_id)
    # The next hold to lapse is what the wallet caches.
    assert database.one("select w.next_hold_expiry is not distinct from (select min(h.expires_at) "
                        "from public.credit_holds h where h.account_id = w.account_id "
                        "and h.status = 'active') from public.credit_wallets w where w.account_id = %s",
                        account_id)
    return {
        "wallet": {k: v for k, v in wallet.items() if k not in WALLET_NOISE},
        "grants": grants,
        "holds": [({k: v for k, v in h.items() if k not in HOLD_NOISE}, parts(database, h["parts"]),
                   answer(h["result"])) for (h,) in holds],
        "rows": [{k: v for k, v in r.items() if k not in ROW_NOISE} for (r,) in rows],
    }


def parts(database: Db, value: list[dict[str, Any]]) -> list[tuple]:
    """A hold's parts with each grant named by what it is rather than its id."""
    named = []
    for part in value:
        found = database.sql("select source, granted from private.grants where id = %s", part["g"])
        named.append((part["p"], part["a"], tuple(found[0]) if found else "allowance"))
    return named


def answer(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    noise = {"hold_id", "transaction_id", "account_id", "expires_at"}
    out = {k: v for k, v in value.items() if k not in noise}
    if "balance" in out:
        out["balance"] = {k: v for k, v in out["balance"].items()
                          if k not in {"account_id", "period_start", "period_end", "next_expiry"}}
    return out


RESERVES = {
    "from the allowance": ({"p_amount": 2}, 0),
    "across the allowance and a purchase": ({"p_amount": 5}, 0),
    "from a purchase": ({"p_amount": 40}, 3),
    "priced from tokens": ({"p_operation": PRICE[0], "p_input_tokens": 1200, "p_output_tokens": 900,
                            "p_model": "m-1", "p_metadata": {"job": "a"}, "p_overage": "if_available"}, 1),
}


@pytest.mark.parametrize("case", RESERVES)
def test_a_fast_reserve_writes_what_the_checked_reserve_writes(database: Db, case: str) -> None:
    reserve_then_capture_on_both_paths(database, case)


@pytest.mark.parametrize("case", RESERVES)
def test_the_fast_paths_match_on_postgresql_15(pg15: Db, case: str) -> None:  # noqa: F811
    add_price(pg15)
    reserve_then_capture_on_both_paths(pg15, case)


def reserve_then_capture_on_both_paths(database: Db, case: str) -> None:
    args, spent = RESERVES[case]
    fast_account, checked_account = twins(database, spent=spent)
    key = new_key()
    fast, checked_calls = counted(database, "reserve_checked", lambda: reserve_sql(
        database, "reserve_credits", {"p_account_id": fast_account, "p_idempotency_key": key, **args}))
    assert checked_calls == 0, "the fast path handed the call on"
    checked = reserve_sql(database, "reserve_checked",
                          {"p_account_id": checked_account, "p_idempotency_key": key, **args})
    assert answer(fast) == answer(checked)
    assert state(database, fast_account) == state(database, checked_account)
    # Both holds then capture whole, through the fast capture and the checked settle.
    fast_capture, settle_calls = counted(database, "settle_hold",
                                         lambda: capture_sql(database, "capture_hold", fast["hold_id"]))
    assert settle_calls == 0, "the fast capture handed the call on"
    checked_capture = capture_sql(database, "settle_hold", checked["hold_id"])
    assert answer(fast_capture) == answer(checked_capture)
    assert state(database, fast_account) == state(database, checked_account)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


CAPTURES = {
    "by its amount": {"amount": 6},
    "with metadata and a model": {"metadata": {"trace": "t-1"}, "model": "m-2"},
    "by tokens costing the hold": {"input_tokens": 1000, "output_tokens": 2000},
}


@pytest.mark.parametrize("case", CAPTURES)
def test_a_fast_capture_writes_what_the_checked_capture_writes(database: Db, case: str) -> None:
    fast_account, checked_account = twins(database, spent=3)
    args = ({"p_operation": PRICE[0], "p_input_tokens": 2000, "p_output_tokens": 1500} if "input_tokens" in
            CAPTURES[case] else {"p_amount": 6})
    holds = [reserve_sql(database, "reserve_credits", {"p_account_id": a, "p_idempotency_key": "h", **args})
             for a in (fast_account, checked_account)]
    assert holds[0]["amount"] == 6
    fast, settle_calls = counted(database, "settle_hold",
                                 lambda: capture_sql(database, "capture_hold", holds[0]["hold_id"],
                                                     **CAPTURES[case]))
    assert settle_calls == 0
    checked = capture_sql(database, "settle_hold", holds[1]["hold_id"], **CAPTURES[case])
    assert answer(fast) == answer(checked)
    assert fast["charged"] == 6 and fast["released"] == 0
    assert state(database, fast_account) == state(database, checked_account)


def test_the_other_cases_go_to_the_checked_paths(database: Db) -> None:
    fast_account, _ = twins(database, spent=3)
    # A partial capture (credits go back to their grants) is the checked path's.
    hold = reserve_sql(database, "reserve_credits", {"p_account_id": fast_account, "p_idempotency_key": "p",
                                                     "p_amount": 5})
    result, settle_calls = counted(database, "settle_hold",
                                   lambda: capture_sql(database, "capture_hold", hold["hold_id"], amount=2))
    assert settle_calls == 1 and (result["charged"], result["released"]) == (2, 3)
    # An overdraft hold, and a reserve on an account with debt or limits, likewise.
    _, checked_calls = counted(database, "reserve_checked", lambda: reserve_sql(
        database, "reserve_credits", {"p_account_id": fast_account, "p_idempotency_key": "o", "p_amount": 1,
                                      "p_overage": "overdraft"}))
    assert checked_calls == 1
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def wallet_row(database: Db, account_id: str) -> dict[str, Any]:
    row = database.one("select to_jsonb(w) from public.credit_wallets w where account_id = %s", account_id)
    scratch = {"split_promotional", "split_subscription", "front_before"}
    return {k: v for k, v in row.items() if k not in scratch}


def test_a_replayed_fast_reserve_changes_nothing(database: Db) -> None:
    user, account_id = database.new_user()
    database.fund(account_id, purchased=50)
    database.call("reserve_credits", user, p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2,
                  p_ttl_seconds=3600)  # another active hold: the replay must keep its expiry as the next
    key = new_key()
    first = database.call("reserve_credits", user, p_account_id=account_id, p_idempotency_key=key, p_amount=4)
    before = wallet_row(database, account_id)
    holds = database.one("select count(*) from public.credit_holds where account_id = %s", account_id)
    again = database.call("reserve_credits", user, p_account_id=account_id, p_idempotency_key=key, p_amount=4)
    assert again == {**first, "replayed": True}
    assert wallet_row(database, account_id) == before
    expect_error(database.call, "PT409", "idempotency_conflict", "reserve_credits", user,
                 p_account_id=account_id, p_idempotency_key=key, p_amount=5)
    assert wallet_row(database, account_id) == before
    assert database.one("select count(*) from public.credit_holds where account_id = %s", account_id) == holds
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_users_fast_reserve_and_capture_name_the_user(database: Db) -> None:
    user, account_id = database.new_user()
    database.fund(account_id, purchased=20)
    hold = database.call("reserve_credits", user, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=4)
    captured = database.call("capture_hold", user, p_hold_id=hold["hold_id"])
    assert captured["charged"] == 4
    actors = database.sql("select kind::text, actor_id::text from public.credit_transactions "
                          "where account_id = %s and kind in ('reserve', 'spend') order by seq", account_id)
    assert actors == [("reserve", user.user_id), ("spend", user.user_id)]
    # Another user's hold: not found for them, however it is captured.
    other, _ = database.new_user()
    second = database.call("reserve_credits", user, p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=1)
    expect_error(database.call, "PT403", "forbidden", "capture_hold", other, p_hold_id=second["hold_id"])
    status = database.one("select status::text from public.credit_holds where id = %s", second["hold_id"])
    assert status == "active"


def test_two_fast_captures_of_one_hold_charge_once(database: Db) -> None:
    _, account_id = database.new_user()
    database.fund(account_id, purchased=20)
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=7)
    with psycopg.connect(database.dsn, autocommit=False) as first, \
            psycopg.connect(database.dsn, autocommit=True) as second:
        a = first.execute("select private.capture_hold(%s::uuid, null, '{}'::jsonb, null, null, null)",
                          (hold["hold_id"],)).fetchone()
        # The second waits on the wallet's lock, then finds the hold captured: a replay.
        out: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: out.update(b=second.execute(
            "select private.capture_hold(%s::uuid, null, '{}'::jsonb, null, null, null)",
            (hold["hold_id"],)).fetchone()))
        worker.start()
        worker.join(timeout=1)
        assert worker.is_alive(), "the second capture did not wait for the first"
        first.commit()
        worker.join(timeout=30)
    assert a is not None and out["b"] is not None
    assert out["b"][0] == {**a[0], "replayed": True}
    balance = database.balance(account_id)
    assert (balance["total"], balance["held"]) == (23 - 7, 0)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_caller_mismatch_in_the_fast_paths_is_the_checked_paths_error(database: Db) -> None:
    _, account_id = database.new_user()
    stranger, _ = database.new_user()
    database.fund(account_id, purchased=10)
    expect_error(database.call, "PT403", "forbidden", "reserve_credits", stranger, p_account_id=account_id,
                 p_idempotency_key=new_key(), p_amount=1)
    assert database.one("select count(*) from public.credit_holds where account_id = %s", account_id) == 0
