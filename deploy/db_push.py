"""Deploy step 1 in CI: the Supabase CLI pinned in package.json pushes
supabase/migrations onto a fresh PostgreSQL 15 prepared the way a Supabase
project is, and afterwards every function is there.

    python -m deploy.db_push [--pg-bin /usr/lib/postgresql/15/bin]

The server is a throwaway cluster whose superuser is ``supabase_admin``; the
CLI connects over TCP as ``postgres``, which on Supabase is not a superuser
(it may create roles and databases and bypass RLS), after
``devstack/supabase_bootstrap.sql`` created Supabase's roles and ``auth``
schema. The push must record every migration, and leave the same functions
(name, arguments, SECURITY DEFINER, fixed settings) as the migrations applied
the test suite's way (as the superuser, file by file) in a second database of
the same server; a second push must find nothing to do. Exit status 0: pushed and checked; 1: a
check failed; 3: PostgreSQL 15 or the CLI is missing (said why).
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from deploy.package import ROOT

CLI = ROOT / "node_modules" / ".bin" / "supabase"
BOOTSTRAP = ROOT / "devstack" / "supabase_bootstrap.sql"
MIGRATIONS = ROOT / "supabase" / "migrations"
PG15_BIN = Path(os.environ.get("PG15_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"  # Debian's server binaries refuse to run as root
# Supabase's own schemas, not the project's.
NOT_OURS = ("pg_catalog", "information_schema", "auth", "extensions", "realtime", "supabase_migrations",
            "pg_toast")
# A few of the contract's SQL functions, so that two empty sets never compare equal.
CONTRACT_FUNCTIONS = {"get_credit_balance", "deduct_credits", "reserve_credits", "run_monthly_reset"}
CLI_ENV = {"SUPABASE_TELEMETRY_DISABLED": "1", "DO_NOT_TRACK": "1", "SUPABASE_NO_UPDATE_NOTIFIER": "1"}
# Supabase's `postgres`: no SUPERUSER; it owns the database (so also `public`) and may use auth's tables.
SUPABASE_POSTGRES_ROLE = "create role postgres login createrole createdb replication bypassrls password {}"
SUPABASE_POSTGRES_GRANTS = """
grant usage on schema auth, extensions to postgres;
grant all on all tables in schema auth to postgres;
"""


class Unavailable(RuntimeError):
    """PostgreSQL 15 or the CLI is not installed here (the message says what to install)."""


class CheckFailed(RuntimeError):
    """The push failed or left the database other than the migrations say."""


@dataclass(frozen=True)
class Server:
    socket_dir: Path
    port: int

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://supabase_admin@/{database}?host={self.socket_dir}&port={self.port}"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str], *, timeout: float = 120) -> None:
    done = subprocess.run(_as_server_user(args), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"{Path(args[0]).name} failed: {(done.stdout + done.stderr).strip()[-2000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def check_available(pg_bin: Path) -> None:
    if not CLI.exists():
        raise Unavailable("the Supabase CLI is not installed: run `npm ci` (package.json pins it)")
    if not (pg_bin / "postgres").exists():
        raise Unavailable(f"PostgreSQL 15 server not found in {pg_bin} "
                          "(Debian: apt-get install postgresql-15)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise Unavailable(f"running as root and there is no {SERVER_USER!r} OS user") from exc
        if shutil.which("runuser") is None:
            raise Unavailable("running as root and runuser is missing")


@contextmanager
def postgres15(pg_bin: Path) -> Iterator[Server]:
    """A throwaway cluster: Unix socket for the admin, 127.0.0.1 with passwords for the CLI."""
    base = Path(tempfile.mkdtemp(prefix="credits-dbpush-"))
    started = False
    try:
        data, log, pwfile = base / "data", base / "server.log", base / "admin-password"
        pwfile.write_text(secrets.token_hex(16) + "\n")  # TCP needs passwords; the admin uses the socket
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            for path in (base, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        _run([str(pg_bin / "initdb"), "-D", str(data), "-U", "supabase_admin", "--auth-local=trust",
              "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", "--no-sync"])
        port = _free_port()
        _run([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
              f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        started = True
        yield Server(base, port)
    finally:
        if started:
            _run([str(pg_bin / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def prepare_like_supabase(server: Server, password: str) -> None:
    """Database `postgres` as a new Supabase project has it: roles, auth schema, a non-superuser owner."""
    with psycopg.connect(server.admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL(SUPABASE_POSTGRES_ROLE).format(sql.Literal(password)))
        conn.execute("alter database postgres owner to postgres")
        apply_sql_files(conn, [BOOTSTRAP])
        conn.execute(SUPABASE_POSTGRES_GRANTS)


def apply_sql_files(conn: psycopg.Connection[Any], files: list[Path]) -> None:
    """Each file in its own transaction, as the test suite (devstack.db) and `supabase db push` do."""
    for path in files:
        with conn.transaction():
            conn.execute(path.read_bytes())


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS.glob("*.sql"))


def supabase_db_push(url: str) -> str:
    """`supabase db push` of this checkout's supabase/ onto the database at ``url``; its output."""
    command = [str(CLI), "db", "push", f"--remote={url}", "--yes"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **CLI_ENV},
                          capture_output=True, text=True, timeout=300, check=False)
    output = (done.stdout + done.stderr).replace(url, "<database url>")
    if done.returncode != 0:
        raise CheckFailed(f"supabase db push failed (exit {done.returncode}):\n{output[-3000:]}")
    return output


