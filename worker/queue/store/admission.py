"""Taking a job in: a payload from a producer that did not use the helper becomes the job the
helper would have made.

Plain Celery and celery-node messages (read off the broker by worker/queue/broker/inbox.py), and a
``postroom.send`` that Celery itself hands a task: each payload is validated (an invalid one is a
dead letter under its own id, with every reason), given what the helper would have given it (a
Message-ID, the time its clock starts), and recorded with its idempotency key by one script
(``ADMIT``, worker/queue/store/jobscripts.py), which also puts a job due now in its account's ready
set (worker/queue/store/ready.py) and one not due yet in the schedule. The payload is stored once,
by a plain ``HSETNX`` in the same MULTI as the script: no script reads or copies it (work
proportional to its size in Redis's one thread). A copy of a job already recorded (a
redelivery) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError

from worker.db.keys import redis_key
from worker.db.vocabulary import JobState
from worker.errors import ConfigurationError
from worker.mail.message import message_id_for
from worker.mail.payload import SendPayload
from worker.ops import tracing
from worker.ops.tracing import Context, Span, SpanKind
from worker.queue.store.jobrecord import OPEN, SCHEDULED, describe, record_fields
from worker.queue.store.jobs import JobStore
from worker.queue.store.jobscripts import ADMIT, ADMIT_SHA
from worker.queue.store.ready import BELL, READY_ACCOUNTS, ready_key
from worker.records.loader import Records


@dataclass(frozen=True)
class Admitted:
    """What taking one job in decided."""

    job_id: str
    state: str  # "ready", "scheduled", "dead", or the state of a job already taken in
    reason: str | None = None
    account: str | None = None  # set for a ready job


class Admission:
    """Takes payloads in for one process (its job store, records and settings)."""

    def __init__(
        self, store: JobStore, records: Any, *, schedule_horizon: float, dead_on_arrival: Any
    ) -> None:
        self.store = store
        self.records = records  # () -> Records: the process's cache (worker/queue/process/runtime.py)
        self.horizon = schedule_horizon
        self.dead_on_arrival = dead_on_arrival  # (job id, kwargs, reason) -> Step (attempts.py)

    def admit(
        self, jobs: Sequence[tuple[str, Any]], parents: Sequence[Context | None] = ()
    ) -> list[Admitted]:
        """Take in each (job id, payload) — one round trip for all of them (plus one per dead one).
        ``parents``: the trace context each one's message carried (None: a new trace starts
        here), continued by a ``postroom.intake`` span kept in its record."""
        now = time.time()
        out: dict[int, Admitted] = {}
        valid: list[tuple[int, str, SendPayload]] = []
        spans = [
            intake_span(job_id, parents[i] if i < len(parents) else None)
            for i, (job_id, _) in enumerate(jobs)
        ]
        try:
            for i, (job_id, kwargs) in enumerate(jobs):
                problem, payload = self._check(kwargs, now)
                if problem is not None or payload is None:
                    step = self.dead_on_arrival(job_id, kwargs, f"invalid payload: {problem}")
                    out[i] = Admitted(job_id, str(step.state), step.reason)
                    tracing.failed(spans[i], "invalid_payload")
                else:
                    valid.append((i, job_id, self._completed(job_id, payload, now)))
            if valid:
                replies = self._scripted(valid, now, [tracing.traceparent(spans[i]) for i, _, _ in valid])
                for (i, job_id, payload), (code, state) in zip(valid, replies, strict=True):
                    out[i] = _admitted(job_id, payload, int(code), state)
        finally:
            for i, span in enumerate(spans):
                if i in out and span.is_recording():
                    span.set_attribute("postroom.result", out[i].state)
                span.end()
        return [out[i] for i in range(len(jobs))]

    def _check(self, kwargs: Any, now: float) -> tuple[str | None, SendPayload | None]:
        try:
            payload = SendPayload.model_validate(kwargs)
        except ValidationError as exc:
            return describe(exc), None
        except RecursionError:
            return "nested too deeply", None
        if payload.send_at is not None and payload.send_at - now > self.horizon:
            return f"send_at: more than {self.horizon / 86400:g} days ahead (schedule_horizon)", None
        return None, payload

    def _completed(self, job_id: str, payload: SendPayload, now: float) -> SendPayload:
        """What the helper adds at enqueue: a Message-ID (when the account is known: its
        domain), and the time the job's clock starts (its send_at, when later)."""
        update: dict[str, Any] = {}
        if payload.enqueued_at is None:
            update["enqueued_at"] = max(now, payload.send_at or 0.0)
        if payload.message_id is None:
            records: Records = self.records()
            try:
                domain = records.account(payload.account).from_address.rsplit("@", 1)[-1]
            except ConfigurationError:  # an unknown or broken account: its attempt says so
                domain = None
            if domain:
                update["message_id"] = message_id_for(job_id, domain)
        return payload.model_copy(update=update) if update else payload

    def _scripted(
        self, valid: list[tuple[int, str, SendPayload]], now: float, traces: list[str]
    ) -> list[Any]:
        """One MULTI for the batch: each payload written as it is (``HSETNX``: a record that
        exists keeps its own) and ``ADMIT`` on the record's small fields — together, so no
        reader ever sees a ready job without its payload, nor a payload without its record —
        then one bell for each account with a job due now. ``traces``: each job's traceparent,
        kept in its record. Returns ADMIT's reply for each job."""
        redis_client = self.store.redis
        for attempt in (1, 2):
            with redis_client.pipeline(transaction=True) as pipe:
                ringing: set[str] = set()
                for (_, job_id, payload), traceparent in zip(valid, traces, strict=True):
                    job_key, due = redis_key("job", job_id), _due(payload, now)
                    kwargs = payload.to_task_kwargs()
                    fields = record_fields(job_id, kwargs, JobState.QUEUED, traceparent=traceparent)
                    pipe.hsetnx(job_key, "payload", fields.pop("payload"))
                    idem = redis_key("idem", payload.account, payload.idempotency_key or "")
                    keys = [
                        job_key, OPEN, SCHEDULED, ready_key(payload.account), READY_ACCOUNTS,
                        idem if payload.idempotency_key else job_key,
                    ]  # fmt: skip
                    args = [
                        now, self.store.job_ttl, due, job_id, now,
                        "1" if payload.idempotency_key else "0", payload.account,
                        *(item for pair in fields.items() for item in pair),
                    ]  # fmt: skip
                    pipe.evalsha(ADMIT_SHA, len(keys), *keys, *args)
                    if due == "":
                        ringing.add(payload.account)
                for account in sorted(ringing):
                    pipe.publish(BELL, account)
                try:
                    replies = pipe.execute()
                except redis.exceptions.NoScriptError:  # a Redis that lost it (a restart)
                    if attempt == 2:
                        raise
                    redis_client.script_load(ADMIT)  # again: HSETNX and ADMIT change nothing twice
                    continue
            return list(replies[1 : 2 * len(valid) : 2])
        raise AssertionError("unreachable")  # pragma: no cover


def _due(payload: SendPayload, now: float) -> float | str:
    """When a job is due: its send_at when later than now, else "" (now)."""
    return payload.send_at if payload.send_at is not None and payload.send_at > now + 1.0 else ""


def intake_span(job_id: str, parent: Context | None) -> Span:
    """The span of a job taken in from a broker message: a child of the producer's context when
    the message carried a ``traceparent``, else the root of the job's trace."""
    span = tracing.start("postroom.intake", parent, SpanKind.CONSUMER)
    if span.is_recording():
        span.set_attributes(
            {
                "messaging.operation.type": "receive",
                "messaging.destination.name": tracing.QUEUE_NAME,
                "messaging.message.id": job_id,
                "postroom.job_id": job_id,
            }
        )
    return span


def _admitted(job_id: str, payload: SendPayload, code: int, state: Any) -> Admitted:
    """What ADMIT's reply says of one job."""
    if code == 1:
        return Admitted(job_id, "ready", account=payload.account)
    if code == -3:
        return Admitted(job_id, JobState.SCHEDULED, "not due yet: waits for its send_at")
    return Admitted(job_id, _text(state), "taken in already")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
