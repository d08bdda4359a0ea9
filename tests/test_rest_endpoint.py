"""The local REST endpoint behaves like Supabase's REST layer for our callers.

Everything goes over HTTP to the endpoint served by uvicorn: supabase-py for
what the functions do (rpc, table reads), raw httpx where the exact status,
body or headers are the point. After every rejected call the balance is checked
to be unchanged.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from postgrest import APIError

from devstack import db, rest, serve, tokens
from supabase import Client, ClientOptions, create_client
from tests.support import Caller, Db

ANON = tokens.anon_key()
SERVICE = tokens.service_role_key()
OTHER = tokens.LocalKeys.generate()  # another project's keys


def user_token(caller: Caller, **kwargs: Any) -> str:
    assert caller.user_id
    return tokens.user_token(caller.user_id, **kwargs)


@pytest.fixture(scope="module")
def client(rest_url: str) -> Callable[..., Client]:
    """``client(key, token=None)``: a supabase-py client like the functions build."""

    def make(key: str = ANON, token: str | None = None) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        options = ClientOptions(headers=headers, postgrest_client_retry=False,
                                auto_refresh_token=False, persist_session=False)
        return create_client(rest_url, key, options=options)

    return make


@pytest.fixture(scope="module")
def http(rest_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rest_url + "/rest/v1", timeout=10) as session:
        yield session


@pytest.fixture
def funded(database: Db) -> tuple[Caller, str]:
    """A new user whose account holds its sign-up allowance plus 10 purchased credits."""
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=10)
    return caller, account_id


def api_error(run: Callable[[], Any]) -> APIError:
    with pytest.raises(APIError) as info:
        run()
    return info.value


# --- rpc ---------------------------------------------------------------------------

def test_rpc_returns_the_function_result(client: Callable[..., Client], database: Db,
                                         funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    expected = database.balance(account_id)
    by_service = client(SERVICE).rpc("get_credit_balance", {"p_account_id": account_id}).execute().data
    assert by_service == expected
    assert by_service["purchased"] == 10
    # No argument: the default applies, and the user's own account is found through the JWT's sub.
    own = client(ANON, user_token(caller)).rpc("get_credit_balance", {}).execute().data
    assert own == expected


def test_rpc_named_arguments_change_the_balance_as_the_user(
        client: Callable[..., Client], database: Db, funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    before = database.balance(account_id)
    user = client(ANON, user_token(caller))
    args = {"p_idempotency_key": "rest-deduct-1", "p_amount": 4, "p_account_id": account_id,
            "p_metadata": {"job": "a"}}
    result = user.rpc("deduct_credits", args).execute().data
    assert result["charged"] == 4 and result["replayed"] is False
    assert result["balance"] == database.balance(account_id)
    assert database.balance(account_id)["total"] == before["total"] - 4
    spend = [row for row in database.ledger(account_id) if row["type"] == "spend"]
    assert sum(row["amount"] for row in spend) == -4
    assert {row["actor_id"] for row in spend} == {caller.user_id}
    replay = user.rpc("deduct_credits", args).execute().data
    assert replay["replayed"] is True
    assert database.balance(account_id)["total"] == before["total"] - 4


def test_rpc_by_get_passes_query_arguments(client: Callable[..., Client], database: Db,
                                           funded: tuple[Caller, str]) -> None:
    _caller, account_id = funded
    data = client(SERVICE).rpc("get_credit_balance", {"p_account_id": account_id}, get=True).execute().data
    assert data == database.balance(account_id)


def test_rpc_by_get_is_read_only(http: httpx.Client, database: Db, funded: tuple[Caller, str]) -> None:
    _caller, account_id = funded
    before = database.balance(account_id)
    response = http.get("/rpc/add_purchased_credits", headers={"apikey": SERVICE},
                        params={"p_account_id": account_id, "p_amount": 5, "p_idempotency_key": "get-write"})
    assert response.status_code == 405
    assert response.json()["code"] == "25006"
    assert database.balance(account_id) == before


# --- errors ------------------------------------------------------------------------

def test_insufficient_credits_is_402_with_the_detail(client: Callable[..., Client], database: Db,
                                                     funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    before = database.balance(account_id)
    error = api_error(lambda: client(ANON, user_token(caller)).rpc("deduct_credits", {
        "p_account_id": account_id, "p_idempotency_key": "too-much", "p_amount": before["available"] + 1,
    }).execute())
    assert (error.code, error.message) == ("PT402", "insufficient_credits")
    assert json.loads(error.details) == {"required": before["available"] + 1,
                                         "available": before["available"]}
    assert database.balance(account_id) == before


def test_contract_errors_keep_their_status(http: httpx.Client, database: Db,
                                           funded: tuple[Caller, str]) -> None:
    _caller, account_id = funded
    other, _other_account = database.new_user()
    before = database.balance(account_id)
    as_other = {"apikey": ANON, "Authorization": f"Bearer {user_token(other)}"}
    as_service = {"apikey": SERVICE}

    forbidden = http.post("/rpc/deduct_credits", headers=as_other, json={
        "p_account_id": account_id, "p_idempotency_key": "steal", "p_amount": 1})
    assert forbidden.status_code == 403
    assert forbidden.json()["code"] == "PT403" and forbidden.json()["message"] == "forbidden"

    missing = http.post("/rpc/get_credit_balance", headers=as_service,
                        json={"p_account_id": str(uuid.uuid4())})
    assert missing.status_code == 404
    assert (missing.json()["code"], missing.json()["message"]) == ("PT404", "account_not_found")

    first = http.post("/rpc/add_purchased_credits", headers=as_service, json={
        "p_account_id": account_id, "p_amount": 2, "p_idempotency_key": "conflict"})
    assert first.status_code == 200
    conflict = http.post("/rpc/add_purchased_credits", headers=as_service, json={
        "p_account_id": account_id, "p_amount": 3, "p_idempotency_key": "conflict"})
    assert conflict.status_code == 409
    assert conflict.json()["message"] == "idempotency_conflict"

    invalid = http.post("/rpc/deduct_credits", headers=as_service, json={
        "p_account_id": account_id, "p_idempotency_key": "zero", "p_amount": 0})
    assert invalid.status_code == 400
    assert invalid.json()["code"] == "22023" and invalid.json()["message"] == "invalid_argument"
    assert json.loads(invalid.json()["details"])["argument"] == "p_amount"

    bad_uuid = http.post("/rpc/get_credit_balance", headers=as_service, json={"p_account_id": "not-a-uuid"})
    assert bad_uuid.status_code == 400 and bad_uuid.json()["code"] == "22P02"

    assert database.balance(account_id)["total"] == before["total"] + 2


def test_permission_denied_is_401_for_anon_and_403_for_users(
        client: Callable[..., Client], database: Db, funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    before = database.balance(account_id)
    as_anon = api_error(
        lambda: client(ANON).rpc("get_credit_balance", {"p_account_id": account_id}).execute())
    assert as_anon.code == "42501"
    as_user = api_error(lambda: client(ANON, user_token(caller)).rpc("add_purchased_credits", {
        "p_account_id": account_id, "p_amount": 100, "p_idempotency_key": "self-grant"}).execute())
    assert as_user.code == "42501"
    assert database.balance(account_id) == before


def test_permission_denied_statuses(http: httpx.Client, database: Db, funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    anon = http.post("/rpc/get_credit_balance", headers={"apikey": ANON}, json={"p_account_id": account_id})
    assert anon.status_code == 401
    user = http.post("/rpc/add_purchased_credits",
                     headers={"apikey": ANON, "Authorization": f"Bearer {user_token(caller)}"},
                     json={"p_account_id": account_id, "p_amount": 100, "p_idempotency_key": "self-grant"})
    assert user.status_code == 403


@pytest.mark.parametrize("fn, args", [
    ("no_such_function", {}),
    ("get_credit_balance", {"p_account": str(uuid.uuid4())}),  # unknown argument name
    ("deduct_credits", {"p_amount": 1}),  # required arguments missing
    ("pg_sleep", {}),  # not in the public schema
])
def test_unknown_function_or_arguments_is_404(http: httpx.Client, fn: str, args: dict[str, Any]) -> None:
    response = http.post(f"/rpc/{fn}", headers={"apikey": SERVICE}, json=args)
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "PGRST202"
    assert body["message"].startswith(f"Could not find the function public.{fn}(")


def test_the_newer_api_keys_act_as_their_roles(client: Callable[..., Client], http: httpx.Client,
                                                database: Db, funded: tuple[Caller, str]) -> None:
    caller, account = funded
    # sb_secret_: service_role, through supabase-py exactly as a function calls it.
    service = client(tokens.secret_key())
    answer = service.rpc("get_credit_balance", {"p_account_id": account}).execute()
    assert answer.data["account_id"] == account
    # sb_publishable_: anon, and a user's bearer token still decides the role.
    user = client(tokens.publishable_key(), user_token(caller))
    assert user.rpc("get_credit_balance", {}).execute().data["account_id"] == account
    anon = http.post("/rpc/get_credit_balance", headers={"apikey": tokens.publishable_key()}, json={})
    assert anon.status_code == 401
    forged = http.post("/rpc/get_credit_balance", headers={"apikey": "sb_secret_not_this_projects"},
                       json={"p_account_id": account})
    assert forged.status_code == 401 and forged.json()["message"] == "Invalid API key"


def test_body_must_be_a_json_object(http: httpx.Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than any parser goes
    for content in (b"[1, 2]", b"{not json", b'{"p_account_id": ' + deep + b"}"):
        response = http.post("/rpc/get_credit_balance", content=content,
                             headers={"apikey": SERVICE, "Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["code"] == "PGRST102"


def test_client_errors_are_4xx_never_an_outage(http: httpx.Client, database: Db,
                                              funded: tuple[Caller, str]) -> None:
    _, account = funded
    before = database.balance(account)
    # A NUL character cannot be stored in text: the caller's mistake, not "could not connect".
    nul = http.post("/rpc/deduct_credits", headers={"apikey": SERVICE},
                    json={"p_account_id": account, "p_idempotency_key": "nul\u0000key", "p_amount": 1})
    assert nul.status_code == 400 and "Retry-After" not in nul.headers
    assert nul.json()["code"] == "22021"
    oversized = b'{"p_account_id": "' + b"x" * (rest.MAX_BODY_BYTES + 1) + b'"}'
    big = http.post("/rpc/get_credit_balance",
                    headers={"apikey": SERVICE, "Content-Type": "application/json"}, content=oversized)
    assert big.status_code == 413
    assert database.balance(account) == before


@pytest.mark.parametrize("text", ["\\ud800", "a\\udc00b", "\\ud800\\ud800"])
def test_a_lone_surrogate_is_refused_as_postgrest_would(http: httpx.Client, database: Db,
                                                        funded: tuple[Caller, str], text: str) -> None:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); PostgreSQL cannot hold it. The
    answer names that problem with a 400-class status: never "function not found", never a 500."""
    caller, account = funded
    before = database.balance(account)
    # Written by hand: json.dumps would escape the backslash of the escape sequence.
    raw = f'{{"p_account_id": "{account}", "p_idempotency_key": "{text}", "p_amount": 1}}'.encode()
    headers = {"apikey": ANON, "Authorization": f"Bearer {user_token(caller)}",
               "Content-Type": "application/json"}
    reply = http.post("/rpc/deduct_credits", headers=headers, content=raw)
    assert 400 <= reply.status_code < 500 and reply.status_code != 404, reply.text
    body = reply.json()
    assert body["code"] not in ("PGRST202", None) and body["code"].startswith("22"), body
    assert "Unicode" in body["message"] + (body["details"] or ""), body
    # The same in a metadata value, and in a table write: the same kind of answer.
    nested = (f'{{"p_account_id": "{account}", "p_idempotency_key": "k-{uuid.uuid4()}", "p_amount": 1,'
              f' "p_metadata": {{"n": "{text}"}}}}').encode()
    assert http.post("/rpc/deduct_credits", headers=headers, content=nested).status_code == 400
    row = f'{{"operation": "{text}", "credits": 1}}'.encode()
    written = http.post("/credit_prices", headers={"apikey": SERVICE, "Content-Type": "application/json"},
                        content=row)
    assert written.status_code == 400 and written.json()["code"].startswith("22"), written.text
    assert database.balance(account) == before


