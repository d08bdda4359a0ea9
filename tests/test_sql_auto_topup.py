"""Auto top-up (v3) in the database: when a top-up is due, at most one in flight,
who may set it up, and how each outcome ends it (the first report wins), through
the SQL functions as the REST layer calls them. The worker's Stripe calls are
tested against a Stripe stand-in in tests/test_auto_topup.py.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.support import Caller, Db, expect_error, new_key, select_as

PACK_CREDITS = 500


@pytest.fixture(scope="module")
def pack(database: Db) -> str:
    price = f"price_topup_{uuid.uuid4().hex[:12]}"
    database.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, %s, 'Top-up')",
                 price, PACK_CREDITS)
    return price


def customer_account(database: Db, purchased: int = 0) -> tuple[Caller, str]:
    owner, account_id = database.new_user()
    bonus = database.balance(account_id)["available"]
    if bonus:
        database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key("bonus"),
                      p_amount=bonus)
    database.sql("update public.credit_accounts set stripe_customer_id = %s where id = %s",
                 f"cus_{uuid.uuid4().hex[:14]}", account_id)
    if purchased:
        database.fund(account_id, purchased=purchased)
    return owner, account_id


def enable(database: Db, account_id: str, pack: str, threshold: int = 100, caller: Caller | None = None,
           **extra: Any) -> dict[str, Any]:
    return database.call("set_auto_topup", caller, p_account_id=account_id, p_enabled=True,
                         p_threshold=threshold, p_pack=pack, **extra)


def spend(database: Db, account_id: str, amount: int) -> dict[str, Any]:
    return database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key("s"),
                         p_amount=amount)


def topups(database: Db, account_id: str) -> list[dict[str, Any]]:
    rows = database.sql("select to_jsonb(t) from public.credit_topups t where account_id = %s"
                        " order by created_at", account_id)
    return [r[0] for r in rows]


def event_types(database: Db, account_id: str) -> list[str]:
    return [r[0] for r in database.sql(
        "select type from public.credit_events where account_id = %s order by seq", account_id)]


def record(database: Db, topup_id: str, outcome: str, **args: Any) -> dict[str, Any]:
    return database.call("record_topup_result", p_topup_id=topup_id, p_outcome=outcome, **args)


def age(database: Db, account_id: str, interval: str = "11 minutes") -> None:
    """Move an account's top-ups back in time (the cooldown is 10 minutes)."""
    database.sql("update public.credit_topups set created_at = created_at - %s::interval"
                 " where account_id = %s", interval, account_id)


def setting_status(database: Db, account_id: str) -> str:
    return str(database.one("select status from private.auto_topups where account_id = %s", account_id))


def customer_of(database: Db, account_id: str) -> str:
    return str(database.one("select stripe_customer_id from public.credit_accounts where id = %s",
                            account_id))


# --- set_auto_topup --------------------------------------------------------------------------

def test_enabling_answers_the_setting_and_starts_nothing_above_the_threshold(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=300)
    result = enable(database, account_id, pack, 100, caller=owner, p_max_per_month=2)
    assert result == {"account_id": account_id, "enabled": True, "threshold": 100, "pack": pack,
                      "max_per_month": 2, "status": "active", "this_month": 0}
    spend(database, account_id, 150)               # 150: still above
    assert topups(database, account_id) == []


@pytest.mark.parametrize(("args", "argument"), [
    ({"p_threshold": 0}, "p_threshold"),
    ({"p_threshold": PACK_CREDITS}, "p_threshold"),     # must be below the pack's credits
    ({"p_pack": "price_unknown"}, "p_pack"),
    ({"p_max_per_month": 0}, "p_max_per_month"),
    ({"p_max_per_month": 32}, "p_max_per_month"),
])
def test_bad_settings_are_invalid(database: Db, pack: str, args: dict[str, Any], argument: str) -> None:
    _, account_id = customer_account(database)
    full = {"p_account_id": account_id, "p_enabled": True, "p_threshold": 100, "p_pack": pack, **args}
    detail = expect_error(database.call, "22023", "invalid_argument", "set_auto_topup", **full)
    assert detail["argument"] == argument
    assert database.one("select count(*) from private.auto_topups where account_id = %s", account_id) == 0


