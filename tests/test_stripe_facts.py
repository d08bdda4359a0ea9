"""Stripe's subscription facts followed, never copied once: signed events ->
handlers.stripe_webhook -> the local REST endpoint -> PostgreSQL, and the
reset as its daily job calls it (``run_monthly_reset`` with the current
month's first day).

The reset walks every account of the session database; the accounts other
modules left behind are renewed as the job would renew them, and the ledger
check after the module still holds.

"As if time passed" moves one account's period (and its paid year) back,
which is the same as moving the clock forward for that account alone.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lambda_events import cold_start
from tests.stripe_support import stripe_id
from tests.support import Db, new_key
from tests.test_stripe_webhook import (
    DAY,
    Deliver,
    World,
    _change,
    _with_lines,
    link_subscription,
    make_deliver,
    make_world,
    webhook_env,
)


@pytest.fixture(scope="module")
def deliver(rest_url: str) -> Iterator[Deliver]:
    with cold_start("handlers.stripe_webhook", webhook_env(rest_url)) as handler:
        yield make_deliver(handler)


@pytest.fixture
def world(database: Db) -> World:
    return make_world(database)


def daily_reset(database: Db) -> dict[str, Any]:
    first = dt.datetime.now(dt.UTC).date().replace(day=1)
    out: dict[str, Any] = {"processed": 0}
    after = None
    while True:
        step = database.call("run_monthly_reset", p_period_start=first.isoformat(), p_batch_size=100000,
                             p_after=after)
        out["processed"] += step["processed"]
        if step["done"]:
            return out
        after = step["next_after"]


def time_passes(w: World, interval: str) -> None:
    """As if ``interval`` had passed for this account alone."""
    w.db.sql("update public.credit_wallets set period_start = period_start - %s::interval, "
             "period_end = period_end - %s::interval where account_id = %s", interval, interval, w.account)
    w.db.sql("update public.credit_accounts set stripe_period_start = stripe_period_start - %s::interval, "
             "stripe_paid_through = stripe_paid_through - %s::interval, "
             "stripe_paid_until = stripe_paid_until - %s::interval where id = %s",
             interval, interval, interval, w.account)


def subscription_event(w: World, status: str, *, quantity: int = 1, price: str | None = None,
                       created: int | None = None) -> dict[str, Any]:
    event = w.event("customer.subscription.updated.2025-03-31", STATUS=status, PRICE=price or w.plan_price,
                    CREATED=created or int(time.time()))
    event["data"]["object"]["items"]["data"][0]["quantity"] = quantity
    event["data"]["object"]["quantity"] = quantity
    return event


def yearly_invoice(w: World, *, seats: int = 1, invoice: str | None = None) -> dict[str, Any]:
    event = w.event("invoice.paid.2024-06-20", PERIOD_END=w.period_start + 365 * DAY,
                    INVOICE=invoice or stripe_id("in"))
    return _with_lines(event, {"price": w.plan_price, "start": w.period_start,
                               "end": w.period_start + 365 * DAY, "quantity": seats, "amount": 29000})


def refund(w: World, refunded: int, amount: int = 29000) -> dict[str, Any]:
    return w.event("charge.refunded", AMOUNT=amount, AMOUNT_REFUNDED=refunded, REFUNDED=refunded >= amount,
                   CHARGE=w.charge)


def paid_year(w: World) -> tuple[Any, ...]:
    return w.db.one("select stripe_paid_through, stripe_paid_until, stripe_quantity, stripe_paid_scale "
                    "from public.credit_accounts where id = %s", w.account)


# --- subscriptions that do not pay ------------------------------------------------------


def test_a_past_due_subscription_falls_back_to_the_free_allowance_until_it_pays(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    # The period ended a day ago and the renewal payment failed.
    time_passes(world, "31 days")
    assert deliver(subscription_event(world, "past_due")).body["outcome"] == "applied"
    daily_reset(world.db)
    balance = world.balance()
    assert balance["subscription"] == 3  # the free plan's, never the ended period's 100
    assert dt.datetime.fromisoformat(balance["period_start"]).day == 1
    # Then the customer pays: the paid period contains now and starts, the free month's credits expire.
    world.period_start = int(time.time()) - DAY
    paid = world.event("invoice.paid.2025-03-31", BILLING_REASON="subscription_cycle",
                       INVOICE=stripe_id("in"), PAYMENT_INTENT=stripe_id("pi"))
    assert deliver(paid).body["outcome"] == "applied"
    assert deliver(subscription_event(world, "active")).body["outcome"] == "applied"
    balance = world.balance()
    assert balance["subscription"] == 100
    assert int(dt.datetime.fromisoformat(balance["period_start"]).timestamp()) == world.period_start
    # Renewed by Stripe again: the reset leaves it alone.
    before = world.balance()
    daily_reset(world.db)
    assert world.balance() == before


def test_an_unpaid_checkout_never_gets_the_paid_plan_from_the_reset(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(subscription_event(world, "incomplete")).body["outcome"] == "applied"
    world.db.sql("update public.credit_accounts set plan_id = %s where id = %s", world.plan, world.account)
    time_passes(world, "32 days")  # this month's free period is over for this account
    daily_reset(world.db)
    assert world.pools() == (3, 0)


def test_an_invoice_naming_another_customers_account_changes_nothing(
        deliver: Deliver, world: World, database: Db) -> None:
    victim = make_world(database)
    link_subscription(deliver, victim)
    assert deliver(victim.event("invoice.paid.2025-03-31", PRICE=victim.big_plan_price)).status == 200
    assert victim.pools() == (500, 0)
    before = victim.balance()
    # An attacker's own (cheaper) subscription whose metadata names the victim's account.
    attack = world.event("invoice.paid.2025-03-31", SUB_ACCOUNT_ID=victim.account, ACCOUNT_ID=victim.account)
    reply = deliver(attack)
    assert (reply.status, reply.body["outcome"]) == (200, "failed")
    recorded = world.recorded(attack["id"])
    assert recorded is not None and recorded["error"]["message"] == "account_of_another_customer"
    assert victim.balance() == before


# --- yearly prices: the facts at each renewal --------------------------------------------


def test_a_yearly_subscriber_gets_the_seats_current_at_each_renewal(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(yearly_invoice(world, seats=10)).body["outcome"] == "applied"
    assert world.pools() == (1000, 0)
    # Down to 1 seat: the next month grants 1 seat's credits, not the 10 the year started with.
    assert deliver(subscription_event(world, "active", quantity=1)).body["outcome"] == "applied"
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools() == (100, 0)
    # Up to 4 seats: the month after grants 4.
    assert deliver(subscription_event(world, "active", quantity=4)).body["outcome"] == "applied"
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools() == (400, 0)
    # An older subscription event never overwrites a newer one.
    stale = subscription_event(world, "active", quantity=9, created=int(time.time()) - 3600)
    assert deliver(stale).body["outcome"] == "ignored"
    assert paid_year(world)[2] == 4


def test_a_refunded_year_renews_no_further_month(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(yearly_invoice(world)).body["outcome"] == "applied"
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools() == (100, 0)
    # A partial refund (10 %): later months shrink to 90 %.
    assert deliver(refund(world, 2900)).body["outcome"] == "applied"
    assert float(paid_year(world)[3]) == 0.9
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools()[0] == 90
    # The full refund takes this month's credits and stops the year.
    assert deliver(refund(world, 29000)).body["outcome"] == "applied"
    assert world.pools() == (0, 0)
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools() == (3, 0)  # no paid month: the free plan's calendar month, at once


def test_a_disputed_year_stops_and_a_won_dispute_resumes_it(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(yearly_invoice(world)).body["outcome"] == "applied"
    dispute = stripe_id("dp")
    opened = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=29000)
    assert deliver(opened).body["outcome"] == "applied"
    assert world.pools() == (0, 0)
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools() == (3, 0)  # no paid month while the dispute is open: the free plan's
    won = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=29000)
    won["type"] = "charge.dispute.closed"
    won["data"]["object"]["status"] = "won"
    assert deliver(won).body["outcome"] == "applied"
    # Resumed: the next anniversary month is the paid plan's again.
    time_passes(world, "1 month")
    daily_reset(world.db)
    assert world.pools()[0] == 100


def test_a_dispute_inquiry_takes_nothing(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    inquiry = world.event("charge.dispute.created", AMOUNT=2900)
    inquiry["data"]["object"]["status"] = "warning_needs_response"
    reply = deliver(inquiry)
    assert (reply.body["outcome"], world.recorded(inquiry["id"])["reason"]) == (  # type: ignore[index]
        "ignored", "dispute_inquiry")
    assert world.pools() == (100, 0)


# --- a won dispute of a plan-change payment --------------------------------------------------


def _plan_change_disputed(deliver: Deliver, w: World, order: list[str]) -> None:
    link_subscription(deliver, w)
    assert deliver(w.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    upgrade = _change(w, w.plan_price, w.big_plan_price, left=0.5)
    payment = stripe_id("pi")
    upgrade["data"]["object"]["payment_intent"] = payment
    dispute = stripe_id("dp")
    events = {"upgrade": upgrade}
    for name, status, event_type in (("opened", "needs_response", "charge.dispute.created"),
                                     ("won", "won", "charge.dispute.closed")):
        event = w.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=2500, PAYMENT_INTENT=payment,
                        CHARGE=stripe_id("ch"))
        event["type"] = event_type
        event["data"]["object"]["status"] = status
        events[name] = event
    for name in order:
        assert deliver(events[name]).status == 200


def test_a_won_dispute_of_a_plan_change_gives_back_a_grant_in_every_order(
        deliver: Deliver, database: Db) -> None:
    orders = [["upgrade", "opened", "won"], ["upgrade", "won", "opened"], ["won", "upgrade", "opened"],
              ["opened", "won", "upgrade"], ["won", "opened", "upgrade"], ["opened", "upgrade", "won"]]
    for order in orders:
        w, other = make_world(database), make_world(database)
        _plan_change_disputed(deliver, w, order)
        # Meanwhile another customer's events flow.
        assert deliver(other.event("checkout.session.completed.payment", CREDITS="5")).body["outcome"] \
            == "applied"
        database.call("release_stripe_events", p_limit=500)
        balance = w.balance()
        assert (balance["promotional"], balance["subscription"]) == (0, 300), order
        # The credits given back belong to a grant: the next promotional attribution works.
        database.call("grant_promotional_credits", p_account_id=w.account, p_amount=1,
                      p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat(),
                      p_idempotency_key=new_key())
        spent = database.call("deduct_credits", p_account_id=w.account, p_idempotency_key=new_key(),
                              p_amount=150)
        assert spent["charged"] == 150
        assert database.one("select count(*) from public.stripe_events where account_id = %s "
                            "and outcome = 'failed'", w.account) == 0, order
        assert other.pools() == (3, 5)
    assert database.call("reconcile_credit_balances")["mismatches"] == []


# --- a decrease invoiced mid-period takes back what its money bought ----------------------


def _proration(w: World, old: str, new: str, *, left: float, credited: int, charged: int) -> dict[str, Any]:
    end = w.period_start + 30 * DAY
    changed_at = int(end - left * 30 * DAY)
    event = w.event("invoice.paid.2025-03-31", BILLING_REASON="subscription_update", INVOICE=stripe_id("in"))
    span = {"proration": True, "start": changed_at, "end": end}
    return _with_lines(event, {"price": old, "amount": -credited, **span},
                       {"price": new, "amount": charged, **span})


def test_an_upgrade_then_an_immediate_downgrade_takes_the_upgrade_credits_back(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    up = _proration(world, world.plan_price, world.big_plan_price, left=0.5, credited=1450, charged=7450)
    assert deliver(up).body["outcome"] == "applied"
    assert world.balance()["subscription"] == 100 + 200  # (500 - 100) x half the period
    # Back down at once: the customer gets the upgrade's 7,450 back (and pays for the old plan again).
    down = _proration(world, world.big_plan_price, world.plan_price, left=0.5, credited=7450, charged=1450)
    reply = deliver(down)
    assert reply.body["outcome"] == "applied"
    assert world.recorded(down["id"])["reason"] == "allowance_lowered"  # type: ignore[index]
    balance = world.balance()
    assert (balance["promotional"], balance["subscription"]) == (0, 100)
    assert deliver(down).body["outcome"] == "duplicate"
    assert world.balance() == balance


def test_a_later_downgrade_takes_back_the_share_its_money_paid_and_never_below_zero(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    up = _proration(world, world.plan_price, world.big_plan_price, left=0.5, credited=1450, charged=7450)
    assert deliver(up).body["outcome"] == "applied"
    # 150 of the 200 upgrade credits are spent (the period's older grant, its allowance, goes first).
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=new_key(), p_amount=250)
    # A quarter of the period left: half the upgrade's money comes back, so half its credits (100) should.
    down = _proration(world, world.big_plan_price, world.plan_price, left=0.25, credited=3725, charged=725)
    assert deliver(down).body["outcome"] == "applied"
    result = world.recorded(down["id"])["result"]  # type: ignore[index]
    assert (result["clawed_back"], result["shortfall"]) == (50, 50)
    assert world.balance()["subscription"] == 0
    # A downgrade with no money back takes nothing.
    world2 = make_world(world.db)
    link_subscription(deliver, world2)
    assert deliver(world2.event("invoice.paid.2025-03-31", PRICE=world2.big_plan_price)).body["outcome"] \
        == "applied"
    plain = _proration(world2, world2.big_plan_price, world2.plan_price, left=0.5, credited=0, charged=0)
    assert deliver(plain).body["outcome"] == "ignored"
    assert world2.pools() == (500, 0)


# --- clawbacks take the payment's own credits ----------------------------------------------


def test_a_refund_of_an_earlier_periods_invoice_never_takes_the_current_allowance(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    december = world.event("invoice.paid.2024-06-20", PAYMENT_INTENT=stripe_id("pi"), INVOICE=stripe_id("in"))
    assert deliver(december).body["outcome"] == "applied"
    january = world.event("invoice.paid.2024-06-20", PAYMENT_INTENT=stripe_id("pi"), INVOICE=stripe_id("in"),
                          BILLING_REASON="subscription_cycle", CHARGE=stripe_id("ch"),
                          PERIOD_START=world.period_start + 30 * DAY,
                          PERIOD_END=world.period_start + 60 * DAY)
    assert deliver(january).body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    # December's payment refunded in full: its credits expired with December; January's were paid by another.
    refund_december = world.event("charge.refunded", AMOUNT=2900, AMOUNT_REFUNDED=2900, REFUNDED=True,
                                  PAYMENT_INTENT=december["data"]["object"]["payment_intent"],
                                  CHARGE=stripe_id("ch"))
    assert deliver(refund_december).body["outcome"] == "applied"
    result = world.recorded(refund_december["id"])["result"]  # type: ignore[index]
    assert (result["clawed_back"], result["shortfall"]) == (0, 100)
    assert world.pools() == (100, 0)


def _upgrade_with_its_payment(deliver: Deliver, w: World) -> str:
    link_subscription(deliver, w)
    assert deliver(w.event("invoice.paid.2024-06-20")).body["outcome"] == "applied"
    upgrade = _change(w, w.plan_price, w.big_plan_price, left=0.5, version="2024-06-20")
    payment = stripe_id("pi")
    upgrade["data"]["object"]["payment_intent"] = payment
    assert deliver(upgrade).body["outcome"] == "applied"
    assert w.balance()["subscription"] == 100 + 200  # the allowance, then the upgrade's grant
    return payment


def test_a_hold_never_shields_plan_change_credits_from_their_refund(deliver: Deliver, world: World) -> None:
    payment = _upgrade_with_its_payment(deliver, world)
    # Everything under a hold: the allowance's 100 and the upgrade's 200.
    hold = world.db.call("reserve_credits", p_account_id=world.account, p_idempotency_key=new_key(),
                         p_amount=300)
    refund_upgrade = world.event("charge.refunded", AMOUNT=2500, AMOUNT_REFUNDED=2500, REFUNDED=True,
                                 PAYMENT_INTENT=payment, CHARGE=stripe_id("ch"))
    assert deliver(refund_upgrade).body["outcome"] == "applied"
    result = world.recorded(refund_upgrade["id"])["result"]  # type: ignore[index]
    assert (result["clawed_back"], result["pending"], result["shortfall"]) == (0, 200, 0)
    # The hold ends uncaptured: the refunded credits go, they are not free again.
    world.db.call("release_hold", p_hold_id=hold["hold_id"])
    balance = world.balance()
    assert (balance["promotional"], balance["subscription"], balance["held"]) == (0, 100, 0)


def test_a_dispute_won_after_its_hold_ended_gives_back_what_the_hold_paid(
        deliver: Deliver, world: World) -> None:
    payment = _upgrade_with_its_payment(deliver, world)
    # The allowance's 100 and 150 of the upgrade's 200 under a hold.
    hold = world.db.call("reserve_credits", p_account_id=world.account, p_idempotency_key=new_key(),
                         p_amount=250)
    dispute = stripe_id("dp")
    opened = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=2500, PAYMENT_INTENT=payment,
                         CHARGE=stripe_id("ch"))
    assert deliver(opened).body["outcome"] == "applied"
    assert world.balance()["subscription"] == 250  # 50 free taken at once, 150 claimed on the hold
    world.db.call("release_hold", p_hold_id=hold["hold_id"])
    assert world.balance()["subscription"] == 100
    won = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=2500, PAYMENT_INTENT=payment,
                      CHARGE=stripe_id("ch"))
    won["type"] = "charge.dispute.closed"
    won["data"]["object"]["status"] = "won"
    assert deliver(won).body["outcome"] == "applied"
    assert world.balance()["subscription"] == 300  # all of it, into its own grant
    assert world.db.one("select remaining from public.credit_grants where account_id = %s "
                        "and source = 'plan_change'", world.account) == 200
    spent = world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=new_key(),
                          p_amount=250)
    assert (spent["from_promotional"], spent["from_subscription"]) == (0, 250)


def test_a_stripe_renewal_with_rollover_never_moves_past_spends_onto_the_rollover_grant(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2024-06-20")).body["outcome"] == "applied"
    world.db.sql("update public.credit_plans set rollover_cap = 50 where id = %s", world.plan)
    # A promotion that outlives the next period; 5 of it are spent (promotional credits go first).
    world.db.call("grant_promotional_credits", p_account_id=world.account, p_amount=10,
                  p_expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=90)).isoformat(),
                  p_idempotency_key=new_key())
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=new_key(), p_amount=5)
    # The next period: 50 unused allowance credits roll over into a grant expiring with it.
    renewal = world.event("invoice.paid.2024-06-20", INVOICE=stripe_id("in"), PAYMENT_INTENT=stripe_id("pi"),
                          BILLING_REASON="subscription_cycle", PERIOD_START=world.period_start + 30 * DAY,
                          PERIOD_END=world.period_start + 60 * DAY)
    assert deliver(renewal).body["outcome"] == "applied"
    balance = world.balance()
    assert (balance["promotional"], balance["subscription"]) == (5 + 50, 100)
    # The rollover grant's end comes: its 50 expire, the promotion keeps its own 5.
    world.db.sql("update private.grants set expires_at = now() - interval '1 second' "
                 "where account_id = %s and pool = 'promotional' and granted = 50", world.account)
    world.db.sql("update public.credit_wallets set promo_front_at = now() - interval '1 second' "
                 "where account_id = %s", world.account)
    assert world.balance()["promotional"] == 5
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=new_key(), p_amount=1)
    expired = -world.db.one("select coalesce(sum(amount), 0) from public.credit_ledger where account_id = %s "
                            "and pool = 'promotional' and type = 'expire'", world.account)
    assert (expired, world.balance()["promotional"]) == (50, 4)


def test_a_yearly_subscriber_moving_to_a_monthly_price_is_renewed_by_its_invoices(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(yearly_invoice(world)).body["outcome"] == "applied"
    time_passes(world, "400 days")  # the year is long over
    world.period_start = int(time.time()) - DAY
    monthly = world.event("invoice.paid.2025-03-31", BILLING_REASON="subscription_cycle",
                          INVOICE=stripe_id("in"))
    assert deliver(monthly).body["outcome"] == "applied"
    assert world.pools() == (100, 0)
    assert paid_year(world)[0] is None
    daily_reset(world.db)
    assert world.pools() == (100, 0)  # its invoices renew it, not the reset with the free plan


def test_a_dispute_won_after_its_period_ended_gives_nothing_into_the_next(
        deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    january = world.event("invoice.paid.2024-06-20", PAYMENT_INTENT=stripe_id("pi"), INVOICE=stripe_id("in"))
    assert deliver(january).body["outcome"] == "applied"
    dispute = stripe_id("dp")
    payment = january["data"]["object"]["payment_intent"]
    opened = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=2900, PAYMENT_INTENT=payment,
                         CHARGE=stripe_id("ch"))
    assert deliver(opened).body["outcome"] == "applied"
    assert world.pools() == (0, 0)
    february = world.event("invoice.paid.2024-06-20", PAYMENT_INTENT=stripe_id("pi"), INVOICE=stripe_id("in"),
                           BILLING_REASON="subscription_cycle", PERIOD_START=world.period_start + 30 * DAY,
                           PERIOD_END=world.period_start + 60 * DAY)
    assert deliver(february).body["outcome"] == "applied"
    won = world.event("charge.dispute.created", DISPUTE=dispute, AMOUNT=2900, PAYMENT_INTENT=payment,
                      CHARGE=stripe_id("ch"))
    won["type"] = "charge.dispute.closed"
    won["data"]["object"]["status"] = "won"
    assert deliver(won).body["outcome"] == "applied"
    # January's 100 are written back and expire with January: February keeps its own 100 only.
    assert world.pools() == (100, 0)


def test_a_refunded_pack_never_takes_another_packs_credits(deliver: Deliver, world: World) -> None:
    first = world.event("checkout.session.completed.payment", CREDITS="50", SESSION=stripe_id("cs_test"),
                        PAYMENT_INTENT=stripe_id("pi"))
    assert deliver(first).body["outcome"] == "applied"
    world.db.call("deduct_credits", p_account_id=world.account, p_idempotency_key=new_key(), p_amount=53)
    second = world.event("checkout.session.completed.payment", CREDITS="50", SESSION=stripe_id("cs_test"),
                         PAYMENT_INTENT=stripe_id("pi"))
    assert deliver(second).body["outcome"] == "applied"
    assert world.pools() == (0, 50)
    refund = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=1000, REFUNDED=True,
                         PAYMENT_INTENT=first["data"]["object"]["payment_intent"], CHARGE=stripe_id("ch"))
    assert deliver(refund).body["outcome"] == "applied"
    result = world.recorded(refund["id"])["result"]  # type: ignore[index]
    assert (result["clawed_back"], result["shortfall"]) == (0, 50)  # the first pack was spent
    assert world.pools() == (0, 50)  # the second pack's credits stay
    # Refunding the second takes its own 50.
    refund2 = world.event("charge.refunded", AMOUNT=1000, AMOUNT_REFUNDED=1000, REFUNDED=True,
                          PAYMENT_INTENT=second["data"]["object"]["payment_intent"], CHARGE=stripe_id("ch"))
    assert deliver(refund2).body["outcome"] == "applied"
    assert world.pools() == (0, 0)


def test_a_decrease_claims_what_holds_reserve_of_the_upgrade_credits(deliver: Deliver, world: World) -> None:
    link_subscription(deliver, world)
    assert deliver(world.event("invoice.paid.2025-03-31")).body["outcome"] == "applied"
    up = _proration(world, world.plan_price, world.big_plan_price, left=0.5, credited=1450, charged=7450)
    assert deliver(up).body["outcome"] == "applied"
    # The allowance's 100 and 150 of the upgrade's 200 under a hold.
    hold = world.db.call("reserve_credits", p_account_id=world.account, p_idempotency_key=new_key(),
                         p_amount=250)
    down = _proration(world, world.big_plan_price, world.plan_price, left=0.5, credited=7450, charged=1450)
    assert deliver(down).body["outcome"] == "applied"
    result = world.recorded(down["id"])["result"]  # type: ignore[index]
    assert (result["clawed_back"], result["pending"], result["shortfall"]) == (50, 150, 0)
    world.db.call("release_hold", p_hold_id=hold["hold_id"])
    balance = world.balance()
    assert (balance["promotional"], balance["subscription"], balance["held"]) == (0, 100, 0)
