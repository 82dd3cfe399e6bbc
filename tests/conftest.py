"""Session fixtures: the throwaway PKI, a factory of real SMTP servers, and a DNS server of the
session's own that every postroom the tests start asks instead of the machine's resolver."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cloud import CloudServer
from support.dnsserver import DnsServer
from support.mailhost import MailHost, missing_programs
from support.pki import Pki
from support.queue import Live, QueueEnv, Worker, claim_database, ensure_redis
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.queue.store import emit


@pytest.fixture(scope="session", autouse=True)
def session_dns() -> Iterator[DnsServer]:
    """``POSTROOM_DNS_RESOLVER`` for every test and every process a test starts: a server that
    serves no zone (it refuses every question, so a connectivity check's deliverability lines say
    "no verdict" at once). No test depends on the machine's resolver or the network; the
    preflight's own tests serve zones on servers of their own."""
    server = DnsServer()
    patch = pytest.MonkeyPatch()
    patch.setenv("POSTROOM_DNS_RESOLVER", server.address)
    yield server
    patch.undo()
    server.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mailhost(pki: Pki) -> Iterator[MailHost]:
    """A real Postfix (submission, DSNs) and Dovecot (IMAPS mailboxes), once per session: they
    take seconds to start. Each test adds users of its own (tests/support/mailhost.py)."""
    missing = missing_programs()
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run `make tools` (as root) for Debian's postfix and dovecot"
        )
    host = MailHost(pki).start()
    yield host
    host.stop()


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[Callable[..., SmtpServer]]:
    """``smtp_server(mode=..., **behaviour)`` starts a server; all stop at teardown."""
    servers: list[SmtpServer] = []

    def start(**kwargs: Any) -> SmtpServer:
        kwargs.setdefault("cert", pki.server_cert)
        kwargs.setdefault("key", pki.server_key)
        server = SmtpServer(**kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def cloud(pki: Pki) -> Iterator[CloudServer]:
    """A local HTTPS Microsoft identity platform + Graph + Google token endpoint."""
    from worker.transports import oauth

    server = CloudServer(pki.server_cert, pki.server_key)
    yield server
    server.stop()
    oauth.forget_sources()


@pytest.fixture(scope="session")
def real_redis() -> Iterator[None]:
    """The Redis on 127.0.0.1:6379 (started from the bundled server when none is running)."""
    started = ensure_redis()
    yield
    if started is not None:
        started.terminate()
        started.wait(10)


@pytest.fixture(scope="session")
def queue_env(real_redis: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueEnv]:
    """Records folders and a Redis database of this session's own (flushed after)."""
    env = QueueEnv(tmp_path_factory.mktemp("queue"), claim_database())
    yield env
    env.release()


@pytest.fixture
def own_queue(real_redis: None, tmp_path: Path) -> Iterator[QueueEnv]:
    """A Redis database of its own: no session worker takes these jobs."""
    env = QueueEnv(tmp_path, claim_database())
    yield env
    env.release()


@pytest.fixture(scope="session")
def worker(queue_env: QueueEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One real Celery worker (one process, the default threads pool, 2 task threads) for the queue tests."""
    running = Worker(queue_env, tmp_path_factory.mktemp("logs") / "worker.log").start()
    yield running
    running.stop()


@pytest.fixture
def producer(queue_env: QueueEnv) -> Iterator[Producer]:
    made = Producer(queue_env.broker_url, accounts_dir=queue_env.accounts, config_dir=queue_env.config)
    yield made
    made.close()


@pytest.fixture
def api(queue_env: QueueEnv) -> Iterator[tuple[str, Producer]]:
    """The HTTP API and dashboard (worker/web/http.py) over the session queue, on a port of its own."""
    from support.web import ApiServer
    from worker.web import http as http_api

    producer = Producer(queue_env.broker_url, accounts_dir=queue_env.accounts, config_dir=queue_env.config)
    # the fuzz sends hundreds of requests without a key: the 401 limit has a test of its own
    server = ApiServer(http_api.create_app(producer, body_limit=64 * 1024, failures="100000/minute"))
    yield server.url, producer
    server.stop()
    producer.close()


@pytest.fixture
def live(
    queue_env: QueueEnv, worker: Worker, producer: Producer, smtp_server: Callable[..., SmtpServer]
) -> Live:
    """The queue, a running worker, a producer and the SMTP server factory, in one."""
    return Live(queue_env, worker, producer, smtp_server)


@pytest.fixture
def hook_files(queue_env: QueueEnv) -> Iterator[list[str]]:
    """Webhook names a test made in the session's config: removed after it (and unrouted)."""
    names: list[str] = []
    yield names
    for name in names:
        (queue_env.config / "webhooks" / f"{name}.yaml").unlink(missing_ok=True)
        queue_env.redis.hdel(emit.ROUTES, name)
