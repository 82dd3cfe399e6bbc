"""``/v1/accounts/{account}/suppressions``: an account's suppression list over HTTP (contract §10),
for the accounts the API key may send from (403 for any other, 404 for an unknown one)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from worker.queue.store.suppressions import ListFull, Suppressions
from worker.records.addresses import check_visible_text, parse_mailbox
from worker.web.api.auth import Key
from worker.web.api.models import HttpError, error_responses
from worker.web.api.routes import Context
from worker.web.apikeys import ApiKey

router = APIRouter()
PATH = "/v1/accounts/{account}/suppressions"


class SuppressionOut(BaseModel):
    address: str
    reason: str
    code: int | None = None
    source: str
    job_id: str | None = None
    at: float
    expires_at: float


class SuppressionsOut(BaseModel):
    account: str
    suppressions: list[SuppressionOut]
    next: str | None = Field(description="The cursor of the next page (`after=`); null on the last page")
    total: int = Field(description="How many entries the list holds")


class SuppressionIn(BaseModel):
    address: str = Field(max_length=320)
    reason: str = Field(default="added through the API", max_length=300)

    @field_validator("reason")
    @classmethod
    def _visible(cls, value: str) -> str:
        return check_visible_text(value)  # an operator reads it in `suppressions list`


def _lists(context: Any, key: ApiKey, account: str) -> Suppressions:
    if not key.may_send_from(account):
        raise HttpError(403, f"this key may not use account {account!r}")
    if account not in context.producer.records().account_names:
        raise HttpError(404, f"no account {account!r}")
    return Suppressions(
        context.producer.store.redis,
        context.producer.settings.suppression_ttl,
        context.producer.settings.suppression_limit,
    )


def _address(value: str) -> str:
    try:
        return parse_mailbox(value).address
    except ValueError as exc:
        raise HttpError(422, "not an email address", [f"address: {exc}"]) from None


@router.get(PATH, response_model=SuppressionsOut, responses=error_responses(401, 403, 404, 422, 429),
            summary="The account's suppressed addresses, oldest first, a page at a time")  # fmt: skip
async def list_suppressions(
    account: str,
    key: Key,
    context: Context,
    limit: int = Query(default=100, ge=1, le=1000, description="At most this many entries"),
    after: str | None = Query(default=None, max_length=400, description="The `next` of the page before"),
) -> SuppressionsOut:
    lists = _lists(context, key, account)
    try:
        page = await run_in_threadpool(lists.page, account, limit, after)
    except ValueError as exc:
        raise HttpError(422, "not a cursor", [f"after: {exc}"]) from None
    entries = [SuppressionOut.model_validate(e) for e in page.entries]
    return SuppressionsOut(account=account, suppressions=entries, next=page.next, total=page.total)


@router.post(PATH, status_code=201, response_model=SuppressionOut,
             responses=error_responses(401, 403, 404, 409, 422, 429),
             summary="Suppress an address for the account (409: full of operator entries)")  # fmt: skip
async def add_suppression(account: str, body: SuppressionIn, key: Key, context: Context) -> SuppressionOut:
    lists = _lists(context, key, account)
    address = _address(body.address)
    try:
        entry = await run_in_threadpool(
            lambda: lists.add(
                account, address, reason=f"{body.reason} (API key {key.name})", source="operator"
            )
        )
    except ListFull as exc:
        raise HttpError(409, "the suppression list is full", [str(exc)]) from None
    return SuppressionOut.model_validate(entry)


@router.delete(PATH, status_code=204, responses=error_responses(401, 403, 404, 422, 429),
               summary="Take an address off the account's list (404 when it was not on it)")  # fmt: skip
async def remove_suppression(
    account: str, key: Key, context: Context, address: str = Query(max_length=320)
) -> Response:
    lists = _lists(context, key, account)
    if not await run_in_threadpool(lists.remove, account, _address(address)):
        raise HttpError(404, f"{address} is not suppressed for {account}")
    return Response(status_code=204)