# Every status rule of the mapping, raised for real by a function in a database of
# its own (so the shared test database keeps only contract functions).
RAISE_ERROR_SQL = """
create function public.raise_error(p_code text, p_detail text default null) returns jsonb
language plpgsql as $$
begin
  if p_detail is null then
    raise exception using errcode = p_code, message = 'raised ' || p_code;
  end if;
  raise exception using errcode = p_code, message = 'raised ' || p_code, detail = p_detail,
                        hint = 'hint for ' || p_code;
end
$$;
create function public.service_only() returns jsonb language sql as $$ select '{}'::jsonb $$;
revoke execute on function public.service_only() from public, anon, authenticated;
"""


@pytest.fixture(scope="module")
def errors_url(pg_server: str) -> Iterator[str]:
    dsn = db.create_database(pg_server, f"rest_errors_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.apply_sql_file(conn, db.BOOTSTRAP)
        conn.execute(RAISE_ERROR_SQL)  # type: ignore[arg-type]
    with serve.serve_in_thread(rest.create_app(dsn)) as url:
        yield url + "/rest/v1"


@pytest.mark.parametrize("code, status", [
    ("PT402", 402), ("PT409", 409), ("PT418", 418),
    ("22023", 400), ("22P02", 400), ("P0001", 400),
    ("23505", 409), ("23503", 409), ("23514", 400), ("23502", 400),
    ("42883", 404), ("42P01", 404),
    ("53300", 503), ("53200", 503), ("57014", 503), ("57P01", 503), ("08006", 503),
    ("XX000", 500), ("40001", 500), ("P0002", 500),
])
def test_sqlstate_to_status(errors_url: str, code: str, status: int) -> None:
    detail = json.dumps({"code": code})
    response = httpx.post(f"{errors_url}/rpc/raise_error", headers={"apikey": SERVICE},
                          json={"p_code": code, "p_detail": detail})
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"code", "message", "details", "hint"}
    if status < 500:
        assert body == {"code": code, "message": f"raised {code}", "details": detail,
                        "hint": f"hint for {code}"}
    else:
        # Internal errors keep their code, never their text.
        assert "raised" not in json.dumps(body)
        assert body["code"] in (code, "PGRST000")
    if status == 503:
        assert response.headers["Retry-After"]


