"""Auto top-up under a random workload, in SQL: what the worker and the webhook would report,
in random order, against a model of the contract.

Per example, one account with auto top-up on goes through spends, holds (reserved,
captured, released), purchases, top-up outcomes reported by the "worker"
(``record_topup_result``) and by the "webhook" (``payment_intent.*`` events as
``functions.stripe_events`` reduces them, through ``handle_stripe_event``), reports
repeated on top-ups that already ended, refunds of top-up payments (``charge.refunded``),
the cooldown passing, notify's claim, and the owner turning it off and on. After each step:

- the ledger explains the balance (``reconcile_credit_balances``);
- at most one top-up is in flight, and a new one started exactly when the contract says
  one is due (available lowered below the threshold, or notify's claim on a quiet
  account; active; none in flight; none in the last 10 minutes; under the monthly cap);
- each top-up has the outcome of its first report, and its credits were granted once
  (one ledger row keyed ``topup:<id>``) exactly when that was a success;
- the outcome events match the outcomes, and the setting is active, paused or disabled
  as the reports, refunds and the owner made it; pausing or disabling ends a top-up no
  worker has claimed yet (``cancelled``, no event).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functions.stripe_events import normalize
from tests.support import Caller, Db, new_key, own_database

PACK_CREDITS = 100
PAYMENT = 1000  # what a top-up's PaymentIntent charged, in cents

STEP = st.one_of(
    st.tuples(st.just("spend"), st.integers(1, 120)),
    st.tuples(st.just("reserve"), st.integers(1, 60)),
    st.tuples(st.just("capture"), st.integers(1, 60)),  # amounts are positive (0 is invalid_argument)
    st.tuples(st.just("release"), st.just(0)),
    st.tuples(st.just("buy"), st.integers(1, 150)),
    st.tuples(st.just("worker"), st.sampled_from(["succeeded", "failed", "action_required", "retry",
                                                  "not_configured"])),
    st.tuples(st.just("webhook"), st.sampled_from(["succeeded", "card_declined", "authentication_required"])),
    st.tuples(st.just("again"), st.integers(0, 1000)),
    st.tuples(st.just("age"), st.just(0)),
    st.tuples(st.just("claim"), st.just(0)),
    st.tuples(st.just("refund"), st.integers(1, 100)),
    st.tuples(st.just("off"), st.just(0)),
    st.tuples(st.just("on"), st.just(0)),
)


@pytest.fixture(scope="module")
def fuzz_db(pg_server: str) -> Iterator[Db]:
    """A database of its own: notify's claim looks at every account."""
    with own_database(pg_server, "credits_topup_fuzz") as handle:
        yield handle


@pytest.fixture(scope="module")
def pack(fuzz_db: Db) -> str:
    price = f"price_fuzz_{uuid.uuid4().hex[:10]}"
    fuzz_db.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, %s, 'Fuzz')",
                price, PACK_CREDITS)
    return price


@dataclass
class Model:
    """What the contract says the account's auto top-up is."""

    threshold: int
    cap: int
    status: str = "active"
    failures: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # top-up id -> its first outcome
    cancelled: set[str] = field(default_factory=set)  # ended unstarted by a pause or a disable (no event)
    disabled_events: int = 0
    paused_events: int = 0
    refunded: dict[str, int] = field(default_factory=dict)  # payment intent -> cents refunded so far

    def cancel(self, pending: dict[str, Any] | None) -> None:
        """Paused or disabled: a top-up no worker has picked up yet ends without a charge."""
        if pending is not None and pending["attempts"] == 0:
            self.outcomes[pending["id"]] = "failed"
            self.cancelled.add(pending["id"])

    def ended(self, outcome: str) -> None:
        """A top-up's first report (never a retry) and what it does to the setting."""
        if outcome == "succeeded":
            self.failures = 0
        elif outcome == "action_required":
            if self.status == "active":
                self.status = "paused"
        else:
            self.failures += 1
            disables = outcome == "not_configured" or self.failures >= 3
            # Only the failure that disables it writes topup.disabled.
            if self.status != "disabled" and disables:
                self.disabled_events += 1
            if disables:
                self.status = "disabled"


