"""The broker's ``postroom`` queue as an inbox: every message any producer published there, taken
in batches by each worker process and turned into jobs (worker/queue/store/admission.py).

Celery's consumer would make one task of every message — receive, dispatch, events,
acknowledgement: more CPU than sending the mail — so Postroom reads the queue itself (Celery's
consumer reads only ``postroom.control``: health checks and sweeps). On Redis an inbox takes up
to a batch of entries (and about a byte budget) from the read end of kombu's lists into
``inbox:<holder>``, one pipelined LMOVE an entry (atomic each; no script copies an entry),
screens and admits them, then drops the inbox; a worker that dies meanwhile has its inbox put
back by the reaper (worker/queue/process/liveness.py). On RabbitMQ it consumes with a prefetch
of a batch and acknowledges after admitting. Entries no job can be made of are dead letters with
the reason (the screen of worker/queue/broker/intake.py); a Celery ETA becomes the job's
send_at; health checks and sweeps published here (by a beat of an earlier release) go on to the
control queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from worker.db.keys import redis_key
from worker.mail.payload import BATCH_TASK_NAME, QUEUE, TASK_ID, TASK_NAME
from worker.ops import tracing
from worker.ops.tracing import Context
from worker.queue.broker.kombu_redis import BrokerKeys, read_entry, read_message
from worker.queue.broker.screen import NEVER_EXPIRE, body_problem, header_problem
from worker.queue.store.jobrecord import safe_text

log = logging.getLogger("postroom.inbox")

BATCH = 100  # entries taken at a time
BYTE_BUDGET = 512 * 1024  # and about this many bytes (entries are sized by the largest seen lately)
FIRST_GUESS = BYTE_BUDGET // 4  # an entry's size before any was seen: a first batch of 4
CHUNK = 10  # most LMOVEs a round trip: entries larger than guessed overshoot the budget by this many
JOB_TASKS = (TASK_NAME, BATCH_TASK_NAME)


def inbox_key(holder: str) -> str:
    return redis_key("inbox", holder)


@dataclass
class Entry:
    """One message from the queue, as either broker gives it."""

    raw: bytes  # as it travelled (kept with a dead letter)
    headers: Any
    content_type: Any
    content_encoding: Any
    body: bytes | None  # None: not readable (``problem`` says why)
    problem: str | None = None
    ack: Callable[[], None] | None = None  # RabbitMQ: acknowledge it
    redelivered: bool = False  # a reader took it before and died (flagged by give_back, Redis)

    @property
    def task_id(self) -> str | None:
        task_id = self.headers.get("id") if isinstance(self.headers, dict) else None
        return task_id if isinstance(task_id, str) and TASK_ID.match(task_id) else None


def from_redis(raw: bytes) -> Entry:
    """A raw kombu entry from a Redis list."""
    envelope, data, problem = read_message(raw)
    if envelope is None:
        return Entry(raw, None, None, None, None, problem)
    headers = envelope.get("headers")
    redelivered = isinstance(headers, dict) and headers.get("redelivered") is True
    return Entry(
        raw,
        headers,
        envelope.get("content-type"),
        envelope.get("content-encoding"),
        data,
        redelivered=redelivered,
    )


def screen(entry: Entry) -> tuple[str | None, str | None, Any]:
    """(problem, task name, decoded body) of an entry: a problem makes it a dead letter."""
    if entry.problem is not None or entry.body is None:
        return entry.problem or "unreadable", None, None
    headers = entry.headers
    if not isinstance(headers, dict):
        return "no task headers (not a Celery protocol 2 message)", None, None
    name = headers.get("task")
    if not isinstance(name, str):
        return "no task name in the headers", None, None
    problem = header_problem(headers)
    if problem is not None:
        return problem, name, None
    if name in NEVER_EXPIRE and headers.get("expires") is not None:
        return f"{name} does not take an expiry (a job is sent or ends in the dead letters)", name, None
    if entry.content_type != "application/json":
        return (
            f"content type {safe_text(entry.content_type, 60)} is not accepted (application/json only)",
            name,
            None,
        )
    try:
        body = json.loads(entry.body.decode(entry.content_encoding or "utf-8"))
    except RecursionError:
        return "body cannot be decoded (nested too deeply)", name, None
    except (ValueError, LookupError) as exc:
        return f"body cannot be decoded ({type(exc).__name__}: {safe_text(str(exc), 120)})", name, None
    if name in JOB_TASKS:
        return body_problem(name, body, _SIGNATURES[name]), name, body
    return None, name, body


def _send(**kwargs: Any) -> None:
    """The signature of ``postroom.send`` (keyword arguments only), for the screen."""


def _send_batch(messages: Any, job_ids: Any = None) -> None:
    """The signature of ``postroom.send_batch``, for the screen."""


_SIGNATURES: dict[str, Callable[..., Any]] = {TASK_NAME: _send, BATCH_TASK_NAME: _send_batch}


def jobs_of(name: str, headers: dict[str, Any], body: Any) -> tuple[list[tuple[str, Any]], str | None]:
    """The (job id, payload) pairs a screened job message carries, its ETA as their send_at."""
    _, kwargs, _ = body
    eta = headers.get("eta")
    due = None
    if eta:
        when = datetime.fromisoformat(str(eta))  # the screen checked it is ISO 8601
        due = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()  # naive: UTC
    task_id = str(headers["id"])
    if name == TASK_NAME:
        pairs: list[tuple[str, Any]] = [(task_id, kwargs)]
    else:
        messages, job_ids = kwargs.get("messages"), kwargs.get("job_ids")
        if not isinstance(messages, list):
            return [], f"postroom.send_batch: messages is a {type(messages).__name__}, not a list"
        if not usable_job_ids(job_ids, len(messages)):
            job_ids = [f"{task_id}-{i}" for i in range(len(messages))]
        pairs = list(zip(cast(list[str], job_ids), messages, strict=True))
    if due is not None:
        for _, payload in pairs:
            if isinstance(payload, dict) and payload.get("send_at") is None:
                payload["send_at"] = due  # a Celery countdown/ETA is a scheduled send
    return pairs, None


def usable_job_ids(job_ids: Any, count: int) -> bool:
    """A producer's job ids for a batch: one distinct, well-formed id per message."""
    return (
        isinstance(job_ids, list)
        and len(job_ids) == count
        and all(isinstance(j, str) and TASK_ID.match(j) for j in job_ids)
        and len(set(job_ids)) == count
    )


