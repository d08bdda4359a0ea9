"""The credits HTTP API: balance, ledger listing, spend, holds, and cost estimates.

A thin edge over the contract's SQL functions. The caller is authenticated here
(access token verified locally, or a license key for servers), then every call
runs in the database *as that user* through the REST layer, so the database's
own rules (RLS, who may spend from which account) decide; this app never
widens them. License-key calls are the exception by design: the key is checked
by ``deduct_credits_by_license`` itself, which only the service role may run,
and a license key may do nothing else. One rule is the API's own: overdraft
holds are the service's (``overage: overdraft`` is 403 for every caller here).
"""


from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from functions import limits
from functions.auth import Caller, LicenseKey, TokenVerifier, User, authenticate
from functions.errors import ApiError, BadRequest, Forbidden
from functions.http import install_body_limit, install_error_handlers, install_request_logging
from functions.observability import count
from functions.rpc import Rpc, get_rpc
from functions.settings import CreditsApiSettings, SettingsSource, settings_source

MAX_AMOUNT = limits.AMOUNT
MAX_METADATA_BYTES = limits.METADATA_BYTES
MAX_IDEMPOTENCY_KEY = limits.IDEMPOTENCY_KEY
DEFAULT_PAGE = 50
MAX_PAGE = 200
# The largest valid body is metadata at its limit written with \u escapes (6 bytes a character)
# plus a few short fields; anything over this is refused before it is read.
MAX_BODY_BYTES = 262_144

Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT)]
TokenCount = Annotated[StrictInt, Field(ge=0, le=limits.TOKENS)]
TtlSeconds = Annotated[StrictInt, Field(ge=1, le=limits.TTL_SECONDS)]
Model = Annotated[str, Field(min_length=1, max_length=limits.MODEL)]
Operation = Annotated[str, Field(min_length=1, max_length=limits.OPERATION)]
# What a capture above its hold does; `overdraft` is the service's (403 here, see `reserve`).
Overage = Literal["reject", "if_available", "overdraft"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(_Strict):
    metadata: dict[str, Any] = Field(default_factory=dict, description="Stored with the ledger/usage rows.")

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if limits.metadata_bytes(value) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
        return value


class _Spend(_Body):
    amount: Amount | None = Field(default=None, description="Credits; or give `operation`.")
    operation: Operation | None = Field(default=None,
                                       description="Priced by the credit_prices table; or give `amount`.")
    account_id: UUID | None = Field(default=None, description="Default: the caller's personal account.")

    @model_validator(mode="after")
    def _amount_or_operation(self) -> _Spend:
        if (self.amount is None) == (self.operation is None):
            raise ValueError("give exactly one of amount and operation")
        return self


class DeductRequest(_Spend):
    model: Model | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None


class ReserveRequest(DeductRequest):
    ttl_seconds: TtlSeconds | None = Field(
        default=None, description="How long the hold lives before it is released (default 900).")
    overage: Overage | None = Field(
        default=None, description="A capture above the hold: `reject` (default) or `if_available` "
                                  "(`overdraft` is the service's only).")


class CaptureRequest(_Body):
    amount: Amount | None = Field(default=None, description="The cost; default: the actual tokens at the "
                                                            "hold's price, or, without them, all of it.")
    input_tokens: TokenCount | None = Field(default=None, description="Actual tokens (a priced hold).")
    output_tokens: TokenCount | None = Field(default=None, description="Actual tokens (a priced hold).")
    model: Model | None = Field(default=None, description="The model actually used (logged).")

    @model_validator(mode="after")
    def _amount_or_tokens(self) -> CaptureRequest:
        if self.amount is not None and (self.input_tokens is not None or self.output_tokens is not None):
            raise ValueError("give amount or token counts, not both")
        return self


class ExtendRequest(_Strict):
    add_amount: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = Field(
        default=None, description="Credits to add to the hold from what is available (all or nothing).")
    ttl_seconds: TtlSeconds | None = Field(default=None, description="New expiry: now + this many seconds.")

    @model_validator(mode="after")
    def _something_to_do(self) -> ExtendRequest:
        if not self.add_amount and self.ttl_seconds is None:
            raise ValueError("give add_amount, ttl_seconds or both")
        return self


class EstimateQuery(BaseModel):
    # Query strings are text: numbers are parsed here (not strict as in JSON bodies), with the same bounds.
    amount: Annotated[int, Field(ge=1, le=MAX_AMOUNT)] | None = Field(
        default=None, description="Credits; or give `operation`.")
    operation: Operation | None = Field(default=None, description="Priced by the credit_prices table.")
    input_tokens: Annotated[int, Field(ge=0, le=limits.TOKENS)] | None = None
    output_tokens: Annotated[int, Field(ge=0, le=limits.TOKENS)] | None = None
    account_id: UUID | None = Field(default=None, description="Default: the caller's personal account.")

    @model_validator(mode="after")
    def _amount_or_operation(self) -> EstimateQuery:
        if (self.amount is None) == (self.operation is None):
            raise ValueError("give exactly one of amount and operation")
        return self


class ErrorBody(BaseModel):
    error: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Invalid argument or missing Idempotency-Key", 401: "Missing, invalid or expired credentials",
        402: "insufficient_credits / spend_limit_exceeded", 403: "forbidden / license key errors",
        404: "Not found", 409: "idempotency_conflict / hold_not_active / hold_extension_limit",
        422: "Body does not match the schema", 429: "too_many_holds (see Retry-After)",
        503: "Database unavailable (see Retry-After)",
    }.items()
}

