"""The delay queue and the heartbeat reaper (worker/queue/delays.py, worker/queue/liveness.py).

Unit tests run the real scripts against the real Redis; the kill tests SIGKILL
real worker processes running the shipped settings (the hour-long visibility
timeout included), so only Postroom's own recovery can bring their jobs back
in time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.envelopes import send_kwargs
from support.queue import QueueEnv, Worker, finished, wait_for
from support.smtpd import Rule, SmtpServer
from worker.client import Producer
from worker.queue import liveness
from worker.queue.broker import BrokerKeys
from worker.queue.delays import MOVING, RETRYING, STALE_AFTER, DelayQueue
from worker.queue.jobs import JobStore
from worker.records.loader import Records

# The shipped time limits and visibility timeout (support.queue shrinks only the retry delays).
PRODUCTION = {
    "POSTROOM_SOFT_TIME_LIMIT": "300",
    "POSTROOM_TIME_LIMIT": "360",
    "POSTROOM_VISIBILITY_TIMEOUT": "3600",
}


class Published:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, job_id: str, kwargs: dict[str, Any]) -> None:
        self.ids.append(job_id)


def retrying(env: QueueEnv, job_id: str, due: float, state: str = "retrying") -> None:
    env.redis.hset(
        f"postroom:job:{job_id}", mapping={"state": state, "payload": json.dumps({"account": "a"})}
    )
    env.redis.zadd(RETRYING, {job_id: due})


def test_the_delay_queue_publishes_a_job_when_it_is_due_and_not_before(own_queue: QueueEnv) -> None:
    published = Published()
    delays = DelayQueue(own_queue.redis, published)
    now = time.time()
    retrying(own_queue, "early", now + 60)
    retrying(own_queue, "due", now - 1)
    retrying(own_queue, "ended", now - 1, state="sent")  # sent meanwhile (a copy ran): dropped
    assert delays.move_due(now) == ["due"] and published.ids == ["due"]
    assert own_queue.redis.zrange(RETRYING, 0, -1) == ["early"] and own_queue.redis.zcard(MOVING) == 0
    assert delays.move_due(now + 61) == ["early"]


def test_a_due_job_is_published_at_the_read_end_of_the_queue_not_behind_the_backlog(
    own_queue: QueueEnv,
) -> None:
    """A retry that came due goes to the end of the queue kombu reads from: behind a backlog of
    thousands it would run minutes after its time (95 s late in a 10,000-message chaos run)."""
    from celery import Celery

    from worker.mail.payload import QUEUE, TASK_NAME
    from worker.queue import broker

    broker.install()  # kombu's Redis URLs use Postroom's channel, as in every worker
    app = Celery("at-head-test", broker=own_queue.broker_url, set_as_current=False)
    try:
        backlog = [str(app.send_task(TASK_NAME, kwargs={"n": n}, queue=QUEUE).id) for n in range(3)]
        with broker.at_head():
            due = str(app.send_task(TASK_NAME, kwargs={"n": "due"}, queue=QUEUE).id)
        later = str(app.send_task(TASK_NAME, kwargs={"n": 4}, queue=QUEUE).id)  # back to normal
    finally:
        app.close()
    entries = [json.loads(raw)["headers"]["id"] for raw in own_queue.redis.lrange(QUEUE, 0, -1)]
    assert entries[::-1] == [due, *backlog, later]  # kombu's BRPOP takes from the right


def test_a_job_whose_mover_died_is_taken_again_once_stale(own_queue: QueueEnv) -> None:
    now = time.time()
    own_queue.redis.hset("postroom:job:orphan", mapping={"state": "retrying", "payload": "{}"})
    own_queue.redis.zadd(MOVING, {"orphan": now - STALE_AFTER - 1})  # taken, never published
    published = Published()
    assert DelayQueue(own_queue.redis, published).move_due(now) == ["orphan"]


def unacked(env: QueueEnv, tag: str, age: float, job_id: str | None = None) -> str:
    job_id = job_id or str(uuid.uuid4())
    message = json.loads(send_kwargs({"account": "a"}, task_id=job_id))
    message["properties"]["delivery_tag"] = tag
    env.redis.hset("unacked", tag, json.dumps([message, "", "postroom"]))
    env.redis.zadd("unacked_index", {tag: time.time() - age})
    return job_id


def test_the_reaper_restores_only_what_no_live_holder_claims(own_queue: QueueEnv) -> None:
    orphan = unacked(own_queue, "t-orphan", age=60)
    unacked(own_queue, "t-held", age=60)
    unacked(own_queue, "t-young", age=1)  # its holder may not have said so yet
    own_queue.redis.sadd(liveness.HOLDERS, "alive", "dead")
    own_queue.redis.sadd(liveness.holding_key("alive", "consumer"), "-", "t-held")
    own_queue.redis.expire(liveness.holding_key("alive", "consumer"), 15)
    assert liveness.Reaper(own_queue.redis, BrokerKeys()).reap() == 1
    assert set(own_queue.redis.hkeys("unacked")) == {"t-held", "t-young"}
    (restored,) = own_queue.redis.lrange("postroom", 0, -1)
    message = json.loads(restored)
    assert message["headers"]["id"] == orphan and message["headers"]["redelivered"] is True
    assert own_queue.redis.smembers(liveness.HOLDERS) == {"alive"}  # the dead one's keys are gone


def test_a_heartbeat_claims_what_its_consumer_holds_and_lapses_when_it_stops(own_queue: QueueEnv) -> None:
    beat = liveness.Heartbeat(own_queue.redis, lambda: ["t-1", "t-2"])
    beat.beat()
    key = liveness.holding_key(beat.holder, "consumer")
    assert own_queue.redis.smembers(key) == {"-", "t-1", "t-2"}
    assert 0 < own_queue.redis.ttl(key) <= liveness.LAPSE
    assert beat.holder in own_queue.redis.smembers(liveness.HOLDERS)


def held_by_a_killed_worker(
    env: QueueEnv,
    server: SmtpServer,
    tmp_path: Path,
    producer: Producer,
    ids: list[str],
    what: Callable[[], bool],
) -> tuple[float, Worker]:
    """Run a worker on the shipped settings until ``what`` holds, SIGKILL it, start another."""
    first = Worker(env, tmp_path / "first.log", extra_env=PRODUCTION).start()
    try:
        wait_for(what, 30, "the worker to hold its jobs", first)
    finally:
        first.kill()
    killed_at = time.monotonic()
    server.stall_mail_after = None
    second = Worker(env, tmp_path / "second.log", extra_env=PRODUCTION).start()
    return killed_at, second


def test_a_killed_workers_running_carried_and_prefetched_jobs_run_again_within_a_minute(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # every connection stalls at MAIL: the worker holds running, carried and prefetched jobs
    server = smtp_server(mode="plain", stall_mail_after=0, stall_seconds=600, stall_all=True)
    own_queue.account("held", server, limits={"max_connections": 2})
    producer = Producer(own_queue.broker_url, records=Records.load(own_queue.accounts, own_queue.config))
    ids = [producer.send_notification("held", [f"r{i}@example.net"], f"held {i}", "t") for i in range(40)]
    killed_at, second = held_by_a_killed_worker(
        own_queue,
        server,
        tmp_path,
        producer,
        ids,
        lambda: server.stalls >= 2 and own_queue.redis.hlen("unacked") >= 3,
    )
    try:
        for job_id in ids:
            assert finished(producer, job_id, timeout=60).state == "sent"
        recovered = time.monotonic() - killed_at
    finally:
        second.stop()
        producer.close()
    assert recovered < 60, recovered
    counts = Counter(str(m.message["Message-ID"]) for m in server.received)
    assert len(counts) == len(ids) and max(counts.values()) == 1


def test_a_retry_whose_worker_was_killed_runs_after_its_backoff_and_not_much_later(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    server = smtp_server(mode="plain", rules=[Rule("RCPT", 451, "4.3.0 try again later", times=1)])
    own_queue.account("later", server)
    producer = Producer(own_queue.broker_url, records=Records.load(own_queue.accounts, own_queue.config))
    backoff = {**PRODUCTION, "POSTROOM_RETRY_BASE_DELAY": "24", "POSTROOM_RETRY_MAX_DELAY": "30"}
    first = Worker(own_queue, tmp_path / "first.log", extra_env=backoff).start()
    job_id = producer.send_notification("later", ["r@example.net"], "later", "t")
    try:
        wait_for(
            lambda: getattr(producer.job(job_id), "state", None) == "retrying", 30, "the first attempt", first
        )
        failed_at = time.time()
    finally:
        first.kill()  # the retry (due 12-24 s later) was scheduled by this worker
    second = Worker(own_queue, tmp_path / "second.log", extra_env=backoff).start()
    try:
        assert finished(producer, job_id, timeout=60).state == "sent"
    finally:
        second.stop()
        producer.close()
    (received,) = server.received
    assert 12 - 0.5 <= received.at - failed_at <= 24 + 5, received.at - failed_at
    assert JobStore(own_queue.redis).get(job_id).attempts == 2  # type: ignore[union-attr]


def test_carried_jobs_let_go_while_redis_was_away_are_restored_by_the_reaper(own_queue: QueueEnv) -> None:
    """A carrying task failed while Redis restarted: its give-back could not be written, so the
    jobs are still unacknowledged and in this live process's carried set. The next beat stops
    claiming them, and the reaper restores them (not kombu, an hour later)."""
    job_id = unacked(own_queue, "t-carried", age=60)
    beat = liveness.Heartbeat(own_queue.redis)
    own_queue.redis.sadd(liveness.carried_key(), "t-carried")
    own_queue.redis.sadd(liveness.HOLDERS, beat.holder)
    beat.beat()
    reaper = liveness.Reaper(own_queue.redis, BrokerKeys())
    assert reaper.reap() == 0  # claimed by a live holder
    liveness.release_later(["t-carried"])
    beat.beat()
    assert reaper.reap() == 1
    (restored,) = own_queue.redis.lrange("postroom", 0, -1)
    assert json.loads(restored)["headers"]["id"] == job_id


def test_a_task_stuck_past_its_time_limit_lets_its_jobs_and_claims_go(own_queue: QueueEnv) -> None:
    """The threads pool cannot stop a thread: a task past the hard time limit stops holding its
    message and the jobs it carries (the reaper gives them back) and its Message-ID claims lapse."""
    from worker.queue.marks import CLAIMS

    own = unacked(own_queue, "t-own", age=60)
    carried = unacked(own_queue, "t-carried", age=60)
    beat = liveness.Heartbeat(own_queue.redis, lambda: ["t-own", "t-other"], time_limit=0.3)
    reaper = liveness.Reaper(own_queue.redis, BrokerKeys())
    unacked(own_queue, "t-other", age=60)  # a healthy task's message: held throughout
    began, release = threading.Event(), threading.Event()

    def stuck_task() -> None:
        liveness.TASKS.expect(own, "t-own")
        liveness.TASKS.started(own)
        liveness.TASKS.carrying(["t-carried"])
        own_queue.redis.sadd(liveness.carried_key(), "t-carried")
        CLAIMS.add([("a", "<stuck@example.com>", "token")])
        began.set()
        release.wait(30)
        liveness.TASKS.finished()

    thread = threading.Thread(target=stuck_task)
    thread.start()
    try:
        assert began.wait(10)
        own_queue.redis.sadd(liveness.HOLDERS, beat.holder)
        beat.beat()
        assert reaper.reap() == 0  # within its limit: everything claimed
        time.sleep(0.5)
        beat.beat()
        consumer = own_queue.redis.smembers(liveness.holding_key(beat.holder, "consumer"))
        assert consumer == {"-", "t-other"}
        assert own_queue.redis.smembers(liveness.carried_key()) == set()
        assert reaper.reap() == 2
        restored = {json.loads(m)["headers"]["id"] for m in own_queue.redis.lrange("postroom", 0, -1)}
        assert restored == {own, carried}
        assert CLAIMS.drop_owned_by(thread.ident or 0) == 0  # already dropped: no longer renewed
    finally:
        release.set()
        thread.join(10)
    assert liveness.TASKS.hostages() == set()
