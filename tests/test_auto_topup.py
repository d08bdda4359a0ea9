"""Auto top-up end to end: spends through the SQL functions start a top-up, a scheduled
event -> handlers.notify -> supabase-py -> the local REST endpoint -> PostgreSQL claims it,
and the worker (functions.topup) pays it with stripe-python on a Stripe stand-in
(localstripe, a stateful fake Stripe server run as a process of its own); Stripe's
events come back signed through handlers.stripe_webhook.

notify claims the top-ups and events of every account in its database, so this module
works on a database of its own, and each test starts with no top-up or event pending.
Where the stand-in cannot answer as Stripe would (a 402 ``authentication_required``, a
dropped connection, a 5xx, a rate limit), a tap between the worker and the stand-in
answers instead, as Stripe's API does.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import stripe

from devstack import db, demo, rest, serve, stripe_stand_in, tokens
from functions import topup
from functions.notify import RpcDatabase
from functions.settings import NotifySettings, SettingsError, load_settings
from tests.lambda_events import LambdaContext, cold_start, http_event, response_json, scheduled_event
from tests.notify_support import receiving
from tests.stripe_support import OMIT, TEST_WEBHOOK_SECRET, body_of, render, sign, stripe_id
from tests.support import Caller, Db, new_key, own_database

SECRET = f"notify-topup-secret-{uuid.uuid4().hex}"
PACK_CREDITS = 500
PACK_AMOUNT = 1900  # cents, the pack's Price on the stand-in
# The stand-in's test cards (localstripe's PaymentMethod, as Stripe's test cards behave).
CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000341"      # attaches; every charge is declined (card_declined)
CARD_AUTHENTICATE = "4000002760003184"  # needs 3-D Secure: a confirmed PaymentIntent requires_action
CARD_REFUSED = "4000000000000002"       # declined as soon as it is attached

Handler = Callable[..., dict[str, Any]]


# --- the stand-in, the database, the endpoints ------------------------------------------------


@pytest.fixture(scope="session")
def stand_in() -> Iterator[stripe_stand_in.StandIn]:
    """localstripe on a free port for the session (a failure to start fails the tests)."""
    with stripe_stand_in.running() as running:
        yield running


@pytest.fixture(scope="module")
def stripe_api(stand_in: stripe_stand_in.StandIn) -> stripe.StripeClient:
    return stripe.StripeClient(stand_in.api_key, base_addresses={"api": stand_in.url}, max_network_retries=0)


@pytest.fixture(scope="module")
def topup_db(pg_server: str) -> Iterator[Db]:
    with own_database(pg_server, "credits_topup") as handle:
        yield handle


@pytest.fixture(scope="module")
def topup_rest_url(topup_db: Db) -> Iterator[str]:
    with serve.serve_in_thread(rest.create_app(topup_db.dsn)) as url:
        yield url


@pytest.fixture(scope="module")
def pack(topup_db: Db, stripe_api: stripe.StripeClient) -> str:
    """A credit pack whose stripe_price_id is a Price on the stand-in."""
    price = stripe_api.v1.prices.create(params={"currency": "usd", "unit_amount": PACK_AMOUNT,
                                                "product_data": {"name": "500 credits"}})
    topup_db.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, %s, 'Top-up')",
                 price.id, PACK_CREDITS)
    return price.id


@pytest.fixture(autouse=True)
def _nothing_pending(topup_db: Db) -> None:
    """Each test starts with no top-up and no event pending (an earlier test's are not its business)."""
    topup_db.sql("update public.credit_topups set status = 'failed', reason = 'set aside by the tests',"
                 " leased_until = null, finished_at = now() where status = 'pending'")
    topup_db.sql("update public.credit_events set status = 'failed', leased_until = null,"
                 " last_error = 'set aside by the tests' where status = 'pending'")


@dataclass
class Reply:
    status: int
    body: Any


@pytest.fixture(scope="module")
def deliver(topup_rest_url: str) -> Iterator[Callable[[dict[str, Any]], Reply]]:
    """POST a Stripe event, signed with the test secret, to handlers.stripe_webhook."""
    env = {"SUPABASE_URL": topup_rest_url, "SUPABASE_SECRET_KEY": tokens.default_keys().secret_key,
           "STRIPE_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET, "RPC_TIMEOUT_SECONDS": "10"}
    with cold_start("handlers.stripe_webhook", env) as handler:
        def post(event: dict[str, Any]) -> Reply:
            raw = body_of(event)
            headers = {"content-type": "application/json; charset=utf-8", "stripe-signature": sign(raw),
                       "user-agent": "Stripe/1.0"}
            response = handler(http_event("POST", "/stripe/webhook", headers=headers, raw_body=raw),
                               LambdaContext(function_name="credits-test-stripeWebhook"))
            return Reply(response["statusCode"], response_json(response))

        yield post


def notify_env(rest_url: str, *, stripe_base: str | None, api_key: str | None,
               webhook: str | None = None, **extra: str) -> dict[str, str]:
    env = {"SUPABASE_URL": rest_url, "SUPABASE_SECRET_KEY": tokens.default_keys().secret_key,
           "RPC_TIMEOUT_SECONDS": "10"}
    if stripe_base is not None:
        env["STRIPE_API_BASE"] = stripe_base
    if api_key is not None:
        env["STRIPE_API_KEY"] = api_key
    if webhook is not None:
        env.update(NOTIFY_WEBHOOK_URL=webhook, NOTIFY_SIGNING_SECRET=SECRET)
    env.update(extra)
    return env


@contextmanager
def notify_handler(env: dict[str, str]) -> Iterator[Handler]:
    """handlers.notify cold-started with exactly ``env`` (no NOTIFY_* or STRIPE_* of this process)."""
    names = [f.upper() for f in NotifySettings.model_fields if f.startswith(("notify_", "stripe_"))]
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.delenv(name, raising=False)
            mp.delenv(f"{name}_PARAM", raising=False)
        with cold_start("handlers.notify", env) as handler:
            yield handler


def run(handler: Handler, **context: Any) -> dict[str, Any]:
    return handler(scheduled_event(), LambdaContext(function_name="credits-test-notify", timeout_ms=60_000,
                                                   **context))


@dataclass
class Env:
    """What a test needs at hand: the database, the stand-in, the endpoints, the pack."""

    db: Db
    stand_in: stripe_stand_in.StandIn
    stripe: stripe.StripeClient
    rest_url: str
    pack: str
    deliver: Callable[[dict[str, Any]], Reply]

    def notify(self, **settings: Any) -> dict[str, Any]:
        """One notify run (a cold start) charging on the stand-in unless told otherwise."""
        args: dict[str, Any] = {"stripe_base": self.stand_in.url, "api_key": self.stand_in.api_key}
        args.update(settings)
        with notify_handler(notify_env(self.rest_url, **args)) as handler:
            return run(handler)

    def database(self) -> RpcDatabase:
        """The worker's own way to the database (supabase-py through the REST endpoint)."""
        return RpcDatabase(load_settings(NotifySettings, notify_env(self.rest_url, stripe_base=None,
                                                                    api_key=None)))


@pytest.fixture
def env(topup_db: Db, stand_in: stripe_stand_in.StandIn, stripe_api: stripe.StripeClient,
        topup_rest_url: str, pack: str, deliver: Callable[[dict[str, Any]], Reply]) -> Env:
    return Env(topup_db, stand_in, stripe_api, topup_rest_url, pack, deliver)


# --- an account that saved a card -------------------------------------------------------------


@dataclass
class Account:
    env: Env
    owner: Caller
    account_id: str
    customer: str
    cards: list[str] = field(default_factory=list)

    @property
    def db(self) -> Db:
        return self.env.db

    def spend(self, amount: int) -> dict[str, Any]:
        result: dict[str, Any] = self.db.call("deduct_credits", p_account_id=self.account_id,
                                              p_idempotency_key=new_key("spend"), p_amount=amount)
        return result

    def available(self) -> int:
        return int(self.db.balance(self.account_id)["available"])

    def enable(self, threshold: int = 100, **extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.db.call("set_auto_topup", self.owner, p_account_id=self.account_id,
                                              p_enabled=True, p_threshold=threshold, p_pack=self.env.pack,
                                              **extra)
        return result

    def topups(self) -> list[dict[str, Any]]:
        rows = self.db.sql("select to_jsonb(t) from public.credit_topups t where account_id = %s"
                           " order by created_at", self.account_id)
        return [r[0] for r in rows]

    def pending(self) -> dict[str, Any]:
        [found] = [t for t in self.topups() if t["status"] == "pending"]
        return found

    def setting(self) -> tuple[str, str | None]:
        status, reason = self.db.one("select status, reason from private.auto_topups where account_id = %s",
                                     self.account_id)
        return status, reason

    def events(self) -> list[dict[str, Any]]:
        rows = self.db.sql("select to_jsonb(e) from public.credit_events e where account_id = %s"
                           " order by seq", self.account_id)
        return [r[0] for r in rows]

    def event_types(self) -> list[str]:
        return [e["type"] for e in self.events()]

    def intents(self) -> list[Any]:
        """The customer's PaymentIntents on the stand-in, newest first."""
        found = self.env.stripe.v1.payment_intents.list(params={"customer": self.customer, "limit": 100})
        return list(found.auto_paging_iter())

    def grants(self) -> list[tuple[str, int, str]]:
        """(key, credits, Stripe reference) of the account's top-up purchases in the ledger."""
        return [(k, int(n), ref) for k, n, ref in self.db.sql(
            "select idempotency_key, purchased, stripe_ref from public.credit_transactions"
            " where account_id = %s and idempotency_key like 'topup:%%' order by created_at",
            self.account_id)]

    def age(self, interval: str = "11 minutes") -> None:
        """Move the account's top-ups back in time instead of waiting (the cooldown is 10 minutes)."""
        self.db.sql("update public.credit_topups set created_at = created_at - %s::interval"
                    " where account_id = %s", interval, self.account_id)


def add_card(env: Env, customer: str, number: str, *, default: bool = True) -> str:
    card = env.stripe.v1.payment_methods.create(params={"type": "card", "card": {
        "number": number, "exp_month": 12, "exp_year": dt.date.today().year + 3, "cvc": "123"}})
    env.stripe.v1.payment_methods.attach(card.id, params={"customer": customer})
    if default:
        env.stripe.v1.customers.update(customer,
                                       params={"invoice_settings": {"default_payment_method": card.id}})
    return card.id


def account(env: Env, card: str | None = CARD_OK, *, purchased: int = 150, threshold: int | None = 100,
            default: bool = True, **settings: Any) -> Account:
    """A user whose account is linked to a stand-in customer with ``card`` saved, ``purchased``
    credits available (the sign-up allowance spent) and auto top-up on below ``threshold``."""
    customer = env.stripe.v1.customers.create(params={"email": f"{uuid.uuid4().hex[:8]}@example.test"}).id
    owner, account_id = env.db.new_user()
    bonus = env.db.balance(account_id)["available"]
    if bonus:
        env.db.call("deduct_credits", p_account_id=account_id, p_idempotency_key=new_key("bonus"),
                    p_amount=bonus)
    # The link the Stripe webhook records for the customer's checkout.
    env.db.sql("update public.credit_accounts set stripe_customer_id = %s where id = %s",
               customer, account_id)
    if purchased:
        env.db.fund(account_id, purchased=purchased)
    made = Account(env, owner, account_id, customer)
    if card is not None:
        made.cards.append(add_card(env, customer, card, default=default))
    if threshold is not None:
        assert made.enable(threshold, **settings)["status"] == "active"
    return made


def succeeded_payload(acct: Account, topup_id: str, payment_intent: str) -> None:
    [event] = [e for e in acct.events()
               if e["type"] == "topup.succeeded" and e["payload"]["topup_id"] == topup_id]
    payload = event["payload"]
    assert {k: v for k, v in payload.items() if k != "balance"} == {
        "topup_id": topup_id, "pack": acct.env.pack, "credits": PACK_CREDITS,
        "payment_intent": payment_intent, "reason": None}
    assert payload["balance"]["account_id"] == acct.account_id


def price_without_amount(env: Env) -> str:
    """A Price whose amount the customer chooses (``unit_amount`` null)."""
    price = env.stripe.v1.prices.create(params={"currency": "usd", "custom_unit_amount": {"enabled": True},
                                                "product_data": {"name": "Pay what you want"}})
    return price.id


def stand_in_event(env: Env, event_type: str, payment_intent: str) -> dict[str, Any]:
    """The event the stand-in wrote for a PaymentIntent, exactly as its API serves it."""
    after: str | None = None
    while True:
        params: dict[str, Any] = {"type": event_type, "limit": 100}
        if after:
            params["starting_after"] = after
        page = httpx.get(f"{env.stand_in.url}/v1/events", params=params,
                         headers={"Authorization": f"Bearer {env.stand_in.api_key}"}, timeout=10).json()
        for event in page["data"]:
            if event["data"]["object"]["id"] == payment_intent:
                found: dict[str, Any] = event
                return found
        if not page["has_more"]:
            raise AssertionError(f"no {event_type} for {payment_intent}")
        after = page["data"][-1]["id"]


# --- a tap between the worker and the stand-in --------------------------------------------------


@dataclass
class Tap:
    """Forwards every request to the stand-in and records it; the next PaymentIntent creations
    get the queued answers instead (as Stripe would give them), one each."""

    upstream: str
    url: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Idempotency-Key
    faults: list[Any] = field(default_factory=list)  # "drop", or (status, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def creations(self) -> list[str | None]:
        """The Idempotency-Key of each PaymentIntent creation that reached the tap."""
        with self.lock:
            return [key for method, path, key in self.requests
                    if (method, path) == ("POST", "/v1/payment_intents")]


def _tap_handler(tap: Tap) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?", 1)[0]
            with tap.lock:
                tap.requests.append((self.command, path, self.headers.get("Idempotency-Key")))
                fault = tap.faults.pop(0) if tap.faults and (self.command, path) == (
                    "POST", "/v1/payment_intents") else None
            if fault == "drop":
                self.close_connection = True  # no answer at all: a network error for the client
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None:
                status, payload = fault
                self._answer(status, json.dumps(payload).encode(), {"Content-Type": "application/json",
                                                                     "Request-Id": stripe_id("req")})
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            upstream = httpx.request(self.command, tap.upstream + self.path, headers=headers, content=body,
                                     timeout=30)
            self._answer(upstream.status_code, upstream.content,
                         {"Content-Type": upstream.headers.get("content-type", "application/json")})

        do_GET = do_POST = do_DELETE = _forward

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def tapped(stand_in: stripe_stand_in.StandIn) -> Iterator[Tap]:
    tap = Tap(stand_in.url)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _tap_handler(tap))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    tap.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield tap
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def authentication_required_402(acct: Account, topup_id: str) -> dict[str, Any]:
    """Stripe's answer to an off-session, confirmed PaymentIntent whose card needs authentication."""
    intent_id = stripe_id("pi")
    error = {"code": "authentication_required", "decline_code": "authentication_required",
             "doc_url": "https://stripe.com/docs/error-codes/authentication-required",
             "message": "Your card was declined. This transaction requires authentication.",
             "payment_method": {"id": acct.cards[0], "object": "payment_method", "type": "card"},
             "request_log_url": "https://dashboard.stripe.com/test/logs/req_x", "type": "card_error"}
    error["payment_intent"] = {
        "id": intent_id, "object": "payment_intent", "amount": PACK_AMOUNT, "currency": "usd",
        "customer": acct.customer, "status": "requires_payment_method", "livemode": False,
        "metadata": {"topup_id": topup_id, "account_id": acct.account_id},
        "last_payment_error": {k: v for k, v in error.items() if k != "request_log_url"},
        "next_action": None, "payment_method": None}
    return {"error": error}


# === the stand-in is what the tests take it for ================================================


def test_the_stand_in_answers_as_stripe_for_what_the_worker_uses(env: Env) -> None:
    customer = env.stripe.v1.customers.create(params={"email": "cards@example.test"}).id
    with pytest.raises(stripe.CardError) as refused:
        add_card(env, customer, CARD_REFUSED)
    assert refused.value.code == "card_declined" and refused.value.http_status == 402
    declined = add_card(env, customer, CARD_DECLINED, default=False)
    with pytest.raises(stripe.CardError) as charge:
        env.stripe.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "customer": customer,
                                                     "payment_method": declined, "off_session": True,
                                                     "confirm": True})
    assert charge.value.code == "card_declined"
    # It does not honour idempotency keys: two creations with one key are two PaymentIntents.
    good = add_card(env, customer, CARD_OK, default=False)
    params = {"amount": 500, "currency": "usd", "customer": customer, "payment_method": good,
              "off_session": True, "confirm": True}
    key = {"idempotency_key": str(uuid.uuid4())}
    first = env.stripe.v1.payment_intents.create(params=params, options=key)
    second = env.stripe.v1.payment_intents.create(params=params, options=key)
    assert first.id != second.id and first.status == second.status == "succeeded"
    # Prices: with a unit amount, or without one (the customer chooses), as on Stripe.
    assert env.stripe.v1.prices.retrieve(price_without_amount(env)).unit_amount is None
    assert env.stripe.v1.prices.retrieve(env.pack).unit_amount == PACK_AMOUNT
    with pytest.raises(stripe.InvalidRequestError):
        env.stripe.v1.prices.retrieve("price_does_not_exist")


