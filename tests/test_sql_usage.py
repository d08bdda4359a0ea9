"""Usage analytics: get_credit_usage and the roll-up behind it (roll_up_credit_usage).

Every answer is checked against the ledger itself (a model written here from the
transaction rows, not from the SQL under test) and against the credit_usage view:
spends net of refunds (a refund in the bin of its own time, under its spend's
keys), an overdraft capture's debt counted with its spend, bins at UTC
boundaries, the privacy of a plain member's reads, the bound on rows, and the
roll-up's lag changing no answer, with a transaction in flight too (two real
connections). Time-dependent cases run on a server whose clock the test sets.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack import db
from tests.clock import FakeClockServer
from tests.support import Caller, Db, expect_error, new_key
from tests.test_sql_pg15 import pg15  # noqa: F401  (the PostgreSQL 15 cluster, when installed)

UTC = dt.UTC
KEYS = ("operation", "model", "member", "license_key")
ANSWER_KEYS = {"account_id", "from", "to", "bin", "rows", "total"}
FIGURES = ("credits", "calls", "input_tokens", "output_tokens")

# Operations priced for this module (names unique to it).
CHAT = "usage-chat"    # 1 + 1 per 1,000 input + 2 per 1,000 output tokens
EMBED = "usage-embed"  # 2 flat
PRICES = {CHAT: (1, 1, 2), EMBED: (2, 0, 0)}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    add_prices(database)


def add_prices(database: Db) -> None:
    for operation, (credits, rate_in, rate_out) in PRICES.items():
        database.sql(
            "insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
            "credits_per_1k_output_tokens) values (%s, %s, %s, %s) on conflict (operation) do nothing",
            operation, credits, rate_in, rate_out)


# --- calls --------------------------------------------------------------------------------

def array(keys: list[str] | tuple[str, ...]) -> str:
    """A text[] argument as the functions' callers pass it (the REST layer turns JSON arrays into this)."""
    return "{" + ",".join(keys) + "}"


def usage(database: Db, caller: Caller, account_id: str | None, keys: tuple[str, ...] = (),
          **args: Any) -> Any:
    args = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in args.items()}
    return database.call("get_credit_usage", caller, p_account_id=account_id, p_group_by=array(keys), **args)


