"""The operator dashboard: server-rendered pages under ``/dashboard`` in the HTTP app.

Pages: the overview (every account's state, last health line, certificate
expiry and counts; queue depths, in flight, retrying, held), the dead letters
(retry or purge one, or all of those shown) and a job page (state,
per-recipient results, attempts). They read the same Redis records as
``postroom status`` and act through the same functions as ``postroom
dead-letters`` (:meth:`worker.client.Producer.retry_dead_letters`,
:meth:`worker.queue.jobs.JobStore.purge`).

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
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, quote, urlencode

import redis
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.client import Producer
from worker.keys import redis_key
from worker.ops.health import AccountHealth
from worker.queue.jobs import FINAL_STATES
from worker.web import apikeys
from worker.web.apikeys import ApiKey
from worker.web.ratelimit import FailureLimiter, client_address
from worker.web.status import CERT_WARN_DAYS, Status, health_line

if TYPE_CHECKING:
    from worker.web.http import KeyRing

log = logging.getLogger("postroom.dashboard")

PREFIX = "/dashboard"
SESSION_COOKIE = "postroom_session"
DEFAULT_REFRESH = 10  # POSTROOM_DASHBOARD_REFRESH: seconds between refreshes of the overview pages (0: off)
DEFAULT_SESSION_TTL = 8 * 3600  # POSTROOM_DASHBOARD_SESSION_TTL: seconds a login lasts
DEFAULT_LOGIN_FAILURES = "10/hour"  # POSTROOM_DASHBOARD_LOGIN_FAILURES: failed logins per client address
DEAD_LETTERS_SHOWN = 500  # newest first; "retry all" / "purge all" take every one up to the newest shown
MAX_FORM_BYTES = 16 * 1024
_TEMPLATES = Path(__file__).with_name("templates")
_STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_SESSION_PREFIX = redis_key("dashboard-session", "")
# where a login may lead: a dashboard page, as a plain normalised path (segments of unreserved
# characters; no empty, "." or ".." segment, so nothing a browser would resolve elsewhere; no
# "%", "\\", scheme or host); query parameters arrive decoded, so %2e%2e is refused as ".."
_NEXT = re.compile(r"^/dashboard(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9._~-]+)*$")

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


def next_page(value: str) -> str:
    """``value`` when it names a dashboard page (see ``_NEXT``), else the overview."""
    return value if _NEXT.fullmatch(value) else PREFIX


@dataclass(frozen=True)
class DashboardSettings:
    refresh: int = DEFAULT_REFRESH
    session_ttl: int = DEFAULT_SESSION_TTL
    login_failures: str = DEFAULT_LOGIN_FAILURES
    origin: str | None = None  # POSTROOM_DASHBOARD_ORIGIN: the origin browsers use, behind a proxy

    @classmethod
    def from_env(cls) -> DashboardSettings:
        env = os.environ
        return cls(
            refresh=int(env.get("POSTROOM_DASHBOARD_REFRESH", DEFAULT_REFRESH)),
            session_ttl=int(env.get("POSTROOM_DASHBOARD_SESSION_TTL", DEFAULT_SESSION_TTL)),
            login_failures=env.get("POSTROOM_DASHBOARD_LOGIN_FAILURES", DEFAULT_LOGIN_FAILURES),
            origin=(env.get("POSTROOM_DASHBOARD_ORIGIN") or "").rstrip("/") or None,
        )


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


@dataclass(frozen=True)
class Session:
    key_name: str
    csrf: str


def _fingerprint(key: ApiKey) -> str:
    return hashlib.sha256(key.hash.encode()).hexdigest()


def _session_key(sid: str) -> str:
    return _SESSION_PREFIX + hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    """Dashboard sessions in Redis, under the hash of their id (a copy of Redis opens none)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def create(self, key: ApiKey) -> str:
        sid = secrets.token_urlsafe(32)
        record = _session_key(sid)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                record,
                mapping={
                    "key": key.name,
                    "fingerprint": _fingerprint(key),
                    "csrf": secrets.token_urlsafe(32),
                    "created_at": time.time(),
                },
            )
            pipe.expire(record, self.ttl)
            pipe.execute()
        return sid

    def load(self, sid: str, ring: KeyRing) -> Session | None:
        """The session, while its operator key still exists unchanged."""
        if not sid or len(sid) > 100:
            return None
        data = cast(dict[str, str], self.redis.hgetall(_session_key(sid)))
        if not data:
            return None
        key = ring.keys(data.get("key", "")).get(data.get("key", ""))
        fingerprint = data.get("fingerprint", "")
        if key is None or not key.operator or not hmac.compare_digest(_fingerprint(key), fingerprint):
            self.delete(sid)
            return None
        return Session(key_name=key.name, csrf=data.get("csrf", ""))

    def delete(self, sid: str) -> None:
        self.redis.delete(_session_key(sid))


