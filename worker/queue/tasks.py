"""The Celery tasks: thin glue between Celery and the attempt policy.

``postroom.send`` delivers one message; ``postroom.send_batch`` carries many
(fan-out notifications) in one broker message, each with its own job id,
Message-ID, state, retries and dead-letter entry. Both hand every message to
:func:`worker.queue.attempts.attempt_all`, which decides what each attempt ends with
(sent, dead, held, or a retry in Postroom's delay queue): the tasks never
retry through Celery. What stays here is what only the Celery side knows: a
redelivered message runs alone and is counted (a poison message ends in the
dead letters after bounded runs), a redelivered batch is split, and a task
with a backlog behind it carries ready jobs along (:mod:`worker.queue.drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

from worker.errors import ConfigurationError
from worker.mail.payload import (
    BATCH_TASK_NAME,
    HEALTH_TASK_NAME,
    QUEUE,
    SWEEP_TASK_NAME,
    TASK_ID,
    TASK_NAME,
    job_headers,
)
from worker.ops.connectivity import check_connectivity
from worker.queue import liveness
from worker.queue.app import app, broker_keys, broker_redis, broker_view, settings
from worker.queue.attempts import (
    Step,
    account_health,
    attempt,
    attempt_all,
    cut_short_too_often,
    job_store,
    release_held,
    slot_wait,
    store_url,
)
from worker.queue.delivery import LOG_FORMAT
from worker.queue.drain import Carried, QueueDrain
from worker.queue.intake import store as intake_store
from worker.queue.jobrecord import safe_text
from worker.queue.runtime import get_runtime
from worker.queue.sweep import Sweeper
from worker.records.accounts import EmailAccount
from worker.records.loader import Records
from worker.transports.base import ConnectivityReport

log = logging.getLogger("postroom.tasks")
LOG_FORMAT.json = settings.log_format == "json"
STORE_TROUBLE_PAUSE = 1.0
_drain: QueueDrain | None = None


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def send(self: Task[Any, Any], /, **kwargs: Any) -> dict[str, Any]:
    """Deliver one message (``postroom.send``); see the README for the payload.

    With a backlog queued, the task also carries more ready jobs taken from
    the queue (:mod:`worker.queue.drain`) and delivers them side by side.
    """
    job_id = str(self.request.id)
    redelivered = _redelivered(self)
    with _unexpected_requeues(job_id), contextlib.ExitStack() as reserved:
        # a job whose last run died runs alone; the carried ones count as in flight until done
        carried = [] if redelivered else _take_more(job_id, reserved)
        if carried:
            step = _carry(job_id, kwargs, carried)
        else:
            with _store_trouble_requeues(job_id):
                step = (redelivered and cut_short_too_often(job_id, kwargs)) or attempt(job_id, kwargs)
    # a retry waits in Postroom's delay queue (worker/queue/delays.py), written with the job's record:
    # the message is done either way
    return step.summary()


@app.task(name=BATCH_TASK_NAME, bind=True, max_retries=None)
def send_batch(
    self: Task[Any, Any], /, messages: list[dict[str, Any]], job_ids: list[str] | None = None
) -> dict[str, int]:
    """Deliver many messages (``postroom.send_batch``) side by side.

    ``job_ids`` (one per message) come from the producer helper; a producer
    that omits them gets ``<batch task id>-<index>``.
    """
    if not isinstance(messages, list):
        reason = f"postroom.send_batch: messages is a {type(messages).__name__}, not a list"
        intake_store().quarantine(safe_text(messages, 4096).encode(), reason, claimed_id=self.request.id)
        return {"dead": 1}
    if not _usable_job_ids(job_ids, len(messages)):
        job_ids = [f"{self.request.id}-{i}" for i in range(len(messages))]
    assert job_ids is not None
    if _redelivered(self) and len(messages) > 1:
        # its last run died: every message goes on as a job of its own (those that ended are
        # skipped), so one that kills its worker is counted and dead-lettered alone
        try:
            for job_id, kwargs in zip(job_ids, messages, strict=True):
                app.send_task(
                    TASK_NAME, kwargs=kwargs, task_id=job_id, queue=QUEUE, headers=job_headers(kwargs)
                )
        except Exception as exc:
            raise Reject(f"batch could not be split: {exc}", requeue=True) from exc
        return {"split": len(messages)}
    with (
        _unexpected_requeues(f"batch {self.request.id}"),
        _store_trouble_requeues(f"batch {self.request.id}"),
    ):
        return _send_batch(messages, job_ids)


def _usable_job_ids(job_ids: Any, count: int) -> bool:
    """A producer's job ids for a batch: one distinct, well-formed id per message."""
    return (
        isinstance(job_ids, list)
        and len(job_ids) == count
        and all(isinstance(j, str) and TASK_ID.match(j) for j in job_ids)
        and len(set(job_ids)) == count
    )