def test_permission_denied_depends_on_the_role(errors_url: str) -> None:
    anon = httpx.post(f"{errors_url}/rpc/service_only", headers={"apikey": ANON}, json={})
    token = tokens.user_token(str(uuid.uuid4()))
    user = httpx.post(f"{errors_url}/rpc/service_only",
                      headers={"apikey": ANON, "Authorization": f"Bearer {token}"}, json={})
    service = httpx.post(f"{errors_url}/rpc/service_only", headers={"apikey": SERVICE}, json={})
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")
    assert (user.status_code, user.json()["code"]) == (403, "42501")
    assert (service.status_code, service.json()) == (200, {})


def test_database_unreachable_is_503(tmp_path: Any) -> None:
    # A socket directory with no server behind it.
    app = rest.create_app(f"postgresql://postgres@/credits?host={tmp_path}",
                          pool_timeout=0.5)
    with serve.serve_in_thread(app) as url:
        call = httpx.post(f"{url}/rest/v1/rpc/get_credit_balance", headers={"apikey": SERVICE}, json={})
        read = httpx.get(f"{url}/rest/v1/credit_ledger", headers={"apikey": SERVICE})
        health = httpx.get(f"{url}/rest/v1/", headers={"apikey": SERVICE})
    for response in (call, read, health):
        assert response.status_code == 503
        assert response.json()["code"] == "PGRST000"
        assert response.headers["Retry-After"]
        assert str(tmp_path) not in response.text


