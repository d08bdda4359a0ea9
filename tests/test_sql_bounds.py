"""Bounded writes: an account cannot make the database write without limit.

At most 100 active license keys per account and 1,000 created per account in 24
hours (``invalid_argument``); at most
1,000 active holds and 600 hold creations per UTC minute per account
(``PT429 too_many_holds`` with ``{limit, retry_after}``), checked after the
replay and before the credits. Each rejection changes nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from tests.support import Caller, Db, expect_error, new_key, snapshot


def reserve(database: Db, caller: Caller, account_id: str, key: str | None = None, amount: int = 1,
            ttl: int = 900) -> Any:
    return database.call("reserve_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key("hold"), p_amount=amount, p_ttl_seconds=ttl)


def fresh_minute() -> None:
    """Start work at the beginning of a UTC minute, so one minute's count is not cut in two."""
    second = dt.datetime.now(dt.UTC).second
    if second > 50:
        time.sleep(60.5 - second)


def forget_this_minute(database: Db, account_id: str) -> None:
    """As if the minute had passed: the wallet's count of this minute's creations starts again."""
    database.sql("update public.credit_wallets set hold_minute = null, hold_minute_count = 0 "
                 "where account_id = %s", account_id)


def test_the_101st_active_license_key_is_refused_until_one_is_revoked(database: Db) -> None:
    owner, account_id = database.new_user()
    keys = [database.call("create_license_key", owner, p_account_id=account_id, p_name=f"k{i}")
            for i in range(100)]
    detail = expect_error(database.call, "22023", "invalid_argument", "create_license_key", owner,
                          p_account_id=account_id, p_name="one too many")
    assert detail["argument"] == "p_account_id" and "100" in detail["reason"]
    assert database.one("select count(*) from public.credit_license_keys where account_id = %s",
                        account_id) == 100
    database.call("revoke_license_key", owner, p_key_id=keys[0]["key_id"])
    assert database.call("create_license_key", owner, p_account_id=account_id, p_name="again")["key"]
    # An expired key is not active either.
    database.sql("update public.credit_license_keys set expires_at = now() - interval '1 second' "
                 "where id = %s", keys[1]["key_id"])
    assert database.call("create_license_key", owner, p_account_id=account_id, p_name="after expiry")["key"]


def test_creating_and_revoking_keys_in_a_loop_is_bounded_per_day(database: Db) -> None:
    owner, account_id = database.new_user()
    for i in range(1000):
        key = database.call("create_license_key", owner, p_account_id=account_id, p_name=f"k{i}")
        database.call("revoke_license_key", owner, p_key_id=key["key_id"])
    detail = expect_error(database.call, "22023", "invalid_argument", "create_license_key", owner,
                          p_account_id=account_id, p_name="one too many")
    assert detail["argument"] == "p_account_id" and "1000" in detail["reason"]
    assert database.one("select count(*) from public.credit_license_keys where account_id = %s",
                        account_id) == 1000
    # A day later the account may create keys again.
    database.sql("update public.credit_license_keys set created_at = created_at - interval '24 hours' "
                 "where account_id = %s", account_id)
    assert database.call("create_license_key", owner, p_account_id=account_id, p_name="next day")["key"]

def test_hold_creations_per_minute_are_bounded_and_a_replay_still_replays(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2000)
    fresh_minute()
    first_key = new_key("hold")
    first = reserve(database, caller, account_id, first_key)
    for _ in range(599):
        reserve(database, caller, account_id)
    before = snapshot(database, account_id)
    detail = expect_error(reserve, "PT429", "too_many_holds", database, caller, account_id)
    assert detail["limit"] == 600 and 1 <= detail["retry_after"] <= 60
    assert snapshot(database, account_id) == before
    # A replay always replays, whatever the bounds.
    replay = reserve(database, caller, account_id, first_key)
    assert replay["replayed"] is True and replay["hold_id"] == first["hold_id"]
    # The next minute, holds can be made again.
    forget_this_minute(database, account_id)
    assert reserve(database, caller, account_id)["replayed"] is False


def test_active_holds_are_bounded_and_a_release_makes_room(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=2000)
    holds = []
    for i in range(1000):
        if i % 500 == 0:
            forget_this_minute(database, account_id)
        holds.append(reserve(database, caller, account_id, ttl=600))
    forget_this_minute(database, account_id)
    before = snapshot(database, account_id)
    detail = expect_error(reserve, "PT429", "too_many_holds", database, caller, account_id)
    assert detail["limit"] == 1000 and 500 <= detail["retry_after"] <= 600
    assert snapshot(database, account_id) == before
    database.call("release_hold", caller, p_hold_id=holds[0]["hold_id"])
    assert reserve(database, caller, account_id)["replayed"] is False
    # Another account is not affected by this one's holds.
    other, other_account = database.new_user()
    assert reserve(database, other, other_account)["replayed"] is False


def test_the_bound_comes_before_the_credits(database: Db) -> None:
    """Checks run in the contract's order: replay, limits, then credits."""
    caller, account_id = database.new_user()  # 3 free credits: not enough for 10
    database.sql("update public.credit_wallets set hold_minute = date_trunc('minute', now()), "
                 "hold_minute_count = 600 where account_id = %s", account_id)
    expect_error(reserve, "PT429", "too_many_holds", database, caller, account_id, amount=10)
    forget_this_minute(database, account_id)
    expect_error(reserve, "PT402", "insufficient_credits", database, caller, account_id, amount=10)


def test_the_credits_api_answers_429_with_retry_after(rest_url: str, database: Db) -> None:
    from devstack import tokens
    from tests.lambda_events import cold_start
    from tests.test_credits_api import credits_env, make_invoke
    from tests.test_credits_api import snapshot as api_snapshot

    caller, account_id = database.new_user()
    assert caller.user_id
    database.sql("update public.credit_wallets set hold_minute = date_trunc('minute', now()), "
                 "hold_minute_count = 600 where account_id = %s", account_id)
    before = api_snapshot(database, account_id)
    with cold_start("handlers.deduct", credits_env(rest_url)) as handler:
        invoke = make_invoke(handler)
        reply = invoke("POST", "/credits/holds", token=tokens.user_token(caller.user_id), key=new_key(),
                       body={"amount": 1})
    assert reply.status == 429, reply.body
    assert reply.body["error"] == "too_many_holds" and reply.body["detail"]["limit"] == 600
    retry_after = reply.raw["headers"].get("retry-after") or reply.raw["headers"].get("Retry-After")
    assert retry_after == str(reply.body["detail"]["retry_after"])
    assert api_snapshot(database, account_id) == before