@contextlib.contextmanager
def _unexpected_requeues(what: str) -> Iterator[None]:
    """A bug or a library surprise outside any one delivery: the message goes back (flagged
    redelivered, so it then runs alone and is counted: a poison one ends in the dead letters
    after bounded runs) instead of Celery acknowledging a failed task and losing its jobs."""
    try:
        yield
    except Reject:
        raise
    except Exception as exc:
        log.exception("%s: unexpected error; the message goes back to the queue", what)
        raise Reject(f"unexpected error: {type(exc).__name__}", requeue=True) from exc


def _redelivered(task: Task[Any, Any]) -> bool:
    """kombu flags a message it gives back unacknowledged: the run it was handed to never
    finished (its worker died, or the task handed it back)."""
    return bool((task.request.delivery_info or {}).get("redelivered"))


@contextlib.contextmanager
def _store_trouble_requeues(what: str) -> Iterator[None]:
    """Job records could not be read or written (Redis down or out of memory): hand the
    message back rather than let Celery ack a failed task and lose it."""
    try:
        yield
    except redis.RedisError as exc:
        log.error("%s: job store unavailable (%s); the message goes back to the queue", what, exc)
        time.sleep(STORE_TROUBLE_PAUSE)  # do not spin on a broken store
        raise Reject(f"job store unavailable: {exc}", requeue=True) from exc


def _send_batch(messages: list[dict[str, Any]], job_ids: list[str]) -> dict[str, int]:
    steps = attempt_all(job_ids, messages)  # a retried message leaves its batch via the delay queue
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.state] = counts.get(step.state, 0) + 1
    return counts


def _take_more(job_id: str, reserved: contextlib.ExitStack) -> list[Carried]:
    """Ready jobs to carry along with ``job_id`` (none when coalescing is off or Redis balks),
    counted in this process's in-flight bound (``reserved``) before the next task thread looks."""
    drain = queue_drain()
    if drain is None:
        return []
    runtime = get_runtime()
    with runtime.taking:
        room = _rooms()
        try:
            taken = drain.take(min(settings.coalesce - 1, sum(room.values())), room)
            carried, back = _within_account_bounds(taken)
            drain.give_back(back)
        except redis.RedisError as exc:
            log.warning("job %s: could not take more jobs from the queue (%s)", job_id, exc)
            return []
        reserved.enter_context(
            runtime.reserving([str(c.kwargs.get("account", "")) for c in carried if c.kwargs is not None])
        )
    return carried


# Carried jobs wait for their account's connections inside the carrying task, under its time
# limit; a few rounds of the account's connections is enough to keep them all busy.
IN_FLIGHT_PER_CONNECTION = 4


def _in_flight_bound(account: EmailAccount) -> int:
    return IN_FLIGHT_PER_CONNECTION * account.limits.max_connections


def _rooms() -> dict[str, int]:
    """How many more jobs of each account this process may carry (its room under the bound). The
    drain takes no more than that of an account, looking past a full account's backlog for the
    others' jobs; nothing at all when every account is full (a busy worker would otherwise move
    the same jobs out of the queue and back at every task)."""
    runtime = get_runtime()
    return {
        name: max(0, _in_flight_bound(account) - runtime.in_flight(name))
        for name, account in runtime.records().accounts.items()
    }


def _within_account_bounds(taken: list[Carried]) -> tuple[list[Carried], list[Carried]]:
    """Split taken jobs into those to carry and those to give back: no account gets more than
    ``IN_FLIGHT_PER_CONNECTION x max_connections`` messages in flight in this process, so a slow
    account's backlog waits in the queue (not inside a task's time limit) and the rest of it
    stays free for other workers."""
    runtime = get_runtime()
    records = runtime.records()
    carried: list[Carried] = []
    back: list[Carried] = []
    extra: dict[str, int] = {}
    for c in taken:
        name = str(c.kwargs.get("account", "")) if c.kwargs is not None else ""
        try:
            cap = _in_flight_bound(records.account(name))
        except ConfigurationError:  # unknown or broken: carried, and dead-lettered with the reason
            carried.append(c)
            continue
        if runtime.in_flight(name) + extra.get(name, 0) >= cap:
            back.append(c)
        else:
            extra[name] = extra.get(name, 0) + 1
            carried.append(c)
    return carried, back


