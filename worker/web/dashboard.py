"""The operator dashboard: server-rendered pages under ``/dashboard`` in the HTTP app.

Pages: the overview (charts of activity, latency and queue depth; every account's state,
last health line, certificate expiry and counts; queue depths, in flight, retrying, held),
an account page and the scheduled jobs (worker/web/dashboard_pages.py), the dead letters
(retry or purge one, or all of those shown) and a job page (state,
per-recipient results, attempts). They read the same Redis records as
``postroom status`` and act through the same functions as ``postroom
dead-letters`` (:meth:`worker.client.Producer.retry_dead_letters`,
:meth:`worker.queue.store.jobs.JobStore.purge`).

Access: an operator key (an API key record with ``operator: true``, see
worker/web/apikeys.py) typed into the login form opens a session: a random id in
an HttpOnly, SameSite=Strict cookie (Secure over https), of which Redis keeps
only a hash, with the key's name, a fingerprint of its record's hash (a
replaced or removed key ends its sessions) and the session's CSRF token, for
``POSTROOM_DASHBOARD_SESSION_TTL`` seconds. Failed logins are limited per
client address (``POSTROOM_DASHBOARD_LOGIN_FAILURES``).

Every POST that changes something carries the session's CSRF token in a hidden
field (compared in constant time) and must come from the dashboard's own
origin (``Origin`` and ``Sec-Fetch-Site``, when the browser sends them);
otherwise it is refused with 403 and nothing changes. Pages are sent with a
strict Content-Security-Policy (scripts and styles only from /dashboard/static,
no inline script), ``X-Frame-Options: DENY`` and ``Referrer-Policy:
same-origin``. No page shows a secret or a job's raw payload (its bodies,
headers and attachments): only what the job record says about delivery.

This module holds the pages and :func:`install`; logging in and the guards of pages and
forms are in worker/web/dashboard_auth.py, sessions in worker/web/sessions.py, what they
share (settings, rendering) in worker/web/dashboard_core.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.client import Producer
from worker.ops.health import AccountHealth
from worker.queue.store.jobrecord import FINAL_STATES
from worker.web import apikeys, dashboard_auth, dashboard_pages
from worker.web.dashboard_auth import Change, Operator, current
from worker.web.dashboard_core import (
    PREFIX,
    DashboardState,
    LoginNeeded,
    Refused,
    State,
    call,
    environment,
    redirect,
    render,
)
from worker.web.dashboard_core import SESSION_COOKIE as SESSION_COOKIE  # public here (the tests use it)
from worker.web.dashboard_core import DashboardSettings as DashboardSettings  # public here (create_app's)
from worker.web.keyring import KeyRing
from worker.web.ratelimit import FailureLimiter
from worker.web.sessions import Session, SessionStore
from worker.web.status import CERT_WARN_DAYS, Status, health_line

log = logging.getLogger("postroom.dashboard")

DEAD_LETTERS_SHOWN = 500  # newest first; "retry all" / "purge all" take every one up to the newest shown
_STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class SecurityHeaders:
    """ASGI middleware: the security headers on every response under /dashboard (errors too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI, producer: Producer, ring: KeyRing, settings: DashboardSettings) -> None:
    """Add the dashboard's routes (left out of the OpenAPI document) to ``app``."""
    client = producer.store.redis
    limit, period = apikeys.parse_rate(settings.login_failures)
    app.state.dashboard = DashboardState(
        producer=producer,
        ring=ring,
        settings=settings,
        sessions=SessionStore(client, settings.session_ttl),
        login_failures=FailureLimiter(client, "dashboard-login", limit, period),
        templates=environment(),
        static={path.name: path.read_bytes() for path in _STATIC.iterdir() if path.suffix in _STATIC_TYPES},
    )
    app.add_middleware(SecurityHeaders)
    app.exception_handler(LoginNeeded)(_login_needed)
    app.exception_handler(Refused)(_refused)
    app.include_router(dashboard_auth.router)
    app.include_router(router)
    app.include_router(dashboard_pages.router)


async def _login_needed(request: Request, exc: LoginNeeded) -> Response:
    return redirect(request, "/login?" + urlencode({"next": exc.next_path}))


async def _refused(request: Request, exc: Refused) -> Response:
    session = await run_in_threadpool(current, request) if exc.status != 503 else None
    return render(
        request, "error.html", status=exc.status, session=session, message=exc.message, headers=exc.headers
    )


# ---- pages ----------------------------------------------------------------------------------


def _snapshot(producer: Producer) -> dict[str, Any]:
    records = producer.records(fresh=True)
    return Status(
        producer.store, AccountHealth(producer.store.redis), records, producer.broker_view()
    ).as_dict()


