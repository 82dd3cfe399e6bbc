"""What every dashboard module shares: its settings, the per-app state that
:func:`worker.web.dashboard.install` keeps on ``app.state``, page rendering and the
exceptions that become error pages or the login page."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import quote

import redis
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool

from worker.client import Producer
from worker.web.dashboard.sessions import Session, SessionStore
from worker.web.keyring import KeyRing
from worker.web.ratelimit import FailureLimiter

log = logging.getLogger("postroom.dashboard")

PREFIX = "/dashboard"
SESSION_COOKIE = "postroom_session"
DEFAULT_REFRESH = 10  # POSTROOM_DASHBOARD_REFRESH: seconds between refreshes of the overview pages (0: off)
DEFAULT_SESSION_TTL = 8 * 3600  # POSTROOM_DASHBOARD_SESSION_TTL: seconds a login lasts
DEFAULT_LOGIN_FAILURES = "10/hour"  # POSTROOM_DASHBOARD_LOGIN_FAILURES: failed logins per client address
_TEMPLATES = Path(__file__).with_name("templates")
# where a login may lead: a dashboard page, as a plain normalised path (segments of unreserved
# characters; no empty, "." or ".." segment, so nothing a browser would resolve elsewhere; no
# "%", "\\", scheme or host); query parameters arrive decoded, so %2e%2e is refused as ".."
_NEXT = re.compile(r"^/dashboard(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9._~-]+)*$")


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


@dataclass(frozen=True)
class DashboardState:
    """What the dashboard's routes work with, one per app (``app.state.dashboard``)."""

    producer: Producer
    ring: KeyRing
    settings: DashboardSettings
    sessions: SessionStore
    login_failures: FailureLimiter
    templates: Environment
    static: dict[str, bytes]  # file name -> content, read once


def state_of(request: Request) -> DashboardState:
    """The app's :class:`DashboardState` (the routes are shared by every app; the state is not)."""
    return cast(DashboardState, request.app.state.dashboard)


State = Annotated[DashboardState, Depends(state_of)]


class LoginNeeded(Exception):
    """To the login page, and from there back to ``next_path``."""

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


def environment() -> Environment:
    """The templates, HTML-escaped, with the filters they use."""
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
    """A page; it refreshes itself (every ``settings.refresh`` s) when ``refresh_url`` is given."""
    state = state_of(request)
    base = request.scope.get("root_path", "") + PREFIX
    html = state.templates.get_template(template).render(
        base=base,
        session=session,
        csrf=session.csrf if session is not None else "",
        refresh=state.settings.refresh if refresh_url is not None else 0,
        refresh_url=base + (refresh_url or ""),
        now=time.time(),
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=headers)


def redirect(request: Request, path: str) -> RedirectResponse:
    """A 303 to the dashboard page ``path`` (relative to the dashboard)."""
    return RedirectResponse(request.scope.get("root_path", "") + PREFIX + path, status_code=303)


async def call(function: Any, *args: Any) -> Any:
    """Blocking Redis work off the event loop; a broker that does not answer is a 503 page."""
    try:
        return await run_in_threadpool(function, *args)
    except redis.RedisError:
        log.exception("dashboard: Redis did not answer")
        raise Refused(503, "The broker (Redis) does not answer; try again in a moment.") from None
