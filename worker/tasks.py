"""The Celery tasks: thin by design.

``postroom.send`` delivers one message; ``postroom.send_batch`` carries many
(fan-out notifications) in one broker message, each with its own job id,
Message-ID, state, retries and dead-letter entry. Both run every message
through :func:`attempt`; the retry policy is decided there from the error
class and the settings, never inside the delivery code. A message of a batch
that must be retried leaves the batch as a ``postroom.send`` job of its own,
so a failure of one never resends the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from pydantic import ValidationError

from worker import autoreply, counters, liveness
from worker.accounts import EmailAccount
from worker.app import app, settings
from worker.broker import BrokerKeys
from worker.connectivity import check_connectivity
from worker.counters import Tally
from worker.delivery import LOG_FORMAT, Delivery, Outcome, log_attempt
from worker.drain import Carried, QueueDrain
from worker.errors import ConfigurationError
from worker.health import AccountHealth
from worker.intake import store as intake_store
from worker.jobs import JobStore, account_of, safe_text
from worker.limits import SLOT_WAIT
from worker.payload import (
    BATCH_TASK_NAME,
    HEALTH_TASK_NAME,
    QUEUE,
    SWEEP_TASK_NAME,
    TASK_ID,
    TASK_NAME,
    SendPayload,
    job_headers,
)
from worker.records import Records
from worker.runtime import get_runtime
from worker.settings import redis_url
from worker.sweep import Sweeper
from worker.transports import ConnectivityReport

log = logging.getLogger("postroom.tasks")
LOG_FORMAT.json = settings.log_format == "json"
STORE_TROUBLE_PAUSE = 1.0
_store: JobStore | None = None
_drain: QueueDrain | None = None


def job_store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_url(store_url(), job_ttl=settings.job_ttl)
    return _store


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_input=False, include_url=False)[:20]:
        where = ".".join(safe_text(p, 40) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {safe_text(item['msg'].removeprefix('Value error, '), 300)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Step:
    """What one attempt at one message ended with."""

    state: str  # sent | suppressed | dead | retrying | skipped | held
    reason: str | None = None
    retry_in: float | None = None  # set when state is "retrying"

    def summary(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason}


def attempt(job_id: str, kwargs: Any) -> Step:
    """One attempt at one message: validate, deliver, classify, record."""
    store = job_store()
    try:
        payload = SendPayload.model_validate(kwargs)
    except (ValidationError, RecursionError) as exc:
        return _dead_on_arrival(job_id, kwargs, f"invalid payload: {_invalid(exc)}")
    if payload.account in account_health().paused() and (held := _hold(job_id, payload)):
        return held

    begun = store.begin_attempt(job_id, payload.to_task_kwargs)
    if begun is None:  # a redelivery of a job that already ended (e.g. a worker died before its ack)
        return Step("skipped", "job already finished")
    attempt_no, enqueued_at = begun
    age = time.time() - enqueued_at
    policy = settings.retry
    if attempt_no > policy.max_attempts or age > policy.max_age:
        why = (
            f"{attempt_no - 1} attempts"
            if attempt_no > policy.max_attempts
            else f"max_age {policy.max_age:.0f}s"
        )
        outcome = Outcome("dead", reason=f"retries exhausted ({why})")
    elif owner := _duplicate_of(store, job_id, payload):
        outcome = Outcome("suppressed", reason=f"duplicate of job {owner} (same idempotency_key)")
    else:
        try:
            outcome = delivery(store).run(job_id, payload, attempt_no)
        except SoftTimeLimitExceeded:
            outcome = Outcome("retry", reason="soft time limit exceeded")
        except Exception as exc:  # a bug or an unexpected library error: bounded retries, then dead
            log.exception("job %s: unexpected error", job_id)
            outcome = Outcome("retry", reason=f"internal error: {type(exc).__name__}: {exc}")

    age = time.time() - enqueued_at  # to the outcome: the delivery-latency metric
    tally = Tally()
    with store.redis.pipeline(transaction=False) as pipe:
        step = _conclude(store, pipe, job_id, payload, attempt_no, age, outcome, tally)
        _write_tally(pipe, store, tally)
        pipe.execute()
    _count_auth_failures([(payload.account, outcome)])
    return step


def _hold(job_id: str, payload: SendPayload) -> Step | None:
    """A job of a paused account waits in the account's held list (no attempt is spent);
    None when the account is not paused after all (it resumed a moment ago): deliver it."""
    reason = f"account {payload.account} is paused; held until it resumes"
    if not job_store().hold_if_paused(job_id, payload.account, payload.to_task_kwargs(), reason):
        return None
    return Step("held", f"account {payload.account} is paused")


def _count_auth_failures(outcomes: list[tuple[str, Outcome]]) -> None:
    """Authentication failures feed the account's circuit breaker (see worker/health.py)."""
    for account, outcome in outcomes:
        if outcome.auth_failure and account_health().note_auth_failure(account, outcome.reason or "?"):
            log.warning("account %s paused after repeated authentication failures", account)


