"""Set-based loading of benchmark accounts (and the bare pair's and the naive design's tables).

Loading goes around the functions on purpose: a million accounts through the
signup trigger would take longer than the benchmark. The rows written are the
ones the functions would have written (an account, its wallet, and its signup
grant and a funding purchase as transaction rows), so the ledger still
explains every balance and ``reconcile_credit_balances`` stays clean.

Account ``n`` has a deterministic id that pgbench scripts compute from a
random ``n`` without a lookup: a UUIDv7 whose timestamp is ``n`` milliseconds
after a fixed instant (the rest from an md5 of ``n``), i.e. ids in creation
order, as the schema's own ``private.uuid_v7()`` default gives accounts that
sign up over time. Its license key (when loaded) is ``license_key(n)``.
"""

from __future__ import annotations

import psycopg

# 2023-11-14 22:13:20 UTC in ms; account n "signed up" n ms later.
_EPOCH_MS = 1_700_000_000_000
UUID7_SQL = ("(lpad(to_hex({epoch}::bigint + {n}), 12, '0') || '7' || substr(md5('{salt}' || {n}), 1, 3) "
             "|| '8' || substr(md5('{salt}' || {n}), 4, 15))::uuid")
LICENSE_KEY_SQL = "'ck_bench_' || lpad(({n})::text, 24, '0')"


def uuid7_sql(n: str, salt: str) -> str:
    """SQL for a deterministic, time-ordered UUIDv7 built from integer expression ``n``."""
    return UUID7_SQL.format(epoch=_EPOCH_MS, n=n, salt=salt)


def account_id_sql(n: str) -> str:
    return uuid7_sql(n, "bench-account-")


def license_key_sql(n: str) -> str:
    return LICENSE_KEY_SQL.format(n=n)


def load_accounts(conn: psycopg.Connection, count: int, *, purchased: int, subscription: int = 3,
                  previous_period: bool = False, license_keys: bool = False, plan: str = "free") -> None:
    """Accounts 1..count on ``plan``, each with ``subscription`` + ``purchased`` credits.

    ``previous_period`` dates their period a month back, so the monthly reset
    of this month has every one of them to renew.
    """
    months_back = 1 if previous_period else 0
    with conn.transaction():
        # Per-row triggers (signup, ledger guard, foreign-key checks) are skipped
        # for the load; the rows below are consistent by construction.
        conn.execute("set local session_replication_role = replica")
        conn.execute("set local synchronous_commit = off")
        conn.execute(
            f"""
            create temp table bench_load on commit drop as
            select n,
                   md5('bench-user-' || n)::uuid as user_id,
                   {account_id_sql('n')} as account_id,
                   {uuid7_sql('2 * n', 'bench-tx-')} as signup_tx,
                   {uuid7_sql('2 * n + 1', 'bench-tx-')} as funding_tx,
                   date_trunc('month', now(), 'UTC') - make_interval(months => %(back)s) as period_start,
                   date_trunc('month', now(), 'UTC') - make_interval(months => %(back)s)
                     + interval '1 month' as period_end
              from generate_series(1, %(count)s) n
            """,
            {"count": count, "back": months_back},
        )
        conn.execute("insert into auth.users (id, email) "
                     "select user_id, 'bench-' || n || '@example.test' from bench_load")
        conn.execute(
            """
            insert into public.credit_accounts (id, user_id, plan_id, created_at)
            select account_id, user_id, %(plan)s, period_start from bench_load
            """,
            {"plan": plan},
        )
        conn.execute(
            """
            insert into public.credit_wallets (account_id, subscription, purchased, period_start, period_end,
                                               period_grant)
            select account_id, %(sub)s, %(purchased)s, period_start, period_end, signup_tx from bench_load
            """,
            {"sub": subscription, "purchased": purchased},
        )
        # The signup grant and the funding purchase, as the functions write them.
        conn.execute(
            """
            insert into public.credit_transactions (
              id, account_id, kind, origin, idempotency_key, request_hash, subscription, purchased,
              promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
              metadata, created_at)
            select signup_tx, account_id, 'grant'::private.entry_kind, 'system'::private.entry_origin, null,
                   null::uuid, %(sub)s, 0,
                   0, %(sub)s, 0, 0, period_start, period_end, '{"reason": "signup"}'::jsonb, period_start
              from bench_load
            union all
            select funding_tx, account_id, 'purchase', 'api', 'bench-funding', md5('bench-funding')::uuid,
                   0, %(purchased)s, 0, %(sub)s, %(purchased)s, 0, period_start, period_end, '{}'::jsonb,
                   period_start
              from bench_load
            """,
            {"sub": subscription, "purchased": purchased},
        )
        # The purchase's grant (the month's allowance is the wallet's period_grant).
        conn.execute(
            """
            insert into private.grants (id, account_id, pool, source, transaction_id, granted, remaining,
                                        created_at)
            select funding_tx, account_id, 'purchased', 'adjustment', funding_tx, %(purchased)s,
                   %(purchased)s, period_start
              from bench_load where %(purchased)s > 0
            """,
            {"purchased": purchased},
        )
        if license_keys:
            conn.execute(
                f"""
                insert into public.credit_license_keys (account_id, name, prefix, key_hash)
                select account_id, 'bench', left({license_key_sql('n')}, 11),
                       sha256(convert_to({license_key_sql('n')}, 'UTF8'))
                  from bench_load
                """
            )
    conn.execute("vacuum analyze auth.users, public.credit_accounts, public.credit_wallets, "
                 "public.credit_transactions, private.grants, public.credit_license_keys")


