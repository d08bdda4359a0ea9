"""`python -m benchmarks` (``./dev bench``): run every benchmark, print one
summary line per benchmark and a table.

    ./dev bench                 full run (about 15 minutes on 2 cores)
    ./dev bench --smoke         seconds: proves the command works, no timing verdicts
    ./dev bench --only 1,2      a subset (1 deduct, 2 hot, 3 holds/license, 4 reset, 5 cold start,
                                6 parked Stripe events, 7 live balance and alerts, 8 usage analytics)
    ./dev bench --json out.json raw numbers as well

PostgreSQL is embedded unless DATABASE_URL names a server (the benchmark
creates and drops its own databases there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks import coldstart, live_balance, reset, spend, stripe_parked, usage
from benchmarks.config import FULL, SMOKE, Config
from benchmarks.results import Result, table, verdict
from benchmarks.server import Server

ALL = ("1", "2", "3", "4", "5", "6", "7", "8")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds in all, no timing verdicts")
    parser.add_argument("--only", default=",".join(ALL),
                        help="comma-separated benchmark numbers (default: all)")
    parser.add_argument("--seconds", type=float, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per compared variant")
    parser.add_argument("--reset-sizes", help="comma-separated account counts for the reset benchmark")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    return parser.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    cfg = SMOKE if args.smoke else FULL
    changes: dict[str, object] = {}
    if args.seconds:
        changes["seconds"] = args.seconds
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.reset_sizes:
        changes["reset_sizes"] = tuple(int(x) for x in args.reset_sizes.split(","))
    return dataclasses.replace(cfg, **changes)


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = config(args)
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in ALL]
    if unknown:
        print(f"unknown benchmark {unknown[0]} (choose from {', '.join(ALL)})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    server = Server(cfg.server_settings)
    results: list[Result] = []
    try:
        bench = spend.prepare(server, cfg) if {"1", "2", "3", "5", "7"} & set(wanted) else None
        settings = bench.settings() if bench else {}
        print(f"# {machine()}" + (" [smoke]" if cfg.smoke else ""), flush=True)
        if settings:
            print("# PostgreSQL " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
        steps = {
            "1": lambda: spend.deduct_spread(bench, cfg),
            "2": lambda: spend.deduct_hot(bench, cfg),
            "3": lambda: spend.other_spends(bench, cfg),
            "4": lambda: reset.monthly_reset(server, cfg),
            "5": lambda: coldstart.cold_start(bench, cfg),
            "6": lambda: stripe_parked.parked_release(server, cfg),
            "7": lambda: live_balance.live_balance(bench, cfg),
            "8": lambda: usage.usage_analytics(server, cfg),
        }
        for key in wanted:
            result = steps[key]()
            results.append(result)
            mark = verdict(result.ok)
            print(result.summary + (f" [{mark}]" if mark else ""), flush=True)
    finally:
        server.close()
    print()
    print(table(results))
    print(f"\n# {time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "smoke": cfg.smoke,
                                         "config": dataclasses.asdict(cfg),
                                         "results": {r.name: r.data for r in results}},
                                        indent=2, default=str))
    # A missed speed target is a finding for docs/benchmarks.md, not a
    # failure; a broken run (errors, deadlocks, unrenewed accounts, ledger
    # mismatches) is, in the smoke run too, which is how CI catches it.
    broken = [f"{r.name}: {metric}" for r in results for metric in r.broken]
    if broken:
        print("\nFAILED: " + "; ".join(broken), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
