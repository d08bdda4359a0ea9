"""Test helpers: callers (a role plus JWT claims) and a small database handle.

Every contract call goes through `devstack.db.call_function`, the same code the
local REST endpoint uses, so tests exercise the exact role/claims switching
Supabase performs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg import sql as pgsql

from devstack import db


@dataclass(frozen=True)
class Caller:
    role: str
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def user_id(self) -> str | None:
        return self.claims.get("sub")

    @classmethod
    def service(cls) -> Caller:
        return cls("service_role", {"role": "service_role"})

    @classmethod
    def anon(cls) -> Caller:
        return cls("anon", {"role": "anon"})

    @classmethod
    def user(cls, user_id: str, *, app_metadata: dict | None = None,
             user_metadata: dict | None = None) -> Caller:
        return cls("authenticated", {
            "sub": user_id, "role": "authenticated", "aud": "authenticated",
            "app_metadata": app_metadata or {}, "user_metadata": user_metadata or {},
        })


class Db:
    """A lazily opened autocommit connection plus data-making helpers."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def connect(self) -> psycopg.Connection:
        """A new autocommit connection (for parallel tests)."""
        return psycopg.connect(self.dsn, autocommit=True)

    def call(self, fn: str, caller: Caller | None = None, **args: Any) -> Any:
        caller = caller or Caller.service()
        return db.call_function(self.conn, fn, args, role=caller.role, claims=caller.claims)

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """Run SQL as the superuser (set-up and inspection only)."""
        cur = self.conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    def one(self, query: str, *params: Any) -> Any:
        rows = self.sql(query, *params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    # --- data -------------------------------------------------------------
    def new_user(self, *, app_metadata: dict | None = None,
                 user_metadata: dict | None = None) -> tuple[Caller, str]:
        """Insert an auth.users row (as Supabase Auth would) and return the
        caller for that user and the id of the personal account the trigger made."""
        user_id = str(uuid.uuid4())
        self.sql(
            "insert into auth.users (id, email, raw_app_meta_data, raw_user_meta_data) "
            "values (%s, %s, %s, %s)",
            user_id, f"{user_id}@example.test",
            json.dumps(app_metadata or {}), json.dumps(user_metadata or {}),
        )
        account_id = str(self.one("select id from public.credit_accounts where user_id = %s", user_id))
        return Caller.user(user_id, app_metadata=app_metadata, user_metadata=user_metadata), account_id

    def new_tenant(self, members: dict[str, str] | None = None) -> tuple[str, str]:
        """Create a tenant with ``{user_id: role}`` members; return (tenant_id, account_id)."""
        tenant_id = str(self.one("insert into public.tenants (name) values ('Acme') returning id"))
        for user_id, role in (members or {}).items():
            self.sql("insert into public.tenant_members (tenant_id, user_id, role) values (%s, %s, %s)",
                     tenant_id, user_id, role)
        account_id = str(self.one("select id from public.credit_accounts where tenant_id = %s", tenant_id))
        return tenant_id, account_id

    def fund(self, account_id: str, purchased: int = 0, subscription: int = 0) -> None:
        """Top up through the contract functions, so the ledger stays whole."""
        if purchased:
            self.call("add_purchased_credits", p_account_id=account_id, p_amount=purchased,
                      p_idempotency_key=f"fund-{uuid.uuid4()}")
        if subscription:
            self.call("admin_adjust_credits", p_account_id=account_id, p_pool="subscription",
                      p_amount=subscription, p_reason="test funding",
                      p_idempotency_key=f"fund-{uuid.uuid4()}")

    def balance(self, account_id: str) -> dict[str, Any]:
        return self.call("get_credit_balance", p_account_id=account_id)

    def ledger(self, account_id: str) -> list[dict[str, Any]]:
        rows = self.sql(
            "select to_jsonb(l) from public.credit_ledger l where account_id = %s order by id",
            account_id,
        )
        return [r[0] for r in rows]


# --- assertions ---------------------------------------------------------------
def new_key(prefix: str = "k") -> str:
    """A fresh idempotency key (tests never share keys by accident)."""
    return f"{prefix}-{uuid.uuid4()}"


def expect_error(fn: Any, sqlstate: str, message: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call ``fn(*args, **kwargs)``; assert it raised ``sqlstate`` with exactly
    ``message`` (the contract's error name). Returns the JSON detail ({} if none)."""
    try:
        result = fn(*args, **kwargs)
    except psycopg.Error as exc:
        assert (exc.sqlstate, exc.diag.message_primary) == (sqlstate, message), (
            exc.sqlstate, exc.diag.message_primary, exc.diag.message_detail)
        detail = exc.diag.message_detail
        return json.loads(detail) if detail else {}
    raise AssertionError(f"expected {sqlstate} {message}, got result {result!r}")


@dataclass(frozen=True)
class Snapshot:
    """Everything a rejected call must leave as it was, for one account."""

    balance: dict[str, Any]
    ledger_rows: int
    transactions: int
    holds: list[tuple]


def snapshot(database: Db, account_id: str) -> Snapshot:
    return Snapshot(
        balance=database.balance(account_id),
        ledger_rows=database.one(
            "select count(*) from public.credit_ledger where account_id = %s", account_id),
        transactions=database.one(
            "select count(*) from public.credit_transactions where account_id = %s", account_id),
        holds=database.sql(
            "select id, status, amount, expires_at from public.credit_holds"
            " where account_id = %s order by id",
            account_id),
    )


def select_as(database: Db, caller: Caller, query: str, *params: Any) -> list[dict[str, Any]]:
    """Run a read as ``caller`` (role + JWT claims, like the REST layer) so RLS
    applies; rows come back as dicts."""
    with database.conn.transaction():
        database.conn.execute(pgsql.SQL("set local role {}").format(pgsql.Identifier(caller.role)))
        database.conn.execute("select set_config('request.jwt.claims', %s, true)",
                              (json.dumps(caller.claims),))
        cur = database.conn.execute(query, params or None)
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@contextmanager
def own_database(pg_server: str, prefix: str) -> Iterator[Db]:
    """A database of a module's own (for tests that count every account, or
    stop the database), prepared like the session's; its ledger must still
    explain every balance before it is dropped."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    handle = Db(db.create_database(pg_server, name))
    db.prepare_database(handle.dsn)
    try:
        yield handle
        assert handle.call("reconcile_credit_balances")["mismatches"] == []
    finally:
        handle.close()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
