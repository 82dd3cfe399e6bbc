"""The job store's decisions about one job, against a real Redis: the intake of a job without a
record, the fence that keeps a superseded attempt's outcome off the record, and cancel as one
decision with everything that could still send (worker/queue/store/jobscripts.py, schedule.py)."""

from __future__ import annotations

import time

from support.queue import QueueEnv
from worker.db.vocabulary import JobState
from worker.ops.counters import Tally
from worker.queue.store import schedule
from worker.queue.store.jobrecord import SCHEDULED
from worker.queue.store.jobs import JobStore

PAYLOAD = {"account": "acct", "to": ["a@example.net"], "text": "x", "message_id": "<m1@example.net>"}


def finish(store: JobStore, job_id: str, state: JobState, fence: str = "") -> int:
    with store.redis.pipeline(transaction=False) as pipe:
        store.finish_into(pipe, job_id, "acct", state=state, attempt=1, fence=fence, count=False)
        return int(pipe.execute()[0])


def test_a_job_without_a_record_gets_one_and_one_not_due_waits_in_the_schedule(own_queue: QueueEnv) -> None:
    store = JobStore(own_queue.redis, job_ttl=3600)
    due = time.time() + 20 * 86400  # further ahead than job_ttl: its record must outlive the wait
    waits, starts = store.begin_many([("raw-1", PAYLOAD, due), ("raw-2", PAYLOAD, None)])
    assert waits.waits and not waits.started and waits.state == "queued"
    assert starts.started and starts.attempt == 1 and starts.fence == "1"
    first, second = store.get("raw-1"), store.get("raw-2")
    assert first is not None and first.state == "scheduled" and first.message_id == "<m1@example.net>"
    assert second is not None and second.state == "sending"
    assert own_queue.redis.zscore(SCHEDULED, "raw-1") == due
    assert own_queue.redis.ttl("postroom:job:raw-1") > 20 * 86400
    assert {own_queue.redis.zscore("postroom:open", j) is not None for j in ("raw-1", "raw-2")} == {True}
    started = store.begin_many([("raw-1", PAYLOAD, None)])[0]  # its time came: off the schedule
    assert started.started and own_queue.redis.zscore(SCHEDULED, "raw-1") is None


def test_a_superseded_attempt_writes_nothing_and_an_outside_end_fences_off_the_running_one(
    own_queue: QueueEnv,
) -> None:
    store = JobStore(own_queue.redis)
    old = store.begin_attempt("j", PAYLOAD)
    new = store.begin_attempt("j", PAYLOAD)  # a copy started while the first was frozen
    assert finish(store, "j", JobState.SENT, new.fence) == 1
    assert finish(store, "j", JobState.RETRYING, old.fence) == 0  # the woken one's late outcome
    job = store.get("j")
    assert job is not None and job.state == "sent" and len(job.history or []) == 1
    later = store.begin_attempt("k", PAYLOAD)
    assert finish(store, "k", JobState.DEAD) == 1  # RabbitMQ's poison mover: no fence of its own
    assert finish(store, "k", JobState.SENT, later.fence) == 0  # the attempt it overtook
    dead = store.get("k")
    assert dead is not None and dead.state == "dead"


def test_counters_taken_back_leave_nothing_behind(own_queue: QueueEnv) -> None:
    tally = Tally()
    tally.add("acct", transport="smtp", outcome="sent", counter="sent", latency=0.4, now=time.time())
    for sign in (1, -1):
        with own_queue.redis.pipeline(transaction=False) as pipe:
            tally.write_into(pipe, sign=sign)
            pipe.execute()
    assert set(map(int, own_queue.redis.hgetall("postroom:m:deliveries").values())) == {0}
    assert set(map(int, own_queue.redis.hgetall("postroom:m:attempts").values())) == {0}


def test_cancel_says_no_while_an_attempt_holds_the_claim_or_a_recipient_took_the_message(
    own_queue: QueueEnv,
) -> None:
    store, redis = JobStore(own_queue.redis), own_queue.redis
    store.begin_attempt("c", PAYLOAD)
    assert finish(store, "c", JobState.RETRYING) == 1  # the record says retrying ...
    redis.set("postroom:claim:acct:<m1@example.net>", "another attempt's token")  # ... yet one sends
    assert schedule.cancel(redis, "c", 3600) == (False, "sending")
    redis.delete("postroom:claim:acct:<m1@example.net>")
    redis.hset("postroom:delivered:acct:<m1@example.net>", "a@example.net", "{}")  # it took one
    assert schedule.cancel(redis, "c", 3600) == (False, "partly sent")
    redis.delete("postroom:delivered:acct:<m1@example.net>")
    assert schedule.cancel(redis, "c", 3600) == (True, "retrying")
    assert not store.begin_attempt("c", PAYLOAD).started  # and nothing starts it again
    assert store.hold_if_paused("c", "acct", PAYLOAD, "paused") in (0, -1)  # nor holds it


def test_an_unreadable_entry_takes_the_producers_id_only_when_no_job_has_it(own_queue: QueueEnv) -> None:
    store = JobStore(own_queue.redis)
    assert (
        store.quarantine(b"[1, 2]", "body is not [args, kwargs, embed]", claimed_id="fresh-id") == "fresh-id"
    )
    store.begin_attempt("busy-id", PAYLOAD)  # a job of that id exists (under way, even)
    filed = store.quarantine(b"[1, 2]", "body is not [args, kwargs, embed]", claimed_id="busy-id")
    assert filed.startswith("unreadable-")
    busy = store.get("busy-id")
    assert busy is not None and busy.state == "sending"  # left alone
    assert store.quarantine(b"x", "not JSON", claimed_id="a b>c").startswith("unreadable-")  # unusable id
