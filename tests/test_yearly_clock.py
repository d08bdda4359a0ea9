"""A yearly subscriber has an allowance every day of the paid year, on a moved clock.

The other reset tests make time pass by shifting one account's timestamps
back. Here the database's own clock moves: a throwaway PostgreSQL runs with
libfaketime (tests/clock.py) and the walk moves its wall clock one day at a
time through more than a year, running the reset each day exactly as the
scheduled job does (00:05 UTC, the current month's first day, batch after
batch until done).

Three yearly subscribers, each from a real invoice (``handle_stripe_event``
with the webhook's normalised facts), show the anniversary rule: one from
31 January with two seats (its months start 28 February, then 31 March,
30 April, ...), one from the 5th (the anniversary is not the 1st) and one
from 31 March late in the UTC day (its year crosses 29 February 2028). A free
account beside them is renewed by calendar month only. The subscribers spend
a little on some days, and on each day one of their months ended, after it
ended: the credits stay spendable until the next run renews them.

The walk (a module fixture, about 20 s) records every account's balance right
after each daily run and at 23:59:59, just before the next run; the tests
below read that record. No invoice renews a year, so each subscriber falls
back, 72 hours after its paid year (Stripe's time for a late renewal invoice),
to the calendar month with the free plan's allowance.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from devstack import db
from tests.clock import FakeClockServer
from tests.support import Db

UTC = dt.UTC
CREATED = dt.datetime(2027, 1, 30, 12, 0, tzinfo=UTC)  # the accounts are made then
LAST_DAY = dt.date(2028, 5, 3)  # a calendar month after the last fallback
JOB_TIME = dt.time(0, 5)  # the reset's schedule: daily at 00:05 UTC (serverless.yml)
NIGHT = dt.time(23, 59, 59)  # the last moment before the next run
RENEWAL_GRACE = dt.timedelta(hours=72)  # a yearly renewal invoice may come this late
PRICE = "price_clock_yearly"
MONTHLY = 10  # the yearly plan's monthly credits (per seat)
FREE = 3  # the free plan's monthly credits (the default)


def add_months(start: dt.datetime, months: int) -> dt.datetime:
    """``start`` + ``months`` in UTC, the day clipped to the month's end (31 Jan -> 28/29 Feb)."""
    month = start.month - 1 + months
    year, month = start.year + month // 12, month % 12 + 1
    last = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return start.replace(year=year, month=month, day=min(start.day, last))


