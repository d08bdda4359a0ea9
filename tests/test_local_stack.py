"""`./dev start` comes up, serves, keeps its data, and stops cleanly; and the
migration tracking it relies on applies each file exactly once."""

from __future__ import annotations

import io
import json
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
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from devstack import db, demo, migrate, serve, tokens
from supabase import ClientOptions, create_client

ALICE = "11111111-1111-4111-8111-111111111111"
START_TIMEOUT = 120  # generous: a loaded CI machine can take a while to initdb


class Started:
    """A `python -m devstack.serve` child and the lines it has printed."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # always its own server
        # Never the checkout's .local/stack.json: a `./dev start` may be serving beside the tests.
        env["DEVSTACK_STATE_FILE"] = str(data_dir.parent / "stack.json")
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

    @property
    def exports(self) -> dict[str, str]:
        """The variables the banner tells a user to paste (``export NAME='value'``)."""
        return dict(re.findall(r"export (\w+)='([^']*)'", self.banner))

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


def _balance(rest_url: str, exports: dict[str, str]) -> dict:
    """Alice's balance through supabase-py, with the keys and token the banner printed."""
    options = ClientOptions(headers={"Authorization": f"Bearer {exports['TOKEN']}"},
                            postgrest_client_retry=False)
    client = create_client(rest_url, exports["PUBLISHABLE_KEY"], options=options)
    return client.rpc("get_credit_balance", {}).execute().data


def test_dev_start_serves_keeps_data_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    # Another stack (this process stands in for it: alive) announced itself where these stacks
    # would look; a stack of another data directory must leave that announcement alone.
    announcement = json.dumps({"pid": os.getpid(), "dsn": "host=/nowhere", "rest_url": "http://127.0.0.1:1",
                               "keys_path": None, "credits_url": None, "webhook_url": None,
                               "reset_url": None})
    (tmp_path / "stack.json").write_text(announcement)
    first = Started(data_dir, tmp_path / "first.log")
    try:
        assert "bootstrapped" in first.database_line and "seeded" in first.database_line
        assert "ck_demo_" in first.banner and "whsec_" in first.banner
        exports = first.exports
        rest_url = exports["SUPABASE_URL"]
        # Random keys of this data directory, kept next to it, readable by the owner only.
        keys_path = serve.keys_file(data_dir)
        assert keys_path.stat().st_mode & 0o777 == 0o600
        keys = tokens.LocalKeys.load_or_create(keys_path)
        assert keys.secret_key == exports["SECRET_KEY"] and keys.secret_key in first.banner
        assert keys.webhook_secret in first.banner and keys.jwt_secret in first.banner
        assert keys.demo_license_key in first.banner and exports["LICENSE_KEY"] == keys.demo_license_key
        # The banner says how to reach the database and which origins the API allows.
        psql = re.search(r"psql\s+(psql .+)", first.banner)
        assert psql and "credits" in psql.group(1)
        assert serve.CORS_ORIGINS in first.banner
        health = httpx.get(f"{rest_url}/rest/v1/", headers={"apikey": exports["PUBLISHABLE_KEY"]})
        assert health.status_code == 200
        # Tokens are ES256, checked against the JWKS served where Supabase serves it.
        jwks = httpx.get(f"{rest_url}/auth/v1/.well-known/jwks.json").json()
        header = jwt.get_unverified_header(exports["TOKEN"])
        assert header["alg"] == "ES256" and [k["kid"] for k in jwks["keys"]] == [header["kid"]]
        assert all("d" not in k for k in jwks["keys"])  # public halves only
        # Seeded Alice: the free plan's allowance and the seed's 1,000 demo credits.
        assert _balance(rest_url, exports)["total"] == 1003
        service = create_client(rest_url, exports["SECRET_KEY"],
                                options=ClientOptions(postgrest_client_retry=False))
        account = _balance(rest_url, exports)["account_id"]
        service.rpc("deduct_credits", {"p_account_id": account, "p_amount": 1,
                                       "p_idempotency_key": "stack-test"}).execute()
        # The printed token of a seeded user is accepted by the credits API.
        credits = httpx.get(f"{exports['API']}/credits/balance",
                            headers={"Authorization": f"Bearer {exports['TOKEN']}"})
        assert credits.status_code == 200 and credits.json()["total"] == 1002
        # The local reset trigger wants the secret key.
        period = {"period_start": time.strftime("%Y-%m-01", time.gmtime())}
        assert httpx.post(f"{exports['RESET']}/monthly-reset", json=period).status_code == 401
        assert httpx.post(f"{exports['RESET']}/monthly-reset", json=period,
                          headers={"apikey": exports["PUBLISHABLE_KEY"]}).status_code == 401
        renewed = httpx.post(f"{exports['RESET']}/monthly-reset", json=period,
                             headers={"apikey": exports["SECRET_KEY"]}, timeout=60)
        assert renewed.status_code == 200 and renewed.json()["done"] is True
        # Every README example runs as pasted, with the banner's variables.
        run_readme_examples(exports)
        code, tail = first.stop()
        assert code == 0 and "stopped." in tail
        # The embedded PostgreSQL went with it; the other stack's announcement did not.
        assert not (data_dir / "postmaster.pid").exists()
        assert (tmp_path / "stack.json").read_text() == announcement
    finally:
        first.kill()

    # Second start: nothing re-applied or re-seeded, the data and the keys are still there.
    second = Started(data_dir, tmp_path / "second.log")
    try:
        assert second.database_line.split() == ["database", "0", "new", "migration(s)", "applied"]
        assert second.exports["SECRET_KEY"] == exports["SECRET_KEY"]
        assert _balance(second.exports["SUPABASE_URL"], second.exports)["account_id"] == account
        code, tail = second.stop(signal.SIGINT)  # Ctrl-C
        assert code == 0 and "stopped." in tail
        assert not (data_dir / "postmaster.pid").exists()
    finally:
        second.kill()