def _release_held(job_id: str, kwargs: dict[str, Any]) -> None:
    """Back on the queue, under its own job id (its record and Message-ID are kept)."""
    app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue=QUEUE, headers=job_headers(kwargs))


_health: AccountHealth | None = None


def account_health() -> AccountHealth:
    global _health
    if _health is None:
        _health = AccountHealth(job_store().redis, pause_after=settings.pause_after, release=_release_held)
    return _health


def _invalid(exc: Exception) -> str:
    return _describe(exc) if isinstance(exc, ValidationError) else "nested too deeply"


def _dead_on_arrival(job_id: str, kwargs: Any, reason: str) -> Step:
    """A job that cannot even be read goes straight to the dead letters, with the reason.

    Its payload was not validated: only what ``worker.jobs`` can record safely of it is kept
    (a well-formed account name, else ``(unknown)``; ids and times as checked text), so this
    path itself cannot fail on whatever a producer sent."""
    store = job_store()
    fields = _identity(kwargs)
    account = _counted(account_of(fields))
    begun = store.begin_attempt(job_id, fields)
    if begun is None:
        return Step("skipped", "job already finished")
    store.finish(job_id, account, state="dead", attempt=begun[0], error=reason, counter="dead")
    return Step("dead", reason)


def _counted(account: str) -> str:
    """The name an outcome is counted under (stats, metrics): the account's when its record
    exists, else ``(unknown)`` — a raw producer can name any account, and the counters' keys and
    labels must not grow with its choices."""
    return counters.account_label(account, get_runtime().records().account_names)


def _identity(kwargs: Any) -> dict[str, Any]:
    """The fields of an unvalidated payload a record is made from (never the content)."""
    if not isinstance(kwargs, dict):
        return {}
    keep = ("account", "kind", "message_id", "idempotency_key", "enqueued_at")
    return {k: kwargs[k] for k in keep if k in kwargs}


def _duplicate_of(store: JobStore, job_id: str, payload: SendPayload) -> str | None:
    """The job that owns this payload's idempotency key, when it is another one.

    The producer helper claims the key at enqueue; a producer that called
    ``send_task`` directly did not, so the worker claims it here.
    """
    if not payload.idempotency_key:
        return None
    owner = store.claim_idempotency_key(payload.account, payload.idempotency_key, job_id)
    return owner if owner is not None and owner != job_id else None


def _conclude(
    store: JobStore,
    pipe: Any,
    job_id: str,
    payload: SendPayload,
    attempt_no: int,
    age: float,
    outcome: Outcome,
    tally: Tally,
) -> Step:
    """Decide retry or not (by error class and settings) and queue the record on ``pipe``."""
    account = payload.account
    retry_in = None
    if outcome.state == "retry":
        outcome, delay = _retry_plan(store, job_id, attempt_no, age, outcome)
        retry_in = delay if outcome.state == "retry" else None
    if outcome.state == "dead" and payload.kind == "auto-reply":
        # nothing was sent: the sender may be answered by a later job
        store.release_auto_reply(account, autoreply.reply_recipient(payload), job_id)
    state = "retrying" if retry_in is not None else outcome.state
    counter = ("retried" if outcome.counts else None) if retry_in is not None else outcome.state
    store.finish_into(
        pipe,
        job_id,
        _counted(account),
        state=state,
        attempt=attempt_no,
        error=outcome.reason,
        recipients=outcome.recipients or None,
        transport=outcome.transport,
        security=outcome.security,
        retry_in=retry_in,
        counter=counter,
        latency=age,
        tally=tally,
    )
    if outcome.state == "sent":
        tally.signed_in.add(account)
    return Step(state, outcome.reason, retry_in)


def _write_tally(pipe: Any, store: JobStore, tally: Tally) -> None:
    tally.write_into(pipe, store.retrying_key)
    for account in tally.signed_in:
        account_health().auth_succeeded_into(pipe, account)


