"""A local Stripe stand-in for auto top-up: localstripe, plus the little it lacks.

``python -m devstack.stripe_stand_in [--port N] [--host H]`` serves localstripe
(a stateful fake Stripe server from PyPI, pinned in requirements-dev.txt) and
prints one line, ``listening on http://<host>:<port>``, once it accepts
requests (``--port 0``, the default: a free port). Point a ``StripeClient``'s
``api`` base address (notify's ``STRIPE_API_BASE``) at it with any ``sk_…`` key.

localstripe 1.15.10 serves customers, payment methods, PaymentIntents,
charges and events as Stripe does; what auto top-up needs beyond that is
added here, with Stripe's field names and errors:

- **Prices** (``POST/GET /v1/prices``, ``GET /v1/prices/{id}``): localstripe
  has Plans only. A one-off price has ``unit_amount`` and ``currency``; a
  price created with ``custom_unit_amount`` (the customer chooses what to
  pay) or ``billing_scheme=tiered`` has ``unit_amount: null``, as on Stripe.
- **PaymentIntent list filters** ``customer`` and ``created`` (``gt``,
  ``gte``, ``lt``, ``lte``), which Stripe's list takes and localstripe
  refuses; PaymentIntents and a customer's payment methods are listed newest
  first, as Stripe lists them (localstripe: oldest first).
- **No state file**: localstripe writes its whole store to
  ``/tmp/localstripe.pickle`` after every write, one file for every process
  on the machine; this keeps the store in memory, one per process.

It does not honour ``Idempotency-Key`` (Stripe does): two requests with one
key make two objects here.

Test cards (localstripe's, as on Stripe): ``4242424242424242`` is charged;
``4000000000000341`` attaches but every charge is declined
(``card_declined``); ``4000002760003184`` needs authentication (a confirmed
PaymentIntent answers 200 with ``requires_action``; Stripe answers 402
``authentication_required`` off-session); ``4000000000000002`` is declined
when attached.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Any key of this shape is accepted (localstripe checks the prefix only).
API_KEY = "sk_test_local_stand_in"
START_TIMEOUT_SECONDS = 30.0


def _install() -> Any:
    """localstripe's app, with prices, PaymentIntent filters and no state file."""
    from localstripe import resources, server
    from localstripe.errors import UserError

    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]

    def as_int(value: Any) -> Any:
        return resources.try_convert_to_int(value)

    class Price(resources.StripeObject):  # type: ignore[misc]
        object = "price"
        _id_prefix = "price_"

        def __init__(self, currency: Any = None, unit_amount: Any = None, product: Any = None,
                     product_data: Any = None, nickname: Any = None, metadata: Any = None,
                     active: Any = True, custom_unit_amount: Any = None, billing_scheme: Any = "per_unit",
                     tiers: Any = None, tiers_mode: Any = None, recurring: Any = None,
                     lookup_key: Any = None, tax_behavior: Any = None, **kwargs: Any) -> None:
            if kwargs:
                raise UserError(400, "Received unknown parameter: " + ", ".join(kwargs))
            unit_amount = as_int(unit_amount)
            active = resources.try_convert_to_bool(active)
            try:
                assert isinstance(currency, str) and currency
                assert isinstance(active, bool)
                assert billing_scheme in ("per_unit", "tiered")
                assert product is None or isinstance(product, str)
                assert product_data is None or isinstance(product_data, dict)
                assert (product is None) != (product_data is None)
                if custom_unit_amount is not None or billing_scheme == "tiered":
                    assert unit_amount is None
                else:
                    assert isinstance(unit_amount, int) and unit_amount >= 0
            except AssertionError:
                raise UserError(400, "Bad request") from None
            if isinstance(product, str):
                resources.Product._api_retrieve(product)  # 404 if there is none
            else:
                product = resources.Product(**product_data).id
            super().__init__()
            self.active = active
            self.currency = currency.lower()
            self.unit_amount = unit_amount
            self.unit_amount_decimal = None if unit_amount is None else str(unit_amount)
            self.custom_unit_amount = custom_unit_amount
            self.billing_scheme = billing_scheme
            self.tiers_mode = tiers_mode
            self.product = product
            self.nickname = nickname
            self.lookup_key = lookup_key
            self.tax_behavior = tax_behavior or "unspecified"
            self.recurring = recurring
            self.type = "recurring" if recurring else "one_time"
            self.metadata = metadata or {}

    list_payment_intents = resources.PaymentIntent._api_list_all.__func__

    def payment_intents(cls: Any, url: str, customer: Any = None, created: Any = None, limit: Any = None,
                        starting_after: Any = None, **kwargs: Any) -> Any:
        checks = []
        try:
            if customer is not None:
                assert isinstance(customer, str) and customer.startswith("cus_")
                checks.append(lambda pi: pi.customer == customer)
            if created is not None:
                if not isinstance(created, dict):
                    created = {"eq": created}
                for op, raw in created.items():
                    bound = as_int(raw)
                    assert op in ("gt", "gte", "lt", "lte", "eq") and isinstance(bound, int)
                    checks.append({"gt": lambda pi, b=bound: pi.created > b,
                                   "gte": lambda pi, b=bound: pi.created >= b,
                                   "lt": lambda pi, b=bound: pi.created < b,
                                   "lte": lambda pi, b=bound: pi.created <= b,
                                   "eq": lambda pi, b=bound: pi.created == b}[op])
        except AssertionError:
            raise UserError(400, "Bad request") from None
        found = list_payment_intents(cls, url, limit=limit, starting_after=None, **kwargs)
        # Newest first, as Stripe lists; paging by starting_after over that order.
        found._list = [pi for pi in reversed(found._list) if all(check(pi) for check in checks)]
        found._starting_after = starting_after
        return found

    resources.PaymentIntent._api_list_all = classmethod(payment_intents)  # type: ignore[method-assign]

    list_payment_methods = resources.PaymentMethod._api_list_all.__func__

    def payment_methods(cls: Any, url: str, starting_after: Any = None, **kwargs: Any) -> Any:
        found = list_payment_methods(cls, url, starting_after=None, **kwargs)
        found._list = list(reversed(found._list))  # newest first, as Stripe lists
        found._starting_after = starting_after
        return found

    resources.PaymentMethod._api_list_all = classmethod(payment_methods)  # type: ignore[method-assign]
    for method, url, make in (("POST", "/v1/prices", server.api_create),
                              ("GET", "/v1/prices/{id}", server.api_retrieve),
                              ("GET", "/v1/prices", server.api_list_all)):
        server.app.router.add_route(method, url, make(Price, url))
    return server.app


