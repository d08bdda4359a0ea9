"""Both generations of Supabase keys, end to end through the three Lambda handlers.

A project created today has ``sb_publishable_``/``sb_secret_`` API keys and signs
user tokens with an ES256 key published as a JWKS; an older one has the
JWT-shaped ``anon``/``service_role`` keys and signs with the shared HS256 secret.
The same handlers must work with either configuration, against the same local
REST endpoint (which maps the newer keys to roles as Supabase's gateway does).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from devstack import tokens
from tests.lambda_events import LambdaContext, cold_start, http_event, response_json, scheduled_event
from tests.stripe_support import TEST_WEBHOOK_SECRET, body_of, render, sign, stripe_id
from tests.support import Db

GENERATIONS = ["sb_keys_and_signing_key", "legacy_keys_and_jwt_secret"]


def environment(generation: str, rest_url: str) -> dict[str, str]:
    keys = tokens.default_keys()
    common = {"SUPABASE_URL": rest_url, "CORS_ALLOW_ORIGINS": "https://app.example.test",
              "STRIPE_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET, "RPC_TIMEOUT_SECONDS": "10"}
    if generation == "sb_keys_and_signing_key":
        # No JWT secret at all: tokens are checked against SUPABASE_URL/auth/v1/.well-known/jwks.json.
        return {**common, "SUPABASE_PUBLISHABLE_KEY": keys.publishable_key,
                "SUPABASE_SECRET_KEY": keys.secret_key}
    return {**common, "SUPABASE_ANON_KEY": keys.anon_key(),
            "SUPABASE_SERVICE_ROLE_KEY": keys.service_role_key(), "SUPABASE_JWT_SECRET": keys.jwt_secret}


def user_token(generation: str, user_id: str) -> str:
    algorithm = "ES256" if generation == "sb_keys_and_signing_key" else "HS256"
    return tokens.user_token(user_id, algorithm=algorithm)


def call(handler: Callable[..., dict[str, Any]], method: str, path: str, token: str,
         body: Any = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}", "idempotency-key": f"gen-{uuid.uuid4()}"}
    response = handler(http_event(method, path, headers=headers, body=body), LambdaContext())
    return response["statusCode"], response_json(response)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_the_credits_api_works_with_either_generation(generation: str, rest_url: str, database: Db) -> None:
    caller, account_id = database.new_user()
    assert caller.user_id
    token = user_token(generation, caller.user_id)
    with cold_start("handlers.deduct", environment(generation, rest_url)) as handler:
        status, balance = call(handler, "GET", "/credits/balance", token)
        assert (status, balance["account_id"], balance["available"]) == (200, account_id, 3)
        status, spent = call(handler, "POST", "/credits/deduct", token, {"amount": 1})
        assert (status, spent["charged"]) == (200, 1)
        status, hold = call(handler, "POST", "/credits/holds", token, {"amount": 2})
        assert status == 200
        status, captured = call(handler, "POST", f"/credits/holds/{hold['hold_id']}/capture", token,
                                {"amount": 1})
        assert (status, captured["charged"], captured["released"]) == (200, 1, 1)
        # The other generation's token is refused where that generation is not configured.
        if generation == "sb_keys_and_signing_key":
            status, _ = call(handler, "GET", "/credits/balance", user_token(GENERATIONS[1], caller.user_id))
            assert status == 401
    assert database.balance(account_id)["available"] == 1


@pytest.mark.parametrize("generation", GENERATIONS)
def test_the_webhook_and_the_reset_work_with_either_generation(generation: str, rest_url: str,
                                                               database: Db) -> None:
    _caller, account_id = database.new_user()
    event = render("checkout.session.completed.payment", EVENT_ID=stripe_id("evt"), CREATED=int(time.time()),
                   ACCOUNT_ID=account_id, CUSTOMER=stripe_id("cus"), SESSION=stripe_id("cs"),
                   PAYMENT_INTENT=stripe_id("pi"), PRICE="price_unused", CREDITS="25", QUANTITY=1,
                   AMOUNT=900, PAYMENT_STATUS="paid")
    body = body_of(event)
    env = environment(generation, rest_url)
    with cold_start("handlers.stripe_webhook", env) as webhook:
        reply = webhook(http_event("POST", "/stripe/webhook", raw_body=body,
                                   headers={"stripe-signature": sign(body),
                                            "content-type": "application/json"}), LambdaContext())
    assert (reply["statusCode"], response_json(reply)["outcome"]) == (200, "applied")
    assert database.balance(account_id)["purchased"] == 25

    # The reset calls the database with the service key: a long-past month, which
    # renews nothing (every account is already past it), so other tests are unaffected.
    with cold_start("handlers.monthly_reset", {**env, "RESET_BATCH_SIZE": "5000"}) as reset:
        summary = reset(scheduled_event(detail={"period_start": "2020-01-01"}),
                        LambdaContext(remaining_ms=600_000))
    assert summary["done"] is True and summary["batches"] >= 1 and summary["granted"] == 0
    assert database.balance(account_id)["purchased"] == 25
