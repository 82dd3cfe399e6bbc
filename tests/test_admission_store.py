"""How a taken-in job reaches Redis (worker/queue/store/admission.py), on a real Redis: the payload
is written by a plain HSETNX in the same MULTI as the ADMIT script, never passed through a
script (a script's copy of it is work proportional to its size in Redis's one thread), and a
copy of a job already recorded changes nothing of its record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from support.monitor import monitored
from support.queue import QueueEnv
from worker.db.keys import redis_key
from worker.queue.store.admission import Admission
from worker.queue.store.jobs import JobStore
from worker.queue.store.jobscripts import ADMIT
from worker.queue.store.ready import BELL, READY_ACCOUNTS, ready_key
from worker.records.loader import Records

TEXT = "a long body\n" * 9000  # about 100 KB


def _payload(subject: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "account": "acme",
        "to": ["rcpt@example.net"],
        "subject": subject,
        "text": TEXT,
        "message_id": "<m1@example.com>",
        **extra,
    }


def _no_dead(job_id: str, kwargs: Any, reason: str) -> Any:
    raise AssertionError(f"{job_id} refused: {reason}")


@pytest.fixture
def admission(own_queue: QueueEnv) -> Iterator[Admission]:
    store = JobStore(own_queue.redis, job_ttl=3600)
    records = Records.load(own_queue.accounts, own_queue.config)
    yield Admission(store, lambda: records, schedule_horizon=86400.0, dead_on_arrival=_no_dead)


def test_a_job_taken_in_has_its_record_payload_and_ready_entry(
    admission: Admission, own_queue: QueueEnv
) -> None:
    [admitted] = admission.admit([("job-1", _payload())])
    assert admitted.state == "ready"
    record = own_queue.redis.hgetall(redis_key("job", "job-1"))
    assert record["state"] == "queued"
    assert record["account"] == "acme"
    assert record["message_id"] == "<m1@example.com>"
    assert json.loads(record["payload"])["text"] == TEXT
    assert float(record["enqueued_at"]) > 0
    assert 0 < own_queue.redis.ttl(redis_key("job", "job-1")) <= 3600
    assert own_queue.redis.zscore(ready_key("acme"), "job-1") is not None
    assert own_queue.redis.sismember(READY_ACCOUNTS, "acme")


def test_a_copy_of_a_recorded_job_keeps_the_records_payload(
    admission: Admission, own_queue: QueueEnv
) -> None:
    admission.admit([("job-2", _payload("first"))])
    own_queue.redis.hset(redis_key("job", "job-2"), "state", "sending")  # under way
    [again] = admission.admit([("job-2", _payload("a redelivered copy"))])
    assert again.state == "sending"
    kept = own_queue.redis.hget(redis_key("job", "job-2"), "payload")
    assert kept is not None
    assert json.loads(kept)["subject"] == "first"


def test_the_payload_never_passes_through_a_script(admission: Admission, own_queue: QueueEnv) -> None:
    """MONITOR shows every command a script runs: none of them carries the 100 KB body, and the
    bell rings once for the batch's account, not once a job."""

    def last(kind: str, command: str) -> bool:
        return "EXEC" in command and kind != "lua"

    with monitored(own_queue.db, last) as seen:
        admitted = admission.admit([(f"job-m{i}", _payload(f"s{i}")) for i in range(3)])
    assert [a.state for a in admitted] == ["ready"] * 3
    in_scripts = [line for line in seen if line.startswith("lua")]
    assert in_scripts, seen
    assert not [line for line in in_scripts if "a long body" in line]
    assert len([line for line in seen if "HSETNX" in line and "a long body" in line]) == 3
    assert len([line for line in seen if f"PUBLISH {BELL}" in line]) == 1
    assert "payload" not in ADMIT
