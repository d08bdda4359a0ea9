"""GET /credits/usage end to end (API Gateway v2 events -> handlers.deduct (Mangum) ->
supabase-py -> the local REST endpoint -> PostgreSQL): get_credit_usage's answer as JSON,
the same rows as CSV (``format=csv`` or ``Accept: text/csv``) with formula-looking text
made inert, who may read what, bad input, and license keys kept to POST /credits/deduct.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devstack import tokens
from tests.lambda_events import cold_start
from tests.support import Caller, Db
from tests.test_credits_api import Invoke, Reply, User, assert_error, credits_env, key, make_invoke

FIGURES = ("credits", "calls", "input_tokens", "output_tokens")
TOOL = "usage-api-tool"  # 3 credits flat
FORMULAS = ("=SUM(A1:A9)", "+1+1", "-2+3", "@cmd", "\tlead", "\rlead")


@pytest.fixture(scope="module", autouse=True)
def _prices(database: Db) -> None:
    database.sql("insert into public.credit_prices (operation, credits) values (%s, 3) "
                 "on conflict (operation) do nothing", TOOL)


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


def spend(invoke: Invoke, user: User, account_id: str | None = None, **body: Any) -> dict[str, Any]:
    if account_id is not None:
        body["account_id"] = account_id
    reply = invoke("POST", "/credits/deduct", token=user.token, key=key(), body=body)
    assert reply.status == 200, reply.body
    result: dict[str, Any] = reply.body
    return result


def sql_usage(database: Db, user: User, account_id: str, group_by: tuple[str, ...] = (),
              **args: Any) -> dict[str, Any]:
    """The SQL function's own answer, for the same caller."""
    result: dict[str, Any] = database.call("get_credit_usage", Caller.user(user.user_id),
                                           p_account_id=account_id, p_group_by="{" + ",".join(group_by) + "}",
                                           **args)
    return result


def csv_rows(reply: Reply) -> list[list[str]]:
    assert reply.status == 200, reply.body
    assert (reply.header("content-type") or "").startswith("text/csv")
    assert isinstance(reply.body, str)
    return list(csv.reader(io.StringIO(reply.body)))


def test_json_is_get_credit_usage_s_answer(invoke: Invoke, new_user: Callable[[], User],
                                           database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=50)
    spend(invoke, user, amount=4, model="small")
    spend(invoke, user, operation=TOOL, model="large", input_tokens=100, output_tokens=250)
    spend(invoke, user, operation=TOOL, model="large", output_tokens=50)
    reply = invoke("GET", "/credits/usage", token=user.token,
                   query={"group_by": "operation,model", "bin": "day"})
    assert reply.status == 200, reply.body
    assert reply.body == sql_usage(database, user, user.account_id, ("operation", "model"))
    assert set(reply.body) == {"account_id", "from", "to", "bin", "rows", "total"}
    assert reply.body["total"] == {"credits": 10, "calls": 3, "input_tokens": 100, "output_tokens": 300}
    by_group = {(r["operation"], r["model"]): r for r in reply.body["rows"]}
    assert (by_group[(TOOL, "large")]["credits"], by_group[(TOOL, "large")]["calls"]) == (6, 2)
    assert set(by_group[(None, "small")]) == {"period", "operation", "model", *FIGURES}
    # Defaults: the caller's own account, its current period, daily bins, no grouping.
    plain = invoke("GET", "/credits/usage", token=user.token)
    assert plain.status == 200 and plain.body == sql_usage(database, user, user.account_id)
    balance = database.balance(user.account_id)
    assert (plain.body["from"], plain.body["to"], plain.body["bin"]) == (
        balance["period_start"], balance["period_end"], "day")


def test_a_range_and_a_bin_are_passed_through(invoke: Invoke, new_user: Callable[[], User],
                                              database: Db) -> None:
    user = new_user()
    spend(invoke, user, amount=2)
    now: dt.datetime = database.one("select now()")
    start = now.replace(minute=0, second=0, microsecond=0)
    query = {"account_id": user.account_id, "from": start.isoformat(), "bin": "hour",
             "to": (start + dt.timedelta(hours=1)).isoformat(), "group_by": "member"}
    reply = invoke("GET", "/credits/usage", token=user.token, query=query)
    assert reply.status == 200, reply.body
    assert reply.body == sql_usage(database, user, user.account_id, ("member",), p_from=start.isoformat(),
                                   p_to=(start + dt.timedelta(hours=1)).isoformat(), p_bin="hour")
    assert [(r["period"], r["member"], r["credits"]) for r in reply.body["rows"]] == [
        (start.isoformat(), user.user_id, 2)]
    # A time without an offset is UTC.
    naive = invoke("GET", "/credits/usage", token=user.token,
                   query={**query, "from": start.replace(tzinfo=None).isoformat()})
    assert naive.status == 200 and naive.body == reply.body


