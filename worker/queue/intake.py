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
written to the dead letters (:meth:`worker.queue.jobs.JobStore.quarantine`: the
reason and the raw bytes), then acknowledged; the worker reads on. Entries
kombu itself cannot read (not JSON, no delivery tag) are caught one level down,
in :mod:`worker.queue.broker`, and end in the same place.

Payloads that have the right shape but are invalid in a field are the task's
business: they reach ``postroom.send``, which dead-letters them with pydantic's
reasons under their own job id (worker/queue/tasks.py).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from worker.mail.payload import BATCH_TASK_NAME, QUEUE, TASK_ID, TASK_NAME, job_headers
from worker.ops import series
from worker.queue import broker, liveness
from worker.queue.delays import POLL, DelayQueue
from worker.queue.jobrecord import OPEN_STATES, SCHEDULED, JobState, safe_text
from worker.queue.jobs import JobStore

log = logging.getLogger("postroom.intake")

_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord", "group", "parent_id", "root_id"})
# Headers Celery's request reads as text (names, ids, log reprs).
_TEXT_HEADERS = ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin", "lang")
# Tasks whose messages carry jobs: Celery's `expires` would drop them unrecorded.
NEVER_EXPIRE = frozenset({TASK_NAME, BATCH_TASK_NAME})
_store: JobStore | None = None


def store() -> JobStore:
    global _store
    if _store is None:
        from worker.queue.app import settings, state_url

        _store = JobStore.from_url(
            state_url, job_ttl=settings.job_ttl, event_retention=settings.webhook_retention
        )
    return _store


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


def header_problem(headers: dict[str, Any]) -> str | None:
    """Why these protocol 2 headers would make Celery's strategy fail (None: they will not)."""
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not TASK_ID.match(task_id):
        return f"task id {safe_text(task_id, 80)} is not a usable id (1-200 of A-Z a-z 0-9 . _ + = -)"
    for field in ("eta", "expires"):
        value = headers.get(field)
        if value is not None and not _iso_time(value):
            return f"header {field} {safe_text(value, 60)} is not an ISO 8601 time"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits)
    ):
        return "header timelimit is not [soft, hard]"
    for field in ("retries", "replaced_task_nesting", "group_index"):
        value = headers.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"header {field} is not an integer"
    for field in _TEXT_HEADERS:
        value = headers.get(field)
        if value is not None and not isinstance(value, str):
            return f"header {field} is not a string"
    stamped, stamps = headers.get("stamped_headers"), headers.get("stamps")
    if stamped is not None and not (isinstance(stamped, list) and all(isinstance(h, str) for h in stamped)):
        return "header stamped_headers is not a list of names"
    if stamps is not None and not isinstance(stamps, dict):
        return "header stamps is not an object"
    if headers.get("ignore_result") not in (None, True, False):
        return "header ignore_result is not a boolean"
    return None


def body_problem(name: str, body: Any, run: Callable[..., Any]) -> str | None:
    """Why a decoded protocol 2 body is no call of task ``name`` (whose function is ``run``)."""
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "body is not [args, kwargs, embed] (args must be a list, kwargs an object)"
    if embed is not None and not (isinstance(embed, dict) and set(embed) <= _EMBED_KEYS):
        return "body's embed is not an object of callbacks/errbacks/chain/chord"
    if embed and any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord", "group")):
        return "callbacks, errbacks, chains and chords are not accepted on Postroom's tasks"
    try:
        inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {name}: {exc}"
    return None


def _iso_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


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


