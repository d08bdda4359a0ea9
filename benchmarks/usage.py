"""Benchmark 8: usage analytics over a large ledger, and the spend while the roll-up runs.

The ledger is loaded set-based (as ``benchmarks.load`` loads accounts): spends
written straight into ``credit_transactions`` with the columns the functions
write, ids that are UUIDv7 of their own time (as ``private.uuid_v7()`` gives
them) and wallets (and their purchase grants) lowered by what was spent, so
every balance is still its ledger. One account has 100,000 spends over the
last 30 days across four models and five operations, with refunds; the other
accounts fill the ledger to 10,000,000 rows. Then ``roll_up_credit_usage``
rolls the history up, as its first runs on an existing project do, and:

* the 30-day breakdown by model and operation in daily bins is called as the
  REST layer calls it (role ``authenticated``, the owner's JWT claims), its
  latency percentiles against the target, and once with the roll-up's state
  emptied (everything read live from the ledger) for comparison;
* ``deduct_credits`` runs under pgbench alone and with the roll-up called
  every second alongside (60 times as often as notify calls it), interleaved,
  and their throughputs are compared.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from benchmarks import load, pgbench, scripts
from benchmarks.config import Config
from benchmarks.results import Result, Row, ms, num
from benchmarks.server import BenchDatabase, Server
from benchmarks.stats import median, percentile, ratio

TARGET_P95_MS = 50.0   # the 30-day breakdown (issue "usage analytics")
DEDUCT_TARGET = 0.97   # deduct throughput with the roll-up running / without
DAYS = 30
MODELS = 4
OPERATIONS = 5
REFUND_EVERY = 50      # one spend in this many is refunded (1 credit), an hour later
PURCHASED = 10_000_000


@dataclass(frozen=True)
class Sizes:
    accounts: int          # the analytics account (n = 1) and the fillers
    account_spends: int    # the analytics account's spends
    filler_spends: int     # per filler account
    queries: int


FULL = Sizes(accounts=10_000, account_spends=100_000, filler_spends=990, queries=300)
SMOKE = Sizes(accounts=200, account_spends=5_000, filler_spends=500, queries=20)

# A spend of account n, number k, at time ``at``: its id is a UUIDv7 of that millisecond.
_SPEND_ID = ("(lpad(to_hex((extract(epoch from {at}) * 1000)::bigint), 12, '0') || '7' "
             "|| substr(md5('bench-usage-' || {n} || ':' || {k}), 1, 3) || '8' "
             "|| substr(md5('bench-usage-' || {n} || ':' || {k}), 4, 15))::uuid")


_COLUMNS = ("id, account_id, kind, origin, idempotency_key, request_hash, purchased, promotional_after, "
            "subscription_after, purchased_after, held_after, operation, model, input_tokens, output_tokens, "
            "actor_id, ref_id, metadata, created_at")


def _spends_sql(accounts: str, per: str) -> str:
    """The rows (``_COLUMNS``) of ``per`` spends for each account of the query ``accounts`` (n,
    account_id, user_id), evenly over the last DAYS days, oldest first."""
    return f"""
        select {_SPEND_ID.format(at='x.at', n='x.n', k='x.k')}, x.account_id, 'spend'::private.entry_kind,
               'api'::private.entry_origin, 'bench-usage-' || x.k, md5('bench-usage')::uuid, -1::bigint,
               0::bigint, 3::bigint, {PURCHASED} - x.k, 0::bigint, 'op-' || mod(x.k, {OPERATIONS}),
               'model-' || mod(x.k, {MODELS}), 100 * mod(x.k, 7), 40 * mod(x.k, 11), x.user_id, null::uuid,
               '{{}}'::jsonb, x.at as created_at
          from generate_series(1, {per}) k
         cross join lateral (
           select a.n, a.account_id, a.user_id, k,
                  %(start)s::timestamptz + (k - 1) * %(span)s::interval / {per}
                  + a.n * interval '1 millisecond' as at
             from ({accounts}) a) x
    """


def _refunds_sql(per: int) -> str:
    """The rows of the refunds of the analytics account's spends: 1 credit of one spend in
    REFUND_EVERY, an hour after it (those already in the past)."""
    at = (f"(%(start)s::timestamptz + (k - 1) * %(span)s::interval / {per} + interval '1 millisecond' "
          "+ interval '1 hour')")
    return f"""
        select {_SPEND_ID.format(at=at, n='-1', k='k')}, {load.account_id_sql('1')},
               'refund'::private.entry_kind, 'api'::private.entry_origin, 'bench-usage-refund-' || k,
               md5('bench-refund')::uuid, 1::bigint, 0::bigint, 3::bigint, 0::bigint, 0::bigint, null, null,
               null::integer, null::integer, null::uuid,
               {_SPEND_ID.format(at=at + " - interval '1 hour'", n='1', k='k')},
               jsonb_build_object('refund_of', 'bench'), {at} as created_at
          from generate_series(1, {per}, {REFUND_EVERY}) k
         where {at} < now()
    """


def _accounts_sql(first: int, last: int) -> str:
    return (f"select n, {load.account_id_sql('n')} as account_id, md5('bench-user-' || n)::uuid as user_id "
            f"from generate_series({first}, {last}) n")


def load_ledger(conn: psycopg.Connection, sizes: Sizes) -> dict[str, float]:
    """Accounts 1..N (load.load_accounts), then the spends and refunds; returns load figures."""
    started = time.perf_counter()
    load.load_accounts(conn, sizes.accounts, purchased=PURCHASED)
    window = {"start": _one(conn, "select now() - make_interval(days => %s)", (DAYS,)),
              "span": f"{DAYS * 86400 - 600} seconds"}  # the last spend ten minutes ago
    with conn.transaction():
        # The triggers of the books' guard and of the balance events are not the point here;
        # the rows are what the functions write.
        conn.execute("set local session_replication_role = replica")
        conn.execute("set local synchronous_commit = off")
        conn.execute(f"insert into public.credit_transactions ({_COLUMNS}) "
                     + _spends_sql(_accounts_sql(2, sizes.accounts), str(sizes.filler_spends)), window)
        # The analytics account's spends and refunds in the order of their time, as they would be written.
        conn.execute(f"insert into public.credit_transactions ({_COLUMNS}) select * from ("
                     + _spends_sql(_accounts_sql(1, 1), str(sizes.account_spends)) + " union all "
                     + _refunds_sql(sizes.account_spends) + ") r order by r.created_at", window)
        # Wallets and the purchase grants give what the rows took.
        conn.execute(
            """
            with spent as (
              select account_id, sum(purchased) as change from public.credit_transactions
               where kind in ('spend', 'refund') and idempotency_key like 'bench-usage-%%'
               group by account_id)
            update public.credit_wallets w set purchased = w.purchased + s.change
              from spent s where w.account_id = s.account_id
            """)
        conn.execute(
            """
            update private.grants g set remaining = w.purchased
              from public.credit_wallets w
             where g.account_id = w.account_id and g.pool = 'purchased' and g.source = 'adjustment'
            """)
    conn.execute("vacuum analyze public.credit_transactions, public.credit_wallets, private.grants")
    rows = conn.execute("select count(*) from public.credit_transactions").fetchone()
    return {"rows": float(rows[0]) if rows else 0.0, "seconds": time.perf_counter() - started}


def roll_up(conn: psycopg.Connection, until_caught_up_with: float) -> tuple[int, int, float]:
    """Call the roll-up (as the service) until its watermark passes the given epoch second;
    returns (calls, rows rolled up, seconds)."""
    started = time.perf_counter()
    calls = rows = 0
    while True:
        result = _service_roll_up(conn)
        calls += 1
        rows += int(result.get("rows") or 0)
        until = _one(conn, "select extract(epoch from rolled_until) from private.usage_rollup")
        if until is not None and float(until) > until_caught_up_with:
            return calls, rows, time.perf_counter() - started
        if result.get("pending_until") is None or not result.get("batches"):
            time.sleep(1.0)  # a new watermark needs a mark two seconds old


def _service_roll_up(conn: psycopg.Connection) -> dict[str, object]:
    with conn.transaction():
        conn.execute("set local role service_role")
        conn.execute("select set_config('request.jwt.claims', '{\"role\": \"service_role\"}', true)")
        row = conn.execute("select public.roll_up_credit_usage()").fetchone()
    result: dict[str, object] = row[0] if row else {}
    return result


def _one(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def query_times(conn: psycopg.Connection, account_id: str, user_id: str, end: Any, runs: int, *,
                live_only: bool = False) -> tuple[list[float], dict[str, object]]:
    """Latencies (ms) of the breakdown by model and operation in daily bins over the DAYS days
    before ``end``, called as the account's owner the way the REST layer calls it; and the last answer."""
    claims = json.dumps({"sub": user_id, "role": "authenticated", "aud": "authenticated"})
    times: list[float] = []
    answer: dict[str, object] = {}
    for _ in range(runs):
        started = time.perf_counter()
        with conn.transaction(force_rollback=live_only):
            if live_only:
                # The roll-up emptied for this transaction only: everything is read live.
                conn.execute("update private.usage_rollup set rolled_until = null, rolled_seq = 0")
                conn.execute("delete from private.usage_hours where account_id = %s", (account_id,))
                started = time.perf_counter()
            conn.execute("set local role authenticated")
            conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
            row = conn.execute(
                "select public.get_credit_usage(p_account_id => %(a)s::uuid, "
                "p_from => %(end)s::timestamptz - make_interval(days => %(d)s), "
                "p_to => %(end)s::timestamptz, p_group_by => '{model,operation}', p_bin => 'day')",
                {"a": account_id, "end": end, "d": DAYS}).fetchone()
        times.append((time.perf_counter() - started) * 1000)
        answer = row[0] if row else {}
    return times, answer


