"""A small PostgREST-compatible endpoint over the real database.

Supabase's REST layer (PostgREST behind the API gateway) cannot run here, so the
local stack and the tests serve this instead; supabase-py talks to it over HTTP
exactly as it talks to a hosted project, and pointing ``SUPABASE_URL`` at a real
Supabase changes nothing for the callers. What it mirrors, because our code can
observe it:

* auth: an ``apikey`` is required: a legacy anon/service_role JWT, or a newer
  ``sb_publishable_``/``sb_secret_`` key, which the gateway maps to ``anon`` /
  ``service_role``; a user's ``Authorization: Bearer`` token decides the role
  when present; tokens are ES256 with the project's signing key (published at
  ``/auth/v1/.well-known/jwks.json``) or HS256 with the legacy secret, ``exp``
  enforced, anything else rejected with 401;
* ``POST|GET /rest/v1/rpc/<fn>`` with named arguments, one transaction as the
  token's role with ``request.jwt.claims`` set (GET runs read-only);
* ``GET /rest/v1/<table>`` reads under RLS (see ``devstack.rest_tables``),
  with ``Range``/``limit``/``offset`` and ``Prefer: count=exact`` (206 for part
  of a counted result, 416 past its end);
* ``POST`` (insert, upsert), ``PATCH`` and ``DELETE`` on tables as the caller's
  role, ``Prefer: return=representation``; the README lists what is left out;
* errors as ``{code, message, details, hint}`` with PostgREST's statuses.

Status of a database error (PostgREST's table, as far as our functions reach it):

=====================================  =======================================
``PTxyz``                              xyz
``42501``                              401 for ``anon``, else 403
``42883``, ``42P01``, unknown function  404
``23505``, ``23503``                   409
``25006`` (write in a GET)             405
``22*``, ``23*``, ``42*``, ``P0001``   400 (also: a NUL character, deep JSON)
``28*``, ``0L*``, ``0P*``              403
``08*``, ``53*``, ``57014``, ``57P0*``  503 (also: database unreachable)
anything else                          500 (message withheld)
=====================================  =======================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import jwt
import psycopg
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool

from devstack import db, rest_tables, tokens
from functions.body_limit import install_body_limit

log = logging.getLogger("devstack.rest")

API_KEY_ROLES = ("anon", "service_role")
SINGLE_OBJECT = "application/vnd.pgrst.object+json"
# Request bodies are capped (413 above this, refused from Content-Length or as
# soon as a chunked body passes it, never read whole), and so is the
# per-process cache of function signatures.
MAX_BODY_BYTES = 1_048_576
MAX_CACHED_FUNCTIONS = 256


def body_too_large(limit: int) -> JSONResponse:
    return JSONResponse({"code": "PGRST413", "message": f"The request body is larger than {limit} bytes",
                         "details": None, "hint": None}, status_code=413)


class RestError(Exception):
    """An error response in PostgREST's shape."""

    def __init__(self, status: int, code: str | None, message: str, details: str | None = None,
                 hint: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "message": message, "details": details, "hint": hint}
        self.headers = dict(headers or {})


# --- auth ----------------------------------------------------------------------

def _unauthorized(code: str, message: str, details: str | None = None, hint: str | None = None) -> RestError:
    return RestError(401, code, message, details, hint, headers={"WWW-Authenticate": "Bearer"})


