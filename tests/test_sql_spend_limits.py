"""Spend limits (v3): set_spend_limit, the credit_spend_limits view, spend_limit_exceeded,
and what they mean for every path that spends (deduct, license-key deduct, reserve,
extend_hold, the part of a capture above its hold), for privacy and under concurrency.

Windows are UTC: a day, an ISO week from Monday 00:00, a calendar month, or the
account's billing period (the balance object's period). The tests at the end move a
throwaway server's wall clock (tests/clock.py) across those boundaries.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.clock import FakeClockServer
from tests.support import Caller, Db, expect_error, new_key, select_as, snapshot

UTC = dt.UTC
LIMIT_KEYS = {"account_id", "subject", "subject_id", "limit", "period", "spent", "held", "resets_at"}
VIEW_COLUMNS = LIMIT_KEYS
EXCEEDED_KEYS = {"limit", "spent", "held", "required", "period", "resets_at"}
ESTIMATE_KEYS = {"cost", "available", "affordable", "max_output_tokens", "limit_remaining"}

# Operations priced for this module (names unique to it).
PRICES = {
    "sl-op": (2, "1", "0"),          # 2 + 1 per 1,000 input tokens
    "sl-priced": (2, "0.5", "1.5"),  # for the usage log's price
    "sl-repriced": (3, "0", "0"),    # its price changes after a spend
}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    for operation, (credits, rate_in, rate_out) in PRICES.items():
        database.sql(
            "insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
            "credits_per_1k_output_tokens) values (%s, %s, %s, %s) on conflict (operation) do nothing",
            operation, credits, rate_in, rate_out)


# --- helpers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Team:
    """A tenant with an owner, an admin and two plain members, and its funded account."""

    tenant_id: str
    account_id: str
    owner: Caller
    admin: Caller
    member: Caller
    other: Caller  # a second plain member


def team(database: Db, purchased: int = 100) -> Team:
    owner, _ = database.new_user()
    admin, _ = database.new_user()
    member, _ = database.new_user()
    other, _ = database.new_user()
    tenant_id, account_id = database.new_tenant({
        owner.user_id: "owner", admin.user_id: "admin", member.user_id: "member", other.user_id: "member"})
    database.fund(account_id, purchased=purchased)
    return Team(tenant_id, account_id, owner, admin, member, other)


def uid(caller: Caller) -> str:
    assert caller.user_id is not None
    return caller.user_id


def set_limit(database: Db, caller: Caller, account_id: str, subject: str, limit: int | None,
              period: str = "day", subject_id: str | None = None) -> Any:
    return database.call("set_spend_limit", caller, p_account_id=account_id, p_subject=subject,
                         p_limit=limit, p_period=period, p_subject_id=subject_id)


def limit_member(database: Db, t: Team, who: Caller, limit: int | None, period: str = "day",
                 by: Caller | None = None) -> Any:
    return set_limit(database, by or t.owner, t.account_id, "member", limit, period, uid(who))


def deduct(database: Db, caller: Caller, account_id: str, amount: int | None = 1, key: str | None = None,
           **args: Any) -> Any:
    return database.call("deduct_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key(), p_amount=amount, **args)


def reserve(database: Db, caller: Caller, account_id: str, amount: int, key: str | None = None,
            **args: Any) -> Any:
    return database.call("reserve_credits", caller, p_account_id=account_id,
                         p_idempotency_key=key or new_key(), p_amount=amount, **args)


def by_license(database: Db, key: str, amount: int | None = 1, idem: str | None = None, **args: Any) -> Any:
    return database.call("deduct_credits_by_license", p_license_key=key,
                         p_idempotency_key=idem or new_key(), p_amount=amount, **args)


def exceeded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    return expect_error(fn, "PT402", "spend_limit_exceeded", *args, **kwargs)


def forbidden(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    expect_error(fn, "PT403", "forbidden", *args, **kwargs)


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def db_now(database: Db) -> dt.datetime:
    return database.one("select now()").astimezone(UTC)


def window_end(now: dt.datetime, period: str) -> dt.datetime:
    """The end of the UTC window of ``period`` containing ``now``."""
    day = dt.datetime(now.year, now.month, now.day, tzinfo=UTC)
    if period == "day":
        return day + dt.timedelta(days=1)
    if period == "week":
        return day + dt.timedelta(days=7 - day.weekday())  # the next Monday 00:00
    assert period == "month", period
    return (day.replace(day=1) + dt.timedelta(days=32)).replace(day=1)


def resets_at(database: Db, period: str, account_id: str | None = None) -> dt.datetime:
    if period == "billing_period":
        assert account_id is not None
        return ts(database.balance(account_id)["period_end"])
    return window_end(db_now(database), period)


def assert_exceeded(detail: dict[str, Any], *, limit: int, spent: int, held: int, required: int,
                    period: str, ends: dt.datetime) -> None:
    assert set(detail) == EXCEEDED_KEYS, detail
    assert {k: v for k, v in detail.items() if k != "resets_at"} == {
        "limit": limit, "spent": spent, "held": held, "required": required, "period": period}
    assert ts(detail["resets_at"]) == ends


def view_rows(database: Db, caller: Caller, account_id: str) -> list[dict[str, Any]]:
    return select_as(database, caller, "select * from public.credit_spend_limits where account_id = %s "
                     "order by subject, subject_id, period", account_id)


def figures(rows: list[dict[str, Any]]) -> set[tuple]:
    """(subject, subject_id, limit, period, spent, held) of view rows."""
    return {(r["subject"], str(r["subject_id"]) if r["subject_id"] is not None else None, r["limit"],
             r["period"], r["spent"], r["held"]) for r in rows}


def service_view(database: Db, account_id: str) -> set[tuple]:
    return figures(view_rows(database, Caller.service(), account_id))


def member_spends(database: Db, account_id: str, caller: Caller) -> int:
    """Credits the ledger shows this user spent from the account."""
    return -sum(r["amount"] for r in database.ledger(account_id)
                if r["type"] == "spend" and str(r["actor_id"]) == uid(caller))


def hold_row(database: Db, hold_id: str) -> tuple:
    return database.one("select status, amount from public.credit_holds where id = %s", hold_id)


# --- set_spend_limit: the answer ----------------------------------------------------------

def test_an_owner_limits_a_member_and_reads_the_limits_figures(database: Db) -> None:
    t = team(database)
    forbidden(deduct, database, t.member, t.account_id)  # no limit applies to the member yet
    result = limit_member(database, t, t.member, 10)
    assert set(result) == LIMIT_KEYS
    assert {k: v for k, v in result.items() if k != "resets_at"} == {
        "account_id": t.account_id, "subject": "member", "subject_id": uid(t.member), "limit": 10,
        "period": "day", "spent": 0, "held": 0}
    assert ts(result["resets_at"]) == resets_at(database, "day")
    # The member may now spend from the tenant's account, as themselves.
    spend = deduct(database, t.member, t.account_id, 4)
    assert (spend["charged"], spend["balance"]["total"]) == (4, 99)
    assert database.ledger(t.account_id)[-1]["actor_id"] == uid(t.member)


def test_the_answer_counts_what_was_spent_and_held_before_the_limit(database: Db) -> None:
    t = team(database)
    deduct(database, t.owner, t.account_id, 4)
    reserve(database, t.owner, t.account_id, 2)
    result = set_limit(database, t.owner, t.account_id, "member", 10, "day", uid(t.owner))
    assert (result["limit"], result["spent"], result["held"]) == (10, 4, 2)

    set_limit(database, t.owner, t.account_id, "default_member", 100, "day")
    deduct(database, t.member, t.account_id, 3)
    reserve(database, t.member, t.account_id, 1)
    result = limit_member(database, t, t.member, 5)
    assert (result["spent"], result["held"]) == (3, 1)
    before = snapshot(database, t.account_id)
    detail = exceeded(deduct, database, t.member, t.account_id, 2)
    assert_exceeded(detail, limit=5, spent=3, held=1, required=2, period="day",
                    ends=resets_at(database, "day"))
    assert snapshot(database, t.account_id) == before
    assert deduct(database, t.member, t.account_id, 1)["charged"] == 1


def test_a_default_member_limit_answers_without_figures(database: Db) -> None:
    t = team(database)
    result = set_limit(database, t.admin, t.account_id, "default_member", 5, "week")
    assert set(result) == LIMIT_KEYS
    assert {k: v for k, v in result.items() if k != "resets_at"} == {
        "account_id": t.account_id, "subject": "default_member", "subject_id": None, "limit": 5,
        "period": "week", "spent": None, "held": None}
    assert ts(result["resets_at"]) == resets_at(database, "week")


@pytest.mark.parametrize("period", ["day", "week", "month", "billing_period"])
def test_resets_at_is_the_end_of_the_window(database: Db, period: str) -> None:
    t = team(database)
    result = limit_member(database, t, t.member, 7, period)
    assert (result["period"], result["limit"]) == (period, 7)
    assert ts(result["resets_at"]) == resets_at(database, period, t.account_id)
    deduct(database, t.member, t.account_id, 7)
    detail = exceeded(deduct, database, t.member, t.account_id, 1)
    assert_exceeded(detail, limit=7, spent=7, held=0, required=1, period=period,
                    ends=resets_at(database, period, t.account_id))


def test_billing_period_is_the_accounts_current_period(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 100, "month")
    deduct(database, t.member, t.account_id, 5)
    # A new period starts now (as a subscription invoice would start it), ending in 30 days.
    start = db_now(database)
    end = start + dt.timedelta(days=30)
    database.call("add_subscription_credits", p_account_id=t.account_id, p_amount=10,
                  p_period_start=start.isoformat(), p_period_end=end.isoformat(), p_idempotency_key=new_key())
    assert ts(database.balance(t.account_id)["period_end"]) == end

    result = limit_member(database, t, t.member, 100, "billing_period")
    assert (result["spent"], result["held"]) == (0, 0)  # the spend was before this period
    assert ts(result["resets_at"]) == end
    deduct(database, t.member, t.account_id, 2)
    assert service_view(database, t.account_id) == {
        ("member", uid(t.member), 100, "month", 7, 0),
        ("member", uid(t.member), 100, "billing_period", 2, 0)}


def test_setting_a_limit_again_replaces_it(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    result = limit_member(database, t, t.member, 3)
    assert (result["limit"], result["period"]) == (3, "day")
    assert service_view(database, t.account_id) == {("member", uid(t.member), 3, "day", 0, 0)}
    limit_member(database, t, t.member, 7, "week")  # another period kind: a second limit
    assert service_view(database, t.account_id) == {
        ("member", uid(t.member), 3, "day", 0, 0), ("member", uid(t.member), 7, "week", 0, 0)}
    deduct(database, t.member, t.account_id, 3)
    detail = exceeded(deduct, database, t.member, t.account_id, 1)
    assert (detail["period"], detail["limit"], detail["spent"]) == ("day", 3, 3)


def test_a_null_limit_removes_it(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 5)
    deduct(database, t.member, t.account_id, 1)
    result = limit_member(database, t, t.member, None)
    assert (result["account_id"], result["subject"], result["subject_id"], result["period"],
            result["limit"]) == (t.account_id, "member", uid(t.member), "day", None)
    assert service_view(database, t.account_id) == set()
    # No limit applies to the plain member any more: they may not spend at all.
    before = snapshot(database, t.account_id)
    forbidden(deduct, database, t.member, t.account_id, 1)
    forbidden(reserve, database, t.member, t.account_id, 1)
    assert snapshot(database, t.account_id) == before


def test_a_zero_limit_lets_the_member_spend_nothing(database: Db) -> None:
    t = team(database)
    result = limit_member(database, t, t.member, 0)
    assert result["limit"] == 0
    before = snapshot(database, t.account_id)
    ends = resets_at(database, "day")
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1),
                    limit=0, spent=0, held=0, required=1, period="day", ends=ends)
    assert_exceeded(exceeded(reserve, database, t.member, t.account_id, 2),
                    limit=0, spent=0, held=0, required=2, period="day", ends=ends)
    assert snapshot(database, t.account_id) == before


BAD_ARGUMENTS = {
    "unknown subject": ({"p_subject": "user"}, "p_subject"),
    "no subject": ({"p_subject": None}, "p_subject"),
    "unknown period": ({"p_period": "year"}, "p_period"),
    "no period": ({"p_period": None}, "p_period"),
    "member without a user": ({"p_subject_id": None}, "p_subject_id"),
    "a user who is no member": ({"p_subject_id": "stranger"}, "p_subject_id"),
    "a negative limit": ({"p_limit": -1}, "p_limit"),
    "a key of another account": ({"p_subject": "license_key", "p_subject_id": "foreign key"}, "p_subject_id"),
    "an unknown key": ({"p_subject": "license_key", "p_subject_id": "unknown"}, "p_subject_id"),
    "a key without its id": ({"p_subject": "license_key", "p_subject_id": None}, "p_subject_id"),
}


@pytest.mark.parametrize("setter", ["owner", "service"])
@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_set_spend_limit_rejects_bad_arguments(database: Db, case: str, setter: str) -> None:
    t = team(database)
    stranger, stranger_account = database.new_user()
    foreign = database.call("create_license_key", p_account_id=stranger_account, p_name="theirs")["key_id"]
    changes, argument = BAD_ARGUMENTS[case]
    # BAD_ARGUMENTS names ids that only exist once the test made them.
    stand_in = {"stranger": uid(stranger), "foreign key": foreign, "unknown": str(uuid.uuid4())}
    args = {"p_account_id": t.account_id, "p_subject": "member", "p_limit": 5, "p_period": "day",
            "p_subject_id": uid(t.member), **changes}
    args = {k: stand_in.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    caller = t.owner if setter == "owner" else Caller.service()
    detail = expect_error(database.call, "22023", "invalid_argument", "set_spend_limit", caller, **args)
    assert detail["argument"] == argument
    assert service_view(database, t.account_id) == set()
    forbidden(deduct, database, t.member, t.account_id)  # still no limit for the member


def test_a_personal_accounts_limit_names_its_own_user(database: Db) -> None:
    user, account_id = database.new_user()
    someone, _ = database.new_user()
    database.fund(account_id, purchased=10)
    detail = expect_error(set_limit, "22023", "invalid_argument", database, user, account_id, "member", 2,
                          "day", uid(someone))
    assert detail["argument"] == "p_subject_id"
    result = set_limit(database, user, account_id, "member", 2, "day", uid(user))
    assert (result["subject_id"], result["limit"]) == (uid(user), 2)
    deduct(database, user, account_id, 2)
    assert_exceeded(exceeded(deduct, database, user, account_id, 1), limit=2, spent=2, held=0, required=1,
                    period="day", ends=resets_at(database, "day"))
    assert database.balance(account_id)["total"] == 11


def test_set_spend_limit_of_an_unknown_account(database: Db) -> None:
    expect_error(set_limit, "PT404", "account_not_found", database, Caller.service(), str(uuid.uuid4()),
                 "default_member", 5)


# --- set_spend_limit: who may ----------------------------------------------------------------

# (setter, subject named) -> allowed. Only an owner or the service may name an owner or an admin.
WHO_MAY_SET = [
    ("owner", "member", True), ("owner", "admin", True), ("owner", "owner", True),
    ("owner", "default_member", True), ("owner", "license_key", True),
    ("admin", "member", True), ("admin", "default_member", True), ("admin", "license_key", True),
    ("admin", "owner", False), ("admin", "admin", False),
    ("member", "member", False), ("member", "default_member", False), ("member", "license_key", False),
    ("stranger", "member", False), ("stranger", "default_member", False),
    ("service", "owner", True), ("service", "admin", True), ("service", "member", True),
]


@pytest.mark.parametrize(("setter", "named", "allowed"), WHO_MAY_SET)
def test_who_may_set_a_limit(database: Db, setter: str, named: str, allowed: bool) -> None:
    t = team(database)
    stranger, _ = database.new_user()
    key_id = database.call("create_license_key", t.owner, p_account_id=t.account_id, p_name="ci")["key_id"]
    callers = {"owner": t.owner, "admin": t.admin, "member": t.member, "stranger": stranger,
               "service": Caller.service()}
    if named in ("member", "admin", "owner"):
        subject, subject_id = "member", uid(callers[named])
    else:
        subject, subject_id = named, key_id if named == "license_key" else None
    args = (database, callers[setter], t.account_id, subject, 5, "day", subject_id)
    if allowed:
        assert set_limit(*args)["limit"] == 5
        assert len(view_rows(database, Caller.service(), t.account_id)) >= 1
    else:
        forbidden(set_limit, *args)
        assert service_view(database, t.account_id) == set()


def test_an_admin_may_not_change_or_remove_a_limit_naming_an_owner_or_admin(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.admin, 5)
    limit_member(database, t, t.owner, 6)
    limits = service_view(database, t.account_id)
    for named in (t.admin, t.owner):
        forbidden(limit_member, database, t, named, None, by=t.admin)
        forbidden(limit_member, database, t, named, 100, by=t.admin)
    assert service_view(database, t.account_id) == limits
    limit_member(database, t, t.admin, None)  # the owner may
    assert service_view(database, t.account_id) == {("member", uid(t.owner), 6, "day", 0, 0)}


# --- who may spend ---------------------------------------------------------------------------

def test_a_plain_member_spends_only_where_a_limit_applies(database: Db) -> None:
    t = team(database)
    before = snapshot(database, t.account_id)
    forbidden(deduct, database, t.member, t.account_id)
    forbidden(reserve, database, t.member, t.account_id, 1)
    assert snapshot(database, t.account_id) == before

    limit_member(database, t, t.member, 10)
    assert deduct(database, t.member, t.account_id)["charged"] == 1
    forbidden(deduct, database, t.other, t.account_id)  # a limit naming someone else is not theirs

    set_limit(database, t.owner, t.account_id, "default_member", 5)
    assert deduct(database, t.other, t.account_id)["charged"] == 1
    assert reserve(database, t.other, t.account_id, 1)["amount"] == 1

    set_limit(database, t.owner, t.account_id, "default_member", None)
    limit_member(database, t, t.member, None)
    after = snapshot(database, t.account_id)
    forbidden(deduct, database, t.member, t.account_id)
    forbidden(deduct, database, t.other, t.account_id)
    assert snapshot(database, t.account_id) == after
    assert after.balance["total"] == 103 - 2


def test_owners_and_admins_are_unlimited_unless_a_limit_names_them(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 1)
    deduct(database, t.owner, t.account_id, 5)
    deduct(database, t.admin, t.account_id, 5)
    result = limit_member(database, t, t.admin, 6)
    assert (result["spent"], result["held"]) == (5, 0)
    assert_exceeded(exceeded(deduct, database, t.admin, t.account_id, 2), limit=6, spent=5, held=0,
                    required=2, period="day", ends=resets_at(database, "day"))
    deduct(database, t.admin, t.account_id, 1)
    assert deduct(database, t.owner, t.account_id, 10)["charged"] == 10  # the owner is named by nothing
    assert database.balance(t.account_id)["total"] == 103 - 21


def test_the_service_is_limited_by_nothing(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 0)
    limit_member(database, t, t.owner, 0)
    service = Caller.service()
    assert deduct(database, service, t.account_id, 5)["charged"] == 5
    hold = reserve(database, service, t.account_id, 5)
    assert database.call("capture_hold", service, p_hold_id=hold["hold_id"])["charged"] == 5
    assert database.balance(t.account_id)["total"] == 93


# --- spending under limits -------------------------------------------------------------------

def test_spend_limit_exceeded_reports_the_figures_and_changes_nothing(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    deduct(database, t.member, t.account_id, 6)
    reserve(database, t.member, t.account_id, 3, p_ttl_seconds=600)
    before = snapshot(database, t.account_id)
    key = new_key()
    detail = exceeded(deduct, database, t.member, t.account_id, 2, key)
    assert_exceeded(detail, limit=10, spent=6, held=3, required=2, period="day",
                    ends=resets_at(database, "day"))
    assert snapshot(database, t.account_id) == before
    # The last credit under the limit can be spent...
    assert deduct(database, t.member, t.account_id, 1)["charged"] == 1
    exceeded(deduct, database, t.member, t.account_id, 1)
    # ...and the refused key was not used up: with a higher limit it spends.
    limit_member(database, t, t.member, 12)
    again = deduct(database, t.member, t.account_id, 2, key)
    assert (again["replayed"], again["charged"]) == (False, 2)
    assert member_spends(database, t.account_id, t.member) == 9


def test_a_reserve_is_limited_like_a_deduct(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 5)
    reserve(database, t.member, t.account_id, 3)
    before = snapshot(database, t.account_id)
    assert_exceeded(exceeded(reserve, database, t.member, t.account_id, 3), limit=5, spent=0, held=3,
                    required=3, period="day", ends=resets_at(database, "day"))
    assert snapshot(database, t.account_id) == before
    assert reserve(database, t.member, t.account_id, 2)["balance"]["held"] == 5


def test_an_operations_cost_is_what_the_limit_counts(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 5)
    first = deduct(database, t.member, t.account_id, None, p_operation="sl-op", p_input_tokens=1000)
    assert first["charged"] == 3
    detail = exceeded(deduct, database, t.member, t.account_id, None, p_operation="sl-op",
                      p_input_tokens=1000)
    assert (detail["required"], detail["spent"]) == (3, 3)
    assert deduct(database, t.member, t.account_id, None, p_operation="sl-op")["charged"] == 2


def test_a_member_named_by_a_limit_falls_under_no_default_limit(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 2)
    limit_member(database, t, t.member, 10, "week")
    assert deduct(database, t.member, t.account_id, 6)["charged"] == 6  # the default 2 a day is not theirs
    assert_exceeded(exceeded(deduct, database, t.other, t.account_id, 3), limit=2, spent=0, held=0,
                    required=3, period="day", ends=resets_at(database, "day"))
    assert deduct(database, t.other, t.account_id, 2)["charged"] == 2


def test_the_default_member_limit_is_each_members_own(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 3)
    deduct(database, t.member, t.account_id, 3)
    deduct(database, t.other, t.account_id, 3)  # the member's spends are not the other's
    for who in (t.member, t.other):
        assert_exceeded(exceeded(deduct, database, who, t.account_id, 1), limit=3, spent=3, held=0,
                        required=1, period="day", ends=resets_at(database, "day"))
    assert member_spends(database, t.account_id, t.member) == 3
    assert member_spends(database, t.account_id, t.other) == 3


def test_every_limit_of_a_subject_applies(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10, "day")
    limit_member(database, t, t.member, 6, "month")
    deduct(database, t.member, t.account_id, 4)
    deduct(database, t.member, t.account_id, 2)
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=6, spent=6, held=0,
                    required=1, period="month", ends=resets_at(database, "month"))


def test_refunds_give_back_room_under_the_limit(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    spend = deduct(database, t.member, t.account_id, 10)
    database.call("refund_credits", p_transaction_id=spend["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=4)
    assert limit_member(database, t, t.member, 10)["spent"] == 6
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 5), limit=10, spent=6, held=0,
                    required=5, period="day", ends=resets_at(database, "day"))
    assert deduct(database, t.member, t.account_id, 4)["charged"] == 4


def test_held_credits_count_until_released(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    hold = reserve(database, t.member, t.account_id, 7)
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 4), limit=10, spent=0, held=7,
                    required=4, period="day", ends=resets_at(database, "day"))
    database.call("release_hold", t.member, p_hold_id=hold["hold_id"])
    assert deduct(database, t.member, t.account_id, 4)["charged"] == 4
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 4, 0)}


def test_a_captured_hold_counts_as_spent(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    hold = reserve(database, t.member, t.account_id, 6)
    capture = database.call("capture_hold", t.member, p_hold_id=hold["hold_id"], p_amount=4)
    assert (capture["charged"], capture["released"]) == (4, 2)
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 4, 0)}
    deduct(database, t.member, t.account_id, 6)
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=10, spent=10, held=0,
                    required=1, period="day", ends=resets_at(database, "day"))


def test_a_capture_within_its_hold_never_fails_on_the_limit(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    hold = reserve(database, t.member, t.account_id, 8)
    limit_member(database, t, t.member, 2)  # lowered below what is already held
    total = database.balance(t.account_id)["total"]
    capture = database.call("capture_hold", t.member, p_hold_id=hold["hold_id"])
    assert (capture["charged"], capture["released"], capture["replayed"]) == (8, 0, False)
    assert capture["balance"]["total"] == total - 8
    assert service_view(database, t.account_id) == {("member", uid(t.member), 2, "day", 8, 0)}
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=2, spent=8, held=0,
                    required=1, period="day", ends=resets_at(database, "day"))


@pytest.mark.parametrize("captor", ["member", "owner"])
def test_a_capture_above_its_hold_is_covered_up_to_the_makers_remaining_limit(database: Db,
                                                                              captor: str) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    deduct(database, t.member, t.account_id, 2)
    hold = reserve(database, t.member, t.account_id, 6, p_overage="if_available")
    total = database.balance(t.account_id)["total"]
    # 12 asked: the hold's 6 plus 2 of the member's limit (10 - 2 spent - 6 held); 4 are not covered.
    capture = database.call("capture_hold", t.member if captor == "member" else t.owner,
                            p_hold_id=hold["hold_id"], p_amount=12)
    assert (capture["requested"], capture["charged"], capture["uncovered"], capture["debt_added"],
            capture["released"]) == (12, 8, 4, 0, 0)
    assert capture["balance"]["total"] == total - 8
    assert database.balance(t.account_id)["total"] == total - 8
    charged = [r for r in database.ledger(t.account_id)
               if str(r["transaction_id"]) == capture["transaction_id"]]
    assert -sum(r["amount"] for r in charged) == 8
    # The capture counts against the maker's limit, whoever captured it.
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 10, 0)}


@pytest.mark.parametrize("maker", ["owner", "service"])
def test_an_unlimited_makers_capture_above_its_hold_is_covered_on_a_limited_account(database: Db,
                                                                                   maker: str) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 1)  # a limit, but none for the maker
    caller = t.owner if maker == "owner" else Caller.service()
    hold = reserve(database, caller, t.account_id, 6, p_overage="if_available")
    total = database.balance(t.account_id)["total"]
    capture = database.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=12)
    assert (capture["requested"], capture["charged"], capture["uncovered"]) == (12, 12, 0)
    assert database.balance(t.account_id)["total"] == total - 12


def test_a_refunded_capture_gives_its_maker_room(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    hold = reserve(database, t.member, t.account_id, 8)
    capture = database.call("capture_hold", t.owner, p_hold_id=hold["hold_id"])
    database.call("refund_credits", p_transaction_id=capture["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=5)
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 3, 0)}
    assert deduct(database, t.member, t.account_id, 7)["charged"] == 7
    exceeded(deduct, database, t.member, t.account_id, 1)


def test_an_owners_priced_reserve_on_a_limited_account_reports_what_the_credits_cover(database: Db) -> None:
    t = team(database, purchased=0)  # 3 credits
    set_limit(database, t.owner, t.account_id, "default_member", 1)
    detail = expect_error(reserve, "PT402", "insufficient_credits", database, t.owner, t.account_id, None,
                          p_operation="sl-priced", p_output_tokens=10000)
    # 2 + 1.5 per 1,000 output tokens, rounded up, within 3 credits: 666 tokens (the owner has no limit).
    assert detail == {"required": 17, "available": 3, "max_output_tokens": 666}


def test_extend_hold_is_limited_all_or_nothing(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 10)
    hold = reserve(database, t.member, t.account_id, 6)
    before = snapshot(database, t.account_id)
    detail = exceeded(database.call, "extend_hold", t.member, p_hold_id=hold["hold_id"],
                      p_idempotency_key=new_key(), p_add_amount=5)
    assert_exceeded(detail, limit=10, spent=0, held=6, required=5, period="day",
                    ends=resets_at(database, "day"))
    assert snapshot(database, t.account_id) == before
    assert hold_row(database, hold["hold_id"]) == ("active", 6)
    grown = database.call("extend_hold", t.member, p_hold_id=hold["hold_id"], p_idempotency_key=new_key(),
                          p_add_amount=4)
    assert (grown["amount"], grown["balance"]["held"]) == (10, 10)
    # At the limit, moving the expiry alone adds nothing and is allowed.
    moved = database.call("extend_hold", t.member, p_hold_id=hold["hold_id"], p_idempotency_key=new_key(),
                          p_ttl_seconds=1200)
    assert moved["amount"] == 10
    assert hold_row(database, hold["hold_id"]) == ("active", 10)


def test_a_replay_replays_even_past_the_limit(database: Db) -> None:
    t = team(database)
    limit_member(database, t, t.member, 5)
    deduct_key, reserve_key = new_key(), new_key()
    first = deduct(database, t.member, t.account_id, 3, deduct_key)
    held = reserve(database, t.member, t.account_id, 2, reserve_key)
    limit_member(database, t, t.member, 1)
    after = snapshot(database, t.account_id)
    assert deduct(database, t.member, t.account_id, 3, deduct_key) == {**first, "replayed": True}
    assert reserve(database, t.member, t.account_id, 2, reserve_key) == {**held, "replayed": True}
    assert snapshot(database, t.account_id) == after
    exceeded(deduct, database, t.member, t.account_id, 3)  # a new key is a new spend
    # Authorization comes before the replay: without any limit the member may not even replay.
    limit_member(database, t, t.member, None)
    forbidden(deduct, database, t.member, t.account_id, 3, deduct_key)


def test_limits_are_checked_before_credits(database: Db) -> None:
    t = team(database, purchased=0)  # 3 credits available
    limit_member(database, t, t.member, 5)
    before = snapshot(database, t.account_id)
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 8), limit=5, spent=0, held=0,
                    required=8, period="day", ends=resets_at(database, "day"))
    assert expect_error(deduct, "PT402", "insufficient_credits", database, t.member, t.account_id, 4) == {
        "required": 4, "available": 3}
    assert snapshot(database, t.account_id) == before


def test_authorization_comes_before_the_arguments_and_the_arguments_before_the_limits(database: Db) -> None:
    t = team(database)
    forbidden(deduct, database, t.member, t.account_id, 0)
    limit_member(database, t, t.member, 0)
    detail = expect_error(deduct, "22023", "invalid_argument", database, t.member, t.account_id, 0)
    assert detail["argument"] == "p_amount"


# --- license keys ----------------------------------------------------------------------------

def test_a_license_key_limit_caps_what_the_key_spends(database: Db) -> None:
    user, account_id = database.new_user()
    database.fund(account_id, purchased=50)
    created = database.call("create_license_key", user, p_account_id=account_id, p_name="server")
    spare = database.call("create_license_key", user, p_account_id=account_id, p_name="spare")["key"]
    by_license(database, created["key"], 4)
    result = set_limit(database, user, account_id, "license_key", 10, "day", created["key_id"])
    assert {k: v for k, v in result.items() if k != "resets_at"} == {
        "account_id": account_id, "subject": "license_key", "subject_id": created["key_id"], "limit": 10,
        "period": "day", "spent": 4, "held": 0}
    assert by_license(database, created["key"], 6)["charged"] == 6
    before = snapshot(database, account_id)
    assert_exceeded(exceeded(by_license, database, created["key"], 1), limit=10, spent=10, held=0, required=1,
                    period="day", ends=resets_at(database, "day"))
    assert snapshot(database, account_id) == before
    # The key's limit is the key's: the account's user and its other keys spend on.
    assert deduct(database, user, account_id, 5)["charged"] == 5
    assert by_license(database, spare, 5)["charged"] == 5
    assert database.balance(account_id)["total"] == 53 - 20


def test_a_license_key_replay_replays_past_its_limit(database: Db) -> None:
    user, account_id = database.new_user()
    created = database.call("create_license_key", user, p_account_id=account_id, p_name="server")
    set_limit(database, user, account_id, "license_key", 2, "week", created["key_id"])
    idem = new_key()
    first = by_license(database, created["key"], 2, idem)
    assert by_license(database, created["key"], 2, idem) == {**first, "replayed": True}
    detail = exceeded(by_license, database, created["key"], 1)
    assert (detail["period"], detail["spent"]) == ("week", 2)


# --- holds of plain members --------------------------------------------------------------------

def test_a_plain_member_settles_only_the_holds_they_made(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 20)
    mine = reserve(database, t.member, t.account_id, 6)["hold_id"]
    theirs = reserve(database, t.other, t.account_id, 2)["hold_id"]
    before = snapshot(database, t.account_id)
    forbidden(database.call, "capture_hold", t.other, p_hold_id=mine)
    forbidden(database.call, "release_hold", t.other, p_hold_id=mine)
    assert snapshot(database, t.account_id) == before
    assert hold_row(database, mine) == ("active", 6)
    assert database.call("capture_hold", t.member, p_hold_id=mine)["charged"] == 6
    # Owners and admins settle anyone's holds.
    assert database.call("release_hold", t.admin, p_hold_id=theirs)["released"] == 2
    assert database.balance(t.account_id)["total"] == 103 - 6


def test_a_plain_member_extends_only_the_holds_they_made(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 20)
    mine = reserve(database, t.member, t.account_id, 6)["hold_id"]
    before = snapshot(database, t.account_id)
    for args in ({"p_ttl_seconds": 600}, {"p_add_amount": 1}):
        forbidden(database.call, "extend_hold", t.other, p_hold_id=mine, p_idempotency_key=new_key(), **args)
    assert snapshot(database, t.account_id) == before
    grown = database.call("extend_hold", t.member, p_hold_id=mine, p_idempotency_key=new_key(),
                          p_add_amount=1)
    assert (grown["amount"], grown["balance"]["held"]) == (7, 7)


# --- privacy -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("relation", "id_column"), [
    ("credit_transactions", "id"), ("credit_ledger", "transaction_id"), ("credit_usage", "transaction_id")])
def test_a_plain_member_reads_only_their_own_spends(database: Db, relation: str, id_column: str) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 10)
    mine = deduct(database, t.member, t.account_id, 1)["transaction_id"]
    theirs = deduct(database, t.other, t.account_id, 2)["transaction_id"]
    owners = deduct(database, t.owner, t.account_id, 3)["transaction_id"]
    query = f"select * from public.{relation} where account_id = %s"

    seen = select_as(database, t.member, query, t.account_id)
    assert {str(r[id_column]) for r in seen} == {mine}
    assert all(r["actor_id"] == uuid.UUID(uid(t.member)) for r in seen)
    everything = database.sql(f"select {id_column} from public.{relation} where account_id = %s",
                              t.account_id)
    for reader in (t.owner, t.admin):
        rows = select_as(database, reader, query, t.account_id)
        assert len(rows) == len(everything)
        assert {mine, theirs, owners} <= {str(r[id_column]) for r in rows}
    # A member's own personal account is still all theirs to read.
    personal = database.one("select id from public.credit_accounts where user_id = %s", uid(t.member))
    own = select_as(database, t.member, query, personal)
    assert len(own) == len(database.sql(f"select 1 from public.{relation} where account_id = %s", personal))


def test_the_spend_limits_view_shows_members_only_their_own(database: Db) -> None:
    t = team(database)
    stranger, _ = database.new_user()
    key = database.call("create_license_key", t.owner, p_account_id=t.account_id, p_name="ci")
    limit_member(database, t, t.member, 5)
    set_limit(database, t.owner, t.account_id, "default_member", 20, "week")
    set_limit(database, t.owner, t.account_id, "license_key", 100, "month", key["key_id"])
    deduct(database, t.member, t.account_id, 2)
    deduct(database, t.other, t.account_id, 3)
    reserve(database, t.other, t.account_id, 1)
    by_license(database, key["key"], 1)

    everything = {
        ("member", uid(t.member), 5, "day", 2, 0),
        # One row per member the default covers: the other member only (the member is named by a
        # limit of their own; owners and admins are not limited unless named).
        ("default_member", uid(t.other), 20, "week", 3, 1),
        ("license_key", key["key_id"], 100, "month", 1, 0),
    }
    for reader in (t.owner, t.admin):
        rows = view_rows(database, reader, t.account_id)
        assert figures(rows) == everything
        assert all(set(r) == VIEW_COLUMNS for r in rows)
        assert all(str(r["account_id"]) == t.account_id for r in rows)
        assert {r["period"]: r["resets_at"] for r in rows} == {
            p: resets_at(database, p) for p in ("day", "week", "month")}
    assert figures(view_rows(database, t.member, t.account_id)) == {("member", uid(t.member), 5, "day", 2, 0)}
    assert figures(view_rows(database, t.other, t.account_id)) == {
        ("default_member", uid(t.other), 20, "week", 3, 1)}
    assert view_rows(database, stranger, t.account_id) == []


def test_estimate_cost_reports_the_callers_own_remaining_limit(database: Db) -> None:
    t = team(database)
    forbidden(database.call, "estimate_cost", t.other, p_account_id=t.account_id, p_amount=1)
    limit_member(database, t, t.member, 10, "day")
    limit_member(database, t, t.member, 7, "month")
    set_limit(database, t.owner, t.account_id, "default_member", 4)
    deduct(database, t.member, t.account_id, 3)
    reserve(database, t.member, t.account_id, 2)
    before = snapshot(database, t.account_id)

    mine = database.call("estimate_cost", t.member, p_account_id=t.account_id, p_amount=1)
    assert set(mine) == ESTIMATE_KEYS
    assert (mine["cost"], mine["limit_remaining"]) == (1, 2)  # min(10 - 5, 7 - 5)
    theirs = database.call("estimate_cost", t.other, p_account_id=t.account_id, p_amount=1)
    assert theirs["limit_remaining"] == 4
    owners = database.call("estimate_cost", t.owner, p_account_id=t.account_id, p_amount=1)
    assert (owners["limit_remaining"], owners["affordable"]) == (None, True)  # owners are named by no limit
    assert snapshot(database, t.account_id) == before


def test_estimate_cost_covers_output_tokens_within_the_remaining_limit(database: Db) -> None:
    t = team(database)  # 103 credits available
    limit_member(database, t, t.member, 3)
    estimate = database.call("estimate_cost", t.member, p_account_id=t.account_id, p_operation="sl-priced",
                             p_output_tokens=10000)
    # 2 + 1.5 per 1,000 output tokens, rounded up: 17 credits; within the 3 left of the limit, 666 tokens.
    assert (estimate["cost"], estimate["available"], estimate["limit_remaining"]) == (17, 103, 3)
    assert (estimate["max_output_tokens"], estimate["affordable"]) == (666, False)


# --- the usage log -----------------------------------------------------------------------------

def test_the_usage_log_names_the_key_the_spender_and_the_price(database: Db) -> None:
    t = team(database)
    set_limit(database, t.owner, t.account_id, "default_member", 50)
    key = database.call("create_license_key", t.owner, p_account_id=t.account_id, p_name="ci")
    by_key = by_license(database, key["key"], None, p_operation="sl-priced", p_input_tokens=1000,
                        p_output_tokens=1000)
    assert by_key["charged"] == 4  # 2 + 0.5 + 1.5
    priced = deduct(database, t.member, t.account_id, None, p_operation="sl-repriced")
    plain = deduct(database, t.member, t.account_id, 2)
    database.sql("update public.credit_prices set credits = 9 where operation = 'sl-repriced'")

    rows = {str(r["transaction_id"]): r for r in select_as(
        database, t.owner, "select * from public.credit_usage where account_id = %s", t.account_id)}
    assert set(rows) == {by_key["transaction_id"], priced["transaction_id"], plain["transaction_id"]}

    keyed = rows[by_key["transaction_id"]]
    assert str(keyed["license_key_id"]) == key["key_id"]
    price = keyed["price"]
    assert (price["credits"], float(price["credits_per_1k_input_tokens"]),
            float(price["credits_per_1k_output_tokens"])) == (2, 0.5, 1.5)

    member_priced = rows[priced["transaction_id"]]
    assert (member_priced["license_key_id"], member_priced["actor_id"]) == (None, uuid.UUID(uid(t.member)))
    assert member_priced["price"]["credits"] == 3  # the price it was charged at, not today's
    assert member_priced["credits"] == 3

    member_plain = rows[plain["transaction_id"]]
    assert (member_plain["license_key_id"], member_plain["price"], member_plain["actor_id"]) == (
        None, None, uuid.UUID(uid(t.member)))


# --- concurrency ---------------------------------------------------------------------------------

THREADS = 16


@dataclass
class Outcome:
    op: str
    result: Any = None
    sqlstate: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.sqlstate is None


def attempt(conn: psycopg.Connection, op: str, caller: Caller, **args: Any) -> Outcome:
    try:
        return Outcome(op, db.call_function(conn, op, args, role=caller.role, claims=caller.claims))
    except psycopg.Error as exc:
        return Outcome(op, sqlstate=exc.sqlstate, message=exc.diag.message_primary)


def run_parallel(dsn: str, work: Callable[[int, psycopg.Connection], list[Outcome]]) -> list[Outcome]:
    """``work(i, conn)`` in THREADS threads, each on its own connection, released together."""
    barrier = threading.Barrier(THREADS)
    outcomes: list[list[Outcome]] = [[] for _ in range(THREADS)]
    crashes: list[BaseException] = []

    def target(i: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait(timeout=60)
                outcomes[i] = work(i, conn)
        except BaseException as exc:
            crashes.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    if crashes:
        raise crashes[0]
    return [o for per_thread in outcomes for o in per_thread]


@pytest.mark.parametrize("mix", ["deduct", "reserve", "both"])
def test_parallel_spends_of_one_member_never_pass_the_limit(database: Db, mix: str) -> None:
    t = team(database, purchased=200)  # funds for far more than the limit
    limit_member(database, t, t.member, 50)
    attempts = 100

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        done = []
        for n in range(i, attempts, THREADS):
            fn = {"deduct": "deduct_credits", "reserve": "reserve_credits"}.get(
                mix, "deduct_credits" if n % 2 else "reserve_credits")
            extra = {"p_ttl_seconds": 3600} if fn == "reserve_credits" else {}
            done.append(attempt(conn, fn, t.member, p_account_id=t.account_id,
                                p_idempotency_key=f"par-{n}", p_amount=1, **extra))
        return done

    outcomes = run_parallel(database.dsn, work)
    assert len(outcomes) == attempts
    refusals = Counter((o.sqlstate, o.message) for o in outcomes if not o.ok)
    assert refusals == {("PT402", "spend_limit_exceeded"): attempts - 50}, refusals
    succeeded = [o for o in outcomes if o.ok]
    assert len(succeeded) == 50
    spent = sum(1 for o in succeeded if o.op == "deduct_credits")
    held = sum(1 for o in succeeded if o.op == "reserve_credits")
    assert member_spends(database, t.account_id, t.member) == spent
    balance = database.balance(t.account_id)
    assert (balance["total"], balance["held"]) == (203 - spent, held)
    assert database.one("select count(*) from public.credit_holds where account_id = %s "
                        "and status = 'active'", t.account_id) == held
    assert service_view(database, t.account_id) == {("member", uid(t.member), 50, "day", spent, held)}
    if mix != "both":
        assert (spent, held) == ((50, 0) if mix == "deduct" else (0, 50))


# --- the deduct's fast path: limits cached per spender --------------------------------------
# A user spending from their own personal account (and a license key) takes the
# deduct's fast path; under limits it checks and counts the spend in one
# statement from the limits cached on the spender's usage row.

def usage_row(database: Db, account_id: str, spender: str) -> dict[str, Any]:
    row = database.one(
        "select to_jsonb(u) from private.spend_usage u where account_id = %s and spender = %s",
        account_id, spender)
    assert isinstance(row, dict)
    return row


def personal(database: Db, purchased: int = 100) -> tuple[Caller, str]:
    user, account_id = database.new_user()
    database.fund(account_id, purchased=purchased)
    return user, account_id


def own_limit(database: Db, user: Caller, account_id: str, limit: int | None, period: str = "day") -> Any:
    return set_limit(database, user, account_id, "member", limit, period, uid(user))


@pytest.mark.parametrize("period", ["day", "week", "month", "billing_period"])
def test_cached_limits_stop_a_personal_spender_at_the_limit(database: Db, period: str) -> None:
    user, account_id = personal(database)
    own_limit(database, user, account_id, 5, period)
    deduct(database, user, account_id, 2)
    cached = usage_row(database, account_id, uid(user))
    column = "period" if period == "billing_period" else period
    assert cached["limits_cached"] and cached[f"{column}_limit"] == 5
    assert deduct(database, user, account_id, 3)["charged"] == 3  # exactly at the limit, from the cache
    assert usage_row(database, account_id, uid(user))[f"{column}_spent"] == 5
    before = snapshot(database, account_id)
    assert_exceeded(exceeded(deduct, database, user, account_id, 1), limit=5, spent=5, held=0, required=1,
                    period=period, ends=resets_at(database, period, account_id))
    assert snapshot(database, account_id) == before
    assert usage_row(database, account_id, uid(user))[f"{column}_spent"] == 5
    assert service_view(database, account_id) == {("member", uid(user), 5, period, 5, 0)}
    assert database.balance(account_id)["total"] == 103 - 5


def test_changing_a_limit_replaces_the_cached_figures(database: Db) -> None:
    user, account_id = personal(database)
    own_limit(database, user, account_id, 10)
    deduct(database, user, account_id, 4)
    deduct(database, user, account_id, 1)
    assert usage_row(database, account_id, uid(user))["day_limit"] == 10
    own_limit(database, user, account_id, 6)  # lowered below what the cache allowed
    assert deduct(database, user, account_id, 1)["charged"] == 1
    detail = exceeded(deduct, database, user, account_id, 1)
    assert (detail["limit"], detail["spent"]) == (6, 6)
    own_limit(database, user, account_id, 8, "week")  # a second limit of the same spender
    own_limit(database, user, account_id, 20)
    assert deduct(database, user, account_id, 2)["charged"] == 2
    assert usage_row(database, account_id, uid(user))["limits_cached"]
    detail = exceeded(deduct, database, user, account_id, 1)
    assert (detail["limit"], detail["spent"], detail["period"]) == (8, 8, "week")
    own_limit(database, user, account_id, None, "week")
    own_limit(database, user, account_id, None)  # no limit left
    assert deduct(database, user, account_id, 30)["charged"] == 30
    assert database.balance(account_id)["total"] == 103 - 38


def test_cached_limits_count_held_credits(database: Db) -> None:
    user, account_id = personal(database)
    own_limit(database, user, account_id, 10)
    deduct(database, user, account_id, 1)
    hold = reserve(database, user, account_id, 6)
    assert usage_row(database, account_id, uid(user))["held"] == 6
    assert deduct(database, user, account_id, 3)["charged"] == 3
    assert_exceeded(exceeded(deduct, database, user, account_id, 1), limit=10, spent=4, held=6, required=1,
                    period="day", ends=resets_at(database, "day"))
    database.call("release_hold", user, p_hold_id=hold["hold_id"])
    assert deduct(database, user, account_id, 6)["charged"] == 6
    exceeded(deduct, database, user, account_id, 1)
    assert service_view(database, account_id) == {("member", uid(user), 10, "day", 10, 0)}


def test_a_replay_on_the_cached_path_counts_once(database: Db) -> None:
    user, account_id = personal(database)
    own_limit(database, user, account_id, 4)
    deduct(database, user, account_id, 1)
    idem = new_key()
    first = deduct(database, user, account_id, 2, idem)
    assert deduct(database, user, account_id, 2, idem) == {**first, "replayed": True}
    assert usage_row(database, account_id, uid(user))["day_spent"] == 3
    assert deduct(database, user, account_id, 1)["charged"] == 1
    exceeded(deduct, database, user, account_id, 1)


def test_cached_limits_of_a_license_key(database: Db) -> None:
    user, account_id = personal(database)
    created = database.call("create_license_key", user, p_account_id=account_id, p_name="server")
    set_limit(database, user, account_id, "license_key", 7, "month", created["key_id"])
    own_limit(database, user, account_id, 2)  # the user's own: not the key's
    for _ in range(7):
        by_license(database, created["key"], 1)
    key_row = usage_row(database, account_id, created["key_id"])
    assert key_row["limits_cached"] and (key_row["month_limit"], key_row["day_limit"]) == (7, None)
    detail = exceeded(by_license, database, created["key"], 1)
    assert (detail["limit"], detail["spent"], detail["period"]) == (7, 7, "month")
    assert deduct(database, user, account_id, 2)["charged"] == 2
    exceeded(deduct, database, user, account_id, 1)
    assert database.balance(account_id)["total"] == 103 - 9


def test_parallel_spends_on_the_cached_path_never_pass_the_limit(database: Db) -> None:
    user, account_id = personal(database, purchased=500)
    own_limit(database, user, account_id, 50)
    deduct(database, user, account_id, 1)  # the cache is in place before the race
    attempts = 100

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        return [attempt(conn, "deduct_credits", user, p_account_id=account_id,
                        p_idempotency_key=f"cached-{n}", p_amount=1) for n in range(i, attempts, THREADS)]

    outcomes = run_parallel(database.dsn, work)
    refusals = Counter((o.sqlstate, o.message) for o in outcomes if not o.ok)
    assert refusals == {("PT402", "spend_limit_exceeded"): attempts - 49}, refusals
    assert member_spends(database, account_id, user) == 50
    assert usage_row(database, account_id, uid(user))["day_spent"] == 50
    assert database.balance(account_id)["total"] == 503 - 50


# --- windows on a moving clock -----------------------------------------------------------------

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
        dsn = db.create_database(admin, "credits_spend_limits_clock")
        db.prepare_database(dsn)
        handle = Db(dsn)
        assert handle.one("select now()").date() == dt.date(2027, 3, 1)  # the server's clock, not ours
        yield server, handle
        assert handle.call("reconcile_credit_balances")["mismatches"] == []
        handle.close()
    finally:
        server.stop()


def test_clock_a_day_ends_at_midnight_utc(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 3, 2, 23, 59))  # a Tuesday, a minute before midnight
    t = team(database)
    limit_member(database, t, t.member, 5, "day")
    limit_member(database, t, t.other, 5, "week")
    limit_member(database, t, t.admin, 5, "month")
    for who in (t.member, t.other, t.admin):
        deduct(database, who, t.account_id, 5)
        exceeded(deduct, database, who, t.account_id, 1)

    server.set(at(2027, 3, 3, 0, 0, 30))  # Wednesday
    assert deduct(database, t.member, t.account_id, 5)["charged"] == 5  # a new day
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="day", ends=at(2027, 3, 4))
    assert_exceeded(exceeded(deduct, database, t.other, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="week", ends=at(2027, 3, 8))
    assert_exceeded(exceeded(deduct, database, t.admin, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="month", ends=at(2027, 4, 1))


def test_clock_a_week_starts_on_monday(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 3, 7, 23, 59))  # a Sunday
    t = team(database)
    limit_member(database, t, t.member, 5, "week")
    limit_member(database, t, t.other, 5, "month")
    deduct(database, t.member, t.account_id, 5)
    deduct(database, t.other, t.account_id, 5)
    assert ts(limit_member(database, t, t.member, 5, "week")["resets_at"]) == at(2027, 3, 8)

    server.set(at(2027, 3, 8, 0, 0, 30))  # Monday
    result = limit_member(database, t, t.member, 5, "week")
    assert (result["spent"], ts(result["resets_at"])) == (0, at(2027, 3, 15))
    assert deduct(database, t.member, t.account_id, 5)["charged"] == 5
    assert_exceeded(exceeded(deduct, database, t.other, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="month", ends=at(2027, 4, 1))


def test_clock_a_month_starts_on_the_first(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 3, 31, 23, 59))  # a Wednesday, the month's last day
    t = team(database)
    limit_member(database, t, t.member, 5, "month")
    limit_member(database, t, t.other, 5, "week")
    deduct(database, t.member, t.account_id, 5)
    deduct(database, t.other, t.account_id, 5)

    server.set(at(2027, 4, 1, 0, 0, 30))  # Thursday of the same ISO week
    assert deduct(database, t.member, t.account_id, 5)["charged"] == 5
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="month", ends=at(2027, 5, 1))
    assert_exceeded(exceeded(deduct, database, t.other, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="week", ends=at(2027, 4, 5))


def test_clock_a_hold_counts_in_every_window_and_its_capture_when_captured(
        clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 4, 6, 23, 50))  # Tuesday
    t = team(database)
    limit_member(database, t, t.member, 10, "day")
    hold = reserve(database, t.member, t.account_id, 8, p_ttl_seconds=3600)
    deduct(database, t.member, t.account_id, 2)

    server.set(at(2027, 4, 7, 0, 10))  # the next day: yesterday's spend is gone, the hold is not
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 0, 8)}
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 3), limit=10, spent=0, held=8,
                    required=3, period="day", ends=at(2027, 4, 8))
    deduct(database, t.member, t.account_id, 2)
    database.call("capture_hold", t.member, p_hold_id=hold["hold_id"])  # counts today, when captured
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 10, 0)}
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=10, spent=10, held=0,
                    required=1, period="day", ends=at(2027, 4, 8))


def test_clock_an_earlier_spend_counts_in_its_own_window(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 4, 13, 23, 59))  # Tuesday
    t = team(database)
    deduct(database, t.owner, t.account_id, 4)  # the owner, named by no limit yet

    server.set(at(2027, 4, 14, 0, 0, 30))  # Wednesday of the same week
    day = limit_member(database, t, t.owner, 10, "day")
    week = limit_member(database, t, t.owner, 6, "week")
    assert (day["spent"], week["spent"]) == (0, 4)
    assert_exceeded(exceeded(deduct, database, t.owner, t.account_id, 3), limit=6, spent=4, held=0,
                    required=3, period="week", ends=at(2027, 4, 19))
    assert deduct(database, t.owner, t.account_id, 2)["charged"] == 2


def test_clock_a_refund_gives_back_room_in_its_spends_window(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 4, 20, 23, 59))  # Tuesday
    t = team(database)
    limit_member(database, t, t.member, 5, "day")
    limit_member(database, t, t.member, 8, "week")
    spend = deduct(database, t.member, t.account_id, 5)

    server.set(at(2027, 4, 21, 0, 0, 30))  # Wednesday: the refund is of Tuesday's spend
    database.call("refund_credits", p_transaction_id=spend["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=3)
    assert service_view(database, t.account_id) == {
        ("member", uid(t.member), 5, "day", 0, 0), ("member", uid(t.member), 8, "week", 2, 0)}
    deduct(database, t.member, t.account_id, 5)
    assert_exceeded(exceeded(deduct, database, t.member, t.account_id, 1), limit=5, spent=5, held=0,
                    required=1, period="day", ends=at(2027, 4, 22))
    assert service_view(database, t.account_id) == {
        ("member", uid(t.member), 5, "day", 5, 0), ("member", uid(t.member), 8, "week", 7, 0)}


def test_clock_an_expired_hold_frees_the_limit(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 4, 27, 12))
    t = team(database)
    limit_member(database, t, t.member, 10, "day")
    hold = reserve(database, t.member, t.account_id, 8, p_ttl_seconds=60)
    exceeded(deduct, database, t.member, t.account_id, 3)

    server.set(at(2027, 4, 27, 12, 5))  # the hold's ttl ran out, nobody captured or released it
    read_before_any_write = service_view(database, t.account_id)
    estimated = database.call("estimate_cost", t.member, p_account_id=t.account_id, p_amount=10)
    assert database.balance(t.account_id)["held"] == 0
    assert deduct(database, t.member, t.account_id, 10)["charged"] == 10
    assert hold_row(database, hold["hold_id"])[0] == "expired"
    assert service_view(database, t.account_id) == {("member", uid(t.member), 10, "day", 10, 0)}
    # An expiry shows in reads from its instant, before any write settles it.
    assert (estimated["limit_remaining"], estimated["affordable"]) == (10, True)
    assert read_before_any_write == {("member", uid(t.member), 10, "day", 0, 0)}


def test_clock_the_cached_limits_windows_roll_over(clock: tuple[FakeClockServer, Db]) -> None:
    server, database = clock
    server.set(at(2027, 5, 4, 23, 59))  # a Tuesday, a minute before midnight
    user, account_id = personal(database)
    own_limit(database, user, account_id, 5, "day")
    own_limit(database, user, account_id, 8, "week")
    deduct(database, user, account_id, 3)
    deduct(database, user, account_id, 2)  # from the cache
    assert usage_row(database, account_id, uid(user))["limits_cached"]
    assert exceeded(deduct, database, user, account_id, 1)["period"] == "day"

    server.set(at(2027, 5, 5, 0, 0, 30))  # Wednesday: a new day, the same week
    assert deduct(database, user, account_id, 3)["charged"] == 3
    assert_exceeded(exceeded(deduct, database, user, account_id, 1), limit=8, spent=8, held=0, required=1,
                    period="week", ends=at(2027, 5, 10))
    row = usage_row(database, account_id, uid(user))
    assert (row["day_spent"], row["week_spent"]) == (3, 8)

    server.set(at(2027, 5, 10, 0, 1))  # Monday: a new week
    assert deduct(database, user, account_id, 5)["charged"] == 5
    assert_exceeded(exceeded(deduct, database, user, account_id, 1), limit=5, spent=5, held=0, required=1,
                    period="day", ends=at(2027, 5, 11))
