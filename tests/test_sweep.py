"""The orphan sweep (worker/queue/process/sweep.py) against real Redis and a real worker.

Every open job waits in one place, by its state (a ready set, a worker's taken hash, the delay
queue, a held list). The tests take a job out of its place by hand — what a Redis that lost
its last writes in a crash could do — and check that the sweep makes it ready again, and
touches nothing that is still somewhere.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.queue import QueueEnv, Worker, cli, finished
from support.smtpd import SmtpServer
from worker.client import EnqueueError, Producer
from worker.mail.payload import SWEEP_TASK_NAME
from worker.ops.health import AccountHealth
from worker.queue.broker.celery_app import app
from worker.queue.process import liveness
from worker.queue.process.sweep import LOCK, Sweeper
from worker.queue.store.jobrecord import OPEN
from worker.queue.store.jobs import JobStore
from worker.queue.store.ready import ReadyQueues, ready_key

READY = ready_key("swept")


@pytest.fixture
def mail(own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer]) -> tuple[SmtpServer, Producer]:
    server = smtp_server(mode="plain")
    own_queue.account("swept", server)
    producer = own_queue.producer()
    return server, producer


class Published:
    """The sweep's republish function, recording what it made ready again."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.ids: list[str] = []

    def __call__(self, job_id: str, kwargs: dict[str, Any]) -> None:
        self.ids.append(job_id)
        self.producer.republish(job_id, kwargs)


def sweeper_for(env: QueueEnv, publish: Callable[[str, dict[str, Any]], None], **options: Any) -> Sweeper:
    return Sweeper(env.redis, publish, **{"grace": 0.0, "confirm": 0.3, **options})


def send(producer: Producer, n: int) -> list[str]:
    return [producer.send_notification("swept", [f"r{i}@example.net"], f"s{i}", "t") for i in range(n)]


def test_a_job_that_vanished_from_its_ready_set_is_made_ready_again_and_delivered_once(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path
) -> None:
    server, producer = mail
    ids = send(producer, 3)
    lost = ids[0]
    own_queue.redis.zrem(READY, lost)  # its place lost (a Redis crash between fsyncs)
    published = Published(producer)
    sweeper = sweeper_for(own_queue, published)
    first = sweeper.run()
    assert (first.checked, first.present, first.suspects, first.republished) == (3, 2, 1, [])
    assert sweeper.run().republished == []  # seen missing twice, but not yet `confirm` apart
    time.sleep(0.35)
    third = sweeper.run()
    assert third.republished == [lost] and third.suspects == 0
    assert published.ids == [lost]
    assert sorted(own_queue.redis.zrange(READY, 0, -1)) == sorted(ids)  # under its own id again

    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        for job_id in ids:
            assert finished(producer, job_id).state == "sent"
    finally:
        worker.stop()
    counts = Counter(m.message["Message-ID"] for m in server.received)
    assert len(counts) == 3 and set(counts.values()) == {1}
    assert own_queue.redis.zcard(OPEN) == 0  # every job ended: the index is empty again
    producer.close()