def test_an_account_without_a_stripe_customer_cannot_enable(database: Db, pack: str) -> None:
    owner, account_id = database.new_user()
    detail = expect_error(enable, "22023", "invalid_argument", database, account_id, pack, caller=owner)
    assert detail["argument"] == "p_account_id"


def test_owners_enable_admins_only_disable_members_nothing(database: Db, pack: str) -> None:
    owner, _ = database.new_user()
    admin, _ = database.new_user()
    member, _ = database.new_user()
    _, account_id = database.new_tenant({owner.user_id: "owner", admin.user_id: "admin",  # type: ignore[dict-item]
                                         member.user_id: "member"})  # type: ignore[dict-item]
    database.sql("update public.credit_accounts set stripe_customer_id = %s where id = %s",
                 f"cus_{uuid.uuid4().hex[:14]}", account_id)
    expect_error(enable, "PT403", "forbidden", database, account_id, pack, caller=admin)
    expect_error(enable, "PT403", "forbidden", database, account_id, pack, caller=member)
    assert enable(database, account_id, pack, caller=owner)["status"] == "active"
    expect_error(database.call, "PT403", "forbidden", "set_auto_topup", member, p_account_id=account_id,
                 p_enabled=False)
    off = database.call("set_auto_topup", admin, p_account_id=account_id, p_enabled=False)
    assert (off["enabled"], off["status"]) == (False, "disabled")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        database.call("set_auto_topup", Caller.anon(), p_account_id=account_id, p_enabled=False)


# --- when a top-up starts ---------------------------------------------------------------------

def test_a_spend_below_the_threshold_starts_one_top_up(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=300)
    enable(database, account_id, pack, 100, caller=owner)
    spend(database, account_id, 250)               # 50 < 100
    spend(database, account_id, 10)                # in flight: no second
    [topup] = topups(database, account_id)
    assert (topup["status"], topup["credits"], topup["pack"]) == ("pending", PACK_CREDITS, pack)
    # Readable by the account's owner, not by others.
    stranger, _ = database.new_user()
    query = "select id from public.credit_topups where account_id = %s"
    assert select_as(database, owner, query, account_id) == [{"id": uuid.UUID(topup["id"])}]
    assert select_as(database, stranger, query, account_id) == []


def test_a_reserve_that_lowers_available_starts_one_but_a_purchase_that_stays_below_does_not(
        database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=40)
    enable(database, account_id, pack, 100, caller=owner)       # already below: nothing lowered it yet
    database.fund(account_id, purchased=10)                     # raises available: no top-up
    assert topups(database, account_id) == []
    database.call("reserve_credits", p_account_id=account_id, p_idempotency_key=new_key("h"), p_amount=5)
    assert len(topups(database, account_id)) == 1


def test_fifty_concurrent_spends_start_exactly_one(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=600)
    enable(database, account_id, pack, 450, caller=owner)
    barrier = threading.Barrier(50)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with database.connect() as conn:
                barrier.wait()
                db.call_function(conn, "deduct_credits", {
                    "p_account_id": account_id, "p_idempotency_key": new_key("race"), "p_amount": 5})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert database.balance(account_id)["available"] == 350
    assert [t["status"] for t in topups(database, account_id)] == ["pending"]


def test_the_cooldown_and_the_monthly_cap(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=1000)
    enable(database, account_id, pack, 100, caller=owner, p_max_per_month=2)
    spend(database, account_id, 950)
    [first] = topups(database, account_id)
    record(database, first["id"], "failed", p_reason="card_declined")
    spend(database, account_id, 1)                              # within 10 minutes: nothing
    assert len(topups(database, account_id)) == 1
    age(database, account_id)
    spend(database, account_id, 1)
    second = topups(database, account_id)[-1]
    assert second["status"] == "pending"
    record(database, second["id"], "failed", p_reason="card_declined")
    age(database, account_id)
    spend(database, account_id, 1)                              # the cap (2 this month) holds
    assert len(topups(database, account_id)) == 2
    assert database.call("set_auto_topup", owner, p_account_id=account_id, p_enabled=True)["this_month"] == 2


def test_claim_starts_top_ups_for_accounts_still_due_and_leases_each_once(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database, purchased=200)
    enable(database, account_id, pack, 100, caller=owner)
    spend(database, account_id, 150)
    [first] = topups(database, account_id)
    record(database, first["id"], "failed", p_reason="card_declined")
    age(database, account_id)                                   # nobody spends any more
    claimed = [t for t in database.call("claim_topups") if t["account_id"] == account_id]
    assert len(claimed) == 1 and claimed[0]["topup_id"] != first["id"]
    assert claimed[0]["customer"].startswith("cus_")
    assert [t for t in database.call("claim_topups") if t["account_id"] == account_id] == []   # leased