def _account_row(name: str, info: dict[str, Any], now: float) -> dict[str, Any]:
    """One account's line on the overview."""
    health = info.get("health")
    return {
        "name": name,
        "state": info["state"],
        "reason": info.get("reason"),
        "health": health_line(health, now),
        "health_class": "none" if not health else "ok" if health.get("ok") else "failed",
        "certificates": [
            (label, days, days < CERT_WARN_DAYS)
            for label, days in sorted(info["certificate_days_left"].items())
        ],
        "sent_hour": info["last_hour"]["sent"],
        "sent": info["sent"],
        "failed": info["failed"],
        "retried": info["retried"],
        "dead": info["dead"],
        "held": info["held"],
    }


@router.get("")
async def overview(request: Request, session: Operator, state: State) -> Response:
    data = await call(_snapshot, state.producer)
    charts = await call(dashboard_pages.activity_charts, state.producer)
    now = data["generated_at"]
    accounts = [_account_row(name, info, now) for name, info in data["accounts"].items()]
    return render(
        request, "overview.html", session=session, refresh_url="", data=data, accounts=accounts, charts=charts
    )


def _dead_letter_page(producer: Producer) -> tuple[list[dict[str, Any]], int]:
    return (
        producer.store.dead_letters(limit=DEAD_LETTERS_SHOWN, newest_first=True),
        producer.store.dead_count(),
    )


@router.get("/dead-letters")
async def dead_letters(request: Request, session: Operator, state: State) -> Response:
    rows, total = await call(_dead_letter_page, state.producer)
    done = {
        name: int(value)
        for name in ("retried", "purged", "missing")
        if (value := request.query_params.get(name, "")).isdigit() and len(value) < 10
    }
    return render(
        request,
        "dead_letters.html",
        session=session,
        refresh_url="/dead-letters",
        rows=rows,
        total=total,
        upto=repr(rows[0]["failed_at"]) if rows else "",
        done=done,
    )


async def _retry_ids(request: Request, state: DashboardState, session: Session, ids: list[str]) -> Response:
    try:
        retried, missing = await call(state.producer.retry_dead_letters, ids)
    except Refused:
        raise
    except Exception:
        log.exception("dashboard: re-enqueueing failed")
        raise Refused(503, "The broker could not take the job(s); try again in a moment.") from None
    log.info("dashboard: %s retried %d dead letter(s)", session.key_name, len(retried))
    return redirect(request, "/dead-letters?" + urlencode({"retried": len(retried), "missing": len(missing)}))


async def _purge_ids(request: Request, state: DashboardState, session: Session, ids: list[str]) -> Response:
    purged = await call(state.producer.store.purge, ids)
    log.info("dashboard: %s purged %d dead letter(s)", session.key_name, purged)
    return redirect(request, "/dead-letters?" + urlencode({"purged": purged, "missing": len(ids) - purged}))


def _upto(form: dict[str, str]) -> float:
    """The form's time of the newest dead letter shown: "all" means every one up to it."""
    try:
        value = float(form.get("upto", ""))
    except ValueError:
        raise Refused(400, "The form lacks the time of the newest dead letter shown.") from None
    if not math.isfinite(value):
        raise Refused(400, "The form lacks the time of the newest dead letter shown.")
    return value


@router.post("/dead-letters/retry-all")
async def retry_all(request: Request, change: Change, state: State) -> Response:
    ids = await call(state.producer.store.dead_letter_ids, _upto(change.form))
    return await _retry_ids(request, state, change.session, ids)


@router.post("/dead-letters/purge-all")
async def purge_all(request: Request, change: Change, state: State) -> Response:
    ids = await call(state.producer.store.dead_letter_ids, _upto(change.form))
    return await _purge_ids(request, state, change.session, ids)


@router.post("/dead-letters/{job_id}/retry")
async def retry_one(request: Request, job_id: str, change: Change, state: State) -> Response:
    return await _retry_ids(request, state, change.session, [job_id])


@router.post("/dead-letters/{job_id}/purge")
async def purge_one(request: Request, job_id: str, change: Change, state: State) -> Response:
    return await _purge_ids(request, state, change.session, [job_id])


def _job_view(producer: Producer, job_id: str) -> dict[str, Any] | None:
    job = producer.store.get(job_id) if len(job_id) <= 100 else None
    if job is None:
        return None
    payload = job.payload or {}
    return {
        **job.as_dict(),  # never the payload: bodies, headers and attachments stay out
        "subject": payload.get("subject") if isinstance(payload.get("subject"), str) else None,
        "submitted_by": job.submitted_by,
        "dead": producer.store.is_dead(job_id),
    }


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str, session: Operator, state: State) -> Response:
    job = await call(_job_view, state.producer, job_id)
    if job is None:
        raise Refused(404, "No such job (it may have been purged or expired).")
    final = job["state"] in FINAL_STATES
    refresh = None if final else f"/jobs/{quote(job_id, safe='')}"
    return render(request, "job.html", session=session, refresh_url=refresh, job=job)


@router.get("/static/{name}")
async def static_file(name: str, state: State) -> Response:
    content = state.static.get(name)
    if content is None:
        raise Refused(404, "No such file.")
    return Response(content, media_type=_STATIC_TYPES[Path(name).suffix])