def calendar_month(at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    first = dt.datetime(at.year, at.month, 1, tzinfo=UTC)
    return first, add_months(first, 1)


@dataclass
class Account:
    name: str
    account_id: str
    start: dt.datetime | None = None  # the paid year's start, for a yearly subscriber
    seats: int = 1
    spent: dict[dt.datetime, int] = field(default_factory=dict)  # by period start

    @property
    def end(self) -> dt.datetime:
        assert self.start is not None
        return add_months(self.start, 12)

    def anniversaries(self) -> list[dt.datetime]:
        assert self.start is not None
        return [add_months(self.start, n) for n in range(12)]

    def paying(self, at: dt.datetime) -> bool:
        return self.start is not None and self.start <= at < self.end

    def allowance(self, period_start: dt.datetime) -> int:
        """A paid month's allowance is the plan's credits x seats; any other month's, the free plan's."""
        paid = self.start is not None and period_start in self.anniversaries()
        return MONTHLY * self.seats if paid else FREE

    def paid_month(self, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        """The anniversary month of the paid year containing ``at`` (the last one after the year)."""
        assert self.start is not None
        n = max(k for k in range(12) if add_months(self.start, k) <= at)
        return add_months(self.start, n), min(add_months(self.start, n + 1), self.end)


@dataclass(frozen=True)
class Seen:
    """An account's balance at ``at``: after the daily run ("job") or before the next ("night")."""
    account: Account = field(repr=False)
    at: dt.datetime
    kind: str
    period_start: dt.datetime
    period_end: dt.datetime
    subscription: int
    held: int
    spent: int  # what the test had spent in that period by then


@dataclass
class Walk:
    accounts: list[Account]
    seen: list[Seen]
    spends: list[dict[str, Any]]
    mismatches: list[Any]

    def of(self, account: Account, kind: str) -> list[Seen]:
        return [s for s in self.seen if s.account is account and s.kind == kind]

    def periods(self, account: Account) -> list[dt.datetime]:
        """The period starts the account had, in order."""
        starts: list[dt.datetime] = []
        for s in self.seen:
            if s.account is account and (not starts or starts[-1] != s.period_start):
                starts.append(s.period_start)
        return starts

    def subscriber(self, name: str) -> Account:
        return next(a for a in self.accounts if a.name == name)


def _balance(database: Db, account: Account) -> dict[str, Any]:
    balance: dict[str, Any] = database.call("get_credit_balance", p_account_id=account.account_id)
    return balance


def _look(database: Db, account: Account, at: dt.datetime, kind: str) -> Seen:
    got = _balance(database, account)
    start = dt.datetime.fromisoformat(got["period_start"])
    return Seen(account, at, kind, start, dt.datetime.fromisoformat(got["period_end"]), got["subscription"],
                got["held"], account.spent.get(start, 0))


def _run_daily_reset(database: Db, at: dt.datetime) -> None:
    """The job: the current month's first day, batch after batch until done."""
    after = None
    while True:
        args: dict[str, Any] = {"p_period_start": at.date().replace(day=1).isoformat(), "p_batch_size": 2}
        if after:
            args["p_after"] = after
        result = database.call("run_monthly_reset", **args)
        if result["done"]:
            return
        after = result["next_after"]


def _pay_the_year(database: Db, account: Account) -> None:
    """The yearly invoice as the webhook records it (the normalised facts)."""
    assert account.start is not None
    start, end = int(account.start.timestamp()), int(account.end.timestamp())
    payload = {"invoice": f"in_{uuid.uuid4().hex}", "customer": f"cus_{uuid.uuid4().hex}",
               "subscription": f"sub_{uuid.uuid4().hex}", "account_id": account.account_id,
               "billing_reason": "subscription_create", "created": start,
               "lines": [{"price_id": PRICE, "quantity": account.seats, "period_start": start,
                          "period_end": end, "proration": False, "amount": 12000 * account.seats}]}
    outcome = database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                            p_type="invoice.paid", p_payload=payload)
    assert outcome["outcome"] == "applied", outcome


def _spend(database: Db, account: Account, at: dt.datetime) -> dict[str, Any]:
    period = dt.datetime.fromisoformat(_balance(database, account)["period_start"])
    spent = database.call("deduct_credits", p_account_id=account.account_id,
                          p_idempotency_key=f"clock-{uuid.uuid4()}", p_amount=1)
    account.spent[period] = account.spent.get(period, 0) + spent["charged"]
    return {"account": account.name, "at": at, "charged": spent["charged"],
            "from_subscription": spent["from_subscription"]}


@pytest.fixture(scope="module")
def clock() -> Iterator[tuple[FakeClockServer, Db]]:
    reason = FakeClockServer.unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = FakeClockServer()
    try:
        admin = server.start(CREATED)
        dsn = db.create_database(admin, "credits_clock")
        db.prepare_database(dsn)
        handle = Db(dsn)
        yield server, handle
        handle.close()
    finally:
        server.stop()


@pytest.fixture(autouse=True, scope="module")
def _ledger_explains_every_balance() -> None:
    """This module's books are on its own server: the walk reconciles them (see the last test)."""


@pytest.fixture(scope="module")
def walk(clock: tuple[FakeClockServer, Db]) -> Walk:
    """Walk the database's clock day by day from the first paid year's start to LAST_DAY."""
    server, database = clock
    assert database.one("select now()").date() == CREATED.date()  # the server's clock, not the machine's
    assert database.one("select monthly_credits from public.credit_plans where id = 'free'") == FREE
    database.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) values "
                 "('clock_yearly', %s, %s)", MONTHLY, PRICE)
    accounts = [Account(name, database.new_user()[1], start, seats) for name, start, seats in (
        ("from 31 January", dt.datetime(2027, 1, 31, 10, 0, tzinfo=UTC), 2),
        ("from the 5th", dt.datetime(2027, 2, 5, 15, 30, tzinfo=UTC), 1),
        ("from 31 March, late", dt.datetime(2027, 3, 31, 23, 30, tzinfo=UTC), 1),
        ("free", None, 1),
    )]
    paid = [a for a in accounts if a.start is not None]
    record = Walk(accounts, [_look(database, a, CREATED, "night") for a in accounts], [], [])

    day = dt.date(2027, 1, 31)
    while day <= LAST_DAY:
        # The day's events in time order (the clock only moves forward).
        events: list[tuple[dt.time, str, Account | None]] = [(JOB_TIME, "job", None), (NIGHT, "night", None)]
        events += [((a.start + dt.timedelta(minutes=1)).time(), "invoice", a)
                   for a in paid if a.start is not None and a.start.date() == day]
        if day.toordinal() % 7 == 0:
            events.append((dt.time(12, 0), "spend", None))
        for when, what, subscriber in sorted(events, key=lambda e: e[0]):
            at = dt.datetime.combine(day, when, tzinfo=UTC)
            server.set(at)
            if what == "job":
                _run_daily_reset(database, at)
                now = database.one("select now()")
                assert at <= now < at + dt.timedelta(minutes=1), (at, now)
                record.seen += [_look(database, a, at, "job") for a in accounts]
            elif what == "invoice":
                assert subscriber is not None
                _pay_the_year(database, subscriber)  # a minute after its period starts
                record.seen.append(_look(database, subscriber, at, "invoice"))
            elif what == "spend":
                record.spends += [_spend(database, a, at) for a in paid if a.paying(at)]
            else:
                for account in paid:  # a month that ended today: spend from it before the next run
                    ended = dt.datetime.fromisoformat(_balance(database, account)["period_end"]) <= at
                    if account.paying(at) and ended:
                        record.spends.append(_spend(database, account, at))
                record.seen += [_look(database, a, at, "night") for a in accounts]
        day += dt.timedelta(days=1)
    record.mismatches = database.call("reconcile_credit_balances")["mismatches"]
    return record


