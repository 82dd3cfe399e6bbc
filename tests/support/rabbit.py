"""A RabbitMQ virtual host of its own per test, on the RabbitMQ this kind of machine runs
(127.0.0.1:5672, guest/guest), made and removed through its management HTTP API (127.0.0.1:15672),
which Postroom's ``queues`` commands, its workers and ``status`` read too.

The management plugin is enabled (``rabbitmq-plugins``) when its port does not answer: a fresh
machine runs RabbitMQ without it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

HOST, PORT, API_PORT = "127.0.0.1", 5672, 15672
API = f"http://{HOST}:{API_PORT}"
AUTH = ("guest", "guest")


def listening(port: int = PORT) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _answers() -> bool:
    try:
        return httpx.get(f"{API}/api/overview", auth=AUTH, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_management() -> None:
    """The management API answers on 15672, enabling the plugin first if need be (~5 s)."""
    if _answers():
        return
    plugins = shutil.which("rabbitmq-plugins")
    assert plugins, f"RabbitMQ's management API does not answer on {API} and rabbitmq-plugins is not found"
    done = subprocess.run(
        [plugins, "enable", "rabbitmq_management"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"rabbitmq-plugins enable rabbitmq_management: {done.stderr or done.stdout}"
    deadline = time.monotonic() + 60
    while not _answers():
        assert time.monotonic() < deadline, f"the management plugin is enabled but {API} does not answer"
        time.sleep(0.5)


def api(method: str, path: str, body: Any = None) -> Any:
    """One management API call as guest (``path`` after /api/); the JSON answer, None for a 404."""
    response = httpx.request(method, f"{API}/api/{path}", json=body, auth=AUTH, timeout=30)
    if response.status_code == 404 and method == "GET":
        return None
    assert response.status_code < 400, f"{method} /api/{path}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def queue(url: str, name: str) -> dict[str, Any] | None:
    """The management API's view of queue ``name`` in ``url``'s vhost (None: no such queue)."""
    found: dict[str, Any] | None = api(
        "GET", f"queues/{quote(vhost_of(url), safe='')}/{quote(name, safe='')}"
    )
    return found


@contextmanager
def vhost(default_queue_type: str | None = None) -> Iterator[str]:
    """An empty vhost for guest, created with ``default_queue_type`` (``quorum``: a queue
    declared with no arguments is a quorum queue) when given; yields its amqp:// URL."""
    assert listening(), f"no RabbitMQ on {HOST}:{PORT} (.ci/run starts it: rabbitmq-server -detached)"
    ensure_management()
    name = f"postroom-test-{uuid.uuid4().hex[:10]}"
    # RabbitMQ 3.10 reads "defaultqueuetype", 3.12+ documents "default_queue_type": both are sent
    body = {"defaultqueuetype": default_queue_type, "default_queue_type": default_queue_type}
    api("PUT", f"vhosts/{name}", body if default_queue_type else {})
    try:
        api("PUT", f"permissions/{name}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
        if default_queue_type:
            created = api("GET", f"vhosts/{name}") or {}
            assert created.get("default_queue_type") == default_queue_type, created
        yield f"amqp://guest:guest@{HOST}:{PORT}/{name}"
    finally:
        api("DELETE", f"vhosts/{name}")
