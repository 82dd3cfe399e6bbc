"""Hostile HTTP clients: deep JSON, slow or stalled requests, and a login's ``next`` that leads
elsewhere; against a real uvicorn (the configuration ``postroom http`` runs) and real Redis."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.queue import QueueEnv, unique, wait_for
from support.web import ApiServer, postroom_http, write_key
from worker.client import Producer
from worker.web import http as http_api
from worker.web import httpserver
from worker.web.dashboard.app import DashboardSettings
from worker.web.jsonbody import MAX_DEPTH

POSTROOM = str(Path(sys.executable).with_name("postroom"))


@pytest.fixture
def api(queue_env: QueueEnv) -> Iterator[tuple[str, Producer]]:
    producer = Producer(queue_env.broker_url, accounts_dir=queue_env.accounts, config_dir=queue_env.config)
    server = ApiServer(
        http_api.create_app(
            producer,
            failures="100000/minute",
            dashboard_settings=DashboardSettings(login_failures="100000/minute"),
        ),
        limits=httpserver.ServerLimits(body_timeout=1.5),
    )
    yield server.url, producer
    server.stop()
    producer.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def deep(levels: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * levels + b"]" * levels
    return b'{"a":' * levels + b"1" + b"}" * levels


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/batches"])
def test_deeply_nested_json_is_400_with_the_reason(
    queue_env: QueueEnv, api: tuple[str, Producer], caplog: pytest.LogCaptureFixture, path: str, kind: str
) -> None:
    base, _ = api
    token = write_key(queue_env, unique("deep"), ["*"])
    before = queue_env.queue_length()
    for levels in (100_000, MAX_DEPTH + 1):
        body = deep(levels, kind)
        if path == "/v1/batches":  # inside a message, where pydantic would meet it
            body = b'{"messages": [{"account": "a", "to": ["x@example.net"], "text": ' + body + b"}]}"
        reply = httpx.post(base + path, headers=auth(token), content=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == f"the JSON is nested deeper than {MAX_DEPTH} levels"
    unclosed = httpx.post(base + path, headers=auth(token), content=b"[" * 100_000)
    assert unclosed.status_code == 400, unclosed.text
    assert queue_env.queue_length() == before
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text
    # shallow enough is parsed as before: validation answers (422), not the parser
    shallow = httpx.post(base + path, headers=auth(token), content=deep(MAX_DEPTH - 2, kind))
    assert shallow.status_code == 422, shallow.text


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed (monotonic)."""
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received, time.monotonic()


def test_postroom_http_times_out_headers_that_do_not_arrive(queue_env: QueueEnv, tmp_path: Path) -> None:
    """The shipped default (10 s): a half-sent request line, a request trickled a byte at a time
    (each byte would restart uvicorn's keep-alive timer) and a silent connection are all closed."""
    assert httpserver.DEFAULT_HEADER_TIMEOUT == 10.0
    env = {**os.environ, **queue_env.env}
    for name in ("POSTROOM_HTTP_HEADER_TIMEOUT", "POSTROOM_HTTP_BODY_TIMEOUT", "FORWARDED_ALLOW_IPS"):
        env.pop(name, None)
    log = tmp_path / "http.log"
    with postroom_http(env, log) as base:
        port = int(base.rpartition(":")[2])
        half = socket.create_connection(("127.0.0.1", port))
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        opened = time.monotonic()
        half.sendall(b"POST /v1/messages HT")
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        sent = 0
        # a byte every 0.25 s, until the server answers or closes (then stop: a byte sent to a
        # closed socket would be answered with a reset, which can drop the answer unread)
        while time.monotonic() - opened < 14 and sent < len(request):
            if select.select([trickle], [], [], 0.25)[0]:
                break
            trickle.sendall(request[sent : sent + 1])
            sent += 1
        results = {}
        for name, sock in (("half", half), ("silent", silent), ("trickle", trickle)):
            received, closed = _read_until_closed(sock, max(0.5, opened + 15 - time.monotonic()))
            results[name] = (received, closed - opened)
            sock.close()
        for name, (received, after) in results.items():
            assert 9.0 <= after <= 13.0, (name, after, received)
        for name in ("half", "trickle"):
            received = results[name][0]
            assert received.startswith(b"HTTP/1.1 408 "), (name, received)
            error = json.loads(received.partition(b"\r\n\r\n")[2])["error"]
            assert error == "the request's headers did not arrive within 10 s"
        assert results["silent"][0] == b""  # it sent nothing: nothing to answer
        assert httpx.get(f"{base}/healthz").status_code == 200  # and the server serves on
    assert "Traceback" not in log.read_text()


def test_a_body_that_does_not_arrive_is_408_and_the_app_logs_no_error(
    queue_env: QueueEnv, api: tuple[str, Producer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    base, _ = api
    token = write_key(queue_env, unique("slow"), ["*"])
    port = int(base.rpartition(":")[2])
    before = queue_env.queue_length()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = (
            f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"account": ')
        start = time.monotonic()
        received, closed = _read_until_closed(sock, 10)
    assert 1.4 <= closed - start <= 5, closed - start
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"] == (
        "the request's body did not arrive within 1.5 s"
    )
    assert queue_env.queue_length() == before
    wait_for(lambda: "the client went away before its body arrived" in caplog.text, 5, "the app to see it")
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
    # a kept-alive connection: after a complete exchange, the next request is timed again
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12"
        )  # 405 answered at once, the rest of the body never comes: closed by the body deadline
        start = time.monotonic()
        received, closed = _read_until_closed(sock, 10)
        assert received.startswith(b"HTTP/1.1 405 "), received
        assert closed - start <= 5, closed - start


def test_dashboard_login_next_is_confined_to_dashboard_pages(
    queue_env: QueueEnv, api: tuple[str, Producer]
) -> None:
    base, _ = api
    operator = write_key(queue_env, unique("op"), ["*"], operator=True)
    outside = [
        "/dashboard/../v1/accounts",
        "/dashboard/..",
        "/dashboard/./x/../../healthz",
        "/dashboard//evil.example/x",
        "/dashboard/%2e%2e/v1/accounts",  # decoded once by the query string: "/dashboard/../v1…"
        "/dashboard\\..\\v1",
        "https://evil.example/dashboard",
        "//evil.example/dashboard",
        "/dashboardx",
    ]
    for wanted in outside:
        page = httpx.get(f"{base}/dashboard/login", params={"next": wanted})
        assert page.status_code == 200
        assert 'name="next" value="/dashboard"' in page.text, (wanted, page.text)
        with httpx.Client(base_url=base) as browser:
            login = browser.post(
                "/dashboard/login", data={"key": operator, "next": wanted}, follow_redirects=False
            )
        assert login.status_code == 303, (wanted, login.text)
        assert login.headers["location"] == "/dashboard", (wanted, login.headers["location"])
    page = httpx.get(f"{base}/dashboard/login", params={"next": "/dashboard/dead-letters"})
    assert 'name="next" value="/dashboard/dead-letters"' in page.text
    with httpx.Client(base_url=base) as browser:
        fine = {"key": operator, "next": "/dashboard/jobs/abc-1"}
        login = browser.post("/dashboard/login", data=fine, follow_redirects=False)
    assert login.headers["location"] == "/dashboard/jobs/abc-1"
