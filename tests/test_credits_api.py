"""The credits API end to end: API Gateway v2 events -> handlers.deduct (Mangum) ->
supabase-py -> the local REST endpoint -> PostgreSQL.

Every rejected call is followed by a look at the database to show nothing changed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devstack import db, rest, serve, tokens
from functions.auth import TokenVerifier, authenticate
from functions.auth import User as AuthUser
from functions.errors import ServiceUnavailable, Unauthorized
from functions.settings import CreditsApiSettings, load_settings
from tests.lambda_events import LambdaContext, cold_start, http_event, response_header, response_json
from tests.support import Db

ORIGIN = "https://app.example.test"


@dataclass
class Reply:
    status: int
    body: Any
    raw: dict[str, Any]

    def header(self, name: str) -> str | None:
        return response_header(self.raw, name)


def credits_env(rest_url: str) -> dict[str, str]:
    return {
        "SUPABASE_URL": rest_url,
        "SUPABASE_ANON_KEY": tokens.anon_key(),
        "SUPABASE_SERVICE_ROLE_KEY": tokens.service_role_key(),
        "SUPABASE_JWT_SECRET": tokens.default_keys().jwt_secret,
        "CORS_ALLOW_ORIGINS": f"{ORIGIN},http://localhost:3000",
        "RPC_TIMEOUT_SECONDS": "5",
    }


@pytest.fixture(scope="module")
def lambda_handler(rest_url: str) -> Iterator[Callable[..., dict[str, Any]]]:
    with cold_start("handlers.deduct", credits_env(rest_url)) as handler:
        yield handler


Invoke = Callable[..., Reply]


def make_invoke(handler: Callable[..., dict[str, Any]]) -> Invoke:
    def invoke(method: str, path: str, *, token: str | None = None, license_key: str | None = None,
               key: str | None = None, body: Any = None, raw_body: str | None = None,
               query: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Reply:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        if license_key is not None:
            hdrs["x-license-key"] = license_key
        if key is not None:
            hdrs["idempotency-key"] = key
        if raw_body is not None:
            hdrs.setdefault("content-type", "application/json")
        event = http_event(method, path, headers=hdrs, query=query, body=body, raw_body=raw_body)
        raw = handler(event, LambdaContext(function_name="credits-test-deduct"))
        try:
            body = response_json(raw)
        except ValueError:  # e.g. a CORS preflight's plain "OK"
            body = raw.get("body")
        return Reply(raw["statusCode"], body, raw)

    return invoke


@pytest.fixture(scope="module")
def invoke(lambda_handler: Callable[..., dict[str, Any]]) -> Invoke:
    return make_invoke(lambda_handler)


@dataclass
class User:
    user_id: str
    account_id: str
    token: str


@pytest.fixture
def new_user(database: Db) -> Callable[[], User]:
    def make() -> User:
        caller, account_id = database.new_user()
        assert caller.user_id
        return User(caller.user_id, account_id, tokens.user_token(caller.user_id))

    return make


def key() -> str:
    return f"test-{uuid.uuid4()}"


def snapshot(database: Db, account_id: str) -> tuple[dict[str, Any], int]:
    """What a rejected call must not change: the balance and the number of ledger rows."""
    return database.balance(account_id), len(database.ledger(account_id))


def assert_error(reply: Reply, status: int, error: str | None = None) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert set(reply.body) == {"error", "message", "detail"}, reply.body
    if error is not None:
        assert reply.body["error"] == error, reply.body


# --- balance --------------------------------------------------------------------------


def test_balance_defaults_to_the_callers_personal_account(invoke: Invoke,
                                                          new_user: Callable[[], User]) -> None:
    user = new_user()
    reply = invoke("GET", "/credits/balance", token=user.token)
    assert reply.status == 200, reply.body
    assert reply.body["account_id"] == user.account_id
    # A new account starts on the free plan with its first month's allowance.
    assert reply.body["subscription"] == 3 and reply.body["purchased"] == 0
    assert reply.body["available"] == reply.body["total"] == 3
    assert reply.header("x-request-id")

    explicit = invoke("GET", "/credits/balance", token=user.token, query={"account_id": user.account_id})
    assert explicit.status == 200 and explicit.body == reply.body


def test_balance_of_someone_elses_account_is_forbidden(invoke: Invoke, new_user: Callable[[], User]) -> None:
    alice, bob = new_user(), new_user()
    reply = invoke("GET", "/credits/balance", token=alice.token, query={"account_id": bob.account_id})
    assert_error(reply, 403, "forbidden")
    assert "subscription" not in json.dumps(reply.body)


def test_balance_of_unknown_or_malformed_account(invoke: Invoke, new_user: Callable[[], User]) -> None:
    user = new_user()
    unknown = invoke("GET", "/credits/balance", token=user.token, query={"account_id": str(uuid.uuid4())})
    assert_error(unknown, 404, "account_not_found")
    malformed = invoke("GET", "/credits/balance", token=user.token, query={"account_id": "not-a-uuid"})
    assert_error(malformed, 422, "invalid_request")
    assert malformed.body["detail"]["errors"][0]["loc"] == ["query", "account_id"]
    assert "not-a-uuid" not in json.dumps(malformed.body)  # inputs are not echoed


# --- credentials ---------------------------------------------------------------------


def _claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    return {"sub": user_id, "role": "authenticated", "aud": "authenticated", **overrides}


def bad_tokens(user_id: str) -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": tokens.user_token(user_id, ttl=-120),
        "wrong_audience": tokens.mint(_claims(user_id, aud="somebody-else")),
        "wrong_issuer": tokens.user_token(user_id, issuer="https://elsewhere.supabase.co/auth/v1"),
        "legacy_hs256_wrong_issuer": tokens.user_token(user_id, algorithm="HS256", issuer="supabase"),
        "no_audience": tokens.mint({"sub": user_id, "role": "authenticated"}),
        "wrong_signature": tokens.mint(_claims(user_id), secret="another-secret-of-at-least-32-characters!"),
        "alg_none": jwt.encode({**_claims(user_id), "exp": now + 600}, None, algorithm="none"),
        "tampered": tokens.user_token(user_id)[:-4] + "AAAA",
        "anon_key": tokens.anon_key(),
        "service_role_key": tokens.service_role_key(),  # a server key is not a user's token
        "garbage": "not.a.jwt",
        "hs512": tokens.mint(_claims(user_id), algorithm="HS512"),
    }


def test_bad_credentials_are_401_and_change_nothing(invoke: Invoke, new_user: Callable[[], User],
                                                     database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    for name, token in bad_tokens(user.user_id).items():
        for method, path, body in (("GET", "/credits/balance", None),
                                   ("POST", "/credits/deduct", {"amount": 1})):
            reply = invoke(method, path, token=token, key=key(), body=body)
            assert reply.status == 401, (name, path, reply.body)
            assert_error(reply, 401, "unauthorized")
            assert token not in json.dumps(reply.body)
            assert reply.header("www-authenticate") == "Bearer"
    missing = invoke("POST", "/credits/deduct", key=key(), body={"amount": 1})
    assert_error(missing, 401, "unauthorized")
    basic = invoke("GET", "/credits/balance", headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert_error(basic, 401, "unauthorized")
    empty_bearer = invoke("GET", "/credits/balance", headers={"authorization": "Bearer "})
    assert_error(empty_bearer, 401, "unauthorized")
    assert snapshot(database, user.account_id) == before


def test_both_credentials_at_once_are_rejected(invoke: Invoke, new_user: Callable[[], User]) -> None:
    user = new_user()
    reply = invoke("POST", "/credits/deduct", token=user.token, license_key="ck_whatever", key=key(),
                   body={"amount": 1})
    assert_error(reply, 400, "ambiguous_credentials")


# --- deduct ------------------------------------------------------------------------------


def test_deduct_spends_and_a_replay_changes_nothing(invoke: Invoke, new_user: Callable[[], User],
                                                    database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=10)
    idem = key()
    reply = invoke("POST", "/credits/deduct", token=user.token, key=idem,
                   body={"amount": 5, "metadata": {"job": "render"}})
    assert reply.status == 200, reply.body
    assert reply.body["charged"] == 5 and reply.body["replayed"] is False
    # Subscription credits go first, then purchased.
    assert (reply.body["from_subscription"], reply.body["from_purchased"]) == (3, 2)
    assert reply.body["balance"]["subscription"] == 0 and reply.body["balance"]["purchased"] == 8
    after = snapshot(database, user.account_id)
    assert after[0]["available"] == 8

    again = invoke("POST", "/credits/deduct", token=user.token, key=idem,
                   body={"amount": 5, "metadata": {"job": "render"}})
    assert again.status == 200 and again.body["replayed"] is True
    assert again.body["transaction_id"] == reply.body["transaction_id"]
    assert snapshot(database, user.account_id) == after

    conflict = invoke("POST", "/credits/deduct", token=user.token, key=idem, body={"amount": 4})
    assert_error(conflict, 409, "idempotency_conflict")
    assert snapshot(database, user.account_id) == after


def test_deduct_needs_an_idempotency_key(invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    for bad in (None, "", "   ", "k" * 256):
        headers = {} if bad is None else {"idempotency-key": bad}
        reply = invoke("POST", "/credits/deduct", token=user.token, body={"amount": 1}, headers=headers)
        assert_error(reply, 400, "invalid_argument")
        assert reply.body["detail"] == {"argument": "Idempotency-Key"}
    assert snapshot(database, user.account_id) == before
    ok = invoke("POST", "/credits/deduct", token=user.token, key="k" * 255, body={"amount": 1})
    assert ok.status == 200, ok.body


def test_deduct_more_than_available_is_402(invoke: Invoke, new_user: Callable[[], User],
                                           database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    reply = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 4})
    assert_error(reply, 402, "insufficient_credits")
    assert reply.body["detail"] == {"required": 4, "available": 3}
    assert snapshot(database, user.account_id) == before


@pytest.mark.parametrize("body", [
    {"amount": 1, "operation": "chat"},          # both
    {},                                          # neither
    {"metadata": {"a": 1}},                      # neither
    {"amount": 0},
    {"amount": -3},
    {"amount": 1_000_000_001},
    {"amount": "2"},                             # strings are not numbers here
    {"amount": 1.5},
    {"amount": True},
    {"amount": 1, "surprise": 1},                # unknown field
    {"amount": 1, "metadata": "text"},
    {"amount": 1, "metadata": {"blob": "x" * 17000}},  # over limits.METADATA_BYTES
    {"operation": ""},
    {"operation": "chat", "input_tokens": -1},
    {"amount": 1, "account_id": "not-a-uuid"},
    [1, 2],
    "amount",
])
def test_deduct_rejects_bad_bodies_with_422(invoke: Invoke, new_user: Callable[[], User], database: Db,
                                            body: Any) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    reply = invoke("POST", "/credits/deduct", token=user.token, key=key(), body=body)
    assert_error(reply, 422, "invalid_request")
    assert reply.body["detail"]["errors"], reply.body
    assert snapshot(database, user.account_id) == before


def test_deduct_rejects_malformed_json_and_empty_bodies(invoke: Invoke, new_user: Callable[[], User],
                                                        database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    broken = invoke("POST", "/credits/deduct", token=user.token, key=key(), raw_body='{"amount": 1')
    assert_error(broken, 400, "invalid_json")
    empty = invoke("POST", "/credits/deduct", token=user.token, key=key(), raw_body="")
    assert_error(empty, 422, "invalid_request")  # a body is required
    assert snapshot(database, user.account_id) == before


def test_deduct_by_operation_uses_the_price_table(invoke: Invoke, new_user: Callable[[], User],
                                                  database: Db) -> None:
    operation = f"summarize-{uuid.uuid4().hex[:8]}"
    database.sql("insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens,"
                 " credits_per_1k_output_tokens) values (%s, 1, 0.5, 2)", operation)
    user = new_user()
    database.fund(user.account_id, purchased=20)
    reply = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={
        "operation": operation, "model": "m-1", "input_tokens": 1500, "output_tokens": 2100})
    assert reply.status == 200, reply.body
    # 1 + 1.5 * 0.5 + 2.1 * 2 = 5.95, rounded up.
    assert reply.body["charged"] == 6
    assert database.balance(user.account_id)["available"] == 23 - 6

    unknown = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"operation": "no-such-op"})
    assert_error(unknown, 404, "unknown_operation")
    assert database.balance(user.account_id)["available"] == 17


def test_deduct_from_someone_elses_account_is_forbidden(invoke: Invoke, new_user: Callable[[], User],
                                                       database: Db) -> None:
    alice, bob = new_user(), new_user()
    before = snapshot(database, bob.account_id)
    reply = invoke("POST", "/credits/deduct", token=alice.token, key=key(),
                   body={"amount": 1, "account_id": bob.account_id})
    assert_error(reply, 403, "forbidden")
    assert snapshot(database, bob.account_id) == before


def test_tenant_owner_spends_from_the_tenant_member_cannot(invoke: Invoke, new_user: Callable[[], User],
                                                          database: Db) -> None:
    owner, member = new_user(), new_user()
    _, tenant_account = database.new_tenant({owner.user_id: "owner", member.user_id: "member"})
    database.fund(tenant_account, purchased=5)
    before = snapshot(database, tenant_account)
    denied = invoke("POST", "/credits/deduct", token=member.token, key=key(),
                    body={"amount": 1, "account_id": tenant_account})
    assert_error(denied, 403, "forbidden")
    assert snapshot(database, tenant_account) == before
    # Members may read the tenant's balance, though.
    seen = invoke("GET", "/credits/balance", token=member.token, query={"account_id": tenant_account})
    assert seen.status == 200 and seen.body["account_id"] == tenant_account
    spent = invoke("POST", "/credits/deduct", token=owner.token, key=key(),
                   body={"amount": 2, "account_id": tenant_account})
    assert spent.status == 200, spent.body
    assert database.balance(tenant_account)["available"] == before[0]["available"] - 2
    # The owner's personal account was not touched.
    assert database.balance(owner.account_id)["available"] == 3


# --- license keys ----------------------------------------------------------------------------


def test_license_key_deducts_from_its_account(invoke: Invoke, new_user: Callable[[], User],
                                              database: Db) -> None:
    user = new_user()
    created = database.call("create_license_key", p_account_id=user.account_id, p_name="build server")
    license_key = created["key"]
    idem = key()
    reply = invoke("POST", "/credits/deduct", license_key=license_key, key=idem, body={"amount": 2})
    assert reply.status == 200, reply.body
    assert reply.body["account_id"] == user.account_id and reply.body["charged"] == 2
    assert database.balance(user.account_id)["available"] == 1
    replay = invoke("POST", "/credits/deduct", license_key=license_key, key=idem, body={"amount": 2})
    assert replay.status == 200 and replay.body["replayed"] is True
    assert database.balance(user.account_id)["available"] == 1

    # A license key only spends, from its own account.
    with_account = invoke("POST", "/credits/deduct", license_key=license_key, key=key(),
                          body={"amount": 1, "account_id": user.account_id})
    assert_error(with_account, 400, "invalid_argument")
    for method, path in (("GET", "/credits/balance"), ("GET", "/credits/transactions")):
        assert_error(invoke(method, path, license_key=license_key), 403, "forbidden")
    hold = invoke("POST", "/credits/holds", license_key=license_key, key=key(), body={"amount": 1})
    assert_error(hold, 403, "forbidden")
    assert database.balance(user.account_id)["available"] == 1


def test_bad_license_keys_are_rejected_in_order(invoke: Invoke, new_user: Callable[[], User],
                                                database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    unknown = invoke("POST", "/credits/deduct", license_key="ck_" + "0" * 64, key=key(), body={"amount": 1})
    assert_error(unknown, 403, "invalid_license_key")
    short = invoke("POST", "/credits/deduct", license_key="short", key=key(), body={"amount": 1})
    assert_error(short, 403, "invalid_license_key")
    empty = invoke("POST", "/credits/deduct", headers={"x-license-key": " "}, key=key(), body={"amount": 1})
    assert_error(empty, 401, "unauthorized")

    revoked = database.call("create_license_key", p_account_id=user.account_id, p_name="old")
    database.call("revoke_license_key", p_key_id=revoked["key_id"])
    reply = invoke("POST", "/credits/deduct", license_key=revoked["key"], key=key(), body={"amount": 1})
    assert_error(reply, 403, "license_key_inactive")

    expiring = database.call("create_license_key", p_account_id=user.account_id, p_name="soon",
                             p_expires_at="2999-01-01T00:00:00Z")
    database.sql("update public.credit_license_keys set expires_at = now() - interval '1 minute'"
                 " where id = %s", expiring["key_id"])
    reply = invoke("POST", "/credits/deduct", license_key=expiring["key"], key=key(), body={"amount": 1})
    assert_error(reply, 403, "license_key_expired")
    assert snapshot(database, user.account_id) == before
    for r in (unknown, reply):
        assert "ck_" not in json.dumps(r.body)


# --- holds ------------------------------------------------------------------------------------


def test_hold_reserve_capture_and_replays(invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()
    idem = key()
    reserved = invoke("POST", "/credits/holds", token=user.token, key=idem,
                      body={"amount": 2, "ttl_seconds": 600, "metadata": {"job": 1}})
    assert reserved.status == 200, reserved.body
    hold_id = reserved.body["hold_id"]
    assert reserved.body["amount"] == 2 and reserved.body["balance"]["held"] == 2
    assert database.balance(user.account_id)["available"] == 1
    # Held credits cannot be spent twice.
    spend = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 2})
    assert_error(spend, 402, "insufficient_credits")
    again = invoke("POST", "/credits/holds", token=user.token, key=idem,
                   body={"amount": 2, "ttl_seconds": 600, "metadata": {"job": 1}})
    assert again.status == 200 and again.body["replayed"] is True and again.body["hold_id"] == hold_id
    assert database.balance(user.account_id)["held"] == 2

    captured = invoke("POST", f"/credits/holds/{hold_id}/capture", token=user.token, body={"amount": 1})
    assert captured.status == 200, captured.body
    assert (captured.body["charged"], captured.body["released"]) == (1, 1)
    after = snapshot(database, user.account_id)
    assert after[0]["held"] == 0 and after[0]["available"] == 2
    replay = invoke("POST", f"/credits/holds/{hold_id}/capture", token=user.token, body={"amount": 1})
    assert replay.status == 200 and replay.body["replayed"] is True
    released = invoke("POST", f"/credits/holds/{hold_id}/release", token=user.token)
    assert_error(released, 409, "hold_not_active")
    assert snapshot(database, user.account_id) == after


def test_hold_release_capture_without_body_and_errors(invoke: Invoke, new_user: Callable[[], User],
                                                      database: Db) -> None:
    user, other = new_user(), new_user()
    first = invoke("POST", "/credits/holds", token=user.token, key=key(), body={"amount": 1})
    second = invoke("POST", "/credits/holds", token=user.token, key=key(), body={"amount": 1})
    assert first.status == second.status == 200
    released = invoke("POST", f"/credits/holds/{first.body['hold_id']}/release", token=user.token)
    assert released.status == 200 and released.body["released"] == 1
    assert invoke("POST", f"/credits/holds/{first.body['hold_id']}/release",
                  token=user.token).body["replayed"] is True
    # No body at all: capture everything held.
    captured = invoke("POST", f"/credits/holds/{second.body['hold_id']}/capture", token=user.token)
    assert captured.status == 200 and captured.body["charged"] == 1
    state = snapshot(database, user.account_id)
    assert state[0]["available"] == 2 and state[0]["held"] == 0

    third = invoke("POST", "/credits/holds", token=user.token, key=key(), body={"amount": 1})
    state = snapshot(database, user.account_id)
    hold_id = third.body["hold_id"]
    assert_error(invoke("POST", f"/credits/holds/{hold_id}/capture", token=other.token), 403, "forbidden")
    assert_error(invoke("POST", f"/credits/holds/{hold_id}/release", token=other.token), 403, "forbidden")
    assert_error(invoke("POST", f"/credits/holds/{uuid.uuid4()}/capture", token=user.token), 404,
                 "hold_not_found")
    assert_error(invoke("POST", "/credits/holds/not-a-uuid/capture", token=user.token), 422,
                 "invalid_request")
    assert_error(invoke("POST", f"/credits/holds/{hold_id}/capture", token=user.token, body={"amount": 0}),
                 422, "invalid_request")
    assert_error(invoke("POST", "/credits/holds", token=user.token, body={"amount": 1}), 400,
                 "invalid_argument")  # no Idempotency-Key
    # The hold's lifetime has the database's bound (functions/limits.py), checked at the edge.
    too_long = invoke("POST", "/credits/holds", token=user.token, key=key(),
                      body={"amount": 1, "ttl_seconds": 10 * 86400})
    assert_error(too_long, 422, "invalid_request")
    assert too_long.body["detail"]["errors"][0]["loc"] == ["body", "ttl_seconds"]
    assert_error(invoke("POST", "/credits/holds", token=user.token, key=key(), body={"amount": 5}), 402,
                 "insufficient_credits")
    assert snapshot(database, user.account_id) == state


# --- transactions ---------------------------------------------------------------------------------


def test_transactions_newest_first_and_paged(invoke: Invoke, new_user: Callable[[], User],
                                             database: Db) -> None:
    user, other = new_user(), new_user()
    database.fund(user.account_id, purchased=10)
    for amount in (1, 2, 3):
        reply = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": amount})
        assert reply.status == 200
    everything = [row["id"] for row in reversed(database.ledger(user.account_id))]

    first = invoke("GET", "/credits/transactions", token=user.token, query={"limit": 2})
    assert first.status == 200, first.body
    assert first.body["account_id"] == user.account_id
    assert [row["id"] for row in first.body["transactions"]] == everything[:2]
    assert first.body["next_before"] == everything[1]
    rest_ids: list[int] = []
    cursor = first.body["next_before"]
    while cursor is not None:
        page = invoke("GET", "/credits/transactions", token=user.token,
                      query={"account_id": user.account_id, "limit": 2, "before": cursor})
        assert page.status == 200
        rest_ids += [row["id"] for row in page.body["transactions"]]
        cursor = page.body["next_before"]
    assert everything[:2] + rest_ids == everything
    assert all(row["account_id"] == user.account_id for row in first.body["transactions"])

    assert_error(invoke("GET", "/credits/transactions", token=other.token,
                        query={"account_id": user.account_id}), 403, "forbidden")
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "x"}, {"before": "abc"}, {"account_id": "nope"}):
        assert_error(invoke("GET", "/credits/transactions", token=user.token, query=bad), 422)


# --- availability ------------------------------------------------------------------------------------


def test_rest_endpoint_unreachable_is_503_with_retry_after(new_user: Callable[[], User],
                                                           database: Db) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    serve_sock = __import__("socket").socket()
    serve_sock.bind(("127.0.0.1", 0))
    port = serve_sock.getsockname()[1]
    serve_sock.close()  # nothing listens there now
    with cold_start("handlers.deduct", credits_env(f"http://127.0.0.1:{port}")) as handler:
        call = make_invoke(handler)
        for method, path, body in (("GET", "/credits/balance", None),
                                   ("POST", "/credits/deduct", {"amount": 1}),
                                   ("GET", "/credits/transactions", None)):
            reply = call(method, path, token=user.token, key=key(), body=body)
            assert_error(reply, 503, "service_unavailable")
            assert reply.header("retry-after") and int(reply.header("retry-after") or 0) > 0
    assert snapshot(database, user.account_id) == before


def test_database_down_is_503_then_works_again(pg_server: str) -> None:
    """A REST endpoint whose database refuses connections answers 503; ours passes that on,
    and a retry with the same key once it is back charges once. Uses a database of its own."""
    dbname = f"credits_down_{os.getpid()}"
    dsn = db.create_database(pg_server, dbname)
    db.prepare_database(dsn)
    own = Db(dsn)
    try:
        caller, account_id = own.new_user()
        before = snapshot(own, account_id)
        with serve.serve_in_thread(rest.create_app(dsn, pool_timeout=1.0)) as url, \
                cold_start("handlers.deduct", credits_env(url)) as handler:
            token = tokens.user_token(caller.user_id or "", issuer=tokens.issuer_for(url))
            call = make_invoke(handler)
            assert call("GET", "/credits/balance", token=token).status == 200
            idem = key()
            with psycopg.connect(pg_server, autocommit=True) as admin:
                admin.execute(f'alter database "{dbname}" with allow_connections false')
                try:
                    admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                                  (dbname,))
                    for method, path, body in (("POST", "/credits/deduct", {"amount": 1}),
                                               ("GET", "/credits/balance", None)):
                        reply = call(method, path, token=token, key=idem, body=body)
                        assert_error(reply, 503, "service_unavailable")
                        assert reply.header("retry-after")
                finally:
                    admin.execute(f'alter database "{dbname}" with allow_connections true')
            own.close()  # its connection was terminated too
            assert snapshot(own, account_id) == before
            retried = None
            for _ in range(50):
                retried = call("POST", "/credits/deduct", token=token, key=idem, body={"amount": 1})
                if retried.status != 503:
                    break
                time.sleep(0.1)
            assert retried is not None and retried.status == 200, retried
            assert call("POST", "/credits/deduct", token=token, key=idem, body={"amount": 1}).body["replayed"]
            assert own.balance(account_id)["available"] == before[0]["available"] - 1
    finally:
        own.close()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{dbname}" with (force)')


# --- HTTP surface -------------------------------------------------------------------------------------


def test_cors_preflight_and_headers(invoke: Invoke, new_user: Callable[[], User]) -> None:
    preflight = invoke("OPTIONS", "/credits/deduct", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,idempotency-key"})
    assert preflight.status == 200
    assert preflight.header("access-control-allow-origin") == ORIGIN
    assert "idempotency-key" in (preflight.header("access-control-allow-headers") or "").lower()
    stranger = invoke("OPTIONS", "/credits/deduct", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert stranger.header("access-control-allow-origin") is None
    # Error responses carry CORS headers too, so a browser can read them.
    user = new_user()
    denied = invoke("GET", "/credits/balance", headers={"origin": ORIGIN})
    assert denied.status == 401 and denied.header("access-control-allow-origin") == ORIGIN
    ok = invoke("GET", "/credits/balance", token=user.token, headers={"origin": ORIGIN})
    assert ok.status == 200 and ok.header("access-control-allow-origin") == ORIGIN


def test_openapi_is_served_and_unknown_routes_are_404(invoke: Invoke) -> None:
    spec = invoke("GET", "/credits/openapi.json")
    assert spec.status == 200
    paths = spec.body["paths"]
    assert {"/credits/balance", "/credits/transactions", "/credits/deduct", "/credits/holds",
            "/credits/holds/{hold_id}/capture", "/credits/holds/{hold_id}/release"} <= set(paths)
    assert "Idempotency-Key" in json.dumps(paths["/credits/deduct"])
    assert_error(invoke("GET", "/credits/nothing-here"), 404, "not_found")
    assert_error(invoke("DELETE", "/credits/balance"), 405, "method_not_allowed")


def test_no_token_key_or_sql_in_logs_or_bodies(invoke: Invoke, new_user: Callable[[], User],
                                               capfd: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    user = new_user()
    created_key = "ck_" + uuid.uuid4().hex * 2
    replies = [
        invoke("GET", "/credits/balance", token=user.token),
        invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 99}),
        invoke("POST", "/credits/deduct", license_key=created_key, key=key(), body={"amount": 1}),
        invoke("GET", "/credits/balance", token=user.token, query={"account_id": str(uuid.uuid4())}),
        invoke("GET", "/credits/balance", token=tokens.user_token(user.user_id, ttl=-100)),
    ]
    output = capfd.readouterr()
    records = " ".join(json.dumps(record.__dict__, default=str) for record in caplog.records)
    text = output.out + output.err + records + json.dumps([r.body for r in replies])
    for secret in (user.token, created_key, tokens.service_role_key(), tokens.anon_key(),
                   tokens.default_keys().jwt_secret):
        assert secret not in text
    lowered = text.lower()
    for leak in ("traceback", "select ", "insert into", "private.", "psycopg"):
        assert leak not in lowered, leak
    assert '"status":402' in text.replace(" ", "")  # the log lines are there, just clean


def test_concurrent_users_never_see_each_others_accounts(rest_url: str,
                                                          new_user: Callable[[], User]) -> None:
    """Locally uvicorn serves overlapping requests from one app (one set of clients):
    each request must run as its own user."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from functions.credits_app import create_app
    from functions.settings import CreditsApiSettings, load_settings

    settings = load_settings(CreditsApiSettings, credits_env(rest_url))
    users = [new_user() for _ in range(6)]
    with serve.serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        def balance_of(i: int) -> tuple[int, str]:
            reply = client.get("/credits/balance", headers={"authorization": f"Bearer {users[i].token}"})
            assert reply.status_code == 200, reply.text
            return i, reply.json()["account_id"]

        with ThreadPoolExecutor(max_workers=6) as pool:
            seen = list(pool.map(balance_of, [i % len(users) for i in range(36)]))
    assert all(account == users[i].account_id for i, account in seen)


