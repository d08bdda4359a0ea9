"""The local REST endpoint passes a JSON array to an array-typed argument as PostgREST does.

PostgREST reads an RPC's JSON body into the function's argument types, so a JSON
array becomes a PostgreSQL array (strings stay strings whatever they hold, null
is NULL, nested arrays are dimensions). The endpoint must do the same for any
array type, not only for the functions of the contract; a throwaway function
echoes what it received.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from psycopg import sql

from devstack import tokens
from supabase import ClientOptions, create_client
from tests.support import Db

SERVICE = tokens.service_role_key()


@pytest.fixture(scope="module")
def echo(database: Db) -> Iterator[str]:
    """``public.<name>(p_texts text[], p_numbers integer[] default null, p_note text default null)``."""
    name = f"rest_array_echo_{uuid.uuid4().hex[:8]}"
    database.sql(sql.SQL(
        """
        create function public.{}(p_texts text[], p_numbers integer[] default null, p_note text default null)
        returns jsonb language sql stable set search_path = pg_catalog, pg_temp as $$
          select jsonb_build_object('texts', to_jsonb(p_texts), 'dims', array_ndims(p_texts),
                                    'numbers', to_jsonb(p_numbers), 'note', p_note)
        $$
        """).format(sql.Identifier(name)).as_string(database.conn))
    database.sql(sql.SQL("revoke all on function public.{} from public").format(
        sql.Identifier(name)).as_string(database.conn))
    database.sql(sql.SQL("grant execute on function public.{} to service_role").format(
        sql.Identifier(name)).as_string(database.conn))
    try:
        yield name
    finally:
        database.sql(sql.SQL("drop function public.{}").format(sql.Identifier(name)).as_string(database.conn))


@pytest.fixture(scope="module")
def http(rest_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rest_url + "/rest/v1", timeout=10,
                      headers={"apikey": SERVICE, "Authorization": f"Bearer {SERVICE}"}) as session:
        yield session


def post(http: httpx.Client, fn: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"/rpc/{fn}", json=body)


@pytest.mark.parametrize("texts", [
    [],
    ["operation", "model"],
    ["a,b", 'say "hi"', "back\\slash", "{braces}", "NULL", "", "  spaced  ", "ünï ☃"],
    [None, "x", None],
    ["1", "true", "{}"],
])
def test_a_json_array_is_a_text_array(http: httpx.Client, echo: str, texts: list[Any]) -> None:
    reply = post(http, echo, {"p_texts": texts})
    assert reply.status_code == 200, reply.text
    assert reply.json()["texts"] == texts


def test_other_element_types_and_dimensions(http: httpx.Client, echo: str) -> None:
    reply = post(http, echo, {"p_texts": [["a", "b"], ["c", None]], "p_numbers": [1, -2, 3]})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"texts": [["a", "b"], ["c", None]], "dims": 2, "numbers": [1, -2, 3],
                            "note": None}
    # Numbers sent for text elements arrive as their text; a non-array argument is untouched.
    reply = post(http, echo, {"p_texts": [1, 2.5, True], "p_note": "[not, an, array]"})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["texts"], reply.json()["note"]) == (["1", "2.5", "true"], "[not, an, array]")


def test_an_array_literal_and_bad_elements_behave_as_postgrest(http: httpx.Client, echo: str) -> None:
    # PostgreSQL's own array text is still accepted (PostgREST hands it to the type's input).
    assert post(http, echo, {"p_texts": "{x,y}"}).json()["texts"] == ["x", "y"]
    # A number where an integer array wants one is fine; text that is not a number is the database's 22P02.
    bad = post(http, echo, {"p_texts": [], "p_numbers": ["seven"]})
    assert bad.status_code == 400, bad.text
    assert bad.json()["code"] == "22P02"
    ragged = post(http, echo, {"p_texts": [["a"], ["b", "c"]]})
    assert ragged.status_code == 400 and ragged.json()["code"] == "22P02"


def test_supabase_py_passes_a_list_to_get_credit_usage(rest_url: str, database: Db) -> None:
    _, account_id = database.new_user()
    database.call("deduct_credits", p_account_id=account_id, p_idempotency_key=f"arr-{uuid.uuid4()}",
                  p_amount=1, p_model="listed")
    client = create_client(rest_url, SERVICE, options=ClientOptions(postgrest_client_retry=False,
                                                                     auto_refresh_token=False,
                                                                     persist_session=False))
    answer = client.rpc("get_credit_usage", {"p_account_id": account_id,
                                             "p_group_by": ["model", "member"]}).execute().data
    assert [(r["model"], r["member"], r["credits"]) for r in answer["rows"]] == [("listed", None, 1)]