def load_baseline(conn: psycopg.Connection, count: int, *, balance: int) -> None:
    """The bare pair's plain tables, with the same account ids and funding."""
    conn.execute("drop schema if exists bench cascade")
    conn.execute("create schema bench")
    conn.execute("create table bench.accounts (id uuid primary key, balance bigint not null)")
    conn.execute(
        "create table bench.ledger (id bigint generated always as identity primary key, "
        "account_id uuid not null, amount bigint not null, created_at timestamptz not null default now())"
    )
    conn.execute(f"insert into bench.accounts select {account_id_sql('n')}, %s "
                 "from generate_series(1, %s) n", (balance, count))
    conn.execute("vacuum analyze bench.accounts, bench.ledger")


# What a team writes itself, after the usual tutorial: two balance columns read
# with SELECT ... FOR UPDATE, the split in plpgsql, an UPDATE, a transaction row
# with indexes on (user, time), (type) and (time), and a usage row indexed on
# (user, time). No idempotency, no holds, no ledger balance. Called through the
# REST layer's role switch like ours.
NAIVE_SCHEMA = """
create table bench.naive_accounts (
  id uuid primary key, subscription_balance bigint not null default 0,
  purchased_balance bigint not null default 0);
create table bench.naive_transactions (
  id bigint generated always as identity primary key, user_id uuid not null, type text not null,
  amount bigint not null, subscription_amount bigint not null, purchased_amount bigint not null,
  description text, created_at timestamptz not null default now());
create index naive_transactions_user_time on bench.naive_transactions (user_id, created_at);
create index naive_transactions_type on bench.naive_transactions (type);
create index naive_transactions_time on bench.naive_transactions (created_at);
create table bench.naive_usage (
  id bigint generated always as identity primary key, user_id uuid not null, operation text, model text,
  credits bigint not null, metadata jsonb not null default '{}',
  created_at timestamptz not null default now());
create index naive_usage_user_time on bench.naive_usage (user_id, created_at);
create function bench.naive_deduct(p_user_id uuid, p_amount integer) returns jsonb
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_sub bigint;
  v_purchased bigint;
  v_from_sub bigint;
begin
  select a.subscription_balance, a.purchased_balance into v_sub, v_purchased
    from bench.naive_accounts a where a.id = p_user_id for update;
  if v_sub + v_purchased < p_amount then
    raise exception using errcode = 'PT402', message = 'insufficient_credits';
  end if;
  v_from_sub := least(v_sub, p_amount);
  update bench.naive_accounts
     set subscription_balance = subscription_balance - v_from_sub,
         purchased_balance = purchased_balance - (p_amount - v_from_sub)
   where id = p_user_id;
  insert into bench.naive_transactions (user_id, type, amount, subscription_amount, purchased_amount,
                                        description)
  values (p_user_id, 'usage', -p_amount, -v_from_sub, -(p_amount - v_from_sub), 'deduct');
  insert into bench.naive_usage (user_id, credits) values (p_user_id, p_amount);
  return jsonb_build_object('success', true, 'subscription_balance', v_sub - v_from_sub,
                            'purchased_balance', v_purchased - (p_amount - v_from_sub));
end
$$;
grant usage on schema bench to service_role;
grant execute on function bench.naive_deduct(uuid, integer) to service_role;
"""


