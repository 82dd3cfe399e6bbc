"""Who may use the dashboard: logging in and out with an operator key, and the dependencies
that guard every page (:data:`Operator`) and every form that changes something (:data:`Change`)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from worker.web import apikeys
from worker.web.dashboard.base import (
    PREFIX,
    SESSION_COOKIE,
    LoginNeeded,
    Refused,
    State,
    call,
    next_page,
    redirect,
    render,
    state_of,
)
from worker.web.dashboard.sessions import Session
from worker.web.ratelimit import client_address, retry_after

log = logging.getLogger("postroom.dashboard")

MAX_FORM_BYTES = 16 * 1024

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def own_origin(request: Request) -> str:
    """The origin browsers use: the configured one behind a proxy, else the request's."""
    return state_of(request).settings.origin or f"{request.url.scheme}://{request.url.netloc}"


def secure(request: Request) -> bool:
    """Whether the session cookie gets ``Secure`` (the dashboard is reached over https)."""
    return own_origin(request).startswith("https://")


def current(request: Request) -> Session | None:
    """The request's session, if its cookie names a live one (None too when Redis does not answer)."""
    state = state_of(request)
    try:
        return state.sessions.load(request.cookies.get(SESSION_COOKIE, ""), state.ring)
    except redis.RedisError:
        return None


async def operator(request: Request) -> Session:
    """The session of a page request; to the login page without one."""
    session: Session | None = await call(current, request)
    if session is None:
        raise LoginNeeded(next_page(request.url.path))
    return session


Operator = Annotated[Session, Depends(operator)]


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (CSRF, login CSRF)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin.lower() == own_origin(request).lower()


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form, first value of each field (413 past :data:`MAX_FORM_BYTES`)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "The form is too large.")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
    return {name: values[0] for name, values in fields.items()}


@dataclass(frozen=True)
class Changing:
    """A request allowed to change something: its session and its form."""

    session: Session
    form: dict[str, str]


async def changing(request: Request) -> Changing:
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
        log.warning("dashboard: %s %s without a valid CSRF token refused", request.method, request.url.path)
        raise Refused(403, "Missing or invalid CSRF token: reload the page and try again.")
    return Changing(session, form)


Change = Annotated[Changing, Depends(changing)]


@router.get("/login")
async def login_page(request: Request, next: str = PREFIX) -> Response:
    if await call(current, request) is not None:
        return redirect(request, "")
    return render(request, "login.html", next=next_page(next), error=None)


@router.post("/login")
async def login(request: Request, state: State) -> Response:
    if not same_origin(request):
        raise Refused(403, "Cross-site request refused: log in from the dashboard's own page.")
    address = client_address(request)
    wait = await call(state.login_failures.blocked, address)
    if wait is not None:
        raise Refused(429, "Too many failed logins from this address; try again later.", retry_after(wait))
    form = await read_form(request)
    next_path = next_page(form.get("next", PREFIX))
    token = form.get("key", "").strip()
    key = apikeys.verify(state.ring.keys(apikeys.key_name(token)), token)
    if key is None or not key.operator:
        await call(state.login_failures.failed, address)
        log.info("dashboard: failed login from %s", address)
        error = "That is not an operator key."
        return render(request, "login.html", status=403, next=next_path, error=error)
    sid = await call(state.sessions.create, key)
    log.info("dashboard: operator key %s logged in from %s", key.name, address)
    response = RedirectResponse(request.scope.get("root_path", "") + next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=state.settings.session_ttl,
        path=request.scope.get("root_path", "") + PREFIX,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )
    return response


@router.post("/logout")
async def logout(request: Request, change: Change, state: State) -> Response:
    await call(state.sessions.delete, request.cookies.get(SESSION_COOKIE, ""))
    log.info("dashboard: operator key %s logged out", change.session.key_name)
    response = redirect(request, "/login")
    response.delete_cookie(
        SESSION_COOKIE,
        path=request.scope.get("root_path", "") + PREFIX,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )
    return response
