"""A random walk over every call that moves credits, checking the books after each step.

Per seed, one account goes through purchases, spends, holds (captured,
released, lapsing, extended, captured above the hold under each overage
policy, overdrafts making debt), adjustments (debt written off too),
promotions (some expiring within the walk), explicit expiries, Stripe
renewals, refunds of spends, clawbacks, Stripe disputes opened and won,
charge refunds, and its user spending under spend limits that change. After every step
reconcile_credit_balances() must be clean (each pool equals its ledger, its
holds and its grants) and the credit_grants view must add up to the balance
a read shows. ``GRANT_FUZZ_SEEDS`` and ``GRANT_FUZZ_STEPS`` make it longer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.support import Caller, Db, new_key

SEEDS = int(os.environ.get("GRANT_FUZZ_SEEDS", "4"))
STEPS = int(os.environ.get("GRANT_FUZZ_STEPS", "40"))


class Fail(Exception):
    pass


def check(d: Db, a: str, log: list) -> None:
    m = [x for x in d.call("reconcile_credit_balances")["mismatches"] if x["account_id"] == a]
    if m:
        raise Fail(f"reconcile {m}")
    lapsed = d.one("select count(*) from public.credit_holds where account_id=%s and status='active' "
                   "and expires_at <= now()", a)
    if lapsed:
        return
    bal = d.balance(a)
    sums = dict(d.sql("select pool, sum(remaining)::bigint from public.credit_grants where account_id=%s "
                      "group by pool", a))
    for p in ("promotional", "subscription", "purchased"):
        if sums.get(p, 0) != bal[p]:
            raise Fail(f"view {p} {sums} {bal}")


def check_limits(d: Db, a: str, user: Caller) -> None:
    """What the limits count for the user equals what the ledger and the user's active holds say."""
    if d.one("select count(*) from public.credit_holds where account_id=%s and status='active' "
             "and expires_at <= now()", a):
        return  # a lapsed hold ends with the next write
    starts = {"day": "date_trunc('day', now() at time zone 'UTC') at time zone 'UTC'",
              "week": "date_trunc('week', now() at time zone 'UTC') at time zone 'UTC'",
              "month": "date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'",
              "billing_period": "(select w.period_start from public.credit_wallets w "
                                "where w.account_id = t.account_id)"}
    for period, spent, held in d.sql("select period, spent, held from public.credit_spend_limits "
                                     "where account_id = %s and subject_id = %s", a, user.user_id):
        ledger = d.one(
            "select coalesce(sum(-(t.promotional + t.subscription + t.purchased)"
            " + coalesce((select sum(o.debt) from public.credit_transactions o where t.ref_id is not null"
            "             and o.ref_id = t.ref_id and o.kind = 'overdraft'), 0)"
            " - coalesce((select sum(r.purchased) from public.credit_transactions r"
            "             where r.ref_id = t.id and r.kind = 'refund'), 0)), 0)"
            " from public.credit_transactions t where t.account_id = %s and t.kind = 'spend'"
            f" and t.actor_id = %s and t.created_at >= {starts[period]}", a, user.user_id)
        holds = d.one("select coalesce(sum(amount), 0) from public.credit_holds where account_id = %s "
                      "and status = 'active' and actor_id = %s", a, user.user_id)
        if (spent, held) != (ledger, holds):
            raise Fail(f"limit {period}: counted spent {spent} held {held}, ledger {ledger} holds {holds}")