def test_a_spend_from_ones_own_account_is_one_database_call(rest_url: str, new_user: Callable[[], User],
                                                          database: Db) -> None:
    """Without account_id the database resolves the personal account in the same call."""
    import httpx

    from functions.credits_app import create_app
    from functions.rpc import Rpc

    calls: list[str] = []

    class CountingRpc(Rpc):  # the real client; it only notes which functions are called
        def user(self, token: str, fn: str, params: Any = None) -> Any:
            calls.append(fn)
            return super().user(token, fn, params)

    settings = load_settings(CreditsApiSettings, credits_env(rest_url))
    user = new_user()
    rpc = CountingRpc(settings)
    try:
        with serve.serve_in_thread(create_app(settings, rpc=rpc)) as url:
            headers = {"authorization": f"Bearer {user.token}", "idempotency-key": key()}
            spent = httpx.post(f"{url}/credits/deduct", json={"amount": 1}, headers=headers)
            assert spent.status_code == 200 and spent.json()["account_id"] == user.account_id
            assert calls == ["deduct_credits"]
            held = httpx.post(f"{url}/credits/holds", json={"amount": 1},
                              headers={**headers, "idempotency-key": key()})
            assert held.status_code == 200 and held.json()["account_id"] == user.account_id
            assert calls == ["deduct_credits", "reserve_credits"]
    finally:
        rpc.close()
    assert database.balance(user.account_id)["available"] == 1


