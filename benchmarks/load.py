"""Set-based loading of benchmark accounts (and the bare baseline tables).

Loading goes around the functions on purpose: a million accounts through the
signup trigger would take longer than the benchmark. The rows written are the
ones the functions would have written (an account, its signup grant and a
funding purchase in the transaction log and the ledger), so the ledger still
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
                  previous_period: bool = False, license_keys: bool = False) -> None:
    """Accounts 1..count on `free`, each with ``subscription`` + ``purchased`` credits.

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
            insert into public.credit_accounts (id, user_id, plan_id, subscription_balance, purchased_balance,
                                                period_start, period_end, created_at)
            select account_id, user_id, 'free', %(sub)s, %(purchased)s, period_start, period_end, period_start
              from bench_load
            """,
            {"sub": subscription, "purchased": purchased},
        )
        conn.execute(
            """
            insert into public.credit_transactions (id, account_id, kind, idempotency_key, request_hash,
                                                    result, amount, pool, description, created_at)
            select signup_tx, account_id, 'grant', 'signup', md5('signup')::uuid,
                   jsonb_build_object('expired', 0, 'granted', %(sub)s, 'replayed', false),
                   %(sub)s, 'subscription', 'first month''s allowance', period_start
              from bench_load
            union all
            select funding_tx, account_id, 'purchase', 'bench-funding', md5('bench-funding')::uuid,
                   jsonb_build_object('added', %(purchased)s, 'replayed', false),
                   %(purchased)s, 'purchased', 'benchmark funding', period_start
              from bench_load
            """,
            {"sub": subscription, "purchased": purchased},
        )
        conn.execute(
            """
            insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                              idempotency_key, period_start, period_end, metadata, created_at)
            select account_id, signup_tx, 'subscription', %(sub)s, %(sub)s, 'grant', 'signup',
                   period_start, period_end, '{"reason": "signup"}'::jsonb, period_start
              from bench_load where %(sub)s > 0
            union all
            select account_id, funding_tx, 'purchased', %(purchased)s, %(purchased)s, 'purchase',
                   'bench-funding', null, null, '{}'::jsonb, period_start
              from bench_load where %(purchased)s > 0
            """,
            {"sub": subscription, "purchased": purchased},
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
    conn.execute("vacuum analyze auth.users, public.credit_accounts, public.credit_transactions, "
                 "public.credit_ledger, public.credit_license_keys")


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