_bearer = HTTPBearer(auto_error=False, description="The user's Supabase access token.")
_license = APIKeyHeader(name="X-License-Key", auto_error=False, description="A license key (servers).")


def _params(**values: Any) -> dict[str, Any]:
    # Omit unset arguments so the SQL defaults apply (a JSON null would override them).
    return {k: (str(v) if isinstance(v, UUID) else v) for k, v in values.items() if v is not None}


def _uuid(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def _idempotency_key(value: str | None) -> str:
    if value is None or not value.strip() or len(value) > MAX_IDEMPOTENCY_KEY:
        raise BadRequest(
            f"an Idempotency-Key header of 1 to {MAX_IDEMPOTENCY_KEY} characters is required",
            detail={"argument": "Idempotency-Key"},
        )
    return value


# --- dependencies: what create_app puts on app.state, and who is calling ---------------


def _rpc(request: Request) -> Rpc:
    rpc: Rpc = request.app.state.rpc
    return rpc


def _caller(request: Request, _b: Annotated[Any, Depends(_bearer)],
            _l: Annotated[Any, Depends(_license)]) -> Caller:
    # The two security dependencies only document the schemes in OpenAPI.
    verifier: TokenVerifier = request.app.state.verifier
    return authenticate(request.headers, verifier)


def _user(who: Annotated[Caller, Depends(_caller)]) -> User:
    if not isinstance(who, User):
        raise Forbidden("license keys can only spend (POST /credits/deduct)")
    return who


Db = Annotated[Rpc, Depends(_rpc)]
AnyCaller = Annotated[Caller, Depends(_caller)]
UserCaller = Annotated[User, Depends(_user)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]

router = APIRouter(prefix="/credits", responses=_ERRORS)


@router.get("/balance", summary="Balance of an account")
def balance(db: Db, who: UserCaller, account_id: Annotated[UUID | None, Query()] = None) -> dict[str, Any]:
    result: dict[str, Any] = db.user(who.token, "get_credit_balance", _params(p_account_id=account_id))
    return result


@router.get("/transactions", summary="Ledger rows, newest first")
def transactions(
    db: Db,
    who: UserCaller,
    account_id: Annotated[UUID | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    before: Annotated[int | None, Query(ge=1, description="Page cursor: `next_before` of the last page.")]
    = None,
) -> dict[str, Any]:
    # Reading the balance first turns "not yours" into 403 / "no such account" into 404;
    # the ledger read alone would just be empty under RLS.
    account = str(db.user(who.token, "get_credit_balance", _params(p_account_id=account_id))["account_id"])
    filters: list[tuple[str, str, Any]] = [("account_id", "eq", account)]
    if before is not None:
        filters.append(("id", "lt", before))
    rows = db.user_select(who.token, "credit_ledger", filters=filters, order="id", descending=True,
                          limit=limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return {"account_id": account, "transactions": page,
            "next_before": page[-1]["id"] if more and page else None}


@router.post("/deduct", summary="Spend credits now")
def deduct(body: DeductRequest, db: Db, who: AnyCaller,
           idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    key = _idempotency_key(idempotency_key)
    spend = _params(p_idempotency_key=key, p_amount=body.amount, p_operation=body.operation,
                    p_model=body.model, p_input_tokens=body.input_tokens,
                    p_output_tokens=body.output_tokens, p_metadata=body.metadata)
    result: dict[str, Any]
    try:
        if isinstance(who, LicenseKey):
            if body.account_id is not None:
                raise BadRequest("a license key spends from its own account; omit account_id",
                                 detail={"argument": "account_id"})
            result = db.service("deduct_credits_by_license", {"p_license_key": who.key, **spend})
        else:
            # A null account is the caller's personal account: one call, resolved by the database.
            result = db.user(who.token, "deduct_credits", {"p_account_id": _uuid(body.account_id), **spend})
    except ApiError as exc:
        count(f"Deduct_{exc.error}")
        raise
    if not result.get("replayed"):
        count("Deductions")
        count("CreditsCharged", result.get("charged") or 0)
    return result


@router.get("/estimate", summary="What a spend would cost, and whether it is affordable now")
def estimate(query: Annotated[EstimateQuery, Query()], db: Db, who: UserCaller) -> dict[str, Any]:
    result: dict[str, Any] = db.user(who.token, "estimate_cost", _params(
        p_account_id=query.account_id, p_operation=query.operation, p_amount=query.amount,
        p_input_tokens=query.input_tokens, p_output_tokens=query.output_tokens))
    return result


# --- usage -------------------------------------------------------------------------------

UsageBin = Literal["hour", "day", "month"]
UsageFormat = Literal["json", "csv"]
# A CSV cell a spreadsheet would read as a formula gets a leading quote (the contract's rule).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _as_utc(value: dt.datetime | None) -> str | None:
    # A time without an offset is UTC (the bins are UTC).
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def usage_csv(result: dict[str, Any], group_by: list[str]) -> str:
    """A header, then one CSV row per result row: period, the group keys as asked for, the figures."""
    columns = ["period", *group_by, "credits", "calls", "input_tokens", "output_tokens"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in result.get("rows") or []:
        writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return out.getvalue()


@router.get(
    "/usage", summary="Spends net of refunds, binned by time and grouped", response_model=None,
    responses={200: {"description": "`get_credit_usage`'s answer as JSON, or its rows as CSV "
                                    "(`format=csv` or `Accept: text/csv`)",
                     "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}}})
def usage(
    request: Request,
    db: Db,
    who: UserCaller,
    account_id: Annotated[UUID | None, Query(description="Default: the caller's personal account.")] = None,
    from_: Annotated[dt.datetime | None, Query(
        alias="from", description="Start, included (default: the current period's; no offset: UTC).")] = None,
    to: Annotated[dt.datetime | None, Query(
        description="End, excluded (default: the current period's; no offset: UTC).")] = None,
    group_by: Annotated[str | None, Query(
        description="Comma-separated keys among operation, model, member, license_key.")] = None,
    bin_: Annotated[UsageBin | None, Query(alias="bin", description="hour, day (default) or month, in UTC.")]
    = None,
    format_: Annotated[UsageFormat | None, Query(alias="format", description="json (default) or csv.")]
    = None,
) -> dict[str, Any] | Response:
    keys = [key.strip() for key in group_by.split(",")] if group_by else []
    result: dict[str, Any] = db.user(who.token, "get_credit_usage", {
        **_params(p_account_id=account_id, p_from=_as_utc(from_), p_to=_as_utc(to), p_bin=bin_),
        "p_group_by": keys})
    wants_csv = format_ == "csv" or (format_ is None and "text/csv" in request.headers.get("accept", ""))
    if not wants_csv:
        return result
    return Response(usage_csv(result, keys), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="credit-usage.csv"'})


@router.post("/holds", summary="Reserve credits (a hold)")
def reserve(body: ReserveRequest, db: Db, who: UserCaller,
            idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    if body.overage == "overdraft":
        # Debt is the operator's decision: only the service makes overdraft holds (in SQL).
        raise Forbidden("only the service makes overdraft holds",
                        detail={"reason": "only the service makes overdraft holds"})
    key = _idempotency_key(idempotency_key)
    result: dict[str, Any] = db.user(who.token, "reserve_credits", {
        "p_account_id": _uuid(body.account_id),
        **_params(p_idempotency_key=key, p_amount=body.amount, p_operation=body.operation,
                  p_ttl_seconds=body.ttl_seconds, p_metadata=body.metadata, p_model=body.model,
                  p_input_tokens=body.input_tokens, p_output_tokens=body.output_tokens,
                  p_overage=body.overage)})
    if not result.get("replayed"):
        count("HoldsReserved")
    return result


@router.post("/holds/{hold_id}/capture", summary="Charge a hold")
def capture(hold_id: UUID, db: Db, who: UserCaller, body: CaptureRequest | None = None) -> dict[str, Any]:
    body = body or CaptureRequest()
    result: dict[str, Any] = db.user(who.token, "capture_hold", _params(
        p_hold_id=hold_id, p_amount=body.amount, p_metadata=body.metadata, p_input_tokens=body.input_tokens,
        p_output_tokens=body.output_tokens, p_model=body.model))
    if not result.get("replayed"):
        count("HoldsCaptured")
        count("CreditsCharged", result.get("charged") or 0)
    return result


@router.post("/holds/{hold_id}/release", summary="Release a hold")
def release(hold_id: UUID, db: Db, who: UserCaller) -> dict[str, Any]:
    result: dict[str, Any] = db.user(who.token, "release_hold", _params(p_hold_id=hold_id))
    if not result.get("replayed"):
        count("HoldsReleased")
    return result


@router.post("/holds/{hold_id}/extend", summary="Grow a hold and/or move its expiry")
def extend(hold_id: UUID, body: ExtendRequest, db: Db, who: UserCaller,
           idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    key = _idempotency_key(idempotency_key)
    result: dict[str, Any] = db.user(who.token, "extend_hold", _params(
        p_hold_id=hold_id, p_idempotency_key=key, p_add_amount=body.add_amount,
        p_ttl_seconds=body.ttl_seconds))
    if not result.get("replayed"):
        count("HoldsExtended")
    return result


def create_app(settings: CreditsApiSettings | SettingsSource[CreditsApiSettings], *,
               rpc: Rpc | None = None) -> FastAPI:
    """The credits app for these settings (one per cold start; a ``LiveSettings`` is read per request)."""
    source = settings_source(settings)
    app = FastAPI(
        title="Credits API",
        version="1.0.0",
        description="Balances, ledger, spending, holds and cost estimates of the credits engine.",
        openapi_url="/credits/openapi.json",
        docs_url="/credits/docs",
        redoc_url=None,
    )
    app.state.rpc = rpc or get_rpc(source)
    app.state.verifier = TokenVerifier(source)
    app.include_router(router)
    install_error_handlers(app)
    install_body_limit(app, MAX_BODY_BYTES)
    install_request_logging(app, "Credits")
    # Added last so it is outermost: error responses carry CORS headers too.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(source.get().cors_allow_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-License-Key",
                       "X-Request-Id", "apikey", "x-client-info"],
        expose_headers=["X-Request-Id", "Retry-After"],
        max_age=600,
    )
    return app
