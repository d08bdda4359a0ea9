"""Concurrency of the SQL core with real parallel connections.

Every worker is a thread with its own PostgreSQL connection, released together
by a barrier, calling the contract functions through `devstack.db.call_function`
exactly as the REST layer does. The module works in a database of its own,
because the monthly reset renews every account of the database it runs in.

What must hold whatever the interleaving: no overdraft, no deadlock (40P01)
or serialization failure, one charge per idempotency key and per hold, and a
ledger that explains every balance at the end.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.support import Caller, Db, own_database

THREADS = 16
# The only refusals a correct engine gives under contention in these tests.
EXPECTED_REFUSALS = {("PT402", "insufficient_credits"), ("PT409", "hold_not_active")}


@dataclass
class Outcome:
    op: str
    result: Any = None
    sqlstate: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.sqlstate is None


def attempt(conn: psycopg.Connection, op: str, fn: str, caller: Caller, **args: Any) -> Outcome:
    try:
        return Outcome(op, db.call_function(conn, fn, args, role=caller.role, claims=caller.claims))
    except psycopg.Error as exc:
        return Outcome(op, sqlstate=exc.sqlstate, message=exc.diag.message_primary)


Work = Callable[[int, psycopg.Connection], list[Outcome]]


def run_parallel(dsn: str, work: Work, threads: int = THREADS) -> list[Outcome]:
    """Run ``work(i, conn)`` in ``threads`` threads, each on its own connection,
    all starting at once; return every outcome (re-raising a worker's crash)."""
    barrier = threading.Barrier(threads)
    outcomes: list[list[Outcome]] = [[] for _ in range(threads)]
    crashes: list[BaseException] = []

    def target(i: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait(timeout=60)
                outcomes[i] = work(i, conn)
        except BaseException as exc:
            crashes.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    if crashes:
        raise crashes[0]
    return [o for per_thread in outcomes for o in per_thread]


def assert_no_unexpected_errors(outcomes: list[Outcome]) -> None:
    unexpected = Counter((o.op, o.sqlstate, o.message) for o in outcomes
                         if not o.ok and (o.sqlstate, o.message) not in EXPECTED_REFUSALS)
    assert not unexpected, unexpected  # a deadlock would show here as 40P01


@pytest.fixture(scope="module")
def conc(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_concurrency") as handle:
        yield handle


def pools(database: Db, account: str) -> tuple[int, int, int]:
    """(subscription, purchased, held) from the wallet."""
    return database.one("select subscription, purchased, "
                        "held_promotional + held_subscription + held_purchased "
                        "from public.credit_wallets where account_id = %s", account)


def ledger_sums(database: Db, account: str) -> tuple[int, int]:
    return database.one(
        "select coalesce(sum(amount) filter (where pool = 'subscription'), 0)::bigint, "
        "coalesce(sum(amount) filter (where pool = 'purchased'), 0)::bigint "
        "from public.credit_ledger where account_id = %s", account)


def assert_books_balance(database: Db) -> None:
    result = database.call("reconcile_credit_balances")
    assert result["mismatches"] == [], result


def test_parallel_deducts_never_overdraw(conc: Db) -> None:
    user, account = conc.new_user()            # 3 subscription credits at signup
    conc.fund(account, purchased=47)           # 50 in all
    cost, per_thread = 3, 3                    # 48 attempts for floor(50 / 3) = 16 successes

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        caller = user if i % 2 else Caller.service()
        return [attempt(conn, "deduct", "deduct_credits", caller, p_account_id=account,
                        p_idempotency_key=f"t{i}-{n}", p_amount=cost) for n in range(per_thread)]

    outcomes = run_parallel(conc.dsn, work)
    assert_no_unexpected_errors(outcomes)
    succeeded = [o for o in outcomes if o.ok]
    assert len(succeeded) == 50 // cost
    assert {o.message for o in outcomes if not o.ok} == {"insufficient_credits"}
    assert all(o.result["charged"] == cost and o.result["balance"]["available"] >= 0 for o in succeeded)
    assert pools(conc, account) == (0, 50 % cost, 0)
    assert ledger_sums(conc, account) == (0, 50 % cost)
    spent = conc.one("select -sum(amount) from public.credit_ledger where account_id = %s and type = 'spend'",
                     account)
    assert spent == cost * (50 // cost)
    assert_books_balance(conc)


@pytest.mark.parametrize("fn", ["deduct_credits", "reserve_credits", "add_purchased_credits"])
def test_one_idempotency_key_from_many_connections_applies_once(conc: Db, fn: str) -> None:
    _, account = conc.new_user()
    conc.fund(account, purchased=100)
    before = pools(conc, account)
    ledger_before = conc.one("select count(*) from public.credit_ledger where account_id = %s", account)
    key = f"same-{uuid.uuid4()}"
    args: dict[str, Any] = {"p_account_id": account, "p_idempotency_key": key, "p_amount": 7}

    outcomes = run_parallel(conc.dsn, lambda i, conn: [attempt(conn, fn, fn, Caller.service(), **args)])
    assert all(o.ok for o in outcomes), Counter((o.sqlstate, o.message) for o in outcomes)
    id_key = "hold_id" if fn == "reserve_credits" else "transaction_id"
    assert len({o.result[id_key] for o in outcomes}) == 1
    assert sorted(o.result["replayed"] for o in outcomes) == [False] + [True] * (THREADS - 1)

    sub, purchased, held = pools(conc, account)
    if fn == "deduct_credits":
        assert sub + purchased == before[0] + before[1] - 7 and held == 0
    elif fn == "reserve_credits":
        assert (sub, purchased, held) == (before[0], before[1], 7)
        assert conc.one("select count(*) from public.credit_holds where account_id = %s", account) == 1
    else:
        assert (sub, purchased, held) == (before[0], before[1] + 7, 0)
    assert conc.one("select count(*) from public.credit_transactions where account_id = %s "
                    "and idempotency_key = %s", account, key) == 1
    ledger_after = conc.one("select count(*) from public.credit_ledger where account_id = %s", account)
    new_rows = ledger_after - ledger_before
    assert new_rows == {"deduct_credits": 2, "reserve_credits": 0, "add_purchased_credits": 1}[fn]
    assert ledger_sums(conc, account) == (sub, purchased)
    assert_books_balance(conc)


def test_parallel_captures_of_one_hold_charge_once(conc: Db) -> None:
    user, account = conc.new_user()
    conc.fund(account, purchased=20)
    hold = conc.call("reserve_credits", p_account_id=account, p_idempotency_key="hold", p_amount=8)["hold_id"]

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        return [attempt(conn, "capture", "capture_hold", user if i % 2 else Caller.service(), p_hold_id=hold)]

    outcomes = run_parallel(conc.dsn, work)
    assert all(o.ok for o in outcomes), Counter((o.sqlstate, o.message) for o in outcomes)
    assert len({o.result["transaction_id"] for o in outcomes}) == 1
    assert sorted(o.result["replayed"] for o in outcomes) == [False] + [True] * (THREADS - 1)
    assert all(o.result["charged"] == 8 for o in outcomes)
    assert pools(conc, account) == (0, 15, 0)      # 3 subscription + 5 purchased taken
    assert conc.one("select -sum(amount) from public.credit_ledger where account_id = %s and type = 'spend'",
                    account) == 8
    assert conc.one("select status from public.credit_holds where id = %s", hold) == "captured"
    assert_books_balance(conc)


def test_capture_racing_release_settles_the_hold_one_way(conc: Db) -> None:
    _, account = conc.new_user()
    conc.fund(account, purchased=20)
    hold = conc.call("reserve_credits", p_account_id=account, p_idempotency_key="race", p_amount=6)["hold_id"]

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        fn = "capture_hold" if i % 2 else "release_hold"
        return [attempt(conn, fn, fn, Caller.service(), p_hold_id=hold)]

    outcomes = run_parallel(conc.dsn, work)
    assert_no_unexpected_errors(outcomes)
    status = conc.one("select status from public.credit_holds where id = %s", hold)
    winner = {"captured": "capture_hold", "released": "release_hold"}[status]
    assert all(o.ok for o in outcomes if o.op == winner)
    assert sum(1 for o in outcomes if o.op == winner and not o.result["replayed"]) == 1
    losers = [o for o in outcomes if o.op != winner]
    assert losers and all(o.message == "hold_not_active" for o in losers)
    expected = (0, 17, 0) if status == "captured" else (3, 20, 0)
    assert pools(conc, account) == expected
    assert_books_balance(conc)


# --- everything at once ------------------------------------------------------

def _month(ahead: int) -> str:
    today = dt.datetime.now(dt.UTC).date()
    month = today.month - 1 + ahead
    return dt.date(today.year + month // 12, month % 12 + 1, 1).isoformat()


# This month and the next (the reset refuses anything further ahead).
PERIODS = [_month(0), _month(1)]


@dataclass
class Mix:
    accounts: list[str]
    owners: dict[str, Caller]
    holds: list[tuple[str, str]]      # (account, hold id), shared by the workers
    lock: threading.Lock
    spends: list[str] = field(default_factory=list)     # transaction ids of successful deducts
    payments: list[str] = field(default_factory=list)   # Stripe references of purchases
    customers: dict[str, str] = field(default_factory=dict)  # account -> its Stripe customer
    paid: list[str] = field(default_factory=list)       # payment intents of Stripe pack checkouts


YEARLY_PRICE = "price_mix_yearly"


def stripe_op(rng: random.Random, mix: Mix, conn: psycopg.Connection, op: str, account: str) -> Outcome:
    """A Stripe event as the webhook records it: a pack, a dispute (won or lost), a yearly invoice."""
    service = Caller.service()
    customer = mix.customers[account]

    def event(event_type: str, payload: dict[str, Any]) -> Outcome:
        out = attempt(conn, op, "handle_stripe_event", service, p_event_id=f"evt_{uuid.uuid4().hex}",
                      p_type=event_type, p_payload={"customer": customer, **payload})
        if out.ok and out.result["outcome"] == "failed":
            return Outcome(op, sqlstate="stripe-failed", message=str(out.result.get("error")))
        return out

    if op == "stripe_pack":
        payment = f"pi_{uuid.uuid4().hex}"
        out = event("checkout.session.completed", {
            "session": f"cs_{uuid.uuid4().hex}", "mode": "payment", "payment_status": "paid",
            "credits": rng.randint(1, 10), "payment_intent": payment, "account_id": account})
        if out.ok:
            with mix.lock:
                mix.paid.append(payment)
        return out
    if op == "dispute":
        with mix.lock:
            payment = rng.choice(mix.paid) if mix.paid else None
        if payment is None:
            return Outcome("noop")
        owner = conn.execute("select customer_id from public.stripe_events where payment_ref = %s limit 1",
                             (payment,)).fetchone()
        if owner is not None:
            customer = owner[0]
        dispute = f"dp_{uuid.uuid4().hex}"
        out = event("charge.dispute.created", {
            "dispute": dispute, "payment_intent": payment, "charge": f"ch_{uuid.uuid4().hex}",
            "status": "needs_response"})
        if not out.ok:
            return out
        return event("charge.dispute.closed", {"dispute": dispute, "payment_intent": payment,
                                               "status": rng.choice(["won", "lost"])})
    # A yearly invoice (some arrive late, their first months over), then a month passes for the
    # account (its period and paid year move back, under the wallet's lock, wallet first): the
    # reset in the mix renews the next anniversary month.
    start = int(time.time()) - rng.choice([0, 40, 70]) * 86400
    out = event("invoice.paid", {
        "invoice": f"in_{uuid.uuid4().hex}", "subscription": f"sub_{account}", "account_id": account,
        "billing_reason": "subscription_create", "created": int(time.time()),
        "payment_intent": f"pi_{uuid.uuid4().hex}",
        "lines": [{"price_id": YEARLY_PRICE, "quantity": rng.randint(1, 3), "period_start": start,
                   "period_end": start + 365 * 86400, "proration": False, "amount": 10000}]})
    if out.ok:
        with conn.transaction():
            conn.execute("update public.credit_wallets set period_start = period_start - interval '1 month', "
                         "period_end = period_end - interval '1 month' where account_id = %s", (account,))
            conn.execute("update public.credit_accounts set "
                         "stripe_period_start = stripe_period_start - interval '1 month', "
                         "stripe_paid_through = stripe_paid_through - interval '1 month', "
                         "stripe_paid_until = stripe_paid_until - interval '1 month' "
                         "where id = %s and stripe_paid_through is not null", (account,))
    return out


def mixed_op(rng: random.Random, mix: Mix, conn: psycopg.Connection, tag: str) -> Outcome:
    account = rng.choice(mix.accounts)
    service = Caller.service()
    spender = rng.choice([service, mix.owners[account]])
    key = f"{tag}-{uuid.uuid4()}"
    op = rng.choice(["deduct", "deduct", "reserve", "reserve", "capture", "release", "purchase",
                     "subscription", "expire", "adjust", "reset", "promo", "promo", "refund", "clawback",
                     "stripe_pack", "dispute", "yearly"])
    if op in ("stripe_pack", "dispute", "yearly"):
        return stripe_op(rng, mix, conn, op, account)
    if op == "deduct":
        out = attempt(conn, op, "deduct_credits", spender, p_account_id=account, p_idempotency_key=key,
                      p_amount=rng.randint(1, 6))
        if out.ok:
            with mix.lock:
                mix.spends.append(out.result["transaction_id"])
        return out
    if op == "promo":
        # Some expire within the run (lazily, while spends and holds use them).
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=rng.choice([1, 2, 3600]))
        return attempt(conn, op, "grant_promotional_credits", service, p_account_id=account,
                       p_amount=rng.randint(1, 8), p_expires_at=expires.isoformat(), p_idempotency_key=key)
    if op in ("refund", "clawback"):
        with mix.lock:
            pick = rng.choice(mix.spends if op == "refund" else mix.payments) if (
                mix.spends if op == "refund" else mix.payments) else None
        if pick is None:
            return Outcome("noop")
        if op == "refund":
            return attempt(conn, op, "refund_credits", service, p_transaction_id=pick, p_idempotency_key=key,
                           p_amount=1)
        return attempt(conn, op, "clawback_credits", service, p_stripe_ref=pick, p_idempotency_key=key,
                       p_amount=rng.randint(1, 10))
    if op == "reserve":
        out = attempt(conn, op, "reserve_credits", spender, p_account_id=account, p_idempotency_key=key,
                      p_amount=rng.randint(1, 6), p_ttl_seconds=rng.choice([1, 1, 600]))
        if out.ok:
            with mix.lock:
                mix.holds.append((account, out.result["hold_id"]))
        return out
    if op in ("capture", "release"):
        with mix.lock:
            if not mix.holds:
                return Outcome("noop")
            hold_account, hold = rng.choice(mix.holds)
        if op == "release":
            return attempt(conn, op, "release_hold", mix.owners[hold_account], p_hold_id=hold)
        amount = rng.choice([None, 1])
        args = {} if amount is None else {"p_amount": amount}
        return attempt(conn, op, "capture_hold", mix.owners[hold_account], p_hold_id=hold, **args)
    if op == "purchase":
        out = attempt(conn, op, "add_purchased_credits", service, p_account_id=account,
                      p_amount=rng.randint(1, 10), p_idempotency_key=key, p_stripe_ref=f"pi_{key}")
        if out.ok:
            with mix.lock:
                mix.payments.append(f"pi_{key}")
        return out
    if op == "subscription":
        start = rng.choice(PERIODS)
        end = _month(PERIODS.index(start) + 1)
        return attempt(conn, op, "add_subscription_credits", service, p_account_id=account,
                       p_amount=rng.randint(0, 8), p_period_start=start, p_period_end=end,
                       p_idempotency_key=key)
    if op == "expire":
        return attempt(conn, op, "expire_subscription_credits", service, p_account_id=account,
                       p_idempotency_key=key)
    if op == "adjust":
        return attempt(conn, op, "admin_adjust_credits", service, p_account_id=account,
                       p_pool=rng.choice(["subscription", "purchased"]),
                       p_amount=rng.choice([-4, -2, -1, 2, 5]), p_reason="concurrency", p_idempotency_key=key)
    # The reset, in small batches as the scheduled job runs it.
    period, after = rng.choice(PERIODS), None
    while True:
        args: dict[str, Any] = {"p_period_start": period, "p_batch_size": 2}
        if after is not None:
            args["p_after"] = after
        out = attempt(conn, op, "run_monthly_reset", service, **args)
        if not out.ok or out.result["done"]:
            return out
        after = out.result["next_after"]


def test_everything_at_once_keeps_the_books(conc: Db) -> None:
    owners: dict[str, Caller] = {}
    for _ in range(3):
        user, account = conc.new_user()
        conc.fund(account, purchased=60)
        owners[account] = user
    tenant_owner, _ = conc.new_user()
    _, tenant_account = conc.new_tenant({tenant_owner.user_id: "owner"})  # type: ignore[dict-item]
    conc.fund(tenant_account, purchased=60)
    owners[tenant_account] = tenant_owner
    mix = Mix(list(owners), owners, [], threading.Lock())
    conc.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) "
             "values ('mix_yearly', 7, %s) on conflict do nothing", YEARLY_PRICE)
    for account in owners:
        mix.customers[account] = f"cus_{uuid.uuid4().hex}"
        conc.sql("update public.credit_accounts set stripe_customer_id = %s where id = %s",
                 mix.customers[account], account)
    stop = threading.Event()
    negatives: list[Any] = []

    def watch() -> None:
        # Readers must never see a negative pool or more held than owned.
        with psycopg.connect(conc.dsn, autocommit=True) as conn:
            while not stop.is_set():
                for row in conn.execute(
                        "select account_id, subscription, purchased, held, total, promotional "
                        "from public.credit_balances "
                        "where account_id = any(%s::uuid[])", (mix.accounts,)).fetchall():
                    if min(row[1:4]) < 0 or row[5] < 0 or row[3] > row[4]:
                        negatives.append(row)
                time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcomes: list[Outcome] = []
    try:
        for round_no in range(3):
            def work(i: int, conn: psycopg.Connection, r: int = round_no) -> list[Outcome]:
                rng = random.Random(1000 * r + i)
                return [mixed_op(rng, mix, conn, f"r{r}t{i}n{n}") for n in range(14)]
            outcomes += run_parallel(conc.dsn, work)
            time.sleep(1.1)  # let 1-second holds and promotional grants lapse before the next round
    finally:
        stop.set()
        watcher.join(timeout=10)

    # A refund of a spend already refunded in full is refused; that is the rule, not a race.
    assert_no_unexpected_errors([o for o in outcomes
                                 if not (o.op == "refund" and o.message == "invalid_argument")])
    done = Counter(o.op for o in outcomes if o.ok)
    # The mix really mixed: every kind of call succeeded at least once.
    assert {"deduct", "reserve", "capture", "release", "purchase", "subscription", "expire", "adjust",
            "reset", "promo", "refund", "clawback", "stripe_pack", "dispute", "yearly"} <= set(done), done
    # Stripe events really applied: packs granted, disputes took back and gave back, yearly months renewed.
    assert conc.one("select count(*) from public.credit_transactions where account_id = any(%s::uuid[]) "
                    "and kind = 'reinstate'", mix.accounts) > 0
    assert conc.one("select count(*) from public.credit_transactions where account_id = any(%s::uuid[]) "
                    "and metadata ->> 'reason' = 'yearly_month'", mix.accounts) > 0
    assert negatives == []
    # Promotional grants really lapsed during the run and their expiries were written.
    assert conc.one("select count(*) from public.credit_ledger where account_id = any(%s::uuid[]) "
                    "and pool = 'promotional' and type = 'expire'", mix.accounts) > 0
    for o in outcomes:
        balance = o.result.get("balance") if o.ok and isinstance(o.result, dict) else None
        if balance:
            assert min(balance["subscription"], balance["purchased"], balance["held"]) >= 0, o
            assert balance["available"] == balance["total"] - balance["held"], o
    for account in mix.accounts:
        sub, purchased, held = pools(conc, account)
        assert ledger_sums(conc, account) == (sub, purchased)
        assert held <= conc.balance(account)["total"]
        active = conc.one("select coalesce(sum(amount), 0) from public.credit_holds "
                          "where account_id = %s and status = 'active'", account)
        assert held == active
    assert_books_balance(conc)
    # Every hold still active (and not about to lapse) can be captured in full:
    # nothing took its credits.
    live = [h for _, h in mix.holds
            if conc.one("select status = 'active' and expires_at > now() + interval '1 minute' "
                        "from public.credit_holds where id = %s", h)]
    assert live
    for hold in live:
        captured = conc.call("capture_hold", p_hold_id=hold)
        assert captured["charged"] > 0
    assert_books_balance(conc)


def test_parallel_refunds_of_one_spend_never_exceed_it(conc: Db) -> None:
    _, account = conc.new_user()
    conc.fund(account, purchased=20)
    spend = conc.call("deduct_credits", p_account_id=account, p_idempotency_key="spend", p_amount=10)
    before = pools(conc, account)

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        return [attempt(conn, "refund", "refund_credits", Caller.service(), p_amount=1,
                        p_transaction_id=spend["transaction_id"], p_idempotency_key=f"refund-{i}")]

    outcomes = run_parallel(conc.dsn, work)
    refused = [o for o in outcomes if not o.ok]
    assert sum(o.ok for o in outcomes) == 10
    assert {(o.sqlstate, o.message) for o in refused} == {("22023", "invalid_argument")}
    assert pools(conc, account) == (before[0], before[1] + 10, 0)
    refunded = "select refunded from public.credit_usage where transaction_id = %s"
    assert conc.one(refunded, spend["transaction_id"]) == 10
    assert_books_balance(conc)


def test_parallel_clawbacks_take_a_payment_back_once(conc: Db) -> None:
    _, account = conc.new_user()
    ref = f"pi_conc_{uuid.uuid4().hex}"
    conc.call("add_purchased_credits", p_account_id=account, p_amount=30, p_idempotency_key="buy",
              p_stripe_ref=ref)
    before = pools(conc, account)

    # Stripe reports refunds cumulatively: many deliveries of "12 so far" take 12 in all.
    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        return [attempt(conn, "clawback", "clawback_credits", Caller.service(), p_stripe_ref=ref,
                        p_idempotency_key=f"claw-{i}", p_amount=12)]

    outcomes = run_parallel(conc.dsn, work)
    assert all(o.ok for o in outcomes), Counter((o.sqlstate, o.message) for o in outcomes)
    assert sum(o.result["clawed_back"] for o in outcomes) == 12
    assert all(o.result["shortfall"] == 0 for o in outcomes)
    assert pools(conc, account) == (before[0], before[1] - 12, 0)
    assert_books_balance(conc)


def test_parallel_resets_of_one_period_renew_each_account_once(conc: Db) -> None:
    # Every account of this database is on an earlier period, so each needs
    # exactly one renewal for this month, whoever of the workers gets to it.
    period = _month(1)
    before_period = "w.period_start < %s::timestamp at time zone 'UTC'"
    accounts = "public.credit_accounts a join public.credit_wallets w on w.account_id = a.id"
    # Accounts Stripe renews (active or trialing) are left alone, but for yearly prices still
    # paid whose current month has ended (renewed from their anniversary).
    due_ids = {r[0] for r in conc.sql(
        f"select a.id from {accounts} where {before_period} and not (stripe_subscription_id is not null "
        "and coalesce(subscription_status, '') in ('active', 'trialing'))", period)}
    anniversaries = {r[0] for r in conc.sql(
        f"select a.id from {accounts} where stripe_subscription_id is not null "
        "and subscription_status in ('active', 'trialing') "
        "and stripe_paid_through > greatest(now(), %s::timestamp at time zone 'UTC') "
        "and w.period_end <= greatest(now(), %s::timestamp at time zone 'UTC')", period, period)}
    due = len(due_ids) + len(anniversaries)
    assert due_ids

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        done: list[Outcome] = []
        after = None
        while True:
            args: dict[str, Any] = {"p_period_start": period, "p_batch_size": 1 + i % 3}
            if after is not None:
                args["p_after"] = after
            out = attempt(conn, "reset", "run_monthly_reset", Caller.service(), **args)
            done.append(out)
            if not out.ok or out.result["done"]:
                return done
            after = out.result["next_after"]

    outcomes = run_parallel(conc.dsn, work, threads=8)
    assert all(o.ok for o in outcomes), Counter((o.sqlstate, o.message) for o in outcomes)
    assert sum(o.result["processed"] for o in outcomes) == due
    grants = conc.sql("select account_id, count(*) from public.credit_ledger "
                      "where type = 'grant' and period_start = %s::timestamp at time zone 'UTC' "
                      "and metadata ->> 'reason' = 'monthly_reset' "
                      "group by account_id", period)
    grants = [(a, n) for a, n in grants if a in due_ids]
    assert len(grants) == len(due_ids) and all(n == 1 for _, n in grants)
    # Each yearly price renewed once, to its month that contains greatest(now, the period's start).
    for account in anniversaries:
        assert conc.one("select period_start <= at and at < period_end from public.credit_wallets, "
                        "greatest(now(), %s::timestamp at time zone 'UTC') at where account_id = %s",
                        period, account)
    assert conc.one(f"select count(*) from {accounts} where {before_period} "
                    "and stripe_subscription_id is null", period) == 0
    assert_books_balance(conc)


def test_subscription_invoices_and_spends_on_one_account_never_deadlock(conc: Db) -> None:
    """A subscription invoice locks the wallet before the account row, as a spend does (a spend's
    ledger row share-locks the account row through its foreign key)."""
    owner, account = conc.new_user()
    conc.fund(account, purchased=500)
    conc.sql("insert into public.credit_plans (id, monthly_credits, stripe_price_id) "
             "values ('lock_order', 0, 'price_lock_order') on conflict do nothing")
    customer, subscription = f"cus_{uuid.uuid4().hex}", f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60

    def work(i: int, conn: psycopg.Connection) -> list[Outcome]:
        done = []
        for n in range(12):
            if i % 2:
                payload = {"invoice": f"in_{uuid.uuid4().hex}", "customer": customer,
                           "subscription": subscription, "account_id": account,
                           "billing_reason": "subscription_cycle", "created": start,
                           "lines": [{"price_id": "price_lock_order", "quantity": 1, "period_start": start,
                                      "period_end": start + 30 * 86400, "proration": False, "amount": 0}]}
                done.append(attempt(conn, "invoice", "handle_stripe_event", Caller.service(),
                                    p_event_id=f"evt_{uuid.uuid4().hex}", p_type="invoice.paid",
                                    p_payload=payload))
            else:
                # A hold's row share-locks the account row (its foreign key), after the wallet.
                done.append(attempt(conn, "reserve", "reserve_credits", owner, p_account_id=account,
                                    p_idempotency_key=f"d{i}-{n}", p_amount=1))
        return done

    outcomes = run_parallel(conc.dsn, work)
    assert_no_unexpected_errors(outcomes)  # a deadlock shows here as 40P01
    assert all(o.ok for o in outcomes), Counter((o.op, o.sqlstate) for o in outcomes if not o.ok)
    assert all(o.result["outcome"] == "applied" for o in outcomes if o.op == "invoice")
    holds = sum(1 for o in outcomes if o.op == "reserve")
    assert holds == (THREADS + 1) // 2 * 12
    expired = -conc.one("select coalesce(sum(amount), 0) from public.credit_ledger "
                        "where account_id = %s and type = 'expire'", account)
    balance = conc.balance(account)
    assert (balance["total"], balance["held"]) == (3 + 500 - expired, holds)
    assert_books_balance(conc)