def ledger_total(conn: psycopg.Connection, account_id: str, end: Any) -> int:
    """The account's credits net of refunds over the same days, from the credit_usage view and the
    refund rows (refunds count at their own time)."""
    row = conn.execute(
        """
        select coalesce((select sum(u.credits) from public.credit_usage u
                          where u.account_id = %(a)s and u.created_at < %(end)s
                            and u.created_at >= %(end)s::timestamptz - make_interval(days => %(d)s)), 0)
             - coalesce((select sum(t.purchased) from public.credit_transactions t
                          where t.account_id = %(a)s and t.kind = 'refund' and t.created_at < %(end)s
                            and t.created_at >= %(end)s::timestamptz - make_interval(days => %(d)s)), 0)
        """, {"a": account_id, "d": DAYS, "end": end}).fetchone()
    return int(row[0]) if row else 0


class RollUpLoop:
    """The roll-up called every ``interval`` seconds on its own connection (while pgbench runs)."""

    def __init__(self, dsn: str, interval: float = 1.0) -> None:
        self._dsn = dsn
        self._interval = interval
        self._stop = threading.Event()
        self.durations_ms: list[float] = []
        self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RollUpLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    _service_roll_up(conn)
                except psycopg.Error:
                    self.errors += 1
                self.durations_ms.append((time.perf_counter() - started) * 1000)
                self._stop.wait(self._interval)