# === (a) a burst of spends: one top-up, one PaymentIntent, one grant ===========================


def test_fifty_concurrent_spends_make_one_payment_and_one_grant(env: Env) -> None:
    acct = account(env, purchased=600, threshold=450)
    barrier = threading.Barrier(50)
    errors: list[BaseException] = []

    def spender() -> None:
        try:
            with env.db.connect() as conn:
                barrier.wait()
                db.call_function(conn, "deduct_credits", {
                    "p_account_id": acct.account_id, "p_idempotency_key": new_key("burst"), "p_amount": 5})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=spender) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert acct.available() == 350
    [started] = acct.topups()
    assert started["status"] == "pending"

    with receiving(SECRET) as receiver:
        summary = env.notify(webhook=receiver.url)
        assert (summary["topups_claimed"], summary["topups_succeeded"]) == (1, 1)
        [intent] = acct.intents()
        assert (intent.status, intent.amount, intent.currency) == ("succeeded", PACK_AMOUNT, "usd")
        assert intent.metadata.to_dict() == {"topup_id": started["id"], "account_id": acct.account_id}
        assert intent.payment_method == acct.cards[0]
        assert acct.grants() == [(f"topup:{started['id']}", PACK_CREDITS, intent.id)]
        assert acct.available() == 350 + PACK_CREDITS
        [ended] = acct.topups()
        assert (ended["status"], ended["payment_intent"]) == ("succeeded", intent.id)
        succeeded_payload(acct, started["id"], intent.id)
        # Its event went out in the same run, signed.
        delivered = [r.event for r in receiver.of(acct.account_id)]
        assert [e["type"] for e in delivered] == ["topup.succeeded"] and not receiver.refused
        # Another run: nothing to charge, nothing charged twice.
        again = env.notify(webhook=receiver.url)
    assert again["topups_claimed"] == 0
    assert len(acct.intents()) == 1 and len(acct.grants()) == 1


