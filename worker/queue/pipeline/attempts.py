"""The attempt policy: one module decides what an attempt at a job ends with.

Every message — each job of a group the dispatcher took from the ready sets
(worker/queue/pipeline/dispatch.py), a single message or one of a batch — goes through
:func:`attempt_all`: validated (a payload invalid in any field is dead-lettered
with pydantic's reasons, :func:`dead_on_arrival`), held when its account is
paused (worker/ops/health.py), begun (the attempt counted in its record; a job that
already ended is skipped), delivered by :class:`worker.queue.pipeline.delivery.Delivery`, and
concluded here from the outcome's class and the settings: sent, suppressed,
dead, or retrying — a retry, a limit wait or a claim wait is an entry of
Postroom's delay queue written with the record (worker/queue/store/delays.py). Nothing in
the delivery code decides whether to retry; the dispatcher only hands jobs in.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from worker.db.vocabulary import SKIPPED, JobState, Skipped, history_word
from worker.mail import autoreply
from worker.mail.payload import SendPayload
from worker.ops import counters, tracing
from worker.ops.counters import Counted, Tally
from worker.ops.health import AccountHealth
from worker.ops.tracing import Span
from worker.queue.broker.celery_app import broker_redis, job_store, settings, state_url
from worker.queue.broker.process_state import this_process
from worker.queue.pipeline import spans
from worker.queue.pipeline.attemptlog import log_attempt
from worker.queue.pipeline.delivery import Delivery, Outcome
from worker.queue.process import liveness
from worker.queue.process.runtime import get_runtime
from worker.queue.store import ready
from worker.queue.store.jobrecord import account_of, describe
from worker.queue.store.jobs import Begun, JobStore
from worker.records.addresses import bare_address
from worker.transports.limits import SLOT_WAIT

log = logging.getLogger("postroom.attempts")


@dataclass(frozen=True)
class Step:
    """What one attempt at one message ended with."""

    state: JobState | Skipped  # skipped: nothing done, the job had already ended
    reason: str | None = None
    retry_in: float | None = None  # set when state is "retrying"

    def summary(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason}


def attempt(job_id: str, kwargs: Any) -> Step:
    """One attempt at one message (``postroom.send``): :func:`attempt_all` of one."""
    return attempt_all([job_id], [kwargs])[0]


def _not_due(payload: SendPayload, now: float) -> float | None:
    """When a job whose send_at is still ahead is due (None: it is due now). Whatever published
    it (the helper, plain Celery, celery-node, the delay queue early), a scheduled send is never
    sent before its time: it waits in the schedule, where it can be cancelled."""
    return payload.send_at if payload.send_at is not None and payload.send_at > now + 1.0 else None


def _within_horizon(
    job_ids: list[str], valid: list[tuple[int, SendPayload]], now: float, steps: dict[int, Step]
) -> list[tuple[int, SendPayload]]:
    """A send_at further ahead than ``schedule_horizon`` is refused at enqueue by the helper;
    a producer that published without it gets the same answer, as a dead letter."""
    horizon = settings().schedule_horizon
    keep = []
    for i, payload in valid:
        if payload.send_at is not None and payload.send_at - now > horizon:
            reason = f"invalid payload: send_at: more than {horizon / 86400:g} days ahead (schedule_horizon)"
            steps[i] = dead_on_arrival(job_ids[i], payload.to_task_kwargs(), reason)
        else:
            keep.append((i, payload))
    return keep


def _own_key_first(store: JobStore, job_id: str, payload: SendPayload, due: float | None) -> float | None:
    """A scheduled job takes its idempotency key before it waits (the helper took it at enqueue);
    one whose key belongs to another job starts now instead, and ends as that job's duplicate."""
    if due is None or not payload.idempotency_key:
        return due
    return None if _duplicate_of(store, job_id, payload) else due


def _not_started(begun: Begun) -> Step:
    if begun.waits:
        return Step(JobState.SCHEDULED, "not due yet: waits for its send_at")
    return Step(SKIPPED, f"job already {begun.state or 'finished'}")


def _hold(job_id: str, payload: SendPayload) -> Step | None:
    """A job of a paused account waits in the account's held list (no attempt is spent);
    None when the account is not paused after all (it resumed a moment ago): deliver it."""
    reason = f"account {payload.account} is paused; held until it resumes"
    held = job_store().hold_if_paused(job_id, payload.account, payload.to_task_kwargs(), reason)
    if held == 0:
        return None
    if held < 0:
        return Step(SKIPPED, "job already ended (a cancelled job is never held)")
    return Step(JobState.HELD, f"account {payload.account} is paused")


