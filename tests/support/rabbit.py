"""A RabbitMQ virtual host of its own per test, on the RabbitMQ this kind of machine runs
(127.0.0.1:5672, guest/guest), made and removed with ``rabbitmqctl``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

HOST, PORT = "127.0.0.1", 5672


def _ctl(*args: str) -> None:
    binary = shutil.which("rabbitmqctl")
    assert binary, "rabbitmqctl not found: the tests need the RabbitMQ this kind of machine runs"
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}"


def listening() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, PORT)) == 0


@contextmanager
def vhost() -> Iterator[str]:
    """An empty vhost for guest; yields its amqp:// URL."""
    assert listening(), f"no RabbitMQ on {HOST}:{PORT} (.ci/run starts it: rabbitmq-server -detached)"
    name = f"postroom-test-{uuid.uuid4().hex[:10]}"
    _ctl("add_vhost", name)
    try:
        _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{HOST}:{PORT}/{name}"
    finally:
        _ctl("delete_vhost", name)