def _fallback(account: Account) -> dt.datetime:
    """The first daily run after the paid year plus the grace: no renewal invoice came."""
    due = account.end + RENEWAL_GRACE
    first = dt.datetime.combine(due.date(), JOB_TIME, tzinfo=UTC)
    return first if first >= due else first + dt.timedelta(days=1)


# --- the paid year ---------------------------------------------------------------------

def test_every_morning_of_the_paid_year_the_month_containing_now_with_its_allowance(walk: Walk) -> None:
    for account in walk.accounts:
        if account.start is None:
            continue
        (invoiced,) = walk.of(account, "invoice")  # the first month comes with the invoice
        assert (invoiced.period_start, invoiced.period_end) == (account.start, add_months(account.start, 1))
        assert invoiced.subscription == MONTHLY * account.seats, (account.name, invoiced)
        mornings = [s for s in walk.of(account, "job") if account.paying(s.at)]
        assert len(mornings) in (365, 366), account.name  # every day of the year, one run each
        for s in mornings:
            where = (account.name, s)
            assert s.period_start <= s.at < s.period_end, where  # an allowance today
            assert (s.period_start, s.period_end) == account.paid_month(s.at), where  # from its anniversary
            assert s.subscription == MONTHLY * account.seats - s.spent, where  # the full month's, less spends
            assert s.held == 0, where


def test_every_night_the_allowance_is_still_there(walk: Walk) -> None:
    """Between a month's end (during the day) and the next run, its credits stay: no gap."""
    for account in walk.accounts:
        if account.start is None:
            continue
        nights = [s for s in walk.of(account, "night") if account.paying(s.at)]
        assert len(nights) in (365, 366), account.name
        for s in nights:
            where = (account.name, s)
            assert s.period_end > s.at - dt.timedelta(days=1), where  # ended today at the latest
            assert s.subscription == account.allowance(s.period_start) - s.spent > 0, where


