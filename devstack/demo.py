"""`./dev demo`: one account's life, told through the real HTTP endpoints.

The whole local stack starts in this process on free ports over a throwaway
database. A new user signs up (an ``auth.users`` row, as Supabase Auth writes
it), buys a credit pack (a ``checkout.session.completed`` event signed like
Stripe signs it), spends, reserves and captures, subscribes and is renewed by
invoices, gets a partial refund clawed back, and finally a free account is
renewed by the monthly reset. Every step prints the balance it leaves.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import sys
import tempfile
import time
import uuid
import warnings
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from devstack import serve

PACK_PRICE = "price_demo_pack_100"  # 100 credits (supabase/seed.sql)
PLAN_PRICE = "price_demo_pro_monthly"  # the "pro" plan: 500 credits a month


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
    def __init__(self, stack: serve.Stack, out: Any = sys.stdout) -> None:
        if not (stack.credits_url and stack.webhook_url):
            raise DemoError("the demo needs the credits API and the Stripe webhook apps")
        self.stack = stack
        self.out = out
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

        check = self.rpc("reconcile_credit_balances", {})
        self.say(f"\nLedger check: {check['checked']} pools, {len(check['mismatches'])} mismatches.")
        self.check(check["mismatches"] == [], "ledger explains every balance")

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
                                 keep_data=False) as stack:
                Demo(stack).run()
        print("\nDone; the demo's database is gone.")
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    raise SystemExit(main())