def run(d: Db, seed: int) -> list:
    rng = random.Random(seed)
    user, a = d.new_user()
    d.sql("update public.credit_accounts set overdraft_limit = %s where id = %s", rng.choice([0, 5, 30]), a)
    refs: list[str] = []
    spends: list[str] = []
    holds: list[str] = []
    disputes: list[tuple[str, str]] = []
    refunded: dict[str, int] = {}
    log: list = []
    k = 0
    now = dt.datetime.now(dt.UTC)
    for step in range(STEPS):
        op = rng.choice(["buy", "buy", "spend", "spend", "reserve", "reserve", "capture", "release",
                         "adjust", "promo", "expire", "renew", "renew", "refund", "clawback", "dispute",
                         "won", "chargerefund", "shorthold", "shortpromo", "tick", "overcap", "overcap",
                         "extend", "limit", "userspend", "userreserve", "writeoff"])
        args: dict[str, Any] = {}
        try:
            if op == "buy":
                r = f"pi_fz_{uuid.uuid4().hex[:12]}" if rng.random() < 0.8 else None
                n = rng.randint(1, 20)
                args = dict(n=n, ref=r)
                d.call("add_purchased_credits", p_account_id=a, p_amount=n, p_idempotency_key=new_key(),
                       p_stripe_ref=r)
                if r:
                    refs.append(r)
            elif op == "spend":
                n = rng.randint(1, 15)
                args = dict(n=n)
                s = d.call("deduct_credits", p_account_id=a, p_idempotency_key=new_key(), p_amount=n)
                spends.append(s["transaction_id"])
            elif op == "reserve":
                n = rng.randint(1, 15)
                args = dict(n=n)
                overage = rng.choice(["reject", "if_available", "overdraft"])
                args = dict(n=n, overage=overage)
                h = d.call("reserve_credits", p_account_id=a, p_idempotency_key=new_key(), p_amount=n,
                           p_ttl_seconds=3600, p_overage=overage)
                holds.append(h["hold_id"])
            elif op == "capture" and holds:
                h = holds.pop(rng.randrange(len(holds)))
                amt = d.one("select amount from public.credit_holds where id=%s", h)
                c = rng.randint(1, amt)
                args = dict(h=h, c=c)
                r = d.call("capture_hold", p_hold_id=h, p_amount=c)
                if r.get("transaction_id"):
                    spends.append(r["transaction_id"])
            elif op == "release" and holds:
                h = holds.pop(rng.randrange(len(holds)))
                args = dict(h=h)
                d.call("release_hold", p_hold_id=h)
            elif op == "adjust":
                pool = rng.choice(["subscription", "purchased", "promotional"])
                n = rng.randint(1, 10) * (1 if pool != "promotional" and rng.random() < 0.5 else -1)
                args = dict(pool=pool, n=n)
                d.call("admin_adjust_credits", p_account_id=a, p_pool=pool, p_amount=n, p_reason="fz",
                       p_idempotency_key=new_key())
            elif op == "promo":
                n = rng.randint(1, 10)
                days = rng.randint(1, 60)
                args = dict(n=n, days=days)
                d.call("grant_promotional_credits", p_account_id=a, p_amount=n,
                       p_expires_at=(now + dt.timedelta(days=days)).isoformat(), p_idempotency_key=new_key())
            elif op == "expire":
                d.call("expire_subscription_credits", p_account_id=a, p_idempotency_key=new_key())
            elif op == "renew":
                k += 1
                start = now - dt.timedelta(days=1) + dt.timedelta(minutes=k)
                r = f"in_fz_{uuid.uuid4().hex[:12]}"
                n = rng.randint(0, 20)
                args = dict(n=n, ref=r)
                d.call("add_subscription_credits", p_account_id=a, p_amount=n,
                       p_period_start=start.isoformat(),
                       p_period_end=(start + dt.timedelta(days=30)).isoformat(), p_idempotency_key=new_key(),
                       p_stripe_ref=r)
                refs.append(r)
            elif op == "refund" and spends:
                s = rng.choice(spends)
                amt = None if rng.random() < 0.5 else rng.randint(1, 5)
                args = dict(s=s, amt=amt)
                d.call("refund_credits", p_transaction_id=s, p_idempotency_key=new_key(), p_amount=amt)
            elif op == "clawback" and refs:
                r = rng.choice(refs)
                amt = None if rng.random() < 0.5 else rng.randint(0, 20)
                args = dict(ref=r, amt=amt)
                d.call("clawback_credits", p_stripe_ref=r, p_idempotency_key=new_key(), p_amount=amt)
            elif op == "dispute" and refs:
                r = rng.choice(refs)
                dp = f"dp_{uuid.uuid4().hex[:12]}"
                args = dict(ref=r, dp=dp)
                res = d.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                             p_type="charge.dispute.created",
                             p_payload=json.dumps({"dispute": dp, "payment_intent": r,
                                                   "status": "needs_response"}))
                args["res"] = res
                if res["outcome"] == "failed":
                    raise Fail(f"stripe failed {res}")
                if res["outcome"] == "applied":
                    disputes.append((dp, r))
            elif op == "won" and disputes:
                dp, r = disputes.pop(rng.randrange(len(disputes)))
                args = dict(dp=dp, ref=r)
                res = d.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                             p_type="charge.dispute.closed",
                             p_payload=json.dumps({"dispute": dp, "status": "won"}))
                args["res"] = res
                if res["outcome"] == "failed":
                    raise Fail(f"stripe failed {res}")
            elif op == "chargerefund" and refs:
                r = rng.choice(refs)
                refunded[r] = min(1000, refunded.get(r, 0) + rng.randint(100, 600))
                args = dict(ref=r, refunded=refunded[r])
                res = d.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                             p_type="charge.refunded",
                             p_payload=json.dumps({"charge": "ch_" + r, "payment_intent": r, "amount": 1000,
                                                   "amount_refunded": refunded[r]}))
                args["res"] = res
                if res["outcome"] == "failed":
                    raise Fail(f"stripe failed {res}")
            elif op == "shorthold":
                n = rng.randint(1, 15)
                args = dict(n=n)
                h = d.call("reserve_credits", p_account_id=a, p_idempotency_key=new_key(), p_amount=n,
                           p_ttl_seconds=1)
                holds.append(h["hold_id"])
            elif op == "shortpromo":
                n = rng.randint(1, 10)
                args = dict(n=n)
                d.call("grant_promotional_credits", p_account_id=a, p_amount=n,
                       p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)).isoformat(),
                       p_idempotency_key=new_key())
            elif op == "overcap" and holds:
                h = holds.pop(rng.randrange(len(holds)))
                amt = d.one("select amount from public.credit_holds where id=%s", h)
                c = amt + rng.randint(1, 20)
                args = dict(h=h, c=c)
                r = d.call("capture_hold", p_hold_id=h, p_amount=c)
                args["r"] = {k: r[k] for k in ("charged", "uncovered", "debt_added")}
                if r.get("transaction_id"):
                    spends.append(r["transaction_id"])
            elif op == "extend" and holds:
                h = rng.choice(holds)
                add = rng.randint(0, 8)
                ttl = rng.choice([None, 60, 3600])
                args = dict(h=h, add=add, ttl=ttl)
                d.call("extend_hold", p_hold_id=h, p_idempotency_key=new_key(), p_add_amount=add,
                       p_ttl_seconds=ttl)
            elif op == "limit":
                lim = rng.choice([None, 0, 10, 40])
                period = rng.choice(["day", "week", "month", "billing_period"])
                args = dict(lim=lim, period=period)
                d.call("set_spend_limit", p_account_id=a, p_subject="member", p_subject_id=user.user_id,
                       p_limit=lim, p_period=period)
            elif op == "userspend":
                n = rng.randint(1, 10)
                args = dict(n=n)
                s_ = d.call("deduct_credits", user, p_account_id=a, p_idempotency_key=new_key(), p_amount=n)
                spends.append(s_["transaction_id"])
            elif op == "userreserve":
                n = rng.randint(1, 10)
                args = dict(n=n)
                h = d.call("reserve_credits", user, p_account_id=a, p_idempotency_key=new_key(), p_amount=n,
                           p_ttl_seconds=3600, p_overage="if_available")
                holds.append(h["hold_id"])
            elif op == "writeoff":
                owed = d.balance(a)["debt"]
                if not owed:
                    continue
                n = rng.randint(1, owed)
                args = dict(n=n)
                d.call("admin_adjust_credits", p_account_id=a, p_pool="debt", p_amount=-n, p_reason="fz",
                       p_idempotency_key=new_key())
            elif op == "tick":
                time.sleep(1.6)
                d.call("admin_adjust_credits", p_account_id=a, p_pool="purchased", p_amount=1,
                       p_reason="tick",
                       p_idempotency_key=new_key())
            else:
                continue
        except psycopg.Error as e:
            if e.sqlstate and (e.sqlstate.startswith("PT") or e.sqlstate == "22023"):
                log.append((step, op, args, "err " + (e.diag.message_primary or "")))
                continue
            log.append((step, op, args, f"EXC {e.sqlstate} {e}"))
            raise Fail(f"exception {e.sqlstate} {e}\n" + "\n".join(map(str, log))) from e
        log.append((step, op, args))
        try:
            check(d, a, log)
            check_limits(d, a, user)
        except Fail as f:
            raise Fail(str(f) + "\n" + "\n".join(map(str, log))) from None
    return log


@pytest.mark.parametrize("cap", [0, 3])
def test_a_random_walk_keeps_every_credit_in_a_grant(database: Db, cap: int) -> None:
    database.sql("update public.credit_plans set rollover_cap = %s where id = 'free'", cap)
    failures = []
    try:
        for seed in range(SEEDS):
            try:
                run(database, seed * 7 + cap)
            except Fail as f:
                failures.append((seed, str(f)))
    finally:
        database.sql("update public.credit_plans set rollover_cap = 0 where id = 'free'")
    assert not failures, "\n\n".join(f"seed {s}: {f[:6000]}" for s, f in failures[:3])