def deduct(database: Db, caller: Caller, account_id: str, **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = database.call("deduct_credits", caller, p_account_id=account_id,
                                           p_idempotency_key=new_key("use"), **args)
    return result


def refund(database: Db, transaction_id: str, amount: int | None = None) -> None:
    database.call("refund_credits", p_transaction_id=transaction_id, p_idempotency_key=new_key("use-r"),
                  p_amount=amount)


def state(database: Db) -> dict[str, Any]:
    row: dict[str, Any] = database.one("select to_jsonb(r) from private.usage_rollup r")
    return row


def rolled_until(database: Db) -> dt.datetime | None:
    value: dt.datetime | None = database.one("select rolled_until from private.usage_rollup")
    return value


def rolled_sum(database: Db, account_id: str) -> int | None:
    """The credits the roll-up has summed for an account."""
    value: int | None = database.one(
        "select sum(credits)::bigint from private.usage_hours where account_id = %s", account_id)
    return value


def id_time(database: Db, transaction_id: str) -> dt.datetime:
    value: dt.datetime = database.one("select private.usage_id_time(%s::uuid)", transaction_id)
    return value


def roll_up_past(database: Db, instant: dt.datetime | None = None) -> None:
    """Run the roll-up (two seconds apart, as its marks need) until its watermark passes ``instant``
    (default: now); every transaction has ended, so nothing holds it back."""
    target = instant or database.one("select clock_timestamp()")
    # A mark waits for the transactions running when it was made (any session of the
    # server, e.g. another test's connection finishing): give them a moment, not a retry.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        database.call("roll_up_credit_usage")
        until = rolled_until(database)
        if until is not None and until > target:
            return
        time.sleep(2.1 if state(database)["pending_until"] is None else 0.3)
    raise AssertionError(f"the roll-up did not pass {target}: {state(database)}")


# --- the model: usage straight from the ledger's rows ----------------------------------------

def truncate(at: dt.datetime, bin_: str) -> dt.datetime:
    at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if bin_ in ("day", "month"):
        at = at.replace(hour=0)
    if bin_ == "month":
        at = at.replace(day=1)
    return at


Figures = dict[tuple[Any, ...], list[int]]


def from_ledger(database: Db, account_id: str, start: dt.datetime, end: dt.datetime, bin_: str,
                keys: tuple[str, ...], member: str | None = None) -> Figures:
    """What the answer must be, summed here from the account's transaction rows."""
    rows = database.sql(
        "select id, kind::text, created_at, operation, model, actor_id, license_key_id, "
        "promotional + subscription + purchased, purchased, debt, coalesce(input_tokens, 0), "
        "coalesce(output_tokens, 0), ref_id from public.credit_transactions where account_id = %s",
        account_id)
    spends = {r[0]: r for r in rows if r[1] == "spend"}
    captures = {r[12]: r for r in rows if r[1] == "spend" and r[12] is not None}
    out: Figures = {}
    for r in rows:
        if r[1] == "spend":
            spend, figures = r, (-r[7], 1, r[10], r[11])
        elif r[1] == "overdraft":
            spend, figures = captures[r[12]], (r[9], 0, 0, 0)
        elif r[1] == "refund":
            spend, figures = spends[r[12]], (-r[8], 0, 0, 0)
        else:
            continue
        if not start <= r[2] < end:
            continue
        attributes = {"operation": spend[3], "model": spend[4],
                      "member": None if spend[5] is None else str(spend[5]),
                      "license_key": None if spend[6] is None else str(spend[6])}
        if member is not None and attributes["member"] != member:
            continue
        sums = out.setdefault((truncate(r[2], bin_), *(attributes[k] for k in keys)), [0, 0, 0, 0])
        for i, value in enumerate(figures):
            sums[i] += value
    return out


def figures(answer: dict[str, Any], keys: tuple[str, ...]) -> Figures:
    """The answer's rows keyed like ``from_ledger``; each row has exactly the keys asked for."""
    out: Figures = {}
    for row in answer["rows"]:
        assert set(row) == {"period", *keys, *FIGURES}, row
        key = (dt.datetime.fromisoformat(row["period"]), *(row[k] for k in keys))
        assert key not in out, row
        out[key] = [row[f] for f in FIGURES]
    return out


def assert_matches_ledger(database: Db, caller: Caller, account_id: str, start: dt.datetime,
                          end: dt.datetime, bin_: str, keys: tuple[str, ...],
                          member: str | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = usage(database, caller, account_id, keys, p_from=start, p_to=end, p_bin=bin_)
    assert set(answer) == ANSWER_KEYS
    assert (answer["account_id"], answer["bin"]) == (account_id, bin_)
    assert dt.datetime.fromisoformat(answer["from"]) == start
    assert dt.datetime.fromisoformat(answer["to"]) == end
    expected = from_ledger(database, account_id, start, end, bin_, keys, member)
    assert figures(answer, keys) == expected
    periods = [row["period"] for row in answer["rows"]]
    assert periods == sorted(periods, key=dt.datetime.fromisoformat)
    assert answer["total"] == {f: sum(v[i] for v in expected.values()) for i, f in enumerate(FIGURES)}
    return answer


# --- accounts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Team:
    account_id: str
    owner: Caller
    admin: Caller
    member: Caller
    other: Caller  # a second plain member


def team(database: Db, purchased: int = 1000) -> Team:
    owner, _ = database.new_user()
    admin, _ = database.new_user()
    member, _ = database.new_user()
    other, _ = database.new_user()
    _, account_id = database.new_tenant({str(owner.user_id): "owner", str(admin.user_id): "admin",
                                         str(member.user_id): "member", str(other.user_id): "member"})
    database.fund(account_id, purchased=purchased)
    # Plain members spend from a tenant's account only under a limit.
    database.call("set_spend_limit", owner, p_account_id=account_id, p_subject="default_member",
                  p_limit=1_000_000, p_period="month")
    return Team(account_id, owner, admin, member, other)


def busy_account(database: Db) -> tuple[Caller, str, dt.datetime]:
    """A personal account with every kind of usage: deducts by amount and by operation, a
    license-key deduct, a capture with tokens, an overdraft capture, and refunds of some of
    them. Returns the user, the account and the time before the first spend."""
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=500)
    started: dt.datetime = database.one("select now()")
    spent = deduct(database, caller, account_id, p_amount=7, p_model="m-small")
    deduct(database, caller, account_id, p_amount=3, p_model="m-small")
    chat = deduct(database, caller, account_id, p_operation=CHAT, p_model="m-large", p_input_tokens=1000,
                  p_output_tokens=2000)
    deduct(database, caller, account_id, p_operation=EMBED, p_input_tokens=300)
    key = database.call("create_license_key", caller, p_account_id=account_id, p_name="srv")["key"]
    by_key = database.call("deduct_credits_by_license", p_license_key=key, p_idempotency_key=new_key("use-k"),
                           p_operation=CHAT, p_model="m-large", p_output_tokens=500)
    hold = database.call("reserve_credits", caller, p_account_id=account_id,
                         p_idempotency_key=new_key("use-h"), p_operation=CHAT, p_input_tokens=1000,
                         p_output_tokens=4000)
    captured = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_input_tokens=1000,
                             p_output_tokens=1000, p_model="m-large")
    # An overdraft capture: the service's hold, captured above what is left; the rest becomes debt.
    database.sql("update public.credit_accounts set overdraft_limit = 50 where id = %s", account_id)
    left = database.balance(account_id)["available"]
    over = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("use-o"),
                         p_amount=2, p_overage="overdraft")
    overdrawn = database.call("capture_hold", caller, p_hold_id=over["hold_id"], p_amount=left + 12,
                              p_model="m-batch")
    assert overdrawn["debt_added"] == 12, overdrawn
    refund(database, spent["transaction_id"], 2)
    refund(database, chat["transaction_id"])
    refund(database, by_key["transaction_id"], 1)
    refund(database, captured["transaction_id"], 1)
    refund(database, overdrawn["transaction_id"], 5)
    return caller, account_id, started


