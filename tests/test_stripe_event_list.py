"""The event types docs/stripe.md tells operators to subscribe to are exactly the
ones the database's dispatcher (``private.stripe_apply``) acts on: a type
missing from the docs is never delivered, a documented type the dispatcher
does not know is recorded as ignored."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from tests.support import Db

DOC = Path(__file__).resolve().parents[1] / "docs" / "stripe.md"


def documented_types() -> set[str]:
    text = DOC.read_text()
    block = text.split("<!-- stripe-event-types -->", 1)[1].split("<!-- /stripe-event-types -->", 1)[0]
    return set(re.findall(r"^\s*- `([a-z_.]+)`\s*$", block, flags=re.M))


def dispatched_types(database: Db) -> set[str]:
    body = database.one("select pg_get_functiondef('private.stripe_apply(text, jsonb)'::regprocedure)")
    types: set[str] = set()
    for when in re.findall(r"^\s*when ((?:'[a-z_.]+'(?:,\s*)?)+) then", body, flags=re.M):
        types.update(re.findall(r"'([a-z_.]+)'", when))
    return types


def test_the_documented_event_types_are_the_dispatched_ones(database: Db) -> None:
    documented, dispatched = documented_types(), dispatched_types(database)
    assert len(dispatched) >= 10  # the parse found the dispatcher's branches
    assert documented == dispatched, {"undocumented": dispatched - documented,
                                      "not handled": documented - dispatched}


def test_a_type_outside_the_list_is_recorded_as_ignored(database: Db) -> None:
    assert "customer.created" not in dispatched_types(database)
    result = database.call("handle_stripe_event", p_event_id=f"evt_{uuid.uuid4().hex}",
                           p_type="customer.created", p_payload={"customer": f"cus_{uuid.uuid4().hex}"})
    assert (result["outcome"], result["reason"]) == ("ignored", "unhandled_type")
