"""Balance alerts, credit_events and the live balance (v3), through the SQL functions
as the REST layer calls them.

An alert fires once when a committed change takes `available` from at or above its
threshold to below it, and re-arms (one `balance.recovered`) only at its re-arm
level; every committed change of a balance is broadcast once on the private
Realtime topic `credits:<account_id>`, which only those who can read the account
may join.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.support import Caller, Db, expect_error, new_key, select_as

ALERT_KEYS = {"account_id", "threshold", "rearm_at", "armed"}
EVENT_TYPES = {"balance.low", "balance.depleted", "balance.recovered", "topup.succeeded", "topup.failed",
               "topup.action_required", "topup.disabled", "topup.paused"}


# --- helpers -----------------------------------------------------------------------------

def funded_user(database: Db, purchased: int) -> tuple[Caller, str]:
    caller, account_id = database.new_user()
    # The sign-up bonus (if any) is spent or kept out of the figures: start from a known balance.
    bonus = database.balance(account_id)["available"]
    if bonus:
        database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key("bonus"),
                      p_amount=bonus)
    if purchased:
        database.fund(account_id, purchased=purchased)
    return caller, account_id


def events(database: Db, account_id: str) -> list[dict[str, Any]]:
    rows = database.sql(
        "select to_jsonb(e) from public.credit_events e where account_id = %s order by seq", account_id)
    return [r[0] for r in rows]


def broadcasts(database: Db, account_id: str) -> list[dict[str, Any]]:
    rows = database.sql(
        "select jsonb_build_object('event', m.event, 'private', m.private, 'extension', m.extension,"
        " 'payload', m.payload) from realtime.messages m where m.topic = %s order by m.inserted_at, m.id",
        f"credits:{account_id}")
    return [r[0] for r in rows]


def spend(database: Db, account_id: str, amount: int, caller: Caller | None = None,
          key: str | None = None) -> dict[str, Any]:
    return database.call("deduct_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key("spend"), p_amount=amount)


def alert(database: Db, account_id: str, threshold: int, rearm_at: int | None = None,
          caller: Caller | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"p_account_id": account_id, "p_threshold": threshold}
    if rearm_at is not None:
        args["p_rearm_at"] = rearm_at
    return database.call("set_balance_alert", caller, **args)


# --- set_balance_alert --------------------------------------------------------------------

def test_a_new_alert_is_armed_iff_available_is_at_or_above_it_and_fires_nothing(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    above = alert(database, account_id, 100, caller=owner)
    assert above == {"account_id": account_id, "threshold": 100, "rearm_at": 200, "armed": True}
    below = alert(database, account_id, 150, 160, caller=owner)
    assert below == {"account_id": account_id, "threshold": 150, "rearm_at": 160, "armed": False}
    assert events(database, account_id) == []


def test_changing_and_removing_an_alert(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 50, caller=owner)
    changed = alert(database, account_id, 50, 70, caller=owner)
    assert changed == {"account_id": account_id, "threshold": 50, "rearm_at": 70, "armed": True}
    removed = alert(database, account_id, 50, 0, caller=owner)
    assert removed == {"account_id": account_id, "threshold": 50, "rearm_at": 0, "armed": False}
    # Gone: spending across 50 fires nothing.
    spend(database, account_id, 80)
    assert events(database, account_id) == []
    assert database.one("select alert_below from public.credit_wallets where account_id = %s",
                        account_id) == 0


@pytest.mark.parametrize(("threshold", "rearm_at", "argument"), [
    (0, None, "p_threshold"),
    (-5, None, "p_threshold"),
    (1_000_000_001, None, "p_threshold"),
    (50, 49, "p_rearm_at"),
    (50, 0, "p_rearm_at"),   # removing an alert that does not exist
])
def test_bad_alert_arguments_are_invalid_and_change_nothing(database: Db, threshold: int,
                                                            rearm_at: int | None, argument: str) -> None:
    owner, account_id = funded_user(database, 100)
    detail = expect_error(alert, "22023", "invalid_argument", database, account_id, threshold, rearm_at,
                          caller=owner)
    assert detail["argument"] == argument
    assert database.one("select count(*) from private.balance_alerts where account_id = %s", account_id) == 0


def test_at_most_ten_alerts_per_account(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    for threshold in range(1, 11):
        alert(database, account_id, threshold, caller=owner)
    detail = expect_error(alert, "22023", "invalid_argument", database, account_id, 11, caller=owner)
    assert detail["argument"] == "p_threshold"
    # Changing one of the ten is still allowed.
    assert alert(database, account_id, 10, 30, caller=owner)["rearm_at"] == 30


def test_who_may_set_alerts(database: Db) -> None:
    owner, _ = database.new_user()
    admin, _ = database.new_user()
    member, _ = database.new_user()
    stranger, _ = database.new_user()
    _, account_id = database.new_tenant({owner.user_id: "owner", admin.user_id: "admin",  # type: ignore[dict-item]
                                         member.user_id: "member"})  # type: ignore[dict-item]
    database.fund(account_id, purchased=100)
    assert alert(database, account_id, 10, caller=owner)["armed"] is True
    assert alert(database, account_id, 20, caller=admin)["armed"] is True
    assert alert(database, account_id, 30)["armed"] is True  # the service
    expect_error(alert, "PT403", "forbidden", database, account_id, 40, caller=member)
    expect_error(alert, "PT403", "forbidden", database, account_id, 40, caller=stranger)
    expect_error(alert, "PT404", "account_not_found", database, str(uuid.uuid4()), 40)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        alert(database, account_id, 40, caller=Caller.anon())
    assert database.one("select count(*) from private.balance_alerts where account_id = %s", account_id) == 3


# --- firing -------------------------------------------------------------------------------

def test_crossing_fires_once_with_the_contract_payload(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 50, caller=owner)
    spend(database, account_id, 40)               # 60: still above
    assert events(database, account_id) == []
    answer = spend(database, account_id, 20)      # 40: crossed
    spend(database, account_id, 5)                # 35: already fired
    [event] = events(database, account_id)
    assert event["type"] == "balance.low"
    assert event["seq"] == 1
    assert event["status"] == "pending"
    assert event["payload"] == {"threshold": 50, "rearm_at": 100, "available": 40,
                                "balance": answer["balance"]}


def test_landing_on_zero_is_depleted_and_one_change_crossing_two_alerts_fires_highest_first(
        database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 10, caller=owner)
    alert(database, account_id, 80, caller=owner)
    spend(database, account_id, 100)
    got = [(e["seq"], e["type"], e["payload"]["threshold"], e["payload"]["available"])
           for e in events(database, account_id)]
    assert got == [(1, "balance.depleted", 80, 0), (2, "balance.depleted", 10, 0)]


def test_a_hold_and_its_release_fire_at_most_once_and_recovery_needs_the_rearm_level(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 50, 90, caller=owner)
    for _ in range(3):
        hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("h"),
                             p_amount=60)
        database.call("release_hold", p_hold_id=hold["hold_id"])
    # Each reserve took available to 40; each release back to 100 >= 90: low, recovered, three times.
    assert [e["type"] for e in events(database, account_id)] == ["balance.low", "balance.recovered"] * 3

    owner2, other = funded_user(database, 100)
    alert(database, other, 50, 150, caller=owner2)
    for _ in range(3):
        hold = database.call("reserve_credits", p_account_id=other, p_idempotency_key=new_key("h"),
                             p_amount=60)
        database.call("release_hold", p_hold_id=hold["hold_id"])
    # Re-arm level 150 is never reached: one low, no flapping.
    assert [e["type"] for e in events(database, other)] == ["balance.low"]
    database.fund(other, purchased=60)            # 160 >= 150
    recovered = events(database, other)[-1]
    assert recovered["type"] == "balance.recovered"
    assert recovered["payload"]["available"] == 160
    spend(database, other, 120)                   # 40 < 50 again: fires again
    assert [e["type"] for e in events(database, other)] == ["balance.low", "balance.recovered", "balance.low"]


def test_a_rejected_or_replayed_call_writes_no_event_and_no_broadcast(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 50, caller=owner)
    key = new_key("once")
    spend(database, account_id, 10, key=key)
    sent = broadcasts(database, account_id)
    expect_error(spend, "PT402", "insufficient_credits", database, account_id, 1000)
    assert spend(database, account_id, 10, key=key)["replayed"] is True
    assert events(database, account_id) == []
    assert broadcasts(database, account_id) == sent


def test_debt_counts_against_available_for_alerts(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    database.sql("update public.credit_accounts set overdraft_limit = 100 where id = %s", account_id)
    alert(database, account_id, 5, 40, caller=owner)
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("h"),
                         p_amount=90, p_overage="overdraft")
    database.call("capture_hold", p_hold_id=hold["hold_id"], p_amount=130)
    [event] = events(database, account_id)
    assert event["type"] == "balance.depleted"
    assert event["payload"]["balance"]["debt"] == 30
    database.fund(account_id, purchased=50)       # pays the 30 of debt first: available 20
    assert [e["type"] for e in events(database, account_id)] == ["balance.depleted"]
    database.fund(account_id, purchased=20)       # 40 = the re-arm level
    assert [e["type"] for e in events(database, account_id)] == ["balance.depleted", "balance.recovered"]


def test_sixteen_connections_crossing_fire_each_alert_exactly_once(database: Db) -> None:
    owner, account_id = funded_user(database, 320)
    for threshold in (300, 200, 100, 10):
        alert(database, account_id, threshold, caller=owner)
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with database.connect() as conn:
                barrier.wait()
                for _ in range(2):
                    db.call_function(conn, "deduct_credits", {
                        "p_account_id": account_id, "p_idempotency_key": new_key("race"), "p_amount": 10})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = events(database, account_id)
    assert database.balance(account_id)["available"] == 0
    assert sorted(e["payload"]["threshold"] for e in got) == [10, 100, 200, 300]
    assert [e["seq"] for e in got] == [1, 2, 3, 4]
    # Each fired at the first change that took available below it.
    assert all(e["payload"]["available"] < e["payload"]["threshold"] for e in got)
    assert all(e["payload"]["available"] >= e["payload"]["threshold"] - 10 for e in got)
    # Every committed spend was broadcast once.
    assert len(broadcasts(database, account_id)) >= 32


# --- reading events -------------------------------------------------------------------------

def test_events_are_readable_by_those_who_can_read_the_account(database: Db) -> None:
    owner, _ = database.new_user()
    member, _ = database.new_user()
    stranger, _ = database.new_user()
    _, account_id = database.new_tenant({owner.user_id: "owner", member.user_id: "member"})  # type: ignore[dict-item]
    database.fund(account_id, purchased=100)
    alert(database, account_id, 50, caller=owner)
    spend(database, account_id, 60)
    query = "select type from public.credit_events where account_id = %s"
    assert select_as(database, owner, query, account_id) == [{"type": "balance.low"}]
    assert select_as(database, member, query, account_id) == [{"type": "balance.low"}]
    assert select_as(database, stranger, query, account_id) == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        select_as(database, Caller.anon(), query, account_id)


def test_nobody_writes_events_or_alerts_directly(database: Db) -> None:
    owner, account_id = funded_user(database, 10)
    for caller in (owner, Caller.service()):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            select_as(database, caller,
                      "insert into public.credit_events (account_id, seq, type, payload)"
                      " values (%s, 1, 'balance.low', '{}')", account_id)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            select_as(database, caller, "select * from private.balance_alerts")


# --- the live balance -----------------------------------------------------------------------

def test_every_committed_change_is_broadcast_once_with_the_final_balance(database: Db) -> None:
    _, account_id = funded_user(database, 100)
    before = len(broadcasts(database, account_id))
    answer = spend(database, account_id, 7)
    sent = broadcasts(database, account_id)[before:]
    assert len(sent) == 1
    message = sent[0]
    assert (message["event"], message["private"], message["extension"]) == ("balance", True, "broadcast")
    payload = dict(message["payload"])
    payload.pop("id")  # realtime.send adds a message id
    assert payload == answer["balance"]

    # Two spends in one transaction: one message, the final balance.
    conn = database.conn
    with conn.transaction():
        db.call_function(conn, "deduct_credits", {"p_account_id": account_id,
                                                  "p_idempotency_key": new_key("t"), "p_amount": 1})
        db.call_function(conn, "deduct_credits", {"p_account_id": account_id,
                                                  "p_idempotency_key": new_key("t"), "p_amount": 2})
    sent = broadcasts(database, account_id)[before + 1:]
    assert len(sent) == 1
    assert sent[0]["payload"]["available"] == 90

    # A rolled-back transaction broadcasts nothing.
    with pytest.raises(RuntimeError), conn.transaction():
        db.call_function(conn, "deduct_credits", {"p_account_id": account_id,
                                                  "p_idempotency_key": new_key("t"), "p_amount": 1})
        raise RuntimeError("roll back")
    assert len(broadcasts(database, account_id)) == before + 2


def test_quiet_transactions_do_not_broadcast_but_still_fire_alerts(database: Db) -> None:
    # The monthly reset and batch releases of Stripe events mark their transaction quiet.
    owner, account_id = funded_user(database, 0)
    alert(database, account_id, 10, 20, caller=owner)         # disarmed: nothing available
    before = len(broadcasts(database, account_id))
    database.sql("select set_config('credits.quiet', 'on', false)")
    try:
        database.fund(account_id, purchased=25)
    finally:
        database.sql("select set_config('credits.quiet', '', false)")
    assert len(broadcasts(database, account_id)) == before
    assert [e["type"] for e in events(database, account_id)] == ["balance.recovered"]
    database.fund(account_id, purchased=5)
    assert len(broadcasts(database, account_id)) == before + 1


def join_check(database: Db, caller: Caller, topic: str) -> bool:
    """What Realtime does when a client joins a private channel: with the caller's
    role and claims and realtime.topic set, may it read messages of that topic?"""
    conn = database.conn
    with conn.transaction():
        conn.execute("select set_config('realtime.topic', %s, true)", (topic,))
        conn.execute("insert into realtime.messages (topic, extension, event, payload, private)"
                     " values (%s, 'broadcast', 'probe', '{}', true)", (topic,))
        conn.execute(f"set local role {caller.role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(caller.claims),))
        visible = conn.execute("select count(*) from realtime.messages where topic = %s and event = 'probe'",
                               (topic,)).fetchone()
        conn.execute("reset role")
        conn.execute("delete from realtime.messages where topic = %s and event = 'probe'", (topic,))
    assert visible is not None
    return bool(visible[0])


def test_only_those_who_can_read_the_account_may_join_its_topic(database: Db) -> None:
    owner, _ = database.new_user()
    admin, _ = database.new_user()
    member, _ = database.new_user()
    stranger, stranger_account = database.new_user()
    _, account_id = database.new_tenant({owner.user_id: "owner", admin.user_id: "admin",  # type: ignore[dict-item]
                                         member.user_id: "member"})  # type: ignore[dict-item]
    topic = f"credits:{account_id}"
    assert join_check(database, owner, topic)
    assert join_check(database, admin, topic)
    assert join_check(database, member, topic)        # a plain member reads the account's balance
    assert not join_check(database, stranger, topic)
    assert join_check(database, stranger, f"credits:{stranger_account}")
    assert not join_check(database, Caller.anon(), topic)
    assert not join_check(database, stranger, f"credits:{account_id.upper()}x")


def test_a_projects_open_policies_never_open_credits_topics(database: Db) -> None:
    owner, account_id = database.new_user()
    stranger, _ = database.new_user()
    topic = f"credits:{account_id}"
    database.sql("create policy app_open_read on realtime.messages for select to anon, authenticated"
                 " using (true)")
    database.sql("create policy app_open_send on realtime.messages for insert to anon, authenticated"
                 " with check (true)")
    try:
        assert not join_check(database, stranger, topic)
        assert not join_check(database, Caller.anon(), topic)
        assert join_check(database, stranger, "room:lobby")  # the project's own topics stay open
        for caller in (owner, stranger):
            conn = database.conn
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("select set_config('realtime.topic', %s, true)", (topic,))
                conn.execute(f"set local role {caller.role}")
                conn.execute("select set_config('request.jwt.claims', %s, true)",
                             (json.dumps(caller.claims),))
                conn.execute("insert into realtime.messages (topic, extension, event, payload, private)"
                             " values (%s, 'broadcast', 'balance', '{\"available\": 1000000}', true)",
                             (topic,))
    finally:
        database.sql("drop policy app_open_read on realtime.messages")
        database.sql("drop policy app_open_send on realtime.messages")


# --- delivery (the notify Lambda's functions) --------------------------------------------------

@pytest.fixture
def low_events(database: Db) -> Callable[[int], tuple[str, list[dict[str, Any]]]]:
    """An account with n events (an alert fired and recovered n times)."""

    def make(n: int) -> tuple[str, list[dict[str, Any]]]:
        owner, account_id = funded_user(database, 100)
        alert(database, account_id, 50, 60, caller=owner)
        while len(events(database, account_id)) < n:
            hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("h"),
                                 p_amount=60)
            database.call("release_hold", p_hold_id=hold["hold_id"])
        return account_id, events(database, account_id)[:n]

    return make


def claim(database: Db, limit: int = 1000, lease: int = 60) -> list[dict[str, Any]]:
    return database.call("claim_credit_events", p_limit=limit, p_lease_seconds=lease)  # type: ignore[no-any-return]


def mine(claimed: list[dict[str, Any]], account_id: str) -> list[dict[str, Any]]:
    return [e for e in claimed if e["account_id"] == account_id]


def test_claims_hand_out_each_accounts_next_event_once_and_in_order(database: Db, low_events: Any) -> None:
    account_id, made = low_events(3)
    first = mine(claim(database), account_id)
    assert [e["seq"] for e in first] == [1]
    assert set(first[0]) == {"event_id", "account_id", "seq", "type", "payload", "created_at", "attempts"}
    assert mine(claim(database), account_id) == []          # leased, and seq 2 waits for it
    assert database.call("record_credit_event_delivery", p_event_id=first[0]["event_id"],
                         p_delivered=True)["status"] == "delivered"
    second = mine(claim(database), account_id)
    assert [e["seq"] for e in second] == [2]
    result = database.call("record_credit_event_delivery", p_event_id=second[0]["event_id"],
                           p_delivered=False, p_error="HTTP 500")
    assert (result["status"], result["attempts"]) == ("pending", 1)
    assert mine(claim(database), account_id) == []          # backing off; seq 3 still waits
    database.sql("update public.credit_events set next_attempt_at = now() where event_id = %s",
                 second[0]["event_id"])
    again = mine(claim(database), account_id)
    assert [(e["event_id"], e["attempts"]) for e in again] == [(second[0]["event_id"], 1)]
    assert made[0]["event_id"] == first[0]["event_id"]


def test_backoff_doubles_and_stops_at_an_hour(database: Db, low_events: Any) -> None:
    _, [event] = low_events(1)
    waits = []
    for _ in range(12):
        result = database.call("record_credit_event_delivery", p_event_id=event["event_id"],
                               p_delivered=False, p_error="timeout")
        waits.append(database.one(
            "select extract(epoch from next_attempt_at - now())::int from public.credit_events"
            " where event_id = %s", event["event_id"]))
    assert result["status"] == "pending"
    assert waits[:4] == [5, 10, 20, 40]
    assert max(waits) == 3600


def test_concurrent_claims_never_share_an_event(database: Db, low_events: Any) -> None:
    accounts = [low_events(1)[0] for _ in range(6)]
    results: list[list[dict[str, Any]]] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        with database.connect() as conn:
            barrier.wait()
            results.append(db.call_function(conn, "claim_credit_events", {"p_limit": 1000}))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [e["event_id"] for batch in results for e in batch if e["account_id"] in accounts]
    assert len(claimed) == len(set(claimed)) == 6


def test_events_older_than_72_hours_fail_and_resend_keeps_id_and_seq(database: Db, low_events: Any) -> None:
    account_id, made = low_events(2)
    database.sql("update public.credit_events set created_at = now() - interval '73 hours',"
                 " sent_from = now() - interval '73 hours' where event_id = %s", made[0]["event_id"])
    [head] = mine(claim(database), account_id)
    assert head["seq"] == 2                                   # seq 1 failed, so 2 may go
    failed = database.call("list_credit_events", p_status="failed", p_account_id=account_id)
    assert [(e["seq"], e["last_error"]) for e in failed] == [(1, "not_sent")]
    created = database.one("select created_at from public.credit_events where event_id = %s",
                           made[0]["event_id"])
    resent = database.call("resend_credit_event", p_event_id=made[0]["event_id"])
    assert (resent["event_id"], resent["seq"], resent["status"], resent["attempts"]) == (
        made[0]["event_id"], 1, "pending", 0)
    # The same event (its created_at too); its 72 hours start over.
    assert database.one("select created_at from public.credit_events where event_id = %s",
                        made[0]["event_id"]) == created
    # It is its account's lowest pending seq again: handed out next.
    assert [e["event_id"] for e in mine(claim(database), account_id)] == [made[0]["event_id"]]
    expect_error(database.call, "PT404", "event_not_found", "resend_credit_event",
                 p_event_id=str(uuid.uuid4()))


def test_delivery_functions_are_service_only(database: Db) -> None:
    owner, _ = database.new_user()
    for fn, args in (("claim_credit_events", {}), ("list_credit_events", {}),
                     ("resend_credit_event", {"p_event_id": str(uuid.uuid4())}),
                     ("record_credit_event_delivery", {"p_event_id": str(uuid.uuid4()), "p_delivered": True}),
                     ("sweep_credit_accounts", {})):
        for caller in (owner, Caller.anon()):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                database.call(fn, caller, **args)


def test_the_sweep_writes_lapsed_holds_with_their_events(database: Db) -> None:
    owner, account_id = funded_user(database, 100)
    alert(database, account_id, 50, 80, caller=owner)
    database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("h"), p_amount=60,
                  p_ttl_seconds=60)
    assert [e["type"] for e in events(database, account_id)] == ["balance.low"]
    database.sql("update public.credit_holds set expires_at = now() - interval '1 second'"
                 " where account_id = %s", account_id)
    database.sql("update public.credit_wallets set next_hold_expiry = now() - interval '1 second'"
                 " where account_id = %s", account_id)
    assert database.call("sweep_credit_accounts")["swept"] >= 1
    assert [e["type"] for e in events(database, account_id)] == ["balance.low", "balance.recovered"]
    assert database.one("select status from public.credit_holds where account_id = %s",
                        account_id) == "expired"