FUNCTIONS_QUERY = """
select n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prosecdef,
       coalesce(array_to_string(p.proconfig, ','), ''), pg_get_userbyid(p.proowner)
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname <> all(%s) and n.nspname not like 'pg\\_%%'
"""


def functions(dsn: str) -> set[tuple[str, str, str, bool, str]]:
    """The project's functions: (schema, name, arguments, security definer, settings)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(FUNCTIONS_QUERY, (list(NOT_OURS),)).fetchall()
    return {(schema, name, args, definer, config) for schema, name, args, definer, config, _ in rows}


def owners(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {row[5] for row in conn.execute(FUNCTIONS_QUERY, (list(NOT_OURS),)).fetchall()}


def check(server: Server, password: str) -> list[str]:
    """Push, then compare with the migrations applied as the tests apply them; the problems found."""
    prepare_like_supabase(server, password)
    url = f"postgresql://postgres:{password}@127.0.0.1:{server.port}/postgres?sslmode=disable"
    say("supabase db push (as the non-superuser postgres) ...")
    output = supabase_db_push(url)
    print(output.rstrip())
    problems: list[str] = []
    pushed_dsn = server.admin_dsn()
    with psycopg.connect(pushed_dsn) as conn:
        superuser = conn.execute("select rolsuper from pg_roles where rolname = 'postgres'").fetchone()
        history = conn.execute("select version from supabase_migrations.schema_migrations").fetchall()
    recorded = {row[0] for row in history}
    if superuser != (False,):
        problems.append("the CLI did not connect as a non-superuser postgres")
    expected = {path.name.split("_", 1)[0] for path in migration_files()}
    if recorded != expected:
        problems.append(f"migration history: missing {sorted(expected - recorded)}, "
                        f"unexpected {sorted(recorded - expected)}")

    # The same migrations as the test suite applies them: as the superuser, statement by statement.
    with psycopg.connect(server.admin_dsn(), autocommit=True) as conn:
        conn.execute("create database reference")
    with psycopg.connect(server.admin_dsn("reference"), autocommit=True) as conn:
        apply_sql_files(conn, [BOOTSTRAP, *migration_files()])
    pushed, reference = functions(pushed_dsn), functions(server.admin_dsn("reference"))
    missing, extra = reference - pushed, pushed - reference
    if missing or extra:
        problems.append(f"functions differ from the migrations: missing {sorted(missing)}, "
                        f"extra {sorted(extra)}")
    names = {name for _, name, *_ in pushed}
    if not CONTRACT_FUNCTIONS <= names:
        problems.append(f"contract functions missing: {sorted(CONTRACT_FUNCTIONS - names)}")
    if owners(pushed_dsn) != {"postgres"}:
        problems.append(f"functions owned by {sorted(owners(pushed_dsn))}, not postgres alone")
    unfixed = sorted(f"{schema}.{name}" for schema, name, _, _, config in pushed
                     if "search_path=" not in config)
    if unfixed:
        problems.append(f"functions without a fixed search_path: {unfixed}")

    again = supabase_db_push(url)
    if "up to date" not in again:
        problems.append(f"a second push was not a no-op:\n{again[-1000:]}")
    if not problems:
        print(f"  db push        {len(recorded)} migrations, {len(pushed)} functions as the migrations "
              "define them, owned by postgres (not a superuser); a second push had nothing to do")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.db_push", description=__doc__.splitlines()[0])
    parser.add_argument("--pg-bin", type=Path, default=PG15_BIN)
    args = parser.parse_args(argv)
    try:
        check_available(args.pg_bin)
    except Unavailable as exc:
        say(f"db push check: not run: {exc}")
        return 3
    version = subprocess.run([str(CLI), "--version"], capture_output=True, text=True,
                             env={**os.environ, **CLI_ENV}, timeout=60, check=False).stdout.strip()
    say(f"Supabase CLI {version}, PostgreSQL from {args.pg_bin}")
    try:
        with postgres15(args.pg_bin) as server:
            problems = check(server, secrets.token_hex(16))
    except CheckFailed as exc:
        problems = [str(exc)]
    for problem in problems:
        say(f"db push check: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