class World:
    def __init__(self, db: Db, pack: str, threshold: int, cap: int, start: int) -> None:
        self.db, self.pack = db, pack
        self.owner, self.account = db.new_user()
        bonus = db.balance(self.account)["available"]
        if bonus:
            self.call("deduct_credits", p_account_id=self.account, p_idempotency_key=new_key(),
                      p_amount=bonus)
        self.customer = f"cus_fz_{uuid.uuid4().hex[:14]}"
        db.sql("update public.credit_accounts set stripe_customer_id = %s where id = %s", self.customer,
               self.account)
        if start:
            db.fund(self.account, purchased=start)
        self.model = Model(threshold, cap)
        self.holds: list[tuple[str, int]] = []
        self.log: list[Any] = []
        self.enable()

    def call(self, fn: str, caller: Caller | None = None, **args: Any) -> Any:
        return self.db.call(fn, caller, **args)

    def enable(self) -> None:
        self.call("set_auto_topup", self.owner, p_account_id=self.account, p_enabled=True,
                  p_threshold=self.model.threshold, p_pack=self.pack, p_max_per_month=self.model.cap)
        self.model.status, self.model.failures = "active", 0

    # --- reads ---------------------------------------------------------------------------
    def available(self) -> int:
        return int(self.db.balance(self.account)["available"])

    def topups(self) -> list[dict[str, Any]]:
        rows = self.db.sql("select to_jsonb(t) from public.credit_topups t where account_id = %s"
                           " order by created_at, id", self.account)
        return [r[0] for r in rows]

    def pending(self) -> dict[str, Any] | None:
        found = [t for t in self.topups() if t["status"] == "pending"]
        assert len(found) <= 1, found
        return found[0] if found else None

    def may_start(self) -> bool:
        """The history allows a new top-up: none in flight, none in the last 10 minutes, fewer than
        the cap this UTC month (on the database's clock)."""
        recent, this_month = self.db.one(
            "select count(*) filter (where status = 'pending' or created_at > now() - interval '10 minutes'),"
            " count(*) filter (where created_at >= date_trunc('month', now() at time zone 'UTC')"
            " at time zone 'UTC') from public.credit_topups where account_id = %s", self.account)
        return recent == 0 and this_month < self.model.cap

    # --- reports ---------------------------------------------------------------------------
    @staticmethod
    def intent_of(topup_id: str) -> str:
        return "pi_fz_" + topup_id.replace("-", "")[:24]

    def worker(self, topup_id: str, outcome: str) -> dict[str, Any]:
        args: dict[str, Any] = {"p_topup_id": topup_id, "p_outcome": outcome}
        if outcome in ("succeeded", "action_required", "failed"):
            args["p_payment_intent"] = self.intent_of(topup_id)
        if outcome == "failed":
            args["p_reason"] = "card_declined"
        result: dict[str, Any] = self.call("record_topup_result", **args)
        return result

    def webhook(self, topup_id: str, code: str) -> dict[str, Any]:
        succeeded = code == "succeeded"
        intent = {"id": self.intent_of(topup_id), "object": "payment_intent", "amount": PAYMENT,
                  "currency": "usd", "customer": self.customer,
                  "status": "succeeded" if succeeded else "requires_payment_method",
                  "metadata": {"topup_id": topup_id, "account_id": self.account},
                  "last_payment_error": None if succeeded else {"code": code, "type": "card_error"}}
        kind = "payment_intent.succeeded" if succeeded else "payment_intent.payment_failed"
        return self.deliver(kind, intent)

    def deliver(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """A Stripe event as the webhook hands it to the database (reduced by functions.stripe_events)."""
        event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
                 "created": int(time.time()), "api_version": "2025-03-31.basil", "data": {"object": obj}}
        result: dict[str, Any] = self.call("handle_stripe_event", p_event_id=event["id"], p_type=kind,
                                           p_payload=normalize(event))
        return result

    def refund(self, topup_id: str, percent: int) -> dict[str, Any]:
        intent = self.intent_of(topup_id)
        total = min(PAYMENT, self.model.refunded.get(intent, 0) + PAYMENT * percent // 100)
        self.model.refunded[intent] = total
        charge = {"id": "ch_fz_" + intent[6:], "object": "charge", "payment_intent": intent,
                  "customer": self.customer, "amount": PAYMENT, "amount_refunded": total,
                  "refunded": total == PAYMENT}
        return self.deliver("charge.refunded", charge)

    # --- one step --------------------------------------------------------------------------
    def step(self, op: str, n: Any) -> None:
        before = self.available()
        pending_before = self.pending()
        history_allows = self.may_start()
        try:
            self.act(op, n, pending_before)
        except psycopg.Error as exc:
            if exc.diag.message_primary not in ("insufficient_credits", "hold_not_active"):
                raise
        after = self.available()
        pending_after = self.pending()
        started = pending_after is not None and (pending_before is None
                                                 or pending_after["id"] != pending_before["id"])
        # Due: a change lowered available below the threshold, or notify looked at the quiet account.
        looked = op == "claim" or (op in ("spend", "reserve", "capture", "refund") and after < before)
        expected = (looked and history_allows and self.model.status == "active"
                    and after < self.model.threshold)
        assert started == expected, (op, n, before, after, started, self.model)
        if started:
            assert pending_after is not None
            self.model.outcomes[pending_after["id"]] = "pending"
        self.check()

    def act(self, op: str, n: Any, pending: dict[str, Any] | None) -> None:
        if op == "spend":
            self.call("deduct_credits", p_account_id=self.account, p_idempotency_key=new_key(), p_amount=n)
        elif op == "reserve":
            hold = self.call("reserve_credits", p_account_id=self.account, p_idempotency_key=new_key(),
                             p_amount=n, p_ttl_seconds=3600)
            self.holds.append((hold["hold_id"], n))
        elif op == "capture" and self.holds:
            hold_id, amount = self.holds.pop()
            self.call("capture_hold", p_hold_id=hold_id, p_amount=min(n, amount))
        elif op == "release" and self.holds:
            self.call("release_hold", p_hold_id=self.holds.pop(0)[0])
        elif op == "buy":
            self.db.fund(self.account, purchased=n)
        elif op in ("worker", "webhook") and pending is not None:
            self.report(pending["id"], str(n), by=op)
        elif op == "again":
            # A late report of a top-up that already ended: the first report won.
            ended = [t for t in self.topups() if t["status"] != "pending"]
            if ended:
                target = ended[n % len(ended)]["id"]
                if n % 2 == 0:
                    result = self.worker(target, ("succeeded", "failed", "action_required")[n % 3])
                    assert result["replayed"] is True, result
                else:
                    code = ("succeeded", "card_declined", "authentication_required")[n % 3]
                    result = self.webhook(target, code)
                    assert (result["outcome"], result["reason"]) == ("ignored", "topup_already_ended"), result
        elif op == "age":
            self.db.sql("update public.credit_topups set created_at = created_at - interval '11 minutes'"
                        " where account_id = %s", self.account)
        elif op == "claim":
            claimed = self.call("claim_topups", p_limit=1000, p_lease_seconds=1)
            # Released at once: the "worker" reports whenever the walk says so.
            self.db.sql("update public.credit_topups set leased_until = null where account_id = %s",
                        self.account)
            mine = [t for t in claimed if t["account_id"] == self.account]
            assert len(mine) <= 1 and all(t["customer"] == self.customer for t in mine)
        elif op == "refund":
            paid = [t for t in self.topups() if t["status"] == "succeeded"
                    and self.model.refunded.get(self.intent_of(t["id"]), 0) < PAYMENT]
            if paid:
                result = self.refund(paid[n % len(paid)]["id"], n)
                assert result["outcome"] == "applied", result
                if self.model.status == "active":
                    self.model.status = "paused"
                    self.model.paused_events += 1
                    self.model.cancel(pending)
        elif op == "off":
            self.call("set_auto_topup", self.owner, p_account_id=self.account, p_enabled=False)
            self.model.status = "disabled"
            self.model.cancel(pending)
        elif op == "on":
            self.enable()

    def report(self, topup_id: str, what: str, *, by: str) -> None:
        if by == "worker":
            result = self.worker(topup_id, what)
            assert result["replayed"] is False, result
            outcome = "failed" if what == "not_configured" else what
        else:
            result = self.webhook(topup_id, what)
            assert result["outcome"] == "applied", result
            outcome = {"succeeded": "succeeded", "card_declined": "failed",
                       "authentication_required": "action_required"}[what]
            what = outcome
        if what == "retry":
            return
        self.model.outcomes[topup_id] = outcome
        self.model.ended(what)

    # --- the books -------------------------------------------------------------------------
    def check(self) -> None:
        mismatches = [m for m in self.call("reconcile_credit_balances")["mismatches"]
                      if m["account_id"] == self.account]
        assert mismatches == []
        topups = {t["id"]: t for t in self.topups()}
        assert {i: t["status"] for i, t in topups.items()} == self.model.outcomes
        grants = self.db.sql("select idempotency_key, purchased from public.credit_transactions"
                             " where account_id = %s and idempotency_key like 'topup:%%'", self.account)
        assert sorted(k for k, _ in grants) == sorted(f"topup:{i}" for i, s in self.model.outcomes.items()
                                                      if s == "succeeded")
        assert all(n == PACK_CREDITS for _, n in grants)
        this_month = self.db.one(
            "select count(*) from public.credit_topups where account_id = %s and"
            " created_at >= date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'", self.account)
        assert this_month <= self.model.cap
        status, failures = self.db.one(
            "select status, failures from private.auto_topups where account_id = %s", self.account)
        assert status == self.model.status, (status, self.model)
        assert failures == self.model.failures, (failures, self.model)
        types = [r[0] for r in self.db.sql("select type from public.credit_events where account_id = %s"
                                           " and type like 'topup.%%'", self.account)]
        outcomes = list(self.model.outcomes.values())
        assert types.count("topup.succeeded") == outcomes.count("succeeded")
        assert types.count("topup.failed") == outcomes.count("failed") - len(self.model.cancelled)
        for cancelled in self.model.cancelled:
            assert (topups[cancelled]["reason"], topups[cancelled]["attempts"]) == ("cancelled", 0)
        assert types.count("topup.action_required") == outcomes.count("action_required")
        assert types.count("topup.paused") == self.model.paused_events
        assert types.count("topup.disabled") == self.model.disabled_events, (types, self.model)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(threshold=st.integers(10, 90), cap=st.integers(1, 6), start=st.integers(0, 200),
       steps=st.lists(STEP, min_size=1, max_size=40))
def test_auto_top_up_under_a_random_workload(fuzz_db: Db, pack: str, threshold: int, cap: int, start: int,
                                             steps: list[tuple[str, Any]]) -> None:
    world = World(fuzz_db, pack, threshold, cap, start)
    world.check()
    for op, n in steps:
        world.log.append((op, n))
        world.step(op, n)


def test_a_failure_while_already_disabled_writes_no_topup_disabled(fuzz_db: Db, pack: str) -> None:
    world = World(fuzz_db, pack, threshold=50, cap=4, start=60)
    world.step("spend", 20)                  # 40 < 50: one top-up
    world.step("claim", 0)                   # a worker picked it up: it runs its course
    pending = world.pending()
    assert pending is not None and pending["attempts"] == 1
    world.call("set_auto_topup", world.owner, p_account_id=world.account, p_enabled=False)
    assert world.pending() is not None
    world.worker(pending["id"], "failed")    # the first failure in a row
    types = [r[0] for r in fuzz_db.sql("select type from public.credit_events where account_id = %s"
                                       " and type like 'topup.%%' order by seq", world.account)]
    assert types == ["topup.failed"]