# --- what the answer holds ----------------------------------------------------------------------

def test_usage_is_the_ledger_net_of_refunds_and_agrees_with_credit_usage(database: Db) -> None:
    caller, account_id, started = busy_account(database)
    end = started + dt.timedelta(hours=1)
    for bin_ in ("hour", "day", "month"):
        for keys in ((), ("operation",), ("model", "operation"), KEYS, ("license_key", "member")):
            assert_matches_ledger(database, caller, account_id, started, end, bin_, keys)
    total = usage(database, caller, account_id)["total"]
    view = database.one(
        "select sum(credits - refunded)::bigint, count(*), sum(coalesce(input_tokens, 0))::bigint, "
        "sum(coalesce(output_tokens, 0))::bigint from public.credit_usage where account_id = %s", account_id)
    assert tuple(total[f] for f in FIGURES) == view
    assert total["calls"] == 7  # 4 deducts, 1 by license key, 2 captures; refunds add none


def test_rows_carry_the_keys_asked_for_under_their_spend(database: Db) -> None:
    caller, account_id, _ = busy_account(database)
    license_key = str(database.one("select id from public.credit_license_keys where account_id = %s",
                                   account_id))
    answer = usage(database, caller, account_id, ("license_key", "member", "model"))
    by_key = {(r["license_key"], r["member"], r["model"]): r for r in answer["rows"]}
    # The key's spend has no member (the service spent for the key); the others are the user's.
    assert (license_key, None, "m-large") in by_key
    assert by_key[(license_key, None, "m-large")]["calls"] == 1
    assert {r["member"] for r in answer["rows"] if r["license_key"] is None} == {caller.user_id}
    # Refunds count under their spend's keys and add no call: the chat deduct was refunded whole.
    operations = {r["operation"]: r for r in usage(database, caller, account_id, ("operation",))["rows"]}
    assert set(operations) == {None, CHAT, EMBED}
    assert operations[EMBED]["credits"] == 2 and operations[EMBED]["calls"] == 1
    # No keys: one row per bin.
    plain = usage(database, caller, account_id)
    assert plain["rows"] and all(set(r) == {"period", *FIGURES} for r in plain["rows"])
    assert sum(r["credits"] for r in plain["rows"]) == plain["total"]["credits"]


def test_the_default_range_is_the_current_period(database: Db) -> None:
    caller, account_id = database.new_user()
    deduct(database, caller, account_id, p_amount=1)
    answer = usage(database, caller, None)  # a null account: the caller's own
    balance = database.balance(account_id)
    assert answer["account_id"] == account_id
    assert (dt.datetime.fromisoformat(answer["from"]), dt.datetime.fromisoformat(answer["to"])) == (
        dt.datetime.fromisoformat(balance["period_start"]), dt.datetime.fromisoformat(balance["period_end"]))
    assert (answer["bin"], answer["total"]["credits"], answer["total"]["calls"]) == ("day", 1, 1)
    # Only one end given: the other is the period's.
    later = usage(database, caller, account_id, p_from=dt.datetime.fromisoformat(balance["period_start"])
                  + dt.timedelta(days=1))
    assert later["to"] == answer["to"]


