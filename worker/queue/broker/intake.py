"""The quarantine: whatever arrives on Postroom's queue that no job can be made of.

Celery's consumer turns a broker message into a task request in its
``on_task_received`` handler (``celery.worker.consumer.Consumer.
create_task_handler``). Messages it does not expect take one of two paths
there: the ones Celery recognises as bad (no ``task`` header, an unknown task,
a body it cannot decode, content it does not accept) are logged and dropped —
acknowledged or rejected without requeue, so a producer's job vanishes with
no record — and the rest crash the consumer: a body that is not ``[args,
kwargs, embed]`` ("Unrecoverable error", and the message is restored for the
next worker to die on), a message without an ``id`` (the consumer reconnects
in a loop while the rest of the queue waits).

:class:`Consumer` (the worker's ``worker_consumer``) screens each message
before Celery's strategy sees it (:func:`problem_with`: headers, task name,
decodable body of the right shape, arguments the task accepts), and routes
Celery's own "bad message" handlers to the same place. An unusable message is
written to the dead letters (:meth:`worker.queue.store.jobs.JobStore.quarantine`: the
reason and the raw bytes), then acknowledged; the worker reads on. Entries
kombu itself cannot read (not JSON, no delivery tag) are caught one level down,
in :mod:`worker.queue.broker.kombu_redis`, and end in the same place.

Payloads that have the right shape but are invalid in a field are the task's
business: they reach ``postroom.send``, which dead-letters them with pydantic's
reasons under their own job id (worker/queue/tasks.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from worker.db.vocabulary import OPEN_STATES, JobState
from worker.queue.broker import kombu_redis as broker
from worker.queue.broker.screen import NEVER_EXPIRE, body_problem, header_problem
from worker.queue.broker.taskclock import TASKS
from worker.queue.store.jobrecord import safe_text
from worker.queue.store.jobs import JobStore

log = logging.getLogger("postroom.intake")

# What starts once the consumer is ready (worker/queue/service.py registers itself: this module
# is below it and must not import it).
ON_READY: list[Callable[[Any], None]] = []


def store() -> JobStore:
    """This process's job store (worker/queue/broker/celery_app.py: one per process)."""
    from worker.queue.broker.celery_app import job_store

    return job_store()


def raw_bytes(message: Any) -> bytes:
    """The message as it travelled, as near as kombu still has it."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):  # kombu's virtual transports (Redis) keep the stored envelope
        try:
            return json.dumps(raw, default=repr).encode()
        except (TypeError, ValueError, RecursionError):
            pass
    body = getattr(message, "body", b"")
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "replace")


def problem_with(message: Any, tasks: Any) -> str | None:
    """Why Celery could not make a request of this message for one of ``tasks`` (None: it can)."""
    headers = message.headers
    if not isinstance(headers, dict):
        return "no task headers (not a Celery protocol 2 message)"
    name = headers.get("task")
    if not isinstance(name, str):
        return "no task name in the headers"
    task = tasks.get(name)
    if task is None:
        return f"unknown task {safe_text(name, 80)!r}"
    problem = header_problem(headers)
    if problem is not None:
        return problem
    if name in NEVER_EXPIRE and headers.get("expires") is not None:
        # Celery drops an expired message unseen (acknowledged, no record): a job must not vanish
        return f"{name} does not take an expiry (a job is sent or ends in the dead letters)"
    if message.content_type != "application/json":
        return f"content type {safe_text(message.content_type, 60)} is not accepted (application/json only)"
    try:
        body = message.decode()
    except RecursionError:
        return "body cannot be decoded (nested too deeply)"
    except Exception as exc:
        return f"body cannot be decoded ({type(exc).__name__}: {safe_text(str(exc), 120)})"
    return body_problem(name, body, task.run)


def quarantine(message: Any, reason: str) -> None:
    """Record ``message`` as an unreadable dead letter, then take it off the queue."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    job_id = store().quarantine(
        raw_bytes(message),
        reason,
        queue=str((message.delivery_info or {}).get("routing_key") or ""),
        claimed_id=headers.get("id"),
        task=headers.get("task"),
    )
    log.error("unreadable message: %s; dead letter %s", reason, job_id)
    if not message.acknowledged:
        message.ack()


