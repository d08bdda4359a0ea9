"""`./dev demo`: one account's life, told through the real HTTP endpoints.

The whole local stack starts in this process on free ports over a throwaway
database. A new user signs up (an ``auth.users`` row, as Supabase Auth writes
it), buys a credit pack (a ``checkout.session.completed`` event signed like
Stripe signs it), spends, reserves and captures, subscribes and is renewed by
invoices, gets a partial refund clawed back, and finally a free account is
renewed by the monthly reset. Every step prints the balance it leaves. With a local
Stripe stand-in (``./dev start --stripe-stand-in``, or the throwaway stack's own when
localstripe is installed), a third user turns on auto top-up and notify buys his pack
when his credits run low.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg

from devstack import db, serve, stripe_stand_in

PACK_PRICE = "price_demo_pack_100"  # 100 credits (supabase/seed.sql)
PLAN_PRICE = "price_demo_pro_monthly"  # the "pro" plan: 500 credits a month
TOPUP_CREDITS = 100  # the auto top-up pack's credits (a pack whose price is the stand-in's)
TOPUP_THRESHOLD = 20
TOPUP_WAIT_SECONDS = 30


class DemoError(RuntimeError):
    """A step answered something other than what the story expects."""


def stripe_signature(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """``Stripe-Signature`` as Stripe computes it: HMAC-SHA256 of ``"<ts>.<body>"``."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def stripe_event(event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"evt_demo_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2025-03-31.basil",
        "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None}, "type": event_type, "data": {"object": obj},
    }


def invoice(invoice_id: str, customer: str, subscription: str, account_id: str, reason: str,
            start: datetime, end: datetime) -> dict[str, Any]:
    """An ``invoice`` in the 2025-03-31 shape (subscription and price under parent/pricing)."""
    return {
        "id": invoice_id, "object": "invoice", "customer": customer, "status": "paid",
        "billing_reason": reason, "amount_due": 2900, "amount_paid": 2900, "currency": "usd",
        "parent": {"type": "subscription_details", "quote_details": None,
                   "subscription_details": {"subscription": subscription,
                                            "metadata": {"account_id": account_id}}},
        "lines": {"object": "list", "has_more": False, "data": [{
            "id": f"il_demo_{uuid.uuid4().hex[:16]}", "object": "line_item", "amount": 2900, "quantity": 1,
            "period": {"start": int(start.timestamp()), "end": int(end.timestamp())},
            "parent": {"type": "subscription_item_details", "subscription_item_details": {
                "subscription": subscription, "proration": False, "invoice_item": None}},
            "pricing": {"type": "price_details",
                        "price_details": {"price": PLAN_PRICE, "product": "prod_demo"}},
            "metadata": {},
        }]},
    }