def test_an_account_without_usage_answers_empty_rows_and_zero_totals(database: Db) -> None:
    caller, account_id = database.new_user()
    answer = usage(database, caller, account_id, KEYS, p_bin="month")
    assert (answer["rows"], answer["total"]) == ([], dict.fromkeys(FIGURES, 0))


# --- who reads what -------------------------------------------------------------------------------

def test_a_plain_member_reads_only_their_own_spends(database: Db) -> None:
    t = team(database)
    for who, amount in ((t.owner, 5), (t.admin, 7), (t.member, 11), (t.member, 13), (t.other, 17)):
        deduct(database, who, t.account_id, p_amount=amount, p_model="shared")
    start: dt.datetime = database.one("select date_trunc('hour', now())")
    end = start + dt.timedelta(hours=2)
    everyone = {t.owner.user_id, t.admin.user_id, t.member.user_id, t.other.user_id}
    for reader in (t.owner, t.admin, Caller.service()):
        answer = assert_matches_ledger(database, reader, t.account_id, start, end, "day", ("member",))
        assert {r["member"] for r in answer["rows"]} == everyone
        assert answer["total"]["credits"] == 53
    for reader, own in ((t.member, 24), (t.other, 17)):
        for keys in ((), ("member", "model"), KEYS):
            answer = assert_matches_ledger(database, reader, t.account_id, start, end, "hour", keys,
                                           member=reader.user_id)
            assert answer["total"]["credits"] == own
    # What RLS lets a plain member read of the usage log says the same.
    rows = database.sql("select count(*) from public.credit_usage where account_id = %s and actor_id = %s",
                        t.account_id, t.member.user_id)
    assert usage(database, t.member, t.account_id)["total"]["calls"] == rows[0][0] == 2
    # A refund of a member's spend reaches that member's figures only.
    spend = database.one("select id from public.credit_transactions where account_id = %s and actor_id = %s "
                         "and kind = 'spend' order by seq limit 1", t.account_id, t.member.user_id)
    refund(database, str(spend), 4)
    assert usage(database, t.member, t.account_id)["total"]["credits"] == 20
    assert usage(database, t.other, t.account_id)["total"]["credits"] == 17
    assert usage(database, t.owner, t.account_id)["total"]["credits"] == 49


def test_super_admins_read_every_account_in_full(database: Db) -> None:
    t = team(database)
    deduct(database, t.member, t.account_id, p_amount=3)
    deduct(database, t.owner, t.account_id, p_amount=4)
    admin, _ = database.new_user(app_metadata={"role": "super_admin"})
    assert usage(database, admin, t.account_id)["total"]["credits"] == 7
    pretender, _ = database.new_user(user_metadata={"role": "super_admin"})
    expect_error(usage, "PT403", "forbidden", database, pretender, t.account_id)


def test_another_accounts_caller_gets_the_same_error_as_other_reads(database: Db) -> None:
    caller, account_id = database.new_user()
    stranger, _ = database.new_user()
    t = team(database)
    for who, account in ((stranger, account_id), (stranger, t.account_id)):
        balance = expect_error(database.call, "PT403", "forbidden", "get_credit_balance", who,
                               p_account_id=account)
        assert expect_error(usage, "PT403", "forbidden", database, who, account) == balance
        # Authorization comes before the arguments.
        expect_error(usage, "PT403", "forbidden", database, who, account, ("nonsense",), p_bin="week")
    missing = str(uuid.uuid4())
    expect_error(database.call, "PT404", "account_not_found", "get_credit_balance", caller,
                 p_account_id=missing)
    expect_error(usage, "PT404", "account_not_found", database, caller, missing)
    expect_error(usage, "PT404", "account_not_found", database, Caller.service(), missing)
    # The service names the account; anon may not call it at all.
    detail = expect_error(usage, "22023", "invalid_argument", database, Caller.service(), None)
    assert detail["argument"] == "p_account_id"
    expect_error(usage, "42501", "permission denied for function get_credit_usage", database, Caller.anon(),
                 account_id)


