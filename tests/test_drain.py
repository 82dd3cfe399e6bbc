"""Coalescing (worker/queue/drain.py): jobs taken from the queue by a running task, against real Redis.

The messages are published by a real Celery producer and, when given up, restored by
kombu's own code: the drain must keep kombu's format to the letter.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from support.queue import QueueEnv, Worker, wait_for
from support.smtpd import Rule, SmtpServer
from worker.client import Producer
from worker.mail.payload import BATCH_TASK_NAME, QUEUE, TASK_NAME, job_headers
from worker.queue.drain import QueueDrain
from worker.records.loader import Records

KWARGS = {"account": "a", "to": ["x@example.net"], "subject": "s", "text": "t"}


@pytest.fixture
def publisher(own_queue: QueueEnv) -> Iterator[Callable[..., str]]:
    app = Celery("drain-test-producer", broker=own_queue.broker_url, set_as_current=False)

    def publish(task: str = TASK_NAME, **options: Any) -> str:
        kwargs = options.pop("kwargs", KWARGS)
        return str(app.send_task(task, kwargs=kwargs, queue=QUEUE, **options).id)

    yield publish
    app.close()


def drain_for(env: QueueEnv, *, visibility_timeout: float = 3600, time_limit: float = 360) -> QueueDrain:
    return QueueDrain(
        env.redis, QUEUE, TASK_NAME, visibility_timeout=visibility_timeout, time_limit=time_limit
    )


def test_take_registers_jobs_as_kombu_does_and_leaves_a_scheduled_one_to_celery(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    ready = [publisher() for _ in range(3)]
    scheduled = publisher(countdown=60)  # an ETA message (a raw producer's): Celery's to hold, not ours
    ready.append(publisher())
    drain = drain_for(own_queue, visibility_timeout=3600, time_limit=360)
    before = time.time()
    taken = drain.take(10)
    assert [c.job_id for c in taken] == ready
    assert all(c.kwargs == KWARGS for c in taken)
    assert own_queue.queue_length() == 1
    for c in taken:
        stored = own_queue.redis.hget("unacked", c.delivery_tag)
        assert stored is not None
        message, exchange, routing_key = json.loads(stored)
        assert message["headers"]["id"] == c.job_id and (exchange, routing_key) == ("", QUEUE)
        score = own_queue.redis.zscore("unacked_index", c.delivery_tag)
        assert score is not None
        # back-dated: kombu gives it back 390 s (hard limit + margin) after a crash, not 3600 s
        assert before - (3600 - 390) - 1 < score < time.time() - (3600 - 390) + 1
    assert drain.take(10) == []  # only the scheduled job is left, and it stays where it was
    assert [json.loads(m)["headers"]["id"] for m in own_queue.redis.lrange(QUEUE, 0, -1)] == [scheduled]


def test_a_batch_job_is_left_to_celery_and_an_empty_queue_gives_nothing(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    drain = drain_for(own_queue)
    assert drain.take(5) == []
    publisher(BATCH_TASK_NAME, kwargs={"messages": [KWARGS]})
    single = publisher()
    assert [c.job_id for c in drain.take(5)] == [single]
    assert own_queue.queue_length() == 1


def test_a_full_accounts_backlog_does_not_hide_the_jobs_queued_behind_it(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    def job(account: str) -> str:
        kwargs = {**KWARGS, "account": account}
        return publisher(kwargs=kwargs, headers=job_headers(kwargs))

    slow = [job("slow") for _ in range(5)]
    fast = [job("fast") for _ in range(3)]
    unnamed = publisher()  # a raw producer's job without the account header: taken, checked later
    drain = drain_for(own_queue)
    assert [c.job_id for c in drain.take(10, {"slow": 0, "fast": 10})] == [*fast, unnamed]
    assert [json.loads(m)["headers"]["id"] for m in reversed(own_queue.redis.lrange(QUEUE, 0, -1))] == slow
    assert [c.job_id for c in drain.take(10, {"slow": 2})] == slow[:2]  # room for two more of it


def test_given_back_jobs_run_next_in_their_order_and_acked_ones_are_forgotten(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    ids = [publisher() for _ in range(4)]
    drain = drain_for(own_queue)
    taken = drain.take(4)
    drain.ack(taken[:1])
    drain.give_back(taken[1:])
    assert own_queue.redis.hlen("unacked") == 0 and own_queue.redis.zcard("unacked_index") == 0
    with Connection(own_queue.broker_url) as conn:
        queue = conn.SimpleQueue(QUEUE)
        order = [queue.get(timeout=2).headers["id"] for _ in range(3)]
        queue.close()
    assert order == ids[1:]


def test_kombu_restores_the_jobs_of_a_carrier_that_died(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    ids = [publisher() for _ in range(2)]
    # registered 65 s in the past (100 - (5 + 30)): a visibility timeout of 60 s has run out
    taken = drain_for(own_queue, visibility_timeout=100, time_limit=5).take(2)
    assert own_queue.queue_length() == 0
    with Connection(own_queue.broker_url, transport_options={"visibility_timeout": 60}) as conn:
        channel: Any = conn.default_channel  # kombu's Redis channel: the transport's own restore
        channel.qos.restore_visible(num=10)
    assert own_queue.redis.hlen("unacked") == 0
    assert own_queue.queue_length() == 2
    restored = [json.loads(raw) for raw in own_queue.redis.lrange(QUEUE, 0, -1)]
    assert sorted(m["headers"]["id"] for m in restored) == sorted(ids) == sorted(c.job_id for c in taken)
    # kombu flags them redelivered: the drain leaves them to Celery, each job runs alone (a payload
    # that killed its carrier must not take a group down again; see test_faults.py)
    assert all(m["headers"]["redelivered"] is True for m in restored)
    assert drain_for(own_queue).take(2) == []


def test_an_unreadable_body_is_reported_not_dropped(
    own_queue: QueueEnv, publisher: Callable[..., str]
) -> None:
    job_id = publisher()
    popped = own_queue.redis.rpop(QUEUE)
    assert isinstance(popped, str)
    raw = json.loads(popped)
    raw["body"] = base64.b64encode(b"not json").decode()
    own_queue.redis.rpush(QUEUE, json.dumps(raw))
    (carried,) = drain_for(own_queue).take(1)
    assert carried.job_id == job_id and carried.kwargs is None
    assert carried.problem and "body cannot be decoded" in carried.problem
    assert "KWARGS" not in repr(carried) and "x@example.net" not in repr(carried)


def test_a_backlog_is_carried_and_every_job_keeps_its_own_fate(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # 60 single-message jobs queued before any worker runs; one of them is refused once (451)
    server = smtp_server(mode="plain", rules=[Rule("RCPT", 451, "4.3.0 later", times=1, match="r7@")])
    account = own_queue.account("backlog", server)
    producer = Producer(own_queue.broker_url, records=Records.load(own_queue.accounts, own_queue.config))
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=1)
    try:
        job_ids = [
            producer.send_notification(account, [f"r{i}@example.net"], f"n {i}", "x") for i in range(60)
        ]
        worker.start()
        wait_for(
            lambda: all((j := producer.job(i)) is not None and j.state == "sent" for i in job_ids),
            60,
            "every job to be sent",
            worker,
        )
        assert "carrying" in worker.log()
        retried = producer.job(job_ids[7])
        assert retried is not None and retried.attempts == 2
        assert all((j := producer.job(i)) is not None and j.attempts == 1 for i in job_ids if i != job_ids[7])
        wait_for(lambda: own_queue.redis.hlen("unacked") == 0, 10, "every message acknowledged", worker)
    finally:
        worker.stop()
        producer.close()
    counts = Counter(r.message["Message-ID"] for r in server.received)
    assert len(counts) == 60 and max(counts.values()) == 1
    assert own_queue.queue_length() == 0


def test_a_carrier_takes_no_more_of_one_account_than_its_connections_can_serve(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # one connection: at most 4 of its jobs in flight per process, the rest stay queued
    server = smtp_server(mode="plain")
    account = own_queue.account("narrow", server, limits={"max_connections": 1})
    producer = Producer(own_queue.broker_url, records=Records.load(own_queue.accounts, own_queue.config))
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=1)
    try:
        job_ids = [producer.send_notification(account, ["a@example.net"], f"n {i}", "x") for i in range(40)]
        worker.start()
        wait_for(
            lambda: all((j := producer.job(i)) is not None and j.state == "sent" for i in job_ids),
            60,
            "every job to be sent",
            worker,
        )
    finally:
        worker.stop()
        producer.close()
    carried = [int(m) for m in re.findall(r"carrying (\d+) more", worker.log())]
    assert carried and max(carried) <= 4, carried
    assert len({r.message["Message-ID"] for r in server.received}) == len(server.received) == 40
