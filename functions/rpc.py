"""The supabase-py layer: contract functions and ledger reads through the REST endpoint.

The functions use supabase-py's PostgREST client (the ``postgrest`` package of
supabase-py, which ``supabase.Client.rpc`` and ``.table`` delegate to), built
with the same headers ``create_client`` sets: ``apikey`` and
``Authorization: Bearer <key>``. The full ``Client`` would also build the auth,
storage, realtime and edge-function clients, which no function uses and which
cost ~80 ms of every cold start (docs/benchmarks.md).

One HTTP connection pool per cold start and one or two PostgREST clients per
value of the keys (rebuilt when a rotated key is read): the service client
(secret key) and, for the credits API, the public one (publishable key as
``apikey``). A user's call goes through a per-request client derived from
the public one with ``schema()`` (it copies the headers and shares the pool),
then ``auth(token)`` sets *that copy's* Authorization header, so tokens never
leak between overlapping requests. Every failure is mapped by ``functions.errors``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from postgrest import APIError, SyncPostgrestClient

from functions.errors import ApiError, ServiceUnavailable, from_database_error
from functions.observability import logger
from functions.settings import CreditsApiSettings, FunctionSettings, SettingsSource, settings_source

# Filter operators the ledger read may use (PostgREST names).
_OPERATORS = {"eq", "neq", "lt", "lte", "gt", "gte"}


def _client(settings: FunctionSettings, key: str, http: httpx.Client) -> SyncPostgrestClient:
    return SyncPostgrestClient(
        f"{settings.supabase_url}/rest/v1",
        headers={"apikey": key, "Authorization": f"Bearer {key}"},
        http_client=http,
        retry_enabled=False,  # a retry is the caller's decision (idempotency keys make it safe)
    )


class Clients:
    """The PostgREST clients of one settings value (rebuilt when a key rotates)."""

    def __init__(self, settings: FunctionSettings, http: httpx.Client) -> None:
        self.settings = settings
        self.service = _client(settings, settings.service_key, http)
        self.public = (_client(settings, settings.public_key, http)
                       if isinstance(settings, CreditsApiSettings) else None)


class Rpc:
    """Calls into the database through the REST layer, for one configuration.

    The settings are looked up on each call (``LiveSettings`` re-reads rotated
    secrets); the clients are rebuilt only when they changed, and always share
    one connection pool.
    """

    def __init__(self, settings: FunctionSettings | SettingsSource[FunctionSettings]) -> None:
        self._source = settings_source(settings)
        first = self._source.get()
        timeout = httpx.Timeout(first.rpc_timeout_seconds, connect=min(5.0, first.rpc_timeout_seconds))
        self._http = httpx.Client(timeout=timeout, follow_redirects=False,
                                  limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))
        self._clients = Clients(first, self._http)

    def close(self) -> None:
        self._http.close()

    def clients(self) -> Clients:
        current = self._source.get()
        clients = self._clients
        if clients.settings is not current and clients.settings != current:
            clients = self._clients = Clients(current, self._http)
        return clients

    @property
    def _service(self) -> SyncPostgrestClient:
        return self.clients().service

    @property
    def _public(self) -> SyncPostgrestClient | None:
        return self.clients().public

    def user_client(self, token: str) -> SyncPostgrestClient:
        """A PostgREST client acting as this token's user, sharing only the connection pool."""
        public = self._public
        if public is None:
            raise RuntimeError("user calls need the credits API's settings (a public key)")
        return public.schema("public").auth(token)

    def service(self, fn: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call ``fn`` with the service role."""
        return _execute(fn, lambda: self._service.rpc(fn, dict(params or {})).execute())

    def user(self, token: str, fn: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call ``fn`` as the user whose access token this is (RLS and auth.uid() apply)."""
        return _execute(fn, lambda: self.user_client(token).rpc(fn, dict(params or {})).execute())

    def user_select(
        self,
        token: str,
        table: str,
        *,
        filters: Sequence[tuple[str, str, Any]] = (),
        order: str | None = None,
        descending: bool = False,
        limit: int | None = None,
        columns: str = "*",
    ) -> list[dict[str, Any]]:
        """Read rows of ``table`` as the user (what RLS lets them see)."""

        def run() -> Any:
            query = self.user_client(token).from_(table).select(columns)
            for column, operator, value in filters:
                if operator not in _OPERATORS:
                    raise ValueError(f"unsupported filter operator {operator}")
                query = getattr(query, operator)(column, value)
            if order:
                query = query.order(order, desc=descending)
            if limit is not None:
                query = query.limit(limit)
            return query.execute()

        rows = _execute(table, run)
        return list(rows or [])


def _execute(name: str, run: Callable[[], Any]) -> Any:
    try:
        response = run()
    except APIError as exc:
        error = from_database_error(exc.code, exc.message, exc.details)
        logger.info("database error", extra={"call": name, "db_code": exc.code or "none",
                                              "status": error.status, "error": error.error})
        raise error from None
    except httpx.TimeoutException:
        logger.warning("database call timed out", extra={"call": name})
        raise ServiceUnavailable("the database did not answer in time, retry later") from None
    except httpx.TransportError as exc:
        logger.warning("database unreachable", extra={"call": name, "error_type": type(exc).__name__})
        raise ServiceUnavailable() from None
    except ApiError:
        raise
    return response.data


# --- one Rpc per configuration per process (i.e. per cold start) ------------------

_instances: dict[Any, Rpc] = {}
_lock = threading.Lock()


def get_rpc(settings: FunctionSettings | SettingsSource[FunctionSettings]) -> Rpc:
    with _lock:
        instance = _instances.get(settings)
        if instance is None:
            instance = _instances[settings] = Rpc(settings)
        return instance


def service_rpc(settings: FunctionSettings | SettingsSource[FunctionSettings], fn: str,
                params: Mapping[str, Any] | None = None) -> Any:
    """Call contract function ``fn`` with the service role's key; returns its JSON result."""
    return get_rpc(settings).service(fn, params)
