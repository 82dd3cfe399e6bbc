"""The orphan sweep: a job whose message is nowhere in the broker is published again.

Kombu's Redis transport hands a message to a worker in two steps: ``BRPOP``
takes it off the queue, then a second call files it in the unacknowledged set
(from where a dead worker's messages come back). A worker SIGKILLed between the
two, or a Redis that dies between them, leaves a job whose record says
``queued`` while its message exists nowhere: nothing would ever run it.

The sweep closes that hole from the records' side. Every job with a record is
listed in ``open`` (a sorted set, by enqueue time) until it reaches a final
state. A sweep reads where messages can be — the queue and its priority lists,
kombu's unacknowledged hash, the held lists of paused accounts — and compares.
A job missing from all of them is only a *suspect* at first (a producer may be
between writing the record and publishing, a message between ``BRPOP`` and its
registration); missing again at a sweep at least ``confirm`` seconds later,
with its record unchanged, it is published again with its own id and payload.
Should the message still have existed somewhere after all, the copy is
harmless: the Message-ID claim and the sent marks keep one job from being sent
twice (worker/queue/jobs.py).

The beat runs ``postroom.sweep`` every ``sweep_interval`` seconds;
``postroom sweep`` runs one by hand.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from worker.keys import redis_key
from worker.queue.brokers import BrokerView
from worker.queue.delays import MOVING, RETRYING
from worker.queue.jobrecord import OPEN, OPEN_STATES, SCHEDULED

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
    """One sweep: Postroom's records against what ``broker`` holds (worker/queue/brokers.py)."""

    def __init__(
        self,
        client: redis.Redis,
        broker: BrokerView,
        republish: Republish,
        *,
        grace: float = 30.0,
        confirm: float = 5.0,
        unlisted_after: float = 3600.0,
    ) -> None:
        self.client = client  # Postroom's state: the records, the delay queue, the held lists
        self.broker = broker
        self.republish = republish
        self.grace = grace  # a job younger than this is not looked for at all
        self.confirm = confirm  # missing at two sweeps this far apart before it is published again
        # a broker that cannot list its messages (RabbitMQ): a job counts as missing only when its
        # record has not changed for this long (a producer that died before it published)
        self.unlisted_after = unlisted_after

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
        present = self.locations()
        listed = self.broker.job_ids()
        if listed is None:  # the broker cannot say: only records unchanged for long are missing
            present |= {j for j in alive if now - _updated_at(records[j]) < self.unlisted_after}
        else:
            present |= listed
        missing = [job_id for job_id in alive if job_id not in present]
        report.present = len(alive) - len(missing)
        new_suspects: dict[Any, str] = {}
        for job_id in missing:
            fingerprint = records[job_id] or ""
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
            log.warning("sweep: job %s had no message in the broker; published it again", job_id)

    def _records(self, ids: list[str]) -> dict[str, str | None]:
        """job id → a fingerprint of its open record (None: ended or gone)."""
        out: dict[str, str | None] = {}
        for chunk in _chunks(ids, _CHUNK):
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hmget(redis_key("job", job_id), "state", "attempts", "updated_at")
                rows = pipe.execute()
            for job_id, (state, attempts, updated) in zip(chunk, rows, strict=True):
                state = _text(state) if state is not None else None
                if state not in OPEN_STATES:
                    out[job_id] = None
                else:
                    out[job_id] = f"{state}/{_text(attempts or '0')}/{_text(updated or '')}"
        return out

    def locations(self) -> set[str]:
        """Every job id waiting in Postroom's own structures: the delay queue and the held lists of
        paused accounts (the broker's messages are :meth:`BrokerView.job_ids`)."""
        found: set[str] = set()
        for waiting in (RETRYING, MOVING, SCHEDULED):  # waiting in Postroom's delay queue
            found.update(_text(job_id) for job_id in cast(list[Any], self.client.zrange(waiting, 0, -1)))
        paused = {_text(name) for name in cast(set[Any], self.client.smembers(redis_key("paused")))}
        for key in self.client.scan_iter(match=redis_key("held", "*"), count=_CHUNK):
            if _text(key).removeprefix(redis_key("held", "")) not in paused:
                continue  # nothing releases the held list of an account that is not paused
            for item in cast(list[Any], self.client.lrange(key, 0, -1)):
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


def _updated_at(fingerprint: str | None) -> float:
    try:
        return float((fingerprint or "").rsplit("/", 1)[-1])
    except ValueError:
        return 0.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
