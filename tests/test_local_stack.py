"""`./dev start` comes up, serves, keeps its data, and stops cleanly; and the
migration tracking it relies on applies each file exactly once."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import jwt
import psycopg

from devstack import db, demo, migrate, serve, tokens
from supabase import ClientOptions, create_client

ALICE = "11111111-1111-4111-8111-111111111111"
START_TIMEOUT = 120  # generous: a loaded CI machine can take a while to initdb


class Started:
    """A `python -m devstack.serve` child and the lines it has printed."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # always its own server
        self._log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "devstack.serve", "--port-base", "0", "--data-dir", str(data_dir)],
            cwd=db.ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.banner = self._read_until(serve.READY)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def _read_until(self, marker: str) -> str:
        text = ""
        deadline = time.monotonic() + START_TIMEOUT
        while marker not in text:
            if self.process.poll() is not None and self.lines.empty():
                raise AssertionError(f"the stack exited with {self.process.returncode}:\n{text}"
                                     f"{self._log_path.read_text()[-3000:]}")
            try:
                text += self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {START_TIMEOUT}s:\n{text}"
                                     f"{self._log_path.read_text()[-3000:]}") from None
        return text

    @property
    def database_line(self) -> str:
        return next(line for line in self.banner.splitlines() if line.strip().startswith("database"))

    def url(self, label: str) -> str:
        found = re.search(rf"{label}\s+(?:POST\s+)?(http://127\.0\.0\.1:\d+)", self.banner)
        assert found, self.banner
        return found.group(1)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        # SIGTERM by default: a suite run as a background job ignores SIGINT.
        self.process.send_signal(sig)
        code = self.process.wait(timeout=20)
        rest = "".join(iter_queue(self.lines))
        self._log.close()
        return code, rest

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def iter_queue(lines: queue.Queue[str]) -> list[str]:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return out


def _balance(rest_url: str) -> dict:
    options = ClientOptions(headers={"Authorization": f"Bearer {tokens.user_token(ALICE)}"},
                            postgrest_client_retry=False)
    client = create_client(rest_url, tokens.anon_key(), options=options)
    return client.rpc("get_credit_balance", {}).execute().data


def test_dev_start_serves_keeps_data_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    first = Started(data_dir, tmp_path / "first.log")
    try:
        assert "bootstrapped" in first.database_line and "seeded" in first.database_line
        assert "ck_demo_" in first.banner and "whsec_" in first.banner
        rest_url = first.url("SUPABASE_URL")
        health = httpx.get(f"{rest_url}/rest/v1/", headers={"apikey": tokens.anon_key()})
        assert health.status_code == 200
        # Seeded Alice starts on the free plan's allowance; spend one through the REST layer.
        assert _balance(rest_url)["total"] == 3
        service = create_client(rest_url, tokens.service_role_key(),
                                options=ClientOptions(postgrest_client_retry=False))
        account = _balance(rest_url)["account_id"]
        service.rpc("deduct_credits", {"p_account_id": account, "p_amount": 1,
                                       "p_idempotency_key": "stack-test"}).execute()
        # The printed token of a seeded user is accepted by the credits API.
        token = re.search(r"alice@example\.com\s+(\S+)", first.banner)
        assert token
        if "credits API      http" in first.banner:
            credits = httpx.get(f"{first.url('credits API')}/credits/balance",
                                headers={"Authorization": f"Bearer {token.group(1)}"})
            assert credits.status_code == 200 and credits.json()["total"] == 2
        code, tail = first.stop()
        assert code == 0 and "stopped." in tail
        # The embedded PostgreSQL went with it.
        assert not (data_dir / "postmaster.pid").exists()
    finally:
        first.kill()

    # Second start: nothing re-applied or re-seeded, the data is still there.
    second = Started(data_dir, tmp_path / "second.log")
    try:
        assert second.database_line.split() == ["database", "0", "new", "migration(s)", "applied"]
        assert _balance(second.url("SUPABASE_URL"))["total"] == 2
        code, tail = second.stop(signal.SIGINT)  # Ctrl-C
        assert code == 0 and "stopped." in tail
        assert not (data_dir / "postmaster.pid").exists()
    finally:
        second.kill()


def test_migrations_apply_once_and_are_recorded(pg_server: str) -> None:
    dsn = db.create_database(pg_server, f"migrate_{uuid.uuid4().hex[:8]}")
    first = migrate.apply_pending(dsn)
    files = db.migration_files()
    assert first.bootstrapped and first.seeded
    assert first.applied == [path.name for path in files]
    with psycopg.connect(dsn) as conn:
        recorded = conn.execute(
            "select version, name from supabase_migrations.schema_migrations order by version").fetchall()
        users = conn.execute("select count(*) from auth.users").fetchone()
    assert recorded == [migrate.version_and_name(path) for path in files]

    again = migrate.apply_pending(dsn)
    assert (again.bootstrapped, again.applied, again.seeded) == (False, [], False)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select count(*) from auth.users").fetchone() == users
        assert conn.execute("select count(*) from supabase_migrations.schema_migrations").fetchone() == (
            len(files),)


def test_seed_users_and_key_are_found() -> None:
    users = {user.email: user for user in serve.seed_users()}
    assert users["alice@example.com"].user_id == ALICE
    assert users["admin@example.com"].app_metadata.get("role") == "super_admin"
    key = serve.seed_license_key()
    assert key and key.startswith("ck_demo_")
    # The printed key is the one whose hash the seed stores.
    assert f"sha256(convert_to('{key}'" in db.SEED.read_text()


def test_banner_names_every_endpoint() -> None:
    stack = serve.Stack(dsn="", rest_url="http://127.0.0.1:1", anon_key="a", service_role_key="s",
                        publishable_key="sb_publishable_p", secret_key="sb_secret_s",
                        jwt_secret="j", webhook_secret="w", credits_url="http://127.0.0.1:2",
                        webhook_url="http://127.0.0.1:3", skipped={"reset": "not available"})
    text = serve.banner(stack)
    assert "http://127.0.0.1:1" in text and "/credits/balance" in text and "/stripe/webhook" in text
    # Both generations of API keys.
    assert "sb_publishable_p" in text and "sb_secret_s" in text
    assert "monthly reset    not available" in text


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    """`./dev demo` end to end: every step checks its own balance, and the ledger is whole."""
    out = io.StringIO()
    with serve.run_stack(tmp_path / "pgdata", port_base=None, reset_data=True, keep_data=False) as stack:
        demo.Demo(stack, out=out).run()
        with psycopg.connect(stack.dsn) as conn:
            dana = conn.execute(
                "select w.subscription, w.purchased from public.credit_wallets w "
                "join public.credit_accounts a on a.id = w.account_id "
                "join auth.users u on u.id = a.user_id where u.email = 'dana@example.com'").fetchone()
    text = out.getvalue()
    assert "0 mismatches" in text and "(duplicate)" in text and "(replayed)" in text
    assert dana == (500, 42)


def test_printed_api_keys_are_stable_and_valid() -> None:
    anon = serve.api_key("anon", tokens.LOCAL_JWT_SECRET)
    assert anon == serve.api_key("anon", tokens.LOCAL_JWT_SECRET)
    claims = jwt.decode(anon, tokens.LOCAL_JWT_SECRET, algorithms=["HS256"])
    assert claims["role"] == "anon" and claims["exp"] > time.time() + 5 * 365 * 86400
    service = jwt.decode(serve.api_key("service_role", tokens.LOCAL_JWT_SECRET), tokens.LOCAL_JWT_SECRET,
                         algorithms=["HS256"])
    assert service["role"] == "service_role"