# --- auth --------------------------------------------------------------------------

def _alg_none_token(user_id: str) -> str:
    return jwt.encode({"sub": user_id, "role": "service_role"}, key=None, algorithm="none")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", [
    "no_apikey", "apikey_wrong_secret", "apikey_is_user_token", "apikey_unknown_secret_key",
    "bearer_wrong_secret", "bearer_other_signing_key", "bearer_expired", "bearer_alg_none",
    "bearer_garbage", "bearer_bad_role", "not_bearer",
])
def test_bad_credentials_are_401_and_change_nothing(http: httpx.Client, database: Db,
                                                    funded: tuple[Caller, str], case: str) -> None:
    caller, account_id = funded
    uid = caller.user_id or ""
    # Another project's signing key, under our key's kid.
    forged_kid = OTHER.mint({"sub": uid, "role": "authenticated"}, headers={"kid": tokens.default_keys().kid})
    headers = {
        "no_apikey": {"Authorization": f"Bearer {SERVICE}"},
        "apikey_wrong_secret": {"apikey": OTHER.service_role_key()},
        "apikey_is_user_token": {"apikey": tokens.user_token(uid)},
        "apikey_unknown_secret_key": {"apikey": OTHER.secret_key},
        "bearer_wrong_secret": {"apikey": ANON, "Authorization":
                                f"Bearer {OTHER.user_token(uid, issuer='x', algorithm='HS256')}"},
        "bearer_other_signing_key": {"apikey": ANON, "Authorization": f"Bearer {forged_kid}"},
        "bearer_expired": {"apikey": ANON, "Authorization": f"Bearer {tokens.user_token(uid, ttl=-60)}"},
        "bearer_alg_none": {"apikey": ANON, "Authorization": f"Bearer {_alg_none_token(uid)}"},
        "bearer_garbage": {"apikey": ANON, "Authorization": "Bearer not.a.jwt"},
        "bearer_bad_role": {"apikey": ANON,
                            "Authorization": f"Bearer {tokens.mint({'sub': uid, 'role': 'postgres'})}"},
        "not_bearer": {"apikey": ANON, "Authorization": f"Basic {user_token(caller)}"},
    }[case]
    before = database.balance(account_id)
    response = http.post("/rpc/deduct_credits", headers=headers, json={
        "p_account_id": account_id, "p_idempotency_key": f"bad-{case}", "p_amount": 1})
    assert response.status_code == 401
    body = response.json()
    assert set(body) == {"code", "message", "details", "hint"}
    assert body["code"].startswith("PGRST30")
    if case == "bearer_expired":
        assert (body["code"], body["message"]) == ("PGRST303", "JWT expired")
    assert "Traceback" not in response.text and tokens.default_keys().jwt_secret not in response.text
    assert database.balance(account_id) == before
    assert not [row for row in database.ledger(account_id) if row["idempotency_key"] == f"bad-{case}"]