def _count_auth_failures(outcomes: list[tuple[str, Outcome]]) -> None:
    """Authentication failures feed the account's circuit breaker (see worker/ops/health.py)."""
    for account, outcome in outcomes:
        if outcome.auth_failure and account_health().note_auth_failure(account, outcome.reason or "?"):
            log.warning("account %s paused after repeated authentication failures", account)


def release_held(job_id: str, kwargs: dict[str, Any]) -> None:
    """Ready again, under its own job id (its record and Message-ID are kept) — if it is still
    held (or, for the sweep, open and found nowhere)."""
    states = (JobState.HELD, JobState.QUEUED, JobState.RETRYING, JobState.SCHEDULED, JobState.SENDING)
    ready.make_ready(job_store().redis, job_id, str(kwargs.get("account", "")), states)


def account_health() -> AccountHealth:
    """This process's view of its accounts' health (one per process)."""
    return this_process().once(
        "account-health",
        lambda: AccountHealth(job_store().redis, pause_after=settings().pause_after, release=release_held),
    )


def _invalid(exc: Exception) -> str:
    return describe(exc) if isinstance(exc, ValidationError) else "nested too deeply"


def dead_on_arrival(job_id: str, kwargs: Any, reason: str) -> Step:
    """A job that cannot even be read goes straight to the dead letters, with the reason.

    Its payload was not validated: only what ``worker.queue.store.jobs`` can record safely of it is kept
    (a well-formed account name, else ``(unknown)``; ids and times as checked text), so this
    path itself cannot fail on whatever a producer sent."""
    store = job_store()
    fields = _identity(kwargs)
    account = _counted(account_of(fields))
    begun = store.begin_attempt(job_id, fields)
    if not begun.started:
        return _not_started(begun)
    store.finish(
        job_id, account, state=JobState.DEAD, attempt=begun.attempt, error=reason, counter="dead",
        fence=begun.fence,
    )  # fmt: skip
    return Step(JobState.DEAD, reason)


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


@dataclass
class _Ended:
    """One message's attempt, concluded: what is written to its record."""

    index: int
    payload: SendPayload
    attempt: int
    fence: str  # the attempt's token (worker/queue/store/jobscripts.py BEGIN)
    outcome: Outcome
    age: float


def _conclude(
    store: JobStore, pipe: Any, job_id: str, ended: _Ended, tally: Tally
) -> tuple[Step, Counted | None]:
    """Decide retry or not (by error class and settings) and queue the record on ``pipe``; the
    record is written only while this attempt is still the job's current one (its fence).
    Returns the step and what was added to ``tally`` for it."""
    payload, outcome = ended.payload, ended.outcome
    account = payload.account
    retry_in = None
    if outcome.state == JobState.RETRYING:
        outcome, delay = _retry_plan(ended.attempt, ended.age, outcome)
        retry_in = delay if outcome.state == JobState.RETRYING else None
    if outcome.state == JobState.DEAD and payload.kind == "auto-reply":
        # nothing was sent: the sender may be answered by a later job
        store.release_auto_reply(account, bare_address(autoreply.reply_recipient(payload)), job_id)
    state = outcome.state
    counter = ("retried" if outcome.counts else None) if retry_in is not None else outcome.state
    counted = store.finish_into(
        pipe,
        job_id,
        _counted(account),
        state=state,
        attempt=ended.attempt,
        error=outcome.reason,
        recipients=outcome.recipients or None,
        transport=outcome.transport,
        security=outcome.security,
        retry_in=retry_in,
        counter=counter,
        latency=ended.age,
        tally=tally,
        fence=ended.fence,
        # an attempt that never reached a server is taken back, whether it retries or dies
        uncount=ended.outcome.state == JobState.RETRYING and not ended.outcome.counts,
        count=not outcome.superseded,
    )
    if outcome.state == JobState.SENT:
        tally.signed_in.add(account)
    return Step(state, outcome.reason, retry_in), counted


def _write_tally(pipe: Any, store: JobStore, tally: Tally) -> None:
    tally.write_into(pipe)
    for account in tally.signed_in:
        account_health().auth_succeeded_into(pipe, account)


