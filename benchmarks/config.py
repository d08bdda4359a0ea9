"""Benchmark sizes: the full run (numbers for docs/benchmarks.md) and the smoke
run (seconds; proves the command still works, asserts nothing about speed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    accounts: int = 10_000
    clients: int = 16
    rounds: int = 3  # per compared variant, interleaved A B A B ...
    seconds: float = 10.0  # per pgbench run
    hot_purchased: int = 10_000_000
    reset_sizes: tuple[int, ...] = (100_000, 1_000_000)
    reset_clients: int = 8
    reset_batch: int = 5_000
    import_runs: int = 5
    warm_requests: int = 300
    smoke: bool = False


FULL = Config()
SMOKE = Config(accounts=200, clients=2, rounds=1, seconds=1.0, hot_purchased=100_000,
               reset_sizes=(2_000, 4_000), reset_clients=2, reset_batch=500, import_runs=1,
               warm_requests=5, smoke=True)
