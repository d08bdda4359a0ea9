"""The credits API's v3 surface end to end (API Gateway v2 events -> handlers.deduct (Mangum)
-> supabase-py -> the local REST endpoint -> PostgreSQL): holds priced from tokens, the
overage policy (and overdraft refused to every caller of the API), extending a hold, cost
estimates, spend limits as 402, and license keys kept to POST /credits/deduct.

Every rejected call is followed by a look at the database to show nothing changed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devstack import serve, tokens
from tests.lambda_events import cold_start
from tests.support import Caller, Db, snapshot
from tests.test_credits_api import Invoke, User, assert_error, credits_env, key, make_invoke

HOLD_KEYS = {"hold_id", "account_id", "amount", "expires_at", "overage", "replayed", "balance"}
CAPTURE_KEYS = {"transaction_id", "hold_id", "requested", "charged", "released", "uncovered", "debt_added",
                "from_promotional", "from_subscription", "from_purchased", "replayed", "balance"}
EXTEND_KEYS = {"hold_id", "amount", "expires_at", "replayed", "balance"}
ESTIMATE_KEYS = {"cost", "available", "affordable", "max_output_tokens", "limit_remaining"}
EXCEEDED_KEYS = {"limit", "spent", "held", "required", "period", "resets_at"}

# Operations priced for this module: (flat credits, per 1k input tokens, per 1k output tokens).
LLM = "api3-llm"        # 1 + 1 per 1,000 input + 2 per 1,000 output tokens
ZERO = "api3-zero"      # costs nothing and is not marked free: a deduct (and an estimate) refuses it
PRICES = {LLM: (1, 1, 2), ZERO: (0, 0, 0)}


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    for operation, (credits, rate_in, rate_out) in PRICES.items():
        database.sql(
            "insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, "
            "credits_per_1k_output_tokens) values (%s, %s, %s, %s) on conflict (operation) do nothing",
            operation, credits, rate_in, rate_out)


@pytest.fixture(scope="module")
def invoke(rest_url: str) -> Iterator[Invoke]:
    with cold_start("handlers.deduct", credits_env(rest_url)) as handler:
        yield make_invoke(handler)


@pytest.fixture
def new_user(database: Db) -> Callable[[], User]:
    def make() -> User:
        caller, account_id = database.new_user()
        assert caller.user_id
        return User(caller.user_id, account_id, tokens.user_token(caller.user_id))

    return make


def as_caller(user: User) -> Caller:
    return Caller.user(user.user_id)


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def reserve(invoke: Invoke, user: User, idem: str | None = None, **body: Any) -> dict[str, Any]:
    reply = invoke("POST", "/credits/holds", token=user.token, key=idem or key(), body=body)
    assert reply.status == 200, reply.body
    assert set(reply.body) == HOLD_KEYS, reply.body
    result: dict[str, Any] = reply.body
    return result


def usage_row(database: Db, transaction_id: str) -> dict[str, Any]:
    rows = database.sql("select to_jsonb(u) from public.credit_usage u where transaction_id = %s",
                        transaction_id)
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0][0]
    return row


# --- priced holds and the overage policy ---------------------------------------------------


def test_a_priced_reserve_and_a_capture_with_the_actual_tokens(invoke: Invoke, new_user: Callable[[], User],
                                                               database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=20)  # 23 available
    idem = key()
    body = {"operation": LLM, "model": "model-estimated", "input_tokens": 1000, "output_tokens": 2000,
            "ttl_seconds": 600}
    hold = reserve(invoke, user, idem, **body)
    # The price is fixed now: 1 + 1 + 4 = 6 held; the default policy is reject.
    assert (hold["amount"], hold["overage"], hold["replayed"]) == (6, "reject", False)
    assert (hold["balance"]["held"], hold["balance"]["available"]) == (6, 17)
    again = invoke("POST", "/credits/holds", token=user.token, key=idem, body=body)
    assert again.status == 200 and again.body["replayed"] is True and again.body["hold_id"] == hold["hold_id"]
    conflict = invoke("POST", "/credits/holds", token=user.token, key=idem, body={**body, "output_tokens": 1})
    assert_error(conflict, 409, "idempotency_conflict")

    # Amount and tokens at once are refused at the edge; tokens above the hold follow the policy.
    path = f"/credits/holds/{hold['hold_id']}/capture"
    before = snapshot(database, user.account_id)
    both = invoke("POST", path, token=user.token, body={"amount": 1, "output_tokens": 10})
    assert_error(both, 422, "invalid_request")
    above = invoke("POST", path, token=user.token, body={"input_tokens": 1000, "output_tokens": 5000})
    assert_error(above, 400, "invalid_argument")  # 12 > 6 held, and the policy is reject
    for bad in ({"input_tokens": -1}, {"output_tokens": 1_000_000_001}, {"output_tokens": "5"},
                {"model": ""}, {"model": "m" * 201}):
        assert_error(invoke("POST", path, token=user.token, body=bad), 422, "invalid_request")
    assert snapshot(database, user.account_id) == before  # the hold is still active

    captured = invoke("POST", path, token=user.token,
                      body={"input_tokens": 1000, "output_tokens": 500, "model": "model-used"})
    assert captured.status == 200, captured.body
    assert set(captured.body) == CAPTURE_KEYS
    # 1 + 1 + 1 = 3 of the 6 held; the rest goes back.
    assert (captured.body["requested"], captured.body["charged"], captured.body["released"],
            captured.body["uncovered"], captured.body["debt_added"]) == (3, 3, 3, 0, 0)
    assert captured.body["balance"] == database.balance(user.account_id)
    assert (captured.body["balance"]["held"], captured.body["balance"]["available"]) == (0, 20)
    row = usage_row(database, captured.body["transaction_id"])
    assert (row["operation"], row["model"], row["credits"], row["input_tokens"], row["output_tokens"]) == (
        LLM, "model-used", 3, 1000, 500)
    after = snapshot(database, user.account_id)
    replay = invoke("POST", path, token=user.token,
                    body={"input_tokens": 1000, "output_tokens": 500, "model": "model-used"})
    assert replay.status == 200 and replay.body == {**captured.body, "replayed": True}
    assert snapshot(database, user.account_id) == after


def test_a_priced_reserve_that_does_not_fit_says_how_many_output_tokens_would(
        invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()  # 3 available
    before = snapshot(database, user.account_id)
    reply = invoke("POST", "/credits/holds", token=user.token, key=key(),
                   body={"operation": LLM, "input_tokens": 1000, "output_tokens": 100_000})
    assert_error(reply, 402, "insufficient_credits")
    # (3 - 1 - 1) credits buy 500 output tokens at 2 per 1,000.
    assert reply.body["detail"] == {"required": 202, "available": 3, "max_output_tokens": 500}
    assert snapshot(database, user.account_id) == before


def test_tokens_at_capture_need_a_hold_priced_from_an_operation(invoke: Invoke, new_user: Callable[[], User],
                                                                database: Db) -> None:
    user = new_user()
    hold = reserve(invoke, user, amount=2)
    before = snapshot(database, user.account_id)
    reply = invoke("POST", f"/credits/holds/{hold['hold_id']}/capture", token=user.token,
                   body={"output_tokens": 10})
    assert_error(reply, 400, "invalid_argument")
    assert reply.body["detail"]["argument"] == "p_output_tokens"
    assert snapshot(database, user.account_id) == before


def test_overage_if_available_charges_what_is_there_and_reports_the_rest_uncovered(
        invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()  # 3 available
    hold = reserve(invoke, user, amount=2, overage="if_available")
    assert (hold["overage"], hold["balance"]["available"]) == ("if_available", 1)
    captured = invoke("POST", f"/credits/holds/{hold['hold_id']}/capture", token=user.token,
                      body={"amount": 10})
    assert captured.status == 200, captured.body
    # The hold (2) plus what was available (1); the other 7 are written off, no debt.
    assert (captured.body["requested"], captured.body["charged"], captured.body["uncovered"],
            captured.body["released"], captured.body["debt_added"]) == (10, 3, 7, 0, 0)
    balance = database.balance(user.account_id)
    assert captured.body["balance"] == balance
    assert (balance["total"], balance["held"], balance["debt"], balance["available"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("overage", ["sometimes", "", "OVERDRAFT", {"policy": "reject"}, 1])
def test_an_unknown_overage_policy_is_422(invoke: Invoke, new_user: Callable[[], User], database: Db,
                                          overage: Any) -> None:
    user = new_user()
    before = snapshot(database, user.account_id)
    reply = invoke("POST", "/credits/holds", token=user.token, key=key(),
                   body={"amount": 1, "overage": overage})
    assert_error(reply, 422, "invalid_request")
    assert reply.body["detail"]["errors"][0]["loc"] == ["body", "overage"]
    assert snapshot(database, user.account_id) == before


def test_overdraft_through_the_api_is_forbidden_to_every_caller(invoke: Invoke, new_user: Callable[[], User],
                                                                database: Db) -> None:
    owner, admin = new_user(), new_user()
    _, tenant_account = database.new_tenant({owner.user_id: "owner", admin.user_id: "admin"})
    database.fund(tenant_account, purchased=10)
    database.sql("update public.credit_accounts set overdraft_limit = 100 where id = %s", tenant_account)
    license_key = database.call("create_license_key", p_account_id=tenant_account, p_name="srv")["key"]
    before = {account: snapshot(database, account)
              for account in (tenant_account, owner.account_id, admin.account_id)}
    for who in (owner, admin):
        for account_id in (None, tenant_account):
            body = {"amount": 1, "overage": "overdraft", "account_id": account_id}
            reply = invoke("POST", "/credits/holds", token=who.token, key=key(), body=body)
            assert_error(reply, 403, "forbidden")
            assert reply.body["detail"] == {"reason": "only the service makes overdraft holds"}
            # Refused before anything else is looked at: without an Idempotency-Key too.
            assert_error(invoke("POST", "/credits/holds", token=who.token, body=body), 403, "forbidden")
        priced = {"operation": LLM, "output_tokens": 100, "overage": "overdraft"}
        assert_error(invoke("POST", "/credits/holds", token=who.token, key=key(), body=priced), 403,
                     "forbidden")
    by_key = invoke("POST", "/credits/holds", license_key=license_key, key=key(),
                    body={"amount": 1, "overage": "overdraft"})
    assert_error(by_key, 403, "forbidden")
    assert {account: snapshot(database, account) for account in before} == before


def test_an_overdraft_reserve_never_reaches_the_database(rest_url: str, new_user: Callable[[], User],
                                                         database: Db) -> None:
    import httpx

    from functions.credits_app import create_app
    from functions.rpc import Rpc
    from functions.settings import CreditsApiSettings, load_settings

    calls: list[str] = []

    class CountingRpc(Rpc):  # the real client; it only notes which functions are called
        def user(self, token: str, fn: str, params: Any = None) -> Any:
            calls.append(fn)
            return super().user(token, fn, params)

        def service(self, fn: str, params: Any = None) -> Any:
            calls.append(fn)
            return super().service(fn, params)

    settings = load_settings(CreditsApiSettings, credits_env(rest_url))
    user = new_user()
    before = snapshot(database, user.account_id)
    rpc = CountingRpc(settings)
    try:
        with serve.serve_in_thread(create_app(settings, rpc=rpc)) as url:
            headers = {"authorization": f"Bearer {user.token}", "idempotency-key": key()}
            refused = httpx.post(f"{url}/credits/holds", json={"amount": 1, "overage": "overdraft"},
                                 headers=headers)
            assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
            assert calls == []
            held = httpx.post(f"{url}/credits/holds", json={"amount": 1, "overage": "if_available"},
                              headers=headers)
            assert held.status_code == 200 and held.json()["overage"] == "if_available"
            assert calls == ["reserve_credits"]
            estimated = httpx.get(f"{url}/credits/estimate", params={"amount": 1},
                                  headers={"authorization": f"Bearer {user.token}"})
            assert estimated.status_code == 200 and estimated.json()["cost"] == 1
            assert calls == ["reserve_credits", "estimate_cost"]  # one call, the account resolved in SQL
    finally:
        rpc.close()
    assert database.balance(user.account_id)["held"] == before.balance["held"] + 1


# --- extend ----------------------------------------------------------------------------------


def test_extend_adds_credits_and_moves_the_expiry_once_per_key(invoke: Invoke, new_user: Callable[[], User],
                                                               database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=10)  # 13 available
    hold = reserve(invoke, user, amount=2, ttl_seconds=60)
    path = f"/credits/holds/{hold['hold_id']}/extend"

    idem = key()
    grown = invoke("POST", path, token=user.token, key=idem, body={"add_amount": 3})
    assert grown.status == 200, grown.body
    assert set(grown.body) == EXTEND_KEYS
    assert (grown.body["hold_id"], grown.body["amount"], grown.body["replayed"]) == (
        hold["hold_id"], 5, False)
    assert at(grown.body["expires_at"]) == at(hold["expires_at"])  # no ttl: the expiry stays
    assert (grown.body["balance"]["held"], grown.body["balance"]["available"]) == (5, 8)
    assert grown.body["balance"] == database.balance(user.account_id)
    after = snapshot(database, user.account_id)
    replay = invoke("POST", path, token=user.token, key=idem, body={"add_amount": 3})
    assert replay.status == 200 and replay.body == {**grown.body, "replayed": True}
    assert snapshot(database, user.account_id) == after
    conflict = invoke("POST", path, token=user.token, key=idem, body={"add_amount": 4})
    assert_error(conflict, 409, "idempotency_conflict")
    assert snapshot(database, user.account_id) == after

    moved = invoke("POST", path, token=user.token, key=key(), body={"ttl_seconds": 3600})
    assert moved.status == 200, moved.body
    assert moved.body["amount"] == 5 and moved.body["balance"]["held"] == 5
    db_now: dt.datetime = database.one("select now()")
    assert at(moved.body["expires_at"]) > at(hold["expires_at"])
    assert abs((at(moved.body["expires_at"]) - db_now).total_seconds() - 3600) < 60

    both = invoke("POST", path, token=user.token, key=key(), body={"add_amount": 1, "ttl_seconds": 120})
    assert both.status == 200 and both.body["amount"] == 6
    assert at(both.body["expires_at"]) < at(moved.body["expires_at"])  # now + 120 s
    # The capture charges the grown hold.
    captured = invoke("POST", f"/credits/holds/{hold['hold_id']}/capture", token=user.token)
    assert captured.status == 200 and (captured.body["charged"], captured.body["released"]) == (6, 0)
    assert database.balance(user.account_id)["available"] == 7
    ended = snapshot(database, user.account_id)
    assert_error(invoke("POST", path, token=user.token, key=key(), body={"ttl_seconds": 60}), 409,
                 "hold_not_active")
    assert snapshot(database, user.account_id) == ended


def test_extend_beyond_the_available_credits_is_402_and_changes_nothing(
        invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()  # 3 available
    hold = reserve(invoke, user, amount=1, ttl_seconds=600)
    before = snapshot(database, user.account_id)
    reply = invoke("POST", f"/credits/holds/{hold['hold_id']}/extend", token=user.token, key=key(),
                   body={"add_amount": 5, "ttl_seconds": 3600})
    assert_error(reply, 402, "insufficient_credits")
    assert reply.body["detail"] == {"required": 5, "available": 2}
    assert snapshot(database, user.account_id) == before  # all or nothing: the expiry did not move either


def test_extend_checks_its_arguments_caller_and_hold(invoke: Invoke, new_user: Callable[[], User],
                                                     database: Db) -> None:
    user, stranger = new_user(), new_user()
    hold = reserve(invoke, user, amount=1, ttl_seconds=600)
    path = f"/credits/holds/{hold['hold_id']}/extend"
    before = snapshot(database, user.account_id)
    for bad in ({}, {"add_amount": 0}, {"add_amount": -1}, {"add_amount": 1_000_000_001},
                {"add_amount": "2"}, {"ttl_seconds": 0}, {"ttl_seconds": 86_401}, {"ttl_seconds": 1.5},
                {"add_amount": 1, "metadata": {}}, {"add_amount": 1, "surprise": 1}, [1], "x"):
        reply = invoke("POST", path, token=user.token, key=key(), body=bad)
        assert_error(reply, 422, "invalid_request")
    assert_error(invoke("POST", path, token=user.token, key=key()), 422, "invalid_request")  # no body
    for bad_key in (None, "", "k" * 256):
        headers = {} if bad_key is None else {"idempotency-key": bad_key}
        reply = invoke("POST", path, token=user.token, headers=headers, body={"add_amount": 1})
        assert_error(reply, 400, "invalid_argument")
        assert reply.body["detail"] == {"argument": "Idempotency-Key"}
    assert_error(invoke("POST", path, token=stranger.token, key=key(), body={"ttl_seconds": 60}), 403,
                 "forbidden")
    assert_error(invoke("POST", path, key=key(), body={"ttl_seconds": 60}), 401, "unauthorized")
    assert_error(invoke("POST", f"/credits/holds/{uuid.uuid4()}/extend", token=user.token, key=key(),
                        body={"ttl_seconds": 60}), 404, "hold_not_found")
    assert_error(invoke("POST", "/credits/holds/not-a-uuid/extend", token=user.token, key=key(),
                        body={"ttl_seconds": 60}), 422, "invalid_request")
    assert snapshot(database, user.account_id) == before


def test_the_101st_extension_is_409_hold_extension_limit(invoke: Invoke, new_user: Callable[[], User],
                                                         database: Db) -> None:
    user = new_user()
    hold = reserve(invoke, user, amount=1, ttl_seconds=600)
    path = f"/credits/holds/{hold['hold_id']}/extend"
    first_key = key()
    first = invoke("POST", path, token=user.token, key=first_key, body={"ttl_seconds": 600})
    assert first.status == 200, first.body
    # The other 99 directly through the SQL function, as the same user (set-up only).
    for n in range(99):
        database.call("extend_hold", as_caller(user), p_hold_id=hold["hold_id"], p_idempotency_key=key(),
                      p_ttl_seconds=601 + n)
    before = snapshot(database, user.account_id)
    for body in ({"ttl_seconds": 900}, {"add_amount": 1}):
        reply = invoke("POST", path, token=user.token, key=key(), body=body)
        assert_error(reply, 409, "hold_extension_limit")
        assert reply.body["detail"] == {"limit": 100}
    assert snapshot(database, user.account_id) == before
    # A replay still replays, and the hold still captures.
    replay = invoke("POST", path, token=user.token, key=first_key, body={"ttl_seconds": 600})
    assert replay.status == 200 and replay.body == {**first.body, "replayed": True}
    captured = invoke("POST", f"/credits/holds/{hold['hold_id']}/capture", token=user.token)
    assert captured.status == 200 and captured.body["charged"] == 1


# --- estimate --------------------------------------------------------------------------------


def test_estimate_answers_the_cost_and_what_it_covers_and_writes_nothing(
        invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()  # 3 available
    before = snapshot(database, user.account_id)
    priced = invoke("GET", "/credits/estimate", token=user.token,
                    query={"operation": LLM, "input_tokens": 1000, "output_tokens": 1000})
    assert priced.status == 200, priced.body
    assert priced.body == {"cost": 4, "available": 3, "affordable": False, "max_output_tokens": 500,
                           "limit_remaining": None}
    flat = invoke("GET", "/credits/estimate", token=user.token,
                  query={"amount": 2, "account_id": user.account_id})
    assert flat.status == 200
    assert flat.body == {"cost": 2, "available": 3, "affordable": True, "max_output_tokens": None,
                         "limit_remaining": None}
    assert snapshot(database, user.account_id) == before
    # Held credits are not available.
    reserve(invoke, user, amount=2)
    during = snapshot(database, user.account_id)
    held = invoke("GET", "/credits/estimate", token=user.token, query={"operation": LLM})
    assert held.status == 200 and set(held.body) == ESTIMATE_KEYS
    assert (held.body["cost"], held.body["available"], held.body["affordable"],
            held.body["max_output_tokens"]) == (1, 1, True, 0)
    assert snapshot(database, user.account_id) == during


@pytest.mark.parametrize("query", [
    {},                                             # neither amount nor operation
    {"amount": 1, "operation": LLM},                # both
    {"input_tokens": 5},
    {"amount": 0},
    {"amount": -1},
    {"amount": 1_000_000_001},
    {"amount": "two"},
    {"amount": "1.5"},
    {"operation": ""},
    {"operation": "o" * 129},
    {"operation": LLM, "input_tokens": -1},
    {"operation": LLM, "output_tokens": 1_000_000_001},
    {"operation": LLM, "output_tokens": "many"},
    {"amount": 1, "account_id": "not-a-uuid"},
])
def test_estimate_rejects_bad_queries_with_422(invoke: Invoke, new_user: Callable[[], User],
                                               query: dict[str, Any]) -> None:
    user = new_user()
    reply = invoke("GET", "/credits/estimate", token=user.token, query=query)
    assert_error(reply, 422, "invalid_request")
    assert reply.body["detail"]["errors"], reply.body


def test_estimate_passes_on_the_databases_argument_errors(invoke: Invoke,
                                                          new_user: Callable[[], User]) -> None:
    user = new_user()
    unknown = invoke("GET", "/credits/estimate", token=user.token, query={"operation": "api3-no-such-op"})
    assert_error(unknown, 404, "unknown_operation")
    free_of_charge = invoke("GET", "/credits/estimate", token=user.token, query={"operation": ZERO})
    assert_error(free_of_charge, 400, "invalid_argument")  # costs 0 and is not marked free, as a deduct
    assert free_of_charge.body["detail"]["argument"] == "p_operation"
    nobody = invoke("GET", "/credits/estimate", token=user.token,
                    query={"amount": 1, "account_id": str(uuid.uuid4())})
    assert_error(nobody, 404, "account_not_found")


def test_estimate_is_forbidden_to_a_stranger(invoke: Invoke, new_user: Callable[[], User],
                                             database: Db) -> None:
    owner, member, stranger = new_user(), new_user(), new_user()
    _, tenant_account = database.new_tenant({owner.user_id: "owner", member.user_id: "member"})
    for who, account_id in ((stranger, owner.account_id), (stranger, tenant_account),
                            (member, tenant_account)):  # a plain member without a limit may not spend
        for query in ({"amount": 1}, {"operation": LLM, "output_tokens": 10},
                      {"operation": "api3-no-such-op"}):  # authorization comes before the arguments
            reply = invoke("GET", "/credits/estimate", token=who.token,
                           query={**query, "account_id": account_id})
            assert_error(reply, 403, "forbidden")
            assert "available" not in reply.body["detail"]
    assert_error(invoke("GET", "/credits/estimate", query={"amount": 1}), 401, "unauthorized")
    mine = invoke("GET", "/credits/estimate", token=owner.token,
                  query={"amount": 1, "account_id": tenant_account})
    assert mine.status == 200 and mine.body["available"] == database.balance(tenant_account)["available"]


# --- spend limits ----------------------------------------------------------------------------


def test_spend_limit_exceeded_is_402_with_its_figures(invoke: Invoke, new_user: Callable[[], User],
                                                      database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=20)  # 23 available
    limit = database.call("set_spend_limit", p_account_id=user.account_id, p_subject="member", p_limit=4,
                          p_period="day", p_subject_id=user.user_id)
    assert (limit["limit"], limit["period"]) == (4, "day")
    hold = reserve(invoke, user, amount=2)
    spent = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 2})
    assert spent.status == 200, spent.body
    before = snapshot(database, user.account_id)

    deduct = invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 1})
    assert_error(deduct, 402, "spend_limit_exceeded")
    detail = deduct.body["detail"]
    assert set(detail) == EXCEEDED_KEYS
    assert (detail["limit"], detail["spent"], detail["held"], detail["required"], detail["period"]) == (
        4, 2, 2, 1, "day")
    assert at(detail["resets_at"]) == at(limit["resets_at"])
    reserved = invoke("POST", "/credits/holds", token=user.token, key=key(), body={"operation": LLM})
    assert_error(reserved, 402, "spend_limit_exceeded")
    assert reserved.body["detail"]["required"] == 1
    extended = invoke("POST", f"/credits/holds/{hold['hold_id']}/extend", token=user.token, key=key(),
                      body={"add_amount": 1, "ttl_seconds": 600})
    assert_error(extended, 402, "spend_limit_exceeded")
    assert (extended.body["detail"]["spent"], extended.body["detail"]["held"]) == (2, 2)
    assert snapshot(database, user.account_id) == before

    # The estimate says so without writing; a release gives the room back.
    estimate = invoke("GET", "/credits/estimate", token=user.token, query={"amount": 1})
    assert estimate.status == 200
    assert (estimate.body["available"], estimate.body["affordable"], estimate.body["limit_remaining"]) == (
        19, False, 0)
    released = invoke("POST", f"/credits/holds/{hold['hold_id']}/release", token=user.token)
    assert released.status == 200
    estimate = invoke("GET", "/credits/estimate", token=user.token,
                      query={"operation": LLM, "input_tokens": 0})
    assert (estimate.body["affordable"], estimate.body["limit_remaining"],
            estimate.body["max_output_tokens"]) == (True, 2, 500)  # (2 - 1) credit: 500 output tokens
    assert invoke("POST", "/credits/deduct", token=user.token, key=key(), body={"amount": 2}).status == 200
    assert database.balance(user.account_id)["available"] == 19


# --- license keys and the surface -------------------------------------------------------------


def test_a_license_key_is_refused_on_every_v3_route(invoke: Invoke, new_user: Callable[[], User],
                                                    database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=10)
    license_key = database.call("create_license_key", p_account_id=user.account_id, p_name="srv")["key"]
    hold = reserve(invoke, user, operation=LLM, output_tokens=500)
    before = snapshot(database, user.account_id)
    hold_path = f"/credits/holds/{hold['hold_id']}"
    for method, path, body in (
        ("POST", "/credits/holds", {"operation": LLM, "input_tokens": 10, "overage": "if_available"}),
        ("POST", f"{hold_path}/capture", {"output_tokens": 10, "model": "m"}),
        ("POST", f"{hold_path}/release", None),
        ("POST", f"{hold_path}/extend", {"add_amount": 1, "ttl_seconds": 600}),
        ("GET", "/credits/estimate", None),
    ):
        query = {"operation": LLM, "output_tokens": 10} if method == "GET" else None
        reply = invoke(method, path, license_key=license_key, key=key(), body=body, query=query)
        assert_error(reply, 403, "forbidden")
        assert "deduct" in reply.body["message"]
    assert snapshot(database, user.account_id) == before
    # The one route it has takes the v3 arguments as before.
    spent = invoke("POST", "/credits/deduct", license_key=license_key, key=key(),
                   body={"operation": LLM, "model": "m", "input_tokens": 1000, "output_tokens": 1000})
    assert spent.status == 200 and spent.body["charged"] == 4


def test_openapi_documents_the_v3_routes(invoke: Invoke) -> None:
    spec = invoke("GET", "/credits/openapi.json")
    assert spec.status == 200
    paths = spec.body["paths"]
    assert {"/credits/holds/{hold_id}/extend", "/credits/estimate"} <= set(paths)
    extend = paths["/credits/holds/{hold_id}/extend"]["post"]
    assert any(p["name"] == "Idempotency-Key" for p in extend["parameters"])
    estimate = paths["/credits/estimate"]["get"]
    assert {p["name"] for p in estimate["parameters"]} == {
        "operation", "input_tokens", "output_tokens", "amount", "account_id"}
    schemas = spec.body["components"]["schemas"]
    tokens_and_model = {"input_tokens", "output_tokens", "model"}
    assert set(schemas["ReserveRequest"]["properties"]) >= tokens_and_model | {"overage"}
    assert set(schemas["CaptureRequest"]["properties"]) >= tokens_and_model | {"amount"}
    assert set(schemas["ExtendRequest"]["properties"]) == {"add_amount", "ttl_seconds"}
