"""Bring a long-lived local database up to date, the way the Supabase CLI does.

The tests build a fresh database every session (``db.prepare_database``); the
local stack keeps its data, so here each migration runs once and is recorded in
``supabase_migrations.schema_migrations`` (the CLI's own table), the seed runs
once and is recorded in ``supabase_migrations.seed_files``, and the Supabase
bootstrap runs only on a database that has neither. Restarting applies only
what is new.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from devstack import db

# Any constant works: it only keeps two starts from migrating at the same time.
_LOCK_KEY = 5_432_100_001


@dataclass
class MigrationReport:
    bootstrapped: bool = False
    applied: list[str] = field(default_factory=list)
    seeded: bool = False


def version_and_name(path: Path) -> tuple[str, str]:
    """``20261121000100_credits_core.sql`` -> ("20261121000100", "credits_core")."""
    version, _, name = path.stem.partition("_")
    return version, name


def _run(conn: psycopg.Connection, path: Path) -> None:
    try:
        db.apply_sql_file(conn, path)
    except psycopg.Error as exc:
        raise RuntimeError(f"{path.name}: {exc.diag.message_primary or type(exc).__name__}") from exc


def apply_pending(dsn: str, *, seed: bool = True) -> MigrationReport:
    """Bootstrap (first time only), apply new migrations in order, seed once."""
    report = MigrationReport()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            tracked = conn.execute("select to_regclass('supabase_migrations.schema_migrations')").fetchone()
            if tracked is None or tracked[0] is None:
                with conn.transaction():
                    _run(conn, db.BOOTSTRAP)
                    conn.execute("create schema if not exists supabase_migrations")
                    conn.execute(
                        "create table if not exists supabase_migrations.schema_migrations "
                        "(version text primary key, name text)"
                    )
                    conn.execute(
                        "create table if not exists supabase_migrations.seed_files "
                        "(path text primary key, hash text not null)"
                    )
                report.bootstrapped = True
            elif conn.execute("select to_regclass('realtime.messages')").fetchone() == (None,):
                # A database bootstrapped before the bootstrap reproduced Realtime's
                # part: the bootstrap only creates what is missing.
                with conn.transaction():
                    _run(conn, db.BOOTSTRAP)
            versions = conn.execute("select version from supabase_migrations.schema_migrations")
            done = {row[0] for row in versions}
            for path in db.migration_files():
                version, name = version_and_name(path)
                if version in done:
                    continue
                with conn.transaction():
                    _run(conn, path)
                    conn.execute(
                        "insert into supabase_migrations.schema_migrations (version, name) values (%s, %s)",
                        (version, name),
                    )
                report.applied.append(path.name)
            if seed and db.SEED.exists():
                seed_path = str(db.SEED.relative_to(db.ROOT))
                seeded = conn.execute(
                    "select 1 from supabase_migrations.seed_files where path = %s", (seed_path,)
                ).fetchone()
                if not seeded:
                    digest = hashlib.sha256(db.SEED.read_bytes()).hexdigest()
                    with conn.transaction():
                        _run(conn, db.SEED)
                        conn.execute(
                            "insert into supabase_migrations.seed_files (path, hash) values (%s, %s)",
                            (seed_path, digest),
                        )
                    report.seeded = True
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return report
