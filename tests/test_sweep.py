"""The orphan sweep (worker/queue/sweep.py) against real Redis and a real worker.

A message taken off the queue by a worker that died before kombu filed it as
unacknowledged exists nowhere: the tests make that state by popping the
message themselves, exactly what ``BRPOP`` does, and check that the sweep
publishes the job again — and publishes nothing that is still somewhere.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.queue import QueueEnv, Worker, cli, finished, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.mail.payload import QUEUE, SWEEP_TASK_NAME, TASK_NAME
from worker.ops.health import AccountHealth
from worker.queue.app import app
from worker.queue.broker import BrokerKeys
from worker.queue.brokers import RedisBrokerView
from worker.queue.drain import QueueDrain
from worker.queue.jobrecord import OPEN
from worker.queue.jobs import JobStore
from worker.queue.sweep import LOCK, Sweeper
from worker.records.loader import Records


@pytest.fixture
def mail(own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer]) -> tuple[SmtpServer, Producer]:
    server = smtp_server(mode="plain")
    own_queue.account("swept", server)
    producer = Producer(own_queue.broker_url, records=Records.load(own_queue.accounts, own_queue.config))
    return server, producer


class Published:
    """The sweep's publish function, recording what it published (through real Celery)."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.ids: list[str] = []

    def __call__(self, job_id: str, kwargs: dict[str, Any]) -> None:
        self.ids.append(job_id)
        self.producer.republish(job_id, kwargs)


def sweeper_for(env: QueueEnv, publish: Callable[[str, dict[str, Any]], None], **options: Any) -> Sweeper:
    view = RedisBrokerView(env.redis, BrokerKeys())
    return Sweeper(env.redis, view, publish, **{"grace": 0.0, "confirm": 0.3, **options})


def queued_ids(env: QueueEnv) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in env.redis.lrange(QUEUE, 0, -1)]


def send(producer: Producer, n: int) -> list[str]:
    return [producer.send_notification("swept", [f"r{i}@example.net"], f"s{i}", "t") for i in range(n)]


def test_a_job_whose_message_vanished_is_published_again_and_delivered_once(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path
) -> None:
    server, producer = mail
    ids = send(producer, 3)
    popped = own_queue.redis.rpop(QUEUE)  # BRPOP by a worker that died before filing it as unacked
    assert isinstance(popped, str)
    lost = json.loads(popped)["headers"]["id"]
    assert lost == ids[0] and sorted(queued_ids(own_queue)) == sorted(ids[1:])

    published = Published(producer)
    sweeper = sweeper_for(own_queue, published)
    first = sweeper.run()
    assert (first.checked, first.present, first.suspects, first.republished) == (3, 2, 1, [])
    assert sweeper.run().republished == []  # seen missing twice, but not yet `confirm` apart
    time.sleep(0.35)
    third = sweeper.run()
    assert third.republished == [lost] and third.suspects == 0
    assert published.ids == [lost]
    assert sorted(queued_ids(own_queue)) == sorted(ids)  # under its own id again

    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        for job_id in ids:
            assert finished(producer, job_id).state == "sent"
    finally:
        worker.stop()
    counts = Counter(m.message["Message-ID"] for m in server.received)
    assert len(counts) == 3 and set(counts.values()) == {1}
    assert own_queue.redis.zcard(OPEN) == 0  # every job ended: the index is empty again
    assert "published it again" not in worker.log()
    producer.close()


