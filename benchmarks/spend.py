"""Benchmarks 1-3: the spend path under pgbench, against the bare SQL pair.

Compared variants run interleaved (A B A B ...) so that whatever else the
machine is doing affects both alike; each ratio is the median of the per-round
ratios, throughputs are medians over rounds, latency percentiles are over every
transaction of every round.
"""

from __future__ import annotations

from benchmarks import load, pgbench, scripts
from benchmarks.config import Config
from benchmarks.results import Result, Row, ms, num
from benchmarks.server import BenchDatabase, Server
from benchmarks.stats import median, percentile, ratio

# Targets (issue "the spend path at the ceiling"), ratios of medians in one interleaved run.
TARGETS = {  # hot: (vs naive, vs bare)
    False: (1.15, 0.6),
    True: (1.05, 0.65),
}
RESERVE_CAPTURE_TARGET = 0.4   # a reserve + capture pair / a deduct
LICENSE_TARGET = 0.9           # a license-key deduct / a deduct
TOKENS_TARGET = 0.95           # a pair captured with tokens / a pair captured with an amount
LIMITED_TARGET = 0.85          # a deduct under spend limits / the same deduct on an account without


def prepare(server: Server, cfg: Config) -> BenchDatabase:
    """Accounts 1..N (each with a license key), plus the bare pair's tables."""
    bench = server.database("credits_bench_spend")
    with bench.connect() as conn:
        load.load_accounts(conn, cfg.accounts, purchased=cfg.hot_purchased, license_keys=True)
        load.load_baseline(conn, cfg.accounts, balance=cfg.hot_purchased)
        load.load_naive(conn, cfg.accounts, balance=cfg.hot_purchased)
        conn.execute("insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
                     "credits_per_1k_output_tokens) values ('bench-llm', 1, 1, 2) on conflict do nothing")
    return bench


def interleaved(bench: BenchDatabase, variants: dict[str, str], cfg: Config,
                accounts: int) -> dict[str, list[pgbench.Run]]:
    runs: dict[str, list[pgbench.Run]] = {label: [] for label in variants}
    for _ in range(cfg.rounds):
        for label, script in variants.items():
            runs[label].append(pgbench.run(label, bench.dsn, script, clients=cfg.clients, seconds=cfg.seconds,
                                           variables={"accounts": accounts}))
    return runs


def _latencies(runs: list[pgbench.Run]) -> list[float]:
    return [lat for run in runs for lat in run.latencies_ms]


def _errors(runs: list[pgbench.Run]) -> dict[str, int]:
    total: dict[str, int] = {}
    for run in runs:
        for name, count in run.errors.items():
            total[name] = total.get(name, 0) + count
        if run.failed and not run.errors:
            total["failed transactions"] = total.get("failed transactions", 0) + run.failed
    return total


def _describe(runs: list[pgbench.Run]) -> dict[str, float]:
    lat = _latencies(runs)
    return {"tps": median([r.tps for r in runs]), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "transactions": sum(r.transactions for r in runs)}


def _pair_ratio(a: list[pgbench.Run], b: list[pgbench.Run]) -> float:
    return median([ratio(x.tps, y.tps) for x, y in zip(a, b, strict=True)])