def cut_short_too_often(job_id: str, kwargs: dict[str, Any], runs: int | None = None) -> Step | None:
    """Count a run of a job whose last run died before any of its own code runs (a payload may
    kill its worker before an attempt is counted, e.g. while it is validated) — ``runs``: the
    count its holder's reaper already made; once more than ``max_attempts`` runs were cut
    short, the job is dead-lettered instead of run again."""
    store = job_store()
    runs = store.count_cut_short(job_id) if runs is None else runs
    if runs <= settings().retry.max_attempts:
        return None
    reason = f"{runs} runs cut short: the worker died or handed it back every time (a poison message?)"
    fields = _identity(kwargs)
    begun = store.begin_attempt(job_id, fields)
    if not begun.started:
        return _not_started(begun)
    account = _counted(account_of(fields))
    store.finish(
        job_id, account, state=JobState.DEAD, attempt=begun.attempt, error=reason, counter="dead",
        fence=begun.fence,
    )  # fmt: skip
    log.error("job %s: dead-lettered after %d runs cut short (a poison message?)", job_id, runs)
    return Step(JobState.DEAD, reason)


# A job waiting on a limit (or on another attempt's claim) looks again at least this often: a
# budget, slot or claim that frees early is noticed (its own send time stays reserved meanwhile).
WAIT_RECHECK = 60.0


def attempt_all(
    job_ids: list[str],
    messages: list[Any],
    *,
    also: Callable[[Any], None] | None = None,
    traces: Sequence[str] = (),
) -> list[Step]:
    """One attempt at each message, side by side (a group the dispatcher took): validate, hold,
    begin (a job not due yet goes back to waiting), deliver, classify, record. One Step per
    message, in order. ``also`` adds commands to the last round trip (the dispatcher lets its
    jobs go there); ``traces``: each job's traceparent, which its attempt's span continues."""
    store = job_store()
    steps: dict[int, Step] = {}
    valid: list[tuple[int, SendPayload]] = []
    for i, kwargs in enumerate(messages):
        try:
            valid.append((i, SendPayload.model_validate(kwargs)))
        except (ValidationError, RecursionError) as exc:
            steps[i] = dead_on_arrival(job_ids[i], kwargs, f"invalid payload: {_invalid(exc)}")
    now = time.time()
    valid = _within_horizon(job_ids, valid, now, steps)
    due = {i: _own_key_first(store, job_ids[i], p, _not_due(p, now)) for i, p in valid}
    paused = account_health().paused()
    if paused and any(payload.account in paused and due[i] is None for i, payload in valid):
        going: list[tuple[int, SendPayload]] = []
        for i, payload in valid:
            held = _hold(job_ids[i], payload) if payload.account in paused and due[i] is None else None
            if held is None:
                going.append((i, payload))
            else:
                steps[i] = held
        valid = going
    begun = store.begin_many([(job_ids[i], payload.to_task_kwargs, due[i]) for i, payload in valid])
    policy = settings().retry
    items: list[tuple[str, SendPayload, int]] = []
    item_meta: list[tuple[int, SendPayload, Begun]] = []
    finals: list[_Ended] = []
    traced: dict[int, Span] = {}
    for (i, payload), began in zip(valid, begun, strict=True):
        if not began.started:
            steps[i] = _not_started(began)
            continue
        attempt_no, age = began.attempt, now - began.enqueued_at
        traced[i] = spans.attempt_span(job_ids[i], payload, attempt_no, traces[i] if traces else "")
        if attempt_no > policy.max_attempts or age > policy.max_age:
            why = (
                f"{attempt_no - 1} attempts"
                if attempt_no > policy.max_attempts
                else f"max_age {policy.max_age:.0f}s"
            )
            exhausted = Outcome(JobState.DEAD, reason=f"retries exhausted ({why})")
            finals.append(_Ended(i, payload, attempt_no, began.fence, exhausted, age))
            continue
        if owner := _duplicate_of(store, job_ids[i], payload):
            duplicate = Outcome(
                JobState.SUPPRESSED, reason=f"duplicate of job {owner} (same idempotency_key)"
            )
            finals.append(_Ended(i, payload, attempt_no, began.fence, duplicate, age))
            continue
        items.append((job_ids[i], payload, attempt_no))
        item_meta.append((i, payload, began))

    started = time.monotonic()
    outcomes = _deliver(store, items, [tracing.within(traced[i]) for i, _, _ in item_meta])
    seconds = time.monotonic() - started
    for (i, payload, began), outcome in zip(item_meta, outcomes, strict=True):
        log_attempt(job_ids[i], payload.account, began.attempt, outcome, seconds)
        age = now - began.enqueued_at + seconds
        finals.append(_Ended(i, payload, began.attempt, began.fence, outcome, age))
    _record(store, job_ids, finals, steps, also)
    for i, span in traced.items():
        spans.attempt_ended(span, steps[i].state)
    return [steps[i] for i in range(len(messages))]


