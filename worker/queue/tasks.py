"""The Celery tasks: health checks and sweeps (the control queue), and the jobs' tasks for a
message Celery itself was handed.

Jobs are not Celery tasks in a worker: Postroom's inbox reads the ``postroom`` queue in batches
(worker/queue/broker/inbox.py) and its dispatcher sends ready jobs in groups
(worker/queue/pipeline/dispatch.py),
since Celery's per-task work costs more than sending the mail. Celery's consumer reads
``postroom.control``. Should a ``postroom.send`` or ``postroom.send_batch`` still reach a Celery
task (a worker started with ``-Q postroom``, a message routed to the control queue), the task
takes its jobs in exactly as the inbox would (worker/queue/store/admission.py): a run of it that was cut
short is counted, so a poison message ends in the dead letters after bounded runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject

from worker.mail.payload import BATCH_TASK_NAME, HEALTH_TASK_NAME, SWEEP_TASK_NAME, TASK_NAME
from worker.ops import tracing
from worker.ops.connectivity import check_connectivity
from worker.ops.preflight import Preflight
from worker.queue.broker.celery_app import job_store, settings
from worker.queue.broker.inbox import usable_job_ids
from worker.queue.pipeline.attempts import (
    account_health,
    cut_short_too_often,
    release_held,
    slot_wait,
    store_url,
)
from worker.queue.process.runtime import get_runtime
from worker.queue.process.sweep import Sweeper
from worker.queue.service import admission
from worker.queue.store.jobrecord import safe_text
from worker.records.loader import Records
from worker.transports.base import ConnectivityReport

log = logging.getLogger("postroom.tasks")
STORE_TROUBLE_PAUSE = 1.0


def send(self: Task[Any, Any], /, **kwargs: Any) -> dict[str, Any]:
    """Take one job in (``postroom.send``); docs/producers.md has the payload."""
    job_id = str(self.request.id)
    with _unexpected_requeues(job_id), _store_trouble_requeues(job_id):
        if _redelivered(self) and (dead := cut_short_too_often(job_id, kwargs)) is not None:
            return dead.summary()
        parent = tracing.from_headers({"traceparent": getattr(self.request, "traceparent", None)})
        (taken,) = admission().admit([(job_id, kwargs)], [parent])
    return {"state": taken.state, "reason": taken.reason}


def send_batch(
    self: Task[Any, Any], /, messages: list[dict[str, Any]], job_ids: list[str] | None = None
) -> dict[str, int]:
    """Take many jobs in (``postroom.send_batch``): ``job_ids`` (one per message) or, without
    them, ``<batch task id>-<index>``."""
    if not isinstance(messages, list):
        reason = f"postroom.send_batch: messages is a {type(messages).__name__}, not a list"
        job_store().quarantine(safe_text(messages, 4096).encode(), reason, claimed_id=self.request.id)
        return {"dead": 1}
    if not usable_job_ids(job_ids, len(messages)):
        job_ids = [f"{self.request.id}-{i}" for i in range(len(messages))]
    assert job_ids is not None
    with (
        _unexpected_requeues(f"batch {self.request.id}"),
        _store_trouble_requeues(f"batch {self.request.id}"),
    ):
        counts: dict[str, int] = {}
        for taken in admission().admit(list(zip(job_ids, messages, strict=True))):
            counts[taken.state] = counts.get(taken.state, 0) + 1
    return counts


@contextlib.contextmanager
def _unexpected_requeues(what: str) -> Iterator[None]:
    """A bug or a library surprise: the message goes back (flagged redelivered, so a run of it is
    counted: a poison one ends in the dead letters after bounded runs) instead of Celery
    acknowledging a failed task and losing its jobs."""
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


def health_check() -> dict[str, str]:
    """Check every account's connectivity (nothing is sent) and move the circuit breaker.

    Scheduled by the one beat with an expiry of one interval, so missed runs do
    not pile up. The checks run side by side on the process loop with their own
    connections (never the delivery pools), each given up after health_timeout.
    """
    records = Records.load()
    names = sorted(records.account_names)
    timeout = settings().health_timeout

    limiter = get_runtime().limiter(
        store_url(), settings().job_ttl, settings().sent_as_ttl, slot_wait()
    )  # checks count too
    health = account_health()
    # the DNS preflight, kept in Redis an hour per domain: every account every 5 minutes is no
    # reason to ask DNS every 5 minutes
    preflight = Preflight(settings().dns_resolver, cache=health.redis)

    async def one(name: str) -> ConnectivityReport:
        try:
            check = check_connectivity(records, name, limiter=limiter, preflight=preflight)
            return await asyncio.wait_for(check, timeout)
        except TimeoutError:
            return ConnectivityReport(
                name, ok=False, result="timeout", error=f"no answer within {timeout:g}s"
            )

    async def every() -> list[ConnectivityReport]:
        return list(await asyncio.gather(*(one(n) for n in names)))

    reports = get_runtime().run(every(), timeout=timeout + 15)
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
    """The orphan sweep (its jobs made ready again under their own ids)."""
    return Sweeper(job_store().redis, release_held, grace=min(30.0, settings().sweep_interval))


def sweep() -> dict[str, Any]:
    """Make ready again the open jobs found nowhere they can wait (worker/queue/process/sweep.py).

    Scheduled by the one beat every sweep_interval, with an expiry of one interval."""
    report = sweeper().run(lock_for=max(60.0, settings().sweep_interval))
    if report.republished or report.suspects:
        log.info(
            "sweep open=%d checked=%d suspects=%d republished=%d",
            report.open_jobs,
            report.checked,
            report.suspects,
            len(report.republished),
        )
    return report.as_dict()


def register(app: Celery) -> None:
    """Give ``app`` its tasks (called once, by worker/queue/app.py as it builds a worker's app)."""
    app.task(name=TASK_NAME, bind=True, max_retries=None)(send)
    app.task(name=BATCH_TASK_NAME, bind=True, max_retries=None)(send_batch)
    app.task(name=HEALTH_TASK_NAME, ignore_result=True)(health_check)
    app.task(name=SWEEP_TASK_NAME, ignore_result=True)(sweep)