class LoginNeeded(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class Refused(Exception):
    """An error page: ``status`` with ``message`` (403, 404, 429, 503 …)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers or {}
        super().__init__(message)


def _when(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["url_part"] = lambda value: quote(str(value), safe="")
    return env


def install(app: FastAPI, producer: Producer, ring: KeyRing, settings: DashboardSettings) -> None:
    """Add the dashboard's routes (left out of the OpenAPI document) to ``app``."""
    templates = _environment()
    client = producer.store.redis
    sessions = SessionStore(client, settings.session_ttl)
    limit, period = apikeys.parse_rate(settings.login_failures)
    login_failures = FailureLimiter(client, "dashboard-login", limit, period)
    static = {path.name: path.read_bytes() for path in _STATIC.iterdir() if path.suffix in _STATIC_TYPES}
    app.add_middleware(SecurityHeaders)

    def own_origin(request: Request) -> str:
        return settings.origin or f"{request.url.scheme}://{request.url.netloc}"

    def secure(request: Request) -> bool:
        return own_origin(request).startswith("https://")

    def render(
        request: Request,
        template: str,
        *,
        status: int = 200,
        session: Session | None = None,
        refresh_url: str | None = None,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        base = request.scope.get("root_path", "") + PREFIX
        html = templates.get_template(template).render(
            base=base,
            session=session,
            csrf=session.csrf if session is not None else "",
            refresh=settings.refresh if refresh_url is not None else 0,
            refresh_url=base + (refresh_url or ""),
            now=time.time(),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=headers)

    def redirect(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + PREFIX + path, status_code=303)

    @app.exception_handler(LoginNeeded)
    async def _login_needed(request: Request, exc: LoginNeeded) -> Response:
        return redirect(request, "/login?" + urlencode({"next": exc.next_path}))

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        session = await run_in_threadpool(current, request) if exc.status != 503 else None
        return render(
            request,
            "error.html",
            status=exc.status,
            session=session,
            message=exc.message,
            headers=exc.headers,
        )

    async def call(function: Any, *args: Any) -> Any:
        """Blocking Redis work off the event loop; a broker that does not answer is a 503 page."""
        try:
            return await run_in_threadpool(function, *args)
        except redis.RedisError:
            log.exception("dashboard: Redis did not answer")
            raise Refused(503, "The broker (Redis) does not answer; try again in a moment.") from None

    def current(request: Request) -> Session | None:
        try:
            return sessions.load(request.cookies.get(SESSION_COOKIE, ""), ring)
        except redis.RedisError:
            return None

    async def operator(request: Request) -> Session:
        """The session of a page request; to the login page without one."""
        session: Session | None = await call(current, request)
        if session is None:
            raise LoginNeeded(next_page(request.url.path))
        return session

    def same_origin(request: Request) -> bool:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        return origin is None or origin.lower() == own_origin(request).lower()

    async def read_form(request: Request) -> dict[str, str]:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused(413, "The form is too large.")
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
        return {name: values[0] for name, values in fields.items()}

    async def changing(request: Request) -> tuple[Session, dict[str, str]]:
        """A POST that changes something: own origin, a session, and its CSRF token; else 403."""
        if not same_origin(request):
            log.warning("dashboard: cross-site %s %s refused", request.method, request.url.path)
            raise Refused(403, "Cross-site request refused: this form must be sent from the dashboard.")
        session: Session | None = await call(current, request)
        if session is None:
            raise Refused(403, "Not logged in (or the session ended): log in again.")
        form = await read_form(request)
        token = form.get("csrf", "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            log.warning(
                "dashboard: %s %s without a valid CSRF token refused", request.method, request.url.path
            )
            raise Refused(403, "Missing or invalid CSRF token: reload the page and try again.")
        return session, form

    # ---- login / logout --------------------------------------------------------------------

    @app.get(PREFIX + "/login", include_in_schema=False)
    async def login_page(request: Request, next: str = PREFIX) -> Response:
        if await call(current, request) is not None:
            return redirect(request, "")
        return render(request, "login.html", next=next_page(next), error=None)

    @app.post(PREFIX + "/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not same_origin(request):
            raise Refused(403, "Cross-site request refused: log in from the dashboard's own page.")
        address = client_address(request)
        wait = await call(login_failures.blocked, address)
        if wait is not None:
            raise Refused(
                429,
                "Too many failed logins from this address; try again later.",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        form = await read_form(request)
        next_path = next_page(form.get("next", PREFIX))
        token = form.get("key", "").strip()
        key = apikeys.verify(ring.keys(apikeys.key_name(token)), token)
        if key is None or not key.operator:
            await call(login_failures.failed, address)
            log.info("dashboard: failed login from %s", address)
            error = "That is not an operator key."
            return render(request, "login.html", status=403, next=next_path, error=error)
        sid = await call(sessions.create, key)
        log.info("dashboard: operator key %s logged in from %s", key.name, address)
        response = RedirectResponse(request.scope.get("root_path", "") + next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=settings.session_ttl,
            path=request.scope.get("root_path", "") + PREFIX,
            httponly=True,
            samesite="strict",
            secure=secure(request),
        )
        return response

    @app.post(PREFIX + "/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session, _ = await changing(request)
        await call(sessions.delete, request.cookies.get(SESSION_COOKIE, ""))
        log.info("dashboard: operator key %s logged out", session.key_name)
        response = redirect(request, "/login")
        response.delete_cookie(
            SESSION_COOKIE,
            path=request.scope.get("root_path", "") + PREFIX,
            httponly=True,
            samesite="strict",
            secure=secure(request),
        )
        return response

    # ---- pages ----------------------------------------------------------------------------

    def snapshot() -> dict[str, Any]:
        records = producer.records(fresh=True)
        return Status(producer.store, AccountHealth(client), records).as_dict()

    @app.get(PREFIX, include_in_schema=False)
    async def overview(request: Request) -> Response:
        session = await operator(request)
        data = await call(snapshot)
        now = data["generated_at"]
        accounts = []
        for name, info in data["accounts"].items():
            health = info.get("health")
            accounts.append(
                {
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
            )
        return render(request, "overview.html", session=session, refresh_url="", data=data, accounts=accounts)

    def dead_letter_page() -> tuple[list[dict[str, Any]], int]:
        return (
            producer.store.dead_letters(limit=DEAD_LETTERS_SHOWN, newest_first=True),
            producer.store.dead_count(),
        )

    @app.get(PREFIX + "/dead-letters", include_in_schema=False)
    async def dead_letters(request: Request) -> Response:
        session = await operator(request)
        rows, total = await call(dead_letter_page)
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

    def retry(ids: list[str]) -> tuple[list[str], list[str]]:
        return producer.retry_dead_letters(ids)

    async def retry_ids(request: Request, session: Session, ids: list[str]) -> Response:
        try:
            retried, missing = await call(retry, ids)
        except Refused:
            raise
        except Exception:
            log.exception("dashboard: re-enqueueing failed")
            raise Refused(503, "The broker could not take the job(s); try again in a moment.") from None
        log.info("dashboard: %s retried %d dead letter(s)", session.key_name, len(retried))
        return redirect(
            request, "/dead-letters?" + urlencode({"retried": len(retried), "missing": len(missing)})
        )

    async def purge_ids(request: Request, session: Session, ids: list[str]) -> Response:
        purged = await call(producer.store.purge, ids)
        log.info("dashboard: %s purged %d dead letter(s)", session.key_name, purged)
        return redirect(
            request, "/dead-letters?" + urlencode({"purged": purged, "missing": len(ids) - purged})
        )

    def upto(form: dict[str, str]) -> float:
        try:
            value = float(form.get("upto", ""))
        except ValueError:
            raise Refused(400, "The form lacks the time of the newest dead letter shown.") from None
        if not math.isfinite(value):
            raise Refused(400, "The form lacks the time of the newest dead letter shown.")
        return value

    @app.post(PREFIX + "/dead-letters/retry-all", include_in_schema=False)
    async def retry_all(request: Request) -> Response:
        session, form = await changing(request)
        ids = await call(producer.store.dead_letter_ids, upto(form))
        return await retry_ids(request, session, ids)

    @app.post(PREFIX + "/dead-letters/purge-all", include_in_schema=False)
    async def purge_all(request: Request) -> Response:
        session, form = await changing(request)
        ids = await call(producer.store.dead_letter_ids, upto(form))
        return await purge_ids(request, session, ids)

    @app.post(PREFIX + "/dead-letters/{job_id}/retry", include_in_schema=False)
    async def retry_one(request: Request, job_id: str) -> Response:
        session, _ = await changing(request)
        return await retry_ids(request, session, [job_id])

    @app.post(PREFIX + "/dead-letters/{job_id}/purge", include_in_schema=False)
    async def purge_one(request: Request, job_id: str) -> Response:
        session, _ = await changing(request)
        return await purge_ids(request, session, [job_id])

    def job_view(job_id: str) -> dict[str, Any] | None:
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

    @app.get(PREFIX + "/jobs/{job_id}", include_in_schema=False)
    async def job_page(request: Request, job_id: str) -> Response:
        session = await operator(request)
        job = await call(job_view, job_id)
        if job is None:
            raise Refused(404, "No such job (it may have been purged or expired).")
        final = job["state"] in FINAL_STATES
        refresh = None if final else f"/jobs/{quote(job_id, safe='')}"
        return render(request, "job.html", session=session, refresh_url=refresh, job=job)

    @app.get(PREFIX + "/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        content = static.get(name)
        if content is None:
            raise Refused(404, "No such file.")
        return Response(content, media_type=_STATIC_TYPES[Path(name).suffix])