@pytest.mark.parametrize(("args", "argument"), [
    ({"keys": ("operation", "colour")}, "p_group_by"),
    ({"keys": ("model", "model")}, "p_group_by"),
    ({"p_group_by": "{operation,NULL}"}, "p_group_by"),
    ({"p_group_by": "{{operation},{model}}"}, "p_group_by"),
    ({"p_bin": "week"}, "p_bin"),
    ({"p_bin": "HOUR"}, "p_bin"),
    ({"p_from": "2027-01-01T00:00:00Z", "p_to": "2027-01-01T00:00:00Z"}, "p_to"),
    ({"p_from": "2027-01-02T00:00:00Z", "p_to": "2027-01-01T00:00:00Z"}, "p_to"),
    ({"p_from": "-infinity"}, "p_from"),
    ({"p_to": "infinity"}, "p_to"),
])
def test_bad_arguments_are_invalid_argument(database: Db, args: dict[str, Any], argument: str) -> None:
    caller, account_id = database.new_user()
    keys = args.pop("keys", ())
    call_args = {"p_group_by": array(keys), **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "get_credit_usage", caller,
                          p_account_id=account_id, **call_args)
    assert detail["argument"] == argument, detail


def test_at_most_ten_thousand_rows(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=20_000)
    # 10,000 spends, each with a model of its own (the fast deduct, in one statement).
    database.sql("select public.deduct_credits(%s, 'use-bound-' || n, 1, p_model => 'model-' || n) "
                 "from generate_series(1, 10000) n", account_id)
    assert len(usage(database, caller, account_id, ("model",))["rows"]) == 10_000
    deduct(database, caller, account_id, p_amount=1, p_model="one-more")
    detail = expect_error(usage, "22023", "invalid_argument", database, caller, account_id, ("model",))
    assert (detail["argument"], detail["rows"], detail["limit"]) == ("p_from", 10_001, 10_000)
    assert "narrow" in detail["reason"]
    # A coarser answer is fine.
    assert usage(database, caller, account_id)["total"]["calls"] == 10_001


# --- the roll-up ------------------------------------------------------------------------------------

QUERIES = [("hour", ()), ("day", ("operation", "model")), ("month", KEYS), ("hour", ("member",))]


def answers(database: Db, caller: Caller, account_id: str, start: dt.datetime) -> list[Any]:
    """The same questions over several ranges: whole hours, and ends inside hours."""
    out = []
    for offset, length in ((dt.timedelta(0), dt.timedelta(hours=2)),
                           (dt.timedelta(seconds=1), dt.timedelta(minutes=30)),
                           (-dt.timedelta(minutes=7), dt.timedelta(hours=26))):
        for bin_, keys in QUERIES:
            out.append(usage(database, caller, account_id, keys, p_from=start + offset,
                             p_to=start + offset + length, p_bin=bin_))
    return out


def test_the_roll_up_changes_no_answer(database: Db) -> None:
    caller, account_id, started = busy_account(database)
    start = started.replace(minute=0, second=0, microsecond=0)
    before = answers(database, caller, account_id, start)
    roll_up_past(database)
    assert database.one("select count(*) from private.usage_hours where account_id = %s", account_id) > 0
    assert answers(database, caller, account_id, start) == before
    # Spends and refunds after the watermark come live; the answer is still the ledger's.
    database.fund(account_id, purchased=100)
    later = deduct(database, caller, account_id, p_amount=9, p_model="m-late")
    refund(database, later["transaction_id"], 4)
    refund(database, str(database.one("select id from public.credit_transactions where account_id = %s "
                                      "and kind = 'spend' and model = 'm-small' order by seq limit 1",
                                      account_id)), 1)
    end = start + dt.timedelta(hours=3)
    for bin_, keys in QUERIES:
        assert_matches_ledger(database, caller, account_id, start, end, bin_, keys)
    after_spends = answers(database, caller, account_id, start)
    roll_up_past(database)
    assert answers(database, caller, account_id, start) == after_spends
    for bin_, keys in QUERIES:
        assert_matches_ledger(database, caller, account_id, start, end, bin_, keys)


def test_on_postgresql_15(pg15: Db) -> None:  # noqa: F811
    # Ids come from the plain-SQL UUIDv7 there (PostgreSQL 18 has its own).
    add_prices(pg15)
    caller, account_id, started = busy_account(pg15)
    start = started.replace(minute=0, second=0, microsecond=0)
    for bin_, keys in QUERIES:
        assert_matches_ledger(pg15, caller, account_id, started, started + dt.timedelta(hours=1), bin_, keys)
    before = answers(pg15, caller, account_id, start)
    roll_up_past(pg15)
    assert answers(pg15, caller, account_id, start) == before
    assert rolled_sum(pg15, account_id) == usage(pg15, caller, account_id)["total"]["credits"]


