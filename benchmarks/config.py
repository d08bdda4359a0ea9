"""Benchmark sizes: the full run (numbers for docs/benchmarks.md) and the smoke
run (seconds; proves the command still works, asserts nothing about speed)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    accounts: int = 10_000
    clients: int = 16
    rounds: int = 3  # per compared variant, interleaved A B A B ...
    seconds: float = 10.0  # per pgbench run
    hot_purchased: int = 10_000_000
    reset_sizes: tuple[int, ...] = (100_000, 1_000_000)
    reset_clients: int = 8
    # Deducts per second (all clients) while the reset runs: a busy production
    # rate. Unthrottled, 8 clients take both cores and the reset's time then
    # measures the CPU scheduler rather than the reset.
    reset_deduct_rate: float = 400.0
    reset_batch: int = 1_000
    import_runs: int = 5
    # The embedded server's defaults (128 MB shared_buffers) suit a laptop, not
    # a database of a million accounts; 1 GB is what Supabase gives a 4 GB
    # ("medium") instance. Applied to the embedded server only.
    server_settings: dict[str, str] = field(default_factory=lambda: {"shared_buffers": "1GB"})
    warm_requests: int = 300
    parked_events: int = 3_000
    smoke: bool = False


FULL = Config()
SMOKE = Config(accounts=200, clients=2, rounds=1, seconds=1.0, hot_purchased=100_000,
               reset_sizes=(2_000, 4_000), reset_clients=2, reset_deduct_rate=50.0, reset_batch=500,
               import_runs=1, warm_requests=5, parked_events=300, smoke=True)