def load_naive(conn: psycopg.Connection, count: int, *, balance: int) -> None:
    """The naive design's tables (in the bench schema made by load_baseline), same ids and funding."""
    conn.execute(NAIVE_SCHEMA)
    conn.execute(f"insert into bench.naive_accounts select {account_id_sql('n')}, 3, %s "
                 "from generate_series(1, %s) n", (balance, count))
    conn.execute("vacuum analyze bench.naive_accounts")


def load_limits(conn: psycopg.Connection, count: int) -> None:
    """Odd accounts of 1..count get spend limits their owner spends under: a
    member limit naming the owner and a default member limit, both far above
    what a run spends (what set_spend_limit writes for an account with no spends yet)."""
    with conn.transaction():
        conn.execute(
            f"""
            insert into private.spend_limits (account_id, subject, subject_id, period, credit_limit)
            select {account_id_sql('n')}, s.subject,
                   case when s.subject = 'member' then md5('bench-user-' || n)::uuid end, 'day', 1000000000
              from generate_series(1, %(count)s, 2) n
             cross join (values ('member'), ('default_member')) s(subject)
            """,
            {"count": count},
        )
        conn.execute(
            f"update public.credit_wallets set limited = true "
            f"where account_id in (select {account_id_sql('n')} from generate_series(1, %(count)s, 2) n)",
            {"count": count},
        )
        conn.execute("analyze private.spend_limits")


def drop_limits(conn: psycopg.Connection) -> None:
    """Undo load_limits: no account of the benchmark database has spend limits."""
    with conn.transaction():
        conn.execute("delete from private.spend_limits")
        conn.execute("delete from private.spend_usage")
        conn.execute("update public.credit_wallets set limited = false where limited")



def load_alerts(conn: psycopg.Connection, count: int) -> None:
    """Odd accounts of 1..count get one balance alert far below their balance
    (armed, never crossed by a run): what set_balance_alert writes."""
    with conn.transaction():
        conn.execute("set local credits.quiet = 'on'")
        conn.execute(
            f"""
            insert into private.balance_alerts (account_id, threshold, rearm_at, armed)
            select {account_id_sql('n')}, 1, 2, true from generate_series(1, %(count)s, 2) n
            """,
            {"count": count},
        )
        conn.execute(
            f"update public.credit_wallets set alert_below = 1 "
            f"where account_id in (select {account_id_sql('n')} from generate_series(1, %(count)s, 2) n)",
            {"count": count},
        )


def drop_alerts(conn: psycopg.Connection) -> None:
    """Undo load_alerts."""
    with conn.transaction():
        conn.execute("set local credits.quiet = 'on'")
        conn.execute("delete from private.balance_alerts")
        conn.execute("update public.credit_wallets set alert_below = 0, alert_rearm = null "
                     "where alert_below <> 0 or alert_rearm is not null")