def test_roll_up_is_the_services_alone(database: Db) -> None:
    caller, _ = database.new_user()
    for who in (caller, Caller.anon()):
        expect_error(database.call, "42501", "permission denied for function roll_up_credit_usage",
                     "roll_up_credit_usage", who)
    result = database.call("roll_up_credit_usage")
    assert {"rolled_until", "rows", "batches", "caught_up", "pending_until", "waiting_for"} <= set(result)


def test_one_roll_up_at_a_time_and_only_in_read_committed(database: Db) -> None:
    with database.connect() as other:
        with other.transaction():
            other.execute("select public.roll_up_credit_usage()")  # holds the state row until it ends
            assert database.call("roll_up_credit_usage") == {"skipped": "another roll-up is running"}
        with pytest.raises(psycopg.Error) as info, other.transaction():
            other.execute("set transaction isolation level repeatable read")
            other.execute("select public.roll_up_credit_usage()")
        assert (info.value.sqlstate, info.value.diag.message_primary) == ("25000", "read_committed_required")


def test_a_transaction_in_flight_is_counted_once_it_commits(database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=100)
    deduct(database, caller, account_id, p_amount=5, p_model="before")
    start: dt.datetime = database.one("select date_trunc('hour', now())")
    roll_up_past(database)  # the first spend is rolled up
    with database.connect() as open_one:
        # A spend written in a transaction that stays open while the roll-up runs.
        open_one.execute("begin")
        row = open_one.execute("select public.deduct_credits(%s, %s, 8, p_model => 'in-flight')",
                               (account_id, new_key("use-f"))).fetchone()
        assert row is not None
        in_flight = row[0]["transaction_id"]
        written = id_time(database, in_flight)
        for _ in range(3):
            database.call("roll_up_credit_usage")
            time.sleep(2.1)
        result = database.call("roll_up_credit_usage")
        # The watermark waits below the open transaction's row; the other spend is rolled up.
        assert result["waiting_for"] >= 1, result
        assert rolled_until(database) is not None and rolled_until(database) <= written
        assert usage(database, caller, account_id)["total"]["credits"] == 5
        assert rolled_sum(database, account_id) == 5
        open_one.execute("commit")
    assert usage(database, caller, account_id)["total"]["credits"] == 13
    roll_up_past(database)
    assert rolled_until(database) > written
    # Rolled up, not lost: the sums hold it, and every answer is the ledger's.
    assert rolled_sum(database, account_id) == 13
    for bin_, keys in QUERIES:
        assert_matches_ledger(database, caller, account_id, start, start + dt.timedelta(hours=2), bin_, keys)


def test_a_deleted_account_takes_its_usage_with_it(database: Db) -> None:
    caller, account_id = database.new_user()
    deduct(database, caller, account_id, p_amount=2)
    roll_up_past(database)
    assert database.one("select count(*) from private.usage_hours where account_id = %s", account_id) == 1
    database.sql("delete from auth.users where id = %s", caller.user_id)
    assert database.one("select count(*) from private.usage_hours where account_id = %s", account_id) == 0


def test_an_account_deletion_waits_for_a_running_roll_up(database: Db) -> None:
    caller, account_id = database.new_user()
    deduct(database, caller, account_id, p_amount=2)
    done = threading.Event()

    def delete() -> None:
        with database.connect() as conn:
            conn.execute("delete from auth.users where id = %s", (caller.user_id,))
        done.set()

    with database.connect() as rolling:
        with rolling.transaction():
            rolling.execute("select public.roll_up_credit_usage()")
            worker = threading.Thread(target=delete)
            worker.start()
            assert not done.wait(1.0)  # the deletion waits for the roll-up's transaction
        worker.join(10)
    assert done.is_set()
    assert database.one("select count(*) from private.usage_hours where account_id = %s", account_id) == 0


# --- on a clock the test sets -------------------------------------------------------------------------

def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture(scope="module")
def clock() -> Iterator[tuple[FakeClockServer, Db]]:
    """A throwaway server whose wall clock the tests move (forward only, in file order)."""
    reason = FakeClockServer.unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = FakeClockServer()
    try:
        admin = server.start(at(2027, 3, 1, 12))
        dsn = db.create_database(admin, "credits_usage_clock")
        db.prepare_database(dsn)
        handle = Db(dsn)
        add_prices(handle)
        assert handle.one("select now()").date() == dt.date(2027, 3, 1)  # the server's clock, not ours
        yield server, handle
        assert handle.call("reconcile_credit_balances")["mismatches"] == []
        handle.close()
    finally:
        server.stop()


def now(database: Db) -> dt.datetime:
    value: dt.datetime = database.one("select clock_timestamp()")
    return value


