"""Nothing a session puts in pg_temp changes what our functions do.

PostgreSQL looks for types and relations in the session's temporary schema
first unless pg_temp is named in the search_path. Every function pins
`pg_catalog, pg_temp`, so a caller's temporary `uuid` domain (whose check
would run a function of theirs as the definer) or `credit_wallets` table is
never what the function uses. The trap fires only when it runs with other
rights than the user's own (in a definer function). The control shows the
attack works on a function pinned the old way (`search_path = ''`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from tests.support import Caller, Db, new_key

TRAPS = [
    # Harmless as the user; fatal if it ever runs with the owner's rights.
    "create function pg_temp.evil(anyelement) returns boolean language plpgsql "
    "set search_path = pg_catalog, pg_temp "
    "as $$ begin "
    "if current_user::text <> 'authenticated' then "
    "raise exception using errcode = 'P0001', message = 'shadowed'; end if; return true; end $$",
    *[f"create domain pg_temp.{name} as pg_catalog.{name} check (pg_temp.evil(value))"
      for name in ("uuid", "jsonb", "text", "timestamptz", "numeric", "bytea")],
    "create temporary table credit_wallets (account_id uuid, promotional bigint, subscription bigint)",
    "create temporary table credit_accounts (id uuid, user_id uuid)",
    "create temporary table credit_transactions (id uuid)",
]


@pytest.fixture
def trapped(database: Db) -> Iterator[tuple[psycopg.Connection, Caller, str]]:
    """A session of a real user, with every trap laid in its pg_temp."""
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    conn = database.connect()
    conn.autocommit = False
    conn.execute("set role authenticated")
    conn.execute("select set_config('request.jwt.claims', %s, false)", (json.dumps(caller.claims),))
    for statement in TRAPS:
        conn.execute(statement)
    try:
        yield conn, caller, account_id
    finally:
        conn.rollback()
        conn.close()


def test_a_users_temporary_objects_steer_nothing(database: Db,
                                                 trapped: tuple[psycopg.Connection, Caller, str]) -> None:
    conn, _, account_id = trapped

    def one(query: str, *params: object) -> object:
        # The caller's own statement names the built-in types (its own search
        # path would find its traps); what is tested is what the functions do.
        return conn.execute(query, params).fetchone()[0]  # type: ignore[index]

    uuid, text = "pg_catalog.uuid", "pg_catalog.text"
    balance = one(f"select public.get_credit_balance(%s::{uuid})", account_id)
    assert balance["available"] == 13  # type: ignore[index]
    spent = one(f"select public.deduct_credits(%s::{uuid}, %s::{text}, 2, p_model => 'm'::{text}, "
                "p_metadata => '{\"a\": 1}'::pg_catalog.jsonb)", account_id, new_key())
    hold = one(f"select public.reserve_credits(%s::{uuid}, %s::{text}, 3)", account_id, new_key())
    captured = one(f"select public.capture_hold(%s::{uuid}, 1)", hold["hold_id"])  # type: ignore[index]
    key = one(f"select public.create_license_key(%s::{uuid}, 'trap'::{text})", account_id)
    view = one(f"select available from public.credit_balances where account_id = %s::{uuid}", account_id)
    assert (spent["charged"], captured["charged"], key["prefix"][:3], view) == (2, 1, "ck_", 10)  # type: ignore[index]
    conn.rollback()


def test_the_trap_works_on_a_function_pinned_to_an_empty_search_path(database: Db) -> None:
    # Without this control, the test above could pass for the wrong reason.
    conn = database.connect()
    conn.autocommit = False
    try:
        conn.execute("create function public.zz_shadowable() returns text language plpgsql security definer "
                     "set search_path = '' "
                     "as $$ begin return '00000000-0000-0000-0000-000000000000'::uuid; end $$")
        conn.execute("grant execute on function public.zz_shadowable() to authenticated")
        conn.execute("set local role authenticated")
        for statement in TRAPS[:2]:
            conn.execute(statement)
        with pytest.raises(psycopg.errors.RaiseException, match="shadowed"):
            conn.execute("select public.zz_shadowable()")
    finally:
        conn.rollback()
        conn.close()
