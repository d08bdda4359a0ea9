"""The deduct's fast path against the checked path's answers.

The common deduct is one wallet UPDATE and one ledger row whose unique key is
the idempotency check; a key used before undoes the UPDATE and the checked
path answers (a replay, or idempotency_conflict). These tests pin what that
undo must leave behind, and that a key raced by 16 connections spends once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from tests.support import Caller, Db, expect_error, new_key, own_database
from tests.test_sql_concurrency import attempt, run_parallel


def wallet(database: Db, account: str) -> tuple:
    return database.one("select promotional, subscription, purchased, promo_front_left, "
                        "held_promotional + held_subscription + held_purchased "
                        "from public.credit_wallets where account_id = %s", account)


def rows(database: Db, account: str) -> int:
    return database.one("select count(*) from public.credit_transactions where account_id = %s", account)


def test_a_fast_spend_keeps_no_hash_and_replays_from_its_columns(database: Db) -> None:
    caller, account = database.new_user()
    database.fund(account, purchased=20)
    first = database.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="fast-1",
                          p_amount=5, p_model="m1", p_input_tokens=10, p_metadata={"job": 1})
    assert database.one("select request_hash from public.credit_transactions where id = %s",
                        first["transaction_id"]) is None
    before = (wallet(database, account), rows(database, account))
    again = database.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="fast-1",
                          p_amount=5, p_model="m1", p_input_tokens=10, p_metadata={"job": 1})
    assert again == {**first, "replayed": True}
    for changed in ({"p_amount": 4}, {"p_model": "m2"}, {"p_input_tokens": 11}, {"p_metadata": {"job": 2}}):
        args = {"p_amount": 5, "p_model": "m1", "p_input_tokens": 10, "p_metadata": {"job": 1}, **changed}
        expect_error(database.call, "PT409", "idempotency_conflict", "deduct_credits", caller,
                     p_account_id=account, p_idempotency_key="fast-1", **args)
    # The undone UPDATEs left the wallet and the ledger as they were.
    assert (wallet(database, account), rows(database, account)) == before


def test_a_key_a_reserve_used_conflicts_and_the_wallet_is_put_back(database: Db) -> None:
    caller, account = database.new_user()
    database.fund(account, purchased=20)
    database.call("grant_promotional_credits", p_account_id=account, p_amount=4,
                  p_expires_at="2999-01-01T00:00:00Z", p_idempotency_key=new_key())
    database.call("reserve_credits", caller, p_account_id=account, p_idempotency_key="shared", p_amount=2)
    before = (wallet(database, account), rows(database, account))
    # 3 credits: the promotional front (2 left of 4 after the hold) and a subscription credit.
    expect_error(database.call, "PT409", "idempotency_conflict", "deduct_credits", caller,
                 p_account_id=account, p_idempotency_key="shared", p_amount=3)
    assert (wallet(database, account), rows(database, account)) == before
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_limited_spender_over_the_limit_writes_nothing(database: Db) -> None:
    caller, account = database.new_user()
    database.fund(account, purchased=50)
    database.call("set_spend_limit", p_account_id=account, p_subject="member", p_subject_id=caller.user_id,
                  p_limit=5, p_period="day")
    spent = database.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="l-1", p_amount=4)
    assert database.one("select request_hash from public.credit_transactions where id = %s",
                        spent["transaction_id"]) is None  # the fast path took it
    before = (wallet(database, account), rows(database, account))
    detail = expect_error(database.call, "PT402", "spend_limit_exceeded", "deduct_credits", caller,
                          p_account_id=account, p_idempotency_key="l-2", p_amount=2)
    assert (detail["limit"], detail["spent"], detail["held"], detail["required"]) == (5, 4, 0, 2)
    assert (wallet(database, account), rows(database, account)) == before
    # A replay of the first spend still replays; the limit's figures did not move.
    assert database.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="l-1",
                         p_amount=4)["replayed"] is True
    assert database.one("select spent from public.credit_spend_limits where account_id = %s", account) == 4


@pytest.fixture(scope="module")
def racing(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_fast_deduct") as handle:
        yield handle


def test_one_key_raced_by_16_connections_spends_once(racing: Db) -> None:
    _, account = racing.new_user()
    racing.fund(account, purchased=1000)
    before = wallet(racing, account)

    def work(i: int, conn: psycopg.Connection) -> list:
        return [attempt(conn, "deduct", "deduct_credits", Caller.service(), p_account_id=account,
                        p_idempotency_key=f"race-{n}", p_amount=3) for n in range(20)]

    outcomes = run_parallel(racing.dsn, work)
    assert all(o.ok for o in outcomes), Counter((o.sqlstate, o.message) for o in outcomes if not o.ok)
    firsts = Counter(o.result["transaction_id"] for o in outcomes if not o.result["replayed"])
    assert len(firsts) == 20 and set(firsts.values()) == {1}  # one first answer per key
    assert all(len({o.result["transaction_id"] for o in outcomes
                    if o.result["transaction_id"] == t}) == 1 for t in firsts)
    after = wallet(racing, account)
    assert after[1] + after[2] == before[1] + before[2] - 20 * 3
    assert racing.one("select count(*) from public.credit_transactions where account_id = %s "
                      "and kind = 'spend'", account) == 20
    assert racing.call("reconcile_credit_balances")["mismatches"] == []
