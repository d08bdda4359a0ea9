"""Benchmark 4: the monthly reset of 100k and 1M accounts, with deducts running.

The reset is driven the way the scheduled Lambda drives it: ``run_monthly_reset``
as service_role, one batch per transaction, ``p_after = next_after`` until
done. Meanwhile pgbench runs ``deduct_credits`` from a few clients on random
accounts of the same database, and the p99 of the deducts that completed while
the reset ran is reported.
"""

from __future__ import annotations

import datetime as dt
import time

import psycopg

from benchmarks import load, pgbench, scripts
from benchmarks.config import Config
from benchmarks.results import Result, Row, ms, num
from benchmarks.server import Server
from benchmarks.stats import percentile
from devstack import db

TOTAL_1M_TARGET_S = 60.0
SCALE_RATIO_TARGET = 11.0
DEDUCT_P99_TARGET_MS = 50.0


def _terminate_pgbench(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                     "where datname = current_database() and application_name = 'pgbench'")


def run_reset(dsn: str, period_start: dt.date, batch: int) -> dict[str, float]:
    """Drive the reset to the end; returns totals and the longest batch."""
    batches: list[float] = []
    processed = 0
    after = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            out = db.call_function(conn, "run_monthly_reset", {
                "p_period_start": period_start.isoformat(), "p_batch_size": batch, "p_after": after})
            batches.append(time.perf_counter() - t0)
            processed += int(out["processed"])
            after = out["next_after"]
            if out["done"]:
                break
        total = time.perf_counter() - started
    return {"total_s": total, "batches": len(batches), "longest_batch_ms": max(batches) * 1000,
            "processed": processed}


def reset_one(server: Server, size: int, cfg: Config) -> dict[str, float]:
    bench = server.database(f"credits_bench_reset_{size}")
    try:
        with bench.connect() as conn:
            t0 = time.perf_counter()
            load.load_accounts(conn, size, purchased=1_000, previous_period=True)
            # Some accounts on a plan with a rollover cap: their renewal also
            # moves unused allowance into a promotional grant.
            conn.execute("insert into public.credit_plans (id, monthly_credits, rollover_cap) "
                         "values ('bench_rollover', 100, 2)")
            conn.execute("update public.credit_accounts set plan_id = 'bench_rollover' "
                         "where right(id::text, 1) = '0'")
            loaded = time.perf_counter() - t0
        period = dt.datetime.now(dt.UTC).date().replace(day=1)
        background = pgbench.Background("deduct during reset", bench.dsn, scripts.DEDUCT,
                                        clients=cfg.reset_clients, max_seconds=900,
                                        variables={"accounts": size}, rate=cfg.reset_deduct_rate)
        time.sleep(1.0)  # let the clients connect and warm up
        window_start = time.time()
        stats = run_reset(bench.dsn, period, cfg.reset_batch)
        window_end = time.time()
        deducts = background.stop(lambda: _terminate_pgbench(bench.dsn))
        during = [lat for finished, lat in deducts.samples if window_start <= finished <= window_end]
        # The next month's reset on the same accounts, with nothing else running:
        # what the reset costs by itself.
        following = (period.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        alone = run_reset(bench.dsn, following, cfg.reset_batch)
        with bench.connect() as conn:
            mismatches = conn.execute(
                "select jsonb_array_length(public.reconcile_credit_balances() -> 'mismatches')").fetchone()
        errors = {k: v for k, v in deducts.errors.items() if "terminating connection" not in k}
        return {**stats, "size": size, "load_s": loaded, "deducts": len(during),
                "alone_total_s": alone["total_s"], "alone_longest_batch_ms": alone["longest_batch_ms"],
                "deduct_p50_ms": percentile(during, 50), "deduct_p99_ms": percentile(during, 99),
                "deduct_errors": sum(errors.values()),
                "mismatches": mismatches[0] if mismatches else -1}
    finally:
        server.drop(bench)


def monthly_reset(server: Server, cfg: Config) -> Result:
    runs = [reset_one(server, size, cfg) for size in cfg.reset_sizes]
    small, large = runs[0], runs[-1]
    scale = large["total_s"] / small["total_s"] if small["total_s"] else float("nan")
    size_ratio = large["size"] / small["size"]
    rows: list[Row] = []
    for run in runs:
        label = f"{run['size']:,} accounts"
        is_1m = run["size"] == 1_000_000
        rows += [
            Row(f"{label}: total",
                f"{run['total_s']:.1f} s ({run['batches']} batches of {cfg.reset_batch:,})",
                f"<= {TOTAL_1M_TARGET_S:.0f} s" if is_1m else "",
                (run["total_s"] <= TOTAL_1M_TARGET_S) if is_1m else None, timing=True),
            Row(f"{label}: accounts renewed", num(run["processed"]), num(run["size"]),
                run["processed"] == run["size"]),
            Row(f"{label}: longest batch", ms(run["longest_batch_ms"])),
            Row(f"{label}: next month's reset with no other load",
                f"{run['alone_total_s']:.1f} s (longest batch {ms(run['alone_longest_batch_ms'])})"),
            Row(f"{label}: deduct p50 / p99 during reset "
                f"({cfg.reset_clients} clients at {cfg.reset_deduct_rate:,.0f}/s, {run['deducts']:,} calls)",
                f"{ms(run['deduct_p50_ms'])} / {ms(run['deduct_p99_ms'])}",
                f"p99 <= {DEDUCT_P99_TARGET_MS:.0f} ms",
                None if cfg.smoke else run["deduct_p99_ms"] <= DEDUCT_P99_TARGET_MS, timing=True),
            Row(f"{label}: deduct errors / ledger mismatches",
                f"{run['deduct_errors']} / {run['mismatches']}", "0 / 0",
                run["deduct_errors"] == 0 and run["mismatches"] == 0),
        ]
    rows.append(Row(f"time ratio {large['size']:,} / {small['size']:,} (size ratio {size_ratio:.0f})",
                    num(scale, 2), f"<= {SCALE_RATIO_TARGET:.0f}" if size_ratio == 10 else "",
                    (scale <= SCALE_RATIO_TARGET) if size_ratio == 10 and not cfg.smoke else None,
                    timing=True))
    summary = "4 monthly reset: " + "; ".join(
        f"{r['size']:,} accounts in {r['total_s']:.1f} s (longest batch {ms(r['longest_batch_ms'])}, "
        f"deduct p99 {ms(r['deduct_p99_ms'])})" for r in runs) + f"; time ratio {num(scale, 2)}"
    return Result("4 monthly reset", summary, rows, {"runs": runs, "time_ratio": scale})
