"""``postroom up``: the whole service on one machine, in the foreground.

Starts the broker (the embedded Redis unless ``POSTROOM_BROKER_URL`` is set),
the development mail catcher (when an account points at it), one Celery worker
and exactly one beat, each in its own session so that a Ctrl-C reaches only
this supervisor. It then stops them in order: worker first (a warm shutdown
that finishes running tasks and hands unacknowledged messages back), then beat
and the catcher, and the broker last (Redis flushes its AOF on SIGTERM), so
nothing that was enqueued is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from worker.records.loader import Records
from worker.run.devsmtp import DEFAULT_PORT
from worker.run.embedded import EmbeddedRedis, dies_with_parent
from worker.run.workergroup import celery_command, celery_worker_args, process_count
from worker.settings import load_settings, state_url, var_dir
from worker.web.http import http_port


def _say(text: str) -> None:
    """A line for the operator; a closed pipe (``| tee`` stopped by the same Ctrl-C) must not stop
    the supervisor before it has stopped its children: output goes to /dev/null from then on."""
    try:
        print(f"postroom up: {text}", flush=True)
    except OSError:  # BrokenPipeError and friends
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wants_catcher(records: Records) -> bool:
    return any(
        a.smtp is not None and a.smtp.host in ("127.0.0.1", "localhost") and a.smtp.port == DEFAULT_PORT
        for a in records.accounts.values()
    )


def run_up(*, processes: int | None = None, concurrency: int | None = None, dev_smtp: bool = True) -> int:
    settings = load_settings()
    var = var_dir()
    var.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a stop, a closed terminal
        signal.signal(signum, on_signal)

    embedded: EmbeddedRedis | None = None
    marker = var / "broker-url"
    if not env.get("POSTROOM_BROKER_URL"):
        embedded = EmbeddedRedis(var)
        embedded.start()
        env["POSTROOM_BROKER_URL"] = embedded.url
        marker.write_text(embedded.url + "\n")
        _say(f"embedded Redis on {embedded.socket_path} (data in {embedded.data_dir}, AOF on)")
    else:
        state_url(env["POSTROOM_BROKER_URL"])  # RabbitMQ without POSTROOM_REDIS_URL: refuse at once
        _say("broker from POSTROOM_BROKER_URL")

    children: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, args: list[str]) -> None:
        # its own session (a Ctrl-C reaches only this supervisor, which stops them in order), and
        # tied to this process: if it dies anyway (SIGKILL, a crash) they get SIGTERM from the kernel
        children[name] = subprocess.Popen(  # noqa: S603
            args, env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=dies_with_parent()
        )

    try:
        if dev_smtp and _wants_catcher(Records.load()):
            if _port_in_use("127.0.0.1", DEFAULT_PORT):
                _say(f"something already listens on 127.0.0.1:{DEFAULT_PORT}; not starting dev-smtp")
            else:
                start("dev-smtp", [sys.executable, "-m", "worker.cli", "dev-smtp"])
                _say(
                    f"dev mail catcher on 127.0.0.1:{DEFAULT_PORT} (postroom dev-smtp --list); it refuses"
                    " recipients in .invalid, so --to nobody@example.invalid ends as a dead letter"
                )
        count = process_count(processes, settings.worker_processes)
        threads = concurrency or settings.worker_concurrency
        for n in range(1, count + 1):  # the same processes `postroom worker` runs
            start(f"worker-{n}", celery_worker_args(n, count, settings.worker_pool, threads, []))
        start("beat", celery_command("beat", "-l", "INFO", "-s", str(Path(var, "celerybeat-schedule"))))
        if _port_in_use("127.0.0.1", settings.metrics_port):
            _say(f"something already listens on 127.0.0.1:{settings.metrics_port}; not serving metrics")
        else:
            start("metrics", [sys.executable, "-m", "worker.cli", "metrics"])
            _say(f"Prometheus metrics on http://127.0.0.1:{settings.metrics_port}/metrics")
        port = http_port()
        if _port_in_use("127.0.0.1", port):
            _say(f"something already listens on 127.0.0.1:{port}; not serving the HTTP API")
        else:
            start("http", [sys.executable, "-m", "worker.cli", "http", "--port", str(port)])
            _say(f"HTTP submission API on http://127.0.0.1:{port}/v1 (keys: postroom api-keys new)")
            _say(f"operator dashboard on http://127.0.0.1:{port}/dashboard (api-keys new NAME --operator)")
        _say(
            "ready. Try: postroom send --account dev --to you@example.com --subject Hello "
            "--text 'It works' --wait 15"
        )
        failed = None
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    failed = f"{name} exited with {proc.returncode}"
                    stopping = True
                    break
            time.sleep(0.2)
        if failed:
            _say(f"{failed}; stopping")
        return _stop(children, embedded, marker, settings.time_limit, failed)
    except BaseException:
        _stop(children, embedded, marker, settings.time_limit, "error")
        raise


def _stop(
    children: dict[str, subprocess.Popen[bytes]],
    embedded: EmbeddedRedis | None,
    marker: Path,
    worker_grace: float,
    failed: str | None,
) -> int:
    _say("stopping (workers first, broker last)")
    workers = [name for name in children if name.startswith("worker")]
    for group, grace in ((workers, worker_grace + 5), (["beat", "metrics", "http", "dev-smtp"], 10.0)):
        running = [children[n] for n in group if n in children and children[n].poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish, the rest go back
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if embedded is not None:
        embedded.stop()
        marker.unlink(missing_ok=True)
    _say("stopped")
    return 1 if failed else 0
