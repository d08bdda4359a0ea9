"""notify: sweep what lapsed, charge auto top-ups, then deliver credit events to a webhook, signed.

One run (the Lambda runs every minute; runs may overlap):

1. ``sweep_credit_accounts``: writes what lapsed (expired holds and grants) on
   accounts nobody wrote to, with the events and broadcasts that go with it.
2. ``roll_up_credit_usage``, when the database has it (once per run).
3. Auto top-ups (``functions.topup``): claim the pending ones (a lapse the
   sweep wrote may have started one), charge each on Stripe, record its
   outcome, while the run's time allows; before the deliveries, so the
   outcome events go out in this run.
4. Without ``NOTIFY_WEBHOOK_URL``, nothing more: events stay pending and readable.
   With it, claim -> deliver -> record, until nothing is claimed or the
   Lambda's remaining time is short. ``claim_credit_events`` hands out at most
   one event per account (its lowest ``seq`` still pending, once due and not
   leased to another run), leased to this run; so events of one account go out
   in order, one at a time, and two runs never hold the same event. Events of
   different accounts are delivered concurrently by a small thread pool with
   short timeouts, and a new claim is made whenever a slot frees, so a slow or
   failing receiver for one account holds one slot, never the others.

Each event is ``POST``-ed as compact JSON with sorted keys
(``{account_id, created_at, event_id, payload, seq, type}``) with
``Credits-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
keyed with ``NOTIFY_SIGNING_SECRET``. A 2xx answer is a delivery; anything
else, a timeout or a connection error is a failed attempt, recorded with a
short reason (never the URL, its query string or the secret); the database
schedules the retry with backoff and gives up after 72 hours (docs/events.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from postgrest import APIError

from functions import topup
from functions.errors import ServiceUnavailable, from_database_error
from functions.observability import count, logger
from functions.rpc import get_rpc
from functions.settings import FunctionSettings, NotifySettings, SettingsSource

SIGNATURE_HEADER = "Credits-Signature"
# What a receiver gets of an event: its identity, order, type, payload and time (not its delivery state).
EVENT_FIELDS = ("event_id", "account_id", "seq", "type", "payload", "created_at")
USER_AGENT = "credits-notify/1"
SWEEP_LIMIT = 1000
# A sweep that fills its batch is called again, at most this many times per run.
MAX_SWEEPS = 10
ROLL_UP = "roll_up_credit_usage"
# Once no new claim is made, in-flight deliveries are awaited while at least this much time is left.
FINAL_WAIT_MARGIN_MS = 2_000
# Codes the REST layer answers for a function the database does not have.
_FUNCTION_MISSING = {"PGRST202", "404"}


class Database(Protocol):
    """The service-role calls notify makes."""

    def call(self, fn: str, params: Mapping[str, Any] | None = None) -> Any: ...

    def call_if_present(self, fn: str, params: Mapping[str, Any] | None = None) -> tuple[bool, Any]:
        """(False, None) when the database has no function ``fn``; else (True, its result)."""
        ...


class RpcDatabase:
    """``Database`` through the shared supabase-py layer (``functions.rpc``)."""

    def __init__(self, settings: FunctionSettings | SettingsSource[FunctionSettings]) -> None:
        self._settings = settings

    def call(self, fn: str, params: Mapping[str, Any] | None = None) -> Any:
        return get_rpc(self._settings).service(fn, params)

    def call_if_present(self, fn: str, params: Mapping[str, Any] | None = None) -> tuple[bool, Any]:
        client = get_rpc(self._settings).clients().service
        try:
            return True, client.rpc(fn, dict(params or {})).execute().data
        except APIError as exc:
            if (exc.code or "") in _FUNCTION_MISSING:
                return False, None
            raise from_database_error(exc.code, exc.message, exc.details) from None
        except httpx.TimeoutException:
            raise ServiceUnavailable("the database did not answer in time, retry later") from None
        except httpx.TransportError:
            raise ServiceUnavailable() from None


# --- the signed body ------------------------------------------------------------------


def event_body(event: Mapping[str, Any]) -> bytes:
    """What is POSTed: the event's public fields as compact JSON with sorted keys (UTF-8)."""
    document = {name: event.get(name) for name in EVENT_FIELDS}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(body: bytes, secret: str, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with ``secret``."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Credits-Signature`` header's value: ``t=<unix time>,v1=<signature>``."""
    return f"t={timestamp},v1={signature(body, secret, timestamp)}"


def redacted_url(url: str) -> str:
    """``scheme://host[:port]/path``: the URL without credentials, query or fragment (for logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- delivery -------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """What one attempt to deliver one event came to."""

    event_id: str
    account_id: str
    seq: int
    delivered: bool
    error: str | None = None  # why it failed: "HTTP 500", "timeout (ReadTimeout)", ...


def failure_reason(exc: Exception) -> str:
    """A failed request in a few words: the exception's kind, never its text (which may name the URL)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return f"connection error ({type(exc).__name__})"
    return f"request failed ({type(exc).__name__})"


class Sender:
    """POSTs events to the webhook, signed, over one connection pool sized for the thread pool."""

    def __init__(self, url: str, secret: str, *, connect_timeout: float, timeout: float, concurrency: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._secret = secret
        self._clock = clock
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=timeout),
            follow_redirects=False,  # a redirect is not a delivery: fix the URL instead
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self._http.close()

    def deliver(self, event: Mapping[str, Any]) -> Delivery:
        body = event_body(event)
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: signature_header(body, self._secret, int(self._clock()))}
        identity = (str(event.get("event_id")), str(event.get("account_id")), int(event.get("seq") or 0))
        try:
            # Streamed so the answer's body is never read: its status is all that counts.
            with self._http.stream("POST", self.url, content=body, headers=headers) as response:
                status = response.status_code
        except Exception as exc:  # any failure of the request is a failed attempt, recorded
            return Delivery(*identity, delivered=False, error=failure_reason(exc))
        if 200 <= status < 300:
            return Delivery(*identity, delivered=True)
        return Delivery(*identity, delivered=False, error=f"HTTP {status}")