def _deliver(
    store: JobStore, items: list[tuple[str, SendPayload, int]], traces: list[tracing.Context]
) -> list[Outcome]:
    """Each item's outcome from the delivery pipeline; a failure of the pipeline itself retries
    each message on its own."""
    try:
        return delivery(store).run_many(items, traces)
    except SoftTimeLimitExceeded:  # Celery's time limit (prefork): each message retries on its own
        return [Outcome(JobState.RETRYING, reason="soft time limit exceeded") for _ in items]
    except Exception as exc:  # a bug or an unexpected library error: each message retries on its own
        log.exception("batch of %s…: unexpected error", items[0][0] if items else "-")
        return [
            Outcome(JobState.RETRYING, reason=f"internal error: {type(exc).__name__}: {exc}") for _ in items
        ]


def _record(
    store: JobStore,
    job_ids: list[str],
    finals: list[_Ended],
    steps: dict[int, Step],
    also: Callable[[Any], None] | None = None,
) -> None:
    """Every concluded attempt's record, counters and events in one round trip. An attempt that
    another one has superseded since it began (its process froze past its claim) writes
    nothing: its step says so."""
    tally, undo = Tally(), Tally()
    at: dict[int, int] = {}
    counted: dict[int, Counted | None] = {}
    with store.redis.pipeline(transaction=False) as pipe:
        for ended in finals:
            at[ended.index] = len(pipe)  # where FINISH's answer will be
            steps[ended.index], counted[ended.index] = _conclude(
                store, pipe, job_ids[ended.index], ended, tally
            )
        _write_tally(pipe, store, tally)
        if also is not None:
            also(pipe)
        replies = pipe.execute()
    for ended in finals:
        if not replies[at[ended.index]]:
            if (entry := counted[ended.index]) is not None:  # counted with the rest: take it back
                undo.add(_counted(ended.payload.account), **entry)
            steps[ended.index] = Step(SKIPPED, "superseded: a later attempt took the job over")
            log.warning(
                "job %s: attempt %d was superseded by a later attempt; its outcome (%s) is not recorded",
                job_ids[ended.index], ended.attempt, history_word(ended.outcome.state),
            )  # fmt: skip
    if undo.attempts:  # rare: only an attempt another one superseded while it ran
        with store.redis.pipeline(transaction=False) as pipe:
            undo.write_into(pipe, sign=-1)
            pipe.execute()
    _count_auth_failures([(ended.payload.account, ended.outcome) for ended in finals])


def delivery(store: JobStore) -> Delivery:
    """The pipeline on this process's runtime (its loop, pools and loop-side Redis client)."""
    runtime = get_runtime()
    # renews this process's Message-ID claims while it lives
    liveness.keep_beating(broker_redis(store.redis), state=store.redis)
    url = store_url()
    ttls = settings().job_ttl, settings().sent_as_ttl
    limiter = runtime.limiter(url, *ttls, slot_wait())
    return Delivery(store, runtime.marks(url, *ttls), runtime, settings(), limiter)


def slot_wait() -> float:
    """How long a send waits for an account's connection slot before it is re-scheduled:
    well inside the soft time limit, so the wait never costs the job an attempt."""
    return min(SLOT_WAIT, settings().soft_time_limit / 4)


def store_url() -> str:
    """Where Postroom's state lives (POSTROOM_REDIS_URL, else the broker's Redis)."""
    return state_url()


def _retry_plan(attempt_no: int, age: float, outcome: Outcome) -> tuple[Outcome, float]:
    """When to try again, or the dead-letter outcome when attempts or age run out.

    An attempt that never reached a server (``counts=False``: another attempt
    held the Message-ID) is not counted against max_attempts; it waits for that
    claim to expire, and only max_age bounds it.
    """
    policy = settings().retry
    if outcome.counts:
        delay = policy.delay(attempt_no, outcome.retry_after)
    else:  # the attempt is taken back in the same write (finish_into's uncount)
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
    dead = replace(outcome, state=JobState.DEAD, reason=f"retries exhausted ({why}): {outcome.reason}")
    return dead, 0.0
