"""The delay queue and the heartbeat reaper (worker/queue/store/delays.py, worker/queue/process/liveness.py).

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

from support.envelopes import send_kwargs
from support.queue import QueueEnv, Worker, finished, wait_for
from support.smtpd import Rule, SmtpServer
from worker.client import Producer
from worker.queue.broker.kombu_redis import BrokerKeys
from worker.queue.broker.taskclock import TASKS
from worker.queue.process import liveness
from worker.queue.store.delays import RETRYING, DelayQueue
from worker.queue.store.jobs import JobStore
from worker.queue.store.ready import READY_ACCOUNTS, ReadyQueues, ready_key

# The shipped time limits and visibility timeout (support.queue shrinks only the retry delays).
PRODUCTION = {
    "POSTROOM_SOFT_TIME_LIMIT": "300",
    "POSTROOM_TIME_LIMIT": "360",
    "POSTROOM_VISIBILITY_TIMEOUT": "3600",
}


def retrying(env: QueueEnv, job_id: str, due: float, state: str = "retrying") -> None:
    env.redis.hset(f"postroom:job:{job_id}", mapping={"state": state, "account": "a", "payload": "{}"})
    env.redis.zadd(RETRYING, {job_id: due})


def test_the_delay_queue_makes_a_job_ready_when_it_is_due_and_not_before(own_queue: QueueEnv) -> None:
    delays = DelayQueue(own_queue.redis)
    now = time.time()
    retrying(own_queue, "early", now + 60)
    retrying(own_queue, "due", now - 1)
    retrying(own_queue, "ended", now - 1, state="sent")  # sent meanwhile (a copy ran): dropped
    assert delays.move_due(now) == ["due"]
    assert own_queue.redis.zrange(ready_key("a"), 0, -1) == ["due"]
    assert own_queue.redis.hget("postroom:job:due", "state") == "queued"
    assert own_queue.redis.zrange(RETRYING, 0, -1) == ["early"]
    assert delays.move_due(now + 61) == ["early"]


def test_a_due_retry_is_taken_before_the_backlog_that_became_ready_after_it(own_queue: QueueEnv) -> None:
    """A retry that came due is scored by its due time: behind a backlog of thousands it ran
    minutes after its time once (95 s late in a 10,000-message chaos run)."""
    now = time.time()
    for n in range(3):
        own_queue.redis.hset(f"postroom:job:b{n}", mapping={"state": "queued", "account": "a"})
        own_queue.redis.zadd(ready_key("a"), {f"b{n}": now + n})
        own_queue.redis.sadd(READY_ACCOUNTS, "a")
    retrying(own_queue, "due", now - 5)
    DelayQueue(own_queue.redis).move_due(now + 10)
    taken = ReadyQueues(own_queue.redis).take("h", 4, {"a": 4}, default_room=0)
    assert [job_id for job_id, _, _ in taken] == ["due", "b0", "b1", "b2"]


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


def taken(env: QueueEnv) -> int:
    """Jobs the worker processes hold (taken from their ready sets)."""
    return sum(int(env.redis.hlen(key)) for key in env.redis.scan_iter(match="postroom:taken:*"))


def test_a_killed_workers_taken_jobs_run_again_within_a_minute(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # every connection stalls at MAIL: the worker holds jobs on its connections and waiting for one
    server = smtp_server(mode="plain", stall_mail_after=0, stall_seconds=600, stall_all=True)
    own_queue.account("held", server, limits={"max_connections": 2})
    producer = own_queue.producer()
    ids = [producer.send_notification("held", [f"r{i}@example.net"], f"held {i}", "t") for i in range(40)]
    killed_at, second = held_by_a_killed_worker(
        own_queue,
        server,
        tmp_path,
        producer,
        ids,
        lambda: server.stalls >= 2 and taken(own_queue) >= 3,
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
    producer = own_queue.producer()
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


def test_a_group_stuck_past_its_time_limit_lets_its_jobs_and_claims_go(own_queue: QueueEnv) -> None:
    """A thread cannot be stopped: a group past the hard time limit gives its jobs back to their
    ready sets (counted as runs cut short) and its Message-ID claims lapse; a healthy control
    task's message stays claimed."""
    from worker.queue.store.marks import CLAIMS

    own_queue.redis.hset("postroom:job:stuck", mapping={"state": "sending", "account": "a"})
    own_queue.redis.zadd(ready_key("a"), {"stuck": time.time()})
    own_queue.redis.sadd(READY_ACCOUNTS, "a")
    beat = liveness.Heartbeat(own_queue.redis, lambda: ["t-other"], time_limit=0.3, state=own_queue.redis)
    queues = ReadyQueues(own_queue.redis)
    assert queues.take(beat.holder, 1, {"a": 1}, default_room=0) == [("stuck", "a", 0)]
    with own_queue.redis.pipeline() as pipe:
        queues.running_into(pipe, beat.holder, [("stuck", "a")])
        pipe.execute()
    began, release = threading.Event(), threading.Event()

    def stuck_group() -> None:
        TASKS.started(None)
        TASKS.carrying(["stuck"])
        CLAIMS.add([("a", "<stuck@example.com>", "token")])
        began.set()
        release.wait(30)
        TASKS.finished()

    thread = threading.Thread(target=stuck_group)
    thread.start()
    try:
        assert began.wait(10)
        beat.beat()
        assert own_queue.redis.hkeys(f"postroom:taken:{beat.holder}") == ["stuck"]  # within its limit
        time.sleep(0.5)
        beat.beat()
        assert own_queue.redis.hkeys(f"postroom:taken:{beat.holder}") == []
        assert own_queue.redis.zrange(ready_key("a"), 0, -1) == ["stuck"]
        assert own_queue.redis.hget("postroom:job:stuck", "cut_short") == "1"
        consumer = own_queue.redis.smembers(liveness.holding_key(beat.holder, "consumer"))
        assert consumer == {"-", "t-other"}
        assert CLAIMS.drop_owned_by(thread.ident or 0) == 0  # already dropped: no longer renewed
    finally:
        release.set()
        thread.join(10)
    assert TASKS.hostages() == set()
