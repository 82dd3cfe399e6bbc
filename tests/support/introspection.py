"""The mail host's token introspection endpoint: what Dovecot's oauth2 passdb asks about a token.

Dovecot reads its ``introspection_url`` once, when the session's mail host starts, while the token
issuers (tests/support/cloud.py's CloudServer) start and stop with each test. So the mail host
serves an endpoint of its own, on a fixed port for the session, and relays each question
(RFC 7662: ``POST`` with ``token=…``) over HTTPS to the introspection route of each issuer a
test registered (:meth:`Introspection.trusting`): the first that calls the token active answers,
else the answer is ``{"active": false}``. No issuer registered: every token is inactive.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

HOST = "127.0.0.1"
PATH = "/introspect"


class Introspection:
    """An HTTPS endpoint on a free loopback port, relaying to the issuers registered."""

    def __init__(self, cert: Path, key: Path, ca_file: Path) -> None:
        self.lock = threading.Lock()
        self.issuers: list[str] = []  # their introspection URLs, asked in order
        self.asked = 0  # questions Dovecot asked: a password login must never ask one
        self._client = ssl.create_default_context(cafile=str(ca_file))
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        owner = self

        class Handler(_Handler):
            relay = owner

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = server_context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://{HOST}:{self._server.server_address[1]}{PATH}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="introspection",
            daemon=True,
        )
        self._thread.start()

    @contextlib.contextmanager
    def trusting(self, issuer_url: str) -> Iterator[None]:
        """Tokens the issuer at ``issuer_url`` (its introspection route) calls active log in,
        until the block ends."""
        with self.lock:
            self.issuers.append(issuer_url)
        try:
            yield
        finally:
            with self.lock:
                self.issuers.remove(issuer_url)

    def answer(self, token: str) -> dict[str, Any]:
        """The first registered issuer's answer that calls ``token`` active, else inactive."""
        with self.lock:
            self.asked += 1
            issuers = list(self.issuers)
        for url in issuers:
            try:
                found = httpx.post(url, data={"token": token}, verify=self._client, timeout=10).json()
            except (httpx.HTTPError, ValueError):  # an issuer that stopped (its test ended): not it
                continue
            if isinstance(found, dict) and found.get("active") is True:
                return found
        return {"active": False}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class _Handler(BaseHTTPRequestHandler):
    relay: Introspection
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode(errors="replace")) if length else {}
        if self.path.partition("?")[0] != PATH:
            status, body = 404, {"error": "not_found"}
        else:
            status, body = 200, self.relay.answer(form.get("token", [""])[0])
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)
