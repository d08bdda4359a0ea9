"""The local REST endpoint against PostgREST's documented behaviour, one case per behaviour.

Each case is a request and what PostgREST (v12, as Supabase runs it) documents for
it: status, the headers that carry meaning, and the body. The endpoint implements
only what is listed here (and the RPC cases of tests/test_rest_endpoint.py); the
README lists what it leaves out. Writes go to the catalog tables, as an operator
would edit plans, packs and prices with the secret key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import tokens
from tests.support import Db

SECRET = tokens.secret_key()
SERVICE = {"apikey": SECRET}


@pytest.fixture(scope="module")
def http(rest_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rest_url + "/rest/v1", timeout=10) as session:
        yield session


def op() -> str:
    return f"conf-{uuid.uuid4().hex[:12]}"


def prices(database: Db, *operations: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in database.sql(
        "select operation, credits, free from public.credit_prices where operation = any(%s) "
        "order by operation", list(operations))]


# --- inserts (POST /table) ------------------------------------------------------------------------


def test_insert_is_201_with_no_body_by_default(http: httpx.Client, database: Db) -> None:
    name = op()
    response = http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": 3})
    assert (response.status_code, response.content) == (201, b"")
    assert response.headers["content-range"] == "*/*"
    assert prices(database, name) == [(name, 3, False)]


def test_insert_with_return_representation_is_201_with_the_rows(http: httpx.Client, database: Db) -> None:
    first, second = sorted([op(), op()])
    response = http.post("/credit_prices", headers={**SERVICE, "Prefer": "return=representation"},
                         json=[{"operation": first, "credits": 1, "free": False},
                               {"operation": second, "credits": 2, "free": True}])
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/json")
    rows = sorted(response.json(), key=lambda r: r["operation"])
    assert [(r["operation"], r["credits"], r["free"]) for r in rows] == [(first, 1, False), (second, 2, True)]
    assert set(rows[0]) >= {"operation", "credits", "credits_per_1k_input_tokens", "free", "created_at"}
    assert prices(database, first, second) == [(first, 1, False), (second, 2, True)]


def test_a_duplicate_key_is_409_23505_and_inserts_nothing(http: httpx.Client, database: Db) -> None:
    name, other = op(), op()
    http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": 1})
    response = http.post("/credit_prices", headers=SERVICE,
                         json=[{"operation": other, "credits": 1}, {"operation": name, "credits": 9}])
    assert response.status_code == 409
    assert response.json()["code"] == "23505"
    assert set(response.json()) == {"code", "message", "details", "hint"}
    assert prices(database, name, other) == [(name, 1, False)]  # one statement: all or nothing


def test_an_unknown_column_is_400_pgrst204(http: httpx.Client) -> None:
    response = http.post("/credit_prices", headers=SERVICE, json={"operation": op(), "price": 1})
    assert response.status_code == 400
    assert response.json()["code"] == "PGRST204"
    assert response.json()["message"] == \
        "Could not find the 'price' column of 'credit_prices' in the schema cache"


def test_a_check_violation_is_400_23514(http: httpx.Client, database: Db) -> None:
    name = op()
    response = http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": -1})
    assert (response.status_code, response.json()["code"]) == (400, "23514")
    assert prices(database, name) == []


@pytest.mark.parametrize("body", ["not json", "[]", "42", '[{"operation": "x"}, 1]',
                                  '[{"operation": "x"}, {"operation": "y", "credits": 1}]'])
def test_a_body_that_is_not_rows_is_400_pgrst102(http: httpx.Client, body: str) -> None:
    response = http.post("/credit_prices", headers={**SERVICE, "Content-Type": "application/json"},
                         content=body)
    assert (response.status_code, response.json()["code"]) == (400, "PGRST102")


# --- upserts (POST with Prefer: resolution=...) -----------------------------------------------------


def test_upsert_merges_duplicates_on_the_primary_key(http: httpx.Client, database: Db) -> None:
    name, new = op(), op()
    http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": 1})
    response = http.post("/credit_prices",
                         headers={**SERVICE, "Prefer": "resolution=merge-duplicates,return=representation"},
                         json=[{"operation": name, "credits": 7}, {"operation": new, "credits": 2}])
    assert response.status_code == 201
    assert sorted((r["operation"], r["credits"]) for r in response.json()) == sorted([(name, 7), (new, 2)])
    assert prices(database, name, new) == sorted([(name, 7, False), (new, 2, False)])


def test_upsert_ignoring_duplicates_keeps_the_existing_row(http: httpx.Client, database: Db) -> None:
    name = op()
    http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": 1})
    response = http.post("/credit_prices",
                         headers={**SERVICE, "Prefer": "resolution=ignore-duplicates,return=representation"},
                         json={"operation": name, "credits": 7})
    assert (response.status_code, response.json()) == (201, [])
    assert prices(database, name) == [(name, 1, False)]


def test_upsert_on_another_unique_column(http: httpx.Client, database: Db) -> None:
    price_id = f"price_{uuid.uuid4().hex[:10]}"
    plan = f"conf-{uuid.uuid4().hex[:8]}"
    http.post("/credit_plans", headers=SERVICE,
              json={"id": plan, "monthly_credits": 10, "stripe_price_id": price_id})
    response = http.post("/credit_plans?on_conflict=stripe_price_id",
                         headers={**SERVICE, "Prefer": "resolution=merge-duplicates"},
                         json={"id": plan, "monthly_credits": 20, "stripe_price_id": price_id})
    assert response.status_code == 201
    assert database.sql("select monthly_credits from public.credit_plans where id = %s", plan) == [(20,)]


# --- updates (PATCH) and deletes (DELETE) -------------------------------------------------------


def test_update_is_204_by_default_and_changes_only_matching_rows(http: httpx.Client, database: Db) -> None:
    name, other = op(), op()
    http.post("/credit_prices", headers=SERVICE, json=[{"operation": name, "credits": 1},
                                                       {"operation": other, "credits": 1}])
    response = http.patch(f"/credit_prices?operation=eq.{name}", headers=SERVICE, json={"credits": 5})
    assert (response.status_code, response.content) == (204, b"")
    assert response.headers["content-range"] == "0-0/*"
    assert prices(database, name, other) == sorted([(name, 5, False), (other, 1, False)])


def test_update_with_return_representation_is_200_with_the_rows(http: httpx.Client) -> None:
    name = op()
    http.post("/credit_prices", headers=SERVICE, json={"operation": name, "credits": 1})
    response = http.patch(f"/credit_prices?operation=eq.{name}",
                          headers={**SERVICE, "Prefer": "return=representation"}, json={"free": True})
    assert response.status_code == 200
    assert [(r["operation"], r["credits"], r["free"]) for r in response.json()] == [(name, 1, True)]
    nothing = http.patch("/credit_prices?operation=eq.no-such-operation",
                         headers={**SERVICE, "Prefer": "return=representation"}, json={"free": True})
    assert (nothing.status_code, nothing.json(), nothing.headers["content-range"]) == (200, [], "*/*")


def test_delete_is_204_or_200_with_the_deleted_rows(http: httpx.Client, database: Db) -> None:
    first, second = op(), op()
    http.post("/credit_prices", headers=SERVICE, json=[{"operation": first, "credits": 1},
                                                       {"operation": second, "credits": 2}])
    minimal = http.delete(f"/credit_prices?operation=eq.{first}", headers=SERVICE)
    assert (minimal.status_code, minimal.content) == (204, b"")
    shown = http.delete(f"/credit_prices?operation=in.({second})",
                        headers={**SERVICE, "Prefer": "return=representation"})
    assert shown.status_code == 200 and [r["operation"] for r in shown.json()] == [second]
    assert prices(database, first, second) == []


def test_users_cannot_write_the_catalog(http: httpx.Client, database: Db) -> None:
    """Writes run as the caller's role: grants and RLS decide, as with PostgREST."""
    caller, _account = database.new_user()
    assert caller.user_id
    user = {"apikey": tokens.publishable_key(),
            "Authorization": f"Bearer {tokens.user_token(caller.user_id)}"}
    name = op()
    as_user = http.post("/credit_prices", headers=user, json={"operation": name, "credits": 1})
    as_anon = http.post("/credit_prices", headers={"apikey": tokens.publishable_key()},
                        json={"operation": name, "credits": 1})
    assert (as_user.status_code, as_user.json()["code"]) == (403, "42501")
    assert (as_anon.status_code, as_anon.json()["code"]) == (401, "42501")
    free = http.patch("/credit_prices?operation=eq.image.generate", headers=user, json={"credits": 0})
    assert free.status_code == 403
    assert prices(database, name) == []