def _quarantine_raw(raw: bytes, reason: str, queue: str) -> None:
    job_id = store().quarantine(raw, reason, queue=queue)
    log.error("unreadable queue entry: %s; dead letter %s", reason, job_id)


broker.UNREADABLE[:] = [_quarantine_raw]


def move_poison(app: Any, settings: Any, limit: int = 100) -> int:
    """RabbitMQ: the messages its delivery limit set aside (``postroom.poison``: delivered that
    often and never acknowledged, each took its worker down) into Postroom's dead letters."""
    from worker.queue.broker.kinds import amqp_queues

    moved = 0
    with app.connection_for_write() as connection:
        poison = amqp_queues(settings)[1](connection.default_channel)
        poison.declare()  # declared with no arguments if missing, else used as it is
        while moved < limit:
            message = poison.get(no_ack=False)
            if message is None:
                break
            headers = message.headers if isinstance(message.headers, dict) else {}
            count = safe_text(headers.get("x-delivery-count", "?"), 12)
            reason = f"delivered {count} times and never finished (RabbitMQ's delivery limit)"
            job_id = headers.get("id")
            job = store().get(job_id) if isinstance(job_id, str) and job_id else None
            if job is not None and job.state in OPEN_STATES:  # the job's own record ends dead
                attempt = int(job.attempts or 0)
                store().finish(
                    job.id, job.account, state=JobState.DEAD, attempt=attempt, error=reason, counter="dead"
                )
                log.error("job %s: %s; dead-lettered", job.id, reason)
                message.ack()
            else:  # no job of its own (a batch, or a record gone): kept as it came
                quarantine(message, reason)
            moved += 1
    return moved


class Consumer(CeleryConsumer):
    """Celery's consumer, with unusable messages dead-lettered instead of dropped or fatal,
    and the worker's upkeep (heartbeat, reaper, delay mover: worker/queue/process/liveness.py) started
    once it is ready."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,valid-type]
        # Without Celery's native delayed delivery for quorum queues (RabbitMQ): Postroom never
        # publishes an ETA (retries wait in its own delay queue, worker/queue/store/delays.py), and
        # the step would declare some thirty exchanges and queues for nothing.
        default_steps = [
            s for s in CeleryConsumer.Blueprint.default_steps if not s.endswith(":DelayedDelivery")
        ]

    def on_ready(self) -> None:
        super().on_ready()
        for start in ON_READY:  # worker/queue/service.py: the inbox, the dispatcher, the upkeep
            start(self)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        tasks = self.app.tasks
        connection_errors: tuple[type[BaseException], ...] = tuple(getattr(self, "connection_errors", ()))

        def on_task_received(message: Any) -> Any:
            problem = problem_with(message, tasks)
            if problem is not None:
                return quarantine(message, problem)
            headers = message.headers if isinstance(message.headers, dict) else {}
            if headers.get("id") and message.delivery_tag:
                TASKS.expect(str(headers["id"]), str(message.delivery_tag))
            try:
                return handle(message)
            except connection_errors:
                raise  # the broker went away: Celery reconnects and the message comes back
            except Exception as exc:  # Celery's strategy failed on something the screen let through
                log.exception("Celery could not take a message")
                return quarantine(message, f"Celery could not take it: {type(exc).__name__}: {exc}")

        return on_task_received

    # Celery's own handlers for bad messages log and drop them: dead-letter them instead.
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        quarantine(message, f"body cannot be decoded ({type(exc).__name__}: {safe_text(str(exc), 120)})")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        quarantine(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        quarantine(message, f"unknown task {safe_text(headers.get('task'), 80)!r}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"invalid task message: {safe_text(str(exc), 200)}")