def test_user_clients_never_share_credentials(rest_url: str) -> None:
    """The deterministic half of the test above: a per-request client carries its own token,
    and deriving one never changes the shared clients' headers."""
    from functions.rpc import Rpc
    from functions.settings import CreditsApiSettings, load_settings

    settings = load_settings(CreditsApiSettings, credits_env(rest_url))
    rpc = Rpc(settings)
    try:
        first, second = rpc.user_client("token-a"), rpc.user_client("token-b")
        assert first.headers["Authorization"] == "Bearer token-a"
        assert second.headers["Authorization"] == "Bearer token-b"
        assert rpc.user_client("token-c").headers["Authorization"] == "Bearer token-c"
        assert first.headers["Authorization"] == "Bearer token-a"
        assert rpc._public is not None
        assert rpc._public.headers["Authorization"] == f"Bearer {settings.public_key}"
    finally:
        rpc.close()


# --- token verification with asymmetric keys (JWKS) ---------------------------------------------


@dataclass
class JwksServer:
    url: str  # what SUPABASE_URL would be: the JWKS is at the default path under it
    keys: list[dict[str, Any]]
    fetches: list[float]


@contextmanager
def jwks_server(keys: list[dict[str, Any]]) -> Iterator[JwksServer]:
    """Serves ``{"keys": keys}`` at Supabase's path; the list may change (a rotation)."""
    fetches: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(time.time())
            ok = self.path == "/auth/v1/.well-known/jwks.json"
            body = json.dumps({"keys": keys}).encode() if ok else b"{}"
            self.send_response(200 if ok else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield JwksServer(f"http://127.0.0.1:{server.server_address[1]}", keys, fetches)
    finally:
        server.shutdown()
        server.server_close()


def _jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
    jwk = json.loads(algorithm.to_jwk(public_key))
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return jwk


def _api_settings(supabase_url: str, **extra: str) -> CreditsApiSettings:
    env = {"SUPABASE_URL": supabase_url, "SUPABASE_PUBLISHABLE_KEY": "sb_publishable_x",
           "SUPABASE_SECRET_KEY": "sb_secret_x", "CORS_ALLOW_ORIGINS": ORIGIN, **extra}
    return load_settings(CreditsApiSettings, env)


def test_asymmetric_tokens_verified_with_the_projects_jwks() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    es_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = es_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    with jwks_server([_jwk(es_key.public_key(), "key-1", "ES256")]) as project:
        settings = _api_settings(project.url)  # JWKS at the default path under SUPABASE_URL
        verifier = TokenVerifier(settings, refresh_cooldown=1.0)
        claims = {**_claims("user-1"), "iss": f"{project.url}/auth/v1", "exp": int(time.time()) + 600}

        def check(token: str) -> str:
            try:
                who = authenticate({"Authorization": f"Bearer {token}"}, verifier)
                return who.user_id if isinstance(who, AuthUser) else "?"
            except Unauthorized:
                return "401"

        def es256(body: dict[str, Any], kid: str = "key-1", key: Any = es_key) -> str:
            return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})

        good = es256(claims)
        assert check(good) == "user-1"
        assert check(es256(claims, key=ec.generate_private_key(ec.SECP256R1()))) == "401"
        assert check(es256(claims, kid="nope")) == "401"
        assert check(es256({**claims, "aud": "x"})) == "401"
        assert check(es256({**claims, "iss": "https://other.supabase.co/auth/v1"})) == "401"
        assert check(es256({k: v for k, v in claims.items() if k != "iss"})) == "401"
        assert check(es256({**claims, "exp": int(time.time()) - 60})) == "401"
        # Algorithm confusion: an HMAC token "signed" with the public key must not pass.
        assert check(_hmac_token(claims, public_pem)) == "401"
        assert check(jwt.encode(claims, None, algorithm="none")) == "401"
        # Without the legacy secret configured, HS256 tokens are refused whatever they say.
        assert check(tokens.mint(claims, secret="a-secret-the-project-never-configured-000")) == "401"

        # The keys are cached: many calls, one fetch; made-up kids within the
        # cooldown fetch nothing more.
        assert len(project.fetches) == 1
        for kid in ("made-up-1", "made-up-2", "made-up-3"):
            assert check(good) == "user-1" and check(es256(claims, kid=kid)) == "401"
        assert len(project.fetches) == 1
        fetched = len(project.fetches)

        # Rotation: a token with a new kid makes the verifier fetch the keys again once.
        time.sleep(1.1)  # past the cooldown
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        project.keys.append(_jwk(rsa_key.public_key(), "key-2", "RS256"))
        rotated = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "key-2"})
        assert check(rotated) == "user-1"
        assert len(project.fetches) == fetched + 1
        assert check(rotated) == "user-1" and len(project.fetches) == fetched + 1

    # With the legacy secret configured as well, HS256 tokens of that secret pass too.
    legacy_secret = "legacy-project-secret-of-at-least-32-chars"
    with jwks_server([]) as project:
        legacy = TokenVerifier(_api_settings(project.url, SUPABASE_JWT_SECRET=legacy_secret))
        body = {**_claims("user-2"), "iss": f"{project.url}/auth/v1", "exp": int(time.time()) + 600}
        assert authenticate({"Authorization": f"Bearer {tokens.mint(body, secret=legacy_secret)}"},
                            legacy).user_id == "user-2"  # type: ignore[union-attr]
        with pytest.raises(Unauthorized):
            authenticate({"Authorization": f"Bearer {tokens.mint(body, secret='x' * 40)}"}, legacy)

    # JWKS unreachable: our dependency is down, not the caller's token: 503.
    unreachable = TokenVerifier(_api_settings("http://127.0.0.1:9"))
    with pytest.raises(ServiceUnavailable):
        authenticate({"Authorization": f"Bearer {good}"}, unreachable)


