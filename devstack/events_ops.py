"""Operators' view of credit events, and notify on the local stack.

    ./dev events list [--failed | --pending | --delivered | --all] [--account ID] [--limit N]
                      [--database-url URL]
    ./dev events resend <event id> [--database-url URL]

``list`` shows events newest first with their delivery state (default: the
failed ones, which notify gave up on after 72 hours or which were written
while no webhook was set). ``resend`` puts one event back in the queue,
pending with no attempts and 72 hours ahead of it, keeping its ``event_id``
and ``seq`` (receivers de-duplicate by ``event_id``): use it once the
receiver is fixed. notify sends it on its next run, after the account's
earlier events.

Without ``--database-url`` the commands use the running local stack
(``./dev start``); with it, any database the migrations were applied to (a
Supabase project's connection string, as a user allowed to act as
``service_role``).

``./dev start`` also runs notify itself (``NotifyLoop``): every
``NOTIFY_INTERVAL_SECONDS`` (default 5), with ``NOTIFY_WEBHOOK_URL`` and
``NOTIFY_SIGNING_SECRET`` from its environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import psycopg

from devstack import db
from devstack.stripe_ops import local_dsn

DEFAULT_INTERVAL_SECONDS = 5.0
# A local run is given what a scheduled Lambda run would have.
RUN_LIMIT_MS = 60_000


def list_events(conn: psycopg.Connection, status: str | None, account_id: str | None,
                limit: int) -> list[dict[str, Any]]:
    return list(db.call_function(conn, "list_credit_events",
                                 {"p_status": status, "p_account_id": account_id, "p_limit": limit},
                                 role="service_role") or [])


def resend(conn: psycopg.Connection, event_id: str) -> dict[str, Any]:
    try:
        out: dict[str, Any] = db.call_function(conn, "resend_credit_event", {"p_event_id": event_id},
                                               role="service_role")
    except psycopg.Error as exc:
        if exc.diag.message_primary == "event_not_found" or exc.sqlstate == "22P02":
            raise SystemExit(f"no event {event_id}") from None
        raise
    return out


def _time(value: Any) -> str:
    return str(value or "")[:19].replace("T", " ")


def table(events: list[dict[str, Any]]) -> list[str]:
    header = ("event", "account", "seq", "type", "status", "attempts", "last error", "created (UTC)",
              "next attempt (UTC)")
    rows = [(e["event_id"], e["account_id"], str(e["seq"]), e["type"], e["status"], str(e["attempts"]),
             e.get("last_error") or "", _time(e["created_at"]),
             _time(e["next_attempt_at"]) if e["status"] == "pending" else "") for e in events]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev events", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url",
                        help="a database with the migrations applied (default: ./dev start's)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list events, newest first (default: the failed ones)")
    which = listing.add_mutually_exclusive_group()
    for status in ("failed", "pending", "delivered"):
        which.add_argument(f"--{status}", action="store_const", const=status, dest="status")
    which.add_argument("--all", action="store_const", const="all", dest="status")
    listing.add_argument("--account", help="only this account's events (its id)")
    listing.add_argument("--limit", type=int, default=100)
    again = commands.add_parser("resend", help="send one event again (same event_id and seq)")
    again.add_argument("event_id")
    args = parser.parse_args(argv)
    dsn = args.database_url or local_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        if args.command == "list":
            status = None if args.status == "all" else (args.status or "failed")
            try:
                events = list_events(conn, status, args.account, args.limit)
            except psycopg.Error as exc:
                raise SystemExit(f"cannot list events: {exc.diag.message_primary} "
                                 f"{exc.diag.message_detail or ''}".rstrip()) from None
            for line in table(events):
                print(line)
            return 0
        out = resend(conn, args.event_id)
        print(f"{out['event_id']}: pending again (account {out['account_id']}, seq {out['seq']},"
              f" {out['type']})")
        return 0


# --- notify on the local stack --------------------------------------------------------


def notify_env(base: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """notify's settings: the stack's (``base``) plus the ``NOTIFY_*`` variables of ``environ``."""
    env = dict(base)
    source = os.environ if environ is None else environ
    env.update({k: v for k, v in source.items()
                if k.startswith("NOTIFY_") and k != "NOTIFY_INTERVAL_SECONDS"})
    return env


def interval_seconds(environ: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if environ is None else environ).get("NOTIFY_INTERVAL_SECONDS", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        raise SystemExit(f"NOTIFY_INTERVAL_SECONDS is not a number: {raw!r}") from None
    if value <= 0:
        raise SystemExit("NOTIFY_INTERVAL_SECONDS must be above 0")
    return value


class NotifyLoop:
    """notify every ``interval`` seconds in a daemon thread, as the schedule runs the Lambda.

    Its settings come from ``env`` only (re-read from the same mapping every 5
    minutes, as the Lambda re-reads its own); a run that fails is logged once
    per distinct reason and tried again at the next tick.
    """

    def __init__(self, env: Mapping[str, str], interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        from functions.notify import RpcDatabase
        from functions.settings import LiveSettings, NotifySettings

        self.interval = interval
        self.settings = LiveSettings(NotifySettings, environ=dict(env))  # SettingsError: named, at start
        self._database = RpcDatabase(self.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._last_problem: str | None = None
        self.runs = 0

    def describe(self) -> str:
        """One line for the banner: whether events are sent, and where."""
        from functions.notify import redacted_url

        current = self.settings.get()
        every = f"every {self.interval:g} s"
        if current.notify_webhook_url is None:
            return (f"not sent (set NOTIFY_WEBHOOK_URL and NOTIFY_SIGNING_SECRET); swept {every};"
                    " ./dev events list --all")
        return f"sent {every} to {redacted_url(current.notify_webhook_url)}   (./dev events list)"

    def run_once(self) -> dict[str, Any]:
        from functions.notify import run_notify, time_left

        return run_notify(self._database, self.settings.get(), remaining_ms=time_left(RUN_LIMIT_MS))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                summary = self.run_once()
                self.runs += 1
                self._last_problem = None
                if summary["claimed"]:
                    print(f"notify: {summary['delivered']} delivered, {summary['failed']} failed", flush=True)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if problem != self._last_problem:
                    self._last_problem = problem
                    print(f"notify: run failed ({problem}); retrying every {self.interval:g} s",
                          file=sys.stderr, flush=True)

    def start(self) -> NotifyLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> NotifyLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
