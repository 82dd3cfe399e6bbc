"""Brokers past one Redis (DESIGN §9): Postroom's state apart from the broker, RabbitMQ.

The RabbitMQ tests run a real worker (the shipped defaults but for fast retries) on the
RabbitMQ this kind of machine runs, in a vhost of their own, with Postroom's state in a
Redis database of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu import Producer as KombuProducer

from support import rabbit
from support.queue import POSTROOM, QueueEnv, Worker, claim_database, cli, finished, unique, wait_for
from support.smtpd import Rule, SmtpServer
from worker.client import Producer
from worker.errors import ConfigurationError
from worker.queue import connect
from worker.queue.brokers import POISON_QUEUE, celery_config
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


def test_rabbitmq_gets_a_quorum_queue_with_a_delivery_limit_and_a_poison_queue() -> None:
    config = celery_config(AMQP, Settings())
    (queue,) = config["task_queues"]
    assert queue.name == "postroom" and queue.durable
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 20,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": POISON_QUEUE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert config["broker_transport_options"] == {"confirm_publish": True}
    classic = celery_config(AMQP, Settings(rabbitmq_queue_type="classic"))["task_queues"][0]
    assert "x-delivery-limit" not in classic.queue_arguments


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


@pytest.fixture
def rabbit_env(real_redis: None, tmp_path: Path) -> Iterator[RabbitEnv]:
    with rabbit.vhost() as amqp:
        env = RabbitEnv(tmp_path, claim_database(), amqp)
        try:
            yield env
        finally:
            env.release()


def _rabbitmqctl_queues(env: RabbitEnv) -> dict[str, str]:
    vhost = env.broker_url.rsplit("/", 1)[1]
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "type", "arguments"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return {row[0]: "\t".join(row[1:]) for row in rows}


def test_rabbitmq_delivers_retries_dead_letters_and_reports_depth(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    flaky = smtp_server(mode="plain", rules=[Rule("MAIL", 451, "4.3.0 Try again later", times=1)])
    gone = smtp_server(mode="plain", rules=[Rule("RCPT", 550, "5.1.1 No such user")])
    retried_account = rabbit_env.account(unique("rmq"), flaky)
    dead_account = rabbit_env.account(unique("rmqdead"), gone)
    producer = rabbit_env.producer()
    try:
        ok_id = producer.send_notification(retried_account, ["a@example.net"], "Hi", "x")
        dead_id = producer.send_notification(dead_account, ["gone@example.net"], "Hi", "x")
        waiting = json.loads(cli(rabbit_env, "status", "--json").stdout)
        assert waiting["queues"]["postroom"] == 2  # read from RabbitMQ: no worker yet
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            job = finished(producer, ok_id)
            assert job.state == "sent" and job.attempts == 2  # the retry waited in Postroom's delay queue
            assert [h["outcome"] for h in job.history or []] == ["retry", "sent"]
            dead = finished(producer, dead_id)
            assert dead.state == "dead" and "550" in (dead.last_error or "")
            listed = json.loads(cli(rabbit_env, "dead-letters", "list", "--json").stdout)
            assert dead_id in [row["id"] for row in listed]
            status = json.loads(cli(rabbit_env, "status", "--json").stdout)
            assert status["queues"] == {"postroom": 0, POISON_QUEUE: 0} and status["in_flight"] == 0
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
    queues = _rabbitmqctl_queues(rabbit_env)
    assert queues["postroom"].startswith("quorum") and "x-delivery-limit" in queues["postroom"]


def test_rabbitmq_unreadable_and_poison_messages_become_dead_letters(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rabbit_env.env["POSTROOM_RABBITMQ_DELIVERY_LIMIT"] = "2"
    monkeypatch.setenv("POSTROOM_RABBITMQ_DELIVERY_LIMIT", "2")  # the producer declares the queue alike
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmqp"), server)
    producer = rabbit_env.producer()
    try:
        poison_id = producer.send_notification(account, ["p@example.net"], "poison", "x")
        # a consumer that dies with it, again and again: RabbitMQ counts the deliveries
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


def test_rabbitmq_redelivers_a_killed_workers_message_at_once(
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
    print(f"\nRabbitMQ: redelivered {redelivered:.1f} s after the SIGKILL, sent {sent:.1f} s after it")
    assert job.state == "sent" and len(server.received) == 1
    assert redelivered < 5, (
        redelivered
    )  # RabbitMQ's own guarantee: the connection closed, the message is back
    assert sent < 60, sent  # DESIGN §4 (the dead worker's Message-ID claim has to lapse first)


def test_rabbitmq_sweep_publishes_again_a_job_recorded_but_never_published(
    rabbit_env: RabbitEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = rabbit_env.account(unique("rmqs"), server)
    producer = rabbit_env.producer()
    try:
        lost = producer.send_notification(account, ["lost@example.net"], "lost", "x")
        with Connection(rabbit_env.broker_url) as conn:  # its message never reached RabbitMQ
            channel: Any = conn.channel()
            message = channel.basic_get("postroom", no_ack=True)
            assert message is not None and message.headers["id"] == lost
        waiting = producer.send_notification(account, ["waiting@example.net"], "waiting", "x")
        for job_id in (lost, waiting):  # enqueued a minute ago: old enough to be looked for
            rabbit_env.redis.zadd("postroom:open", {job_id: time.time() - 60})
        fresh = json.loads(cli(rabbit_env, "sweep", "--json").stdout)
        assert fresh["checked"] == 2 and fresh["republished"] == []  # unchanged for less than an hour
        for job_id in (lost, waiting):  # both unchanged for two hours, as if their producer had died
            rabbit_env.redis.hset(f"postroom:job:{job_id}", "updated_at", time.time() - 7200)
        swept = json.loads(cli(rabbit_env, "sweep", "--json").stdout)
        assert sorted(swept["republished"]) == sorted([lost, waiting])
        assert rabbit_env.queue_length() == 3  # the waiting one, its copy, and the lost one again
        worker = Worker(rabbit_env, tmp_path / "worker.log").start()
        try:
            assert finished(producer, lost).state == "sent" and finished(producer, waiting).state == "sent"
            wait_for(lambda: rabbit_env.queue_length() == 0, 20, "the copy to be taken", worker)
        finally:
            worker.stop()
    finally:
        producer.close()
    assert sorted(r.message["Subject"] for r in server.received) == [
        "lost",
        "waiting",
    ]  # the copy did nothing