def test_put_is_refused_with_a_hint(http: httpx.Client) -> None:
    response = http.put(f"/credit_prices?operation=eq.{op()}", headers=SERVICE, json={"operation": "x"})
    assert response.status_code == 405 and response.json()["hint"]


# --- reads: ranges and counts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten(http: httpx.Client) -> str:
    prefix = f"range-{uuid.uuid4().hex[:8]}-"
    http.post("/credit_prices", headers=SERVICE,
              json=[{"operation": f"{prefix}{i}", "credits": i} for i in range(10)])
    return prefix


def test_a_full_read_is_200_with_its_content_range(http: httpx.Client, ten: str) -> None:
    response = http.get("/credit_prices", headers={**SERVICE, "Prefer": "count=exact"},
                        params={"operation": f"like.{ten}*", "order": "credits"})
    assert response.status_code == 200 and len(response.json()) == 10
    assert response.headers["content-range"] == "0-9/10"


def test_part_of_a_counted_result_is_206_partial_content(http: httpx.Client, ten: str) -> None:
    response = http.get("/credit_prices", headers={**SERVICE, "Prefer": "count=exact"},
                        params={"operation": f"like.{ten}*", "order": "credits", "limit": 3, "offset": 2})
    assert response.status_code == 206
    assert response.headers["content-range"] == "2-4/10"
    assert [r["credits"] for r in response.json()] == [2, 3, 4]
    # Without a count the total is unknown: 200, and "*" as the total.
    uncounted = http.get("/credit_prices", headers=SERVICE,
                         params={"operation": f"like.{ten}*", "order": "credits", "limit": 3})
    assert (uncounted.status_code, uncounted.headers["content-range"]) == (200, "0-2/*")


