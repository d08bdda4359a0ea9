"""The monthly reset handler end to end: scheduled event -> handlers.monthly_reset ->
supabase-py -> the local REST endpoint -> PostgreSQL.

The reset renews every account in the database, so this module works on a
database of its own (same server) and knows exactly which accounts exist.
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from devstack import rest, serve, tokens
from functions.errors import ServiceUnavailable
from tests.lambda_events import LambdaContext, cold_start, scheduled_event
from tests.support import Caller, Db, own_database

BATCH = 3
MARGIN_MS = 5_000


@pytest.fixture(scope="module")
def reset_db(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_reset_handler") as handle:
        yield handle


@pytest.fixture(scope="module")
def reset_rest_url(reset_db: Db) -> Iterator[str]:
    with serve.serve_in_thread(rest.create_app(reset_db.dsn)) as url:
        yield url


def reset_env(url: str) -> dict[str, str]:
    return {
        "SUPABASE_URL": url,
        "SUPABASE_SERVICE_ROLE_KEY": tokens.service_role_key(),
        "RESET_BATCH_SIZE": str(BATCH),
        "RESET_SAFETY_MARGIN_MS": str(MARGIN_MS),
        "RPC_TIMEOUT_SECONDS": "10",
    }


@pytest.fixture(scope="module")
def handler(reset_rest_url: str) -> Iterator[Callable[..., dict[str, Any]]]:
    with cold_start("handlers.monthly_reset", reset_env(reset_rest_url)) as h:
        yield h


def month_start() -> str:
    return datetime.now(UTC).date().replace(day=1).isoformat()


def age_accounts(reset_db: Db, accounts: list[str]) -> None:
    """Move these accounts' current period one month back (their state on the 1st before the reset)."""
    reset_db.sql("""
        update public.credit_wallets
           set period_start = date_trunc('month', now(), 'UTC') - interval '1 month',
               period_end = date_trunc('month', now(), 'UTC')
         where account_id = any(%s::uuid[])""", accounts)


def grants_this_month(reset_db: Db, account_id: str) -> int:
    return reset_db.one(
        "select count(*) from public.credit_ledger where account_id = %s and type = 'grant'"
        " and period_start = date_trunc('month', now(), 'UTC') and metadata ->> 'reason' = 'monthly_reset'",
        account_id)


def make_accounts(reset_db: Db, n: int) -> list[str]:
    return [reset_db.new_user()[1] for _ in range(n)]


def ledger_rows(reset_db: Db) -> int:
    return reset_db.one("select count(*) from public.credit_ledger")


