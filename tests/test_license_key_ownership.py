"""License keys belong to the account, not to the person who created them.

A tenant admin creates a key for the tenant's account; demoting, removing or
deleting that person revokes nothing: the key keeps spending through the
credits API until an owner or admin of the account revokes it. Owners see who
created each key (``created_by``) to decide. Everything goes over HTTP: the
local REST endpoint as the users, the credits API (its Lambda handler) as the
server holding the key.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from devstack import tokens
from tests.lambda_events import LambdaContext, cold_start, http_event, response_json
from tests.support import Db


@pytest.fixture(scope="module")
def deduct_handler(rest_url: str) -> Iterator[Callable[..., dict[str, Any]]]:
    env = {"SUPABASE_URL": rest_url, "SUPABASE_PUBLISHABLE_KEY": tokens.publishable_key(),
           "SUPABASE_SECRET_KEY": tokens.secret_key(), "CORS_ALLOW_ORIGINS": "http://localhost:3000"}
    with cold_start("handlers.deduct", env) as handler:
        yield handler


def test_a_key_outlives_its_creators_role(rest_url: str, database: Db,
                                          deduct_handler: Callable[..., dict[str, Any]]) -> None:
    owner, _ = database.new_user()
    creator, _ = database.new_user()
    assert owner.user_id and creator.user_id
    tenant_id, account_id = database.new_tenant({owner.user_id: "owner", creator.user_id: "admin"})
    database.fund(account_id, purchased=10)
    total = database.balance(account_id)["total"]

    def as_user(user_id: str) -> httpx.Client:
        return httpx.Client(base_url=f"{rest_url}/rest/v1", timeout=10, headers={
            "apikey": tokens.publishable_key(), "Authorization": f"Bearer {tokens.user_token(user_id)}"})

    def spend(key: str) -> tuple[int, Any]:
        event = http_event("POST", "/credits/deduct", body={"amount": 1},
                           headers={"x-license-key": key, "idempotency-key": str(uuid.uuid4())})
        reply = deduct_handler(event, LambdaContext())
        return reply["statusCode"], response_json(reply)

    def keys_seen_by(user_id: str) -> list[dict[str, Any]]:
        with as_user(user_id) as client:
            reply = client.get("/credit_license_keys", params={"account_id": f"eq.{account_id}",
                                                               "select": "id,name,created_by,revoked_at"})
        assert reply.status_code == 200, reply.text
        rows: list[dict[str, Any]] = reply.json()
        return rows

    with as_user(creator.user_id) as client:
        created = client.post("/rpc/create_license_key", json={"p_account_id": account_id,
                                                                "p_name": "build server"})
    assert created.status_code == 200, created.text
    key, key_id = created.json()["key"], created.json()["key_id"]
    assert spend(key)[0] == 200

    # Demoted to member: the key still spends; the member may no longer manage keys.
    database.sql("update public.tenant_members set role = 'member' where tenant_id = %s and user_id = %s",
                 tenant_id, creator.user_id)
    assert spend(key)[0] == 200
    with as_user(creator.user_id) as client:
        revoke = client.post("/rpc/revoke_license_key", json={"p_key_id": key_id})
        another = client.post("/rpc/create_license_key", json={"p_account_id": account_id, "p_name": "x"})
    assert revoke.status_code == 403 and another.status_code == 403
    # The owner sees who created the key.
    assert keys_seen_by(owner.user_id) == [{"id": key_id, "name": "build server",
                                            "created_by": creator.user_id, "revoked_at": None}]

    # Removed from the tenant, then deleted as a user: still the account's key.
    database.sql("delete from public.tenant_members where tenant_id = %s and user_id = %s",
                 tenant_id, creator.user_id)
    assert keys_seen_by(creator.user_id) == []  # no longer a reader of the account
    assert spend(key)[0] == 200
    database.sql("delete from auth.users where id = %s", creator.user_id)
    assert spend(key)[0] == 200
    assert keys_seen_by(owner.user_id)[0]["created_by"] == creator.user_id
    assert database.balance(account_id)["total"] == total - 4

    # Only a revocation by someone who manages the account stops it.
    with as_user(owner.user_id) as client:
        assert client.post("/rpc/revoke_license_key", json={"p_key_id": key_id}).status_code == 200
    status, body = spend(key)
    assert (status, body["error"]) == (403, "license_key_inactive")
    assert database.balance(account_id)["total"] == total - 4