def test_apikey_alone_is_the_token(http: httpx.Client, database: Db, funded: tuple[Caller, str]) -> None:
    _caller, account_id = funded
    response = http.post("/rpc/add_purchased_credits", headers={"apikey": SERVICE}, json={
        "p_account_id": account_id, "p_amount": 3, "p_idempotency_key": "apikey-only"})
    assert response.status_code == 200
    assert response.json()["added"] == 3
    assert database.balance(account_id)["purchased"] == 13


def test_health(http: httpx.Client) -> None:
    assert http.get("/", headers={"apikey": ANON}).status_code == 200
    assert http.get("/").status_code == 401


# --- table reads -------------------------------------------------------------------

def _spend(database: Db, caller: Caller, account_id: str, amounts: list[int]) -> None:
    for n, amount in enumerate(amounts):
        database.call("deduct_credits", caller, p_account_id=account_id, p_amount=amount,
                      p_idempotency_key=f"spend-{n}")


def test_user_reads_only_own_ledger_rows(client: Callable[..., Client], database: Db) -> None:
    alice, alice_account = database.new_user()
    _bob, bob_account = database.new_user()
    database.fund(alice_account, purchased=20)
    database.fund(bob_account, purchased=20)
    _spend(database, alice, alice_account, [1, 2, 3])
    as_alice = client(ANON, user_token(alice))

    rows = as_alice.table("credit_ledger").select("*").execute().data
    assert rows and {row["account_id"] for row in rows} == {alice_account}
    assert len(rows) == len(database.ledger(alice_account))
    # Another account's rows are invisible, even when asked for by id.
    assert as_alice.table("credit_ledger").select("*").eq("account_id", bob_account).execute().data == []
    everything = client(SERVICE).table("credit_ledger").select("account_id").in_(
        "account_id", [alice_account, bob_account]).execute().data
    assert {row["account_id"] for row in everything} == {alice_account, bob_account}