def sender_for(settings: NotifySettings) -> Sender | None:
    """A sender for one run (closed by the caller), or None when no webhook URL is set."""
    if settings.notify_webhook_url is None or settings.notify_signing_secret is None:
        return None
    return Sender(settings.notify_webhook_url, settings.notify_signing_secret,
                  connect_timeout=settings.notify_connect_timeout_seconds,
                  timeout=settings.notify_timeout_seconds, concurrency=settings.notify_concurrency)


# --- one run --------------------------------------------------------------------------


@dataclass
class Summary:
    swept: int = 0
    rolled_up: bool = False
    sending: bool = False
    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    unrecorded: int = 0  # delivered or failed, but the record did not reach the database (the lease expires)
    done: bool = True    # False: stopped for time with events (or top-ups) possibly left
    topups: topup.Tally = field(default_factory=topup.Tally)

    def as_dict(self) -> dict[str, Any]:
        return {"swept": self.swept, "rolled_up": self.rolled_up, "sending": self.sending,
                "claimed": self.claimed, "delivered": self.delivered, "failed": self.failed,
                "unrecorded": self.unrecorded, "done": self.done,
                "topups_claimed": self.topups.claimed, "topups_succeeded": self.topups.succeeded,
                "topups_failed": self.topups.failed, "topups_action_required": self.topups.action_required,
                "topups_retried": self.topups.retried, "topups_unrecorded": self.topups.unrecorded}


_roll_up_missing_logged = False


def sweep(db: Database, summary: Summary) -> None:
    for _ in range(MAX_SWEEPS):
        out = db.call("sweep_credit_accounts", {"p_limit": SWEEP_LIMIT})
        swept = int((out or {}).get("swept") or 0)
        summary.swept += swept
        if swept < SWEEP_LIMIT:
            return


def roll_up(db: Database, summary: Summary) -> None:
    global _roll_up_missing_logged
    present, _ = db.call_if_present(ROLL_UP)
    summary.rolled_up = present
    if not present and not _roll_up_missing_logged:
        _roll_up_missing_logged = True
        logger.info("the database has no usage roll-up; skipped", extra={"function": ROLL_UP})


def _deliver_and_record(db: Database, sender: Sender, event: Mapping[str, Any]) -> tuple[Delivery, bool]:
    """Deliver one event and record the outcome; (the delivery, whether the record reached the database)."""
    delivery = sender.deliver(event)
    params: dict[str, Any] = {"p_event_id": delivery.event_id, "p_delivered": delivery.delivered}
    if delivery.error is not None:
        params["p_error"] = delivery.error
    try:
        db.call("record_credit_event_delivery", params)
    except Exception as exc:  # the lease runs out and the event is claimed again: delivered at least once
        logger.error("delivery outcome not recorded", extra={"event_id": delivery.event_id,
                                                             "error_type": type(exc).__name__})
        return delivery, False
    return delivery, True