def move(server: FakeClockServer, database: Db, to: dt.datetime) -> None:
    """Move the clock forward to ``to`` (never back: the tests share one server)."""
    assert to > now(database)
    server.set(to)


def wait(server: FakeClockServer, database: Db, seconds: float) -> None:
    server.set(now(database) + dt.timedelta(seconds=seconds))


def roll_up_on_clock(server: FakeClockServer, database: Db) -> None:
    """Run the roll-up until its watermark passes the current time (moving the clock between runs)."""
    target = now(database)
    for _ in range(6):
        database.call("roll_up_credit_usage")
        until = rolled_until(database)
        if until is not None and until > target:
            return
        wait(server, database, 3)
    raise AssertionError(f"the roll-up did not pass {target}: {state(database)}")


def test_clock_ids_follow_the_servers_clock(clock: tuple[FakeClockServer, Db]) -> None:
    _, database = clock
    caller, account_id = database.new_user()
    spent = deduct(database, caller, account_id, p_amount=1)
    created = database.one("select created_at from public.credit_transactions where id = %s",
                           spent["transaction_id"])
    assert abs(id_time(database, spent["transaction_id"]) - created) < dt.timedelta(seconds=1)


def test_clock_bins_split_at_utc_boundaries(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=100)
    move(server, database, at(2027, 3, 31, 23, 59, 58))
    deduct(database, caller, account_id, p_amount=2, p_model="march")
    roll_up_on_clock(server, database)  # March is rolled up, partly live after it
    move(server, database, at(2027, 4, 1, 0, 0, 30))
    deduct(database, caller, account_id, p_amount=3, p_model="april")
    move(server, database, at(2027, 4, 1, 1, 0, 5))
    deduct(database, caller, account_id, p_amount=4, p_model="april")
    expected = {
        "hour": [(at(2027, 3, 31, 23), 2), (at(2027, 4, 1, 0), 3), (at(2027, 4, 1, 1), 4)],
        "day": [(at(2027, 3, 31), 2), (at(2027, 4, 1), 7)],
        "month": [(at(2027, 3, 1), 2), (at(2027, 4, 1), 7)],
    }
    start, end = at(2027, 3, 31, 23, 30), at(2027, 4, 1, 1, 30)
    for rolled in (False, True):
        if rolled:
            roll_up_on_clock(server, database)
        for bin_, rows in expected.items():
            answer = usage(database, caller, account_id, p_from=start, p_to=end, p_bin=bin_)
            assert [(dt.datetime.fromisoformat(r["period"]), r["credits"]) for r in answer["rows"]] == rows
        # Ranges that cut an hour: [from, to) (a second around each spend: the test's clock
        # starts each server process within microseconds of the time it is set to).
        assert usage(database, caller, account_id, p_from=at(2027, 3, 31, 23, 59, 57),
                     p_to=at(2027, 4, 1, 0, 0, 29))["total"]["credits"] == 2
        assert usage(database, caller, account_id, p_from=at(2027, 3, 31, 23, 59, 59),
                     p_to=at(2027, 4, 1, 0, 0, 31))["total"]["credits"] == 3
        assert usage(database, caller, account_id, p_from=at(2027, 4, 1),
                     p_to=at(2027, 4, 1, 1, 0, 4))["total"]["credits"] == 3
        assert usage(database, caller, account_id, p_from=at(2027, 4, 1, 0, 59),
                     p_to=at(2027, 4, 1, 1, 0, 6))["total"]["credits"] == 4


def test_clock_a_refund_counts_in_the_bin_of_its_time(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=100)
    move(server, database, at(2027, 4, 10, 9))
    spent = deduct(database, caller, account_id, p_amount=10, p_model="m")
    move(server, database, at(2027, 4, 12, 15))
    refund(database, spent["transaction_id"], 4)
    days = usage(database, caller, account_id, ("model",), p_from=at(2027, 4, 1), p_to=at(2027, 5, 1))
    assert [(r["period"][:10], r["credits"], r["calls"]) for r in days["rows"]] == [
        ("2027-04-10", 10, 1), ("2027-04-12", -4, 0)]
    assert days["total"]["credits"] == 6
    # A range after the spend sees the refund alone; the spend's day stays as it closed.
    only_refund = usage(database, caller, account_id, p_from=at(2027, 4, 11), p_to=at(2027, 4, 13))
    assert (only_refund["total"]["credits"], only_refund["total"]["calls"]) == (-4, 0)
    roll_up_on_clock(server, database)
    assert usage(database, caller, account_id, ("model",), p_from=at(2027, 4, 1), p_to=at(2027, 5, 1)) == days