class Clock:
    """A monotonic clock the test moves forward (no sleeping); whole seconds, so sums are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_removed_from_the_jwks_stops_being_trusted_within_ten_minutes() -> None:
    from functions.auth import KEYS_LIFESPAN_SECONDS

    old_key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with jwks_server([_jwk(old_key.public_key(), "old", "ES256")]) as project:
        clock = Clock()
        verifier = TokenVerifier(_api_settings(project.url), clock=clock)
        claims = {**_claims("user-1"), "iss": f"{project.url}/auth/v1", "exp": int(time.time()) + 3600}
        old_token = jwt.encode(claims, old_key, algorithm="ES256", headers={"kid": "old"})
        new_token = jwt.encode(claims, new_key, algorithm="ES256", headers={"kid": "new"})

        def check(token: str) -> str:
            try:
                return authenticate({"Authorization": f"Bearer {token}"}, verifier).user_id  # type: ignore[union-attr]
            except Unauthorized:
                return "401"

        assert check(old_token) == "user-1" and len(project.fetches) == 1
        # The project rotates: the new key is published, the old one withdrawn (say, leaked).
        project.keys[:] = [_jwk(new_key.public_key(), "new", "ES256")]
        clock.now += 31  # past the cooldown: a token with the new kid fetches at once
        assert check(new_token) == "user-1" and len(project.fetches) == 2
        # The old key is gone from the fetched set: refused at once...
        assert check(old_token) == "401"
        # ...and with a JWKS fetched before the rotation, within the lifespan at most.
        with jwks_server([_jwk(old_key.public_key(), "old", "ES256")]) as other:
            clock2 = Clock()
            cached = TokenVerifier(_api_settings(other.url), clock=clock2)
            claims2 = {**claims, "iss": f"{other.url}/auth/v1"}
            token2 = jwt.encode(claims2, old_key, algorithm="ES256", headers={"kid": "old"})
            assert authenticate({"Authorization": f"Bearer {token2}"}, cached).user_id == "user-1"  # type: ignore[union-attr]
            other.keys.clear()
            clock2.now += KEYS_LIFESPAN_SECONDS - 1
            assert authenticate({"Authorization": f"Bearer {token2}"}, cached).user_id == "user-1"  # type: ignore[union-attr]
            assert len(other.fetches) == 1
            clock2.now += 1
            with pytest.raises(Unauthorized):
                authenticate({"Authorization": f"Bearer {token2}"}, cached)
            assert len(other.fetches) == 2
            assert KEYS_LIFESPAN_SECONDS == 600


def _hmac_token(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT built by hand (PyJWT itself refuses PEM keys as HMAC secrets)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "key-1"}).encode()) + "." + \
        b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)
