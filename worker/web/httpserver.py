"""How ``postroom http`` runs uvicorn: its limits, and the request timeouts uvicorn lacks.

uvicorn times out only an idle keep-alive connection (``timeout_keep_alive``),
and that timer is cancelled by the first byte a client sends: a client that
trickles a request line, its headers or its body one byte at a time (or opens
a connection and stops half-way) holds a connection and a task for ever. ASGI
middleware cannot help with the headers, since the app is called only once
they are complete. So the HTTP protocol here is uvicorn's h11 protocol with
one timer more, for what the client owes at each moment:

- its headers: within ``POSTROOM_HTTP_HEADER_TIMEOUT`` seconds (10) of the
  connection opening, or of the previous response on a kept-alive connection;
- its body: within ``POSTROOM_HTTP_BODY_TIMEOUT`` seconds (60) of its headers.

Past that the connection is answered ``408`` (a JSON error body like the API's
others; nothing when the client sent nothing at all) and closed.
``POSTROOM_HTTP_MAX_CONNECTIONS`` (1000) bounds the connections and requests
served at once (uvicorn's ``limit_concurrency``: 503 past it), and the request
line and headers may take 16 KiB (``h11_max_incomplete_event_size``: 400 past
it).

This module is the one place that knows uvicorn's internals (the
``H11Protocol`` class, its ``conn``, ``cycle`` and ``transport`` attributes,
and the ``handle_events`` / ``on_response_complete`` hooks), checked against
uvicorn 0.30 to 0.54. The h11 protocol is always used (never httptools), so
these timeouts hold whatever uvicorn would pick on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("postroom.http")

DEFAULT_HEADER_TIMEOUT = 10.0  # POSTROOM_HTTP_HEADER_TIMEOUT: seconds for the request line and headers
DEFAULT_BODY_TIMEOUT = 60.0  # POSTROOM_HTTP_BODY_TIMEOUT: seconds for the body, once the headers are in
DEFAULT_MAX_CONNECTIONS = 1000  # POSTROOM_HTTP_MAX_CONNECTIONS: connections and requests at once
KEEP_ALIVE = 5  # seconds an idle kept-alive connection stays open (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # the request line and headers of one request

Phase = Literal["headers", "body"]


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @classmethod
    def from_env(cls) -> ServerLimits:
        env = os.environ
        limits = cls(
            header_timeout=float(env.get("POSTROOM_HTTP_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT)),
            body_timeout=float(env.get("POSTROOM_HTTP_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT)),
            max_connections=int(env.get("POSTROOM_HTTP_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS)),
        )
        if not (limits.header_timeout > 0 and limits.body_timeout > 0 and limits.max_connections > 0):
            raise ValueError(
                "POSTROOM_HTTP_HEADER_TIMEOUT, POSTROOM_HTTP_BODY_TIMEOUT and "
                "POSTROOM_HTTP_MAX_CONNECTIONS must be positive"
            )
        return limits


class ServerConfig(uvicorn.Config):
    """uvicorn's Config with Postroom's limits (read by :class:`TimedH11Protocol`)."""

    def __init__(self, app: Any, *, limits: ServerLimits | None = None, **kwargs: Any) -> None:
        self.limits = limits or ServerLimits.from_env()
        kwargs.setdefault("server_header", False)
        super().__init__(
            app,
            http=TimedH11Protocol,
            timeout_keep_alive=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            limit_concurrency=self.limits.max_connections,
            **kwargs,
        )


def _timeout_response(phase: Phase, seconds: float) -> bytes:
    body = json.dumps(
        {"error": f"the request's {phase} did not arrive within {seconds:g} s", "problems": []}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for the headers and one for the body."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits if isinstance(config, ServerConfig) else ServerLimits.from_env()
        self._phase: Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _follow(self) -> None:
        """(Re)arm the deadline for what the client owes now: headers, a body, or nothing."""
        if self.transport is None or self.transport.is_closing():
            self._stop()
            return
        state = self.conn.their_state
        phase: Phase | None = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self._phase:
            return  # the same request's same part: its deadline stands
        self._stop()
        if phase is not None:
            seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _expired(self, phase: Phase, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == "headers":
            answer = bool(self.conn.trailing_data[0])  # silence for a connection that sent nothing
        else:
            answer = self.cycle is not None and not self.cycle.response_started
        log.info("closed the connection of %s: its request's %s took over %g s", client, phase, seconds)
        if answer:
            self.transport.write(_timeout_response(phase, seconds))
        self.transport.close()


def run(app: Any, host: str, port: int, *, proxy_headers: bool, limits: ServerLimits | None = None) -> None:
    """Serve ``app`` until a signal stops it (what ``uvicorn.run`` does, with Postroom's limits)."""
    config = ServerConfig(
        app, limits=limits, host=host, port=port, log_level="info", proxy_headers=proxy_headers
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own exit status when it cannot start (e.g. port taken)
