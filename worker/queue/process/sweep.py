"""The orphan sweep: an open job found in none of the places it can wait is made ready again.

Every job with a record is listed in ``open`` (a sorted set, by enqueue time) until it reaches a
final state, and waits in exactly one place, by its state: ``queued`` in its account's ready set
(worker/queue/store/ready.py) or taken by a live worker process, ``sending`` taken by a live worker
process, ``retrying`` and ``scheduled`` in Postroom's delay queue, ``held`` in its paused
account's held list. Every step between them is one script, and a worker that dies has what it
took put back by the reapers (worker/queue/process/liveness.py); the sweep is the net under all of that
(a Redis that lost its last second of writes in a crash, a bug): it looks each open job older
than ``grace`` up where its state says it waits — a few O(1) reads a job, nothing proportional to
a queue's depth. A job missing is only a *suspect* at first; missing again at a sweep at least
``confirm`` seconds later, with its record unchanged, it is made ready again under its own id.
Should it have been somewhere after all, the copy is harmless: the Message-ID claim and the
sent marks keep one job from being sent twice.

The beat runs ``postroom.sweep`` every ``sweep_interval`` seconds; ``postroom sweep`` runs one by
hand.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import OPEN_STATES
from worker.queue.process.liveness import HOLDERS, holding_key
from worker.queue.store.delays import RETRYING
from worker.queue.store.jobrecord import OPEN, SCHEDULED
from worker.queue.store.ready import ready_key, taken_key

log = logging.getLogger("postroom.sweep")

SUSPECTS = redis_key("sweep", "suspects")
LOCK = redis_key("sweep", "lock")
_CHUNK = 500

Republish = Callable[[str, dict[str, Any]], None]
_RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass
class SweepReport:
    """What one sweep saw (``postroom sweep --json`` prints it)."""

    open_jobs: int = 0
    checked: int = 0  # open jobs old enough to be looked for
    present: int = 0  # messages found in the broker
    suspects: int = 0  # missing for the first time (looked for again next sweep)
    republished: list[str] = field(default_factory=list)
    closed: int = 0  # index entries of jobs that had ended (or whose record is gone)
    skipped: str | None = None  # why nothing was done (another sweep holds the lock)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sweeper:
    """One sweep: Postroom's records against where their jobs wait."""

    def __init__(
        self, client: redis.Redis, republish: Republish, *, grace: float = 30.0, confirm: float = 5.0
    ) -> None:
        self.client = client  # Postroom's state: the records, the ready sets, the delay queue
        self.republish = republish
        self.grace = grace  # a job younger than this is not looked for at all
        self.confirm = confirm  # missing at two sweeps this far apart before it is made ready again

    def run(self, now: float | None = None, *, lock_for: float = 300.0) -> SweepReport:
        now = time.time() if now is None else now
        report = SweepReport(open_jobs=int(self.client.zcard(OPEN)))
        token = f"{now}"
        if not self.client.set(LOCK, token, nx=True, ex=max(1, int(lock_for))):
            report.skipped = "another sweep is running"
            return report
        try:
            self._run(now, report)
        finally:
            self.client.eval(_RELEASE_LOCK, 1, LOCK, token)  # only our own lock, in one step
        return report

    def _run(self, now: float, report: SweepReport) -> None:
        candidates = cast(list[Any], self.client.zrangebyscore(OPEN, "-inf", now - self.grace))
        ids = [_text(c) for c in candidates]
        report.checked = len(ids)
        stored = cast(dict[Any, Any], self.client.hgetall(SUSPECTS))
        suspects = {_text(k): _text(v) for k, v in stored.items()}
        if not ids:
            if suspects:
                self.client.delete(SUSPECTS)
            return
        records = self._records(ids)
        closed = [job_id for job_id in ids if records[job_id] is None]
        alive = [job_id for job_id in ids if records[job_id] is not None]
        if closed:
            self.client.zrem(OPEN, *closed)
            report.closed = len(closed)
        if not alive:
            self.client.delete(SUSPECTS)
            return
        found = self._found(alive, {j: cast(tuple[str, str, str], records[j]) for j in alive})
        missing = [job_id for job_id in alive if job_id not in found]
        report.present = len(alive) - len(missing)
        new_suspects: dict[Any, str] = {}
        for job_id in missing:
            fingerprint = "/".join(cast(tuple[str, str, str], records[job_id]))
            seen = suspects.get(job_id)
            if seen is not None:
                since, _, was = seen.partition(" ")
                if was == fingerprint and now - float(since) >= self.confirm:
                    if self._publish_again(job_id):
                        report.republished.append(job_id)
                    continue
                if was == fingerprint:
                    new_suspects[job_id] = seen  # keep the first sighting
                    continue
            new_suspects[job_id] = f"{now} {fingerprint}"
        report.suspects = len(new_suspects)
        with self.client.pipeline() as pipe:
            pipe.delete(SUSPECTS)
            if new_suspects:
                pipe.hset(SUSPECTS, mapping=new_suspects)
            pipe.execute()
        for job_id in report.republished:
            log.warning("sweep: job %s was waiting nowhere; made it ready again", job_id)

    def _records(self, ids: list[str]) -> dict[str, tuple[str, str, str] | None]:
        """job id → (state, account, updated_at) of its open record (None: ended or gone)."""
        out: dict[str, tuple[str, str, str] | None] = {}
        for chunk in _chunks(ids, _CHUNK):
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hmget(redis_key("job", job_id), "state", "account", "updated_at", "attempts")
                rows = pipe.execute()
            for job_id, (state, account, updated, attempts) in zip(chunk, rows, strict=True):
                state = _text(state) if state is not None else None
                if state not in OPEN_STATES:
                    out[job_id] = None
                else:
                    out[job_id] = (
                        f"{state}/{_text(attempts or '0')}",
                        _text(account or ""),
                        _text(updated or ""),
                    )
        return out

    def _found(self, ids: list[str], records: dict[str, tuple[str, str, str]]) -> set[str]:
        """The jobs found where their state says they wait (O(1) reads each)."""
        taken = self._taken()
        held = self._held()
        found: set[str] = set()
        for chunk in _chunks(ids, _CHUNK):
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    state, account = records[job_id][0].split("/")[0], records[job_id][1]
                    where = {"retrying": RETRYING, "scheduled": SCHEDULED}.get(state, ready_key(account))
                    pipe.zscore(where, job_id)
                scores = pipe.execute()
            for job_id, score in zip(chunk, scores, strict=True):
                if score is not None or job_id in taken or job_id in held:
                    found.add(job_id)
        return found

    def _taken(self) -> set[str]:
        """What the live worker processes hold (a dead one's is the reaper's to put back)."""
        holders = [_text(h) for h in cast(set[Any], self.client.smembers(HOLDERS))]
        with self.client.pipeline(transaction=False) as pipe:
            for holder in holders:
                pipe.exists(holding_key(holder, "alive"))
                pipe.hkeys(taken_key(holder))
            replies = pipe.execute()
        out: set[str] = set()
        for alive, ids in zip(replies[0::2], replies[1::2], strict=True):
            if alive:
                out.update(_text(i) for i in ids)
        return out

    def _held(self) -> set[str]:
        """The jobs in the held lists of paused accounts."""
        found: set[str] = set()
        paused = {_text(name) for name in cast(set[Any], self.client.smembers(redis_key("paused")))}
        for name in paused:
            for item in cast(list[Any], self.client.lrange(redis_key("held", name), 0, -1)):
                found.add(str(json.loads(_text(item))["id"]))
        return found

    def _publish_again(self, job_id: str) -> bool:
        raw = self.client.hget(redis_key("job", job_id), "payload")
        if raw is None:
            return False
        payload = json.loads(_text(raw))
        if not isinstance(payload, dict):
            return False
        self.client.hset(redis_key("job", job_id), "updated_at", time.time())
        self.republish(job_id, payload)
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
