"""Input limits: one set of numbers in SQL (``private.limits()``), the same in
the HTTP layer (``functions/limits.py``), enforced by every function, and what a
refused call leaves untouched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from functions import limits
from tests.support import Db, expect_error, new_key, snapshot


def test_the_http_layer_uses_the_databases_limits(database: Db) -> None:
    assert database.one("select private.limits()") == limits.ALL


def test_metadata_is_measured_as_the_database_measures_it(database: Db) -> None:
    for value in ({}, {"a": 1}, {"nested": {"list": [1, "two", None, True]}, "ü": "ß"}):
        assert limits.metadata_bytes(value) == database.one("select octet_length(%s::jsonb::text)",
                                                             json.dumps(value))


def big_metadata(size: int) -> dict[str, str]:
    return {"x": "a" * (size - len('{"x": ""}'))}


@pytest.mark.parametrize(("fn", "args", "argument"), [
    ("deduct_credits", {"p_amount": 1, "p_model": "m" * (limits.MODEL + 1)}, "p_model"),
    ("deduct_credits", {"p_amount": 1, "p_model": ""}, "p_model"),
    ("deduct_credits", {"p_operation": "o" * (limits.OPERATION + 1)}, "p_operation"),
    ("deduct_credits", {"p_amount": 1, "p_metadata": big_metadata(limits.METADATA_BYTES + 1)}, "p_metadata"),
    ("deduct_credits", {"p_amount": 1, "p_input_tokens": -1}, "p_input_tokens"),
    ("reserve_credits", {"p_amount": 1, "p_metadata": big_metadata(limits.METADATA_BYTES + 1)}, "p_metadata"),
    ("reserve_credits", {"p_amount": 1, "p_ttl_seconds": limits.TTL_SECONDS + 1}, "p_ttl_seconds"),
])
def test_over_limit_spends_are_refused_and_change_nothing(database: Db, fn: str, args: dict[str, Any],
                                                          argument: str) -> None:
    caller, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", fn, caller, p_account_id=account_id,
                          p_idempotency_key=new_key(), **args)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_the_largest_allowed_inputs_are_accepted(database: Db) -> None:
    caller, account_id = database.new_user()
    result = database.call("deduct_credits", caller, p_account_id=account_id,
                           p_idempotency_key="k" * limits.IDEMPOTENCY_KEY, p_amount=1,
                           p_model="m" * limits.MODEL, p_metadata=big_metadata(limits.METADATA_BYTES))
    assert result["charged"] == 1


def test_metadata_merged_on_capture_is_bounded_too(database: Db) -> None:
    caller, account_id = database.new_user()
    half = big_metadata(limits.METADATA_BYTES // 2 + 100)
    hold = database.call("reserve_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                         p_amount=1, p_metadata=half)
    before = snapshot(database, account_id)
    other = {"y": half["x"]}
    detail = expect_error(database.call, "22023", "invalid_argument", "capture_hold", caller,
                          p_hold_id=hold["hold_id"], p_metadata=other)
    assert detail["argument"].startswith("p_metadata")
    assert snapshot(database, account_id) == before
    assert database.call("capture_hold", caller, p_hold_id=hold["hold_id"])["charged"] == 1


@pytest.mark.parametrize(("fn", "args", "argument"), [
    ("add_purchased_credits", {"p_amount": 1, "p_description": "d" * (limits.DESCRIPTION + 1)},
     "p_description"),
    ("add_purchased_credits", {"p_amount": 1, "p_stripe_ref": "r" * (limits.STRIPE_REF + 1)}, "p_stripe_ref"),
    ("grant_promotional_credits", {"p_amount": 1, "p_expires_at": "2999-01-01T00:00:00Z",
                                   "p_reason": "r" * (limits.REASON + 1)}, "p_reason"),
    ("admin_adjust_credits", {"p_amount": 1, "p_pool": "purchased", "p_reason": "r" * (limits.REASON + 1)},
     "p_reason"),
])
def test_over_limit_service_text_is_refused(database: Db, fn: str, args: dict[str, Any],
                                            argument: str) -> None:
    _, account_id = database.new_user()
    before = snapshot(database, account_id)
    detail = expect_error(database.call, "22023", "invalid_argument", fn, p_account_id=account_id,
                          p_idempotency_key=new_key(), **args)
    assert detail["argument"] == argument
    assert snapshot(database, account_id) == before


def test_refund_reason_and_key_name_are_bounded(database: Db) -> None:
    caller, account_id = database.new_user()
    spend = database.call("deduct_credits", caller, p_account_id=account_id, p_idempotency_key=new_key(),
                          p_amount=1)
    detail = expect_error(database.call, "22023", "invalid_argument", "refund_credits",
                          p_transaction_id=spend["transaction_id"], p_idempotency_key=new_key(),
                          p_reason="r" * (limits.REASON + 1))
    assert detail["argument"] == "p_reason"
    detail = expect_error(database.call, "22023", "invalid_argument", "create_license_key", caller,
                          p_account_id=account_id, p_name="n" * (limits.KEY_NAME + 1))
    assert detail["argument"] == "p_name"