def start_upkeep(consumer: Any) -> None:
    """The heartbeat of this worker's consumer, the reaper of dead workers' messages, the delay
    queue's mover and (RabbitMQ) the poison mover, in one daemon thread of the worker's main
    process; and the webhook sender (worker/queue/webhook_sender.py) in one of its own."""
    from worker.queue.app import app, broker_keys, broker_redis, broker_view, settings, state_url
    from worker.queue.webhook_sender import start_sender
    from worker.settings import config_dir

    start_sender(state_url, config_dir(), settings)  # delivery events, in a thread of their own
    client = store().redis
    on_broker = broker_redis(client)  # None on RabbitMQ

    def publish_due(job_id: str, kwargs: dict[str, Any]) -> None:
        with broker.at_head():  # its time has come: the next job taken, not behind the backlog
            app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue=QUEUE, headers=job_headers(kwargs))

    delays = DelayQueue(client, publish_due)
    view = broker_view(client)

    def sample_depth() -> None:  # the dashboard's queue-depth chart (worker/ops/series.py)
        with client.pipeline(transaction=False) as pipe:
            pipe.zcard(JobStore.retrying_key)
            pipe.zcard(SCHEDULED)
            retrying, scheduled = pipe.execute()
        series.record_depth(client, sum(view.depths().values()), int(retrying), int(scheduled))

    steps: list[tuple[float, Callable[[], object]]] = [(POLL, delays.move_due), (DEPTH_EVERY, sample_depth)]
    tags: Callable[[], list[str] | None] | None = None
    if on_broker is not None and broker.delivered_tags(consumer) is not None:  # messages to restore
        tags = lambda: broker.delivered_tags(consumer)  # noqa: E731
        steps.append((liveness.REAP_EVERY, liveness.Reaper(on_broker, broker_keys()).reap))
    if on_broker is None:
        steps.append((POISON_EVERY, lambda: move_poison(app, settings)))
        from worker.queue.rabbitmq import report_setup_once

        report_setup_once(str(app.conf.broker_url), settings)  # once, in a thread of its own
    # a task thread stuck past the hard time limit lets its jobs go (Celery stops only prefork's)
    limit = settings.time_limit if settings.worker_pool == "threads" else None
    liveness.keep_beating(on_broker, tags, more=steps, time_limit=limit, state=client)


POISON_EVERY = 5.0
DEPTH_EVERY = 60.0


def move_poison(app: Any, settings: Any, limit: int = 100) -> int:
    """RabbitMQ: the messages its delivery limit set aside (``postroom.poison``: delivered that
    often and never acknowledged, each took its worker down) into Postroom's dead letters."""
    from worker.queue.brokers import amqp_queues

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


def eta_to_send_at(app: Any, message: Any) -> bool:
    """A job published with Celery's ``countdown``/``eta`` becomes a scheduled send: its ETA is
    its ``send_at`` (a message's own send_at wins), and it is published again without the ETA,
    under its own id, then this copy is acknowledged. The first worker that runs it records it
    ``scheduled`` in Postroom's schedule (durable, cancellable, never sent early), where Celery
    would have held it in this worker's memory, unrecorded, until its time. False when it could
    not be published (the broker away): Celery keeps it as an ETA task, as before."""
    headers = message.headers
    when = datetime.fromisoformat(str(headers["eta"]))  # the screen checked it is ISO 8601
    due = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()  # naive: UTC
    _, kwargs, _ = message.decode()  # the screen decoded it already: it is [args, kwargs, embed]
    name, job_id = str(headers["task"]), str(headers["id"])
    messages = kwargs.get("messages") if name == BATCH_TASK_NAME else [kwargs]
    for payload in messages if isinstance(messages, list) else []:
        if isinstance(payload, dict) and payload.get("send_at") is None:
            payload["send_at"] = due
    extra = job_headers(kwargs) if name == TASK_NAME else {}
    try:
        app.send_task(name, kwargs=kwargs, task_id=job_id, queue=QUEUE, headers=extra)
    except Exception as exc:
        log.warning("job %s: an ETA job could not be taken in as a scheduled send (%s)", job_id, exc)
        return False
    log.info("job %s: published with an ETA: taken in as a scheduled send", job_id)
    if not message.acknowledged:
        message.ack()
    return True


class Consumer(CeleryConsumer):
    """Celery's consumer, with unusable messages dead-lettered instead of dropped or fatal,
    and the worker's upkeep (heartbeat, reaper, delay mover: worker/queue/liveness.py) started
    once it is ready."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,valid-type]
        # Without Celery's native delayed delivery for quorum queues (RabbitMQ): Postroom never
        # publishes an ETA (retries wait in its own delay queue, worker/queue/delays.py), and
        # the step would declare some thirty exchanges and queues for nothing.
        default_steps = [
            s for s in CeleryConsumer.Blueprint.default_steps if not s.endswith(":DelayedDelivery")
        ]

    def on_ready(self) -> None:
        super().on_ready()
        start_upkeep(self)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        tasks = self.app.tasks
        connection_errors: tuple[type[BaseException], ...] = tuple(getattr(self, "connection_errors", ()))

        def on_task_received(message: Any) -> Any:
            problem = problem_with(message, tasks)
            if problem is not None:
                return quarantine(message, problem)
            headers = message.headers if isinstance(message.headers, dict) else {}
            if (
                headers.get("eta")
                and headers.get("task") in NEVER_EXPIRE
                and eta_to_send_at(self.app, message)
            ):
                return None
            if headers.get("id") and message.delivery_tag:
                liveness.TASKS.expect(str(headers["id"]), str(message.delivery_tag))
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