README_BLOCK = re.compile(r"```(?:sh|bash)\n(.*?)```", re.DOTALL)


def readme_examples() -> list[str]:
    """The README's shell examples that call the running stack (they use $API, $TOKEN, ...)."""
    text = (db.ROOT / "README.md").read_text()
    return [block for block in README_BLOCK.findall(text) if "curl" in block]


def run_readme_examples(exports: dict[str, str]) -> None:
    examples = readme_examples()
    assert len(examples) >= 3, "the README's curl examples were not found"
    env = {**os.environ, **exports}
    for example in examples:
        # -f: an HTTP error fails the example; pipefail: so does any failing step.
        script = "set -euo pipefail\n" + example.replace("curl ", "curl -sS -f ")
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True,  # noqa: S603,S607
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, f"README example failed:\n{example}\n{done.stdout}\n{done.stderr}"


def test_port_conflicts_and_bad_port_bases_are_named(tmp_path: Path) -> None:
    taken = serve.bind(0)
    port = taken.getsockname()[1]
    try:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        busy = subprocess.run(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "devstack.serve", "--port-base", str(port), "--data-dir",
             str(tmp_path / "pgdata")], cwd=db.ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert busy.returncode == 1 and f"port {port} is already in use" in busy.stderr
    assert not (tmp_path / "pgdata").exists()  # refused before starting anything
    for bad in ("70000", "80", "http"):
        wrong = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "devstack.serve", "--port-base", bad], cwd=db.ROOT, env=env,
            capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and "--port-base" in wrong.stderr and "Traceback" not in wrong.stderr


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


def test_seed_users_are_found_and_no_key_is_in_the_repository() -> None:
    users = {user.email: user for user in serve.seed_users()}
    assert users["alice@example.com"].user_id == ALICE
    assert users["admin@example.com"].app_metadata.get("role") == "super_admin"
    # Anything in the seed is public: a license key there would spend Alice's credits anywhere.
    seed = db.SEED.read_text()
    assert not re.search(r"\bck_", seed) and "credit_license_keys" not in seed


def test_the_demo_license_key_is_random_per_data_directory(pg_server: str, tmp_path: Path) -> None:
    """The local stack stores its data directory's own key for Alice's account (and revokes the
    fixed key earlier seeds published); the key spends, a key of another directory does not."""
    dsn = db.create_database(pg_server, f"demo_key_{uuid.uuid4().hex[:8]}")
    migrate.apply_pending(dsn)
    mine = tokens.LocalKeys.load_or_create(tmp_path / "a.keys.json")
    other = tokens.LocalKeys.load_or_create(tmp_path / "b.keys.json")
    assert mine.demo_license_key.startswith("ck_demo_") and mine.demo_license_key != other.demo_license_key
    retired = "ck_demo_" + "0" * 58  # what earlier seeds stored and printed
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into public.credit_license_keys (account_id, name, prefix, key_hash)"
                     " select id, 'Demo server', 'ck_demo_000', sha256(convert_to(%s, 'UTF8'))"
                     " from public.credit_accounts where user_id = %s", (retired, ALICE))
    assert serve.ensure_demo_license_key(dsn, mine.demo_license_key)
    assert serve.ensure_demo_license_key(dsn, mine.demo_license_key)  # a restart: nothing new

    def spend(key: str) -> Any:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                return db.call_function(conn, "deduct_credits_by_license", {
                    "p_license_key": key, "p_idempotency_key": str(uuid.uuid4()), "p_amount": 1},
                    role="service_role")
            except psycopg.Error as exc:
                return exc.diag.message_primary

    assert spend(retired) == "license_key_inactive"
    assert spend(other.demo_license_key) == "invalid_license_key"
    spent = spend(mine.demo_license_key)
    assert spent["charged"] == 1
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select k.name, k.created_by::text, a.user_id::text from public.credit_license_keys k"
            " join public.credit_accounts a on a.id = k.account_id where k.revoked_at is null").fetchall()
    assert rows == [("Demo server", ALICE, ALICE)]  # one live key, Alice's, as if she made it
    # A keys file from before the demo key was kept there gets one, and keeps the rest.
    old_file = tmp_path / "old.keys.json"
    fields = {k: v for k, v in json.loads((tmp_path / "a.keys.json").read_text()).items()
              if k != "demo_license_key"}
    old_file.write_text(json.dumps(fields))
    upgraded = tokens.LocalKeys.load_or_create(old_file)
    assert upgraded.secret_key == mine.secret_key and upgraded.demo_license_key.startswith("ck_demo_")
    assert tokens.LocalKeys.load_or_create(old_file) == upgraded
    assert old_file.stat().st_mode & 0o777 == 0o600