def _compare(name: str, label: str, runs: dict[str, list[pgbench.Run]], deadlocks: int, cfg: Config,
             *, hot: bool) -> Result:
    deduct, bare, naive = _describe(runs["deduct"]), _describe(runs["bare"]), _describe(runs["naive"])
    r_bare = _pair_ratio(runs["deduct"], runs["bare"])
    r_naive = _pair_ratio(runs["deduct"], runs["naive"])
    naive_target, bare_target = TARGETS[hot]
    errors = _errors(runs["deduct"])
    other_errors = {k: v for k, v in errors.items() if k != "insufficient_credits"}
    aborted = sum(run.aborted_clients for run in runs["deduct"])
    rows = [
        Row("deduct_credits tps (median)", num(deduct["tps"])),
        Row("naive design tps (median)", num(naive["tps"])),
        Row("bare pair tps (median)", num(bare["tps"])),
        Row("ratio deduct / naive (median of rounds)", num(r_naive, 2), f">= {naive_target}",
            None if cfg.smoke else r_naive >= naive_target, timing=True),
        Row("ratio deduct / bare (median of rounds)", num(r_bare, 2), f">= {bare_target}",
            None if cfg.smoke else r_bare >= bare_target, timing=True),
        Row("deduct p50 / p99", f"{ms(deduct['p50'])} / {ms(deduct['p99'])}"),
        Row("naive p50 / p99", f"{ms(naive['p50'])} / {ms(naive['p99'])}"),
        Row("bare pair p50 / p99", f"{ms(bare['p50'])} / {ms(bare['p99'])}"),
        Row("errors other than insufficient_credits", num(sum(other_errors.values()) + aborted), "0",
            not other_errors and not aborted),
    ]
    if "same_writes" in runs:
        same = _describe(runs["same_writes"])
        rows[3:3] = [
            Row("same writes as plain SQL tps (median)", num(same["tps"])),
            Row("ratio deduct / same writes (the function layer)",
                num(_pair_ratio(runs["deduct"], runs["same_writes"]), 2)),
            Row("ratio same writes / bare (the data model)",
                num(_pair_ratio(runs["same_writes"], runs["bare"]), 2)),
        ]
    if "bare_broadcast" in runs:
        # The same targets against the baselines with the contract's broadcast
        # added: what any contract-complete spend pays (no target of their own).
        floor, naive_b = _describe(runs["bare_broadcast"]), _describe(runs["naive_broadcast"])
        after = next(i for i, row in enumerate(rows) if row.metric.startswith("ratio deduct / bare")) + 1
        rows[after:after] = [
            Row("bare pair + broadcast tps (median): the v3 floor", num(floor["tps"])),
            Row("naive + broadcast tps (median)", num(naive_b["tps"])),
            Row("ratio (bare pair + broadcast) / naive: the floor against the target",
                num(_pair_ratio(runs["bare_broadcast"], runs["naive"]), 2)),
            Row("ratio deduct / (naive + broadcast)",
                num(_pair_ratio(runs["deduct"], runs["naive_broadcast"]), 2)),
            Row("ratio deduct / (bare pair + broadcast)",
                num(_pair_ratio(runs["deduct"], runs["bare_broadcast"]), 2)),
        ]
    if hot:
        rows.append(Row("deadlocks", num(deadlocks), "0", deadlocks == 0))
    summary = (f"{name}: {label}: deduct_credits {num(deduct['tps'])} tps (p50 {ms(deduct['p50'])}, "
               f"p99 {ms(deduct['p99'])}); naive {num(naive['tps'])} tps; bare pair {num(bare['tps'])} tps; "
               f"deduct/naive {num(r_naive, 2)} (target >= {naive_target}), deduct/bare {num(r_bare, 2)} "
               f"(target >= {bare_target}); errors {dict(errors) or 0}; deadlocks {deadlocks}")
    return Result(name, summary, rows, {"deduct": deduct, "bare": bare, "naive": naive, "ratio": r_bare,
                                        "ratio_naive": r_naive, "errors": errors,
                                        "aborted_clients": aborted, "deadlocks": deadlocks})


# The baselines with the live balance's broadcast (contract v3) added.
_BROADCAST_BASELINES = {"bare_broadcast": scripts.BARE_PAIR_BROADCAST,
                        "naive_broadcast": scripts.NAIVE_BROADCAST}


