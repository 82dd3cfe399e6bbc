"""The HTTP submission API: producers in any language enqueue with an API key.

``POST /v1/messages`` and ``POST /v1/batches`` take the ``postroom.send``
payload (DESIGN §2) and go through :class:`worker.client.Producer`, so the
validation and its messages are the ones a Python producer gets. Every
``/v1`` request needs ``Authorization: Bearer <name>.<secret>`` (see
worker/web/apikeys.py); a key sends only from its accounts, within its request
rate, and sees only the jobs it enqueued. A client address that keeps
presenting no valid key gets 429 for a while (``POSTROOM_HTTP_AUTH_FAILURES``,
120/minute). ``/healthz`` answers while the process runs, ``/readyz`` when
the broker answers too. The operator dashboard (worker/web/dashboard.py) is served
under ``/dashboard`` by the same app.

The OpenAPI document the app serves is checked in as ``worker/web/openapi.json``
(``postroom http --openapi`` prints it; a test keeps the two equal).

Request bodies are bounded: ``POSTROOM_HTTP_MAX_BODY`` bytes (413), JSON nested
at most :data:`worker.web.jsonbody.MAX_DEPTH` levels (400, checked before parsing),
and ``postroom http`` closes a request whose headers or body arrive too slowly
(408; worker/web/httpserver.py).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from worker.client import EnqueueError, PayloadError, Producer
from worker.keys import redis_key
from worker.mail.payload import MAX_BATCH, SendPayload
from worker.ops.health import AccountHealth
from worker.queue.runtime import RECORDS_RECHECK_SECONDS
from worker.settings import config_dir as default_config_dir
from worker.settings import redis_url
from worker.web import apikeys, dashboard, httpserver, jsonbody
from worker.web.apikeys import ApiKey
from worker.web.dashboard import DashboardSettings
from worker.web.ratelimit import FailureLimiter, client_address
from worker.web.status import Status

log = logging.getLogger("postroom.http")

DEFAULT_PORT = 8425  # POSTROOM_HTTP_PORT
DEFAULT_MAX_BODY = 25 * 1024 * 1024  # POSTROOM_HTTP_MAX_BODY: bytes of one request body
DEFAULT_AUTH_FAILURES = "120/minute"  # POSTROOM_HTTP_AUTH_FAILURES: 401s per client address
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
_RATE_PREFIX = redis_key("http-rate", "")


def http_port() -> int:
    return int(os.environ.get("POSTROOM_HTTP_PORT", DEFAULT_PORT))


def max_body() -> int:
    return int(os.environ.get("POSTROOM_HTTP_MAX_BODY", DEFAULT_MAX_BODY))


def auth_failures() -> str:
    return os.environ.get("POSTROOM_HTTP_AUTH_FAILURES", DEFAULT_AUTH_FAILURES)


# ---- response models (for the OpenAPI document) -----------------------------------------


class Problem(BaseModel):
    field: str = Field(description="where in the body, e.g. to[0] or messages[2].subject")
    message: str


class ErrorBody(BaseModel):
    error: str
    problems: list[Problem] = Field(default_factory=list)


class Accepted(BaseModel):
    job_id: str


class BatchAccepted(BaseModel):
    job_ids: list[str]


class BatchIn(BaseModel):
    messages: list[SendPayload] = Field(max_length=MAX_BATCH)


class JobOut(BaseModel):
    id: str
    state: str
    attempts: int
    account: str
    transport: str | None
    security: str | None
    message_id: str | None
    recipients: dict[str, dict[str, Any]]
    last_error: str | None
    kind: str | None
    created_at: float | None
    updated_at: float | None
    idempotency_key: str | None
    history: list[dict[str, Any]]


class AccountHealthOut(BaseModel):
    ok: bool | None = None
    result: str | None = None
    checked_at: Any = None
    error: str | None = None


class AccountOut(BaseModel):
    state: str
    reason: str | None = None
    health: AccountHealthOut | None = None
    certificate_days_left: dict[str, int] = Field(default_factory=dict)


class AccountsOut(BaseModel):
    accounts: dict[str, AccountOut]


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.problems = problems or []
        self.headers = headers or {}
        super().__init__(error)

    def response(self) -> JSONResponse:
        problems = []
        for text in self.problems:
            field, sep, message = text.partition(": ")
            problems.append({"field": field, "message": message} if sep else {"field": "", "message": text})
        return JSONResponse(
            {"error": self.error, "problems": problems}, status_code=self.status, headers=self.headers
        )


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


class KeyRing:
    """The API key records, read again from disk every couple of seconds."""

    def __init__(self, config_dir: Path | None, fixed: dict[str, ApiKey] | None = None) -> None:
        self.config_dir = config_dir
        self._keys = fixed
        self._fixed = fixed is not None
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def keys(self, wanted: str = "") -> dict[str, ApiKey]:
        """Every loaded key; read again when stale, or when ``wanted`` has a record not loaded yet."""
        if self._fixed and self._keys is not None:
            return self._keys
        with self._lock:
            now = time.monotonic()
            folder = (self.config_dir or default_config_dir()) / "api-keys"
            new = (
                self._keys is not None
                and wanted not in self._keys
                and apikeys.valid_name(wanted)
                and (folder / f"{wanted}.yaml").is_file()
            )
            if new or self._keys is None or now - self._loaded_at > RECORDS_RECHECK_SECONDS:
                keys, problems = apikeys.load_api_keys(self.config_dir or default_config_dir())
                for name, found in problems.items():
                    for problem in found:
                        log.warning("api key %s not loaded: %s", name, problem)
                self._keys, self._loaded_at = keys, now
            return self._keys


class RateLimiter:
    """A fixed window per key in Redis (so several API processes share one budget)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def hit(self, key: ApiKey, now: float | None = None) -> float | None:
        """Count one request; None when allowed, else seconds until the window resets."""
        now = time.time() if now is None else now
        window = int(now // key.period)
        name = f"{_RATE_PREFIX}{key.name}:{window}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(name)
            pipe.expire(name, key.period + 1)
            count, _ = pipe.execute()
        if int(count) <= key.limit:
            return None
        return (window + 1) * key.period - now


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <name>.<secret>")


async def authorised(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    """The request's API key (401 without a valid one, 429 over its rate or after too many 401s)."""
    ring: KeyRing = request.app.state.ring
    limiter: RateLimiter = request.app.state.limiter
    failures: FailureLimiter = request.app.state.auth_failures
    address = client_address(request)
    blocked = await run_in_threadpool(failures.blocked, address)
    if blocked is not None:
        raise HttpError(
            429,
            "too many requests without a valid API key from this address",
            headers={"Retry-After": str(max(1, math.ceil(blocked)))},
        )
    token = credentials.credentials if credentials is not None else None
    key = apikeys.verify(ring.keys(apikeys.key_name(token)), token)
    if key is None:
        await run_in_threadpool(failures.failed, address)
        log.info("401 %s %s: %s", request.method, request.url.path, "bad key" if token else "no key")
        raise HttpError(401, "a valid API key is needed", headers={"WWW-Authenticate": "Bearer"})
    wait = await run_in_threadpool(limiter.hit, key)
    if wait is not None:
        raise HttpError(
            429,
            f"over this key's rate of {key.limit} requests per {key.period} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return key


Key = Annotated[ApiKey, Depends(authorised)]


def create_app(
    producer: Producer,
    *,
    config_dir: Path | None = None,
    keys: dict[str, ApiKey] | None = None,
    body_limit: int | None = None,
    failures: str | None = None,
    dashboard_settings: DashboardSettings | None = None,
) -> FastAPI:
    """The API and the operator dashboard over ``producer`` (its broker, records and job
    store); keys from ``config_dir/api-keys`` (re-read as they change) unless fixed ``keys``
    are given. ``failures``: 401s allowed per client address (e.g. ``120/minute``)."""
    ring = KeyRing(config_dir or producer.config_dir, keys)
    cap = body_limit if body_limit is not None else max_body()
    limiter = RateLimiter(producer.store.redis)
    count, period = apikeys.parse_rate(failures or auth_failures())
    ready_client = redis.Redis.from_url(
        redis_url(producer.broker), socket_connect_timeout=2, socket_timeout=2
    )
    app = FastAPI(
        title="Postroom submission API",
        version="1",
        description="Enqueue mail on Postroom and follow the jobs; every /v1 call needs an API key.",
    )
    app.state.ring = ring
    app.state.limiter = limiter
    app.state.auth_failures = FailureLimiter(producer.store.redis, "http-auth", count, period)
    dashboard.install(app, producer, ring, dashboard_settings or DashboardSettings.from_env())

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # the client went away (or worker/web/httpserver.py closed it: its body was too slow)
        # before its body was read: nobody to answer, and nothing wrong with the server
        log.info("%s %s: the client went away before its body arrived", request.method, request.url.path)
        return Response(status_code=400)

    async def read_json(request: Request) -> Any:
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

    def foreign_idempotency_keys(key: ApiKey, messages: list[Any], where: Callable[[int], str]) -> None:
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
        client = producer.store.redis
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
            raise HttpError(
                409, "an idempotency key belongs to another producer; nothing was enqueued", problems
            )

    async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(function, *args, **kwargs)
        except PayloadError as exc:
            raise HttpError(422, "invalid payload; nothing was enqueued", exc.problems) from None
        except EnqueueError:
            log.exception("enqueue failed")
            raise HttpError(503, "the broker could not take the job; nothing was enqueued") from None

    send_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendPayload"}}},
    }
    batch_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchIn"}}},
    }

    @app.post(
        "/v1/messages",
        status_code=202,
        response_model=Accepted,
        responses=_errors(400, 401, 403, 409, 413, 422, 429, 503),
        openapi_extra={"requestBody": send_body},
        summary="Enqueue one message (the postroom.send payload)",
    )
    async def post_message(request: Request, key: Key) -> Accepted:
        payload = await read_json(request)
        if not isinstance(payload, dict):
            raise HttpError(422, "invalid payload; nothing was enqueued", ["payload: must be a JSON object"])
        owned(key, payload)
        await run_in_threadpool(foreign_idempotency_keys, key, [payload], lambda i: "")
        job_id = await call(producer.enqueue, payload, submitted_by=key.name)
        log.info("key %s enqueued job %s for %s", key.name, job_id, payload.get("account"))
        return Accepted(job_id=job_id)

    @app.post(
        "/v1/batches",
        status_code=202,
        response_model=BatchAccepted,
        responses=_errors(400, 401, 403, 409, 413, 422, 429, 503),
        openapi_extra={"requestBody": batch_body},
        summary="Enqueue many messages as one postroom.send_batch job",
    )
    async def post_batch(request: Request, key: Key) -> BatchAccepted:
        body = await read_json(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or set(body) != {"messages"}:
            raise HttpError(
                422, "invalid payload; nothing was enqueued", ['payload: must be {"messages": [ … ]}']
            )
        for i, message in enumerate(messages):
            owned(key, message, f"messages[{i}].")
        problems = [
            f"messages[{i}]: must be a JSON object" for i, m in enumerate(messages) if not isinstance(m, dict)
        ]
        if problems:
            raise HttpError(422, "invalid payload; nothing was enqueued", problems)
        await run_in_threadpool(foreign_idempotency_keys, key, messages, lambda i: f"messages[{i}].")
        job_ids = await call(producer.send_batch, messages, submitted_by=key.name)
        log.info("key %s enqueued a batch of %d jobs", key.name, len(job_ids))
        return BatchAccepted(job_ids=job_ids)

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        responses=_errors(401, 404, 429),
        summary="A job this key enqueued: state, attempts and per-recipient results",
    )
    async def get_job(job_id: str, key: Key) -> JobOut:
        job = await run_in_threadpool(producer.job, job_id) if len(job_id) <= 100 else None
        if job is None or job.submitted_by != key.name:
            raise HttpError(404, "no such job for this key")
        return JobOut.model_validate(job.as_dict())

    @app.get(
        "/v1/accounts",
        response_model=AccountsOut,
        responses=_errors(401, 429),
        summary="The accounts this key may send from: state and last health (never secrets)",
    )
    async def get_accounts(key: Key) -> AccountsOut:
        return await run_in_threadpool(accounts_of, key)

    def accounts_of(key: ApiKey) -> AccountsOut:
        records = producer.records(fresh=True)
        snapshot = Status(producer.store, AccountHealth(producer.store.redis), records).as_dict()
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

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The broker answers", responses=_errors(503))
    async def readyz() -> JSONResponse:
        try:
            await run_in_threadpool(ready_client.ping)
        except redis.RedisError:
            return JSONResponse({"error": "the broker does not answer", "problems": []}, status_code=503)
        return JSONResponse({"status": "ready"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (SendPayload, BatchIn):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def openapi_document() -> dict[str, Any]:
    """The document as the app serves it (no broker needed to build it)."""
    producer = Producer("redis://127.0.0.1:6379/0", records=None)
    try:
        return create_app(producer, keys={}).openapi()
    finally:
        producer.close()


def serve(host: str, port: int) -> None:
    limits = httpserver.ServerLimits.from_env()  # a bad setting stops here, before anything starts
    producer = Producer()
    try:
        app = create_app(producer)
        log.info("submission API on http://%s:%d/v1 (docs at /docs)", host, port)
        log.info("operator dashboard on http://%s:%d/dashboard", host, port)
        # X-Forwarded-For/-Proto only when the operator names the proxies to trust: else any local
        # process could pick its own address and walk around the per-address limits
        proxied = bool(os.environ.get("FORWARDED_ALLOW_IPS"))
        # with timeouts for slow or stalled requests, which uvicorn alone does not have
        httpserver.run(app, host, port, proxy_headers=proxied, limits=limits)
    finally:
        producer.close()
