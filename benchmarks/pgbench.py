"""Running pgbench with our own scripts and reading its per-transaction log.

pgbench does the load (C clients, no Python in the measured loop). We always
run it with ``-M prepared`` (as PostgREST does, statements are prepared once
per connection) and ``-l`` so that latency percentiles come from every
transaction, not from pgbench's averages.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.server import pgbench_path
from benchmarks.stats import percentile

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_ERROR = re.compile(r"ERROR:\s+(.+?)\s*$", re.MULTILINE)
_ABORTED = re.compile(r"client \d+ aborted", re.MULTILINE)


@dataclass
class Run:
    """One pgbench run: throughput, per-transaction latencies, and what went wrong."""

    label: str
    tps: float
    transactions: int
    latencies_ms: list[float] = field(default_factory=list)
    # (completion time as epoch seconds, latency ms) for windowed views.
    samples: list[tuple[float, float]] = field(default_factory=list)
    failed: int = 0
    aborted_clients: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    exit_code: int = 0

    def p(self, pct: float) -> float:
        return percentile(self.latencies_ms, pct)


def _read_logs(prefix: Path) -> list[tuple[float, float]]:
    samples: list[tuple[float, float]] = []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in path.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us [...]
            if len(parts) < 6 or not parts[2].isdigit():
                continue  # a failed transaction ("failed") or a skipped one
            finished = int(parts[4]) + int(parts[5]) / 1e6
            samples.append((finished, int(parts[2]) / 1000.0))
    return samples


def _parse(label: str, proc: subprocess.CompletedProcess[str], prefix: Path) -> Run:
    out = proc.stdout
    # Exit status 1: pgbench did not run (bad script, no connection). 2 means
    # clients aborted on SQL errors, which the run reports as errors.
    if proc.returncode not in (0, 2):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pgbench ({label}) failed: {last}")
    tps = float(m.group(1)) if (m := _TPS.search(out)) else 0.0
    samples = _read_logs(prefix)
    errors = Counter(m.group(1) for m in _ERROR.finditer(proc.stderr))
    return Run(
        label=label,
        tps=tps,
        transactions=int(m.group(1)) if (m := _DONE.search(out)) else len(samples),
        latencies_ms=[lat for _, lat in samples],
        samples=samples,
        failed=int(m.group(1)) if (m := _FAILED.search(out)) else 0,
        aborted_clients=len(_ABORTED.findall(proc.stderr)),
        errors=errors,
        exit_code=proc.returncode,
    )


def command(dsn: str, script: Path, *, clients: int, seconds: float, log_prefix: Path,
            variables: dict[str, str | int] | None = None, rate: float | None = None) -> list[str]:
    threads = min(clients, 2)
    args = [pgbench_path(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
            "-T", str(max(1, round(seconds))), "-l", f"--log-prefix={log_prefix}", "-f", str(script)]
    if rate is not None:
        # Total transactions per second over all clients; logged latencies then
        # include any lag behind that schedule.
        args += ["-R", str(rate)]
    for name, value in (variables or {}).items():
        args += ["-D", f"{name}={value}"]
    args.append(dsn)
    return args


def run(label: str, dsn: str, script_text: str, *, clients: int, seconds: float,
        variables: dict[str, str | int] | None = None) -> Run:
    """Run ``script_text`` for ``seconds`` with ``clients`` connections."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        script = Path(tmp) / "script.sql"
        script.write_text(script_text)
        prefix = Path(tmp) / "log"
        proc = subprocess.run(command(dsn, script, clients=clients, seconds=seconds, log_prefix=prefix,
                                      variables=variables),
                              capture_output=True, text=True, check=False, timeout=seconds + 120)
        return _parse(label, proc, prefix)


class Background:
    """pgbench running while something else is measured (the monthly reset).

    pgbench cannot be told to stop early, so ``stop`` ends its sessions from
    the server side; the clients then finish and pgbench still writes its log.
    """

    def __init__(self, label: str, dsn: str, script_text: str, *, clients: int, max_seconds: float,
                 variables: dict[str, str | int] | None = None, rate: float | None = None) -> None:
        self.label = label
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-")
        tmp = Path(self._tmp.name)
        script = tmp / "script.sql"
        script.write_text(script_text)
        self._prefix = tmp / "log"
        self._proc = subprocess.Popen(
            command(dsn, script, clients=clients, seconds=max_seconds, log_prefix=self._prefix,
                    variables=variables, rate=rate),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self, terminate_sessions: Callable[[], None]) -> Run:
        terminate_sessions()
        stdout, stderr = self._proc.communicate(timeout=120)
        proc = subprocess.CompletedProcess(self._proc.args, self._proc.returncode, stdout, stderr)
        try:
            return _parse(self.label, proc, self._prefix)
        finally:
            self._tmp.cleanup()
