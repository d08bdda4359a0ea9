"""Deploy step 1 with the Supabase CLI that package.json pins: supabase/config.toml
uses only settings that CLI knows, its state stays out of git, and it pushes
the migrations onto PostgreSQL 15 as Supabase's non-superuser `postgres`.

The CLI comes from npm (`npm ci`); without it, or without PostgreSQL 15, the
tests that run it skip with the reason (CI installs both).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deploy import db_push

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "supabase" / "config.toml"


def keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    """Every setting's dotted name (tables are not settings themselves)."""
    found: set[str] = set()
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        found |= keys(value, dotted + ".") if isinstance(value, dict) else {dotted}
    return found


def cli() -> Path:
    if not db_push.CLI.exists():
        pytest.skip("the Supabase CLI is not installed (npm ci)")
    return db_push.CLI


def test_the_cli_is_pinned_exactly() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    version = package["devDependencies"]["supabase"]
    assert version.split(".")[0] == "3" and version.replace(".", "").isdigit(), version  # no ^ or ~
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/supabase"]["version"] == version
    # Its binary comes from npm platform packages (no download from elsewhere at install time).
    assert lock["packages"]["node_modules/@supabase/cli-linux-x64"]["version"] == version
    assert "scripts" not in lock["packages"]["node_modules/supabase"]
    assert not lock["packages"]["node_modules/supabase"].get("hasInstallScript")


def test_config_has_no_setting_cli_3_refuses_or_renamed() -> None:
    config = tomllib.loads(CONFIG.read_text())
    assert "inbucket" not in config and config["local_smtp"] == {"enabled": False}
    assert config["auth"]["email"]["enabled"] is True and "enable_signup" not in config["auth"]["email"]
    assert config["db"]["major_version"] == 15  # Supabase's hosted PostgreSQL
    assert config["db"]["migrations"]["enabled"] is True
    # `private` is never exposed over REST.
    assert "private" not in config["api"]["schemas"]


def test_config_settings_are_all_in_the_pinned_clis_own_template(tmp_path: Path) -> None:
    """`supabase init` of the pinned CLI writes every setting it knows; ours must be among them."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # noqa: S603, S607 - so init writes .gitignore
    done = subprocess.run([str(cli()), "init"], cwd=tmp_path, capture_output=True, text=True, timeout=60,  # noqa: S603
                          env={**os.environ, **db_push.CLI_ENV}, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    template = tomllib.loads((tmp_path / "supabase" / "config.toml").read_text())
    ours = keys(tomllib.loads(CONFIG.read_text()))
    assert ours <= keys(template), sorted(ours - keys(template))
    # Whatever the CLI's own .gitignore keeps out of git (its .temp/, .branches/, local env files), ours does.
    wanted = {line for line in (tmp_path / "supabase" / ".gitignore").read_text().splitlines()
              if line and not line.startswith("#")}
    assert {".temp", ".branches"} <= wanted
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *(f"supabase/{p}" for p in wanted)],  # noqa: S603, S607
                             cwd=ROOT, capture_output=True, text=True, check=False)
    assert set(ignored.stdout.split()) == {f"supabase/{p}" for p in wanted}


def test_db_push_onto_postgresql_15_as_non_superuser_postgres() -> None:
    cli()
    try:
        db_push.check_available(db_push.PG15_BIN)
    except db_push.Unavailable as exc:
        pytest.skip(str(exc))
    assert db_push.main([]) == 0
