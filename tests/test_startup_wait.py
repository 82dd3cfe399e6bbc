"""Services that start before their broker (worker/queue/broker/reach.py): a compose stack starts
in any order, so worker, beat, http and metrics wait for Redis and the broker, logged and bounded.

Real processes: ``postroom beat`` / ``worker`` / ``http`` started against a port where nothing
listens, then a real redis-server (or a forwarder to the real RabbitMQ) started on that port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from support.queue import claim_database
from support.redisproc import HOST, RedisProcess, free_port
from worker.mail.payload import HEALTH_TASK_NAME
from worker.queue.broker.reach import NotReachable, retry_until

RABBIT_PORT = 5672
POSTROOM = [sys.executable, "-m", "worker.cli"]


def _env(tmp_path: Path, broker_url: str, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    for folder in ("accounts", "config", "var"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return {
        **clean,
        "POSTROOM_BROKER_URL": broker_url,
        "POSTROOM_ACCOUNTS_DIR": str(tmp_path / "accounts"),
        "POSTROOM_CONFIG_DIR": str(tmp_path / "config"),
        "POSTROOM_VAR_DIR": str(tmp_path / "var"),
        "POSTROOM_WORKER_CONCURRENCY": "2",
        **extra,
    }


def _wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"{what}: not within {timeout} s\n{tail}")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Start ``postroom ARGS`` in the background (output in a log file); stopped afterwards."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{args[0]}-{len(processes)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*POSTROOM, *args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        processes.append(process)
        return process, log

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _waits(log: Path, tries: int = 2) -> Callable[[], bool]:
    return lambda: log.read_text().count("not reachable yet") >= tries


def _health_task_queued(client: redis.Redis) -> bool:
    """The beat's first health check is a message in some list of the broker's Redis."""
    for key in client.scan_iter(count=1000):
        if client.type(key) == b"list" and any(
            HEALTH_TASK_NAME.encode() in item for item in client.lrange(key, 0, -1)
        ):
            return True
    return False


def test_beat_waits_for_its_redis_then_sends_the_first_health_check(
    tmp_path: Path, started: Callable[..., tuple[subprocess.Popen[bytes], Path]]
) -> None:
    port = free_port()
    beat, log = started(["beat"], _env(tmp_path, f"redis://{HOST}:{port}/0"))
    _wait_until(_waits(log), 30, "beat logs that Redis is not reachable yet", log)
    assert beat.poll() is None, log.read_text()
    server = RedisProcess(tmp_path / "redis", port=port).start()
    try:
        client = redis.Redis(HOST, port)
        _wait_until(lambda: _health_task_queued(client), 40, "the first health check is published", log)
        client.close()
        assert "reachable after" in log.read_text()
        assert beat.poll() is None
    finally:
        server.stop()


def test_worker_waits_for_its_redis_then_starts_consuming(
    tmp_path: Path, started: Callable[..., tuple[subprocess.Popen[bytes], Path]]
) -> None:
    port = free_port()
    worker, log = started(["worker", "--processes", "1"], _env(tmp_path, f"redis://{HOST}:{port}/0"))
    _wait_until(_waits(log), 30, "the worker logs that Redis is not reachable yet", log)
    assert "ready." not in log.read_text()
    server = RedisProcess(tmp_path / "redis", port=port).start()
    try:
        _wait_until(lambda: "ready." in log.read_text(), 60, "the Celery worker is ready", log)
        assert worker.poll() is None
    finally:
        server.stop()


def test_a_wait_is_bounded_and_names_no_password(
    tmp_path: Path, started: Callable[..., tuple[subprocess.Popen[bytes], Path]]
) -> None:
    port = free_port()
    env = _env(tmp_path, f"redis://:s3cret-pw@{HOST}:{port}/0", POSTROOM_STARTUP_WAIT="2")
    began = time.monotonic()
    http, log = started(["http", "--port", str(free_port())], env)
    assert http.wait(30) == 1
    output = log.read_text()
    assert time.monotonic() - began < 30
    assert "still not reachable" in output and f"{HOST}:{port}" in output, output
    assert "s3cret-pw" not in output and "Traceback" not in output, output
    assert output.count("not reachable yet") >= 2, output  # retried, not one try


FORWARDER = textwrap.dedent(
    """
    import asyncio, sys

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """
)


def test_http_waits_for_rabbitmq_then_serves(
    tmp_path: Path, started: Callable[..., tuple[subprocess.Popen[bytes], Path]]
) -> None:
    """RabbitMQ slower than Redis (the compose stack's rabbitmq profile): the broker is waited for
    too. The port comes alive as a forwarder to the real RabbitMQ starts on it."""
    port, http_port = free_port(), free_port()
    db = claim_database()
    env = _env(
        tmp_path,
        f"amqp://guest:guest@{HOST}:{port}//",
        POSTROOM_REDIS_URL=f"redis://{HOST}:6379/{db}",
    )
    try:
        http, log = started(["http", "--port", str(http_port)], env)
        _wait_until(_waits(log), 30, "http logs that RabbitMQ is not reachable yet", log)
        assert "broker at amqp://***@" in log.read_text()  # the URL without its password
        forwarder = subprocess.Popen([sys.executable, "-c", FORWARDER, str(port), str(RABBIT_PORT)])
        try:

            def serves() -> bool:
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{http_port}/healthz", timeout=2) as answer:
                        return bool(answer.status == 200)
                except OSError:
                    return False

            _wait_until(serves, 60, "http answers /healthz", log)
            assert "reachable after" in log.read_text() and http.poll() is None
        finally:
            forwarder.terminate()
            forwarder.wait(10)
    finally:
        redis.Redis(HOST, 6379, db=db).flushdb()


def test_retry_until_retries_only_connection_trouble() -> None:
    """A wrong setting is not waited for: only a connection that failed is tried again."""
    calls: list[int] = []
    said: list[str] = []

    def refused() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    began = time.monotonic()
    with pytest.raises(
        NotReachable, match=r"test: still not reachable after \d tries \(ConnectionRefusedError"
    ):
        retry_until("test", refused, within=1.0, say=said.append)
    assert 1.0 <= time.monotonic() - began < 2.0
    assert len(calls) in (3, 4) and len(said) == len(calls) - 1  # after 0.5 s, then the 0.5 s left

    def wrong() -> None:
        raise ValueError("not a URL")

    with pytest.raises(ValueError, match="not a URL"):
        retry_until("test", wrong, within=10.0, say=said.append)


def test_a_refused_login_ends_the_bounded_wait_with_the_server_s_words(
    tmp_path: Path, started: Callable[..., tuple[subprocess.Popen[bytes], Path]]
) -> None:
    """A wrong RabbitMQ password is tried again until the bound (a first boot makes its user as
    it starts), then one line names the refusal: no traceback, no password."""
    db = claim_database()
    env = _env(
        tmp_path,
        f"amqp://guest:wr0ng-pass@{HOST}:{RABBIT_PORT}//",
        POSTROOM_REDIS_URL=f"redis://{HOST}:6379/{db}",
        POSTROOM_STARTUP_WAIT="1",
    )
    try:
        http, log = started(["http", "--port", str(free_port())], env)
        assert http.wait(30) == 1
        output = log.read_text()
        assert "ACCESS_REFUSED" in output and "still not reachable" in output, output
        assert "wr0ng-pass" not in output and "Traceback" not in output, output
    finally:
        redis.Redis(HOST, 6379, db=db).flushdb()
