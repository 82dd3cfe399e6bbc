"""The /v1 routes and the health checks, as an APIRouter: what each request does once
:mod:`worker.web.api.auth` has let it in (``create_app`` puts the :class:`ApiContext` on
``app.state``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, cast

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.types import DecoratedCallable
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from worker.client import EnqueueError, PayloadError, Producer
from worker.db.keys import redis_key
from worker.ops import tracing
from worker.ops.health import AccountHealth
from worker.ops.tracing import Span
from worker.queue.broker.kinds import same_redis
from worker.web import jsonbody
from worker.web.api.auth import Key
from worker.web.api.models import (
    Accepted,
    AccountHealthOut,
    AccountOut,
    AccountsOut,
    BatchAccepted,
    HttpError,
    JobOut,
    error_responses,
)
from worker.web.apikeys import ApiKey
from worker.web.status import Status

log = logging.getLogger("postroom.http")

router = APIRouter()

_INVALID = "invalid payload; nothing was enqueued"


@dataclass(frozen=True)
class ApiContext:
    """What the routes work with, one per app."""

    producer: Producer
    body_limit: int  # bytes of one request body
    ready_client: redis.Redis  # short timeouts, for /readyz


def api_context(request: Request) -> ApiContext:
    """The app's :class:`ApiContext` (a dependency: the routes are shared by every app)."""
    return cast(ApiContext, request.app.state.api)


Context = Annotated[ApiContext, Depends(api_context)]


