"""notify end to end: a scheduled event -> handlers.notify -> supabase-py -> the local REST
endpoint -> PostgreSQL, and events POSTed to a real HTTP receiver that verifies every
signature with the documented example.

Events are made the way users make them: a balance alert, then spends and purchases
across it. notify claims events of every account in its database, so this module works
on a database of its own, and each test starts with no event pending.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from devstack import events_ops, rest, serve, tokens
from functions.notify import EVENT_FIELDS
from functions.settings import NotifySettings, SettingsError, load_settings
from tests.lambda_events import LambdaContext, cold_start, scheduled_event
from tests.notify_support import Receiver, receiving
from tests.support import Db, own_database

SECRET = f"notify-test-secret-{uuid.uuid4().hex}"
THRESHOLD, REARM = 5, 10

Handler = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def notify_db(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_notify") as handle:
        yield handle


@pytest.fixture(scope="module")
def notify_rest_url(notify_db: Db) -> Iterator[str]:
    with serve.serve_in_thread(rest.create_app(notify_db.dsn)) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_event_left_pending(notify_db: Db) -> None:
    """Each test starts with an empty queue (an earlier test's retries are not its business)."""
    notify_db.sql("update public.credit_events set status = 'failed', leased_until = null,"
                  " last_error = 'set aside by the tests' where status = 'pending'")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving(SECRET) as r:
        yield r


def notify_env(rest_url: str, url: str | None = None, **settings: str) -> dict[str, str]:
    env = {"SUPABASE_URL": rest_url, "SUPABASE_SECRET_KEY": tokens.default_keys().secret_key,
           "RPC_TIMEOUT_SECONDS": "10"}
    if url is not None:
        env.update(NOTIFY_WEBHOOK_URL=url, NOTIFY_SIGNING_SECRET=SECRET)
    env.update(settings)
    return env


@contextmanager
def notify_handler(env: dict[str, str]) -> Iterator[Handler]:
    """handlers.notify cold-started with exactly ``env`` (no NOTIFY_* of this process leaks in)."""
    names = [f.upper() for f in NotifySettings.model_fields if f.startswith("notify_")]
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.delenv(name, raising=False)
            mp.delenv(f"{name}_PARAM", raising=False)
        with cold_start("handlers.notify", env) as handler:
            yield handler


def run(handler: Handler, **context: Any) -> dict[str, Any]:
    return handler(scheduled_event(), LambdaContext(function_name="credits-test-notify", timeout_ms=60_000,
                                                   **context))


# --- events, made as users make them ----------------------------------------------------


def spend(db: Db, account_id: str, amount: int) -> None:
    db.call("deduct_credits", p_account_id=account_id, p_amount=amount, p_idempotency_key=f"n-{uuid.uuid4()}")


def buy(db: Db, account_id: str, amount: int) -> None:
    db.call("add_purchased_credits", p_account_id=account_id, p_amount=amount,
            p_idempotency_key=f"n-{uuid.uuid4()}")


def available(db: Db, account_id: str) -> int:
    return int(db.balance(account_id)["available"])


def alerted_account(db: Db) -> str:
    """A new user's account with REARM credits available and an armed alert at THRESHOLD."""
    _, account_id = db.new_user()
    buy(db, account_id, REARM + 5)
    spend(db, account_id, available(db, account_id) - REARM)
    assert db.call("set_balance_alert", p_account_id=account_id, p_threshold=THRESHOLD)["armed"] is True
    return account_id


def make_events(db: Db, account_id: str, n: int) -> list[dict[str, Any]]:
    """``n`` events on the account: balance.low and balance.recovered in turn."""
    for i in range(n):
        if i % 2 == 0:
            spend(db, account_id, available(db, account_id) - (THRESHOLD - 1))  # 4 left: low
        else:
            buy(db, account_id, REARM - available(db, account_id))  # back at the re-arm level: recovered
    return events_of(db, account_id)


def events_of(db: Db, account_id: str) -> list[dict[str, Any]]:
    rows = db.sql("select to_jsonb(e) from public.credit_events e where account_id = %s order by seq",
                  account_id)
    return [r[0] for r in rows]


def event(db: Db, event_id: str) -> dict[str, Any]:
    return db.one("select to_jsonb(e) from public.credit_events e where event_id = %s", event_id)


def make_due(db: Db, account_id: str) -> None:
    """The backoff has passed (instead of sleeping through it)."""
    db.sql("update public.credit_events set next_attempt_at = now()"
           " where account_id = %s and status = 'pending'",
           account_id)


# --- delivery ---------------------------------------------------------------------------


def test_events_arrive_signed_and_in_order_per_account(notify_db: Db, notify_rest_url: str,
                                                       receiver: Receiver, capfd: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    accounts = [alerted_account(notify_db) for _ in range(3)]
    made = {a: make_events(notify_db, a, 4) for a in accounts}
    assert [e["type"] for e in made[accounts[0]]] == ["balance.low", "balance.recovered"] * 2

    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        summary = run(handler)
    assert summary["sending"] is True and summary["done"] is True
    assert (summary["claimed"], summary["delivered"], summary["failed"]) == (12, 12, 0)
    assert not receiver.refused  # every request verified with the documented example

    for account in accounts:
        assert receiver.seqs(account) == [1, 2, 3, 4]  # in order, each once
        for receipt, stored in zip(receiver.of(account), made[account], strict=True):
            body = receipt.event
            assert list(body) == sorted(EVENT_FIELDS)  # compact JSON, sorted keys, nothing else
            assert receipt.body == json.dumps(body, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=False).encode()
            assert body["event_id"] == stored["event_id"] and body["type"] == stored["type"]
            assert set(body["payload"]) == {"threshold", "rearm_at", "available", "balance"}
            assert body["payload"]["threshold"] == THRESHOLD and body["payload"]["rearm_at"] == REARM
            assert receipt.headers["Content-Type"] == "application/json"
            t = int(receipt.headers["Credits-Signature"].split(",")[0].removeprefix("t="))
            assert abs(t - time.time()) < 60
        for stored in events_of(notify_db, account):
            assert stored["status"] == "delivered" and stored["attempts"] == 1 and stored["delivered_at"]

    # Counts as metrics, a summary log line, and never the signing secret.
    out = capfd.readouterr()
    assert "NotifyDelivered" in out.out and "NotifyClaimed" in out.out
    assert [getattr(r, "summary", None) for r in caplog.records if r.getMessage() == "notify"] == [summary]
    assert SECRET not in out.out + out.err + caplog.text

    # Nothing left: the next run claims nothing.
    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        assert run(handler)["claimed"] == 0


def test_a_failing_receiver_gets_the_same_event_again_after_its_backoff(notify_db: Db, notify_rest_url: str,
                                                                         receiver: Receiver) -> None:
    account = alerted_account(notify_db)
    first, second = make_events(notify_db, account, 2)
    receiver.answers[account] = 500
    url = receiver.url + "?token=query-secret-not-for-logs"
    with notify_handler(notify_env(notify_rest_url, url)) as handler:
        summary = run(handler)
        assert (summary["claimed"], summary["delivered"], summary["failed"]) == (1, 0, 1)
        assert receiver.seqs(account) == [1]  # seq 2 waits for seq 1
        stored = event(notify_db, first["event_id"])
        assert stored["status"] == "pending" and stored["attempts"] == 1
        assert stored["last_error"] == "HTTP 500"  # no URL, no query string
        backoff = notify_db.one("select extract(epoch from next_attempt_at - now()) from public.credit_events"
                                " where event_id = %s", first["event_id"])
        assert 3 < backoff <= 5

        # Not due yet: the next run leaves it alone.
        assert run(handler)["claimed"] == 0

        # Due again and still failing: the backoff doubles.
        make_due(notify_db, account)
        assert run(handler)["failed"] == 1
        backoff = notify_db.one("select extract(epoch from next_attempt_at - now()) from public.credit_events"
                                " where event_id = %s", first["event_id"])
        assert 8 < backoff <= 10

        # The receiver recovers; once due, the same event (same event_id), then the next one.
        receiver.answers[account] = "ok"
        make_due(notify_db, account)
        summary = run(handler)
        assert (summary["delivered"], summary["failed"]) == (2, 0)
    assert receiver.seqs(account) == [1, 1, 1, 2]
    assert receiver.seqs(account, delivered_only=True) == [1, 2]
    assert receiver.count(first["event_id"]) == 3 and receiver.count(second["event_id"]) == 1
    stored = event(notify_db, first["event_id"])
    assert stored["status"] == "delivered" and stored["attempts"] == 3 and stored["last_error"] is None
    for stored in events_of(notify_db, account):
        assert "query-secret" not in json.dumps(stored)


def test_a_receiver_that_hangs_for_one_account_holds_back_no_other(notify_db: Db, notify_rest_url: str,
                                                                  receiver: Receiver) -> None:
    hung = alerted_account(notify_db)
    others = [alerted_account(notify_db) for _ in range(2)]
    make_events(notify_db, hung, 2)
    for account in others:
        make_events(notify_db, account, 3)
    receiver.answers[hung] = "hang"
    receiver.hang_seconds = 4
    env = notify_env(notify_rest_url, receiver.url, NOTIFY_TIMEOUT_SECONDS="1",
                     NOTIFY_CONNECT_TIMEOUT_SECONDS="1", NOTIFY_LEASE_SECONDS="10", NOTIFY_CONCURRENCY="2")
    started = time.monotonic()
    with notify_handler(env) as handler:
        summary = run(handler)
    elapsed = time.monotonic() - started
    # Two slots: one held by the hung account for its timeout, the other delivering the rest meanwhile.
    assert (summary["delivered"], summary["failed"]) == (6, 1)
    assert elapsed < 4
    for account in others:
        assert receiver.seqs(account) == [1, 2, 3]
    hung_events = events_of(notify_db, hung)
    assert hung_events[0]["status"] == "pending" and hung_events[0]["attempts"] == 1
    assert hung_events[0]["last_error"] == "timeout (ReadTimeout)"
    assert hung_events[1]["attempts"] == 0


def test_two_runs_at_once_deliver_each_event_once(notify_db: Db, notify_rest_url: str,
                                                  receiver: Receiver) -> None:
    accounts = [alerted_account(notify_db) for _ in range(8)]
    made = [e for a in accounts for e in make_events(notify_db, a, 3)]
    receiver.delay_seconds = 0.03  # long enough for the two runs to overlap
    env = notify_env(notify_rest_url, receiver.url, NOTIFY_CONCURRENCY="3")
    summaries: list[dict[str, Any]] = []
    with notify_handler(env) as first, notify_handler(env) as second:
        barrier = threading.Barrier(2)

        def go(handler: Handler) -> None:
            barrier.wait()
            summaries.append(run(handler))

        threads = [threading.Thread(target=go, args=(h,)) for h in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(summaries) == 2
    assert sum(s["delivered"] for s in summaries) == len(made) == 24
    assert sum(s["claimed"] for s in summaries) == 24
    assert all(s["claimed"] > 0 for s in summaries)  # both took part
    for stored in made:
        assert receiver.count(stored["event_id"]) == 1
    for account in accounts:
        assert receiver.seqs(account) == [1, 2, 3]


def test_without_a_url_nothing_is_sent_and_events_stay_pending(notify_db: Db, notify_rest_url: str,
                                                                receiver: Receiver) -> None:
    account = alerted_account(notify_db)
    make_events(notify_db, account, 2)
    with notify_handler(notify_env(notify_rest_url)) as handler:
        summary = run(handler)
    assert summary["sending"] is False and summary["claimed"] == 0 and summary["delivered"] == 0
    assert receiver.receipts == []
    for stored in events_of(notify_db, account):
        assert stored["status"] == "pending" and stored["attempts"] == 0 and stored["leased_until"] is None
    # Written while no URL was set, they are sent once one is.
    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        assert run(handler)["delivered"] == 2
    assert receiver.seqs(account) == [1, 2]


def test_events_older_than_72_hours_are_failed_not_sent(notify_db: Db, notify_rest_url: str,
                                                        receiver: Receiver) -> None:
    never = alerted_account(notify_db)
    tried = alerted_account(notify_db)
    old, recent = make_events(notify_db, never, 2)
    tried_event = make_events(notify_db, tried, 1)[0]
    notify_db.sql("update public.credit_events"
                  " set created_at = now() - interval '73 hours', sent_from = now() - interval '73 hours'"
                  " where event_id = %s", old["event_id"])
    receiver.answers[tried] = 503
    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        run(handler)  # tried: one failed attempt
        notify_db.sql("update public.credit_events"
                      " set created_at = now() - interval '73 hours',"
                      " sent_from = now() - interval '73 hours', next_attempt_at = now()"
                      " where event_id = %s", tried_event["event_id"])
        summary = run(handler)
    assert summary["claimed"] == 0 or summary["delivered"] == summary["claimed"]
    stored = event(notify_db, old["event_id"])
    assert (stored["status"], stored["attempts"], stored["last_error"]) == ("failed", 0, "not_sent")
    stored = event(notify_db, tried_event["event_id"])
    assert (stored["status"], stored["attempts"], stored["last_error"]) == ("failed", 1, "expired")
    # A failed event no longer holds back its account's later ones; the old one was never sent.
    assert receiver.seqs(never) == [2]
    assert event(notify_db, recent["event_id"])["status"] == "delivered"
    assert receiver.count(old["event_id"]) == 0


def test_an_operator_lists_and_resends_a_failed_event(notify_db: Db, notify_rest_url: str, receiver: Receiver,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    account = alerted_account(notify_db)
    failed = make_events(notify_db, account, 1)[0]
    notify_db.sql("update public.credit_events"
                  " set created_at = now() - interval '80 hours', sent_from = now() - interval '80 hours'"
                  " where event_id = %s", failed["event_id"])
    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        run(handler)
    assert event(notify_db, failed["event_id"])["status"] == "failed"

    dsn = ["--database-url", notify_db.dsn]
    assert events_ops.main([*dsn, "list", "--account", account]) == 0  # the failed ones by default
    listed = capsys.readouterr().out
    assert failed["event_id"] in listed and "not_sent" in listed and "balance.low" in listed
    assert events_ops.main([*dsn, "list", "--pending", "--account", account]) == 0
    assert failed["event_id"] not in capsys.readouterr().out

    assert events_ops.main([*dsn, "resend", failed["event_id"]]) == 0
    assert f"{failed['event_id']}: pending again" in capsys.readouterr().out
    stored = event(notify_db, failed["event_id"])
    assert (stored["status"], stored["attempts"], stored["seq"]) == ("pending", 0, 1)
    assert events_ops.main([*dsn, "list", "--all", "--account", account]) == 0
    assert failed["event_id"] in capsys.readouterr().out

    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        assert run(handler)["delivered"] == 1
    (receipt,) = receiver.of(account)
    assert (receipt.event["event_id"], receipt.event["seq"]) == (failed["event_id"], 1)  # same id, same seq
    assert event(notify_db, failed["event_id"])["status"] == "delivered"

    with pytest.raises(SystemExit, match="no event"):
        events_ops.main([*dsn, "resend", str(uuid.uuid4())])


def test_the_sweep_writes_what_lapsed_and_its_events_go_out_in_the_same_run(
        notify_db: Db, notify_rest_url: str, receiver: Receiver) -> None:
    account = alerted_account(notify_db)
    notify_db.call("reserve_credits", p_account_id=account, p_amount=REARM - 2, p_ttl_seconds=1,
                   p_idempotency_key=f"n-{uuid.uuid4()}")
    assert [e["type"] for e in events_of(notify_db, account)] == ["balance.low"]
    time.sleep(1.2)  # the hold lapses; nobody writes to the account
    with notify_handler(notify_env(notify_rest_url, receiver.url)) as handler:
        summary = run(handler)
    assert summary["swept"] >= 1
    assert [e["type"] for e in events_of(notify_db, account)] == ["balance.low", "balance.recovered"]
    assert receiver.seqs(account) == [1, 2]


def test_the_usage_roll_up_runs_when_the_database_has_it(notify_db: Db, notify_rest_url: str) -> None:
    present = notify_db.one("select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                            " where n.nspname = 'public' and p.proname = 'roll_up_credit_usage'")
    with notify_handler(notify_env(notify_rest_url)) as handler:
        assert run(handler)["rolled_up"] is bool(present)
        if not present:  # a stand-in, in this module's database only (dropped with it)
            notify_db.sql("create function public.roll_up_credit_usage() returns jsonb language sql"
                          " as $$ select '{}'::jsonb $$")
            notify_db.sql("grant execute on function public.roll_up_credit_usage() to service_role")
            assert run(handler)["rolled_up"] is True


# --- settings -------------------------------------------------------------------------


def test_a_url_without_a_signing_secret_stops_the_cold_start(notify_rest_url: str) -> None:
    env = notify_env(notify_rest_url)
    env["NOTIFY_WEBHOOK_URL"] = "https://hooks.example.com/credits"
    with pytest.raises(SettingsError, match="missing setting NOTIFY_SIGNING_SECRET"), notify_handler(env):
        pass
    with pytest.raises(SettingsError, match="invalid setting NOTIFY_WEBHOOK_URL"):
        load_settings(NotifySettings, {**env, "NOTIFY_WEBHOOK_URL": "hooks.example.com",
                                       "NOTIFY_SIGNING_SECRET": SECRET})
    with pytest.raises(SettingsError, match="NOTIFY_LEASE_SECONDS"):
        load_settings(NotifySettings, {**env, "NOTIFY_SIGNING_SECRET": SECRET, "NOTIFY_LEASE_SECONDS": "15"})
    settings = load_settings(NotifySettings, {**env, "NOTIFY_SIGNING_SECRET": SECRET})
    assert settings.sends and SECRET not in repr(settings) and "hooks.example.com" not in repr(settings)
    slash = load_settings(NotifySettings, {**env, "NOTIFY_SIGNING_SECRET": SECRET,
                                           "NOTIFY_WEBHOOK_URL": "https://hooks.example.com/credits/"})
    assert slash.notify_webhook_url == "https://hooks.example.com/credits/"  # used exactly as given


def test_the_signing_secret_can_come_from_ssm(notify_rest_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    from functions import settings as settings_module

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(settings_module, "_ssm", None)
    with mock_aws():
        boto3.client("ssm").put_parameter(Name="/credits/test/notify-signing-secret", Value=SECRET,
                                          Type="SecureString")
        env = {**notify_env(notify_rest_url), "NOTIFY_WEBHOOK_URL": "https://hooks.example.com/credits",
               "NOTIFY_SIGNING_SECRET_PARAM": "/credits/test/notify-signing-secret"}
        assert load_settings(NotifySettings, env).notify_signing_secret == SECRET
    monkeypatch.setattr(settings_module, "_ssm", None)


def test_the_local_loop_says_where_events_go(notify_rest_url: str) -> None:
    base = notify_env(notify_rest_url)
    quiet = events_ops.NotifyLoop(events_ops.notify_env(base, {}))
    assert quiet.describe().startswith("not sent")
    env = events_ops.notify_env(base, {"NOTIFY_WEBHOOK_URL": "http://127.0.0.1:9/hook?token=abc",
                                       "NOTIFY_SIGNING_SECRET": SECRET, "NOTIFY_INTERVAL_SECONDS": "1"})
    loud = events_ops.NotifyLoop(env, events_ops.interval_seconds({"NOTIFY_INTERVAL_SECONDS": "1"}))
    line = loud.describe()
    assert line.startswith("sent every 1 s to http://127.0.0.1:9/hook") and "token" not in line
    assert SECRET not in line
    assert events_ops.interval_seconds({}) == events_ops.DEFAULT_INTERVAL_SECONDS


def test_no_claim_once_the_time_left_is_short(notify_db: Db, notify_rest_url: str,
                                              receiver: Receiver) -> None:
    account = alerted_account(notify_db)
    make_events(notify_db, account, 1)
    env = notify_env(notify_rest_url, receiver.url, NOTIFY_SAFETY_MARGIN_MS="20000")
    with notify_handler(env) as handler:
        summary = run(handler, remaining_ms=19_000)
        assert (summary["claimed"], summary["done"]) == (0, False)
        assert events_of(notify_db, account)[0]["leased_until"] is None  # nothing taken that it cannot finish
        assert run(handler, remaining_ms=21_000)["delivered"] == 1
    assert receiver.seqs(account) == [1]


def test_dev_start_runs_notify_in_the_background_and_says_where(notify_db: Db, notify_rest_url: str,
                                                                  receiver: Receiver,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import ExitStack

    stack = serve.Stack(dsn=notify_db.dsn, rest_url=notify_rest_url, keys=tokens.default_keys())
    monkeypatch.setenv("NOTIFY_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("NOTIFY_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("NOTIFY_INTERVAL_SECONDS", "0.2")
    with ExitStack() as stop:
        stack.notify = serve.start_notify(stack, stop)
        assert stack.notify.startswith(f"sent every 0.2 s to {receiver.url}")
        text = serve.banner(stack)
        assert f"credit events    sent every 0.2 s to {receiver.url}" in text and SECRET not in text
        account = alerted_account(notify_db)
        make_events(notify_db, account, 2)
        deadline = time.monotonic() + 20
        while len(receiver.seqs(account)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert receiver.seqs(account) == [1, 2]

    # Without a URL the banner says nothing is sent; with a URL but no secret, why.
    monkeypatch.delenv("NOTIFY_WEBHOOK_URL")
    with ExitStack() as stop:
        assert serve.start_notify(stack, stop).startswith("not sent (set NOTIFY_WEBHOOK_URL")
    monkeypatch.setenv("NOTIFY_WEBHOOK_URL", receiver.url)
    monkeypatch.delenv("NOTIFY_SIGNING_SECRET")
    with ExitStack() as stop:
        assert serve.start_notify(stack, stop).startswith("not sent: missing setting NOTIFY_SIGNING_SECRET")
