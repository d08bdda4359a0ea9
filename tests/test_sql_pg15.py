"""The migrations and the seed on PostgreSQL 15, the oldest version we support.

Supabase projects still run PostgreSQL 15, which lacks some of what the
embedded server (18) has, e.g. OLD/NEW in RETURNING. When the server binaries
are installed (Debian's ``postgresql-15`` package, or ``PG15_BIN``), this
module makes a throwaway cluster on a Unix socket, prepares a database exactly
as the other tests do, and runs the main calls on it; otherwise it is skipped
with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from devstack import db
from tests.sql_access import as_caller, expect_error
from tests.support import Caller, Db

PG15_BIN = Path(os.environ.get("PG15_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"  # Debian's server binaries refuse to run as root

# From supabase/seed.sql.
ALICE = "11111111-1111-4111-8111-111111111111"
BOB = "22222222-2222-4222-8222-222222222222"
PLATFORM_ADMIN = "33333333-3333-4333-8333-333333333333"
ACME = "44444444-4444-4444-8444-444444444444"


def _server_command(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *args]
    return args


def _run(args: list[str], log: Path | None = None) -> None:
    # A fixed argument list, no shell.
    done = subprocess.run(_server_command(args), capture_output=True, text=True, timeout=120,  # noqa: S603
                          check=False)
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.strip()[-2000:]}\n{tail}")


@pytest.fixture(scope="module")
def pg15() -> Iterator[Db]:
    if not (PG15_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 server not found in {PG15_BIN} (Debian: apt-get install postgresql-15)")
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no {SERVER_USER!r} OS user to run PostgreSQL 15 as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing")
    base = Path(tempfile.mkdtemp(prefix="credits-pg15-"))
    if os.geteuid() == 0:
        os.chown(base, account.pw_uid, account.pw_gid)
        reachable = subprocess.run(_server_command(["test", "-w", str(base)]), check=False)  # noqa: S603
        if reachable.returncode != 0:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip(f"the {SERVER_USER!r} OS user cannot reach the temporary directory (TMPDIR)")
    data, log = base / "data", base / "server.log"
    started = False
    try:
        _run([str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--no-locale", "--no-sync"])
        _run([str(PG15_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
              "-o", f"-k {base} -c listen_addresses='' -c fsync=off", "start"], log)
        started = True
        admin = f"postgresql://postgres@/postgres?host={base}"
        dsn = db.create_database(admin, "credits_pg15")
        db.prepare_database(dsn, seed=True)
        handle = Db(dsn)
        yield handle
        handle.close()
    finally:
        if started:
            _run([str(PG15_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def test_it_really_is_postgresql_15(pg15: Db) -> None:
    assert 150000 <= int(pg15.one("show server_version_num")) < 160000


def test_seeded_accounts_and_reads(pg15: Db) -> None:
    alice = Caller.user(ALICE)
    own = pg15.call("get_credit_balance", alice)
    assert own["subscription"] == 3 and own["held"] == 0
    tenant_account = str(pg15.one("select id from public.credit_accounts where tenant_id = %s", ACME))
    # Security-invoker views (new in 15) apply the caller's RLS: Alice sees her
    # account and her tenant's, Bob (a member) the tenant's and his own.
    bobs = str(pg15.one("select id from public.credit_accounts where user_id = %s", BOB))
    for user, expected in ((ALICE, {own["account_id"], tenant_account}), (BOB, {bobs, tenant_account})):
        rows = as_caller(pg15.conn, Caller.user(user), "select account_id from public.credit_balances")
        assert {str(r[0]) for r in rows} == expected, user
    assert pg15.call("get_credit_balance", Caller.user(PLATFORM_ADMIN, app_metadata={"role": "super_admin"}),
                     p_account_id=own["account_id"])["account_id"] == own["account_id"]
    expect_error(lambda: pg15.call("get_credit_balance", Caller.user(BOB), p_account_id=own["account_id"]),
                 "PT403", "forbidden")
    expect_error(lambda: pg15.call("get_credit_balance", Caller.anon()), "42501")


def test_spending_paths(pg15: Db) -> None:
    caller, account = pg15.new_user()
    pg15.call("add_purchased_credits", p_account_id=account, p_amount=20, p_idempotency_key="buy")
    # The split between pools is what PostgreSQL 15 reports without OLD in RETURNING.
    spent = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="k1",
                      p_operation="image.generate")
    assert (spent["charged"], spent["from_subscription"], spent["from_purchased"]) == (4, 3, 1)
    again = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="k1",
                      p_operation="image.generate")
    assert again["replayed"] is True and again["transaction_id"] == spent["transaction_id"]
    hold = pg15.call("reserve_credits", caller, p_account_id=account, p_idempotency_key="h1", p_amount=5)
    captured = pg15.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_amount=2)
    assert (captured["charged"], captured["released"]) == (2, 3)
    expect_error(lambda: pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="k2",
                                   p_amount=1000), "PT402", "insufficient_credits")
    assert pg15.call("get_credit_balance", caller)["purchased"] == 20 - 1 - 2
    alices = pg15.call("get_credit_balance", Caller.user(ALICE))["account_id"]
    key = pg15.call("create_license_key", Caller.user(ALICE), p_account_id=alices, p_name="pg15")["key"]
    by_key = pg15.call("deduct_credits_by_license", p_license_key=key,
                       p_idempotency_key=str(uuid.uuid4()), p_amount=1)
    assert by_key["charged"] == 1
    ledger = pg15.ledger(account)
    assert sum(r["amount"] for r in ledger if r["pool"] == "purchased") == 17
    assert [r["type"] for r in ledger] == ["grant", "purchase", "spend", "spend", "spend"]


def test_monthly_reset_and_books(pg15: Db) -> None:
    today = datetime.now(UTC).date()
    next_month = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    after, processed = None, 0
    while True:
        args = {"p_period_start": next_month.isoformat(), "p_batch_size": 2}
        if after:
            args["p_after"] = after
        result = pg15.call("run_monthly_reset", **args)
        processed += result["processed"]
        after = result["next_after"]
        if result["done"]:
            break
    assert processed == pg15.one("select count(*) from public.credit_accounts")
    again = pg15.call("run_monthly_reset", p_period_start=next_month.isoformat())
    assert (again["processed"], again["granted"]) == (0, 0)
    assert pg15.call("reconcile_credit_balances")["mismatches"] == []
    expect_error(lambda: pg15.call("run_monthly_reset", Caller.user(ALICE),
                                   p_period_start=next_month.isoformat()), "42501")


def test_promotional_grants_and_a_hold_across_a_renewal(pg15: Db) -> None:
    caller, account = pg15.new_user()
    pg15.sql("insert into public.credit_plans (id, monthly_credits, rollover_cap) values ('pg15_roll', 5, 2) "
             "on conflict (id) do nothing")
    pg15.sql("update public.credit_accounts set plan_id = 'pg15_roll' where id = %s", account)
    expires = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    granted = pg15.call("grant_promotional_credits", p_account_id=account, p_amount=4, p_expires_at=expires,
                        p_idempotency_key="promo")
    assert granted["balance"]["next_expiry"]["amount"] == 4
    spent = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="p1", p_amount=5)
    assert (spent["from_promotional"], spent["from_subscription"]) == (4, 1)
    hold = pg15.call("reserve_credits", caller, p_account_id=account, p_idempotency_key="h", p_amount=2)
    today = datetime.now(UTC).date()
    start = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    renewed = pg15.call("add_subscription_credits", p_account_id=account, p_amount=5,
                        p_period_start=f"{start}T00:00:00Z", p_period_end=f"{end}T00:00:00Z",
                        p_idempotency_key="renew")
    assert (renewed["rolled_over"], renewed["expired"], renewed["granted"]) == (0, 0, 5)
    released = pg15.call("release_hold", caller, p_hold_id=hold["hold_id"])
    assert (released["balance"]["subscription"], released["balance"]["total"]) == (5, 5)
    assert pg15.call("reconcile_credit_balances")["mismatches"] == []


def test_contract_v3_paths(pg15: Db) -> None:
    # The fast deduct (one UPDATE, one row) and its replay, priced holds with an
    # overage policy and debt, extensions, estimates and spend limits, on 15.
    pg15.sql("insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
             "credits_per_1k_output_tokens) values ('pg15-llm', 1, 1, 2) on conflict (operation) do nothing")
    caller, account = pg15.new_user()
    pg15.call("add_purchased_credits", p_account_id=account, p_amount=30, p_idempotency_key="buy")
    fast = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="f1", p_amount=2)
    assert (fast["from_subscription"], fast["balance"]["available"]) == (2, 31)
    assert pg15.one("select request_hash from public.credit_transactions where id = %s",
                    fast["transaction_id"]) is None
    replay = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="f1", p_amount=2)
    assert (replay["replayed"], replay["transaction_id"]) == (True, fast["transaction_id"])
    expect_error(lambda: pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="f1",
                                   p_amount=3), "PT409", "idempotency_conflict")

    hold = pg15.call("reserve_credits", caller, p_account_id=account, p_idempotency_key="h1",
                     p_operation="pg15-llm", p_input_tokens=1000, p_output_tokens=2000,
                     p_overage="if_available")
    assert hold["amount"] == 6
    extended = pg15.call("extend_hold", caller, p_hold_id=hold["hold_id"], p_idempotency_key="x1",
                         p_add_amount=2, p_ttl_seconds=600)
    assert extended["amount"] == 8
    captured = pg15.call("capture_hold", caller, p_hold_id=hold["hold_id"], p_input_tokens=1000,
                         p_output_tokens=500, p_model="m")
    assert (captured["requested"], captured["charged"], captured["released"]) == (3, 3, 5)
    estimate = pg15.call("estimate_cost", caller, p_account_id=account, p_operation="pg15-llm",
                         p_input_tokens=1000)
    assert (estimate["cost"], estimate["available"], estimate["limit_remaining"]) == (2, 28, None)

    od = pg15.call("reserve_credits", p_account_id=account, p_idempotency_key="od", p_amount=20,
                   p_overage="overdraft")
    pg15.sql("update public.credit_accounts set overdraft_limit = 10 where id = %s", account)
    over = pg15.call("capture_hold", p_hold_id=od["hold_id"], p_amount=40)
    assert (over["charged"], over["debt_added"], over["uncovered"]) == (38, 10, 2)
    assert (over["balance"]["debt"], over["balance"]["available"]) == (10, 0)
    paid = pg15.call("add_purchased_credits", p_account_id=account, p_amount=15, p_idempotency_key="buy2")
    assert (paid["balance"]["debt"], paid["balance"]["purchased"]) == (0, 5)

    limit = pg15.call("set_spend_limit", caller, p_account_id=account, p_subject="member",
                      p_subject_id=caller.user_id, p_limit=6, p_period="day")
    assert (limit["spent"], limit["held"]) == (5, 0)
    expect_error(lambda: pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="l1",
                                   p_amount=2), "PT402", "spend_limit_exceeded")
    assert pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="l2",
                     p_amount=1)["charged"] == 1
    assert pg15.call("reconcile_credit_balances")["mismatches"] == []


def test_alerts_the_live_balance_and_auto_top_up(pg15: Db) -> None:
    # The balance watch (a deferred trigger at commit) on 15: an alert fires once, the
    # balance is broadcast once per transaction, a top-up starts once and is granted once.
    caller, account = pg15.new_user()
    pg15.call("add_purchased_credits", p_account_id=account, p_amount=100, p_idempotency_key="buy")
    start = pg15.balance(account)["available"]
    pg15.call("set_balance_alert", caller, p_account_id=account, p_threshold=start - 10)
    sent = pg15.one("select count(*) from realtime.messages where topic = %s", f"credits:{account}")
    spent = pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="a1", p_amount=20)
    pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="a2", p_amount=1)
    events = pg15.sql("select type from public.credit_events where account_id = %s", account)
    assert events == [("balance.low",)]
    payload = pg15.one("select payload from realtime.messages where topic = %s order by inserted_at desc, id"
                       " limit 1", f"credits:{account}")
    assert payload["available"] == spent["balance"]["available"] - 1
    assert pg15.one("select count(*) from realtime.messages where topic = %s",
                    f"credits:{account}") == sent + 2

    pg15.sql("insert into public.credit_packs (stripe_price_id, credits, name)"
             " values ('price_pg15', 500, 'p') on conflict do nothing")
    pg15.sql("update public.credit_accounts set stripe_customer_id = 'cus_pg15' where id = %s", account)
    pg15.call("set_auto_topup", caller, p_account_id=account, p_enabled=True, p_threshold=start,
              p_pack="price_pg15")
    pg15.call("deduct_credits", caller, p_account_id=account, p_idempotency_key="a3", p_amount=1)
    [(topup,)] = pg15.sql("select id from public.credit_topups where account_id = %s", account)
    pg15.call("record_topup_result", p_topup_id=str(topup), p_outcome="succeeded", p_payment_intent="pi_pg15")
    again = pg15.call("record_topup_result", p_topup_id=str(topup), p_outcome="succeeded")
    assert again["replayed"] is True
    assert pg15.balance(account)["available"] == spent["balance"]["available"] - 2 + 500
    assert pg15.call("reconcile_credit_balances")["mismatches"] == []