# === (b) the worker and the webhook both report the success =====================================


@pytest.mark.parametrize("first", ["worker", "webhook"])
def test_a_success_reported_by_the_worker_and_the_webhook_grants_once(env: Env, first: str) -> None:
    acct = account(env)
    acct.spend(100)
    pending = acct.pending()
    [claimed] = [t for t in env.db.call("claim_topups") if t["topup_id"] == pending["id"]]
    charger = topup.StripeCharger(env.stand_in.api_key, env.stand_in.url, timeout=10)
    try:
        result = charger.charge(topup.Topup.from_claim(claimed))
    finally:
        charger.close()
    assert (result.outcome, result.reason) == ("succeeded", None) and result.payment_intent
    # The payment_intent.succeeded the stand-in wrote for it, signed with the endpoint's secret.
    event = stand_in_event(env, "payment_intent.succeeded", result.payment_intent)
    assert event["data"]["object"]["metadata"]["topup_id"] == pending["id"]
    worker = env.database()

    if first == "worker":
        recorded = worker.call(topup.RECORD, result.params())
        assert (recorded["status"], recorded["replayed"]) == ("succeeded", False)
        reply = env.deliver(event)
        assert (reply.status, reply.body["outcome"]) == (200, "ignored")
        assert env.db.one("select reason from public.stripe_events where event_id = %s",
                          event["id"]) == "topup_already_ended"
    else:
        reply = env.deliver(event)
        assert reply.status == 200 and reply.body["outcome"] == "applied"
        recorded = worker.call(topup.RECORD, result.params())
        assert (recorded["status"], recorded["replayed"]) == ("succeeded", True)
    assert env.deliver(event).body["outcome"] == "duplicate"  # Stripe's redelivery
    assert acct.grants() == [(f"topup:{pending['id']}", PACK_CREDITS, result.payment_intent)]
    assert acct.available() == 50 + PACK_CREDITS
    assert acct.event_types().count("topup.succeeded") == 1
    succeeded_payload(acct, pending["id"], result.payment_intent)


