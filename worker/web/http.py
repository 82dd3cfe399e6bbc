"""The HTTP submission API: producers in any language enqueue with an API key.

``POST /v1/messages`` and ``POST /v1/batches`` take the ``postroom.send``
payload (contract §2) and go through :class:`worker.client.Producer`, so the
validation and its messages are the ones a Python producer gets. Every
``/v1`` request needs ``Authorization: Bearer <name>.<secret>`` (see
worker/web/apikeys.py); a key sends only from its accounts, within its request
rate, and sees only the jobs it enqueued. A client address that keeps
presenting no valid key gets 429 for a while (``POSTROOM_HTTP_AUTH_FAILURES``,
120/minute). ``/healthz`` answers while the process runs, ``/readyz`` when
the broker answers too. The operator dashboard (worker/web/dashboard/app.py) is served
under ``/dashboard`` by the same app.

This module builds the app and serves it; the routes are in worker/web/api/routes.py
(the key check in worker/web/api/auth.py, the models in worker/web/api/models.py).

The OpenAPI document the app serves is checked in as ``worker/web/openapi.json``
(``postroom http --openapi`` prints it; a test keeps the two equal).

Request bodies are bounded: ``POSTROOM_HTTP_MAX_BODY`` bytes (413), JSON nested
at most :data:`worker.web.jsonbody.MAX_DEPTH` levels (400, checked before parsing),
and ``postroom http`` closes a request whose headers or body arrive too slowly
(408; worker/web/httpserver.py).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from worker.client import Producer
from worker.db import connect
from worker.mail.payload import SendPayload
from worker.web import apikeys, httpserver
from worker.web.api import routes as api
from worker.web.api import suppressions as api_suppressions
from worker.web.api.auth import RateLimiter
from worker.web.api.models import BatchIn, HttpError
from worker.web.apikeys import ApiKey
from worker.web.dashboard import app as dashboard
from worker.web.dashboard.app import DashboardSettings
from worker.web.keyring import KeyRing
from worker.web.ratelimit import FailureLimiter

log = logging.getLogger("postroom.http")

DEFAULT_PORT = 8425  # POSTROOM_HTTP_PORT
DEFAULT_MAX_BODY = 25 * 1024 * 1024  # POSTROOM_HTTP_MAX_BODY: bytes of one request body
DEFAULT_AUTH_FAILURES = "120/minute"  # POSTROOM_HTTP_AUTH_FAILURES: 401s per client address
OPENAPI_PATH = Path(__file__).with_name("openapi.json")


def http_port() -> int:
    return int(os.environ.get("POSTROOM_HTTP_PORT", DEFAULT_PORT))


def max_body() -> int:
    return int(os.environ.get("POSTROOM_HTTP_MAX_BODY", DEFAULT_MAX_BODY))


def auth_failures() -> str:
    return os.environ.get("POSTROOM_HTTP_AUTH_FAILURES", DEFAULT_AUTH_FAILURES)


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
    count, period = apikeys.parse_rate(failures or auth_failures())
    ready_client = connect.client(producer.state, socket_connect_timeout=2, socket_timeout=2)
    app = FastAPI(
        title="Postroom submission API",
        version="1",
        description="Enqueue mail on Postroom and follow the jobs; every /v1 call needs an API key.",
    )
    app.state.ring = ring
    app.state.limiter = RateLimiter(producer.store.redis)
    app.state.auth_failures = FailureLimiter(producer.store.redis, "http-auth", count, period)
    app.state.api = api.ApiContext(
        producer=producer,
        body_limit=body_limit if body_limit is not None else max_body(),
        ready_client=ready_client,
    )
    dashboard.install(app, producer, ring, dashboard_settings or DashboardSettings.from_env())
    app.exception_handler(HttpError)(api.http_error)
    app.exception_handler(RequestValidationError)(api.validation_error)
    app.exception_handler(StarletteHTTPException)(api.starlette_error)
    app.exception_handler(ClientDisconnect)(api.client_gone)
    app.include_router(api.router)
    app.include_router(api_suppressions.router)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the schemas of the bodies the routes read by hand."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (SendPayload, BatchIn):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        _one_error_body(document)
        app.openapi_schema = document
    return app.openapi_schema


def _one_error_body(document: dict[str, Any]) -> None:
    """FastAPI documents its 422 as ``{"detail": …}``; Postroom answers every 4xx as an ErrorBody
    (api.validation_error), so the document says that."""
    schemas = document.get("components", {}).get("schemas", {})
    for path in document.get("paths", {}).values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422")
            if answer is not None and "HTTPValidationError" in str(answer):
                answer["description"] = "The request is not valid (the fields and the rules broken)"
                answer["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                }
    if "ErrorBody" in schemas:
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


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