def test_the_range_header_selects_rows(http: httpx.Client, ten: str) -> None:
    response = http.get("/credit_prices", headers={**SERVICE, "Range": "5-7", "Prefer": "count=exact"},
                        params={"operation": f"like.{ten}*", "order": "credits"})
    assert response.status_code == 206 and response.headers["content-range"] == "5-7/10"
    assert [r["credits"] for r in response.json()] == [5, 6, 7]


def test_an_offset_past_the_end_is_416_pgrst103(http: httpx.Client, ten: str) -> None:
    response = http.get("/credit_prices", headers={**SERVICE, "Prefer": "count=exact"},
                        params={"operation": f"like.{ten}*", "offset": 12})
    assert response.status_code == 416
    assert response.headers["content-range"] == "*/10"
    assert response.json() == {"code": "PGRST103", "message": "Requested range not satisfiable",
                               "details": "An offset of 12 was requested, but there are only 10 rows.",
                               "hint": None}
    backwards = http.get("/credit_prices", headers={**SERVICE, "Range": "7-5"},
                         params={"operation": f"like.{ten}*"})
    assert (backwards.status_code, backwards.json()["code"]) == (416, "PGRST103")


def test_head_answers_like_get_without_a_body(http: httpx.Client, ten: str) -> None:
    response = http.head("/credit_prices", headers={**SERVICE, "Prefer": "count=exact"},
                         params={"operation": f"like.{ten}*", "limit": 2})
    assert (response.status_code, response.content) == (206, b"")
    assert response.headers["content-range"] == "0-1/10"