@app.task(name=TASK_NAME, bind=True, max_retries=None)
def send(self: Task[Any, Any], /, **kwargs: Any) -> dict[str, Any]:
    """Deliver one message (``postroom.send``); see the README for the payload.

    With a backlog queued, the task also carries more ready jobs taken from
    the queue (:mod:`worker.drain`) and delivers them side by side.
    """
    job_id = str(self.request.id)
    redelivered = _redelivered(self)
    with _unexpected_requeues(job_id):
        carried = [] if redelivered else _take_more(job_id)  # a job whose last run died runs alone
        if carried:
            step = _carry(job_id, kwargs, carried)
        else:
            with _store_trouble_requeues(job_id):
                step = (redelivered and _cut_short_too_often(job_id, kwargs)) or attempt(job_id, kwargs)
    # a retry waits in Postroom's delay queue (worker/delays.py), written with the job's record:
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


def _cut_short_too_often(job_id: str, kwargs: dict[str, Any]) -> Step | None:
    """Count a run of a redelivered job before any of its own code runs (a payload may kill its
    worker before an attempt is counted, e.g. while it is validated); once more than
    ``max_attempts`` runs were cut short, the job is dead-lettered instead of run again."""
    store = job_store()
    runs = store.count_cut_short(job_id)
    if runs <= settings.retry.max_attempts:
        return None
    reason = f"{runs} runs cut short: the worker died or handed it back every time (a poison message?)"
    fields = _identity(kwargs)
    begun = store.begin_attempt(job_id, fields)
    if begun is None:
        return Step("skipped", "job already finished")
    account = _counted(account_of(fields))
    store.finish(job_id, account, state="dead", attempt=begun[0], error=reason, counter="dead")
    log.error("job %s: dead-lettered after %d runs cut short (a poison message?)", job_id, runs)
    return Step("dead", reason)


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
    steps = _deliver(job_ids, messages)  # a retried message leaves its batch via the delay queue
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.state] = counts.get(step.state, 0) + 1
    return counts


def _take_more(job_id: str) -> list[Carried]:
    """Ready jobs to carry along with ``job_id`` (none when coalescing is off or Redis balks)."""
    if settings.coalesce <= 1:
        return []
    drain = queue_drain()
    room = _rooms()
    try:
        taken = drain.take(min(settings.coalesce - 1, sum(room.values())), room)
        carried, back = _within_account_bounds(taken)
        drain.give_back(back)
    except redis.RedisError as exc:
        log.warning("job %s: could not take more jobs from the queue (%s)", job_id, exc)
        return []
    return carried


# A job waiting on a limit (or on another attempt's claim) looks again at least this often: a
# budget, slot or claim that frees early is noticed (its own send time stays reserved meanwhile).
WAIT_RECHECK = 60.0

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
            steps = _deliver(job_ids, messages)
    except BaseException:
        with contextlib.suppress(redis.RedisError):  # else kombu restores them after the time limit
            drain.give_back(carried)
        raise
    try:
        drain.ack(carried)
    except redis.RedisError as exc:  # restored later and then skipped: every one of them has ended
        log.warning("job %s: carried jobs not acknowledged (%s)", job_id, exc)
    return steps[0]


def broker_keys() -> BrokerKeys:
    """kombu's key names on this app's broker (worker/broker.py)."""
    return BrokerKeys.from_options(app.conf.broker_transport_options)


def queue_drain() -> QueueDrain:
    global _drain
    if _drain is None:
        liveness.keep_beating(job_store().redis)  # what this process carries is claimed while it lives
        _drain = QueueDrain(
            job_store().redis,
            QUEUE,
            TASK_NAME,
            visibility_timeout=settings.visibility_timeout,
            time_limit=settings.time_limit,
            keys=broker_keys(),
        )
    return _drain


