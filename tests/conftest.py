"""Shared fixtures: one real PostgreSQL per test session, prepared like Supabase.

The server is embedded (or ``DATABASE_URL``); a fresh database gets the Supabase
bootstrap and every migration. Tests make their own users and accounts, so they
never depend on each other's data. After every module, the ledger must still
explain every balance (``reconcile_credit_balances``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from devstack import db
from tests.support import Caller, Db


@pytest.fixture(scope="session")
def pg_server() -> str:
    return db.start_server()


@pytest.fixture(scope="session")
def db_dsn(pg_server: str) -> str:
    name = f"credits_test_{os.getpid()}"
    dsn = db.create_database(pg_server, name)
    db.prepare_database(dsn)
    return dsn


@pytest.fixture(scope="session")
def database(db_dsn: str) -> Iterator[Db]:
    handle = Db(db_dsn)
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def rest_url(db_dsn: str) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT``) of the local REST endpoint over the
    session database; point supabase-py's ``SUPABASE_URL`` at it."""
    from devstack import rest, serve, tokens

    app = rest.create_app(db_dsn)  # the process's random keys (devstack.tokens)
    with serve.serve_in_thread(app) as url:
        tokens.use_issuer(url)  # user tokens are minted for this project
        yield url


@pytest.fixture
def call(database: Db) -> Callable[..., Any]:
    """``call(fn, caller, **args)``: run one contract function as ``caller``."""
    return database.call


@pytest.fixture
def service(database: Db) -> Caller:
    return Caller.service()


@pytest.fixture(autouse=True, scope="module")
def _ledger_explains_every_balance(db_dsn: str) -> Iterator[None]:
    yield
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        result = db.call_function(conn, "reconcile_credit_balances")
    assert result["mismatches"] == [], result