# --- outcomes ---------------------------------------------------------------------------------

def pending(database: Db, pack: str, threshold: int = 100) -> tuple[Caller, str, str]:
    owner, account_id = customer_account(database, purchased=threshold + 50)
    enable(database, account_id, pack, threshold, caller=owner)
    spend(database, account_id, 100)
    [topup] = topups(database, account_id)
    return owner, account_id, topup["id"]


def test_success_grants_the_pack_once_whoever_reports_it(database: Db, pack: str) -> None:
    _, account_id, topup_id = pending(database, pack)
    first = record(database, topup_id, "succeeded", p_payment_intent="pi_first")
    again = record(database, topup_id, "succeeded", p_payment_intent="pi_first")
    late_failure = record(database, topup_id, "failed", p_reason="card_declined")
    assert (first["status"], first["replayed"]) == ("succeeded", False)
    assert again["replayed"] is True and late_failure["replayed"] is True
    assert database.balance(account_id)["available"] == 50 + PACK_CREDITS
    rows = database.sql("select idempotency_key, purchased, stripe_ref from public.credit_transactions"
                        " where account_id = %s and kind = 'purchase' and idempotency_key like 'topup:%%'",
                        account_id)
    assert rows == [(f"topup:{topup_id}", PACK_CREDITS, "pi_first")]
    grant = database.one("select source from public.credit_grants"
                         " where account_id = %s and stripe_ref = 'pi_first'", account_id)
    assert grant == "topup"
    assert event_types(database, account_id)[-1] == "topup.succeeded"


def test_three_failures_in_a_row_disable_and_a_success_resets_the_count(database: Db, pack: str) -> None:
    owner, account_id, topup_id = pending(database, pack)
    record(database, topup_id, "failed", p_reason="card_declined")
    for _ in range(2):
        age(database, account_id)
        spend(database, account_id, 1)
        record(database, topups(database, account_id)[-1]["id"], "failed", p_reason="card_declined")
    assert event_types(database, account_id)[-4:] == ["topup.failed", "topup.failed", "topup.failed",
                                                      "topup.disabled"]
    age(database, account_id)
    spend(database, account_id, 1)
    assert len(topups(database, account_id)) == 3                 # disabled: nothing more
    # Enabling again clears it.
    assert enable(database, account_id, pack, caller=owner)["status"] == "active"
    age(database, account_id)
    spend(database, account_id, 1)
    assert topups(database, account_id)[-1]["status"] == "pending"


def test_action_required_pauses_until_the_owner_enables_again(database: Db, pack: str) -> None:
    owner, account_id, topup_id = pending(database, pack)
    result = record(database, topup_id, "action_required", p_payment_intent="pi_3ds")
    assert result["status"] == "action_required"
    assert setting_status(database, account_id) == "paused"
    assert event_types(database, account_id)[-1] == "topup.action_required"
    age(database, account_id)
    spend(database, account_id, 1)
    assert len(topups(database, account_id)) == 1
    assert enable(database, account_id, pack, caller=owner)["status"] == "active"


def test_no_stripe_key_fails_and_disables(database: Db, pack: str) -> None:
    _, account_id, topup_id = pending(database, pack)
    assert record(database, topup_id, "not_configured")["status"] == "failed"
    assert database.one("select (status, reason) from private.auto_topups where account_id = %s",
                        account_id) == ("disabled", "not_configured")
    assert event_types(database, account_id)[-2:] == ["topup.failed", "topup.disabled"]


def test_retry_keeps_it_pending_and_leasable(database: Db, pack: str) -> None:
    _, account_id, topup_id = pending(database, pack)
    [claimed] = [t for t in database.call("claim_topups") if t["account_id"] == account_id]
    assert record(database, topup_id, "retry", p_reason="connection error")["status"] == "pending"
    [again] = [t for t in database.call("claim_topups") if t["account_id"] == account_id]
    assert (again["topup_id"], again["attempts"]) == (claimed["topup_id"], 2)


