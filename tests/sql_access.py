"""Helpers for the access and concurrency tests of the SQL core.

`as_caller` runs plain SQL (a table or view read, an attempted write) under the
same role switch and JWT claims the REST layer uses, so RLS and privileges are
exercised exactly as an API caller meets them. `expect_error` asserts the
SQLSTATE and message of a refused call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support import Caller


def as_caller(conn: psycopg.Connection, caller: Caller, query: str, *params: Any) -> list[tuple]:
    """Run ``query`` as ``caller`` in one transaction (rolled back on error).

    ``conn`` must be autocommit; a write that succeeds is committed, like a
    request through the REST layer.
    """
    with conn.transaction():
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(caller.role)))
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(caller.claims),))
        cur = conn.execute(query, params or None)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def expect_error(fn: Callable[[], Any], sqlstate: str, message: str | None = None) -> psycopg.Error:
    """Call ``fn`` and assert it raises a database error with this SQLSTATE
    (and, when given, exactly this primary message); return the error."""
    with pytest.raises(psycopg.Error) as info:
        fn()
    err = info.value
    assert err.sqlstate == sqlstate, (err.sqlstate, err.diag.message_primary)
    if message is not None:
        assert err.diag.message_primary == message, err.diag.message_primary
    return err


def error_detail(err: psycopg.Error) -> dict[str, Any]:
    """The JSON detail of a contract error ({} when there is none)."""
    detail = err.diag.message_detail
    return json.loads(detail) if detail else {}


def no_sub_caller() -> Caller:
    """An ``authenticated`` request whose token carries no ``sub`` claim."""
    return Caller("authenticated", {"role": "authenticated", "aud": "authenticated"})