def _deliver(job_ids: list[str], messages: list[dict[str, Any]]) -> list[Step]:
    """Every message through one attempt side by side; one Step per message, in order."""
    store = job_store()
    steps: dict[int, Step] = {}
    valid: list[tuple[int, SendPayload]] = []
    for i, kwargs in enumerate(messages):
        try:
            valid.append((i, SendPayload.model_validate(kwargs)))
        except (ValidationError, RecursionError) as exc:
            steps[i] = _dead_on_arrival(job_ids[i], kwargs, f"invalid payload: {_invalid(exc)}")
    paused = account_health().paused()
    if paused and any(payload.account in paused for _, payload in valid):
        going: list[tuple[int, SendPayload]] = []
        for i, payload in valid:
            held = _hold(job_ids[i], payload) if payload.account in paused else None
            if held is None:
                going.append((i, payload))
            else:
                steps[i] = held
        valid = going
    begun = store.begin_many([(job_ids[i], payload.to_task_kwargs) for i, payload in valid])
    policy, now = settings.retry, time.time()
    items: list[tuple[str, SendPayload, int]] = []
    item_meta: list[tuple[int, SendPayload, int, float]] = []
    finals: list[tuple[int, SendPayload, int, Outcome, float]] = []  # (index, payload, attempt, outcome, age)
    for (i, payload), began in zip(valid, begun, strict=True):
        if began is None:
            steps[i] = Step("skipped", "job already finished")
            continue
        attempt_no, enqueued_at = began
        age = now - enqueued_at
        if attempt_no > policy.max_attempts or age > policy.max_age:
            exhausted = Outcome("dead", reason="retries exhausted")
            finals.append((i, payload, attempt_no, exhausted, age))
            continue
        if owner := _duplicate_of(store, job_ids[i], payload):
            duplicate = Outcome("suppressed", reason=f"duplicate of job {owner} (same idempotency_key)")
            finals.append((i, payload, attempt_no, duplicate, age))
            continue
        items.append((job_ids[i], payload, attempt_no))
        item_meta.append((i, payload, attempt_no, age))

    started = time.monotonic()
    try:
        outcomes = delivery(store).run_many(items)
    except Exception as exc:  # a bug or an unexpected library error: each message retries on its own
        log.exception("batch of %s…: unexpected error", job_ids[0] if job_ids else "-")
        outcomes = [Outcome("retry", reason=f"internal error: {type(exc).__name__}: {exc}") for _ in items]
    seconds = time.monotonic() - started
    for (i, payload, attempt_no, age), outcome in zip(item_meta, outcomes, strict=True):
        log_attempt(job_ids[i], payload.account, attempt_no, outcome, seconds)
        finals.append((i, payload, attempt_no, outcome, age + seconds))

    tally = Tally()
    with store.redis.pipeline(transaction=False) as pipe:
        for i, payload, attempt_no, outcome, age in finals:
            steps[i] = _conclude(store, pipe, job_ids[i], payload, attempt_no, age, outcome, tally)
        _write_tally(pipe, store, tally)
        pipe.execute()
    _count_auth_failures([(payload.account, outcome) for _, payload, _, outcome, _ in finals])
    return [steps[i] for i in range(len(messages))]


def delivery(store: JobStore) -> Delivery:
    """The pipeline on this process's runtime (its loop, pools and loop-side Redis client)."""
    runtime = get_runtime()
    liveness.keep_beating(store.redis)  # renews this process's Message-ID claims while it lives
    url = store_url()
    limiter = runtime.limiter(url, settings.job_ttl, slot_wait())
    return Delivery(store, runtime.marks(url, settings.job_ttl), runtime, settings, limiter)


def slot_wait() -> float:
    """How long a send waits for an account's connection slot before it is re-scheduled:
    well inside the soft time limit, so the wait never costs the job an attempt."""
    return min(SLOT_WAIT, settings.soft_time_limit / 4)


def store_url() -> str:
    return redis_url(app.conf.broker_url)


def _retry_plan(
    store: JobStore, job_id: str, attempt_no: int, age: float, outcome: Outcome
) -> tuple[Outcome, float]:
    """When to try again, or the dead-letter outcome when attempts or age run out.

    An attempt that never reached a server (``counts=False``: another attempt
    held the Message-ID) is not counted against max_attempts; it waits for that
    claim to expire, and only max_age bounds it.
    """
    policy = settings.retry
    if outcome.counts:
        delay = policy.delay(attempt_no, outcome.retry_after)
    else:
        store.uncount_attempt(job_id)
        # a limit's wait is exact (its send time is reserved); a held claim's is spread out
        spread = 0.05 if outcome.limit_wait else random.uniform(0.1, 1.0)
        delay = min((outcome.retry_after or 0) + spread, WAIT_RECHECK)
    why = None
    if outcome.counts and attempt_no >= policy.max_attempts:
        why = f"{attempt_no} attempts"
    elif age + delay > policy.max_age:
        why = f"max_age {policy.max_age:.0f}s"
    if why is None:
        return outcome, delay
    dead = replace(outcome, state="dead", reason=f"retries exhausted ({why}): {outcome.reason}")
    return dead, 0.0


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
    return Sweeper(job_store().redis, QUEUE, _release_held, grace=min(30.0, settings.sweep_interval))


@app.task(name=SWEEP_TASK_NAME, ignore_result=True)
def sweep() -> dict[str, Any]:
    """Publish again the jobs whose message went missing from the broker (worker/sweep.py).

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
