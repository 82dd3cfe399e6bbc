"""The Celery task: thin by design. The retry policy is decided by error class
(in :mod:`worker.delivery`) and the settings, not inside the task body."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from pydantic import ValidationError

from worker.app import app, settings
from worker.delivery import Delivery, Outcome
from worker.jobs import JobStore
from worker.payload import TASK_NAME, SendPayload
from worker.runtime import get_runtime
from worker.settings import redis_url

log = logging.getLogger("postroom.tasks")
_store: JobStore | None = None


def job_store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_url(redis_url(app.conf.broker_url), job_ttl=settings.job_ttl)
    return _store


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def send(self: Task[Any, Any], /, **kwargs: Any) -> dict[str, Any]:
    """Deliver one message (``postroom.send``); see the README for the payload."""
    job_id = str(self.request.id)
    store = job_store()
    policy = settings.retry
    try:
        payload = SendPayload.model_validate(kwargs)
    except ValidationError as exc:
        reason = f"invalid payload: {_describe(exc)}"
        store.begin_attempt(job_id, {"account": str(kwargs.get("account", "?")), **_safe(kwargs)})
        store.record_attempt(job_id, state="dead", attempt=1, error=reason, outcome="dead")
        store.bury(job_id, reason)
        return {"state": "dead", "reason": reason}

    attempt, enqueued_at = store.begin_attempt(job_id, payload.to_task_kwargs())
    age = time.time() - enqueued_at
    if attempt > policy.max_attempts or age > policy.max_age:
        why = (
            f"{attempt - 1} attempts"
            if attempt > policy.max_attempts
            else f"older than {policy.max_age:.0f}s"
        )
        return _finish(store, job_id, payload, attempt, Outcome("dead", reason=f"retries exhausted ({why})"))

    try:
        outcome = Delivery(store, get_runtime(), settings).run(job_id, payload, attempt)
    except SoftTimeLimitExceeded:
        outcome = Outcome("retry", reason="soft time limit exceeded")
    except Exception as exc:  # a bug or an unexpected library error: bounded retries, then dead
        log.exception("job %s: unexpected error", job_id)
        outcome = Outcome("retry", reason=f"internal error: {type(exc).__name__}: {exc}")

    if outcome.state == "retry":
        outcome, delay = _retry_plan(store, job_id, attempt, age, outcome)
        if outcome.state == "retry":
            _record(store, job_id, attempt, outcome, state="retrying", retry_in=delay)
            if outcome.counts:
                store.count(payload.account, "retried")
            try:
                raise self.retry(countdown=delay, kwargs=kwargs)
            except Retry:
                raise
            except Exception as exc:  # could not publish the retry: give the message back
                raise Reject(f"retry could not be scheduled: {exc}", requeue=True) from exc
    return _finish(store, job_id, payload, attempt, outcome)


def _retry_plan(
    store: JobStore, job_id: str, attempt: int, age: float, outcome: Outcome
) -> tuple[Outcome, float]:
    """When to try again, or the dead-letter outcome when attempts or age run out.

    An attempt that never reached a server (``counts=False``: another attempt
    held the Message-ID) is not counted against max_attempts; it waits for that
    claim to expire, and only max_age bounds it.
    """
    policy = settings.retry
    if outcome.counts:
        delay = policy.delay(attempt, outcome.retry_after)
    else:
        store.uncount_attempt(job_id)
        delay = min((outcome.retry_after or 0) + random.uniform(0.1, 1.0), settings.visibility_timeout / 2)
    why = None
    if outcome.counts and attempt >= policy.max_attempts:
        why = f"{attempt} attempts"
    elif age + delay > policy.max_age:
        why = f"max_age {policy.max_age:.0f}s"
    if why is None:
        return outcome, delay
    dead = replace(outcome, state="dead", reason=f"retries exhausted ({why}): {outcome.reason}")
    return dead, 0.0


def _safe(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if isinstance(k, str) and k != "account"}


def _record(
    store: JobStore, job_id: str, attempt: int, outcome: Outcome, *, state: str, retry_in: float | None = None
) -> None:
    store.record_attempt(
        job_id,
        state=state,
        attempt=attempt,
        recipients=outcome.recipients or None,
        transport=outcome.transport,
        security=outcome.security,
        error=outcome.reason if state != "sent" or outcome.reason else None,
        outcome=outcome.state,
        retry_in=retry_in,
    )


def _finish(
    store: JobStore, job_id: str, payload: SendPayload, attempt: int, outcome: Outcome
) -> dict[str, Any]:
    _record(store, job_id, attempt, outcome, state=outcome.state)
    if outcome.state == "dead":
        store.bury(job_id, outcome.reason or "failed")
        store.count(payload.account, "dead")
        store.count(payload.account, "failed")
    else:
        store.count(payload.account, outcome.state)
    return {"state": outcome.state, "reason": outcome.reason}