async def http_error(request: Request, exc: HttpError) -> JSONResponse:
    """The exception handler for :class:`HttpError`."""
    return exc.response()


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 (a query or body field out of bounds) in the one error format, naming
    the field and the rule, never the value sent (it may be 10 kB, or someone else's text)."""
    problems = [
        f"{field_path(e.get('loc', ()))}: {str(e.get('msg', 'not valid'))[:200]}" for e in exc.errors()
    ]
    return HttpError(422, "invalid request; nothing was changed", problems).response()


async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every other 4xx Starlette or FastAPI raises (404 no such path, 405, …) in the one format."""
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return HttpError(exc.status_code, detail, headers=dict(exc.headers or {})).response()


def field_path(loc: Sequence[Any]) -> str:
    """``("body", "messages", 2, "subject")`` → ``messages[2].subject`` (where, not what)."""
    parts = list(loc)[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away (or worker/web/httpserver.py closed it: its body was too slow) before
    its body was read: nobody to answer, and nothing wrong with the server."""
    log.info("%s %s: the client went away before its body arrived", request.method, request.url.path)
    return Response(status_code=400)


async def read_json(request: Request, cap: int) -> Any:
    """The body as JSON: 413 past ``cap`` bytes, 400 when it is not JSON or nested too deep."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise HttpError(413, f"the body is over {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise HttpError(413, f"the body is over {cap} bytes")
    try:
        return jsonbody.loads(body)  # nesting bounded before the parser (and pydantic) see it
    except jsonbody.JsonBodyError as exc:
        raise HttpError(400, str(exc)) from None


def owned(key: ApiKey, payload: Any, where: str = "") -> None:
    """403 before validation, so that a key learns nothing about accounts it does not own."""
    account = payload.get("account") if isinstance(payload, dict) else None
    if isinstance(account, str) and not key.may_send_from(account):
        raise HttpError(403, f"this key may not send from account {account!r}", [f"{where}account: "
                        "not an account of this key"])  # fmt: skip


def foreign_idempotency_keys(
    client: redis.Redis, key: ApiKey, messages: list[Any], where: Callable[[int], str]
) -> None:
    """409 when an idempotency key already belongs to a job of another API key: the
    producer helper would hand back that job's id, which is not this key's to see."""
    wanted = [
        (i, m["account"], m["idempotency_key"])
        for i, m in enumerate(messages)
        if isinstance(m, dict)
        and isinstance(m.get("account"), str)
        and isinstance(m.get("idempotency_key"), str)
    ]
    if not wanted:
        return
    owners = client.mget([redis_key("idem", account, k) for _, account, k in wanted])
    with client.pipeline(transaction=False) as pipe:
        for owner in owners:
            pipe.hget(redis_key("job", str(owner or "-")), "submitted_by")
        submitters = pipe.execute()
    problems = [
        f"{where(i)}idempotency_key: already used by another producer"
        for (i, _, _), owner, by in zip(wanted, owners, submitters, strict=True)
        if owner is not None and (by or "") != key.name
    ]
    if problems:
        raise HttpError(409, "an idempotency key belongs to another producer; nothing was enqueued", problems)


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An enqueue off the event loop: a refused payload is a 422, a broker that fails a 503."""
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except PayloadError as exc:
        raise HttpError(422, _INVALID, exc.problems) from None
    except EnqueueError:
        log.exception("enqueue failed")
        raise HttpError(503, "the broker could not take the job; nothing was enqueued") from None


def _enqueue_route(
    path: str, accepted: type[BaseModel], body_schema: str, summary: str
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A POST that enqueues: 202 with ``accepted``; its body (read by hand, so that its size and
    depth are bounded first) documented as the component ``body_schema``."""
    body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body_schema}"}}},
    }
    return router.post(
        path,
        status_code=202,
        response_model=accepted,
        responses=error_responses(400, 401, 403, 409, 413, 422, 429, 503),
        openapi_extra={"requestBody": body},
        summary=summary,
    )


@contextmanager
def traced(request: Request, route: str) -> Iterator[Span]:
    """The request's span (worker/ops/tracing.py), ended with the status it is answered with:
    the enqueue spans of its jobs are its children."""
    with tracing.server_span(request.method, route, request.headers) as span:
        try:
            yield span
        except HttpError as exc:
            tracing.answered(span, exc.status)
            raise
        except Exception:
            tracing.answered(span, 500)
            raise
        tracing.answered(span, 202)


@_enqueue_route("/v1/messages", Accepted, "SendPayload", "Enqueue one message (the postroom.send payload)")
async def post_message(request: Request, key: Key, context: Context) -> Accepted:
    with traced(request, "/v1/messages"):
        return await _post_message(request, key, context)


async def _post_message(request: Request, key: Key, context: Context) -> Accepted:
    payload = await read_json(request, context.body_limit)
    if not isinstance(payload, dict):
        raise HttpError(422, _INVALID, ["payload: must be a JSON object"])
    owned(key, payload)
    client = context.producer.store.redis
    await run_in_threadpool(foreign_idempotency_keys, client, key, [payload], lambda i: "")
    job_id = await call(context.producer.enqueue, payload, submitted_by=key.name)
    log.info("key %s enqueued job %s for %s", key.name, job_id, payload.get("account"))
    return Accepted(job_id=job_id)


@_enqueue_route(
    "/v1/batches", BatchAccepted, "BatchIn", "Enqueue many messages as one postroom.send_batch job"
)
async def post_batch(request: Request, key: Key, context: Context) -> BatchAccepted:
    with traced(request, "/v1/batches"):
        return await _post_batch(request, key, context)


async def _post_batch(request: Request, key: Key, context: Context) -> BatchAccepted:
    body = await read_json(request, context.body_limit)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or set(body) != {"messages"}:
        raise HttpError(422, _INVALID, ['payload: must be {"messages": [ … ]}'])
    for i, message in enumerate(messages):
        owned(key, message, f"messages[{i}].")
    problems = [
        f"messages[{i}]: must be a JSON object" for i, m in enumerate(messages) if not isinstance(m, dict)
    ]
    if problems:
        raise HttpError(422, _INVALID, problems)
    client = context.producer.store.redis
    await run_in_threadpool(foreign_idempotency_keys, client, key, messages, lambda i: f"messages[{i}].")
    job_ids = await call(context.producer.send_batch, messages, submitted_by=key.name)
    log.info("key %s enqueued a batch of %d jobs", key.name, len(job_ids))
    return BatchAccepted(job_ids=job_ids)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    responses=error_responses(401, 404, 429),
    summary="A job this key enqueued: state, attempts and per-recipient results",
)
async def get_job(job_id: str, key: Key, context: Context) -> BaseModel:
    job = await run_in_threadpool(context.producer.job, job_id) if len(job_id) <= 100 else None
    if job is None or job.submitted_by != key.name:
        raise HttpError(404, "no such job for this key")
    return JobOut.model_validate(job.as_dict())


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    responses=error_responses(401, 404, 409, 429),
    summary="Cancel a job this key enqueued that has not started sending (409 when it has)",
)
async def cancel_job(job_id: str, key: Key, context: Context) -> BaseModel:
    job = await run_in_threadpool(context.producer.job, job_id) if len(job_id) <= 100 else None
    if job is None or job.submitted_by != key.name:
        raise HttpError(404, "no such job for this key")
    cancelled, state = await run_in_threadpool(context.producer.cancel, job_id, by=f"API key {key.name}")
    if not cancelled:
        under_way = " already under way" if state == "sending" else ""
        raise HttpError(409, f"the job is{under_way} {state}: it can no longer be cancelled")
    done = await run_in_threadpool(context.producer.job, job_id)
    return JobOut.model_validate(done.as_dict() if done else job.as_dict())


@router.get(
    "/v1/accounts",
    response_model=AccountsOut,
    responses=error_responses(401, 429),
    summary="The accounts this key may send from: state and last health (never secrets)",
)
async def get_accounts(key: Key, context: Context) -> AccountsOut:
    return await run_in_threadpool(accounts_of, context.producer, key)


def accounts_of(producer: Producer, key: ApiKey) -> AccountsOut:
    records = producer.records(fresh=True)
    snapshot = Status(
        producer.store, AccountHealth(producer.store.redis), records, producer.broker_view()
    ).as_dict()
    out: dict[str, AccountOut] = {}
    for name in key.visible_accounts(records.account_names):
        data = snapshot["accounts"][name]
        health = data.get("health")
        out[name] = AccountOut(
            state=data["state"],
            reason=data.get("reason"),
            health=AccountHealthOut.model_validate(
                {k: health.get(k) for k in ("ok", "result", "checked_at", "error")}
            )
            if health
            else None,
            certificate_days_left=data.get("certificate_days_left") or {},
        )
    return AccountsOut(accounts=out)


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The broker answers", responses=error_responses(503))
async def readyz(context: Context) -> JSONResponse:
    try:
        await run_in_threadpool(context.ready_client.ping)
    except redis.RedisError:
        return JSONResponse({"error": "the broker does not answer", "problems": []}, status_code=503)
    if not same_redis(context.producer.broker, context.producer.state):
        try:  # the broker is apart from Postroom's Redis: it must answer too
            await run_in_threadpool(_broker_answers, context.producer.app)
        except Exception as exc:
            problem = f"the broker does not answer ({type(exc).__name__})"
            return JSONResponse({"error": problem, "problems": []}, status_code=503)
    return JSONResponse({"status": "ready"})


def _broker_answers(app: Any) -> None:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