def test_each_month_starts_on_its_anniversary_the_day_clipped(walk: Walk) -> None:
    def paid_periods(name: str) -> list[str]:
        account = walk.subscriber(name)
        periods = walk.periods(account)
        assert account.start is not None
        i = periods.index(account.start)
        assert periods[i:i + 12] == account.anniversaries(), name  # S + n months, n = 0..11
        after = periods[i + 12]  # then the free plan's calendar month
        assert (after.day, after.hour, after.minute) == (1, 0, 0), (name, periods)
        return [p.isoformat() for p in periods[i:i + 12]]

    assert paid_periods("from 31 January") == [f"{day}T10:00:00+00:00" for day in (
        "2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30", "2027-05-31", "2027-06-30",
        "2027-07-31", "2027-08-31", "2027-09-30", "2027-10-31", "2027-11-30", "2027-12-31")]
    assert {p[8:] for p in paid_periods("from the 5th")} == {"05T15:30:00+00:00"}
    assert paid_periods("from 31 March, late")[:2] + paid_periods("from 31 March, late")[-3:] == [
        "2027-03-31T23:30:00+00:00", "2027-04-30T23:30:00+00:00",
        "2027-12-31T23:30:00+00:00", "2028-01-31T23:30:00+00:00", "2028-02-29T23:30:00+00:00"]


def test_before_its_invoice_a_subscriber_has_the_free_calendar_month(walk: Walk) -> None:
    for account in walk.accounts:
        if account.start is None:
            continue
        for s in walk.of(account, "job"):
            if s.at < account.start:
                assert (s.period_start, s.period_end) == calendar_month(s.at), (account.name, s)
                assert s.subscription == FREE, (account.name, s)


# --- after the paid year -----------------------------------------------------------------

def test_after_the_year_and_the_grace_the_free_plans_calendar_month(walk: Walk) -> None:
    for account in walk.accounts:
        if account.start is None:
            continue
        # Within the 72 hours a late renewal invoice may take, the last month stays as it was.
        for s in walk.of(account, "job"):
            if account.end <= s.at < _fallback(account):
                assert (s.period_start, s.period_end) == account.paid_month(account.end), (account.name, s)
        # Then, with no invoice, the calendar month with the free plan's allowance, never the paid plan's.
        first = next(s for s in walk.of(account, "job") if s.at == _fallback(account))
        got = (first.period_start, first.period_end, first.subscription)
        assert got == (*calendar_month(first.at), FREE), (account.name, first)
        later = [s for s in walk.seen if s.account is account and s.at >= _fallback(account)]
        assert all(s.period_start not in account.anniversaries() for s in later), account.name
        assert all(s.subscription == FREE for s in later), account.name


def test_after_the_fallback_each_calendar_month_is_renewed_on_the_first(walk: Walk) -> None:
    for account in walk.accounts:
        if account.start is None:
            continue
        for s in walk.of(account, "job"):
            if s.at >= _fallback(account):
                assert (s.period_start, s.period_end) == calendar_month(s.at), (account.name, s)


def test_a_free_account_is_renewed_on_the_first_of_each_month_only(walk: Walk) -> None:
    free = walk.subscriber("free")
    for s in walk.of(free, "job"):
        assert (s.period_start, s.period_end, s.subscription) == (*calendar_month(s.at), FREE), s
    assert len(walk.periods(free)) == 17  # January 2027 to May 2028


# --- the books -----------------------------------------------------------------------------

def test_spends_come_from_the_allowance_and_the_books_add_up(walk: Walk) -> None:
    assert len(walk.spends) > 150
    assert all((s["charged"], s["from_subscription"]) == (1, 1) for s in walk.spends), walk.spends
    after_end = [s for s in walk.spends if s["at"].time() == NIGHT]
    assert len(after_end) == 3 * 11  # each paid month but the last, after it ended, before its renewal
    assert walk.mismatches == []