def _carry(job_id: str, kwargs: dict[str, Any], carried: list[Carried]) -> Step:
    """Deliver this task's job and the carried ones together; the task's own step is returned
    (every retry waits in the delay queue, as a job of its own)."""
    drain = queue_drain()
    assert drain is not None  # only a drain takes jobs to carry
    log.info("job %s: carrying %d more ready jobs from the queue", job_id, len(carried))
    readable = [c for c in carried if c.kwargs is not None]
    job_ids = [job_id, *(c.job_id for c in readable)]
    messages = [kwargs, *(c.kwargs or {} for c in readable)]
    try:
        with _store_trouble_requeues(f"job {job_id} (carrying {len(carried)} more)"):
            for c in carried:
                if c.kwargs is None:
                    reason = c.problem or "unreadable task message"
                    intake_store().quarantine(c.raw.encode(), reason, queue=c.queue, claimed_id=c.job_id)
            steps = attempt_all(job_ids, messages)
    except BaseException:
        with contextlib.suppress(redis.RedisError):  # else kombu restores them after the time limit
            drain.give_back(carried)
        raise
    try:
        drain.ack(carried)
    except redis.RedisError as exc:  # restored later and then skipped: every one of them has ended
        log.warning("job %s: carried jobs not acknowledged (%s)", job_id, exc)
    return steps[0]


def queue_drain() -> QueueDrain | None:
    """This process's drain, or None when coalescing is off (``coalesce: 1``, or a broker
    whose queue it cannot read: RabbitMQ)."""
    global _drain
    client = broker_redis(job_store().redis)
    if settings.coalesce <= 1 or client is None:
        return None
    if _drain is None:
        # what this process carries is claimed while it lives
        liveness.keep_beating(client, state=job_store().redis)
        _drain = QueueDrain(
            client,
            QUEUE,
            TASK_NAME,
            visibility_timeout=settings.visibility_timeout,
            time_limit=settings.time_limit,
            keys=broker_keys(),
        )
    return _drain


@app.task(name=HEALTH_TASK_NAME, ignore_result=True)
def health_check() -> dict[str, str]:
    """Check every account's connectivity (nothing is sent) and move the circuit breaker.

    Scheduled by the one beat with an expiry of one interval, so missed runs do
    not pile up. The checks run side by side on the process loop with their own
    connections (never the delivery pools), each given up after health_timeout.
    """
    records = Records.load()
    names = sorted(records.account_names)
    timeout = settings.health_timeout

    limiter = get_runtime().limiter(store_url(), settings.job_ttl, slot_wait())  # checks count too

    async def one(name: str) -> ConnectivityReport:
        try:
            return await asyncio.wait_for(check_connectivity(records, name, limiter=limiter), timeout)
        except TimeoutError:
            return ConnectivityReport(
                name, ok=False, result="timeout", error=f"no answer within {timeout:g}s"
            )

    async def every() -> list[ConnectivityReport]:
        return list(await asyncio.gather(*(one(n) for n in names)))

    reports = get_runtime().run(every(), timeout=timeout + 15)
    health = account_health()
    states = {}
    for report in reports:
        states[report.account] = health.record_check(report.as_dict())
        log.info(
            "health account=%s ok=%s result=%r state=%s%s",
            report.account,
            report.ok,
            report.result,
            states[report.account],
            f" error={report.error!r}" if report.error else "",
        )
    return states


def sweeper() -> Sweeper:
    """The orphan sweep over this app's broker (its jobs go back under their own ids)."""
    store = job_store()
    view, grace = broker_view(store.redis), min(30.0, settings.sweep_interval)
    return Sweeper(store.redis, view, release_held, grace=grace, unlisted_after=settings.sweep_unlisted_after)


@app.task(name=SWEEP_TASK_NAME, ignore_result=True)
def sweep() -> dict[str, Any]:
    """Publish again the jobs whose message went missing from the broker (worker/queue/sweep.py).

    Scheduled by the one beat every sweep_interval, with an expiry of one interval."""
    report = sweeper().run(lock_for=max(60.0, settings.sweep_interval))
    if report.republished or report.suspects:
        log.info(
            "sweep open=%d checked=%d suspects=%d republished=%d",
            report.open_jobs,
            report.checked,
            report.suspects,
            len(report.republished),
        )
    return report.as_dict()
