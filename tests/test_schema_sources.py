"""The SQL's two sources agree, and released migrations stay as shipped.

``supabase/schemas/`` holds the live text of every table, policy and function,
one chapter per domain; ``supabase/migrations/`` is the applied history. A
database built from the bootstrap and the migrations must equal, object by
object in the catalog, one built from the bootstrap and the schema chapters.

``supabase/released-migrations.json`` lists, per release, every migration it
shipped and its SHA-256: a released migration is never edited or removed, and
a new one sorts after all of them (``supabase db push`` applies in name order).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from devstack import db
from tests.catalog_snapshot import differences, snapshot
from tests.support import Db
from tests.test_sql_pg15 import pg15  # noqa: F401  (the PostgreSQL 15 cluster, when installed)

MANIFEST = db.ROOT / "supabase" / "released-migrations.json"


def _build(server: str, name: str, schemas: Path | None) -> dict[str, str]:
    """A fresh database from the migrations (schemas None) or from these chapters."""
    dsn = db.create_database(server, name)
    try:
        if schemas is None:
            db.prepare_database(dsn)
        else:
            db.prepare_database_from_schemas(dsn, schemas)
        with psycopg.connect(dsn, autocommit=True) as conn:
            return snapshot(conn)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def from_migrations(pg_server: str) -> dict[str, str]:
    return _build(pg_server, f"credits_from_migrations_{os.getpid()}", None)


@pytest.fixture(scope="module")
def from_schemas(pg_server: str) -> dict[str, str]:
    return _build(pg_server, f"credits_from_schemas_{os.getpid()}", db.SCHEMAS)


def test_schema_chapters_build_the_database_the_migrations_build(
        from_migrations: dict[str, str], from_schemas: dict[str, str]) -> None:
    found = differences(from_migrations, from_schemas)
    assert not found, (f"{len(found)} difference(s) between the migrations and supabase/schemas/:\n"
                       + "\n".join(found))


def test_the_chapters_build_the_same_database_on_postgresql_15(pg15: Db) -> None:  # noqa: F811
    """Supabase still runs PostgreSQL 15; the chapters must apply, and agree, there too."""
    server = db.with_database(pg15.dsn, "postgres")
    found = differences(_build(server, "credits_from_migrations", None),
                        _build(server, "credits_from_schemas", db.SCHEMAS))
    assert not found, "\n".join(found)


def test_the_snapshot_sees_our_objects(from_schemas: dict[str, str]) -> None:
    # A snapshot that missed a kind of object would compare equal vacuously.
    expected = [
        "function public.deduct_credits(uuid,text,integer,text,text,integer,integer,jsonb)",
        "function private.renew_to(uuid[],bigint[],bigint[],timestamp with time zone[],"
        "timestamp with time zone,private.entry_origin,text,uuid,text,jsonb)",
        "relation public.credit_accounts", "relation public.credit_balances",
        "relation public.credit_transactions_seq_seq", "sequence public.credit_transactions_seq_seq",
        "constraint public.credit_accounts credit_accounts_stripe_quantity_check",
        "index public.stripe_events_parked_customer_idx", "policy public.credit_wallets credit_wallets_read",
        "trigger auth.users on_auth_user_created_open_credit_account", "enum private.entry_kind",
        "composite type private.split", "domain private.credits", "schema private",
        "comment on table column public.credit_accounts.stripe_paid_through",
        "default privileges postgres in schema public on f",
    ]
    missing = [key for key in expected if key not in from_schemas]
    assert not missing, missing
    columns = from_schemas["relation public.credit_accounts"]
    assert "column 10: stripe_paid_through timestamp with time zone" in columns
    assert "row level security enabled" in columns


def test_a_changed_chapter_is_reported(pg_server: str, from_migrations: dict[str, str],
                                       tmp_path: Path) -> None:
    """The comparison fails, naming the objects, when a chapter drifts."""
    for chapter in db.schema_files():
        shutil.copy(chapter, tmp_path / chapter.name)
    edits = {
        # A function body, a grant, a policy's roles, a column's place, an index.
        "060_spending.sql": [
            ("v_wallet.promotional := v_wallet.promotional - v_split.promotional;",
             "v_wallet.promotional := v_wallet.promotional - v_split.promotional; -- edited"),
            ("grant execute on function private.get_credit_balance(uuid) to authenticated, service_role;",
             "grant execute on function private.get_credit_balance(uuid) to service_role;"),
        ],
        "020_accounts.sql": [
            ("create policy tenants_read on public.tenants for select to authenticated",
             "create policy tenants_read on public.tenants for select to authenticated, service_role"),
            ("  stripe_paid_through timestamptz,\n  stripe_quantity integer",
             "  stripe_quantity integer check (stripe_quantity > 0),\n  stripe_paid_through timestamptz,\n"
             "  stripe_quantity_old integer"),
        ],
        "100_stripe_webhook.sql": [
            ("create index stripe_events_parked_customer_idx on public.stripe_events (customer_id)",
             "create index stripe_events_parked_customer_idx on public.stripe_events (customer_id, type)"),
        ],
    }
    for name, replacements in edits.items():
        path = tmp_path / name
        text = path.read_text()
        for old, new in replacements:
            assert old in text, (name, old)
            text = text.replace(old, new, 1)
        path.write_text(text)
    found = differences(from_migrations, _build(pg_server, f"credits_from_edited_{os.getpid()}", tmp_path))
    reported = "\n".join(found)
    for key in (
        "function private.deduct_checked(uuid,text,integer,text,text,integer,integer,jsonb,uuid): differs",
        "function private.get_credit_balance(uuid): differs",
        "policy public.tenants tenants_read: differs",
        "relation public.credit_accounts: differs",
        "index public.stripe_events_parked_customer_idx: differs",
    ):
        assert key in reported, f"{key!r} not reported in:\n{reported}"
    assert "-- edited" in reported  # the line that differs is shown


# --- released migrations ------------------------------------------------------

def released_problems(manifest: dict[str, dict[str, str]], migrations: Path) -> list[str]:
    """What breaks the append-only rule: a released file changed or missing, or
    an unreleased migration that would sort before a released one."""
    problems: list[str] = []
    released: set[str] = set()
    for release, files in manifest.items():
        for name, digest in files.items():
            released.add(name)
            path = migrations / name
            if not path.exists():
                problems.append(f"{name} (released in {release}) is missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"{name} (released in {release}) was changed")
    last = max(released, default="")
    for path in sorted(migrations.glob("*.sql")):
        if path.name not in released and path.name < last:
            problems.append(f"{path.name} is not released but sorts before the released {last}")
    return problems


def load_manifest() -> dict[str, dict[str, str]]:
    data: dict[str, dict[str, str]] = json.loads(MANIFEST.read_text())
    return data


def test_released_migrations_are_unchanged() -> None:
    manifest = load_manifest()
    assert "0.2.0" in manifest
    assert not released_problems(manifest, db.MIGRATIONS)


def test_the_manifest_lists_what_0_2_0_shipped() -> None:
    # 0.2.0 shipped the chapters of 2026-11-21; the 2026-12-05 ones are unreleased (CHANGELOG).
    shipped = sorted(p.name for p in db.MIGRATIONS.glob("20261121*.sql"))
    assert len(shipped) == 10
    assert sorted(load_manifest()["0.2.0"]) == shipped


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS, folder)
    yield folder


def test_the_guard_reports_an_edited_a_missing_and_a_misplaced_migration(migrations_copy: Path) -> None:
    manifest = load_manifest()
    setup = migrations_copy / "20261121000100_setup.sql"
    setup.write_text(setup.read_text() + "\n-- edited\n")
    (migrations_copy / "20261121000180_monthly_reset.sql").unlink()
    (migrations_copy / "20261121000150_fix.sql").write_text("select 1;\n")
    assert released_problems(manifest, migrations_copy) == [
        "20261121000100_setup.sql (released in 0.2.0) was changed",
        "20261121000180_monthly_reset.sql (released in 0.2.0) is missing",
        "20261121000150_fix.sql is not released but sorts before the released "
        "20261121000200_stripe_webhook.sql",
    ]