class Demo:
    def __init__(self, stack: serve.Stack, out: Any = sys.stdout, *, own_stack: bool = False) -> None:
        if not (stack.credits_url and stack.webhook_url):
            raise DemoError("the demo needs the credits API and the Stripe webhook apps")
        self.stack = stack
        self.out = out
        # The demo's own throwaway stack: it may deliver every pending event to its receiver.
        self.own_stack = own_stack
        self.http = httpx.Client(timeout=30)
        self.run_id = uuid.uuid4().hex[:8]  # the story can run again on the same database

    # --- plumbing ---------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def expect(self, response: httpx.Response, status: int = 200) -> dict[str, Any]:
        if response.status_code != status:
            raise DemoError(f"{response.request.method} {response.request.url.path}: "
                            f"{response.status_code} {response.text[:300]}")
        return response.json()

    def credits(self, method: str, path: str, token: str, *, key: str | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        if key:
            headers["Idempotency-Key"] = key
        return self.expect(self.http.request(method, f"{self.stack.credits_url}{path}", headers=headers,
                                             json=body))

    def webhook(self, event: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(event).encode()
        headers = {"Stripe-Signature": stripe_signature(body, self.stack.webhook_secret),
                   "Content-Type": "application/json"}
        return self.expect(self.http.post(f"{self.stack.webhook_url}/stripe/webhook", content=body,
                                          headers=headers))

    def rpc(self, fn: str, args: dict[str, Any]) -> Any:
        headers = {"apikey": self.stack.secret_key}
        url = f"{self.stack.rest_url}/rest/v1/rpc/{fn}"
        return self.expect(self.http.post(url, headers=headers, json=args))

    def sign_up(self, email: str) -> tuple[str, str]:
        """What Supabase Auth does on sign-up: insert the ``auth.users`` row."""
        user_id = str(uuid.uuid4())
        with psycopg.connect(self.stack.dsn, autocommit=True) as conn:
            conn.execute("insert into auth.users (id, email, raw_app_meta_data) values (%s, %s, %s)",
                         (user_id, email, json.dumps({"provider": "email"})))
        return user_id, self.stack.user_token(user_id, email=email)

    def show(self, step: str, balance: dict[str, Any], note: str = "") -> None:
        self.say(f"  {step:<38} subscription={balance['subscription']:>4}"
                 f"  purchased={balance['purchased']:>4}  held={balance['held']:>3}"
                 f"  available={balance['available']:>4}" + (f"   {note}" if note else ""))

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            raise DemoError(what)

    # --- the story ----------------------------------------------------------------
    def run(self) -> None:
        self.say(f"REST {self.stack.rest_url}  credits {self.stack.credits_url}  "
                 f"webhook {self.stack.webhook_url}")
        self.say()
        self.say("Dana signs up (the auth.users trigger opens an account on the free plan):")
        _user_id, token = self.sign_up(f"dana+{self.run_id}@example.com")
        balance = self.credits("GET", "/credits/balance", token)
        account = balance["account_id"]
        self.check(balance["subscription"] == 3, "sign-up allowance")
        self.show("sign-up allowance", balance)

        self.say("\nShe buys a 100-credit pack (Stripe Checkout, signed webhook):")
        payment_intent = f"pi_demo_{uuid.uuid4().hex[:20]}"
        customer = f"cus_demo_{uuid.uuid4().hex[:14]}"
        purchase = stripe_event("checkout.session.completed", {
            "id": f"cs_demo_{uuid.uuid4().hex[:24]}", "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "status": "complete", "client_reference_id": account,
            "customer": customer, "payment_intent": payment_intent, "amount_total": 1000, "currency": "usd",
            "metadata": {"account_id": account, "price_id": PACK_PRICE, "quantity": "1"},
        })
        answer = self.webhook(purchase)
        balance = self.credits("GET", "/credits/balance", token)
        self.check(balance["purchased"] == 100, "pack credited")
        self.show(f"checkout.session.completed ({answer['outcome']})", balance)
        answer = self.webhook(purchase)  # Stripe retries deliveries; nothing is granted twice
        balance = self.credits("GET", "/credits/balance", token)
        self.check(balance["purchased"] == 100, "retried event ignored")
        self.show(f"same event redelivered ({answer['outcome']})", balance)

        self.say("\nShe generates an image (4 credits; subscription credits go first):")
        spent = self.credits("POST", "/credits/deduct", token, key="demo-image-1",
                             body={"operation": "image.generate"})
        self.show(f"deduct image.generate (-{spent['charged']})", spent["balance"],
                  f"from subscription {spent['from_subscription']}, purchased {spent['from_purchased']}")
        again = self.credits("POST", "/credits/deduct", token, key="demo-image-1",
                             body={"operation": "image.generate"})
        self.check(again["replayed"] and again["balance"]["total"] == spent["balance"]["total"], "replay")
        self.show("same Idempotency-Key again (replayed)", again["balance"])

        self.say("\nA long job reserves 10 credits, then uses 7:")
        hold = self.credits("POST", "/credits/holds", token, key="demo-job-1", body={"amount": 10})
        self.show("reserve 10 (a hold)", hold["balance"])
        captured = self.credits("POST", f"/credits/holds/{hold['hold_id']}/capture", token,
                                body={"amount": 7})
        self.show(f"capture {captured['charged']}, release {captured['released']}", captured["balance"])

        self.say("\nShe subscribes to Pro (500 credits a month), Stripe bills every period:")
        subscription = f"sub_demo_{uuid.uuid4().hex[:14]}"
        self.webhook(stripe_event("checkout.session.completed", {
            "id": f"cs_demo_{uuid.uuid4().hex[:24]}", "object": "checkout.session", "mode": "subscription",
            "payment_status": "paid", "status": "complete", "client_reference_id": account,
            "customer": customer, "subscription": subscription, "payment_intent": None,
            "metadata": {"account_id": account, "price_id": PLAN_PRICE},
        }))
        now = datetime.now(UTC).replace(microsecond=0)
        first_end = now + timedelta(days=30)
        answer = self.webhook(stripe_event("invoice.paid", invoice(
            f"in_demo_{uuid.uuid4().hex[:14]}", customer, subscription, account, "subscription_create",
            now, first_end)))
        balance = self.credits("GET", "/credits/balance", token)
        self.check(balance["subscription"] == 500, "first period granted")
        self.show(f"invoice.paid, first period ({answer['outcome']})", balance)
        spent = self.credits("POST", "/credits/deduct", token, key="demo-chat-1",
                             body={"operation": "chat.completion", "input_tokens": 1800,
                                   "output_tokens": 900})
        self.show(f"chat.completion with tokens (-{spent['charged']})", spent["balance"])
        answer = self.webhook(stripe_event("invoice.paid", invoice(
            f"in_demo_{uuid.uuid4().hex[:14]}", customer, subscription, account, "subscription_cycle",
            first_end, first_end + timedelta(days=30))))
        balance = self.credits("GET", "/credits/balance", token)
        self.check(balance["subscription"] == 500, "renewal: leftover expired, new allowance granted")
        self.show(f"invoice.paid, renewal ({answer['outcome']})", balance, "unused allowance expired")

        self.say("\nHalf of the pack's payment is refunded; Stripe reports it, the credits go back:")
        answer = self.webhook(stripe_event("charge.refunded", {
            "id": f"ch_demo_{uuid.uuid4().hex[:20]}", "object": "charge", "amount": 1000,
            "amount_captured": 1000, "amount_refunded": 500, "refunded": False, "captured": True,
            "paid": True, "status": "succeeded", "currency": "usd", "customer": customer,
            "payment_intent": payment_intent,
        }))
        after_refund = self.credits("GET", "/credits/balance", token)
        self.check(after_refund["purchased"] == balance["purchased"] - 50, "half the pack clawed back")
        self.show(f"charge.refunded 50% ({answer['outcome']})", after_refund)

        rows = self.credits("GET", f"/credits/transactions?account_id={account}&limit=50", token)
        self.say(f"\nHer ledger has {len(rows['transactions'])} rows; newest first:")
        for row in rows["transactions"][:6]:
            self.say(f"    {row['type']:<10} {row['pool']:<12} {row['amount']:>+6}"
                     f"  -> {row['balance_after']}")

        self.say("\nThe monthly reset renews accounts that Stripe does not (Erin is on the free plan):")
        _erin_id, erin = self.sign_up(f"erin+{self.run_id}@example.com")
        self.credits("POST", "/credits/deduct", erin, key="demo-erin-1", body={"amount": 2})
        self.show("Erin after spending 2", self.credits("GET", "/credits/balance", erin))
        next_month = (date.today().replace(day=1) + timedelta(days=32)).replace(day=1)
        result = self.monthly_reset(next_month)
        renewed = self.credits("GET", "/credits/balance", erin)
        self.check(renewed["subscription"] == 3, "free allowance renewed")
        self.show(f"reset for {next_month.isoformat()}", renewed,
                  f"processed {result.get('processed')}, granted {result.get('granted')}")
        balance = self.credits("GET", "/credits/balance", token)
        self.check(balance["subscription"] == 500, "Stripe-renewed account left alone")
        self.show("Dana (renewed by Stripe) unchanged", balance)

        self.alerts_and_live_balance()
        self.auto_topup()

        check = self.rpc("reconcile_credit_balances", {})
        self.say(f"\nLedger check: {check['checked']} pools, {len(check['mismatches'])} mismatches.")
        self.check(check["mismatches"] == [], "ledger explains every balance")

    def rest_rows(self, table: str, token: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """Rows of a table as the user reads them through the REST endpoint (RLS applies)."""
        headers = {"apikey": self.stack.publishable_key, "Authorization": f"Bearer {token}"}
        response = self.http.get(f"{self.stack.rest_url}/rest/v1/{table}", headers=headers, params=query)
        if response.status_code != 200:
            raise DemoError(f"GET /rest/v1/{table}: {response.status_code} {response.text[:300]}")
        rows: list[dict[str, Any]] = response.json()
        return rows

    def alerts_and_live_balance(self) -> None:
        """Faye sets a low-balance alert and spends across it: the event is written with the spend,
        notify delivers it signed to a receiver that verifies it (docs/examples/verify_signature.py),
        and each change of her balance is broadcast on the Realtime topic credits:<account_id>."""
        from devstack import events_ops

        email = f"faye+{self.run_id}@example.com"
        _faye_id, faye = self.sign_up(email)
        account = self.credits("GET", "/credits/balance", faye)["account_id"]
        self.rpc("add_purchased_credits", {"p_account_id": account, "p_amount": 100,
                                           "p_idempotency_key": f"demo-faye-{self.run_id}"})
        start = self.credits("GET", "/credits/balance", faye)["available"]
        threshold = 50
        self.say(f"\nFaye sets a balance alert at {threshold} credits (re-armed at {2 * threshold}):")
        alert = self.rpc("set_balance_alert", {"p_account_id": account, "p_threshold": threshold})
        self.check(alert["armed"] is True, "the new alert is armed")
        spent = self.credits("POST", "/credits/deduct", faye, key="demo-faye-1",
                             body={"amount": start - threshold + 10})
        self.show("deduct across the threshold", spent["balance"], "balance.low written with the spend")

        with psycopg.connect(self.stack.dsn, autocommit=True) as conn:
            row = conn.execute("select payload, event from realtime.messages where topic = %s"
                               " order by inserted_at desc limit 1", (f"credits:{account}",)).fetchone()
        self.check(row is not None and row[0]["available"] == spent["balance"]["available"],
                   "the balance broadcast on its Realtime topic")
        assert row is not None
        self.say(f"  broadcast on credits:{account[:8]}… (event {row[1]!r}): available {row[0]['available']},"
                 f" held {row[0]['held']}, debt {row[0]['debt']}")

        if not self.own_stack:
            events = self.rest_rows("credit_events", faye, {"account_id": f"eq.{account}"})
            self.say(f"  event {events[0]['type']} (seq {events[0]['seq']}) is in credit_events; the running"
                     " stack's notify sends it to NOTIFY_WEBHOOK_URL when one is set (./dev events list)")
            return
        spec = importlib.util.spec_from_file_location(
            "verify_signature", db.ROOT / "docs" / "examples" / "verify_signature.py")
        assert spec is not None and spec.loader is not None
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        secret = secrets.token_hex(24)
        received: list[dict[str, Any]] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0),
                                     example.make_handler(secret, example.Deduplicator(received.append)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/credit-events"
            env = events_ops.notify_env(self.stack.settings_env(),
                                        {"NOTIFY_WEBHOOK_URL": url, "NOTIFY_SIGNING_SECRET": secret})
            summary = events_ops.NotifyLoop(env).run_once()
        finally:
            server.shutdown()
            thread.join(timeout=10)
        mine = [e for e in received if e["account_id"] == account]
        self.check([e["type"] for e in mine] == ["balance.low"], f"the alert reached the receiver ({mine})")
        self.say(f"  notify run: {summary['delivered']} delivered to a local receiver at {url}, which"
                 " verified the Credits-Signature header:")
        figures = {k: v for k, v in mine[0]["payload"].items() if k != "balance"}
        self.say(f"    {mine[0]['type']} seq {mine[0]['seq']}: {json.dumps(figures, sort_keys=True)}")

    def auto_topup(self) -> None:
        """Gus saves a card, turns on auto top-up, spends below the threshold; notify buys the pack."""
        if not (self.stack.stripe_api_base and self.stack.stripe_api_key):
            self.say("\nAuto top-up is not shown: this stack has no Stripe stand-in. Start one with"
                     " `./dev start --stripe-stand-in`, then run `./dev demo` again.")
            return
        import stripe

        from devstack import events_ops

        self.say(f"\nGus turns on auto top-up: a {TOPUP_CREDITS}-credit pack whenever fewer than"
                 f" {TOPUP_THRESHOLD} are left (Stripe: the local stand-in at {self.stack.stripe_api_base}):")
        client = stripe.StripeClient(self.stack.stripe_api_key,
                                     base_addresses={"api": self.stack.stripe_api_base})
        price = client.v1.prices.create(params={"currency": "usd", "unit_amount": 900,
                                                "product_data": {"name": "Demo auto top-up pack"}})
        email = f"gus+{self.run_id}@example.com"
        customer = client.v1.customers.create(params={"email": email})
        card = client.v1.payment_methods.create(params={"type": "card", "card": {
            "number": "4242424242424242", "exp_month": 12, "exp_year": datetime.now(UTC).year + 3,
            "cvc": "123"}})
        client.v1.payment_methods.attach(card.id, params={"customer": customer.id})
        client.v1.customers.update(customer.id,
                                   params={"invoice_settings": {"default_payment_method": card.id}})
        _gus_id, gus = self.sign_up(email)
        account = self.credits("GET", "/credits/balance", gus)["account_id"]
        with psycopg.connect(self.stack.dsn, autocommit=True) as conn:
            # The catalog row of the stand-in's price (an operator adds the pack once).
            conn.execute("insert into public.credit_packs (stripe_price_id, credits, name)"
                         " values (%s, %s, 'Auto top-up pack')", (price.id, TOPUP_CREDITS))
        # The card was saved through Checkout in setup mode: its completion links the customer.
        linked = self.webhook(stripe_event("checkout.session.completed", {
            "id": f"cs_demo_setup_{self.run_id}", "object": "checkout.session", "mode": "setup",
            "status": "complete", "customer": customer.id, "client_reference_id": account,
            "setup_intent": f"seti_demo_{self.run_id}", "metadata": {}}))
        self.check(linked.get("outcome") == "applied", f"setup checkout {linked}")
        self.say(f"  a saved card on {customer.id} (its default payment method), linked by a setup-mode"
                 f" checkout; set_auto_topup: below {TOPUP_THRESHOLD}, pack {price.id}")
        self.rpc("set_auto_topup", {"p_account_id": account, "p_enabled": True,
                                    "p_threshold": TOPUP_THRESHOLD, "p_pack": price.id})
        spent = self.credits("POST", "/credits/deduct", gus, key="demo-gus-1", body={"amount": 2})
        self.show("deduct 2: below the threshold", spent["balance"], "the database starts one top-up")

        env = events_ops.notify_env(self.stack.settings_env())
        env.update(self.stack.stripe_env())
        summary = events_ops.NotifyLoop(env).run_once()
        deadline = time.monotonic() + TOPUP_WAIT_SECONDS  # `./dev start`'s own notify loop may charge it
        while True:
            topups = self.rest_rows("credit_topups", gus, {"account_id": f"eq.{account}"})
            if topups and topups[0]["status"] != "pending":
                break
            if time.monotonic() > deadline:
                raise DemoError("the top-up was not charged in time")
            time.sleep(0.5)
        self.check(topups[0]["status"] == "succeeded", f"top-up {topups[0]['status']}")
        balance = self.credits("GET", "/credits/balance", gus)
        self.check(balance["purchased"] == TOPUP_CREDITS, "pack granted once")
        self.show(f"notify run ({summary['topups_succeeded']} top-up charged)", balance,
                  f"PaymentIntent {topups[0]['payment_intent']}")
        events = self.rest_rows("credit_events", gus, {"account_id": f"eq.{account}", "order": "seq.asc"})
        for event in events:
            payload = {k: v for k, v in event["payload"].items() if k != "balance"}
            self.say(f"    event {event['seq']} {event['type']:<16} {json.dumps(payload, sort_keys=True)}")
        self.check([e["type"] for e in events][-1:] == ["topup.succeeded"], "topup.succeeded written")

    def monthly_reset(self, period_start: date) -> dict[str, Any]:
        """Through the scheduled function's local trigger when it is there, else the
        batch loop it runs, over REST."""
        if self.stack.reset_url:
            return self.expect(self.http.post(f"{self.stack.reset_url}/monthly-reset",
                                              headers={"apikey": self.stack.secret_key},
                                              json={"period_start": period_start.isoformat()}))
        totals: dict[str, Any] = {"processed": 0, "granted": 0}
        after = None
        while True:
            batch = self.rpc("run_monthly_reset",
                             {"p_period_start": period_start.isoformat(), "p_after": after})
            totals["processed"] += batch["processed"]
            totals["granted"] += batch["granted"]
            if batch["done"]:
                return totals
            after = batch["next_after"]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="./dev demo", description=__doc__).parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # The story is the output here: keep the functions' request logs and metrics quiet.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    try:
        running = serve.running_stack()
        if running is not None:
            print(f"Using the running local stack (./dev start) at {running.rest_url}: the demo adds two"
                  " users to its database and runs next month's reset on it.", flush=True)
            Demo(running).run()
            print("\nDone; the users and their ledgers stay in the running stack's database.")
            return 0
        with tempfile.TemporaryDirectory(prefix="credits-demo-") as tmp:
            print("No local stack is running (./dev start); starting a throwaway one on free ports...",
                  flush=True)
            with serve.run_stack(Path(tmp) / "pgdata", port_base=None, reset_data=True,
                                 keep_data=False) as stack, ExitStack() as stand_in:
                if stripe_stand_in.available():
                    serve.start_stripe_stand_in(stack, stand_in)
                Demo(stack, own_stack=True).run()
        print("\nDone; the demo's database is gone.")
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    raise SystemExit(main())
