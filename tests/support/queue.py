"""A real Celery worker (a subprocess) on the real Redis, and the records it reads.

Every test session gets its own Redis database number on 127.0.0.1:6379 (an
empty one, flushed again at the end) and its own ``accounts/`` and ``config/``
folders; workers see them through the same environment variables an operator
would set. Retry delays and time limits are shrunk so that retries happen in
seconds; the visibility timeout is not (worker/queue/process/liveness.py brings a dead
worker's messages back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import redis

from support.smtpd import PASSWORD, SmtpServer
from worker.client import Producer
from worker.records.loader import Records

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
WRONG_PASSWORD = "wrong-pass-91c3"

# Fast retries for tests: first retry after ~0.2-0.4 s. The visibility timeout is the shipped one
# (an hour): a killed worker's messages come back through Postroom's heartbeat reaper, not kombu.
FAST_SETTINGS = {
    "POSTROOM_RETRY_MAX_ATTEMPTS": "3",
    "POSTROOM_RETRY_BASE_DELAY": "0.4",
    "POSTROOM_RETRY_MAX_DELAY": "1",
    "POSTROOM_RETRY_MAX_AGE": "120",
    "POSTROOM_SOFT_TIME_LIMIT": "4",
    "POSTROOM_TIME_LIMIT": "5",
}


def ensure_redis() -> subprocess.Popen[bytes] | None:
    """Start the Redis bundled with the embedded default on 127.0.0.1:6379 if none listens there."""
    client = redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1)
    try:
        client.ping()
        return None
    except redis.ConnectionError:
        pass
    finally:
        client.close()
    from worker.run.embedded import redis_server_binary

    args = [
        redis_server_binary(),
        "--bind",
        REDIS_HOST,
        "--port",
        str(REDIS_PORT),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_for(_answers, 15, "the test Redis to start")
    return process


def _answers() -> bool:
    client = redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def claim_database() -> int:
    """An empty Redis database number (1-15), marked as taken; 0 is left to others."""
    for db in range(15, 0, -1):
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db)
        try:
            if client.dbsize() == 0 and client.set("postroom-test:claimed", os.getpid(), nx=True):
                return db
        finally:
            client.close()
    raise RuntimeError("no empty Redis database on 127.0.0.1:6379 (FLUSHDB one of 1-15)")


class QueueEnv:
    """The folders and environment one test session's workers and producers share."""

    def __init__(self, root: Path, db: int) -> None:
        self.root = root
        self.db = db
        self.accounts = root / "accounts"
        self.config = root / "config"
        for folder in (self.accounts, self.config / "auth-profiles", self.config / "keystores"):
            folder.mkdir(parents=True, exist_ok=True)
        self.broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
        self.redis = redis.Redis(REDIS_HOST, REDIS_PORT, db=db, decode_responses=True)
        self.env = {
            "POSTROOM_BROKER_URL": self.broker_url,
            "POSTROOM_ACCOUNTS_DIR": str(self.accounts),
            "POSTROOM_CONFIG_DIR": str(self.config),
            "POSTROOM_VAR_DIR": str(root / "var"),
            # secrets the workers resolve from their environment; tests look for them in every output
            "QUEUE_TEST_PASSWORD": PASSWORD,
            "QUEUE_TEST_WRONG_PASSWORD": WRONG_PASSWORD,
            **FAST_SETTINGS,
        }

    def account(
        self, name: str, server: SmtpServer, *, limits: dict[str, Any] | None = None, **smtp: Any
    ) -> str:
        """Write ``accounts/NAME.yaml`` pointing at ``server`` (plain SMTP unless told)."""
        fields: dict[str, Any] = {
            "address": f"{name}@example.com",
            "host": "127.0.0.1",
            "port": server.port,
            "secure": False,
            "auth": "none",
            **smtp,
        }
        lines = ["provider: other", "smtp:"]
        for key, value in fields.items():
            text = ("true" if value else "false") if isinstance(value, bool) else f'"{value}"'
            lines.append(f"  {key}: {text}")
        if limits:
            lines += ["limits:", *(f"  {key}: {value}" for key, value in limits.items())]
        (self.accounts / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        return name

    def producer(self) -> Producer:
        """A producer of this queue, with the records as they are now (close it after)."""
        return Producer(self.broker_url, records=Records.load(self.accounts, self.config))

    def password_accounts(self, server: SmtpServer, ca_cert: Path) -> tuple[str, str]:
        """Two STARTTLS accounts on ``server`` (which trusts ``ca_cert``'s chain) that log in as
        user@example.com, the first with the right password, the second with a wrong one (a 535).
        Both passwords come from the workers' environment, so tests can look for them."""
        truststore = unique("ca-")
        (self.config / "keystores" / f"{truststore}.yaml").write_text(f"type: pem\ncertificates: {ca_cert}\n")
        login: dict[str, Any] = {
            "secure": True,
            "auth": "password",
            "truststore": truststore,
            "user_id": "user@example.com",
        }
        good = self.account(unique("pw"), server, password="${QUEUE_TEST_PASSWORD}", **login)
        wrong = self.account(unique("wrongpw"), server, password="${QUEUE_TEST_WRONG_PASSWORD}", **login)
        return good, wrong

    def dump(self) -> str:
        """Every value this database holds, as text: where a test looks for a leaked secret."""
        values: list[Any] = []
        for key in self.redis.keys("*"):
            kind = self.redis.type(key)
            if kind == "hash":
                values += self.redis.hgetall(key).items()
            elif kind == "string":
                values.append(self.redis.get(key))
            elif kind == "zset":
                values += self.redis.zrange(key, 0, -1)
            elif kind == "list":
                values += self.redis.lrange(key, 0, -1)
        return "\n".join(str(v) for v in values)

    def queue_length(self) -> int:
        """Jobs waiting to be taken: in the broker's queue (not taken in yet) and in the ready sets."""
        ready = sum(int(self.redis.zcard(key)) for key in self.redis.scan_iter(match="postroom:ready:*"))
        return int(self.redis.llen("postroom")) + ready

    def release(self) -> None:
        self.redis.flushdb()
        self.redis.close()


class Worker:
    """``celery -A worker.queue.app worker`` as a process group we can stop or SIGKILL."""

    def __init__(
        self,
        env: QueueEnv,
        log: Path,
        *,
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.log_path = log
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Worker:
        args = [
            sys.executable, "-m", "celery", "-A", "worker.queue.app", "worker",
            "-Q", "postroom.control", "-c", str(self.concurrency), "-l", "INFO",
            "-n", f"test-{os.getpid()}-{time.monotonic_ns()}@%h",
            "--without-gossip", "--without-mingle", *self.extra_args,
        ]  # fmt: skip
        start = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                env={**os.environ, **self.env.env, **self.extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for(lambda: b" ready." in self.log_path.read_bytes()[start:], timeout, "worker to start", self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and pool children, at once."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, worker: Worker | None = None
) -> None:
    """Poll ``condition`` until it is true; fail with the worker's log tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if worker is not None and worker.process is not None and worker.process.poll() is not None:
            break
        time.sleep(0.05)
    tail = "\n".join(worker.log().splitlines()[-40:]) if worker is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


POSTROOM = str(Path(sys.executable).with_name("postroom"))


def unique(prefix: str) -> str:
    """An account or key name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def finished(producer: Any, job_id: str, timeout: float = 30) -> Any:
    """The job once it ended (sent, dead or suppressed); fails the test otherwise."""
    job = producer.wait(job_id, timeout)
    assert job is not None and job.state in ("sent", "dead", "suppressed"), job
    return job


class OrderNotice:
    """A notification with a Bcc and a header of its own: what the tests that check those
    arrive (and the Bcc does not show) send."""

    to, bcc = "customer@example.net", "audit@example.net"
    subject, text, order = "Your order shipped", "Your order is on its way.\n", "42"

    @classmethod
    def send(cls, producer: Any, account: str) -> Any:
        """The job once it ended."""
        job_id = producer.send_notification(
            account, [cls.to], cls.subject, cls.text, bcc=[cls.bcc], headers={"X-Order": cls.order}
        )
        return finished(producer, job_id)


def cli(env: QueueEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """``postroom ARGS`` with the environment an operator of ``env`` would have."""
    return subprocess.run(
        [POSTROOM, *args],
        env={**os.environ, **env.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Live(NamedTuple):
    """What most end-to-end tests take, as one fixture (``live`` in conftest.py): the session's
    queue, its running worker, a producer and the SMTP server factory. Unpack it:
    ``queue_env, worker, producer, smtp_server = live``."""

    queue_env: QueueEnv
    worker: Worker
    producer: Producer
    smtp_server: Callable[..., SmtpServer]
