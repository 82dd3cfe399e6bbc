"""Dead letters: jobs that ended ``dead`` (and broker entries no job could be made of),
kept until an operator retries or purges them (contract §3: nothing is dropped silently).

Keys (under ``postroom:``): ``dead``, a sorted set of job ids by when they died; each dead
letter's record and history stay (``job:<id>``, ``history:<id>``) without a TTL.
A part of the job store (:class:`worker.queue.store.jobs.JobStore` is one), kept apart because
it is the operators' side of it: the CLI's ``dead-letters`` and the dashboard act here.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import JobState, history_word
from worker.mail.payload import TASK_ID
from worker.queue.store.emit import emit_args
from worker.queue.store.jobrecord import DEAD, OPEN, UNKNOWN_ACCOUNT, Job, safe_text
from worker.queue.store.jobscripts import QUARANTINE

MAX_RAW_KEPT = 64 * 1024  # bytes of an unreadable message kept (base64) with its dead letter
_key = redis_key


class DeadLetters:
    """The dead-letter side of the job store: listing, inspecting, retrying, purging."""

    redis: redis.Redis
    job_ttl: int
    event_retention: float
    dead_key = DEAD

    def get(self, job_id: str) -> Job | None:  # pragma: no cover - the job store's
        raise NotImplementedError

    def delete(self, job_id: str) -> None:  # pragma: no cover - the job store's
        raise NotImplementedError

    def quarantine(
        self, raw: bytes, reason: str, *, queue: str = "", claimed_id: Any = None, task: Any = None
    ) -> str:
        """A dead letter for a broker entry no job can be made of (undecodable, the wrong
        shape, an unknown task…): its reason and its raw bytes (base64, the first
        :data:`MAX_RAW_KEPT`), listed, shown and purged like any other. Filed under the
        producer's own id (``claimed_id``) when it is a usable one no job has yet, so that
        ``postroom job ID`` answers the producer; else under ``unreadable-<uuid>``. Returns the id."""
        now = time.time()
        kept = raw[:MAX_RAW_KEPT]
        error = f"unreadable message: {reason}"
        entry = json.dumps({"attempt": 0, "at": now, "outcome": history_word(JobState.DEAD), "error": error})
        usable = isinstance(claimed_id, str) and TASK_ID.match(claimed_id) is not None
        candidates = [claimed_id] if usable else []
        for job_id in [*candidates, f"unreadable-{uuid.uuid4()}"]:
            fields: dict[str, str | int | float] = {
                "id": job_id,
                "state": JobState.DEAD,
                "attempts": 0,
                "account": UNKNOWN_ACCOUNT,
                "kind": "unreadable",
                "message_id": "",
                "idempotency_key": "",
                "payload": "",
                "recipients": "{}",
                "created_at": now,
                "updated_at": now,
                "enqueued_at": now,
                "failed_at": now,
                "last_error": error,
                "raw_base64": base64.b64encode(kept).decode(),
                "raw_size": len(raw),
                "raw_queue": safe_text(queue),
                "raw_claimed_id": safe_text(claimed_id) if claimed_id is not None else "",
                "raw_task": safe_text(task) if task is not None else "",
            }
            keys = [_key("job", job_id), _key("history", job_id), OPEN, DEAD, _key("stats", UNKNOWN_ACCOUNT)]
            events = emit_args(JobState.DEAD, self.event_retention)
            args = [job_id, now, json.dumps(fields), entry, *events]
            if self.redis.eval(QUARANTINE, len(keys), *keys, *args):
                return str(job_id)
        raise AssertionError("unreachable: a fresh unreadable- id is never taken")  # pragma: no cover

    def dead_letters(self, *, limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        """Dead letters, oldest first (or the newest ``limit`` of them, newest first)."""
        end = -1 if limit is None else max(limit, 1) - 1
        ids = cast(
            list[tuple[str, float]],
            self.redis.zrange(_key("dead"), 0, end, desc=newest_first, withscores=True),
        )
        out = []
        for job_id, failed_at in ids:
            job = self.get(job_id)
            if job is None:
                continue
            out.append(
                {
                    "id": job_id,
                    "account": job.account,
                    "message_id": job.message_id,
                    "error": job.last_error,
                    "attempts": job.attempts,
                    "failed_at": failed_at,
                }
            )
        return out

    def dead_letter_ids(self, upto: float | None = None) -> list[str]:
        """Every dead letter's id, oldest first; with ``upto``, only those dead by then
        (what an operator saw: "retry all" and "purge all" leave later ones alone)."""
        return cast(
            list[str], self.redis.zrangebyscore(_key("dead"), "-inf", "+inf" if upto is None else upto)
        )

    def is_dead(self, job_id: str) -> bool:
        return self.redis.zscore(_key("dead"), job_id) is not None

    def resurrect(self, job_id: str) -> dict[str, Any]:
        """Take a dead letter out for a retry; returns its payload (same Message-ID).

        KeyError when it is not a dead letter (any more): of two callers at once (a
        double click, two operators), only the one whose removal took it gets the payload."""
        job = self.get(job_id)
        if job is None or job.payload is None or not self.redis.zrem(_key("dead"), job_id):
            raise KeyError(job_id)
        key = _key("job", job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(
                key,
                mapping={
                    "state": JobState.QUEUED,
                    "attempts": 0,
                    "updated_at": time.time(),
                    "enqueued_at": time.time(),
                },
            )
            pipe.hdel(key, "failed_at")
            pipe.zadd(OPEN, {job_id: time.time()})
            pipe.expire(key, self.job_ttl)
            pipe.expire(_key("history", job_id), self.job_ttl)
            pipe.execute()
        return job.payload

    def purge(self, job_ids: Iterable[str] | None = None) -> int:
        ids = (
            list(job_ids) if job_ids is not None else cast(list[str], self.redis.zrange(_key("dead"), 0, -1))
        )
        removed = 0
        for job_id in ids:
            if self.redis.zrem(_key("dead"), job_id):
                self.delete(job_id)
                removed += 1
        return removed

    def dead_count(self) -> int:
        return int(self.redis.zcard(_key("dead")))
