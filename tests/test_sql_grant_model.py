"""Every credit in a grant: credit_grants shows each arrival of credits with its
source, its Stripe reference and what is left of it, and the flows that must
know whose credits are whose (refunds, clawbacks, won disputes, hold ends)
act on those grants."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

from tests.sql_access import as_caller
from tests.support import Db, new_key


def grants(database: Db, account_id: str) -> list[tuple]:
    """(pool, source, stripe_ref, granted, remaining), in arrival order."""
    return database.sql(
        "select pool, source, stripe_ref, granted, remaining from public.credit_grants "
        "where account_id = %s order by created_at, grant_id", account_id)


def left_of(database: Db, account_id: str, stripe_ref: str) -> int:
    return int(database.one("select coalesce(sum(remaining), 0) from public.credit_grants "
                            "where account_id = %s and stripe_ref = %s", account_id, stripe_ref))


def buy(database: Db, account_id: str, amount: int, ref: str | None = None) -> Any:
    return database.call("add_purchased_credits", p_account_id=account_id, p_amount=amount,
                         p_idempotency_key=new_key(), p_stripe_ref=ref)


def spend(database: Db, account_id: str, amount: int) -> Any:
    return database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=amount)


def assert_pools_are_their_grants(database: Db, account_id: str) -> None:
    balance = database.balance(account_id)
    sums = dict(database.sql("select pool, sum(remaining)::bigint from public.credit_grants "
                             "where account_id = %s group by pool", account_id))
    for pool in ("promotional", "subscription", "purchased"):
        assert sums.get(pool, 0) == balance[pool], (pool, sums, balance)


def test_each_arrival_is_a_grant_with_its_source(database: Db) -> None:
    _, account_id = database.new_user()
    buy(database, account_id, 10, "pi_grant_model_1")
    buy(database, account_id, 5)
    database.call("admin_adjust_credits", p_account_id=account_id, p_pool="subscription", p_amount=2,
                  p_reason="goodwill", p_idempotency_key=new_key())
    database.call("grant_promotional_credits", p_account_id=account_id, p_amount=4,
                  p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat(),
                  p_idempotency_key=new_key(), p_reason="campaign")
    assert grants(database, account_id) == [
        ("subscription", "reset", None, 3, 3),           # the first month's allowance
        ("purchased", "checkout", "pi_grant_model_1", 10, 10),
        ("purchased", "adjustment", None, 5, 5),         # an operator's purchase without a payment
        ("subscription", "adjustment", None, 2, 2),
        ("promotional", "promotion", None, 4, 4),
    ]
    # Spends take promotional, then subscription (the oldest grant first), then purchased (oldest first).
    spend(database, account_id, 4 + 2)
    assert [g[4] for g in grants(database, account_id)] == [1, 10, 5, 2, 0]
    spend(database, account_id, 3 + 11)
    assert grants(database, account_id) == [
        ("subscription", "reset", None, 3, 0),
        ("purchased", "checkout", "pi_grant_model_1", 10, 0),
        ("purchased", "adjustment", None, 5, 4),
        ("subscription", "adjustment", None, 2, 0),
        ("promotional", "promotion", None, 4, 0),
    ]
    assert_pools_are_their_grants(database, account_id)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_period_renewal_grants_the_invoice_and_rolls_over_under_its_reference(database: Db) -> None:
    _, account_id = database.new_user()
    database.sql("update public.credit_plans set rollover_cap = 2 where id = 'free'")
    try:
        now = dt.datetime.now(dt.UTC)
        first = now - dt.timedelta(days=1)
        database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                      p_period_start=first.isoformat(),
                      p_period_end=(first + dt.timedelta(days=30)).isoformat(),
                      p_idempotency_key=new_key(), p_stripe_ref="in_grant_model_1")
        spend(database, account_id, 6)
        second = first + dt.timedelta(hours=1)
        database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                      p_period_start=second.isoformat(),
                      p_period_end=(second + dt.timedelta(days=30)).isoformat(),
                      p_idempotency_key=new_key(), p_stripe_ref="in_grant_model_2")
    finally:
        database.sql("update public.credit_plans set rollover_cap = 0 where id = 'free'")
    assert sorted(g for g in grants(database, account_id) if g[2] is not None) == [
        # Up to the cap of what was left rolls over, keeping the allowance's payment.
        ("promotional", "rollover", "in_grant_model_1", 2, 2),
        ("subscription", "invoice", "in_grant_model_1", 10, 0),   # its period ended
        ("subscription", "invoice", "in_grant_model_2", 10, 10),
    ]
    # Refunding the first invoice reaches what rolled over from it, never the second's allowance.
    taken = database.call("clawback_credits", p_stripe_ref="in_grant_model_1", p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["shortfall"]) == (2, 8)
    assert database.balance(account_id)["subscription"] == 10
    assert_pools_are_their_grants(database, account_id)


def test_a_refund_of_a_spend_keeps_its_payment_so_a_later_dispute_reaches_it(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)                      # the month's allowance, out of the way
    buy(database, account_id, 100, "pi_grant_model_pack")
    spent = spend(database, account_id, 100)
    # The operator refunds the generation; then the pack's payment is disputed.
    database.call("refund_credits", p_transaction_id=spent["transaction_id"], p_idempotency_key=new_key(),
                  p_amount=60)
    assert grants(database, account_id)[-1] == ("purchased", "checkout", "pi_grant_model_pack", 60, 60)
    disputed = database.call("clawback_credits", p_stripe_ref="pi_grant_model_pack",
                             p_idempotency_key=new_key())
    # The pack granted 100 (the refund's grant carries its reference, it grants nothing more).
    assert (disputed["clawed_back"], disputed["shortfall"]) == (60, 40)
    assert database.balance(account_id)["purchased"] == 0
    assert_pools_are_their_grants(database, account_id)


def test_a_clawback_takes_what_is_left_of_its_own_pack_only(database: Db) -> None:
    _, account_id = database.new_user()
    buy(database, account_id, 30, "pi_grant_model_old")
    buy(database, account_id, 20, "pi_grant_model_new")
    spend(database, account_id, 3 + 25)                 # the allowance, then 25 of the older pack
    assert (left_of(database, account_id, "pi_grant_model_old"),
            left_of(database, account_id, "pi_grant_model_new")) == (5, 20)
    taken = database.call("clawback_credits", p_stripe_ref="pi_grant_model_old", p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["shortfall"]) == (5, 25)
    assert (left_of(database, account_id, "pi_grant_model_old"),
            left_of(database, account_id, "pi_grant_model_new")) == (0, 20)
    assert_pools_are_their_grants(database, account_id)


def test_held_credits_of_a_clawed_back_pack_leave_that_pack_when_the_hold_ends(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    buy(database, account_id, 10, "pi_grant_model_held")
    buy(database, account_id, 10, "pi_grant_model_other")
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=8)
    taken = database.call("clawback_credits", p_stripe_ref="pi_grant_model_held", p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["pending"], taken["shortfall"]) == (2, 8, 0)
    assert_pools_are_their_grants(database, account_id)
    database.call("release_hold", p_hold_id=hold["hold_id"])
    assert (left_of(database, account_id, "pi_grant_model_held"),
            left_of(database, account_id, "pi_grant_model_other")) == (0, 10)
    assert database.balance(account_id)["purchased"] == 10
    assert_pools_are_their_grants(database, account_id)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_member_reads_the_grants_of_their_accounts_only(database: Db) -> None:
    caller, account_id = database.new_user()
    other, other_account = database.new_user()
    buy(database, other_account, 7, "pi_grant_model_private")
    # The view computes as its reader: RLS on grants, wallets, holds and the ledger applies.
    rows = as_caller(database.conn, caller, "select account_id::text from public.credit_grants")
    assert {r[0] for r in rows} == {account_id}
    rows = as_caller(database.conn, other, "select stripe_ref, remaining from public.credit_grants "
                                           "where stripe_ref is not null")
    assert rows == [("pi_grant_model_private", 7)]


# --- whose credits are whose, around holds, clawbacks and disputes -------------------------


def ref(prefix: str = "pi") -> str:
    return f"{prefix}_gm_{uuid.uuid4().hex[:12]}"


def stripe(database: Db, event_type: str, **payload: Any) -> None:
    """A Stripe event as the webhook hands it to the database (its normalised facts)."""
    result = database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}", p_type=event_type,
                           p_payload=json.dumps(payload))
    assert result["outcome"] == "applied", result


def test_a_spend_while_a_hold_is_active_takes_the_credits_behind_it(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    first, second = ref(), ref()
    buy(database, account_id, 5, first)
    buy(database, account_id, 5, second)
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=3)
    spend(database, account_id, 4)          # the first pack's last 2 free credits, then 2 of the second
    assert (left_of(database, account_id, first), left_of(database, account_id, second)) == (3, 3)
    taken = database.call("clawback_credits", p_stripe_ref=first, p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["pending"], taken["shortfall"]) == (0, 3, 2)
    database.call("release_hold", p_hold_id=hold["hold_id"])
    assert database.balance(account_id)["purchased"] == 3   # the second pack's, all of them
    assert_pools_are_their_grants(database, account_id)


def test_a_claim_lands_on_the_hold_that_reserves_the_payments_credits(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    first, second = ref(), ref()
    buy(database, account_id, 5, first)
    buy(database, account_id, 5, second)
    long = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=5,
                         p_ttl_seconds=3600)   # the first pack's 5
    short = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=5,
                          p_ttl_seconds=60)    # the second pack's 5, and the hold that ends first
    database.call("clawback_credits", p_stripe_ref=first, p_idempotency_key=new_key())
    database.call("capture_hold", p_hold_id=long["hold_id"])    # the first pack's credits were spent
    database.call("release_hold", p_hold_id=short["hold_id"])   # the second pack's are free again
    assert database.balance(account_id)["purchased"] == 5
    assert left_of(database, account_id, second) == 5
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_won_dispute_gives_back_into_its_own_pack_after_spends(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    disputed, other = ref(), ref()
    buy(database, account_id, 10, disputed)
    buy(database, account_id, 10, other)
    dispute = ref("dp")
    stripe(database, "charge.dispute.created", dispute=dispute, payment_intent=disputed,
           status="needs_response")
    spend(database, account_id, 5)          # the other pack's: the disputed one has nothing left
    stripe(database, "charge.dispute.closed", dispute=dispute, status="won")
    assert (left_of(database, account_id, disputed), left_of(database, account_id, other)) == (10, 5)
    taken = database.call("clawback_credits", p_stripe_ref=other, p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["shortfall"]) == (5, 5)
    assert database.balance(account_id)["purchased"] == 10


def test_a_won_dispute_releases_its_own_claims_only(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    payment = ref()
    buy(database, account_id, 10, payment)
    first = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=5,
                          p_ttl_seconds=60)
    second = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(),
                           p_amount=5, p_ttl_seconds=3600)
    refund = database.call("clawback_credits", p_stripe_ref=payment, p_idempotency_key=new_key(), p_amount=4)
    # A partial refund, claimed on the first hold.
    assert (refund["clawed_back"], refund["pending"]) == (0, 4)
    dispute = ref("dp")
    stripe(database, "charge.dispute.created", dispute=dispute, payment_intent=payment,
           status="needs_response")
    database.call("release_hold", p_hold_id=second["hold_id"])   # the dispute's claim takes 5
    assert database.balance(account_id)["purchased"] == 5
    stripe(database, "charge.dispute.closed", dispute=dispute, status="won")
    database.call("release_hold", p_hold_id=first["hold_id"])    # the refund's 4 are still taken
    assert database.balance(account_id)["purchased"] == 6
    assert_pools_are_their_grants(database, account_id)


def test_a_refund_after_another_packs_clawback_keeps_the_right_payment(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    kept, refunded = ref(), ref()
    buy(database, account_id, 10, kept)
    buy(database, account_id, 10, refunded)
    assert database.call("clawback_credits", p_stripe_ref=refunded, p_idempotency_key=new_key())[
        "clawed_back"] == 10
    spent = spend(database, account_id, 5)          # the kept pack's credits
    database.call("refund_credits", p_transaction_id=spent["transaction_id"], p_idempotency_key=new_key())
    taken = database.call("clawback_credits", p_stripe_ref=kept, p_idempotency_key=new_key())
    assert (taken["clawed_back"], taken["shortfall"]) == (10, 0)


def test_a_rollover_keeps_the_reference_of_its_allowance_not_a_late_invoice(database: Db) -> None:
    _, account_id = database.new_user()
    now = dt.datetime.now(dt.UTC)
    current, late, renewal = ref("in"), ref("in"), ref("in")
    database.sql("update public.credit_plans set rollover_cap = 3 where id = 'free'")
    try:
        def period(stripe_ref: str, start: dt.datetime) -> Any:
            return database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                                 p_period_start=start.isoformat(),
                                 p_period_end=(start + dt.timedelta(days=30)).isoformat(),
                                 p_idempotency_key=new_key(), p_stripe_ref=stripe_ref)
        start = now - dt.timedelta(days=1)
        period(current, start)
        assert period(late, start - dt.timedelta(days=30))["granted"] == 0   # the previous period's, late
        period(renewal, start + dt.timedelta(minutes=5))
    finally:
        database.sql("update public.credit_plans set rollover_cap = 0 where id = 'free'")
    taken = database.call("clawback_credits", p_stripe_ref=current, p_idempotency_key=new_key())
    assert taken["clawed_back"] == 3   # what rolled over from the current period's allowance


def test_the_view_counts_credits_as_reads_do_around_lapsed_holds_and_expired_grants(database: Db) -> None:
    _, account_id = database.new_user()
    database.call("grant_promotional_credits", p_account_id=account_id, p_amount=10,
                  p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat(),
                  p_idempotency_key=new_key())
    database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=4,
                  p_ttl_seconds=1)
    # A subscription hold of a period that then ends (its credits will expire with the hold).
    database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=8,
                  p_ttl_seconds=1)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                  p_period_start=start.isoformat(), p_period_end=(start + dt.timedelta(days=30)).isoformat(),
                  p_idempotency_key=new_key(), p_stripe_ref=ref("in"))
    short = database.call("grant_promotional_credits", p_account_id=account_id, p_amount=5,
                          p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat(),
                          p_idempotency_key=new_key())
    assert short["granted"] == 5
    database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=2,
                  p_ttl_seconds=3600)   # 2 of the short promotion, held past its date
    time.sleep(1.5)
    assert_pools_are_their_grants(database, account_id)   # nothing written since: reads only
    buy(database, account_id, 1)                            # a write: the sweep
    assert_pools_are_their_grants(database, account_id)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


def test_a_refund_after_a_dispute_won_with_nothing_to_give_back(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    disputed = ref()
    buy(database, account_id, 10, disputed)
    spend(database, account_id, 10)                     # all of it spent: the dispute takes nothing
    dispute = ref("dp")
    stripe(database, "charge.dispute.created", dispute=dispute, payment_intent=disputed,
           status="needs_response")
    stripe(database, "charge.dispute.closed", dispute=dispute, status="won")
    buy(database, account_id, 5)
    spent = spend(database, account_id, 5)
    refunded = database.call("refund_credits", p_transaction_id=spent["transaction_id"],
                             p_idempotency_key=new_key())
    assert refunded["refunded"] == 5
    assert_pools_are_their_grants(database, account_id)


def test_a_refund_of_a_captured_hold_keeps_the_payments_the_hold_charged(database: Db) -> None:
    _, account_id = database.new_user()
    spend(database, account_id, 3)
    held, other = ref(), ref()
    buy(database, account_id, 10, held)
    buy(database, account_id, 10, other)
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=10)
    spend(database, account_id, 5)                  # the other pack's, while the hold is open
    captured = database.call("capture_hold", p_hold_id=hold["hold_id"])
    database.call("refund_credits", p_transaction_id=captured["transaction_id"], p_idempotency_key=new_key())

    def clawed(stripe_ref: str) -> int:
        return int(database.call("clawback_credits", p_stripe_ref=stripe_ref,
                                 p_idempotency_key=new_key())["clawed_back"])
    assert (clawed(other), clawed(held)) == (5, 10)
    assert database.balance(account_id)["purchased"] == 0


def test_a_refund_of_a_hold_captured_after_a_renewal_keeps_the_ended_periods_invoice(database: Db) -> None:
    _, account_id = database.new_user()
    invoice = ref("in")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)

    def period(stripe_ref: str, at: dt.datetime) -> None:
        database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                      p_period_start=at.isoformat(), p_period_end=(at + dt.timedelta(days=30)).isoformat(),
                      p_idempotency_key=new_key(), p_stripe_ref=stripe_ref)
    period(invoice, start)
    hold = database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key(), p_amount=10)
    period(ref("in"), start + dt.timedelta(minutes=5))
    captured = database.call("capture_hold", p_hold_id=hold["hold_id"])
    database.call("refund_credits", p_transaction_id=captured["transaction_id"], p_idempotency_key=new_key())
    assert database.call("clawback_credits", p_stripe_ref=invoice, p_idempotency_key=new_key())[
        "clawed_back"] == 10


def test_a_rollover_keeps_the_reference_of_the_grant_its_credits_are_left_of(database: Db) -> None:
    _, account_id = database.new_user()
    invoice = ref("in")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    database.sql("update public.credit_plans set rollover_cap = 5 where id = 'free'")
    try:
        def period(stripe_ref: str, at: dt.datetime) -> None:
            database.call("add_subscription_credits", p_account_id=account_id, p_amount=10,
                          p_period_start=at.isoformat(),
                          p_period_end=(at + dt.timedelta(days=30)).isoformat(),
                          p_idempotency_key=new_key(), p_stripe_ref=stripe_ref)
        period(invoice, start)
        balance = database.balance(account_id)
        spend(database, account_id, balance["promotional"] + 10)      # every credit of the invoice spent
        database.call("admin_adjust_credits", p_account_id=account_id, p_pool="subscription", p_amount=5,
                      p_reason="goodwill", p_idempotency_key=new_key())
        period(ref("in"), start + dt.timedelta(minutes=5))             # the adjustment's 5 roll over
    finally:
        database.sql("update public.credit_plans set rollover_cap = 0 where id = 'free'")
    assert database.balance(account_id)["promotional"] == 5
    assert database.call("clawback_credits", p_stripe_ref=invoice, p_idempotency_key=new_key())[
        "clawed_back"] == 0
