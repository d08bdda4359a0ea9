"""`./dev stripe events` and `./dev stripe replay`: operators list failed and
parked events and apply one again once its cause is fixed, against any
database URL (here the test database), and `./dev` answers for itself."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from devstack import stripe_ops
from tests.support import Db

ROOT = Path(__file__).resolve().parent.parent


def _pack_event(account_id: str, price: str) -> tuple[str, dict]:
    event_id = f"evt_{uuid.uuid4().hex}"
    payload = {"session": f"cs_{uuid.uuid4().hex}", "mode": "payment", "payment_status": "paid",
               "price_id": price, "account_id": account_id, "payment_intent": f"pi_{uuid.uuid4().hex}"}
    return event_id, payload


def test_a_failed_event_is_listed_and_applies_when_replayed_after_the_fix(
        database: Db, capsys: pytest.CaptureFixture[str]) -> None:
    _, account_id = database.new_user()
    price = f"price_ops_{uuid.uuid4().hex[:8]}"
    database.sql("insert into public.credit_packs (stripe_price_id, credits) values (%s, 1)", price)
    event_id, payload = _pack_event(account_id, price)
    payload["credits"] = 2_000_000_000  # over the limit: refused, recorded as failed
    first = database.call("handle_stripe_event", p_event_id=event_id, p_type="checkout.session.completed",
                          p_payload=payload)
    assert first["outcome"] == "failed"

    assert stripe_ops.main(["--database-url", database.dsn, "events", "--failed", "--limit", "500"]) == 0
    listed = capsys.readouterr().out
    assert event_id in listed and "invalid_argument" in listed
    assert stripe_ops.main(["--database-url", database.dsn, "events", "--parked"]) == 0
    assert event_id not in capsys.readouterr().out

    # The operator fixes the cause (here: the stored facts) and replays it.
    payload["credits"] = 20
    database.sql("update public.stripe_events set payload = %s::jsonb where event_id = %s",
                 json.dumps(payload), event_id)
    assert stripe_ops.main(["--database-url", database.dsn, "replay", event_id]) == 0
    assert f"{event_id}: applied" in capsys.readouterr().out
    assert database.balance(account_id)["purchased"] == 20
    # Replaying an applied event changes nothing.
    assert stripe_ops.main(["--database-url", database.dsn, "replay", event_id]) == 0
    assert "duplicate" in capsys.readouterr().out
    assert database.balance(account_id)["purchased"] == 20


def test_release_applies_what_is_ready(database: Db, capsys: pytest.CaptureFixture[str]) -> None:
    assert stripe_ops.main(["--database-url", database.dsn, "release"]) == 0
    assert "ready left" in capsys.readouterr().out


def test_an_unknown_event_is_said_so(database: Db) -> None:
    with pytest.raises(SystemExit, match="no recorded event"):
        stripe_ops.main(["--database-url", database.dsn, "replay", "evt_nope"])


def test_dev_prints_usage_without_installing_and_names_an_unknown_command(tmp_path: Path) -> None:
    # A copy of the script alone: no .venv next to it, so an install would show.
    script = tmp_path / "dev"
    script.write_text((ROOT / "dev").read_text())
    script.chmod(0o755)
    shown = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)  # noqa: S603
    assert shown.returncode == 0 and "./dev start" in shown.stdout
    unknown = subprocess.run([str(script), "frobnicate"],  # noqa: S603
                             capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr
    assert not (tmp_path / ".venv").exists()