class Intake:
    """Screens entries and takes their jobs in, for one worker process."""

    def __init__(
        self,
        admission: Any,
        quarantine: Callable[..., str],
        forward: Callable[..., None],
        state: Any,
        max_runs: int,
        alone: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.admission = admission  # worker/queue/store/admission.py
        self.quarantine = quarantine  # JobStore.quarantine
        self.forward = forward  # (task name, task id, args, kwargs): to the control queue
        self.state = state  # Postroom's Redis (the entries' run counts)
        self.max_runs = max_runs
        self.alone = alone  # nothing else under way in the process meanwhile (Dispatcher.alone)

    def take_in(self, entries: Sequence[Entry], queue: str = QUEUE) -> list[Entry]:
        """Admit the jobs of ``entries``. An entry a reader already died on (flagged redelivered by
        the reaper, worker/queue/broker/inbox.py ``give_back``) is taken in on its own: the first such
        one of a batch after the rest, the others deferred (returned: the caller puts them back
        on the queue), so a poison entry takes nothing else down with it; one that killed its
        reader more than ``max_runs`` times is a dead letter."""
        runs = self._runs(entries)
        self._take_in([e for e, n in zip(entries, runs, strict=True) if not n], queue)
        deferred: list[Entry] = []
        alone: Entry | None = None
        for entry, n in zip(entries, runs, strict=True):
            if not n:
                continue
            if n > self.max_runs:
                headers = entry.headers if isinstance(entry.headers, dict) else {}
                reason = f"taken {n} times and its reader died every time (a poison message?)"
                claimed, task = headers.get("id"), headers.get("task")
                self.quarantine(entry.raw, reason, queue=queue, claimed_id=claimed, task=task)
                log.error("unreadable message: %s", reason)
            elif alone is None:
                alone = entry
            else:
                deferred.append(entry)
        if alone is not None:
            with self.alone():
                self._take_in([alone], queue)
        return deferred

    def _runs(self, entries: Sequence[Entry]) -> list[int]:
        """How many readers died on each entry: asked only of the entries flagged redelivered."""
        asked = [(i, e.task_id) for i, e in enumerate(entries) if e.redelivered and e.task_id is not None]
        out = [0] * len(entries)
        if not asked:
            return out
        with self.state.pipeline(transaction=False) as pipe:
            for _, task_id in asked:
                pipe.get(runs_key(str(task_id)))
            replies = pipe.execute()
        for (i, _), reply in zip(asked, replies, strict=True):
            out[i] = max(1, int(reply or 0))
        return out

    def _take_in(self, entries: Sequence[Entry], queue: str) -> int:
        jobs: list[tuple[str, Any]] = []
        parents: list[Context | None] = []  # the trace context each job's message carried
        for entry in entries:
            problem, name, body = screen(entry)
            headers = entry.headers if isinstance(entry.headers, dict) else {}
            if problem is None and name in JOB_TASKS:
                pairs, problem = jobs_of(str(name), headers, body)
                jobs += pairs
                parents += [tracing.from_headers(headers)] * len(pairs)
            elif problem is None and name is not None and _is_control(name):
                args, kwargs, _ = body
                self.forward(name, str(headers["id"]), args, kwargs)
            elif problem is None:
                problem = f"unknown task {safe_text(name, 80)!r}"
            if problem is not None:
                claimed, task = headers.get("id"), headers.get("task")
                job_id = self.quarantine(entry.raw, problem, queue=queue, claimed_id=claimed, task=task)
                log.error("unreadable message: %s; dead letter %s", problem, job_id)
        if jobs:
            self.admission.admit(jobs, parents)
        return len(jobs)


def _is_control(name: str) -> bool:
    from worker.mail.payload import HEALTH_TASK_NAME, SWEEP_TASK_NAME

    return name in (HEALTH_TASK_NAME, SWEEP_TASK_NAME)


class RedisInbox:
    """The ``postroom`` lists of kombu's Redis transport, read by this process in batches."""

    def __init__(self, client: Any, keys: BrokerKeys, holder: str, queue: str = QUEUE) -> None:
        self.client = client
        self.lists = keys.queue_lists(queue)
        self.key = inbox_key(holder)
        self.largest = FIRST_GUESS  # the largest entry seen lately: how many fit the byte budget

    def take(self, wait: float) -> list[Entry]:
        """A batch of entries, waiting up to ``wait`` seconds for the first when none is there."""
        raw = self._move(BATCH)
        if not raw and wait > 0:
            first = self.client.blmove(self.lists[0], self.key, wait, "RIGHT", "LEFT")
            if first is None:
                return []
            raw = [first, *self._move(BATCH - 1, already=len(first))]
        return [from_redis(r if isinstance(r, bytes) else str(r).encode()) for r in raw]

    def _move(self, most: int, already: int = 0) -> list[Any]:
        """Up to ``most`` entries (about BYTE_BUDGET bytes) from the read end of the queue's lists,
        in kombu's read order, into the head of the inbox: one LMOVE each, pipelined. Each LMOVE
        is atomic (an entry is in the queue or in the inbox, never lost), and no script touches
        an entry: a script would copy each one into Lua and again into its reply, work
        proportional to the bytes moved in Redis's one thread. A pipeline asks for as many as fit
        the budget at the largest entry size seen lately (at most CHUNK: entries larger than any
        seen lately overshoot it by no more); the lists behind the first are asked only when
        LLEN says they hold something."""
        out: list[Any] = []
        size, largest = already, 0
        sources, asked_later = [self.lists[0]], False
        while sources and len(out) < most and size < BYTE_BUDGET:
            guess = max(largest, self.largest, 1)
            count = max(1, min(most - len(out), (BYTE_BUDGET - size) // guess, CHUNK))
            with self.client.pipeline(transaction=False) as pipe:
                for _ in range(count):
                    pipe.lmove(sources[0], self.key, "RIGHT", "LEFT")
                if not asked_later:
                    for later in self.lists[1:]:
                        pipe.llen(later)
                replies = pipe.execute()
            got = [entry for entry in replies[:count] if entry is not None]
            if not asked_later:
                sources += [name for name, n in zip(self.lists[1:], replies[count:], strict=True) if n]
                asked_later = True
            out += got
            size += sum(len(entry) for entry in got)
            largest = max([largest, *(len(entry) for entry in got)])
            if len(got) < count:  # this list ran dry
                sources.pop(0)
        if largest:  # the next batch guesses from this one's largest, or half the last guess
            self.largest = max(largest, self.largest // 2)
        return out

    def done(self, entries: Sequence[Entry] = (), deferred: Sequence[Entry] = ()) -> None:
        """The batch is taken in: drop the inbox, the ``deferred`` entries back on the queue."""
        with self.client.pipeline() as pipe:  # MULTI: back on the queue and out of the inbox together
            if deferred:
                pipe.rpush(self.lists[0], *(e.raw for e in deferred))
            pipe.delete(self.key)
            pipe.execute()

    def recover(self) -> None:
        """After a failure: what this inbox holds goes back to the queue, to be taken again (the
        oldest taken at the read end). One LMOVE an entry: each atomic, none through a script."""
        held = int(self.client.llen(self.key))
        if held:
            with self.client.pipeline(transaction=False) as pipe:
                for _ in range(held):
                    pipe.lmove(self.key, self.lists[0], "LEFT", "RIGHT")
                pipe.execute()


def runs_key(task_id: str) -> str:
    """How many times an entry was taken by a reader that died before taking it in."""
    return redis_key("inbox-runs", task_id)


RUNS_TTL = 7 * 86400


def give_back(client: Any, keys: BrokerKeys, holder: str, *, runs: Any, queue: str = QUEUE) -> int:
    """A dead holder's inbox back at the read end of the queue (worker/queue/process/liveness.py), each
    entry flagged ``redelivered`` and its runs counted (in ``runs``, Postroom's Redis): a reader
    takes such an entry in on its own, and one that keeps killing its reader ends in the dead
    letters. Entries that are no kombu message go back as they were (the screen refuses them)."""
    key = inbox_key(holder)
    entries = cast(list[Any], client.lrange(key, 0, -1))  # newest taken first
    if not entries:
        return 0
    flagged: list[Any] = []
    with runs.pipeline(transaction=False) as pipe:
        for raw in entries:
            envelope, _ = read_entry(raw if isinstance(raw, bytes) else str(raw).encode())
            headers = (envelope or {}).get("headers")
            if envelope is None or not isinstance(headers, dict):
                flagged.append(raw)
                continue
            headers["redelivered"] = True
            flagged.append(json.dumps(envelope))
            task_id = headers.get("id")
            if isinstance(task_id, str) and TASK_ID.match(task_id):
                pipe.incr(runs_key(task_id))
                pipe.expire(runs_key(task_id), RUNS_TTL)
        pipe.execute()
    with client.pipeline() as pipe:  # MULTI: back on the queue and out of the inbox together
        pipe.rpush(keys.queue_lists(queue)[0], *flagged)  # the oldest taken ends at the read end
        pipe.delete(key)
        pipe.execute()
    return len(flagged)


class AmqpInbox:
    """RabbitMQ's ``postroom`` queue, consumed with a prefetch of a batch (acknowledged after
    admitting: what a dying worker held comes back at once, RabbitMQ's own guarantee)."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.app = app
        self.settings = settings
        self._connection: Any = None
        self._waiting: list[Entry] = []

    def _connect(self) -> None:
        from kombu import Consumer

        from worker.queue.broker.kinds import amqp_queues

        connection = self.app.connection_for_read()
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        channel.basic_qos(0, BATCH, False)
        send_queue = amqp_queues(self.settings)[0](channel)
        send_queue.declare()  # as every client declares it (worker/queue/broker/kinds.py)
        Consumer(channel, [send_queue], on_message=self._collect, no_ack=False).consume()
        self._connection = connection

    def _collect(self, message: Any) -> None:
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        # a message that killed its reader comes back from RabbitMQ by itself, and its delivery
        # limit (the policy of `postroom queues declare`) ends it in the poison queue
        entry = Entry(body, message.headers, message.content_type, message.content_encoding, body)
        entry.ack = message.ack
        self._waiting.append(entry)

    def take(self, wait: float) -> list[Entry]:
        if self._connection is None:
            self._connect()
        connection = self._connection
        try:
            connection.heartbeat_check()
            if not self._waiting:
                connection.drain_events(timeout=wait)
            while len(self._waiting) < BATCH:
                connection.drain_events(timeout=0.005)  # what is there already, then go
        except TimeoutError:
            pass
        except connection.connection_errors:
            self.close()  # unacknowledged messages go back to the queue by themselves
            raise
        taken, self._waiting = self._waiting, []
        return taken

    def done(self, entries: Sequence[Entry], deferred: Sequence[Entry] = ()) -> None:
        for entry in entries:
            if entry.ack is not None:
                entry.ack()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._waiting = []
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def recover(self) -> None:
        """After a failure: drop the connection (what it held goes back to the queue)."""
        self.close()


class InboxReader(threading.Thread):
    """This process's reader: takes batches from the inbox and admits them, until stopped."""

    def __init__(self, source: Any, intake: Intake, *, wait: float = 1.0) -> None:
        super().__init__(name="postroom-inbox", daemon=True)
        self.source, self.intake, self.wait = source, intake, wait
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                entries = self.source.take(self.wait)
                if entries:
                    deferred = self.intake.take_in(entries)
                    self.source.done(entries, deferred)
                pause = 0.1
            except Exception as exc:  # the broker or Redis away: what was taken goes back
                log.warning("inbox: %s; trying again in %.1f s", exc, pause)
                with contextlib.suppress(Exception):
                    self.source.recover()
                self._stop.wait(pause)
                pause = min(pause * 2, 5.0)