def test_csv_has_a_header_and_one_row_per_result_row(invoke: Invoke, new_user: Callable[[], User],
                                                     database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=50)
    spend(invoke, user, amount=4, model="small")
    spent = spend(invoke, user, operation=TOOL, model="large", input_tokens=7, output_tokens=9)
    database.call("refund_credits", p_transaction_id=spent["transaction_id"], p_idempotency_key=key())
    query = {"group_by": "model,operation", "bin": "month"}
    as_json = invoke("GET", "/credits/usage", token=user.token, query=query)
    by_format = invoke("GET", "/credits/usage", token=user.token, query={**query, "format": "csv"})
    by_accept = invoke("GET", "/credits/usage", token=user.token, query=query, headers={"accept": "text/csv"})
    rows = csv_rows(by_format)
    assert csv_rows(by_accept) == rows
    assert "credit-usage.csv" in (by_format.header("content-disposition") or "")
    # The header names the period, the keys in the order asked for, then the figures.
    assert rows[0] == ["period", "model", "operation", *FIGURES]
    expected = [[r["period"], r["model"] or "", r["operation"] or "", *(str(r[f]) for f in FIGURES)]
                for r in as_json.body["rows"]]
    assert rows[1:] == expected
    assert len(rows) == 1 + len(as_json.body["rows"]) == 3
    # format=json wins over the Accept header.
    explicit = invoke("GET", "/credits/usage", token=user.token, query={**query, "format": "json"},
                      headers={"accept": "text/csv"})
    assert explicit.status == 200 and explicit.body == as_json.body


def test_csv_of_no_usage_is_the_header_alone(invoke: Invoke, new_user: Callable[[], User]) -> None:
    user = new_user()
    reply = invoke("GET", "/credits/usage", token=user.token, query={"format": "csv"})
    assert csv_rows(reply) == [["period", *FIGURES]]


def test_csv_text_that_looks_like_a_formula_is_made_inert(invoke: Invoke, new_user: Callable[[], User],
                                                          database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=50)
    for model in (*FORMULAS, "plain", "a=b"):
        spend(invoke, user, amount=1, model=model)
    # A bin of refunds alone has negative credits: a number, not text, so it stays as it is.
    refunded = database.call("deduct_credits", p_account_id=user.account_id, p_idempotency_key=key(),
                             p_amount=2, p_model="refunded")
    database.call("refund_credits", p_transaction_id=refunded["transaction_id"], p_idempotency_key=key())
    rows = csv_rows(invoke("GET", "/credits/usage", token=user.token,
                           query={"group_by": "model", "format": "csv"}))
    models = {row[1]: row for row in rows[1:]}
    assert set(models) == {"'" + f for f in FORMULAS} | {"plain", "a=b", "refunded"}
    assert models["refunded"][2:4] == ["0", "1"]  # credits net of the refund, one call
    json_rows = invoke("GET", "/credits/usage", token=user.token, query={"group_by": "model"}).body["rows"]
    assert {r["model"] for r in json_rows} >= set(FORMULAS)  # JSON is left as it is


def test_a_negative_figure_stays_a_number_in_csv(invoke: Invoke, new_user: Callable[[], User],
                                                 database: Db) -> None:
    user = new_user()
    database.fund(user.account_id, purchased=50)
    spent = spend(invoke, user, amount=5)
    database.call("refund_credits", p_transaction_id=spent["transaction_id"], p_idempotency_key=key(),
                  p_amount=3)
    # Only the refund is in range.
    refund_at = database.one("select created_at from public.credit_transactions where account_id = %s "
                             "and kind = 'refund'", user.account_id)
    query = {"from": refund_at.isoformat(), "to": (refund_at + dt.timedelta(seconds=1)).isoformat(),
             "format": "csv"}
    rows = csv_rows(invoke("GET", "/credits/usage", token=user.token, query=query))
    assert [row[1:3] for row in rows[1:]] == [["-3", "0"]]


# --- who may read --------------------------------------------------------------------------------------