def deliver_events(db: Database, sender: Sender, settings: NotifySettings, remaining_ms: Callable[[], int],
                   summary: Summary) -> None:
    """Claim, deliver and record until nothing is claimed or time is short.

    A claim asks for as many events as there are free slots; each finished
    delivery frees one, and the next claim may return that account's next event.
    """
    slots = settings.notify_concurrency
    in_flight: dict[Future[tuple[Delivery, bool]], Mapping[str, Any]] = {}
    executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="notify")
    claiming = True
    try:
        while True:
            if claiming and remaining_ms() < settings.notify_safety_margin_ms:
                logger.warning("notify stopping before the time limit",
                               extra={"remaining_ms": remaining_ms(), "in_flight": len(in_flight)})
                claiming, summary.done = False, False
            if claiming and len(in_flight) < slots:
                events = list(db.call("claim_credit_events", {
                    "p_limit": min(settings.notify_batch_size, slots - len(in_flight)),
                    "p_lease_seconds": settings.notify_lease_seconds}) or [])
                summary.claimed += len(events)
                for event in events:
                    in_flight[executor.submit(_deliver_and_record, db, sender, event)] = event
            if not in_flight:
                return  # nothing due and nothing in flight (or no time for more)
            wait_s = (remaining_ms() - FINAL_WAIT_MARGIN_MS) / 1000
            finished, _ = wait(in_flight, timeout=max(0.0, wait_s), return_when=FIRST_COMPLETED)
            for future in finished:
                _tally(future, in_flight.pop(future), summary)
            if not finished and remaining_ms() <= FINAL_WAIT_MARGIN_MS:
                # Their leases run out and a later run delivers them (at least once).
                logger.warning("notify left deliveries unfinished at the time limit",
                               extra={"in_flight": len(in_flight)})
                summary.done = False
                return
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _tally(future: Future[tuple[Delivery, bool]], event: Mapping[str, Any], summary: Summary) -> None:
    try:
        delivery, recorded = future.result()
    except Exception as exc:  # never expected: a failed delivery is a result, not an exception
        logger.error("delivery crashed", extra={"event_id": str(event.get("event_id")),
                                                "error_type": type(exc).__name__})
        summary.unrecorded += 1
        return
    if not recorded:
        summary.unrecorded += 1
    if delivery.delivered:
        summary.delivered += 1
        return
    summary.failed += 1
    logger.warning("event not delivered", extra={
        "event_id": delivery.event_id, "account_id": delivery.account_id, "seq": delivery.seq,
        "type": str(event.get("type")), "attempt": int(event.get("attempts") or 0) + 1,
        "error": delivery.error})


def run_notify(db: Database, settings: NotifySettings, *, remaining_ms: Callable[[], int],
               sender: Sender | None = None) -> dict[str, Any]:
    """One notify run: sweep, roll up, settle auto top-ups, then deliver while there is time.
    Returns its summary."""
    summary = Summary()
    sweep(db, summary)
    roll_up(db, summary)
    summary.topups = topup.run_topups(db, settings, remaining_ms)
    summary.done = summary.topups.done
    own = sender is None
    sender = sender_for(settings) if own else sender
    summary.sending = sender is not None
    if sender is not None:
        try:
            deliver_events(db, sender, settings, remaining_ms, summary)
        finally:
            if own:
                sender.close()
    return summary.as_dict()


def emit(summary: Mapping[str, Any], settings: NotifySettings) -> None:
    """One summary log line and the run's metrics."""
    where = redacted_url(settings.notify_webhook_url) if settings.notify_webhook_url else None
    logger.info("notify", extra={"summary": dict(summary), "webhook": where,
                                 "stripe": redacted_url(settings.stripe_api_base)})
    count("NotifySwept", summary["swept"])
    count("NotifyClaimed", summary["claimed"])
    count("NotifyDelivered", summary["delivered"])
    count("NotifyFailed", summary["failed"])
    count("NotifyUnrecorded", summary["unrecorded"])
    count("NotifyIncomplete", 0 if summary["done"] else 1)
    count("TopupClaimed", summary["topups_claimed"])
    count("TopupSucceeded", summary["topups_succeeded"])
    count("TopupFailed", summary["topups_failed"])
    count("TopupActionRequired", summary["topups_action_required"])
    count("TopupRetried", summary["topups_retried"])
    count("TopupUnrecorded", summary["topups_unrecorded"])


def time_left(limit_ms: int) -> Callable[[], int]:
    """A ``remaining_ms`` clock for runs outside Lambda (the local stack): ``limit_ms`` from now."""
    started = time.monotonic()
    return lambda: max(0, int(limit_ms - (time.monotonic() - started) * 1000))