def test_reset_renews_every_account_in_batches_once(handler: Callable[..., dict[str, Any]],
                                                    reset_db: Db, capfd: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    accounts = make_accounts(reset_db, 7)
    spender = Caller.user(reset_db.one("select user_id::text from public.credit_accounts where id = %s",
                                       accounts[0]))
    reset_db.call("deduct_credits", spender, p_account_id=accounts[0], p_amount=2,
                  p_idempotency_key=f"k-{uuid.uuid4()}")
    reset_db.fund(accounts[1], purchased=10)
    age_accounts(reset_db, accounts)
    total = reset_db.one("select count(*) from public.credit_accounts")
    assert total == 7

    result = handler(scheduled_event(), LambdaContext(function_name="credits-test-monthly-reset"))
    assert result == {"period_start": month_start(), "processed": 7, "expired": 7 * 3 - 2, "granted": 21,
                      "batches": 3, "done": True}
    for account in accounts:
        balance = reset_db.balance(account)
        assert balance["subscription"] == 3
        assert balance["period_start"].startswith(month_start())
        assert grants_this_month(reset_db, account) == 1
    assert reset_db.balance(accounts[1])["purchased"] == 10  # purchased credits never expire

    out = capfd.readouterr().out
    assert "MonthlyResetProcessed" in out and "MonthlyResetGranted" in out  # EMF metrics were flushed
    summaries = [r for r in caplog.records if r.getMessage() == "monthly reset"]
    assert [getattr(r, "summary", None) for r in summaries] == [result]

    rows = ledger_rows(reset_db)
    again = handler(scheduled_event(), LambdaContext())
    assert again == {"period_start": month_start(), "processed": 0, "expired": 0, "granted": 0,
                     "batches": 3, "done": True}
    assert ledger_rows(reset_db) == rows


def test_reset_stops_before_the_time_limit_and_resumes(handler: Callable[..., dict[str, Any]],
                                                       reset_db: Db) -> None:
    accounts = make_accounts(reset_db, 7)  # 14 accounts in all now: five batches of up to 3
    age_accounts(reset_db, accounts)
    rows = ledger_rows(reset_db)

    # Plenty of time for two batches, then less than the safety margin.
    remaining = itertools.chain([60_000, 60_000], itertools.repeat(MARGIN_MS - 1))
    first = handler(scheduled_event(), LambdaContext(remaining_ms=lambda: next(remaining)))
    assert first["done"] is False and first["batches"] == 2
    assert first["processed"] <= 6 and first["granted"] == 3 * first["processed"]
    assert ledger_rows(reset_db) >= rows + first["processed"]

    # The next invocation starts over; accounts renewed already are skipped, nothing is granted twice.
    second = handler(scheduled_event(), LambdaContext())
    assert second["done"] is True and second["batches"] == 5
    assert first["processed"] + second["processed"] == 7
    assert first["granted"] + second["granted"] == 21
    for account in accounts:
        assert grants_this_month(reset_db, account) == 1
        assert reset_db.balance(account)["subscription"] == 3

    # No time at all: nothing is attempted, and the run says it is not done.
    idle = handler(scheduled_event(), LambdaContext(remaining_ms=100))
    assert idle["batches"] == 0 and idle["done"] is False


def test_reset_of_an_explicit_month_and_bad_input(handler: Callable[..., dict[str, Any]],
                                                  reset_db: Db) -> None:
    rows = ledger_rows(reset_db)
    # Refused input is answered with the contract's error body (a retry could not succeed).
    for event in (scheduled_event(detail={"period_start": "2026-02-15"}), {"period_start": 202602}):
        refused = handler(event, LambdaContext())
        assert refused == {"error": "invalid_argument",
                           "message": "period_start must be the first day of a month as YYYY-MM-01",
                           "detail": {"argument": "period_start"}}
    # A period the database refuses (more than one month ahead): its reason, not a bare failure.
    ahead = handler(scheduled_event(detail={"period_start": "2999-01-01"}), LambdaContext())
    assert ahead["error"] == "invalid_argument" and set(ahead) == {"error", "message", "detail"}
    assert ahead["detail"] == {"argument": "p_period_start",
                               "reason": "must not be more than one month ahead of the current UTC month"}
    assert "one month ahead" in ahead["message"]
    # A month that already passed for every account: nothing to renew.
    past = handler(scheduled_event(detail={"period_start": "2020-01-01"}), LambdaContext())
    assert past["period_start"] == "2020-01-01" and past["granted"] == 0 and past["done"] is True
    assert ledger_rows(reset_db) == rows


def test_reset_with_the_database_unreachable_fails_for_a_retry(reset_db: Db) -> None:
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    rows = ledger_rows(reset_db)
    with cold_start("handlers.monthly_reset", reset_env(f"http://127.0.0.1:{port}")) as broken, \
            pytest.raises(ServiceUnavailable):
        broken(scheduled_event(), LambdaContext())
    assert ledger_rows(reset_db) == rows


def test_reset_cold_start_loads_no_http_framework() -> None:
    # The reset has no HTTP app: importing FastAPI would only lengthen its cold start.
    import subprocess

    env = {**os.environ, "SUPABASE_URL": "http://127.0.0.1:9",
           "SUPABASE_SERVICE_ROLE_KEY": tokens.service_role_key(), "AWS_DEFAULT_REGION": "us-east-1"}
    probe = ("import sys, handlers.monthly_reset; "
             "print(sorted(m for m in ('fastapi', 'starlette') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,  # noqa: S603
                         check=True, cwd=root)
    assert out.stdout.strip() == "[]"