def verify_jwt(token: str, keys: tokens.LocalKeys) -> dict[str, Any]:
    """Verify like PostgREST with the project's keys: ES256 (the signing key) or
    HS256 (the legacy secret), never ``alg: none``; ``exp`` enforced."""
    try:
        claims = keys.verify(token)
    except jwt.ExpiredSignatureError as exc:
        raise _unauthorized("PGRST303", "JWT expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise _unauthorized("PGRST301", "JWSError JWSInvalidSignature") from exc
    except jwt.InvalidTokenError as exc:
        raise _unauthorized("PGRST301", "JWT could not be decoded or is invalid") from exc
    if not isinstance(claims, dict):
        raise _unauthorized("PGRST301", "JWT could not be decoded or is invalid")
    return claims


def authenticate(request: Request, keys: tokens.LocalKeys) -> tuple[str, dict[str, Any]]:
    """(role, claims) of a request, the way Supabase's gateway and PostgREST decide them."""
    api_key = request.headers.get("apikey") or request.query_params.get("apikey")
    if not api_key:
        raise _unauthorized("PGRST302", "No API key found in request",
                            hint="No `apikey` request header or url param was found.")
    if api_key.startswith("sb_"):
        # The newer, opaque keys: the gateway maps them to a role (a user's
        # bearer token, when there is one, still decides).
        roles = {keys.publishable_key: "anon", keys.secret_key: "service_role"}
        if api_key not in roles:
            raise _unauthorized("PGRST301", "Invalid API key")
        key_claims: dict[str, Any] = {"role": roles[api_key]}
    else:
        try:
            key_claims = verify_jwt(api_key, keys)
        except RestError as exc:
            raise _unauthorized("PGRST301", "Invalid API key") from exc
        if key_claims.get("role") not in API_KEY_ROLES:
            raise _unauthorized("PGRST301", "Invalid API key")
    token = api_key
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("PGRST301", "JWT could not be decoded or is invalid")
        token = value.strip()
    claims = key_claims if token == api_key else verify_jwt(token, keys)
    # PostgREST falls back to its anonymous role when the token names none.
    role = claims.get("role", "anon")
    if role not in db.ROLES:
        raise _unauthorized("PGRST303", "JWT claims validation or parsing failed",
                            "The role claim must be anon, authenticated or service_role")
    return role, claims


def parse_prefer(header: str) -> dict[str, str]:
    """``Prefer: return=representation, count=exact`` -> {"return": "representation", "count": "exact"}."""
    found: dict[str, str] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name:
            found[name.strip().lower()] = value.strip().lower()
    return found


def apply_range_header(query: rest_tables.TableQuery, header: str | None,
                       params: list[tuple[str, str]]) -> None:
    """``Range: <first>-<last>`` (items) as offset and limit, unless the query string has them."""
    if not header or any(k in ("limit", "offset") for k, _ in params):
        return
    first, sep, last = header.strip().removeprefix("items=").partition("-")
    if not sep or not first.isdigit() or (last and not last.isdigit()) or (last and int(last) < int(first)):
        raise RestError(416, "PGRST103", "Requested range not satisfiable",
                        "The Range header must be <first>-<last> with first <= last")
    query.offset = int(first)
    query.limit = int(last) - int(first) + 1 if last else None


# --- database errors -------------------------------------------------------------

def status_for(sqlstate: str, role: str) -> int:
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit() and 100 <= int(sqlstate[2:]) <= 599:
        return int(sqlstate[2:])
    if sqlstate == "42501":
        return 401 if role == "anon" else 403
    if sqlstate in ("42883", "42P01"):
        return 404
    if sqlstate in ("23505", "23503"):
        return 409
    if sqlstate == "25006":
        return 405
    if sqlstate.startswith(("08", "53")) or sqlstate == "57014" or sqlstate.startswith("57P0"):
        return 503
    if sqlstate.startswith(("22", "23", "42")) or sqlstate == "P0001":
        return 400
    if sqlstate.startswith(("28", "0L", "0P")):
        return 403
    return 500


def unreachable() -> RestError:
    return RestError(503, "PGRST000", "Could not connect with the database", headers={"Retry-After": "1"})


def database_error(exc: psycopg.Error, role: str) -> RestError:
    """PostgREST's response for a database error; never SQL text or a trace."""
    sqlstate = exc.sqlstate
    if not sqlstate and isinstance(exc, psycopg.DataError):
        # Refused before it reached the server (a NUL character in a text
        # value): the client's data, as PostgreSQL's own 22021 would be.
        return RestError(400, "22021", "invalid byte sequence: text values cannot contain NUL (0x00)")
    if not sqlstate or (isinstance(exc, psycopg.OperationalError) and sqlstate.startswith("08")):
        log.warning("database unavailable: %s", type(exc).__name__)
        return unreachable()
    status = status_for(sqlstate, role)
    if status >= 500:
        log.error("database error %s (%s)", sqlstate, exc.diag.message_primary)
        message = "Database unavailable" if status == 503 else "Internal database error"
        headers = {"Retry-After": "1"} if status == 503 else None
        return RestError(status, sqlstate, message, headers=headers)
    diag = exc.diag
    return RestError(status, sqlstate, diag.message_primary or sqlstate, diag.message_detail,
                     diag.message_hint)


# --- functions --------------------------------------------------------------------

def _function_not_found(fn: str, names: list[str]) -> RestError:
    return RestError(
        404, "PGRST202",
        f"Could not find the function public.{fn}({', '.join(sorted(names))}) in the schema cache",
        "Searched for the function public.{} with {} or with a single unnamed json/jsonb parameter, "
        "but no matches were found in the schema cache.".format(
            fn, "parameters " + ", ".join(sorted(names)) if names else "no parameters"),
    )


def required_arguments(conn: psycopg.Connection, fn: str) -> list[str] | None:
    """Names of ``public.<fn>``'s arguments without a default (None: no such function)."""
    row = conn.execute(
        """
        select p.proargnames, p.pronargs, p.pronargdefaults
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.proname = %s
        """,
        (fn,),
    ).fetchone()
    if row is None:
        return None
    names, nargs, ndefaults = row
    return list((names or [])[: nargs - ndefaults])


class _NoTraceback:
    """Outermost layer: an unexpected failure is a plain 500, logged by type only
    (Starlette's own error layer would print the traceback)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("unexpected error: %s", type(exc).__name__)
            if not started:
                response = JSONResponse({"code": None, "message": "Internal server error", "details": None,
                                         "hint": None}, status_code=500)
                await response(scope, receive, send)


def array_literal(value: list[Any]) -> str:
    """A JSON array as PostgreSQL's array input text (``["a", null]`` -> ``{"a",NULL}``), which is
    what PostgREST makes of a JSON array passed to an array-typed argument: strings stay strings
    whatever they hold (quoted and escaped), null is NULL, nested arrays are dimensions, and any
    other value is its JSON text."""
    def element(item: Any) -> str:
        if item is None:
            return "NULL"
        if isinstance(item, list):
            return array_literal(item)
        text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ",".join(element(item) for item in value) + "}"


def encodable(value: Any) -> bool:
    """False when decoded JSON holds text with no UTF-8 form (a lone surrogate from ``\\ud800``),
    which PostgreSQL refuses and the database driver cannot even send."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_profile(request: Request) -> None:
    """Only ``public`` is exposed (supabase/config.toml); PostgREST refuses any
    other schema asked for with Accept-Profile / Content-Profile."""
    header = "content-profile" if request.method == "POST" else "accept-profile"
    schema = request.headers.get(header)
    if schema is not None and schema != "public":
        raise RestError(406, "PGRST106", "Invalid schema: " + schema[:63],
                        hint="Only the following schemas are exposed: public")


# --- app ----------------------------------------------------------------------------

def connection_dsn(dsn: str) -> str:
    """The DSN as ``authenticator`` (the login role PostgREST uses) when the server
    lets that role in, else the DSN as given (e.g. a hosted database's own user)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn
    params["user"] = "authenticator"
    params.pop("password", None)
    candidate = make_conninfo(**params)
    try:
        with psycopg.connect(candidate, connect_timeout=3) as conn:
            conn.execute("select 1")
    except psycopg.Error:
        return dsn
    return candidate


def create_app(dsn: str, keys: tokens.LocalKeys | None = None, *, pool_size: int = 10,
               pool_timeout: float = 5.0, max_rows: int | None = 1000) -> FastAPI:
    """The REST endpoint for the database at ``dsn``, trusting tokens signed with ``keys``
    (default: the process's keys), and serving their public half as Supabase Auth does.

    ``max_rows`` caps a table read like PostgREST's ``max_rows`` (supabase/config.toml).
    """
    keys = keys or tokens.default_keys()
    pool = ConnectionPool(
        connection_dsn(dsn), min_size=1, max_size=pool_size, timeout=pool_timeout,
        kwargs={"autocommit": True}, open=False, name="rest",
    )
    pool.open(wait=False)
    required_cache: dict[str, list[str] | None] = {}
    columns_cache: dict[str, dict[str, str]] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(title="local REST", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool
    install_body_limit(app, MAX_BODY_BYTES, body_too_large)
    # Browsers call Supabase's REST layer directly, and it allows any origin.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                       expose_headers=["Content-Range"])

    @app.exception_handler(RestError)
    async def _rest_error(_request: Request, exc: RestError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    app.add_middleware(_NoTraceback)

    @contextmanager
    def connection(role: str) -> Iterator[psycopg.Connection]:
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            log.warning("no database connection within %.1fs", pool_timeout)
            raise unreachable() from exc
        except psycopg.Error as exc:
            raise database_error(exc, role) from exc

    def call(fn: str, args: Mapping[str, Any], role: str, claims: dict[str, Any], *, read_only: bool) -> Any:
        with connection(role) as conn:
            required = required_cache.get(fn)
            if required is None:
                required = required_arguments(conn, fn)
                # Only functions that exist are cached: unknown names cannot grow it.
                if required is not None and len(required_cache) < MAX_CACHED_FUNCTIONS:
                    required_cache[fn] = required
            if required is None or any(name not in args for name in required):
                raise _function_not_found(fn, list(args))
            try:
                # A JSON array for an array-typed argument is an array, as PostgREST reads it.
                types = db.function_signature(conn, fn)
                args = {name: array_literal(value)
                        if isinstance(value, list) and types.get(name, "").endswith("[]") else value
                        for name, value in args.items()}
                if read_only:
                    # PostgREST runs GET calls in a read-only transaction; call_function's
                    # own transaction becomes a savepoint inside this one.
                    with conn.transaction():
                        conn.execute("set transaction read only")
                        return db.call_function(conn, fn, args, role=role, claims=claims)
                return db.call_function(conn, fn, args, role=role, claims=claims)
            except (db.FunctionNotFound, ValueError) as exc:
                raise _function_not_found(fn, list(args)) from exc

    def refuse_unencodable(raw: bytes, role: str) -> None:
        """A body whose JSON decodes to text PostgreSQL cannot hold (a lone UTF-16 surrogate,
        ``"\\ud800"``): PostgREST hands the body to PostgreSQL as JSON, which refuses it with
        a 400-class error naming the problem; ask PostgreSQL for exactly that error."""
        with connection(role) as conn:
            try:
                conn.execute("select %s::jsonb", (raw.decode("utf-8"),))
            except psycopg.Error as exc:
                raise database_error(exc, role) from exc
        raise RestError(400, "22P05", "unsupported Unicode escape sequence",
                        "The body holds text that cannot be stored (a lone UTF-16 surrogate)")

    def json_response(payload: Any) -> Response:
        return Response(json.dumps(payload), media_type="application/json")

    @app.get("/auth/v1/.well-known/jwks.json")
    def jwks() -> Response:
        # Public keys only; Supabase serves this without an apikey.
        return Response(json.dumps(keys.jwks()), media_type="application/json",
                        headers={"Cache-Control": "public, max-age=600"})

    @app.get("/rest/v1/")
    @app.get("/rest/v1")
    def health(request: Request) -> Response:
        role, _claims = authenticate(request, keys)
        with connection(role) as conn:
            conn.execute("select 1")
        return json_response({"status": "ok"})

    @app.post("/rest/v1/rpc/{fn}")
    async def rpc_post(fn: str, request: Request) -> Response:
        role, claims = authenticate(request, keys)
        check_profile(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RestError(413, "PGRST413", f"The request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            args = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise RestError(400, "PGRST102", "Empty or invalid json") from exc
        if not isinstance(args, dict):
            raise RestError(400, "PGRST102", "Empty or invalid json",
                            "The body must be a JSON object of named arguments")
        if not encodable(args):
            await run_in_threadpool(refuse_unencodable, raw, role)
        result = await run_in_threadpool(call, fn, args, role, claims, read_only=False)
        return json_response(result)

    @app.get("/rest/v1/rpc/{fn}")
    def rpc_get(fn: str, request: Request) -> Response:
        role, claims = authenticate(request, keys)
        check_profile(request)
        args = {k: v for k, v in request.query_params.items() if k not in rest_tables.RESERVED | {"apikey"}}
        return json_response(call(fn, args, role, claims, read_only=True))

    def table_columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
        if table not in columns_cache:
            columns = rest_tables.table_columns(conn, table)
            if not columns:
                raise RestError(404, "PGRST205",
                                f"Could not find the table 'public.{table}' in the schema cache")
            if len(columns_cache) < MAX_CACHED_FUNCTIONS:
                columns_cache[table] = columns
            return columns
        return columns_cache[table]

    def as_role(conn: psycopg.Connection, role: str, claims: dict[str, Any]) -> None:
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))

    @app.api_route("/rest/v1/{table}", methods=["GET", "HEAD"])
    def read_table(table: str, request: Request) -> Response:
        role, claims = authenticate(request, keys)
        check_profile(request)
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "apikey"]
        with connection(role) as conn:
            columns = table_columns(conn, table)
            try:
                query = rest_tables.build(table, columns, params)
            except rest_tables.QueryError as exc:
                raise RestError(exc.status, exc.code, exc.message, exc.details) from exc
            apply_range_header(query, request.headers.get("range"), params)
            if max_rows is not None and (query.limit is None or query.limit > max_rows):
                query.limit = max_rows
            want_count = "count=exact" in request.headers.get("prefer", "")
            try:
                with conn.transaction():
                    conn.execute("set transaction read only")
                    as_role(conn, role, claims)
                    rows_text = conn.execute(query.rows_query(), query.params).fetchone()[0]
                    total = None
                    if want_count:
                        total = conn.execute(query.count_query(), query.params).fetchone()[0]
            except psycopg.Error as exc:
                raise database_error(exc, role) from exc
        rows = json.loads(rows_text)
        first = query.offset
        if total is not None and first > 0 and first >= total:
            raise RestError(416, "PGRST103", "Requested range not satisfiable",
                            f"An offset of {first} was requested, but there are only {total} rows.",
                            headers={"Content-Range": f"*/{total}"})
        if SINGLE_OBJECT in request.headers.get("accept", ""):
            if len(rows) != 1:
                raise RestError(406, "PGRST116", "JSON object requested, multiple (or no) rows returned",
                                f"The result contains {len(rows)} rows")
            return Response(json.dumps(rows[0]), media_type=SINGLE_OBJECT)
        span = f"{first}-{first + len(rows) - 1}" if rows else "*"
        headers = {"Content-Range": f"{span}/{total if total is not None else '*'}"}
        # Part of a known total is 206 Partial Content, as PostgREST answers with a count.
        status = 206 if total is not None and len(rows) < total else 200
        body = "" if request.method == "HEAD" else rows_text
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    @app.api_route("/rest/v1/{table}", methods=["POST", "PATCH", "DELETE"])
    async def write_table(table: str, request: Request) -> Response:
        role, claims = authenticate(request, keys)
        check_profile(request)
        prefer = parse_prefer(request.headers.get("prefer", ""))
        returning = prefer.get("return") == "representation"
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "apikey"]
        body: Any = None
        if request.method != "DELETE":
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise RestError(413, "PGRST413", f"The request body is larger than {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise RestError(400, "PGRST102", "Empty or invalid json") from exc
            rows_ok = isinstance(body, dict) or (request.method == "POST" and isinstance(body, list)
                                                 and all(isinstance(row, dict) for row in body))
            if not rows_ok or (isinstance(body, list) and not body):
                raise RestError(400, "PGRST102", "Empty or invalid json",
                                "Send a JSON object (POST may send an array of objects)")
            if not encodable(body):
                await run_in_threadpool(refuse_unencodable, raw, role)
        written, count = await run_in_threadpool(
            write, table, request.method, body, params, prefer, returning, role, claims)
        if request.method == "POST":
            media = "application/json" if returning else None
            return Response(written or "", status_code=201, media_type=media,
                            headers={"Content-Range": "*/*"})
        span = f"0-{count - 1}/*" if count else "*/*"
        if returning:
            return Response(written or "[]", status_code=200, media_type="application/json",
                            headers={"Content-Range": span})
        return Response(status_code=204, headers={"Content-Range": span})

    def write(table: str, method: str, body: Any, params: list[tuple[str, str]],
              prefer: dict[str, str], returning: bool, role: str,
              claims: dict[str, Any]) -> tuple[str | None, int]:
        with connection(role) as conn:
            columns = table_columns(conn, table)
            try:
                if method == "POST":
                    rows = body if isinstance(body, list) else [body]
                    resolution = prefer.get("resolution")
                    on_conflict = None
                    if resolution in ("merge-duplicates", "ignore-duplicates"):
                        named = dict(params).get("on_conflict")
                        on_conflict = named.split(",") if named else rest_tables.primary_key(conn, table)
                    statement = rest_tables.insert(table, columns, rows, returning=returning,
                                                   on_conflict=on_conflict,
                                                   merge=resolution != "ignore-duplicates")
                elif method == "PATCH":
                    statement = rest_tables.update(table, columns, body, params, returning=returning)
                else:
                    statement = rest_tables.delete(table, columns, params, returning=returning)
            except rest_tables.QueryError as exc:
                raise RestError(exc.status, exc.code, exc.message, exc.details) from exc
            try:
                with conn.transaction():
                    as_role(conn, role, claims)
                    text, count = conn.execute(statement.statement, statement.params).fetchone()
            except psycopg.Error as exc:
                raise database_error(exc, role) from exc
        return text, int(count)

    @app.put("/rest/v1/{table}")
    def put_table(table: str, request: Request) -> Response:
        authenticate(request, keys)
        raise RestError(405, "PGRST117", "PUT is not implemented by the local endpoint",
                        hint="Upsert with POST and Prefer: resolution=merge-duplicates")

    return app
