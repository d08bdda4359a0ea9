"""Benchmark 7: what the live balance and balance alerts cost a spend.

Every committed change of a balance is broadcast (realtime.send of the balance
object, from a deferred trigger at commit) and checked against the account's
alerts. Compared, interleaved on the same database: the deduct as shipped; the
same deduct with the watch trigger disabled (no broadcast, no alert: what the
spend cost before); and the deduct on accounts that have an alert far below
their balance (armed, never crossed: alerts cost one comparison).
"""

from __future__ import annotations

from benchmarks import load, pgbench, scripts
from benchmarks.config import Config
from benchmarks.results import Result, Row, ms, num
from benchmarks.server import BenchDatabase
from benchmarks.spend import _describe, _errors, _pair_ratio

BROADCAST_TARGET = 0.8   # the deduct with broadcasting / without
ALERTS_TARGET = 0.97     # on accounts with an armed alert / without

def _set_watch(bench: BenchDatabase, enabled: bool) -> None:
    action = "enable" if enabled else "disable"
    with bench.connect() as conn:
        conn.execute(f"alter table public.credit_wallets {action} trigger credit_wallets_watch")


def live_balance(bench: BenchDatabase, cfg: Config) -> Result:
    """7. deduct with the broadcast and alerts vs without."""
    even = scripts.on_even_accounts
    odd = scripts.DEDUCT.replace("\\set n random(1, :accounts)",
                                 "\\set n 2 * random(1, :accounts / 2) - 1", 1)
    with bench.connect() as conn:
        load.load_alerts(conn, cfg.accounts)
    runs: dict[str, list[pgbench.Run]] = {"broadcast": [], "without": [], "alerts": []}
    try:
        for _ in range(cfg.rounds):
            for label, script in (("broadcast", even(scripts.DEDUCT)), ("alerts", odd)):
                runs[label].append(pgbench.run(label, bench.dsn, script, clients=cfg.clients,
                                               seconds=cfg.seconds, variables={"accounts": cfg.accounts}))
            _set_watch(bench, False)
            try:
                runs["without"].append(pgbench.run("without", bench.dsn, even(scripts.DEDUCT),
                                                   clients=cfg.clients, seconds=cfg.seconds,
                                                   variables={"accounts": cfg.accounts}))
            finally:
                _set_watch(bench, True)
    finally:
        with bench.connect() as conn:
            load.drop_alerts(conn)
    with_, without, alerts = (_describe(runs[k]) for k in ("broadcast", "without", "alerts"))
    r_broadcast = _pair_ratio(runs["broadcast"], runs["without"])
    r_alerts = _pair_ratio(runs["alerts"], runs["broadcast"])
    errors = {k: _errors(v) for k, v in runs.items()}
    bad = {k: v for k, e in errors.items() for k2, v in e.items() if k2 != "insufficient_credits"}
    rows = [
        Row("deduct with broadcast tps (median)", num(with_["tps"])),
        Row("deduct without (watch trigger disabled) tps (median)", num(without["tps"])),
        Row("deduct on accounts with an armed alert tps (median)", num(alerts["tps"])),
        Row("with broadcast / without", num(r_broadcast, 2), f">= {BROADCAST_TARGET}",
            None if cfg.smoke else r_broadcast >= BROADCAST_TARGET, timing=True),
        Row("with an armed alert / without an alert", num(r_alerts, 2), f">= {ALERTS_TARGET}",
            None if cfg.smoke else r_alerts >= ALERTS_TARGET, timing=True),
        Row("with broadcast p50 / p99", f"{ms(with_['p50'])} / {ms(with_['p99'])}"),
        Row("without p50 / p99", f"{ms(without['p50'])} / {ms(without['p99'])}"),
        Row("errors other than insufficient_credits", num(sum(bad.values())), "0", not bad),
    ]
    summary = (f"7 live balance: {cfg.accounts:,} accounts, {cfg.clients} clients: deduct with broadcast "
               f"{num(with_['tps'])} tps, without {num(without['tps'])} tps ({num(r_broadcast, 2)}x, "
               f"target >= {BROADCAST_TARGET}); with an armed alert {num(alerts['tps'])} tps "
               f"({num(r_alerts, 2)}x, target >= {ALERTS_TARGET})")
    return Result("7 live balance", summary, rows, {"broadcast": with_, "without": without, "alerts": alerts,
                                                    "ratio": r_broadcast, "ratio_alerts": r_alerts,
                                                    "errors": errors})
