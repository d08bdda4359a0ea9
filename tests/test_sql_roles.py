"""Who may do what: every contract function, table and view, for every kind of caller.

Callers: anon; an authenticated token without ``sub``; the account's user;
another user; a tenant's member, admin and owner (on the tenant's account); a
super admin (``app_metadata.role``); a user who merely *claims* super admin in
``user_metadata``; and service_role. A refusal is 42501 (the role lacks
EXECUTE or a table privilege) or PT403 ``forbidden`` (the role may call, the
account is not theirs), and leaves balances, holds, keys, ledger and
transaction rows exactly as they were.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.sql_access import as_caller, expect_error, no_sub_caller
from tests.support import Caller, Db

READ = "read"        # get_credit_balance: the account's readers
SPEND = "spend"      # the account's spenders
SERVICE = "service"  # service_role only


@dataclass(frozen=True)
class World:
    personal: str        # the personal account of `self`
    tenant_id: str
    tenant_account: str
    callers: dict[str, tuple[Caller, str]]  # name -> (caller, account it acts on)


@pytest.fixture(scope="module")
def world(database: Db) -> World:
    me, personal = database.new_user()
    other, _ = database.new_user()
    member, _ = database.new_user()
    admin, _ = database.new_user()
    owner, _ = database.new_user()
    super_admin, _ = database.new_user(app_metadata={"role": "super_admin"})
    fake_super, _ = database.new_user(user_metadata={"role": "super_admin"})
    tenant_id, tenant_account = database.new_tenant(
        {member.user_id: "member", admin.user_id: "admin", owner.user_id: "owner"})  # type: ignore[dict-item]
    for account in (personal, tenant_account):
        database.fund(account, purchased=1000)
        # Rows in every per-account table, so visibility checks see something.
        database.call("deduct_credits", p_account_id=account, p_idempotency_key=f"seed-{uuid.uuid4()}",
                      p_amount=1, p_model="m")
        database.call("reserve_credits", p_account_id=account, p_idempotency_key=f"seed-{uuid.uuid4()}",
                      p_amount=1, p_ttl_seconds=86400)
        database.call("create_license_key", p_account_id=account, p_name="seed")
        database.call("grant_promotional_credits", p_account_id=account, p_amount=1,
                      p_expires_at="2999-01-01T00:00:00Z", p_idempotency_key=f"seed-{uuid.uuid4()}")
    return World(personal, tenant_id, tenant_account, {
        "anon": (Caller.anon(), personal),
        "no_sub": (no_sub_caller(), personal),
        "self": (me, personal),
        "other_user": (other, personal),
        "tenant_member": (member, tenant_account),
        "tenant_admin": (admin, tenant_account),
        "tenant_owner": (owner, tenant_account),
        "super_admin": (super_admin, personal),
        "user_metadata_super_admin": (fake_super, personal),
        "service": (Caller.service(), personal),
    })


ALLOWED = {
    READ: {"self", "tenant_member", "tenant_admin", "tenant_owner", "super_admin", "service"},
    SPEND: {"self", "tenant_admin", "tenant_owner", "service"},
    SERVICE: {"service"},
}


def key() -> str:
    return f"roles-{uuid.uuid4()}"


def _hold(db: Db, account: str) -> str:
    return db.call("reserve_credits", p_account_id=account, p_idempotency_key=key(), p_amount=1)["hold_id"]


def _license(db: Db, account: str) -> dict[str, Any]:
    return db.call("create_license_key", p_account_id=account, p_name="matrix")


def _spend_tx(db: Db, account: str) -> str:
    result = db.call("deduct_credits", p_account_id=account, p_idempotency_key=key(), p_amount=2)
    return result["transaction_id"]


def _stripe_ref(db: Db, account: str) -> str:
    ref = f"pi_roles_{uuid.uuid4().hex}"
    db.call("add_purchased_credits", p_account_id=account, p_amount=5, p_idempotency_key=key(),
            p_stripe_ref=ref)
    return ref


def _subscription_args(db: Db, account: str) -> dict[str, Any]:
    # The account's own current period: a valid grant that moves no period.
    start, end = db.one("select period_start, period_end from public.credit_wallets where account_id = %s",
                        account)
    return {"p_account_id": account, "p_amount": 4, "p_period_start": start.isoformat(),
            "p_period_end": end.isoformat(), "p_idempotency_key": key()}


def _amount_args(db: Db, account: str) -> dict[str, Any]:
    return {"p_account_id": account, "p_idempotency_key": key(), "p_amount": 1}


# name -> (who may call, prepare(db, account) -> arguments, result keys on success)
Prepare = Callable[[Db, str], dict[str, Any]]
FUNCTIONS: dict[str, tuple[str, Prepare, set[str]]] = {
    "get_credit_balance": (READ, lambda db, a: {"p_account_id": a}, {"account_id", "available", "held"}),
    "deduct_credits": (SPEND, _amount_args, {"transaction_id", "charged", "balance"}),
    "reserve_credits": (SPEND, _amount_args, {"hold_id", "expires_at", "balance"}),
    "capture_hold": (SPEND, lambda db, a: {"p_hold_id": _hold(db, a)},
                     {"transaction_id", "charged", "released"}),
    "release_hold": (SPEND, lambda db, a: {"p_hold_id": _hold(db, a)}, {"hold_id", "released", "balance"}),
    "create_license_key": (SPEND, lambda db, a: {"p_account_id": a, "p_name": "k"},
                           {"key_id", "key", "prefix", "expires_at"}),
    "revoke_license_key": (SPEND, lambda db, a: {"p_key_id": _license(db, a)["key_id"]},
                           {"key_id", "revoked_at"}),
    "deduct_credits_by_license": (
        SERVICE,
        lambda db, a: {"p_license_key": _license(db, a)["key"], "p_idempotency_key": key(), "p_amount": 1},
        {"transaction_id", "charged", "balance"}),
    "add_purchased_credits": (
        SERVICE, lambda db, a: {"p_account_id": a, "p_amount": 5, "p_idempotency_key": key()},
        {"transaction_id", "added", "balance"}),
    "add_subscription_credits": (SERVICE, _subscription_args, {"expired", "granted", "balance"}),
    "expire_subscription_credits": (SERVICE, lambda db, a: {"p_account_id": a, "p_idempotency_key": key()},
                                    {"expired", "balance"}),
    "refund_credits": (
        SERVICE, lambda db, a: {"p_transaction_id": _spend_tx(db, a), "p_idempotency_key": key()},
        {"transaction_id", "refunded", "balance"}),
    "clawback_credits": (
        SERVICE, lambda db, a: {"p_stripe_ref": _stripe_ref(db, a), "p_idempotency_key": key()},
        {"clawed_back", "shortfall", "balance"}),
    "grant_promotional_credits": (
        SERVICE, lambda db, a: {"p_account_id": a, "p_amount": 2, "p_expires_at": "2999-01-01T00:00:00Z",
                                "p_idempotency_key": key()},
        {"transaction_id", "granted", "expires_at", "balance"}),
    "admin_adjust_credits": (
        SERVICE, lambda db, a: {"p_account_id": a, "p_pool": "purchased", "p_amount": 3, "p_reason": "matrix",
                                "p_idempotency_key": key()},
        {"transaction_id", "balance"}),
    # A batch after the last possible id: a real, complete call that renews nobody.
    "run_monthly_reset": (SERVICE, lambda db, a: {"p_period_start": "2026-01-01",
                                                  "p_after": "ffffffff-ffff-ffff-ffff-ffffffffffff"},
                          {"processed", "next_after", "done"}),
    "reconcile_credit_balances": (SERVICE, lambda db, a: {}, {"checked", "mismatches"}),
    "estimate_cost": (SPEND, lambda db, a: {"p_account_id": a, "p_amount": 1},
                      {"cost", "available", "affordable", "max_output_tokens", "limit_remaining"}),
    "extend_hold": (SPEND, lambda db, a: {"p_hold_id": _hold(db, a), "p_idempotency_key": key(),
                                          "p_ttl_seconds": 60},
                    {"hold_id", "amount", "expires_at", "balance"}),
    # Removing a limit that is not there: a complete call that leaves the world as it is.
    "set_spend_limit": (SPEND, lambda db, a: {"p_account_id": a, "p_subject": "default_member",
                                              "p_limit": None, "p_period": "day"},
                        {"account_id", "subject", "subject_id", "limit", "period", "spent", "held",
                         "resets_at"}),
    # The same alert each time: a complete call that adds at most one alert.
    "set_balance_alert": (SPEND, lambda db, a: {"p_account_id": a, "p_threshold": 999, "p_rearm_at": 2000},
                          {"account_id", "threshold", "rearm_at", "armed"}),
    "sweep_credit_accounts": (SERVICE, lambda db, a: {"p_limit": 1}, {"swept"}),
    "get_credit_usage": (READ, lambda db, a: {"p_account_id": a},
                         {"account_id", "from", "to", "bin", "rows", "total"}),
    "roll_up_credit_usage": (SERVICE, lambda db, a: {}, {"rolled_until", "rows", "batches"}),
    # Disabling (what a tenant admin may do too): a complete call that changes nothing here.
    "set_auto_topup": (SPEND, lambda db, a: {"p_account_id": a, "p_enabled": False},
                       {"account_id", "enabled", "status", "this_month"}),
}

CALLER_NAMES = ["anon", "no_sub", "self", "other_user", "tenant_member", "tenant_admin", "tenant_owner",
                "super_admin", "user_metadata_super_admin", "service"]


def snapshot(db: Db, account: str) -> tuple:
    """Everything a refused call must leave untouched on an account."""
    return db.one(
        """
        select to_jsonb(w),
               (select count(*) from public.credit_ledger l where l.account_id = w.account_id),
               (select count(*) from public.credit_transactions t where t.account_id = w.account_id),
               (select jsonb_object_agg(h.id, h.status) from public.credit_holds h
                 where h.account_id = w.account_id),
               (select count(*) from private.grants g where g.account_id = w.account_id),
               (select count(*) from public.credit_license_keys k where k.account_id = w.account_id),
               (select count(*) from public.credit_license_keys k
                 where k.account_id = w.account_id and k.revoked_at is null)
          from public.credit_wallets w where w.account_id = %s
        """,
        account,
    )


def test_the_matrix_covers_every_contract_function(database: Db) -> None:
    # A new public function must be added here (or to the catalog's service-only rule).
    names = {r[0] for r in database.sql(
        "select p.proname from pg_proc p where p.pronamespace = 'public'::regnamespace")}
    assert set(FUNCTIONS) <= names
    # The webhook's and notify's delivery functions (service-only by the catalog's
    # rule; their calls need a Stripe event or a credit event: their own tests).
    assert names - set(FUNCTIONS) <= {"handle_stripe_event", "release_stripe_events", "claim_credit_events",
                                      "record_credit_event_delivery", "list_credit_events",
                                      "resend_credit_event", "claim_topups", "record_topup_result"}


@pytest.mark.parametrize("caller_name", CALLER_NAMES)
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_function_access(database: Db, world: World, fn: str, caller_name: str) -> None:
    who, prepare, result_keys = FUNCTIONS[fn]
    caller, account = world.callers[caller_name]
    args = prepare(database, account)
    before = snapshot(database, account)
    if caller_name in ALLOWED[who]:
        result = database.call(fn, caller, **args)
        assert result_keys <= set(result), result
        if "replayed" in result:
            assert result["replayed"] is False
        return
    if caller_name == "anon" or who == SERVICE:
        # The role itself may not execute the function.
        err = expect_error(lambda: database.call(fn, caller, **args), "42501")
        assert "permission denied for function" in err.diag.message_primary
    else:
        expect_error(lambda: database.call(fn, caller, **args), "PT403", "forbidden")
    assert snapshot(database, account) == before


def test_super_admin_reads_every_account_but_user_metadata_never_counts(database: Db, world: World) -> None:
    super_admin, _ = world.callers["super_admin"]
    fake, _ = world.callers["user_metadata_super_admin"]
    assert database.call("get_credit_balance", super_admin,
                         p_account_id=world.tenant_account)["account_id"] == world.tenant_account
    expect_error(lambda: database.call("get_credit_balance", fake, p_account_id=world.tenant_account),
                 "PT403", "forbidden")
    # Both have their own account, read with no argument.
    for caller in (super_admin, fake):
        own = database.one("select id from public.credit_accounts where user_id = %s", caller.user_id)
        assert database.call("get_credit_balance", caller)["account_id"] == str(own)


def test_no_sub_claim_fails_closed(database: Db, world: World) -> None:
    caller = no_sub_caller()
    expect_error(lambda: database.call("get_credit_balance", caller), "PT403", "forbidden")
    for table in ("credit_accounts", "credit_balances", "credit_ledger", "credit_transactions", "tenants"):
        assert as_caller(database.conn, caller, f"select * from public.{table}") == [], table


def test_anon_cannot_call_balance_even_without_an_account_id(database: Db) -> None:
    expect_error(lambda: database.call("get_credit_balance", Caller.anon()), "42501")


# --- tables and views: reads ------------------------------------------------

# table -> query returning the account (or tenant) ids it shows among the world's
PER_ACCOUNT = {
    "credit_accounts": "select id from public.credit_accounts",
    "credit_balances": "select account_id from public.credit_balances",
    "credit_pool_usage": "select account_id from public.credit_pool_usage",
    "credit_usage": "select account_id from public.credit_usage",
    "credit_transactions": "select account_id from public.credit_transactions",
    "credit_ledger": "select account_id from public.credit_ledger",
    "credit_wallets": "select account_id from public.credit_wallets",
    "credit_grants": "select account_id from public.credit_grants",
    "credit_holds": "select account_id from public.credit_holds",
    "credit_license_keys": "select account_id from public.credit_license_keys",
    "tenants": "select id from public.tenants",
    "tenant_members": "select tenant_id from public.tenant_members",
}
# Ledger and usage rows: a plain member of a tenant reads only those of their own spends.
OWN_SPENDS_ONLY = {"credit_transactions", "credit_ledger", "credit_usage", "credit_pool_usage"}
SEES = {
    "no_sub": set(), "self": {"P"}, "other_user": set(),
    "tenant_member": {"T"}, "tenant_admin": {"T"}, "tenant_owner": {"T"},
    "super_admin": {"P", "T"}, "user_metadata_super_admin": set(), "service": {"P", "T"},
}


@pytest.mark.parametrize("caller_name", CALLER_NAMES)
@pytest.mark.parametrize("table", list(PER_ACCOUNT))
def test_row_visibility(database: Db, world: World, table: str, caller_name: str) -> None:
    caller, _ = world.callers[caller_name]
    query = PER_ACCOUNT[table]
    if caller_name == "anon":
        expect_error(lambda: as_caller(database.conn, caller, query), "42501")
        return
    labels = {world.personal: "P", world.tenant_account: "T", world.tenant_id: "T"}
    seen = {labels[str(r[0])] for r in as_caller(database.conn, caller, query) if str(r[0]) in labels}
    expected = SEES[caller_name]
    if caller_name == "tenant_member" and table in OWN_SPENDS_ONLY:
        expected = set()  # a plain member reads only the rows of their own spends (this one made none)
    if table in ("tenants", "tenant_members"):
        expected = expected & {"T"}
    assert seen == expected


def test_members_see_the_whole_member_list_of_their_tenant(database: Db, world: World) -> None:
    member, _ = world.callers["tenant_member"]
    rows = as_caller(database.conn, member,
                     "select user_id, role from public.tenant_members where tenant_id = %s", world.tenant_id)
    assert sorted(r[1] for r in rows) == ["admin", "member", "owner"]


def test_license_key_hashes_stay_server_side(database: Db, world: World) -> None:
    me, _ = world.callers["self"]
    for columns in ("key_hash", "*"):
        query = f"select {columns} from public.credit_license_keys"
        expect_error(lambda q=query: as_caller(database.conn, me, q), "42501")
    assert as_caller(database.conn, me, "select name, prefix from public.credit_license_keys")
    assert as_caller(database.conn, Caller.service(),
                     "select key_hash from public.credit_license_keys where account_id = %s", world.personal)


@pytest.fixture(scope="module")
def catalog_rows(database: Db) -> None:
    suffix = uuid.uuid4().hex[:12]
    database.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, 10, 'p')",
                 f"price_roles_{suffix}")
    database.sql("insert into public.credit_prices (operation, credits) values (%s, 1)", f"roles.{suffix}")


@pytest.mark.usefixtures("catalog_rows")
@pytest.mark.parametrize("table", ["credit_plans", "credit_packs", "credit_prices"])
def test_catalog_is_readable_by_everyone_signed_in_not_anon(database: Db, world: World, table: str) -> None:
    everything = database.one(f"select count(*) from public.{table}")
    assert everything > 0
    for name in ("self", "other_user", "tenant_member", "no_sub", "service"):
        caller, _ = world.callers[name]
        seen = as_caller(database.conn, caller, f"select count(*) from public.{table}")
        assert seen == [(everything,)], name
    expect_error(lambda: as_caller(database.conn, Caller.anon(), f"select * from public.{table}"), "42501")


# --- tables and views: writes -----------------------------------------------

VIEWS = ("credit_balances", "credit_pool_usage", "credit_usage", "credit_ledger", "credit_grants")
RELATIONS = [*PER_ACCOUNT, "credit_plans", "credit_packs", "credit_prices", "stripe_events"]


def _qualified(relation: str) -> str:
    return relation if "." in relation else f"public.{relation}"


def _first_column(db: Db, relation: str) -> str:
    return str(db.one("select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
                      "and attidentity = '' and attgenerated = '' order by attnum limit 1",
                      _qualified(relation)))


def _writes(db: Db, relation: str) -> dict[str, str]:
    col = _first_column(db, relation)
    name = _qualified(relation)
    return {
        "insert": f"insert into {name} default values",
        "update": f"update {name} set {col} = {col}",
        "delete": f"delete from {name}",
        "truncate": f"truncate {name}",
    }


@pytest.mark.parametrize("caller_name", ["anon", "self", "tenant_owner", "super_admin"])
@pytest.mark.parametrize("relation", RELATIONS)
def test_api_users_write_no_table_or_view(database: Db, world: World, relation: str,
                                          caller_name: str) -> None:
    caller, _ = world.callers[caller_name]
    count = database.one(f"select count(*) from public.{relation}")
    for action, statement in _writes(database, relation).items():
        if action == "truncate" and relation in VIEWS:
            continue  # a view cannot be truncated at all
        if relation in VIEWS:
            # PostgreSQL reports a non-updatable view before the privilege;
            # the catalog checks prove the privilege is missing too.
            with pytest.raises(psycopg.Error) as info:
                as_caller(database.conn, caller, statement)
            assert info.value.sqlstate in ("42501", "55000"), (action, info.value.sqlstate)
            continue
        err = expect_error(lambda s=statement: as_caller(database.conn, caller, s), "42501")
        assert "permission denied" in err.diag.message_primary, (action, err.diag.message_primary)
    assert database.one(f"select count(*) from public.{relation}") == count


@pytest.mark.parametrize("relation", ["credit_transactions", "credit_wallets", "credit_holds",
                                      "private.grants"])
def test_service_role_cannot_rewrite_the_books(database: Db, world: World, relation: str) -> None:
    service = Caller.service()
    fingerprint = (f"select count(*), md5(string_agg(t::text, ',' order by t::text)) "
                   f"from {_qualified(relation)} t")
    before = database.one(fingerprint)
    for statement in _writes(database, relation).values():
        expect_error(lambda s=statement: as_caller(database.conn, service, s), "42501")
    assert database.one(fingerprint) == before


@pytest.mark.parametrize("view", ["credit_balances", "credit_pool_usage", "credit_usage", "credit_ledger",
                                  "credit_grants"])
def test_service_role_cannot_write_through_the_views(database: Db, world: World, view: str) -> None:
    before = snapshot(database, world.personal)
    col = _first_column(database, view)
    for statement in (f"update public.{view} set {col} = {col}", f"delete from public.{view}"):
        with pytest.raises(psycopg.Error):
            as_caller(database.conn, Caller.service(), statement)
    assert snapshot(database, world.personal) == before


def test_service_role_changes_plans_never_balances(database: Db, world: World) -> None:
    service = Caller.service()
    before = snapshot(database, world.personal)
    for column in ("stripe_customer_id", "stripe_subscription_id", "subscription_status", "user_id"):
        statement = f"update public.credit_accounts set {column} = {column} where id = %s"
        expect_error(lambda s=statement: as_caller(database.conn, service, s, world.personal), "42501")
    for column in ("subscription", "purchased", "held_purchased", "period_start"):
        statement = f"update public.credit_wallets set {column} = {column} where account_id = %s"
        expect_error(lambda s=statement: as_caller(database.conn, service, s, world.personal), "42501")
    expect_error(lambda: as_caller(database.conn, service, "delete from public.credit_accounts where id = %s",
                                   world.personal), "42501")
    assert snapshot(database, world.personal) == before
    database.sql("insert into public.credit_plans (id, monthly_credits) values ('roles_plan', 7) "
                 "on conflict (id) do nothing")
    move = "update public.credit_accounts set plan_id = %s where id = %s"
    as_caller(database.conn, service, move, "roles_plan", world.personal)
    plan = database.one("select plan_id from public.credit_accounts where id = %s", world.personal)
    assert plan == "roles_plan"
    assert snapshot(database, world.personal) == before
    as_caller(database.conn, service, move, "free", world.personal)


def test_service_role_maintains_the_catalog(database: Db) -> None:
    service = Caller.service()
    price = f"price_roles_{uuid.uuid4().hex}"
    as_caller(database.conn, service,
              "insert into public.credit_packs (stripe_price_id, credits) values (%s, 50)", price)
    as_caller(database.conn, service,
              "update public.credit_packs set credits = 60 where stripe_price_id = %s", price)
    assert database.one("select credits from public.credit_packs where stripe_price_id = %s", price) == 60
    as_caller(database.conn, service, "delete from public.credit_packs where stripe_price_id = %s", price)
    assert database.sql("select 1 from public.credit_packs where stripe_price_id = %s", price) == []
    expect_error(lambda: as_caller(database.conn, service, "truncate public.credit_packs"), "42501")


def test_claims_cannot_promote_an_authenticated_request(database: Db, world: World) -> None:
    # What decides is the database role the REST layer switched to, never a
    # claim in the token: a user token claiming service_role stays a user.
    me, account = world.callers["self"]
    forged = Caller("authenticated", {**me.claims, "role": "service_role",
                                      "app_metadata": {"role": "service_role"}})
    before = snapshot(database, world.tenant_account)
    expect_error(lambda: database.call("add_purchased_credits", forged, p_account_id=account, p_amount=5,
                                       p_idempotency_key=key()), "42501")
    expect_error(lambda: database.call("deduct_credits", forged, p_account_id=world.tenant_account,
                                       p_idempotency_key=key(), p_amount=1), "PT403", "forbidden")
    expect_error(lambda: database.call("get_credit_balance", forged, p_account_id=world.tenant_account),
                 "PT403", "forbidden")
    assert snapshot(database, world.tenant_account) == before
    assert {str(r[0]) for r in as_caller(database.conn, forged, "select id from public.credit_accounts")} == {
        account}