def test_jobs_ready_taken_held_retrying_or_scheduled_are_left_alone(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    taken_one, held_one, ready_one, retrying, scheduled = send(producer, 5)
    store, redis = JobStore(own_queue.redis), own_queue.redis
    # one is taken by a live worker process
    assert ReadyQueues(redis).take("holder-1", 1, {"swept": 1}, default_room=0) == [(taken_one, "swept", 0)]
    redis.sadd(liveness.HOLDERS, "holder-1")
    redis.set(liveness.holding_key("holder-1", "alive"), "1", ex=30)
    # one waits for its paused account, in its held list
    redis.zrem(READY, held_one)
    AccountHealth(redis, pause_after=3).pause("swept", "test", by="operator")
    assert store.hold_if_paused(held_one, "swept", {"account": "swept"}, "account paused") == 1
    # one waits for its retry, one for its send_at
    redis.zrem(READY, retrying, scheduled)
    store.finish(retrying, "swept", state="retrying", attempt=1, retry_in=60.0)
    redis.hset(f"postroom:job:{scheduled}", "state", "scheduled")
    redis.zadd("postroom:scheduled", {scheduled: time.time() + 60})

    published = Published(producer)
    sweeper = sweeper_for(own_queue, published)
    report = sweeper.run()
    time.sleep(0.35)
    again = sweeper.run()
    assert (report.checked, report.present, report.suspects) == (5, 5, 0), ready_one
    assert again.republished == [] and published.ids == []
    producer.close()


def test_a_dead_holders_jobs_are_the_reapers_not_the_sweeps(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    running, waiting = send(producer, 2)
    redis, queues = own_queue.redis, ReadyQueues(own_queue.redis)
    redis.hset(f"postroom:job:{waiting}", "cut_short", 1)  # died once before: to run alone, later
    assert len(queues.take("dead-holder", 2, {"swept": 2}, default_room=0)) == 2  # one runs, one waits
    redis.sadd(liveness.HOLDERS, "dead-holder")  # its alive key lapsed long ago
    assert liveness.HolderReaper(redis, None, None).reap() == 2
    assert {redis.zscore(READY, j) is not None for j in (running, waiting)} == {True}
    assert redis.hget(f"postroom:job:{running}", "cut_short") == "1"  # its run counted as cut short
    assert redis.hget(f"postroom:job:{waiting}", "cut_short") == "1"  # only waiting there: not counted
    assert not redis.sismember(liveness.HOLDERS, "dead-holder")
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
    own_queue.redis.delete(READY)
    own_queue.redis.zadd(OPEN, {stale: time.time() - 120})
    own_queue.redis.zadd(OPEN, {"gone-job": time.time() - 120})  # its record expired

    published = Published(producer)
    report = sweeper_for(own_queue, published, grace=60.0).run()
    assert report.checked == 2 and report.closed == 2  # the young job's missing place: not yet
    assert report.suspects == 0 and published.ids == []
    assert own_queue.redis.zrange(OPEN, 0, -1) == [young]
    producer.close()


def test_a_record_that_changed_meanwhile_is_looked_at_again_before_anything_is_published(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    (job_id,) = send(producer, 1)
    own_queue.redis.delete(READY)
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


def test_the_cli_sweep_makes_a_lost_job_ready_and_the_beat_schedules_it(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer]
) -> None:
    _, producer = mail
    kept, lost = send(producer, 2)
    own_queue.redis.zrem(READY, lost)
    own_queue.redis.zadd(OPEN, {kept: time.time() - 120, lost: time.time() - 120})  # past the grace
    done = cli(own_queue, "sweep", "--json")  # looks twice, seconds apart, by itself
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["republished"] == [lost] and report["checked"] == 2
    assert sorted(own_queue.redis.zrange(READY, 0, -1)) == sorted([kept, lost])
    schedule = app.conf.beat_schedule
    entry = next(e for e in schedule.values() if e["task"] == SWEEP_TASK_NAME)
    assert entry["schedule"] == 60.0 and entry["options"]["expires"] == 60.0
    assert entry["options"]["queue"] == "postroom.control"
    producer.close()


def test_an_enqueue_redis_refused_keeps_nothing_and_the_retry_enqueues_once(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, producer = mail
    payload = {"account": "swept", "to": ["x@example.net"], "subject": "s", "text": "t"}
    payload["idempotency_key"] = "order-4712"
    execute = producer.store.redis.pipeline().__class__.execute

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Redis went away")

    with monkeypatch.context() as patch:  # the one transaction never reached Redis
        patch.setattr(producer.store.redis.pipeline().__class__, "execute", refused)
        with pytest.raises(EnqueueError):
            producer.enqueue(payload)
    assert producer.store.redis.pipeline().__class__.execute is execute
    assert own_queue.redis.zcard(OPEN) == 0 and not own_queue.redis.keys("postroom:job:*")
    job_id = producer.enqueue(payload)
    assert own_queue.redis.zrange(READY, 0, -1) == [job_id] and producer.enqueue(payload) == job_id
    producer.close()