def test_clock_a_spend_in_flight_across_an_hour_boundary(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=100)
    neighbour, neighbours_account = database.new_user()
    move(server, database, at(2027, 4, 20, 10, 59, 58))
    with database.connect() as open_one:
        open_one.execute("begin")
        row = open_one.execute("select public.deduct_credits(%s, %s, 6, p_model => 'slow')",
                               (account_id, new_key("use-f"))).fetchone()
        assert row is not None
        in_flight = row[0]["transaction_id"]
        move(server, database, at(2027, 4, 20, 11, 5))
        deduct(database, neighbour, neighbours_account, p_amount=1)  # 11:05, committed
        for _ in range(4):
            database.call("roll_up_credit_usage")
            wait(server, database, 30)
        # The hour of 10:00 ended minutes ago, yet the watermark stays below the open
        # transaction's row (and so below the committed spend after it).
        until = rolled_until(database)
        assert until is None or until <= id_time(database, in_flight)
        assert state(database)["pending_xacts"]
        assert usage(database, caller, account_id, p_from=at(2027, 4, 20, 10), p_to=at(2027, 4, 20, 12),
                     p_bin="hour")["rows"] == []
        open_one.execute("commit")
    move(server, database, at(2027, 4, 20, 11, 10))
    deduct(database, caller, account_id, p_amount=1, p_model="quick")
    hours = usage(database, caller, account_id, p_from=at(2027, 4, 20, 10), p_to=at(2027, 4, 20, 12),
                  p_bin="hour")
    roll_up_on_clock(server, database)
    # The spend counts in the hour its transaction began, rolled up like any other.
    assert [(r["period"][11:13], r["credits"]) for r in hours["rows"]] == [("10", 6), ("11", 1)]
    assert usage(database, caller, account_id, p_from=at(2027, 4, 20, 10), p_to=at(2027, 4, 20, 12),
                 p_bin="hour") == hours
    assert rolled_sum(database, account_id) == 7
    assert rolled_sum(database, neighbours_account) == 1


MODELS = ("m-a", "m-b", None)
OPERATIONS = (CHAT, EMBED, None)
STEP = st.one_of(
    st.tuples(st.just("spend"), st.sampled_from(MODELS), st.sampled_from(OPERATIONS), st.integers(1, 9)),
    st.tuples(st.just("refund"), st.integers(0, 50), st.integers(1, 5)),
    st.tuples(st.just("wait"), st.integers(1, 5400)),
    st.tuples(st.just("roll")),
)
GROUPINGS = st.permutations(KEYS).flatmap(lambda keys: st.integers(0, 4).map(lambda n: tuple(keys[:n])))
QUESTION = st.tuples(st.integers(0, 4 * 3600), st.integers(1, 8 * 3600),
                     st.sampled_from(("hour", "day", "month")), GROUPINGS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=24), questions=st.lists(QUESTION, min_size=1, max_size=4))
def test_clock_any_history_at_any_lag_answers_as_the_ledger(
        clock: tuple[FakeClockServer, Db], steps: list[tuple[Any, ...]],
        questions: list[tuple[int, int, str, tuple[str, ...]]]) -> None:
    server, database = clock
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10_000)
    wait(server, database, 1)
    began = now(database)
    spends: list[tuple[str, int]] = []  # (transaction id, refundable)
    for step in steps:
        if step[0] == "spend":
            _, model, operation, amount = step
            args = {"p_operation": operation} if operation else {"p_amount": amount}
            spent = deduct(database, caller, account_id, p_model=model, **args)
            spends.append((spent["transaction_id"], spent["charged"]))
        elif step[0] == "refund" and spends:
            index = step[1] % len(spends)
            transaction_id, left = spends[index]
            if left:
                amount = min(step[2], left)
                refund(database, transaction_id, amount)
                spends[index] = (transaction_id, left - amount)
        elif step[0] == "wait":
            wait(server, database, step[1])
        elif step[0] == "roll":
            database.call("roll_up_credit_usage")
            wait(server, database, 3)

    def check() -> list[Any]:
        out = []
        for offset, length, bin_, keys in questions:
            start = began + dt.timedelta(seconds=offset - 3600)
            out.append(assert_matches_ledger(database, caller, account_id, start,
                                             start + dt.timedelta(seconds=length), bin_, keys))
        return out

    lagging = check()
    roll_up_on_clock(server, database)
    assert check() == lagging