def test_only_the_announcing_process_removes_the_announcement(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    path.write_text(json.dumps({"pid": os.getppid()}))  # another live process's stack
    assert serve.clear_state(path) is False and path.exists()
    path.write_text(json.dumps({"pid": os.getpid()}))
    assert serve.clear_state(path) is True and not path.exists()


def test_banner_names_every_endpoint() -> None:
    keys = tokens.LocalKeys.generate()
    stack = serve.Stack(dsn="host=/tmp/x port=5432 user=postgres dbname=credits",
                        rest_url="http://127.0.0.1:1", keys=keys, credits_url="http://127.0.0.1:2", webhook_url="http://127.0.0.1:3",
                        skipped={"reset": "not available"})
    text = serve.banner(stack)
    assert "http://127.0.0.1:1" in text and "/credits/balance" in text and "/stripe/webhook" in text
    # Both generations of API keys, the webhook secret, the psql command, the CORS origins.
    assert keys.publishable_key in text and keys.secret_key in text and keys.anon_key() in text
    assert keys.webhook_secret in text and "psql -h /tmp/x -p 5432 -U postgres credits" in text
    assert serve.CORS_ORIGINS in text
    assert "monthly reset    not available" in text
    assert f"export SECRET_KEY='{keys.secret_key}'" in text and "export API='http://127.0.0.1:2'" in text


def test_demo_tells_the_whole_story_on_a_running_stack(tmp_path: Path) -> None:
    """`./dev demo` end to end on the stack `./dev start` announced: every step checks
    its own balance, and the ledger is whole. A stale announcement is ignored."""
    out = io.StringIO()
    state = tmp_path / "stack.json"
    with serve.run_stack(tmp_path / "pgdata", port_base=None, reset_data=True, keep_data=False) as stack:
        serve.write_state(stack, state)
        found = serve.running_stack(state)
        assert found is not None
        assert (found.rest_url, found.credits_url) == (stack.rest_url, stack.credits_url)
        demo.Demo(found, out=out).run()
        with psycopg.connect(stack.dsn) as conn:
            dana = conn.execute(
                "select w.subscription, w.purchased from public.credit_wallets w "
                "join public.credit_accounts a on a.id = w.account_id "
                "join auth.users u on u.id = a.user_id where u.email like 'dana+%@example.com'").fetchone()
    text = out.getvalue()
    assert "0 mismatches" in text and "(duplicate)" in text and "(replayed)" in text
    assert dana == (500, 42)
    assert serve.running_stack(state) is None  # that stack is gone


def test_local_keys_are_random_per_data_directory(tmp_path: Path) -> None:
    first = tokens.LocalKeys.load_or_create(tmp_path / "a.keys.json")
    assert tokens.LocalKeys.load_or_create(tmp_path / "a.keys.json") == first  # kept
    other = tokens.LocalKeys.load_or_create(tmp_path / "b.keys.json")
    assert {first.jwt_secret, first.secret_key, first.webhook_secret, first.kid,
            first.demo_license_key}.isdisjoint(
        {other.jwt_secret, other.secret_key, other.webhook_secret, other.kid, other.demo_license_key})
    assert first.secret_key.startswith("sb_secret_") and first.publishable_key.startswith("sb_publishable_")
    claims = jwt.decode(first.anon_key(), first.jwt_secret, algorithms=["HS256"])
    assert claims["role"] == "anon" and claims["exp"] > time.time() + 5 * 365 * 86400
    token = first.user_token(ALICE, issuer="http://127.0.0.1:1/auth/v1")
    assert first.verify(token)["sub"] == ALICE
    with pytest.raises(jwt.InvalidTokenError):
        other.verify(token)