def serve(host: str, port: int) -> None:
    from aiohttp import web

    app = _install()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))

    async def announce(_app: Any) -> None:
        bound_host, bound_port = sock.getsockname()[:2]
        print(f"listening on http://{bound_host}:{bound_port}", flush=True)

    app.on_startup.append(announce)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


# --- running it as a process of its own (tests, ./dev start --stripe-stand-in, ./dev demo) ---------------


class StandInError(RuntimeError):
    """The stand-in did not start (the message says why, with the end of its output)."""


@dataclass(frozen=True)
class StandIn:
    """A running stand-in: its base URL (``STRIPE_API_BASE``), a key it accepts, its process id."""

    url: str
    api_key: str
    pid: int


def available() -> bool:
    """True when localstripe is installed (requirements-dev.txt) for this Python."""
    import importlib.util

    return importlib.util.find_spec("localstripe") is not None


def _answers(url: str, api_key: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/v1/balance", headers={"Authorization": f"Bearer {api_key}"},
                         timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running(*, python: str = sys.executable, timeout: float = START_TIMEOUT_SECONDS,
            api_key: str = API_KEY) -> Iterator[StandIn]:
    """Start the stand-in on a free port, wait until it answers, and stop it when the block ends."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            [python, "-m", "devstack.stripe_stand_in", "--port", "0"],
            stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            url = _wait_until_up(process, errors, timeout, api_key)
            yield StandIn(url=url, api_key=api_key, pid=process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def _wait_until_up(process: subprocess.Popen[bytes], errors: Any, timeout: float, api_key: str) -> str:
    def failed(why: str) -> StandInError:
        errors.seek(0)
        tail = errors.read()[-2000:].decode(errors="replace").strip()
        return StandInError(f"the Stripe stand-in (localstripe) {why}" + (f":\n{tail}" if tail else ""))

    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().decode(errors="replace").strip() if ready else ""
    if not line.startswith("listening on "):
        raise failed("did not start" if process.poll() is not None else f"did not start within {timeout:g} s")
    url = line.removeprefix("listening on ")
    while not _answers(url, api_key):
        if process.poll() is not None:
            raise failed("stopped")
        if time.monotonic() > deadline:
            raise failed(f"did not answer within {timeout:g} s")
        time.sleep(0.05)
    return url


def register_webhook(stand_in: StandIn, url: str, secret: str, events: Sequence[str] | None = None,
                     name: str = "credits") -> None:
    """Have the stand-in POST its events to ``url``, signed with ``secret`` as Stripe signs them
    (about a second after each change, like Stripe's own delay)."""
    import httpx

    data: dict[str, str | list[str]] = {"url": url, "secret": secret}
    if events is not None:
        data["events[]"] = list(events)
    httpx.post(f"{stand_in.url}/_config/webhooks/{name}", data=data, timeout=5).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.stripe_stand_in",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