# === (c) a payment that needs the customer ======================================================


def test_a_card_that_needs_authentication_pauses_auto_top_up(env: Env) -> None:
    acct = account(env, CARD_AUTHENTICATE)
    acct.spend(100)
    pending = acct.pending()
    summary = env.notify()
    assert summary["topups_action_required"] == 1
    [intent] = acct.intents()
    assert intent.status == "requires_action"  # the stand-in answers 200 with it
    [ended] = acct.topups()
    assert (ended["status"], ended["payment_intent"]) == ("action_required", intent.id)
    assert acct.setting() == ("paused", "action_required")
    [event] = [e for e in acct.events() if e["type"] == "topup.action_required"]
    assert event["payload"] == {"topup_id": pending["id"], "pack": env.pack, "credits": PACK_CREDITS,
                                "payment_intent": intent.id, "reason": "authentication_required"}
    assert acct.grants() == [] and acct.available() == 50
    # Paused: lower still, after the cooldown, and nothing starts until the owner enables it again.
    acct.age()
    acct.spend(10)
    assert env.notify()["topups_claimed"] == 0 and len(acct.topups()) == 1
    assert acct.enable()["status"] == "active"
    acct.age()
    acct.spend(1)
    assert acct.pending()["status"] == "pending"


def test_stripes_402_authentication_required_is_action_required_not_a_decline(env: Env) -> None:
    acct = account(env, CARD_AUTHENTICATE)
    acct.spend(100)
    pending = acct.pending()
    answer = authentication_required_402(acct, pending["id"])
    with tapped(env.stand_in) as tap:
        tap.faults.append((402, answer))
        summary = env.notify(stripe_base=tap.url)
        assert tap.creations() == [pending["id"]]
    assert (summary["topups_action_required"], summary["topups_failed"]) == (1, 0)
    intent_id = answer["error"]["payment_intent"]["id"]
    [ended] = acct.topups()
    assert (ended["status"], ended["payment_intent"], ended["reason"]) == ("action_required", intent_id,
                                                                          "authentication_required")
    assert acct.setting()[0] == "paused"
    assert acct.event_types()[-1] == "topup.action_required"
    assert acct.events()[-1]["payload"]["payment_intent"] == intent_id