def test_a_refund_on_the_account_pauses_auto_top_up(database: Db, pack: str) -> None:
    owner, account_id = customer_account(database)
    database.call("add_purchased_credits", p_account_id=account_id, p_amount=300, p_idempotency_key=new_key(),
                  p_stripe_ref="pi_refunded")
    enable(database, account_id, pack, 100, caller=owner)
    database.call("clawback_credits", p_stripe_ref="pi_refunded", p_idempotency_key=new_key(), p_amount=10,
                  p_reason="refund")
    assert setting_status(database, account_id) == "paused"
    assert event_types(database, account_id)[-1] == "topup.paused"
    spend(database, account_id, 250)                            # below, but paused
    assert topups(database, account_id) == []


def test_worker_functions_are_service_only(database: Db, pack: str) -> None:
    owner, _, topup_id = pending(database, pack)
    for fn, args in (("claim_topups", {}), ("record_topup_result", {"p_topup_id": topup_id,
                                                                    "p_outcome": "succeeded"})):
        for caller in (owner, Caller.anon()):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                database.call(fn, caller, **args)
    expect_error(record, "PT404", "topup_not_found", database, str(uuid.uuid4()), "failed")
    detail = expect_error(record, "22023", "invalid_argument", database, topup_id, "maybe")
    assert detail["argument"] == "p_outcome"


# --- the webhook's payment_intent events --------------------------------------------------------

def stripe_event(database: Db, event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}", p_type=event_type,
                         p_payload=payload)


def test_payment_intent_events_report_only_for_the_customers_own_top_up(database: Db, pack: str) -> None:
    _, account_id, topup_id = pending(database, pack)
    customer = customer_of(database, account_id)
    _, other = customer_account(database)
    other_customer = customer_of(database, other)
    base = {"payment_intent": "pi_hook", "topup_id": topup_id, "status": "succeeded"}
    # Another customer's event naming this top-up, and an event that is no top-up, change nothing.
    result = stripe_event(database, "payment_intent.succeeded", {**base, "customer": other_customer})
    assert (result["outcome"], result["reason"]) == ("ignored", "unknown_topup")
    result = stripe_event(database, "payment_intent.succeeded",
                          {"payment_intent": "pi_x", "customer": customer})
    assert (result["outcome"], result["reason"]) == ("ignored", "not_a_topup")
    assert topups(database, account_id)[0]["status"] == "pending"
    # The customer's own: granted once, and the worker's later report replays.
    result = stripe_event(database, "payment_intent.succeeded", {**base, "customer": customer})
    assert result["outcome"] == "applied"
    assert record(database, topup_id, "succeeded", p_payment_intent="pi_hook")["replayed"] is True
    assert database.balance(account_id)["available"] == 50 + PACK_CREDITS


def test_a_failed_payment_intent_with_authentication_required_pauses(database: Db, pack: str) -> None:
    _, account_id, topup_id = pending(database, pack)
    customer = customer_of(database, account_id)
    result = stripe_event(database, "payment_intent.payment_failed",
                          {"payment_intent": "pi_auth", "customer": customer, "topup_id": topup_id,
                           "error_code": "authentication_required"})
    assert result["outcome"] == "applied"
    assert topups(database, account_id)[0]["status"] == "action_required"
    assert setting_status(database, account_id) == "paused"


def test_pausing_or_disabling_cancels_a_top_up_the_worker_has_not_started(database: Db, pack: str) -> None:
    owner, account_id, topup_id = pending(database, pack)
    database.call("set_auto_topup", owner, p_account_id=account_id, p_enabled=False)
    [topup] = topups(database, account_id)
    assert (topup["status"], topup["reason"]) == ("failed", "cancelled")
    assert [t for t in database.call("claim_topups") if t["account_id"] == account_id] == []
    assert database.balance(account_id)["available"] == 50
    # One the worker already sent to Stripe runs its course: its success still grants.
    enable(database, account_id, pack, caller=owner)
    age(database, account_id)
    spend(database, account_id, 1)
    [claimed] = [t for t in database.call("claim_topups") if t["account_id"] == account_id]
    database.call("set_auto_topup", owner, p_account_id=account_id, p_enabled=False)
    assert record(database, claimed["topup_id"], "succeeded", p_payment_intent="pi_late")["replayed"] is False
    assert database.balance(account_id)["available"] == 49 + PACK_CREDITS
    assert topup_id != claimed["topup_id"]