def test_a_plain_member_reads_only_their_own_spends(invoke: Invoke, new_user: Callable[[], User],
                                                    database: Db) -> None:
    owner, member, other = new_user(), new_user(), new_user()
    _, account_id = database.new_tenant({owner.user_id: "owner", member.user_id: "member",
                                         other.user_id: "member"})
    database.fund(account_id, purchased=100)
    database.call("set_spend_limit", Caller.user(owner.user_id), p_account_id=account_id,
                  p_subject="default_member", p_limit=1000, p_period="month")
    spend(invoke, owner, account_id, amount=5)
    spend(invoke, member, account_id, amount=7)
    spend(invoke, other, account_id, amount=11)
    query = {"account_id": account_id, "group_by": "member"}
    everyone = invoke("GET", "/credits/usage", token=owner.token, query=query)
    assert everyone.status == 200 and everyone.body["total"]["credits"] == 23
    assert {r["member"] for r in everyone.body["rows"]} == {owner.user_id, member.user_id, other.user_id}
    mine = invoke("GET", "/credits/usage", token=member.token, query=query)
    assert mine.status == 200, mine.body
    assert ([r["member"] for r in mine.body["rows"]], mine.body["total"]["credits"]) == ([member.user_id], 7)
    rows = csv_rows(invoke("GET", "/credits/usage", token=member.token, query={**query, "format": "csv"}))
    assert [row[1:3] for row in rows[1:]] == [[member.user_id, "7"]]


def test_another_account_is_forbidden_as_for_the_balance(invoke: Invoke,
                                                         new_user: Callable[[], User]) -> None:
    user, stranger = new_user(), new_user()
    query = {"account_id": user.account_id}
    balance = invoke("GET", "/credits/balance", token=stranger.token, query=query)
    usage = invoke("GET", "/credits/usage", token=stranger.token, query=query)
    assert_error(usage, 403, "forbidden")
    assert (usage.status, usage.body) == (balance.status, balance.body)
    as_csv = invoke("GET", "/credits/usage", token=stranger.token, query={**query, "format": "csv"})
    assert_error(as_csv, 403, "forbidden")
    missing = invoke("GET", "/credits/usage", token=user.token, query={"account_id": str(uuid.uuid4())})
    assert_error(missing, 404, "account_not_found")
    assert_error(invoke("GET", "/credits/usage"), 401, "unauthorized")


def test_a_license_key_may_not_read_usage(invoke: Invoke, new_user: Callable[[], User], database: Db) -> None:
    user = new_user()
    license_key = database.call("create_license_key", p_account_id=user.account_id, p_name="srv")["key"]
    reply = invoke("GET", "/credits/usage", license_key=license_key)
    assert_error(reply, 403, "forbidden")
    assert "deduct" in reply.body["message"]
    # Its usage is there for the account's user, under the key's id.
    spent = invoke("POST", "/credits/deduct", license_key=license_key, key=key(), body={"amount": 1})
    assert spent.status == 200, spent.body
    rows = invoke("GET", "/credits/usage", token=user.token,
                  query={"group_by": "license_key,member"}).body["rows"]
    key_id = str(database.one("select id from public.credit_license_keys where account_id = %s",
                              user.account_id))
    assert [(r["license_key"], r["member"], r["credits"]) for r in rows] == [(key_id, None, 1)]


@pytest.mark.parametrize(("query", "status", "error", "argument"), [
    ({"group_by": "operation,colour"}, 400, "invalid_argument", "p_group_by"),
    ({"group_by": "model,model"}, 400, "invalid_argument", "p_group_by"),
    ({"group_by": "operation,"}, 400, "invalid_argument", "p_group_by"),
    ({"from": "2027-02-01T00:00:00Z", "to": "2027-01-01T00:00:00Z"}, 400, "invalid_argument", "p_to"),
    ({"bin": "week"}, 422, "invalid_request", None),
    ({"format": "xml"}, 422, "invalid_request", None),
    ({"from": "yesterday"}, 422, "invalid_request", None),
    ({"account_id": "not-a-uuid"}, 422, "invalid_request", None),
])
def test_bad_input(invoke: Invoke, new_user: Callable[[], User], query: dict[str, str], status: int,
                   error: str, argument: str | None) -> None:
    user = new_user()
    reply = invoke("GET", "/credits/usage", token=user.token, query=query)
    assert_error(reply, status, error)
    if argument:
        assert reply.body["detail"]["argument"] == argument


def test_openapi_documents_the_usage_route(invoke: Invoke) -> None:
    spec = invoke("GET", "/credits/openapi.json").body
    route = spec["paths"]["/credits/usage"]["get"]
    assert {p["name"] for p in route["parameters"]} == {"account_id", "from", "to", "group_by", "bin",
                                                        "format"}
    assert {"application/json", "text/csv"} <= set(route["responses"]["200"]["content"])