def test_the_webhooks_payment_failed_with_authentication_required_pauses(env: Env) -> None:
    acct = account(env, CARD_AUTHENTICATE)
    acct.spend(100)
    pending = acct.pending()
    intent = authentication_required_402(acct, pending["id"])["error"]["payment_intent"]
    event = {"id": stripe_id("evt"), "object": "event", "api_version": "2025-03-31.basil",
             "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
             "request": {"id": stripe_id("req"), "idempotency_key": pending["id"]},
             "type": "payment_intent.payment_failed", "data": {"object": intent}}
    reply = env.deliver(event)
    assert reply.status == 200 and reply.body["outcome"] == "applied"
    [ended] = acct.topups()
    assert (ended["status"], ended["payment_intent"]) == ("action_required", intent["id"])
    assert acct.setting()[0] == "paused" and acct.event_types()[-1] == "topup.action_required"
    # The worker finds nothing left to charge.
    assert env.notify()["topups_claimed"] == 0 and acct.intents() == []


# === (d) declines: the third in a row disables, with the cooldown between ======================


def test_three_declines_in_a_row_disable_with_the_cooldown_between(
        env: Env, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    key = f"sk_test_{uuid.uuid4().hex}"  # the stand-in takes any sk_ key: this one must never be logged
    acct = account(env, CARD_DECLINED, purchased=200)
    acct.spend(150)
    for attempt in range(1, 4):
        summary = env.notify(api_key=key)
        assert (summary["topups_claimed"], summary["topups_failed"]) == (1, 1), attempt
        ended = acct.topups()[-1]
        assert (ended["status"], ended["reason"]) == ("failed", "card_declined")
        assert len(acct.intents()) == attempt
        assert acct.intents()[0].status == "requires_payment_method"
        # Within the cooldown nothing starts, whatever is spent.
        acct.spend(1)
        assert len(acct.topups()) == attempt and env.notify(api_key=key)["topups_claimed"] == 0
        acct.age()  # 11 minutes later: the next spend (or, for a quiet account, notify) starts one
        if attempt == 1:
            acct.spend(1)
            assert acct.pending()
    failures = [e for e in acct.events() if e["type"] == "topup.failed"]
    assert [e["payload"]["reason"] for e in failures] == ["card_declined"] * 3
    assert acct.event_types()[-1] == "topup.disabled"
    assert acct.events()[-1]["payload"] == {"reason": "failed three times in a row",
                                            "topup_id": acct.topups()[-1]["id"]}
    assert acct.setting() == ("disabled", "failed three times in a row")
    acct.spend(1)
    assert env.notify(api_key=key)["topups_claimed"] == 0 and len(acct.topups()) == 3
    assert acct.grants() == []
    out = capfd.readouterr()
    assert key not in out.out + out.err + caplog.text


# === (e) a refund or dispute on the account pauses it =========================================


@pytest.mark.parametrize("kind", ["dispute", "refund"])
def test_a_dispute_or_refund_on_the_accounts_payment_pauses(env: Env, kind: str) -> None:
    acct = account(env)
    acct.spend(100)
    assert env.notify()["topups_succeeded"] == 1
    [intent] = acct.intents()
    charge = intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge["id"]
    values: dict[str, Any] = {"EVENT_ID": stripe_id("evt"), "CREATED": int(time.time()), "CHARGE": charge,
                              "PAYMENT_INTENT": intent.id, "AMOUNT": PACK_AMOUNT}
    if kind == "dispute":
        event = render("charge.dispute.created", DISPUTE=stripe_id("dp"), **values)
    else:
        event = render("charge.refunded", CUSTOMER=acct.customer, AMOUNT_REFUNDED=PACK_AMOUNT, REFUNDED=True,
                       **values)
    reply = env.deliver(event)
    assert reply.status == 200 and reply.body["outcome"] == "applied", reply.body
    assert acct.setting()[0] == "paused"
    [paused] = [e for e in acct.events() if e["type"] == "topup.paused"]
    assert set(paused["payload"]) == {"reason"} and paused["payload"]["reason"]
    assert acct.available() == 50  # the top-up's credits went back
    acct.age()
    acct.spend(10)
    assert env.notify()["topups_claimed"] == 0 and len(acct.topups()) == 1


# === (f) the monthly cap ========================================================================


def test_the_monthly_cap_holds(env: Env) -> None:
    acct = account(env, p_max_per_month=2)
    for _ in range(2):
        acct.spend(acct.available() - 50)
        assert env.notify()["topups_succeeded"] == 1
        acct.age()
    acct.spend(acct.available() - 50)
    assert env.notify()["topups_claimed"] == 0
    assert [t["status"] for t in acct.topups()] == ["succeeded", "succeeded"]
    assert len(acct.intents()) == 2 and len(acct.grants()) == 2
    assert acct.enable(p_max_per_month=2)["this_month"] == 2


# === (g) network errors: tried again with the same idempotency key ============================


def test_a_network_error_is_retried_with_the_same_idempotency_key(env: Env) -> None:
    acct = account(env)
    acct.spend(100)
    pending = acct.pending()
    nowhere = f"http://127.0.0.1:{closed_port()}"
    summary = env.notify(stripe_base=nowhere)
    assert (summary["topups_claimed"], summary["topups_retried"]) == (1, 1)
    still = acct.pending()
    assert (still["id"], still["attempts"], still["reason"], still["leased_until"]) == (
        pending["id"], 1, "network_error", None)
    assert acct.intents() == [] and acct.event_types() == []

    with tapped(env.stand_in) as tap:
        tap.faults.append("drop")  # the creation never gets an answer
        assert env.notify(stripe_base=tap.url)["topups_retried"] == 1
        assert acct.pending()["attempts"] == 2
        summary = env.notify(stripe_base=tap.url)
        assert summary["topups_succeeded"] == 1
        # Both creations carried the top-up's id as Stripe's idempotency key.
        assert tap.creations() == [pending["id"], pending["id"]]
    [intent] = acct.intents()
    assert acct.grants() == [(f"topup:{pending['id']}", PACK_CREDITS, intent.id)]
    assert acct.topups()[0]["attempts"] == 3


@pytest.mark.parametrize(("status", "answer", "reason"), [
    (500, {"error": {"type": "api_error", "message": "Something went wrong on Stripe's end."}},
     "stripe_unavailable"),
    (429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                     "message": "Request rate limit exceeded."}}, "rate_limited"),
])
def test_stripe_unavailable_or_rate_limited_is_retried(env: Env, status: int, answer: dict[str, Any],
                                                       reason: str) -> None:
    acct = account(env)
    acct.spend(100)
    pending = acct.pending()
    with tapped(env.stand_in) as tap:
        tap.faults.append((status, answer))
        assert env.notify(stripe_base=tap.url)["topups_retried"] == 1
        assert acct.pending()["reason"] == reason
        assert env.notify(stripe_base=tap.url)["topups_succeeded"] == 1
        assert tap.creations() == [pending["id"], pending["id"]]
    assert len(acct.intents()) == 1 and len(acct.grants()) == 1


