"""The HTTP app on a real uvicorn (a thread of the test process, port 0), and API key records."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from support.queue import POSTROOM, QueueEnv, wait_for
from worker.web import apikeys
from worker.web.httpserver import ServerConfig, ServerLimits


class ApiServer:
    """uvicorn serving the app in a thread of this process, on a free port."""

    def __init__(self, app: Any, limits: ServerLimits | None = None) -> None:
        # the configuration postroom http runs with (its timeouts and limits), on port 0
        config = ServerConfig(
            app, limits=limits or ServerLimits(), host="127.0.0.1", port=0, log_level="info", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def write_key(
    env: QueueEnv, name: str, accounts: list[str], rate: str = "1000/minute", *, operator: bool = False
) -> str:
    """``config/api-keys/NAME.yaml`` (hash only); returns the key ``NAME.SECRET``."""
    folder = env.config / "api-keys"
    folder.mkdir(exist_ok=True)
    token = apikeys.new_token(name)
    record = f"hash: {apikeys.hash_token(token)}\naccounts: {json.dumps(accounts)}\nrate: {rate}\n"
    (folder / f"{name}.yaml").write_text(record + ("operator: true\n" if operator else ""))
    return token


@contextlib.contextmanager
def postroom_http(env: dict[str, str], log: Path) -> Iterator[str]:
    """``postroom http`` as an operator starts it (a subprocess, on a free port, its output in
    ``log``); yields its base URL once /healthz answers, and stops it afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [POSTROOM, "http", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 20, "postroom http to answer")
        yield base
    finally:
        process.terminate()
        process.wait(20)
