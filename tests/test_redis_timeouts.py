"""Every Redis client of Postroom's state gives up on a half-open connection (issue 15).

A server that accepts the connection and then says nothing (a Redis host that
vanished without a FIN, a partition) must fail the command after the shipped
socket timeout, not hang the task thread that asked — the threads pool has no
time limit that would free it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from worker.db.keys import REDIS_TIMEOUTS
from worker.queue.store.jobs import JobStore
from worker.queue.store.marks import AsyncMarks


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


def test_the_job_store_gives_up_on_a_silent_redis_after_its_socket_timeout(silent_server: int) -> None:
    store = JobStore.from_url(f"redis://127.0.0.1:{silent_server}/0")
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        store.get("some-job")
    waited = time.monotonic() - started
    assert REDIS_TIMEOUTS["socket_timeout"] - 1 <= waited <= REDIS_TIMEOUTS["socket_timeout"] + 5, waited


def test_the_loop_side_client_has_the_same_timeouts() -> None:
    async def kwargs() -> dict[str, object]:
        marks = AsyncMarks("redis://127.0.0.1:6379/0", 60)
        try:
            return dict(marks.redis.connection_pool.connection_kwargs)
        finally:
            await marks.aclose()

    got = asyncio.run(kwargs())
    assert got["socket_timeout"] == REDIS_TIMEOUTS["socket_timeout"]
    assert got["socket_connect_timeout"] == REDIS_TIMEOUTS["socket_connect_timeout"]