# === (h) no Stripe key ==========================================================================


def test_without_a_stripe_key_a_due_top_up_fails_and_disables(env: Env) -> None:
    acct = account(env)
    acct.spend(100)
    pending = acct.pending()
    summary = env.notify(api_key=None)
    assert (summary["topups_claimed"], summary["topups_failed"]) == (1, 1)
    [ended] = acct.topups()
    assert (ended["status"], ended["reason"]) == ("failed", "not_configured")
    assert acct.event_types() == ["topup.failed", "topup.disabled"]
    failed, disabled = acct.events()
    assert failed["payload"] == {"topup_id": pending["id"], "pack": env.pack, "credits": PACK_CREDITS,
                                 "payment_intent": None, "reason": "not_configured"}
    assert disabled["payload"] == {"reason": "not_configured", "topup_id": pending["id"]}
    assert acct.setting() == ("disabled", "not_configured")
    assert acct.intents() == []


# === (i) two workers racing: the database alone keeps it to one payment ========================


def test_two_notify_runs_at_once_charge_each_top_up_once(env: Env) -> None:
    accounts = [account(env) for _ in range(6)]
    for acct in accounts:
        acct.spend(100)
    summaries: list[dict[str, Any]] = []
    settings = notify_env(env.rest_url, stripe_base=env.stand_in.url, api_key=env.stand_in.api_key,
                          NOTIFY_CONCURRENCY="2")
    with notify_handler(settings) as first, notify_handler(settings) as second:
        barrier = threading.Barrier(2)

        def go(handler: Handler) -> None:
            barrier.wait()
            summaries.append(run(handler))

        threads = [threading.Thread(target=go, args=(h,)) for h in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(summaries) == 2
    assert sum(s["topups_claimed"] for s in summaries) == sum(s["topups_succeeded"] for s in summaries) == 6
    for acct in accounts:
        # The stand-in honours no idempotency key: one PaymentIntent each is the database's doing.
        assert len(acct.intents()) == 1 and len(acct.grants()) == 1
        assert acct.available() == 50 + PACK_CREDITS


# === the worker's other rules ===================================================================


def test_a_top_up_older_than_23_hours_takes_the_outcome_of_its_existing_payment(env: Env) -> None:
    acct = account(env)
    acct.spend(100)
    pending = acct.pending()
    # An earlier attempt reached Stripe but its answer was lost a day ago.
    earlier = env.stripe.v1.payment_intents.create(params={
        "amount": PACK_AMOUNT, "currency": "usd", "customer": acct.customer, "payment_method": acct.cards[0],
        "off_session": True, "confirm": True, "metadata": {"topup_id": pending["id"],
                                                           "account_id": acct.account_id}})
    acct.age("24 hours")
    with tapped(env.stand_in) as tap:
        assert env.notify(stripe_base=tap.url)["topups_succeeded"] == 1
        assert tap.creations() == []  # looked up, not created again
    assert [i.id for i in acct.intents()] == [earlier.id]
    assert acct.grants() == [(f"topup:{pending['id']}", PACK_CREDITS, earlier.id)]


def test_a_top_up_older_than_23_hours_without_a_payment_creates_one(env: Env) -> None:
    acct = account(env)
    other = env.stripe.v1.payment_intents.create(params={  # another payment of the customer
        "amount": 700, "currency": "usd", "customer": acct.customer, "payment_method": acct.cards[0],
        "off_session": True, "confirm": True})
    acct.spend(100)
    pending = acct.pending()
    acct.age("24 hours")
    assert env.notify()["topups_succeeded"] == 1
    [intent, _] = acct.intents()
    assert intent.id != other.id and intent.metadata["topup_id"] == pending["id"]


@pytest.mark.parametrize("problem", ["price_without_amount", "no_payment_method"])
def test_what_the_worker_cannot_charge_fails_with_its_reason(env: Env, problem: str) -> None:
    if problem == "price_without_amount":
        price = price_without_amount(env)
        env.db.sql("insert into public.credit_packs (stripe_price_id, credits, name) values (%s, %s, 'Open')",
                   price, PACK_CREDITS)
        acct = account(env, threshold=None)
        acct.db.call("set_auto_topup", acct.owner, p_account_id=acct.account_id, p_enabled=True,
                     p_threshold=100, p_pack=price)
    else:
        acct = account(env, card=None)
    acct.spend(100)
    assert env.notify()["topups_failed"] == 1
    [ended] = acct.topups()
    assert (ended["status"], ended["reason"]) == ("failed", problem)
    assert acct.events()[-1]["type"] == "topup.failed" and acct.events()[-1]["payload"]["reason"] == problem
    assert acct.intents() == [] and acct.setting()[0] == "active"  # one failure: not yet disabled


def test_the_default_payment_method_pays_else_the_newest_card(env: Env) -> None:
    acct = account(env, CARD_OK)
    time.sleep(1.1)  # Stripe's times are whole seconds
    newer = add_card(env, acct.customer, CARD_DECLINED, default=False)
    acct.spend(100)
    assert env.notify()["topups_succeeded"] == 1
    assert acct.intents()[0].payment_method == acct.cards[0]  # the default, though older

    plain = account(env, CARD_OK, default=False)
    time.sleep(1.1)
    newest = add_card(env, plain.customer, CARD_DECLINED, default=False)
    plain.spend(100)
    assert env.notify()["topups_failed"] == 1
    assert plain.intents()[0].payment_method == newest != newer


# === settings =====================================================================================


def test_the_stripe_key_comes_from_ssm_and_never_shows(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    from functions import settings as settings_module

    key = f"rk_test_{uuid.uuid4().hex}"
    base = notify_env(env.rest_url, stripe_base=None, api_key=None)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(settings_module, "_ssm", None)
    with mock_aws():
        parameter = "/credits/test/stripe-api-key"
        boto3.client("ssm").put_parameter(Name=parameter, Value=key, Type="SecureString")
        loaded = load_settings(NotifySettings, {**base, "STRIPE_API_KEY_PARAM": parameter})
    monkeypatch.setattr(settings_module, "_ssm", None)
    assert loaded.stripe_api_key == key and key not in repr(loaded) and key not in str(loaded)
    assert loaded.stripe_api_base == "https://api.stripe.com" and loaded.stripe_timeout_seconds == 10
    assert load_settings(NotifySettings, base).stripe_api_key is None  # optional: top-ups fail not_configured
    with pytest.raises(SettingsError, match="invalid setting STRIPE_API_BASE"):
        load_settings(NotifySettings, {**base, "STRIPE_API_BASE": "api.stripe.com"})
    with pytest.raises(SettingsError, match="invalid setting STRIPE_TIMEOUT_SECONDS"):
        load_settings(NotifySettings, {**base, "STRIPE_TIMEOUT_SECONDS": "60"})


# === the SQL gap this feature's set-up runs into ==================================================


def test_a_setup_mode_checkout_links_the_customer_so_auto_top_up_can_be_enabled(env: Env) -> None:
    owner, account_id = env.db.new_user()
    customer = env.stripe.v1.customers.create(params={"email": "setup@example.test"}).id
    session = render("checkout.session.completed.payment", EVENT_ID=stripe_id("evt"),
                     CREATED=int(time.time()), SESSION=stripe_id("cs_test"), ACCOUNT_ID=account_id,
                     CUSTOMER=customer, PAYMENT_INTENT=OMIT, PAYMENT_STATUS="no_payment_required",
                     CREDITS=OMIT, PRICE=OMIT, QUANTITY=OMIT, AMOUNT=0)
    session["data"]["object"].update(mode="setup", payment_intent=None, setup_intent=stripe_id("seti"),
                                     amount_total=None)
    reply = env.deliver(session)
    assert reply.status == 200
    assert env.db.one("select stripe_customer_id from public.credit_accounts where id = %s",
                      account_id) == customer, reply.body
    env.db.call("set_auto_topup", owner, p_account_id=account_id, p_enabled=True, p_threshold=100,
                p_pack=env.pack)


# === the local stack: ./dev start --stripe-stand-in and ./dev demo ================================


def test_dev_start_with_the_stand_in_charges_top_ups_and_the_demo_shows_one(tmp_path: Path) -> None:
    out = StringIO()
    with serve.run_stack(tmp_path / "pgdata", port_base=None, reset_data=True, keep_data=False) as stack, \
            ExitStack() as stop:
        assert "./dev start --stripe-stand-in" in serve.describe_stripe(stack)
        serve.start_stripe_stand_in(stack, stop)
        stack.notify = serve.start_notify(stack, stop)
        banner = serve.banner(stack)
        assert f"auto top-up      charged on the local Stripe stand-in {stack.stripe_api_base}" in banner
        state = tmp_path / "stack.json"
        serve.write_state(stack, state)
        found = serve.running_stack(state)
        assert found is not None and (found.stripe_api_base, found.stripe_api_key) == (
            stack.stripe_api_base, stack.stripe_api_key)
        demo.Demo(found, out=out).run()
        text = out.getvalue()
        assert "Gus turns on auto top-up" in text and "topup.succeeded" in text and "0 mismatches" in text
        # The stand-in posted its payment_intent.succeeded, signed, to the local webhook.
        deadline = time.monotonic() + 20
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            while True:
                rows = conn.execute("select outcome from public.stripe_events"
                                    " where type = 'payment_intent.succeeded'").fetchall()
                if rows or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert rows and rows[0][0] in ("applied", "ignored")
