"""Brokers past one Redis (contract §9): Postroom's state apart from the broker, RabbitMQ.

The RabbitMQ tests run a real worker (the shipped defaults but for fast retries) on the
RabbitMQ this kind of machine runs, in a vhost of their own (with default queue type quorum,
or none), with Postroom's state in a Redis database of their own. Other producers declare the
queue too, with no arguments: celery-node (tests/support/celerynode.py) and a plain Celery app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from kombu import Producer as KombuProducer

from support import celerynode, rabbit
from support.queue import POSTROOM, QueueEnv, Worker, claim_database, cli, finished, unique, wait_for
from support.smtpd import Rule, SmtpServer, unknown_user
from worker.client import Producer
from worker.db import connect
from worker.errors import ConfigurationError
from worker.queue.broker.kinds import POISON_QUEUE, SendQueue, amqp_queues, celery_config
from worker.queue.broker.rabbitmq import ManagementApi, QueueSetup
from worker.settings import Settings, broker_kind, sentinel_master, state_url

ServerFactory = Callable[..., SmtpServer]
AMQP = "amqp://guest:guest@127.0.0.1:5672/somewhere"


# ---- which Redis keeps the state -------------------------------------------------------------


def test_the_state_is_the_broker_when_the_broker_is_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTROOM_REDIS_URL", raising=False)
    assert state_url("redis://h:6379/3") == "redis://h:6379/3"
    assert state_url("redis+socket:///tmp/r.sock?virtual_host=2") == "unix:///tmp/r.sock?db=2"
    monkeypatch.setenv("POSTROOM_REDIS_URL", "redis://state:6379/5")
    assert state_url("redis://h:6379/3") == "redis://state:6379/5"
    assert state_url(AMQP) == "redis://state:6379/5"


def test_a_rabbitmq_broker_without_postroom_redis_url_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POSTROOM_REDIS_URL", raising=False)
    with pytest.raises(ConfigurationError, match="POSTROOM_REDIS_URL is not set"):
        state_url(AMQP)
    monkeypatch.setenv("POSTROOM_REDIS_URL", "amqp://elsewhere/")
    with pytest.raises(ConfigurationError, match="POSTROOM_REDIS_URL: not a Redis URL"):
        state_url(AMQP)
    with pytest.raises(ConfigurationError, match="unsupported scheme kafka://"):
        broker_kind("kafka://h:9092")
    assert [broker_kind(u) for u in ("rediss://h", "unix:///s", "sentinel://h:1", AMQP)] == [
        "redis",
        "redis",
        "sentinel",
        "amqp",
    ]


def test_sentinel_urls_carry_every_sentinel_the_database_and_the_master(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "sentinel://:s3cret@a:26379;sentinel://:s3cret@b:26380/4"
    parts = connect.SentinelUrl.parse(url)
    assert parts.hosts == (("a", 26379), ("b", 26380)) and parts.db == 4 and parts.password == "s3cret"
    assert parts.kombu_url(url) == "sentinel://:s3cret@a:26379/4;sentinel://:s3cret@b:26380/4"
    assert "s3cret" not in connect.safe_url(url) and connect.safe_url(url).count("***@") == 2
    monkeypatch.delenv("POSTROOM_SENTINEL_MASTER", raising=False)
    with pytest.raises(ConfigurationError, match="POSTROOM_SENTINEL_MASTER is not set"):
        sentinel_master(url)
    assert sentinel_master(url + "?master_name=given") == "given"
    monkeypatch.setenv("POSTROOM_SENTINEL_MASTER", "mymaster")
    config = celery_config(url, Settings())
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["broker_url"] == parts.kombu_url(url)
    with pytest.raises(ConfigurationError, match="database must be a number"):
        connect.SentinelUrl.parse("sentinel://a:1/x")


def test_rabbitmq_queues_are_declared_without_arguments() -> None:
    config = celery_config(AMQP, Settings())
    (control,) = config["task_queues"]  # Celery's consumer reads only the control queue
    assert control.name == "postroom.control" and control.durable
    # never sent (declared with none): Celery reads it for per-consumer prefetch
    assert control.queue_arguments == {"x-queue-type": "quorum"}
    queue = amqp_queues(Settings())[0]  # the jobs' queue, read by Postroom's inbox
    assert isinstance(queue, SendQueue) and queue.name == "postroom" and queue.durable
    assert queue.poison is not None and queue.poison.name == POISON_QUEUE and not queue.poison.queue_arguments
    assert config["broker_transport_options"] == {"confirm_publish": True}
    api = ManagementApi.of("amqp://u%40x:p%2Fw@rabbit.internal:5672/a%2Fb", Settings())
    assert (api.base, api.auth, api.vhost) == ("http://rabbit.internal:15672", ("u@x", "p/w"), "a/b")
    assert (
        ManagementApi.of("amqp://h//", Settings()).vhost
        == ManagementApi.of("amqp://h", Settings()).vhost
        == "/"
    )
    given = ManagementApi.of(AMQP, Settings(rabbitmq_api="https://admin:s3cret@mgmt:443/rabbit/"))
    assert (given.base, given.auth) == ("https://mgmt:443/rabbit", ("admin", "s3cret"))


def _setup(**changes: Any) -> QueueSetup:
    """The recommended setup (a quorum queue declared with no arguments, the policy), changed."""
    policy = {"dead-letter-exchange": "", "dead-letter-routing-key": POISON_QUEUE, "delivery-limit": 20}
    fields: dict[str, Any] = dict(
        api="http://h:15672", vhost="v", vhost_default_type="quorum", wanted_type="quorum", exists=True,
        queue_type="quorum", arguments={"x-queue-type": "quorum"}, policy="postroom", definition=policy,
        poison_exists=True,
    )  # fmt: skip
    return QueueSetup(**{**fields, **changes})


def test_what_a_queue_setup_lacks_is_named_with_its_fix() -> None:
    assert _setup().problems() == [] and _setup().plain_clients_compatible
    # a plain client declared it first in a vhost without a default type: classic, no policy
    classic = _setup(vhost_default_type=None, queue_type="classic", arguments={}, policy=None, definition={})
    assert [what for what, _ in classic.problems()] == ["a quorum queue", "dead-lettering to postroom.poison"]
    assert classic.plain_clients_compatible and classic.delivery_limit is None
    legacy = _setup(vhost_default_type=None, policy=None, definition={}, arguments={
        "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": POISON_QUEUE,
        "x-delivery-limit": 20})  # fmt: skip
    assert legacy.dead_lettering and legacy.delivery_limit == 20
    ((what, line),) = legacy.problems()
    assert (
        what == "compatibility with clients declaring it with no arguments" and "PRECONDITION_FAILED" in line
    )
    missing = _setup(
        vhost_default_type=None, exists=False, queue_type=None, arguments={}, poison_exists=False
    )
    lacks = [what for what, _ in missing.problems()]
    assert lacks == [
        "the queue postroom",
        "a vhost whose default queue type is quorum",
        "the queue postroom.poison",
    ]
    assert "--default-queue-type quorum" in missing.problems()[1][1]
    # a queue's argument wins over the policy; the lower delivery limit counts
    assert _setup(arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}).delivery_limit == 5
    assert not _setup(arguments={"x-queue-type": "quorum", "x-dead-letter-routing-key": "x"}).dead_lettering
    assert _setup(policy="other").problems() == []  # another policy carrying the same keys will do


def _postroom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POSTROOM, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_every_process_refuses_to_start_on_rabbitmq_without_its_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(POSTROOM_BROKER_URL=AMQP, POSTROOM_VAR_DIR=str(tmp_path / "var"))
    for args in (
        ("worker",),
        ("beat",),
        ("http",),
        ("up", "--no-dev-smtp"),
        ("status", "--json"),
        ("health",),
        ("send", "--account", "a", "--to", "b@example.net", "--subject", "s", "--text", "t"),
    ):
        done = _postroom(env, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "POSTROOM_REDIS_URL is not set" in done.stderr and "Traceback" not in done.stderr, args
    # Celery started by hand on the app refuses too: the app does not load
    direct = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.queue.app", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert direct.returncode != 0 and "POSTROOM_REDIS_URL is not set" in direct.stderr + direct.stdout


def test_queues_check_needs_nothing_on_redis_and_names_an_api_it_cannot_reach(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(POSTROOM_VAR_DIR=str(tmp_path / "var"), POSTROOM_BROKER_URL="redis://127.0.0.1:6379/0")
    redis_check = _postroom(env, "queues", "check", "--json")
    assert redis_check.returncode == 0 and json.loads(redis_check.stdout)["broker"] == "redis"
    env.update(POSTROOM_BROKER_URL=AMQP, POSTROOM_RABBITMQ_API="http://guest:s3cret@127.0.0.1:9")
    for command in ("check", "declare"):
        done = _postroom(env, "queues", command)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "http://127.0.0.1:9" in done.stderr and "POSTROOM_RABBITMQ_API" in done.stderr
        assert "s3cret" not in done.stdout + done.stderr


# ---- RabbitMQ, for real --------------------------------------------------------------------------


class RabbitEnv(QueueEnv):
    """A QueueEnv whose broker is a RabbitMQ vhost; its Redis database keeps the state."""

    def __init__(self, root: Path, db: int, amqp: str) -> None:
        super().__init__(root, db)
        self.state_url = self.broker_url
        self.broker_url = amqp
        self.env.update(POSTROOM_BROKER_URL=amqp, POSTROOM_REDIS_URL=self.state_url)

    def queue_length(self) -> int:
        with Connection(self.broker_url) as conn:
            channel: Any = conn.default_channel
            return int(channel.queue_declare("postroom", passive=True).message_count)

    def producer(self) -> Producer:
        return Producer(
            self.broker_url, state=self.state_url, accounts_dir=self.accounts, config_dir=self.config
        )


@contextmanager
def _env_on_rabbitmq(tmp_path: Path, default_queue_type: str | None = None) -> Iterator[RabbitEnv]:
    with rabbit.vhost(default_queue_type) as amqp:
        env = RabbitEnv(tmp_path, claim_database(), amqp)
        try:
            yield env
        finally:
            env.release()


@pytest.fixture
def rabbit_env(real_redis: None, tmp_path: Path) -> Iterator[RabbitEnv]:
    """A vhost without a default queue type: a queue declared with no arguments is classic."""
    with _env_on_rabbitmq(tmp_path) as env:
        yield env


@pytest.fixture
def quorum_env(real_redis: None, tmp_path: Path) -> Iterator[RabbitEnv]:
    """A vhost created with default queue type quorum: the recommended setup."""
    with _env_on_rabbitmq(tmp_path, "quorum") as env:
        yield env


def _task(account: str, subject: str, task_id: str | None = None) -> dict[str, Any]:
    """A postroom.send task as another producer publishes it (its id is the job's)."""
    kwargs = {
        "account": account,
        "kind": "notification",
        "to": ["n@example.net"],
        "subject": subject,
        "text": "x",
    }
    return {"name": "postroom.send", "id": task_id or unique("job-"), "kwargs": kwargs}


def _declare(env: RabbitEnv) -> dict[str, Any]:
    """``postroom queues declare`` (exit 0: nothing missing), then what ``check --json`` says."""
    declared = cli(env, "queues", "declare")
    assert declared.returncode == 0, declared.stdout + declared.stderr
    checked = cli(env, "queues", "check", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    setup: dict[str, Any] = json.loads(checked.stdout)
    return setup


def test_rabbitmq_delivers_retries_dead_letters_and_reports_depth(
    quorum_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    rabbit_env = quorum_env  # the recommended setup: a quorum-default vhost and `queues declare`
    setup = _declare(rabbit_env)
    assert setup["queue"]["type"] == "quorum" and setup["queue"]["arguments"] == {"x-queue-type": "quorum"}
    assert setup["policy"]["name"] == "postroom" and setup["dead_lettering"] and setup["delivery_limit"] == 20
    assert setup["poison_queue"]["exists"] and setup["plain_clients_compatible"] and setup["ok"]
    flaky = smtp_server(mode="plain", rules=[Rule("MAIL", 451, "4.3.0 Try again later", times=1)])
    gone = smtp_server(mode="plain", rules=[unknown_user()])
    plain = smtp_server(mode="plain")
    retried_account = rabbit_env.account(unique("rmq"), flaky)
    dead_account = rabbit_env.account(unique("rmqdead"), gone)
    node_task = _task(rabbit_env.account(unique("rmqnode"), plain), "from node")
    producer = rabbit_env.producer()
    try:
        ok_id = producer.send_notification(retried_account, ["a@example.net"], "Hi", "x")
        dead_id = producer.send_notification(dead_account, ["gone@example.net"], "Hi", "x")
        celerynode.publish(rabbit_env.broker_url, [node_task])  # celery-node, into Postroom's queue
        waiting = json.loads(cli(rabbit_env, "status", "--json").stdout)
        # no worker yet: celery-node's job in RabbitMQ, the helper's two ready in Postroom's Redis
        assert (waiting["queues"]["postroom"], waiting["queues"]["ready"]) == (1, 2)
        assert waiting["broker_setup"] == {
            **waiting["broker_setup"],
            "checked": True,
            "ok": True,
            "lacks": [],
        }
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            assert finished(producer, node_task["id"]).state == "sent"
            job = finished(producer, ok_id)
            assert job.state == "sent" and job.attempts == 2  # the retry waited in Postroom's delay queue
            assert [h["outcome"] for h in job.history or []] == ["retry", "sent"]
            dead = finished(producer, dead_id)
            assert dead.state == "dead" and "550" in (dead.last_error or "")
            listed = json.loads(cli(rabbit_env, "dead-letters", "list", "--json").stdout)
            assert dead_id in [row["id"] for row in listed]
            status = json.loads(cli(rabbit_env, "status", "--json").stdout)
            assert (
                status["queues"] == {"postroom": 0, POISON_QUEUE: 0, "ready": 0} and status["in_flight"] == 0
            )
            assert status["dead_letters"] == 1
            connectivity = cli(rabbit_env, "test-connectivity", retried_account, "--json")
            assert connectivity.returncode == 0, connectivity.stderr
            health = json.loads(cli(rabbit_env, "health", "--json").stdout)
            assert health["accounts"][retried_account]["ok"] is True
        finally:
            worker.stop()
    finally:
        producer.close()
    assert len(flaky.received) == 1 and gone.received == []
    assert [r.message["Subject"] for r in plain.received] == ["from node"]
    assert "lacks" not in worker.log()  # nothing to say about the setup
    queue = rabbit.queue(rabbit_env.broker_url, "postroom")
    assert (
        queue is not None and queue["type"] == "quorum" and queue["arguments"] == {"x-queue-type": "quorum"}
    )


def test_rabbitmq_unreadable_and_poison_messages_become_dead_letters(
    quorum_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    rabbit_env = quorum_env
    rabbit_env.env["POSTROOM_RABBITMQ_DELIVERY_LIMIT"] = "2"
    assert _declare(rabbit_env)["delivery_limit"] == 2  # the policy's, not the queue's arguments
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmqp"), server)
    producer = rabbit_env.producer()
    try:
        # a job a plain Celery app published (the helper's jobs never pass through RabbitMQ), and
        # a consumer that dies with it, again and again: RabbitMQ counts the deliveries
        plain = Celery("a-plain-celery-app", broker=rabbit_env.broker_url, set_as_current=False)
        try:
            kwargs = {"account": account, "to": ["p@example.net"], "subject": "poison", "text": "x"}
            poison_id = str(plain.send_task("postroom.send", kwargs=kwargs, queue="postroom").id)
        finally:
            plain.close()
        with Connection(rabbit_env.broker_url) as conn:
            channel: Any = conn.channel()
            for _ in range(3):
                message = None
                deadline = time.monotonic() + 10
                while message is None and time.monotonic() < deadline:
                    message = channel.basic_get("postroom", no_ack=False)
                assert message is not None
                channel.basic_reject(message.delivery_tag, requeue=True)
        with Connection(rabbit_env.broker_url) as conn:  # garbage a producer could send
            KombuProducer(conn.default_channel).publish(
                b"\xff not json", routing_key="postroom", content_type="application/json"
            )
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            good = finished(producer, producer.send_notification(account, ["g@example.net"], "good", "x"))
            assert good.state == "sent"

            def dead_letters() -> list[dict[str, Any]]:
                listed: list[dict[str, Any]] = json.loads(
                    cli(rabbit_env, "dead-letters", "list", "--json").stdout
                )
                return listed

            wait_for(lambda: len(dead_letters()) == 2, 30, "both dead letters", worker)
            by_id = {row["id"]: row["error"] for row in dead_letters()}
            assert "RabbitMQ's delivery limit" in by_id.pop(poison_id), by_id
            (garbage,) = by_id.values()
            assert "no task name" in garbage, garbage
            assert worker.alive()
        finally:
            worker.stop()
    finally:
        producer.close()
    assert [r.message["Subject"] for r in server.received] == ["good"]


def test_rabbitmq_a_killed_workers_job_runs_again_within_a_minute(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    for limit in ("POSTROOM_SOFT_TIME_LIMIT", "POSTROOM_TIME_LIMIT"):
        rabbit_env.env.pop(limit)  # the shipped time limits: the stall must not end the task
    server = smtp_server(mode="plain", stall_mail_after=0, stall_seconds=60)
    account = rabbit_env.account(unique("rmqk"), server)
    producer = rabbit_env.producer()
    first = Worker(rabbit_env, tmp_path / "worker-1.log").start()
    second: Worker | None = None
    try:
        job_id = producer.send_notification(account, ["k@example.net"], "kill", "x")
        wait_for(server.stalled.is_set, 30, "the send to stall at MAIL", first)
        second = Worker(rabbit_env, tmp_path / "worker-2.log").start()
        first.kill()
        killed = time.monotonic()
        wait_for(lambda: job_id in second.log(), 20, "the redelivery", second)
        redelivered = time.monotonic() - killed
        job = finished(producer, job_id, timeout=90)
        sent = time.monotonic() - killed
    finally:
        first.stop()
        if second is not None:
            second.stop()
        producer.close()
    print(f"\nRabbitMQ: taken again {redelivered:.1f} s after the SIGKILL, sent {sent:.1f} s after it")
    assert job.state == "sent" and len(server.received) == 1
    # the job waited in Postroom's Redis, taken by the killed process: its holder's heartbeat
    # lapses (15 s) and a reaper puts it back, as on Redis
    assert redelivered < 30, redelivered
    assert sent < 60, sent  # contract §4 (the dead worker's Message-ID claim has to lapse first)


def test_rabbitmq_sweep_makes_ready_again_a_job_found_nowhere(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """On RabbitMQ too the helper's jobs wait in Postroom's Redis: the sweep looks for them there."""
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmqs"), server)
    producer = rabbit_env.producer()
    try:
        lost = producer.send_notification(account, ["lost@example.net"], "lost", "x")
        waiting = producer.send_notification(account, ["waiting@example.net"], "waiting", "x")
        rabbit_env.redis.zrem(f"postroom:ready:{account}", lost)  # its place lost
        for job_id in (lost, waiting):  # enqueued a minute ago: old enough to be looked for
            rabbit_env.redis.zadd("postroom:open", {job_id: time.time() - 60})
        swept = json.loads(cli(rabbit_env, "sweep", "--json").stdout)  # it looks twice, seconds apart
        assert swept["checked"] == 2 and swept["republished"] == [lost]
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            assert finished(producer, lost).state == "sent" and finished(producer, waiting).state == "sent"
        finally:
            worker.stop()
    finally:
        producer.close()
    assert sorted(r.message["Subject"] for r in server.received) == ["lost", "waiting"]


# ---- other producers declare the queue too (with no arguments) -----------------------------------


def test_celery_node_publishing_before_any_postroom_process_loses_nothing(
    quorum_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = quorum_env.account(unique("rmqn"), server)
    early = [_task(account, f"node {i}") for i in range(5)]
    celerynode.publish(quorum_env.broker_url, early)  # it declares `postroom`, nothing else
    queue = rabbit.queue(quorum_env.broker_url, "postroom")
    assert queue is not None and queue["type"] == "quorum" and quorum_env.queue_length() == 5
    producer = quorum_env.producer()  # publishes through the exchange `postroom`, declared now
    try:
        ids = [t["id"] for t in early] + [
            producer.send_notification(account, ["p@example.net"], "postroom", "x")
        ]
        assert _declare(quorum_env)["ok"]  # the policy is applied to the queue as it is
        worker = Worker(quorum_env, tmp_path / "worker.log").start()
        try:
            late = _task(account, "node late")
            celerynode.publish(quorum_env.broker_url, [late])  # its declaration still matches
            for job_id in [*ids, late["id"]]:
                assert finished(producer, job_id).state == "sent"
        finally:
            worker.stop()
    finally:
        producer.close()
    subjects = sorted(r.message["Subject"] for r in server.received)
    assert subjects == sorted([*(t["kwargs"]["subject"] for t in early), "postroom", "node late"])


def test_a_queue_a_plain_celery_app_declared_first_works_and_check_names_what_it_lacks(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmqc"), server)
    plain = Celery(broker=rabbit_env.broker_url)  # Celery's defaults: a classic queue, no arguments
    try:
        first = plain.send_task(
            "postroom.send", kwargs=_task(account, "plain celery")["kwargs"], queue="postroom"
        )
    finally:
        plain.close()
    queue = rabbit.queue(rabbit_env.broker_url, "postroom")
    assert queue is not None and queue["type"] == "classic" and queue["arguments"] == {}
    producer = rabbit_env.producer()
    try:
        second = producer.send_notification(account, ["p@example.net"], "postroom", "x")
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            assert finished(producer, first.id).state == "sent" and finished(producer, second).state == "sent"
            wait_for(lambda: "lacks" in worker.log(), 20, "the worker's line on the queue's setup", worker)
        finally:
            worker.stop()
    finally:
        producer.close()
    assert sorted(r.message["Subject"] for r in server.received) == ["plain celery", "postroom"]
    (line,) = [line for line in worker.log().splitlines() if "lacks" in line]
    assert "WARNING" in line and "a quorum queue, dead-lettering to postroom.poison" in line, line
    assert "postroom queues check" in line
    checked = cli(rabbit_env, "queues", "check")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    missing = [line for line in checked.stdout.splitlines() if line.startswith("MISSING: ")]
    assert len(missing) == 2 and "is classic, not quorum" in missing[0], checked.stdout
    assert "no dead-lettering to postroom.poison" in missing[1] and "postroom queues declare" in missing[1]
    status = cli(rabbit_env, "status")
    assert "broker setup: queue postroom lacks a quorum queue, dead-lettering" in status.stdout, status.stdout
    assert json.loads(cli(rabbit_env, "status", "--json").stdout)["broker_setup"]["ok"] is False


LEGACY_ARGUMENTS = {  # what Postroom declared before it declared with none
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": POISON_QUEUE,
    "x-delivery-limit": 20,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def test_a_legacy_queue_declared_with_arguments_keeps_working_for_postroom(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    with Connection(rabbit_env.broker_url) as conn:
        channel: Any = conn.channel()
        channel.queue_declare(
            POISON_QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
        channel.queue_declare("postroom", durable=True, auto_delete=False, arguments=LEGACY_ARGUMENTS)
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmql"), server)
    producer = rabbit_env.producer()
    # the management API out of reach: the worker says so once and carries on
    unreachable = {"POSTROOM_RABBITMQ_API": "http://127.0.0.1:9"}
    worker = Worker(rabbit_env, tmp_path / "worker.log", extra_env=unreachable).start()
    try:
        job_ids = [
            producer.send_notification(account, [f"l{i}@example.net"], f"legacy {i}", "x") for i in range(3)
        ]
        assert all(finished(producer, job_id).state == "sent" for job_id in job_ids)
        wait_for(lambda: "was not checked" in worker.log(), 20, "the worker's note on the API", worker)
    finally:
        worker.stop()
        producer.close()
    (line,) = [line for line in worker.log().splitlines() if "was not checked" in line]
    assert "INFO" in line and "http://127.0.0.1:9" in line and "lacks" not in worker.log()
    assert len(server.received) == 3
    legacy = rabbit.queue(rabbit_env.broker_url, "postroom")
    assert legacy is not None and legacy["arguments"] == LEGACY_ARGUMENTS  # never declared again
    checked = json.loads(cli(rabbit_env, "queues", "check", "--json").stdout)
    assert checked["dead_lettering"] and checked["delivery_limit"] == 20
    assert checked["lacks"] == ["compatibility with clients declaring it with no arguments"]
    assert not checked["plain_clients_compatible"]
    with pytest.raises(celerynode.PublishError, match="PRECONDITION_FAILED - inequivalent arg"):
        celerynode.publish(rabbit_env.broker_url, [_task(account, "refused")])  # what issue 28 is about
