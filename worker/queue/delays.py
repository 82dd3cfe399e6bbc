"""Postroom's own delay queue: a job waiting for its retry waits in Redis, not in a worker.

A retry used to be a Celery ETA message: the worker that scheduled it held it,
unacknowledged, until it was due — and a worker killed meanwhile took it along
until kombu's visibility timeout (an hour) gave it back. Now a job that must
try again later is only a member of ``postroom:retrying`` (a sorted set of job
ids by due time), written in the same pipeline as its record's ``retrying``
state (:meth:`worker.queue.jobs.JobStore.finish_into`); its payload is in its record.
Retries, limit waits (a rate or a connection slot not free yet) and claim waits
all go this way.

Every worker process's upkeep thread (worker/queue/liveness.py) runs
:meth:`DelayQueue.move_due` every :data:`POLL` seconds: it takes the
due jobs in one script (moving them to ``postroom:retrying:moving``), publishes
each under its own job id, and then drops it from ``moving``. A mover that dies
between taking and publishing leaves its jobs in ``moving``; any mover puts
entries older than :data:`STALE_AFTER` back as due, so a job is published at
least once (a copy published twice is harmless: its record and its Message-ID
claim keep it from being sent twice). A job whose record is no longer
``retrying`` (it ended, or was retried by hand) is dropped instead.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from worker.keys import redis_key
from worker.queue.jobrecord import SCHEDULED, JobState
from worker.queue.jobs import JobStore

log = logging.getLogger("postroom.delays")

RETRYING = JobStore.retrying_key
MOVING = redis_key("retrying", "moving")
POLL = 0.5  # seconds between looks for due jobs: a retry runs at most about this late
STALE_AFTER = 30.0  # a job taken this long ago and still in ``moving`` is taken again
BATCH = 200

# KEYS: retrying, moving. ARGV: now, stale before, limit.
_TAKE_DUE = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[1], id)
end
return due
"""

Publish = Callable[[str, dict[str, Any]], object]


class DelayQueue:
    """Moves due jobs from Postroom's delay queue to the broker."""

    def __init__(self, client: redis.Redis, publish: Publish) -> None:
        self.client = client
        self.publish = publish
        self._take = client.register_script(_TAKE_DUE)

    def move_due(self, now: float | None = None, *, limit: int = BATCH) -> list[str]:
        """Publish every job due by ``now`` (at most ``limit``); returns their ids."""
        now = time.time() if now is None else now
        due = [  # retries, then scheduled sends (worker/queue/schedule.py) that came due
            _text(j)
            for source in (RETRYING, SCHEDULED)
            for j in cast(list[Any], self._take(keys=[source, MOVING], args=[now, now - STALE_AFTER, limit]))
        ]
        if not due:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in due:
                pipe.hmget(redis_key("job", job_id), "state", "payload")
            records = cast(list[list[Any]], pipe.execute())
        moved: list[str] = []
        for job_id, (state, raw) in zip(due, records, strict=True):
            payload = json.loads(_text(raw)) if raw else None
            if _text(state or "") in (JobState.RETRYING, JobState.SCHEDULED) and isinstance(payload, dict):
                self.publish(job_id, payload)
                moved.append(job_id)
            else:
                log.info(
                    "delay queue: job %s is no longer waiting for a retry (%s)",
                    job_id,
                    _text(state or "gone"),
                )
        self.client.zrem(MOVING, *due)  # published (or dropped): off the moving set in one go
        return moved

    def waiting(self) -> int:
        """Jobs waiting for their time (and being moved right now)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(RETRYING)
            pipe.zcard(MOVING)
            return sum(int(n) for n in pipe.execute())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
