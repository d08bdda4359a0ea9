"""Benchmark 6: thousands of Stripe events parked on one customer, then the
event that links the customer to an account.

The events are recorded through ``handle_stripe_event`` as the webhook records
them (normalised facts, service role). While the linking event runs, another
customer's events keep arriving on other connections; their latency shows
whether the release holds everyone up. The rest of the release is then
drained with ``release_stripe_events`` until nothing is ready.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg

from benchmarks.config import Config
from benchmarks.results import Result, Row, ms, num
from benchmarks.server import Server
from benchmarks.stats import percentile
from devstack import db

LINK_TARGET_S = 2.0


def _event(conn: psycopg.Connection, event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return db.call_function(conn, "handle_stripe_event",
                            {"p_event_id": f"evt_{uuid.uuid4().hex}", "p_type": event_type,
                             "p_payload": {"created": int(time.time()), **payload}}, role="service_role")


def _pack(conn: psycopg.Connection, customer: str, account_id: str | None = None) -> dict[str, Any]:
    return _event(conn, "checkout.session.completed", {
        "session": f"cs_{uuid.uuid4().hex}", "mode": "payment", "payment_status": "paid", "credits": 1,
        "customer": customer, "payment_intent": f"pi_{uuid.uuid4().hex}", "account_id": account_id})


def parked_release(server: Server, cfg: Config) -> Result:
    bench = server.database("credits_bench_parked")
    count = cfg.parked_events
    try:
        with bench.connect() as conn:
            accounts = []
            for _ in range(2):
                user = str(uuid.uuid4())
                conn.execute("insert into auth.users (id, email) values (%s, %s)",
                             (user, f"{user}@example.test"))
                row = conn.execute("select id from public.credit_accounts where user_id = %s",
                                   (user,)).fetchone()
                accounts.append(str(row[0]) if row else "")
            account, other_account = accounts
            customer = f"cus_{uuid.uuid4().hex}"
            t0 = time.perf_counter()
            parked = sum(_pack(conn, customer)["outcome"] == "parked" for _ in range(count))
            park_s = time.perf_counter() - t0

        stop = threading.Event()
        latencies: list[float] = []
        errors: list[str] = []

        def other_customer() -> None:
            with bench.connect() as c:
                other = f"cus_{uuid.uuid4().hex}"
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        _pack(c, other, other_account)
                    except psycopg.Error as exc:
                        errors.append(type(exc).__name__)
                    latencies.append((time.perf_counter() - t) * 1000)
                    time.sleep(0.02)

        worker = threading.Thread(target=other_customer, daemon=True)
        worker.start()
        time.sleep(0.3)
        with bench.connect() as conn:
            t0 = time.perf_counter()
            linked = _event(conn, "checkout.session.completed", {
                "session": f"cs_{uuid.uuid4().hex}", "mode": "subscription", "customer": customer,
                "subscription": f"sub_{uuid.uuid4().hex}", "account_id": account})
            link_s = time.perf_counter() - t0
            during = list(latencies)
            t0 = time.perf_counter()
            calls = 0
            while True:
                calls += 1
                out = db.call_function(conn, "release_stripe_events", {"p_limit": 500}, role="service_role")
                if out["remaining"] == 0:
                    break
            drain_s = time.perf_counter() - t0
            stop.set()
            worker.join(timeout=10)
            credited = conn.execute("select purchased from public.credit_wallets where account_id = %s",
                                    (account,)).fetchone()[0]
    finally:
        server.drop(bench)
    p99 = percentile(during, 99) if during else float("nan")
    rows = [
        Row(f"{count:,} events parked on one customer", f"{park_s:.1f} s to record ({parked:,} parked)",
            "", parked == count),
        Row("the linking event answers in",
            f"{link_s * 1000:,.0f} ms ({linked['ready']:,} made ready, released by calls of their own)",
            f"<= {LINK_TARGET_S:.0f} s", None if cfg.smoke else link_s <= LINK_TARGET_S, timing=True),
        Row("another customer's events meanwhile, p50 / p99",
            f"{ms(percentile(during, 50) if during else float('nan'))} / {ms(p99)} ({len(during)} calls)"),
        Row("the rest released by release_stripe_events", f"{drain_s:.1f} s in {calls} calls"),
        Row("credits from the released events / errors", f"{num(credited)} / {len(errors)}", f"{count:,} / 0",
            credited == count and not errors),
    ]
    summary = (f"6 parked events: {count:,} parked on one customer; linking event {link_s * 1000:,.0f} ms "
               f"(target <= {LINK_TARGET_S:.0f} s); another customer's p99 meanwhile {ms(p99)}; "
               f"rest released in {drain_s:.1f} s")
    return Result("6 parked events", summary, rows,
                  {"link_s": link_s, "drain_s": drain_s, "other_p99_ms": p99})