def deduct_spread(bench: BenchDatabase, cfg: Config) -> Result:
    """1. deduct_credits over N funded accounts vs the bare pair."""
    before = bench.deadlocks()
    variants = {"deduct": scripts.DEDUCT, "naive": scripts.NAIVE, "bare": scripts.BARE_PAIR,
                "same_writes": scripts.SAME_WRITES, **_BROADCAST_BASELINES}
    runs = interleaved(bench, variants, cfg, cfg.accounts)
    return _compare("1 deduct", f"{cfg.accounts:,} accounts, {cfg.clients} clients", runs,
                    bench.deadlocks() - before, cfg, hot=False)


def deduct_hot(bench: BenchDatabase, cfg: Config) -> Result:
    """2. Every call on one hot account vs the bare pair on one hot row."""
    before = bench.deadlocks()
    runs = interleaved(bench, {"deduct": scripts.DEDUCT, "naive": scripts.NAIVE, "bare": scripts.BARE_PAIR,
                               **_BROADCAST_BASELINES}, cfg, 1)
    return _compare("2 hot account", f"1 account, {cfg.clients} clients", runs,
                    bench.deadlocks() - before, cfg, hot=True)


def other_spends(bench: BenchDatabase, cfg: Config) -> Result:
    """3. reserve+capture pairs (amounts, tokens), license-key deducts and a deduct under spend limits."""
    even = scripts.on_even_accounts
    variants = {"deduct": even(scripts.DEDUCT), "reserve_capture": even(scripts.RESERVE_CAPTURE),
                "capture_tokens": even(scripts.RESERVE_CAPTURE_TOKENS),
                "by_license": even(scripts.DEDUCT_BY_LICENSE),
                "as_owner": scripts.DEDUCT_AS_OWNER, "limited": scripts.DEDUCT_AS_LIMITED}
    # Spend limits on the odd accounts for this benchmark only (the deduct variants here pick even ones).
    with bench.connect() as conn:
        load.load_limits(conn, cfg.accounts)
    try:
        runs = interleaved(bench, variants, cfg, cfg.accounts)
    finally:
        with bench.connect() as conn:
            load.drop_limits(conn)
    base = _describe(runs["deduct"])
    rows = [Row("deduct_credits tps (median)", num(base["tps"]))]
    data: dict[str, object] = {"deduct": base}
    parts = []
    titles = (("reserve_capture", "reserve+capture pairs", RESERVE_CAPTURE_TARGET, "deduct"),
              ("capture_tokens", "reserve+capture pairs priced from tokens", TOKENS_TARGET,
               "reserve_capture"),
              ("by_license", "deduct_credits_by_license", LICENSE_TARGET, "deduct"),
              ("as_owner", "deduct as the account's user", None, "deduct"),
              ("limited", "deduct as a user under spend limits", LIMITED_TARGET, "as_owner"))
    base_title = {"deduct": "deduct", "reserve_capture": "amount pairs", "as_owner": "same without limits"}
    for label, title, target, base_label in titles:
        d = _describe(runs[label])
        r = _pair_ratio(runs[label], runs[base_label])
        errors = _errors(runs[label])
        rows += [Row(f"{title} per s (median)", num(d["tps"])),
                 Row(f"{title} / {base_title[base_label]}", num(r, 2),
                     f">= {target}" if target else "",
                     None if cfg.smoke or target is None else r >= target, timing=True),
                 Row(f"{title} p50 / p99", f"{ms(d['p50'])} / {ms(d['p99'])}"),
                 Row(f"{title} errors", num(sum(errors.values())), "0", not errors)]
        data[label] = {**d, "ratio_to_deduct": r, "errors": errors}
        parts.append(f"{title} {num(d['tps'])}/s ({num(r, 2)}x {base_title[base_label]}, "
                     f"p99 {ms(d['p99'])})")
    summary = (f"3 holds and license keys: {cfg.accounts:,} accounts, {cfg.clients} clients: "
               f"deduct {num(base['tps'])} tps; " + "; ".join(parts))
    return Result("3 holds + license", summary, rows, data)