def test_filters_order_limit_offset(client: Callable[..., Client], database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=50)
    _spend(database, caller, account_id, [1, 2, 3, 4])
    ledger = database.ledger(account_id)
    spends = sorted((row for row in ledger if row["type"] == "spend"), key=lambda r: r["id"], reverse=True)
    table = client(ANON, user_token(caller)).table("credit_ledger")

    newest = table.select("id, amount, kind:type").eq("account_id", account_id).eq("type", "spend") \
        .order("id", desc=True).limit(2).execute().data
    assert newest == [{"id": r["id"], "amount": r["amount"], "kind": r["type"]} for r in spends[:2]]

    paged = table.select("id").eq("account_id", account_id).eq("type", "spend").order("id", desc=True) \
        .range(1, 2).execute().data
    assert [r["id"] for r in paged] == [r["id"] for r in spends[1:3]]

    before = table.select("id").eq("type", "spend").lt("id", spends[0]["id"]).order("id").execute().data
    assert [r["id"] for r in before] == sorted(r["id"] for r in spends[1:])
    assert len(table.select("id").lte("amount", -3).execute().data) == 2
    credits_in = [r for r in ledger if r["amount"] > 0]
    assert len(table.select("id").gte("amount", 1).execute().data) == len(credits_in)
    assert len(table.select("id").gt("amount", -2).neq("type", "spend").execute().data) == \
        len([r for r in ledger if r["type"] != "spend"])
    assert len(table.select("id").is_("stripe_ref", "null").execute().data) == len(ledger)
    assert table.select("id").not_.is_("stripe_ref", "null").execute().data == []

    counted = table.select("id", count="exact").eq("type", "spend").limit(1).execute()
    assert counted.count == 4 and len(counted.data) == 1

    one = table.select("amount").eq("id", spends[-1]["id"]).single().execute().data
    assert one == {"amount": -1}