def test_messages_in_the_queue_unacked_held_or_in_a_batch_are_left_alone(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    singles = send(producer, 2)
    batch = producer.send_batch(
        [{"account": "swept", "to": [f"b{i}@example.net"], "subject": "b", "text": "t"} for i in range(2)]
    )
    # one single is carried by a running task: in kombu's unacked hash, as kombu files it
    drain = QueueDrain(own_queue.redis, QUEUE, TASK_NAME, visibility_timeout=3600, time_limit=360)
    (carried,) = drain.take(1)
    assert carried.job_id == singles[0] and own_queue.redis.hlen("unacked") == 1
    # the other waits for its paused account: out of the queue (kombu reads from the right), held
    popped = own_queue.redis.rpop(QUEUE)
    assert isinstance(popped, str) and json.loads(popped)["headers"]["id"] == singles[1]
    health = AccountHealth(own_queue.redis, pause_after=3)
    store = JobStore(own_queue.redis)
    health.pause("swept", "test", by="operator")
    assert store.hold_if_paused(singles[1], "swept", {"account": "swept"}, "account paused")

    published = Published(producer)
    sweeper = sweeper_for(own_queue, published)
    assert sweeper.locations() | (sweeper.broker.job_ids() or set()) >= {*singles, *batch}
    report = sweeper.run()
    time.sleep(0.35)
    again = sweeper.run()
    assert (report.checked, report.present, report.suspects) == (4, 4, 0)
    assert again.republished == [] and published.ids == []
    producer.close()


def test_ended_jobs_leave_the_index_and_young_ones_are_not_looked_for(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    done, stale, young = send(producer, 3)
    store = JobStore(own_queue.redis)
    store.finish(done, "swept", state="sent", attempt=1)
    assert own_queue.redis.zscore(OPEN, done) is None  # a final state takes it out at once
    own_queue.redis.hset(f"postroom:job:{stale}", "state", "sent")  # ended without the index knowing
    own_queue.redis.delete(QUEUE)
    own_queue.redis.zadd(OPEN, {stale: time.time() - 120})
    own_queue.redis.zadd(OPEN, {"gone-job": time.time() - 120})  # its record expired

    published = Published(producer)
    report = sweeper_for(own_queue, published, grace=60.0).run()
    assert report.checked == 2 and report.closed == 2  # the young job's missing message: not yet
    assert report.suspects == 0 and published.ids == []
    assert own_queue.redis.zrange(OPEN, 0, -1) == [young]
    producer.close()


def test_a_record_that_changed_meanwhile_is_looked_at_again_before_anything_is_published(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    (job_id,) = send(producer, 1)
    own_queue.redis.delete(QUEUE)
    published = Published(producer)
    sweeper = sweeper_for(own_queue, published)
    assert sweeper.run().suspects == 1
    own_queue.redis.hset(f"postroom:job:{job_id}", mapping={"attempts": 1, "updated_at": time.time()})
    time.sleep(0.35)
    assert sweeper.run().republished == []  # a worker touched it: a new sighting, not a second one
    time.sleep(0.35)
    assert sweeper.run().republished == [job_id]
    producer.close()


def test_one_sweep_at_a_time(own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]) -> None:
    _, producer = mail
    send(producer, 1)
    own_queue.redis.set(LOCK, "another", ex=30)
    report = sweeper_for(own_queue, Published(producer)).run()
    assert report.skipped and report.checked == 0
    producer.close()


def test_the_cli_sweep_publishes_a_lost_job_and_the_beat_schedules_it(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    kept, lost = send(producer, 2)
    raw: list[str] = own_queue.redis.lrange(QUEUE, 0, -1)  # type: ignore[assignment]
    own_queue.redis.lrem(QUEUE, 1, next(r for r in raw if lost in r))
    own_queue.redis.zadd(OPEN, {kept: time.time() - 120, lost: time.time() - 120})  # past the grace
    done = cli(own_queue, "sweep", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["republished"] == [lost] and report["checked"] == 2
    wait_for(lambda: sorted(queued_ids(own_queue)) == sorted([kept, lost]), 5, "the job back in the queue")

    schedule = app.conf.beat_schedule
    entry = next(e for e in schedule.values() if e["task"] == SWEEP_TASK_NAME)
    assert entry["schedule"] == 60.0 and entry["options"]["expires"] == 60.0
    producer.close()


def test_a_producer_cut_off_after_writing_its_job_gets_that_job_on_retry_and_it_is_sent(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker went away between the job's record (with its idempotency key) and its
    message, and took the clean-up with it: the producer got EnqueueError. Calling again with
    the same key returns that job — and the sweep publishes it, so it is sent, once."""
    from worker.client import EnqueueError

    server, producer = mail
    payload = {"account": "swept", "to": ["cut@example.net"], "subject": "cut off", "text": "t"}
    payload["idempotency_key"] = "order-4711"

    def broker_gone(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(producer.app, "send_task", broker_gone)
        patch.setattr(producer.store, "discard", broker_gone)
        with pytest.raises(EnqueueError):
            producer.enqueue(payload)
    (job_id,) = own_queue.redis.zrange(OPEN, 0, -1)
    assert own_queue.queue_length() == 0
    assert producer.enqueue(payload) == job_id  # the key names the job that was cut off
    assert own_queue.queue_length() == 0 and own_queue.redis.zcard(OPEN) == 1

    sweeper = sweeper_for(own_queue, Published(producer))
    assert sweeper.run().suspects == 1
    time.sleep(0.35)
    assert sweeper.run().republished == [job_id]
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        assert finished(producer, job_id).state == "sent"
    finally:
        worker.stop()
    assert [m.message["Subject"] for m in server.received] == ["cut off"]
    producer.close()


def test_a_publish_that_failed_before_sending_is_forgotten_whole_and_the_retry_enqueues_afresh(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import EncodeError

    from worker.client import EnqueueError

    _, producer = mail
    payload = {"account": "swept", "to": ["x@example.net"], "subject": "s", "text": "t"}
    payload["idempotency_key"] = "order-4712"
    with monkeypatch.context() as patch:  # refused while serialising: nothing can have reached Redis
        patch.setattr(producer.app, "send_task", lambda *a, **k: (_ for _ in ()).throw(EncodeError("no")))
        with pytest.raises(EnqueueError) as refused:
            producer.enqueue(payload)
    assert refused.value.recorded == []
    assert own_queue.redis.zcard(OPEN) == 0 and not own_queue.redis.keys("postroom:job:*")
    assert not own_queue.redis.keys("postroom:idem:*")
    job_id = producer.enqueue(payload)
    assert queued_ids(own_queue) == [job_id] and producer.enqueue(payload) == job_id
    producer.close()


def test_a_publish_whose_fate_is_unknown_keeps_its_job_and_key_and_is_sent_once(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """send_task raised after its message reached Redis (a reply lost on the way back): the job
    must not be forgotten, or a retry with the same key would enqueue, and send, it twice."""
    from worker.client import EnqueueError

    server, producer = mail
    payload = {"account": "swept", "to": ["x@example.net"], "subject": "once", "text": "t"}
    payload["idempotency_key"] = "order-4713"
    real_send = producer.app.send_task

    def sent_then_lost(*args: Any, **kwargs: Any) -> Any:
        real_send(*args, **kwargs)
        raise ConnectionError("connection reset while reading the reply")

    with monkeypatch.context() as patch:
        patch.setattr(producer.app, "send_task", sent_then_lost)
        with pytest.raises(EnqueueError, match="idempotency_key") as unsure:
            producer.enqueue(payload)
    (job_id,) = unsure.value.recorded
    assert producer.enqueue(payload) == job_id  # the retry gets that job, and publishes nothing
    assert queued_ids(own_queue) == [job_id]
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        assert finished(producer, job_id).state == "sent"
    finally:
        worker.stop()
    assert [m.message["Subject"] for m in server.received] == ["once"]
    producer.close()
