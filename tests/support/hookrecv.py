"""A webhook receiver as a user writes one, run as its own process so a test can SIGKILL it.

``python hookrecv.py PORT LOG [--fail-first N]``: verifies every request with the
``standardwebhooks`` package (secret from ``HOOK_SECRET``), appends one JSON line per request
to LOG (written and flushed before the answer), answers 500 to the first N requests, then 204
(400 to a request whose signature does not verify).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # run as a script too (the receiver), where support/ is not a package
    from support.queue import QueueEnv

HERE = Path(__file__).resolve()


def serve(port: int, log_path: Path, fail_first: int) -> None:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    verifier = Webhook(os.environ["HOOK_SECRET"])
    lock = threading.Lock()
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verifier.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
            with lock:
                seen[0] += 1
                status = 400 if not verified else (500 if seen[0] <= fail_first else 204)
                event = json.loads(body) if verified else {}
                line = {
                    "webhook_id": headers.get("webhook-id"),
                    "verified": verified,
                    "answered": status,
                    "type": event.get("type"),
                    "job_id": (event.get("data") or {}).get("id"),
                    "state": (event.get("data") or {}).get("state"),
                    "body": body.decode("utf-8", "replace"),
                    "path": self.path,
                }
                with log_path.open("a") as log:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


class Receiver:
    """The receiver process, on a port of its own that survives a restart."""

    def __init__(self, log: Path, secret: str, *, fail_first: int = 0, port: int | None = None) -> None:
        self.log_path = log
        self.secret = secret
        self.fail_first = fail_first
        self.port = port or free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), str(self.port), str(self.log_path), str(self.fail_first)],
            env={**os.environ, "HOOK_SECRET": self.secret},
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"
        self.process.stdout.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def requests(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def new_webhook(env: QueueEnv, name: str, url: str, *args: str) -> str:
    """``postroom webhooks new NAME --url URL ARGS``: its secret."""
    from support.queue import cli

    made = cli(env, "webhooks", "new", name, "--url", url, *args)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("whsec_") and "shown only now" in made.stderr
    return secret


def delivered(receiver: Receiver) -> set[tuple[str | None, str | None]]:
    return {(r["job_id"], r["type"]) for r in receiver.requests() if r["answered"] == 204}


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)


def refusing_webhook(env: QueueEnv, log_path: Path) -> tuple[Receiver, str, Any]:
    """A receiver that answers 500 to everything, its record ``down`` in ``env``'s config (a
    folder of its own) and the routing table published: (receiver, secret, the Webhook record)."""
    from worker.queue.events import outbox
    from worker.records.loader import load_webhooks
    from worker.records.webhooks import new_secret

    secret = new_secret()
    receiver = Receiver(log_path, secret, fail_first=1000).start()
    folder = env.config / "webhooks"
    folder.mkdir()
    (folder / "down.yaml").write_text(f"url: {receiver.url}\nsecret: {secret}\nallow_private: true\n")
    hooks, _ = load_webhooks(env.config)
    outbox.publish_routes(env.redis, {"down": hooks["down"].route()})
    return receiver, secret, hooks["down"]
