"""License keys: create_license_key (shown once, only a hash stored) and revoke_license_key."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

import psycopg
import pytest

from tests.support import Caller, Db, expect_error, new_key, select_as, snapshot


def create(database: Db, caller: Caller, account_id: str, name: str | None = "build server",
           expires_at: str | None = None) -> dict:
    return database.call("create_license_key", caller, p_account_id=account_id, p_name=name,
                         p_expires_at=expires_at)


def spend_with(database: Db, key: str, amount: int = 1) -> dict:
    return database.call("deduct_credits_by_license", p_license_key=key, p_idempotency_key=new_key(),
                         p_amount=amount)


def test_create_shows_the_key_once_and_stores_only_its_hash(database: Db) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    result = create(database, caller, account_id)
    assert set(result) == {"key_id", "key", "prefix", "expires_at"}
    key = result["key"]
    assert key.startswith("ck_") and len(key) >= 32
    assert result["prefix"] == key[:11]
    assert result["expires_at"] is None

    row = database.one("select account_id, name, prefix, key_hash, created_by, revoked_at "
                       "from public.credit_license_keys where id = %s", result["key_id"])
    assert row[:3] == (uuid.UUID(account_id), "build server", key[:11])
    assert bytes(row[3]) == hashlib.sha256(key.encode()).digest()
    assert (row[4], row[5]) == (uuid.UUID(caller.user_id), None)
    # The secret part of the key is nowhere in the table.
    assert database.one("select count(*) from public.credit_license_keys k "
                        "where to_jsonb(k)::text like %s", f"%{key[11:]}%") == 0
    # Keys are not money: nothing else changed.
    assert snapshot(database, account_id) == before
    assert spend_with(database, key)["account_id"] == account_id


def test_every_key_is_new_and_works_on_its_own(database: Db) -> None:
    caller, account_id = database.new_user()
    created = [create(database, caller, account_id, f"key {i}") for i in range(3)]
    assert len({c["key"] for c in created}) == 3
    assert len({c["key_id"] for c in created}) == 3
    for item in created:
        assert spend_with(database, item["key"])["account_id"] == account_id
    assert database.balance(account_id)["total"] == 0


def test_the_owner_lists_keys_but_never_reads_a_hash(database: Db) -> None:
    caller, account_id = database.new_user()
    result = create(database, caller, account_id)
    rows = select_as(database, caller, "select id, name, prefix, revoked_at from public.credit_license_keys")
    assert [(str(r["id"]), r["name"], r["prefix"], r["revoked_at"]) for r in rows] == [
        (result["key_id"], "build server", result["prefix"], None)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        select_as(database, caller, "select key_hash from public.credit_license_keys")


def test_a_tenant_admin_creates_keys_for_the_tenant(database: Db) -> None:
    admin, _ = database.new_user()
    _, account_id = database.new_tenant({admin.user_id: "admin"})
    key = create(database, admin, account_id)["key"]
    assert spend_with(database, key, 2)["balance"]["total"] == 1
    assert database.balance(account_id)["total"] == 1


def test_service_creates_keys_with_an_expiry(database: Db) -> None:
    _, account_id = database.new_user()
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).replace(microsecond=0)
    result = create(database, Caller.service(), account_id, "ci", expires.isoformat())
    assert dt.datetime.fromisoformat(result["expires_at"]) == expires
    assert database.one("select created_by, expires_at from public.credit_license_keys where id = %s",
                        result["key_id"]) == (None, expires)


@pytest.mark.parametrize(("name", "expires_at", "argument"), [
    ("", None, "p_name"),
    ("   ", None, "p_name"),
    (None, None, "p_name"),
    ("n" * 101, None, "p_name"),
    ("ok", "2000-01-01T00:00:00Z", "p_expires_at"),
])
def test_create_rejects_invalid_arguments(database: Db, name: str | None, expires_at: str | None,
                                          argument: str) -> None:
    caller, account_id = database.new_user()
    detail = expect_error(create, "22023", "invalid_argument", database, caller, account_id, name, expires_at)
    assert detail["argument"] == argument
    assert database.one("select count(*) from public.credit_license_keys where account_id = %s",
                        account_id) == 0


def test_create_name_limit_and_unknown_account(database: Db) -> None:
    caller, account_id = database.new_user()
    assert create(database, caller, account_id, "n" * 100)["key"]
    expect_error(create, "PT404", "account_not_found", database, Caller.service(), str(uuid.uuid4()))
    detail = expect_error(create, "22023", "invalid_argument", database, Caller.service(), None)
    assert detail["argument"] == "p_account_id"


def test_revoke_stops_the_key_and_is_idempotent(database: Db) -> None:
    caller, account_id = database.new_user()
    doomed = create(database, caller, account_id, "doomed")
    kept = create(database, caller, account_id, "kept")
    result = database.call("revoke_license_key", caller, p_key_id=doomed["key_id"])
    assert set(result) == {"key_id", "revoked_at"}
    assert result["key_id"] == doomed["key_id"]
    revoked_at = dt.datetime.fromisoformat(result["revoked_at"])
    assert abs((dt.datetime.now(dt.UTC) - revoked_at).total_seconds()) < 60
    # Twice: the first revocation time stands.
    assert database.call("revoke_license_key", Caller.service(), p_key_id=doomed["key_id"]) == result

    before = snapshot(database, account_id)
    expect_error(spend_with, "PT403", "license_key_inactive", database, doomed["key"])
    assert snapshot(database, account_id) == before
    assert spend_with(database, kept["key"])["balance"]["total"] == 2
    assert database.one("select revoked_at from public.credit_license_keys where id = %s",
                        kept["key_id"]) is None


def test_revoke_of_an_unknown_key(database: Db) -> None:
    caller, _ = database.new_user()
    expect_error(database.call, "PT403", "invalid_license_key", "revoke_license_key", caller,
                 p_key_id=str(uuid.uuid4()))
    expect_error(database.call, "PT403", "invalid_license_key", "revoke_license_key", Caller.service(),
                 p_key_id=str(uuid.uuid4()))