def usage_analytics(server: Server, cfg: Config) -> Result:
    """8. The 30-day usage breakdown of one account over a large ledger; deducts with the roll-up running."""
    sizes = SMOKE if cfg.smoke else FULL
    bench = server.database("credits_bench_usage")
    try:
        return _run(bench, cfg, sizes)
    finally:
        server.drop(bench)


def _run(bench: BenchDatabase, cfg: Config, sizes: Sizes) -> Result:
    with bench.connect() as conn:
        loaded = load_ledger(conn, sizes)
        account_id = str(_one(conn, f"select {load.account_id_sql('1')}"))
        user_id = str(_one(conn, "select md5('bench-user-1')::uuid"))
        loaded_at = float(_one(conn, "select extract(epoch from clock_timestamp())"))
        calls, rolled_rows, rolled_seconds = roll_up(conn, loaded_at)
        conn.execute("vacuum analyze private.usage_hours")
        # A live tail: spends made now through the function, after the watermark.
        for i in range(200 if not cfg.smoke else 20):
            conn.execute("select public.deduct_credits(%s, %s, 1, p_operation => null, p_model => %s)",
                         (account_id, f"bench-usage-live-{i}", f"model-{i % MODELS}"))
        end = _one(conn, "select clock_timestamp()")
        times, answer = query_times(conn, account_id, user_id, end, sizes.queries)
        live_times, live_answer = query_times(conn, account_id, user_id, end, max(5, sizes.queries // 20),
                                              live_only=True)
        expected = ledger_total(conn, account_id, end)
        hours = _one(conn, "select count(*) from private.usage_hours")
    total = answer.get("total") if isinstance(answer, dict) else None
    got = total.get("credits") if isinstance(total, dict) else None
    live_total = live_answer.get("total") if isinstance(live_answer, dict) else None
    answer_rows = answer.get("rows") if isinstance(answer, dict) else None
    correct = got == expected and live_total == total

    # The deduct with and without the roll-up alongside, interleaved.
    alone: list[pgbench.Run] = []
    alongside: list[pgbench.Run] = []
    loops: list[RollUpLoop] = []
    for _ in range(cfg.rounds):
        alone.append(pgbench.run("deduct", bench.dsn, scripts.DEDUCT, clients=cfg.clients,
                                 seconds=cfg.seconds, variables={"accounts": sizes.accounts}))
        with RollUpLoop(bench.dsn) as loop:
            alongside.append(pgbench.run("deduct+rollup", bench.dsn, scripts.DEDUCT, clients=cfg.clients,
                                         seconds=cfg.seconds, variables={"accounts": sizes.accounts}))
        loops.append(loop)
    r_deduct = median([ratio(b.tps, a.tps) for a, b in zip(alone, alongside, strict=True)])
    roll_ms = [d for loop in loops for d in loop.durations_ms]
    roll_errors = sum(loop.errors for loop in loops)
    deduct_errors = sum(sum(run.errors.values()) + run.aborted_clients for run in alone + alongside)
    with bench.connect() as conn:
        lag = _one(conn, "select extract(epoch from clock_timestamp() - rolled_until) "
                         "from private.usage_rollup")

    p50, p95 = percentile(times, 50), percentile(times, 95)
    tps_alone = median([r.tps for r in alone])
    tps_along = median([r.tps for r in alongside])
    rows = [
        Row("ledger rows (account's spends)", f"{num(loaded['rows'])} ({num(sizes.account_spends)})"),
        Row("load", f"{loaded['seconds']:.0f} s"),
        Row("roll-up of the history", f"{num(rolled_rows)} rows in {rolled_seconds:.1f} s ({calls} calls), "
                                      f"{num(float(hours))} hour rows"),
        Row("30-day breakdown by model, operation (p50)", ms(p50)),
        Row("30-day breakdown by model, operation (p95)", ms(p95), f"<= {TARGET_P95_MS:.0f} ms",
            None if cfg.smoke else p95 <= TARGET_P95_MS, timing=True),
        Row("same, read live from the ledger (p50)", ms(percentile(live_times, 50))),
        Row("answer rows; credits = the ledger's",
            f"{len(answer_rows) if isinstance(answer_rows, list) else 0}; {got} = {expected}", "equal",
            correct),
        Row("deduct tps alone (median)", num(tps_alone)),
        Row("deduct tps, roll-up every second (median)", num(tps_along)),
        Row("deduct with / without the roll-up", num(r_deduct, 3), f">= {DEDUCT_TARGET}",
            None if cfg.smoke else r_deduct >= DEDUCT_TARGET, timing=True),
        Row("roll-up calls alongside: p50 / max", f"{ms(percentile(roll_ms, 50))} / "
                                                  f"{ms(max(roll_ms) if roll_ms else float('nan'))}"),
        Row("watermark behind the clock at the end", f"{float(lag):.1f} s" if lag is not None else "n/a"),
        Row("errors (deducts, roll-ups)", num(deduct_errors + roll_errors), "0",
            deduct_errors + roll_errors == 0),
    ]
    summary = (f"8 usage analytics: {num(loaded['rows'])} ledger rows, one account with "
               f"{num(sizes.account_spends)} spends: 30-day breakdown p50 {ms(p50)}, p95 {ms(p95)} "
               f"(target <= {TARGET_P95_MS:.0f} ms; live only p50 {ms(percentile(live_times, 50))}); "
               f"history rolled up in {rolled_seconds:.1f} s; deduct {num(tps_alone)} tps alone, "
               f"{num(tps_along)} with the roll-up every second ({num(r_deduct, 3)}, "
               f"target >= {DEDUCT_TARGET})")
    return Result("8 usage", summary, rows, {
        "loaded": loaded, "rollup": {"calls": calls, "rows": rolled_rows, "seconds": rolled_seconds},
        "query_ms": {"p50": p50, "p95": p95, "max": max(times) if times else None},
        "live_only_ms": {"p50": percentile(live_times, 50)}, "answer_ok": correct,
        "deduct": {"alone": tps_alone, "with_rollup": tps_along, "ratio": r_deduct},
        "rollup_alongside_ms": {"p50": percentile(roll_ms, 50), "max": max(roll_ms) if roll_ms else None},
    })
