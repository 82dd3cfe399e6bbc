"""The operator dashboard: server-rendered pages under ``/dashboard`` in the HTTP app.

Pages: the overview (charts of activity, latency and queue depth; every account's state,
last health line, certificate expiry and counts; queue depths, in flight, retrying, held),
an account page and the scheduled jobs (worker/web/dashboard/accounts.py), the dead letters
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
forms are in worker/web/dashboard/auth.py, sessions in worker/web/dashboard/sessions.py, what they
share (settings, rendering) in worker/web/dashboard/base.py.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.client import Producer
from worker.web import apikeys
from worker.web.dashboard import accounts, auth, deadletters, jobs, overview
from worker.web.dashboard.auth import current
from worker.web.dashboard.base import (
    PREFIX,
    DashboardState,
    LoginNeeded,
    Refused,
    State,
    environment,
    redirect,
    render,
)
from worker.web.dashboard.base import SESSION_COOKIE as SESSION_COOKIE  # public here (the tests use it)
from worker.web.dashboard.base import DashboardSettings as DashboardSettings  # public here (create_app's)
from worker.web.dashboard.sessions import SessionStore
from worker.web.keyring import KeyRing
from worker.web.ratelimit import FailureLimiter

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
    for routes in (auth, overview, deadletters, jobs, accounts):
        app.include_router(routes.router)
    app.include_router(router)  # the static files


async def _login_needed(request: Request, exc: LoginNeeded) -> Response:
    return redirect(request, "/login?" + urlencode({"next": exc.next_path}))


async def _refused(request: Request, exc: Refused) -> Response:
    session = await run_in_threadpool(current, request) if exc.status != 503 else None
    return render(
        request, "error.html", status=exc.status, session=session, message=exc.message, headers=exc.headers
    )


# ---- pages ----------------------------------------------------------------------------------


@router.get("/static/{name}")
async def static_file(name: str, state: State) -> Response:
    content = state.static.get(name)
    if content is None:
        raise Refused(404, "No such file.")
    return Response(content, media_type=_STATIC_TYPES[Path(name).suffix])