def test_table_read_errors(http: httpx.Client, database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=1)  # two ledger rows: one "single object" too many
    as_user = {"apikey": ANON, "Authorization": f"Bearer {user_token(caller)}"}
    cases = [
        ("/credit_ledger", {"nope": "eq.1"}, as_user, 400, "42703"),
        ("/credit_ledger", {"select": "id,nope"}, as_user, 400, "42703"),
        ("/credit_ledger", {"order": "nope.desc"}, as_user, 400, "42703"),
        ("/credit_ledger", {"id": "eq.not-a-number"}, as_user, 400, "22P02"),
        ("/credit_ledger", {"id": "between.1"}, as_user, 400, "PGRST100"),
        ("/credit_ledger", {"limit": "-1"}, as_user, 400, "PGRST100"),
        ("/credit_ledger", {"select": "id", "id": "eq.1"}, {"apikey": ANON}, 401, "42501"),
        ("/no_such_table", {}, as_user, 404, "PGRST205"),
        ("/users", {}, {"apikey": SERVICE}, 404, "PGRST205"),  # auth.users is not exposed
    ]
    for path, params, headers, status, code in cases:
        response = http.get(path, params=params, headers=headers)
        assert (response.status_code, response.json()["code"]) == (status, code), (path, params)
    single = http.get("/credit_ledger", params={"select": "id"},
                      headers={**as_user, "Accept": "application/vnd.pgrst.object+json"})
    assert single.status_code == 406 and single.json()["code"] == "PGRST116"


def test_filter_values_are_data_not_sql(client: Callable[..., Client], database: Db) -> None:
    caller, account_id = database.new_user()
    table = client(ANON, user_token(caller)).table("credit_ledger")
    assert table.select("id").eq("type", "spend' or '1'='1").execute().data == []
    assert table.select("id").in_("type", ["x\",\"y", "grant"]).execute().data == [
        {"id": row["id"]} for row in database.ledger(account_id) if row["type"] == "grant"]


def test_reads_are_capped_at_max_rows(db_dsn: str, database: Db) -> None:
    caller, account_id = database.new_user()
    database.fund(account_id, purchased=5)
    _spend(database, caller, account_id, [1, 1])
    headers = {"apikey": SERVICE}
    params = {"account_id": f"eq.{account_id}", "order": "id"}
    with serve.serve_in_thread(rest.create_app(db_dsn, max_rows=2)) as url:
        capped = httpx.get(f"{url}/rest/v1/credit_ledger", params=params, headers=headers)
        smaller = httpx.get(f"{url}/rest/v1/credit_ledger", params={**params, "limit": "1"}, headers=headers)
    assert len(database.ledger(account_id)) == 4
    assert [row["id"] for row in capped.json()] == [row["id"] for row in database.ledger(account_id)[:2]]
    assert capped.headers["Content-Range"] == "0-1/*"
    assert len(smaller.json()) == 1


def test_views_read_under_the_callers_rights(client: Callable[..., Client], database: Db,
                                             funded: tuple[Caller, str]) -> None:
    caller, account_id = funded
    as_user = client(ANON, user_token(caller))
    rows = as_user.table("credit_balances").select("*").execute().data
    assert len(rows) == 1
    balance = database.balance(account_id)
    assert {key: rows[0][key] for key in ("account_id", "subscription", "purchased", "held", "available",
                                          "total")} == {key: balance[key] for key in (
        "account_id", "subscription", "purchased", "held", "available", "total")}
    usage = as_user.table("credit_pool_usage").select("account_id,total_credits").execute().data
    assert {row["account_id"] for row in usage} == {account_id}


def test_only_the_public_schema_is_exposed(client: Callable[..., Client], http: httpx.Client) -> None:
    service = client(SERVICE)
    error = api_error(lambda: service.postgrest.schema("private").rpc("get_credit_balance", {}).execute())
    assert error.code == "PGRST106"
    response = http.get("/credit_ledger", headers={"apikey": SERVICE, "Accept-Profile": "auth"})
    assert response.status_code == 406
    assert service.postgrest.schema("public").from_("credit_plans").select("id").eq("id", "free") \
        .execute().data == [{"id": "free"}]


def test_count_only_head_request(client: Callable[..., Client], database: Db) -> None:
    caller, account_id = database.new_user()
    result = client(ANON, user_token(caller)).table("credit_ledger").select("*", count="exact", head=True) \
        .execute()
    assert result.count == len(database.ledger(account_id)) == 1
