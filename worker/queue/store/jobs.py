"""The job store: every write to a job's record, from enqueue to its end, kept in Redis.

Keys (all under ``postroom:``)::

    job:<id>                 hash: state, attempts, account, message_id, recipients, last_error,
                             cut_short (runs redelivered because the one before died), …
    history:<id>             list: one JSON entry per attempt (newest last, capped)
    idem:<account>:<key>     job id that owns an idempotency key
    autoreply:<account>:<to> set when an auto-reply went to that sender (expires after the window)
    stats:<account>          hash: sent / failed / retried / dead / suppressed counters
    retrying                 sorted set of jobs waiting for a retry, by when it is due
    open                     sorted set of jobs not ended yet, by enqueue time (worker/queue/process/sweep.py)

What a record holds and how it reads back: worker/queue/store/jobrecord.py. The dead letters'
side of the store: worker/queue/store/deadletters.py. The Message-ID claims and sent marks
(``claim:``, ``delivered:``, scoped per account, contract §2): worker/queue/store/marks.py, whose
scripts the store runs in its pipelines. Everything stored is secret-free by construction:
payloads carry account names, errors carry server replies.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from worker.db import connect
from worker.db.keys import REDIS_TIMEOUTS, redis_key
from worker.db.vocabulary import OPEN_STATES, JobState, history_word
from worker.ops import counters
from worker.queue.store import emit, ready
from worker.queue.store.deadletters import DeadLetters
from worker.queue.store.jobrecord import OPEN, SCHEDULED, Job, record_fields
from worker.queue.store.jobscripts import BEGIN, BEGIN_SHA, DISCARD, FINISH, HOLD
from worker.queue.store.marks import (
    CLAIM_SCRIPT,
    CLAIM_SHA,
    MARK_PATIENCE,
    MARK_SCRIPT,
    REDIS_UNAVAILABLE,
    RELEASE_SCRIPT,
    RELEASE_SHA,
    SENT_AS_MARGIN,
    Mark,
    mark_command,
)
from worker.queue.store.suppressions import AutoReplyWindow

PayloadSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
_HISTORY_LIMIT = 50


_key = redis_key


def _idem_key(payload: Mapping[str, Any]) -> str:
    return _key("idem", str(payload["account"]), str(payload["idempotency_key"]))


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Begun:
    """What :meth:`JobStore.begin_many` decided for one job: an attempt started (``attempt``
    > 0, with its ``fence``), or not, and the state the job is in then."""

    attempt: int = 0
    enqueued_at: float = 0.0
    fence: str = ""  # this attempt's token: its outcome is written only while it is the record's
    state: str = ""  # when not started: the job's state (ended, or waiting for its send_at)
    waits: bool = False  # not due yet: it went (back) to waiting in the schedule

    @property
    def started(self) -> bool:
        return self.attempt > 0

    @classmethod
    def from_reply(cls, reply: list[Any], now: float) -> Begun:
        code, second, third = reply[0], reply[1], reply[2] if len(reply) > 2 else None
        if int(code) > 0:
            return cls(int(code), float(second or now), str(third))
        return cls(state=str(second or ""), waits=int(code) == -3)


def _ending(
    state: JobState,
    attempt: int,
    now: float,
    error: str | None,
    retry_in: float | None,
    recipients: Mapping[str, Mapping[str, Any]] | None,
    transport: str | None,
    security: str | None,
) -> tuple[dict[str, Any], dict[str, str | int | float]]:
    """An attempt's history entry and the record fields its end writes."""
    entry: dict[str, Any] = {"attempt": attempt, "at": now, "outcome": history_word(state)}
    if error:
        entry["error"] = error
    if retry_in is not None:
        entry["retry_in"] = round(retry_in, 1)
    fields: dict[str, str | int | float] = {"state": state, "updated_at": now}
    if recipients is not None:
        fields["recipients"] = json.dumps(dict(recipients))
    if transport:
        fields["transport"] = transport
    if security:
        fields["security"] = security
    if error is not None:
        fields["last_error"] = error
    return entry, fields


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as a script returns it (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class JobStore(DeadLetters, AutoReplyWindow):
    """Synchronous access to job state (called from task threads and the CLI)."""

    retrying_key = _key("retrying")  # zset: job id -> when its next attempt is due

    def __init__(
        self,
        client: redis.Redis,
        *,
        job_ttl: float = 14 * 86400.0,
        event_retention: float = 7 * 86400.0,
        sent_as_ttl: float | None = None,
    ) -> None:
        self.redis = client
        self.job_ttl = int(job_ttl)
        # the Message-ID -> job entries a sent mark files (marks.py): at least as long as the record
        self.sent_as_ttl = int(sent_as_ttl if sent_as_ttl is not None else job_ttl + SENT_AS_MARGIN)
        self.event_retention = event_retention  # how long webhook events are kept (emit.py)
        self._discard = client.register_script(DISCARD)
        self._hold = client.register_script(HOLD)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobStore:
        return cls(connect.client(url, decode_responses=True, **REDIS_TIMEOUTS), **kwargs)

    # ---- enqueue side ----------------------------------------------------------

    def claim_idempotency_key(self, account: str, key: str, job_id: str) -> str | None:
        """Reserve ``key`` for ``job_id``; returns the job that already owns it, if any."""
        idem = _key("idem", account, key)
        if self.redis.set(idem, job_id, nx=True, ex=self.job_ttl):
            return None
        owner = cast(str | None, self.redis.get(idem))
        return owner if owner is not None else self.claim_idempotency_key(account, key, job_id)

    def create_claimed(
        self,
        jobs: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        submitted_by: str = "",
        traces: Sequence[str] = (),
    ) -> list[str | None]:
        """Records for new jobs, each claiming its idempotency key in the same transaction.

        Returns, per job, None (created; its key, if any, is its own) or the job that
        already owns its key (nothing of this one is kept). Record, claim and its place in
        its account's ready set (worker/queue/store/ready.py; the schedule for a job not due yet)
        come together: a key never names a job without a record, and a job with a record is
        ready for every worker at once — so a producer that retries after an error with the
        same key is given a job that will be sent, never one that was lost. ``traces``: each
        job's traceparent (worker/ops/tracing.py), kept in its record.
        """
        now = time.time()
        claims: list[int | None] = []  # where each job's SET NX result is in the replies
        accounts: set[str] = set()
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: all of it, or nothing
            for i, (job_id, payload) in enumerate(jobs):
                key, due = _key("job", job_id), payload.get("send_at")
                state = JobState.SCHEDULED if isinstance(due, float) and due > now else JobState.QUEUED
                traceparent = traces[i] if i < len(traces) else ""
                pipe.hset(key, mapping=record_fields(job_id, payload, state, submitted_by, traceparent))
                if (
                    state == JobState.SCHEDULED
                ):  # waits in Postroom's delay queue (worker/queue/store/schedule.py)
                    pipe.zadd(SCHEDULED, {job_id: float(due or 0)})
                else:
                    ready.add_into(pipe, job_id, str(payload["account"]), now)
                    accounts.add(str(payload["account"]))
                # a scheduled job's record is kept until its time and job_ttl after it
                pipe.expire(key, self.job_ttl + max(0, int(float(due or 0) - now)))
                pipe.zadd(OPEN, {job_id: now})
                idem = payload.get("idempotency_key")
                if idem:
                    claims.append(len(pipe))
                    pipe.set(_idem_key(payload), job_id, nx=True, ex=self.job_ttl)
                else:
                    claims.append(None)
            for account in sorted(accounts):
                ready.ring_into(pipe, account)
            replies = pipe.execute()
        owners: list[str | None] = []
        for (job_id, payload), at in zip(jobs, claims, strict=True):
            owner = None
            if at is not None and not replies[at]:  # taken: by whom (or ours after all, if it lapsed)
                account, idem = str(payload["account"]), str(payload["idempotency_key"])
                owner = self.claim_idempotency_key(account, idem, job_id)
                if owner is not None:
                    self.discard(job_id, payload)
            owners.append(owner)
        return owners

    def discard(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """Forget a new job its producer gave up on, in one step (its key too, if it is its own)."""
        keys = [_key("job", job_id), _key("history", job_id), OPEN, ready.ready_key(str(payload["account"]))]
        if payload.get("idempotency_key"):
            keys.append(_idem_key(payload))
        self._discard(keys=keys, args=[job_id])

    def delete(self, job_id: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(_key("job", job_id), _key("history", job_id))
            pipe.zrem(OPEN, job_id)
            pipe.execute()

    # ---- reading ---------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key("job", job_id))
            pipe.lrange(_key("history", job_id), 0, -1)
            pipe.zscore(SCHEDULED, job_id)  # when a scheduled job is due, or a retry's next attempt
            pipe.zscore(self.retrying_key, job_id)
            raw, history, scheduled, retry = pipe.execute()
        data = cast(dict[str, str], raw)
        due = scheduled if scheduled is not None else retry
        return Job.from_record(job_id, data, history, due_at=due) if data else None

    # ---- execution side -----------------------------------------------------------

    def begin_attempt(self, job_id: str, payload: PayloadSource) -> Begun:
        """Count the attempt and mark the job ``sending``, in one round trip (see :meth:`begin_many`)."""
        return self.begin_many([(job_id, payload, None)])[0]

    def begin_many(self, jobs: Sequence[tuple[str, PayloadSource, float | None]]) -> list[Begun]:
        """Start an attempt at each (job id, payload, due) in one round trip: the job store's
        intake and the start of an attempt in one decision per job (``BEGIN``).

        A job without a record (its producer published without the helper) gets the record the
        helper would have written, from its payload (a mapping or a function giving one, only
        called then), listed among the open jobs. A job whose ``due`` (its send_at) is still
        ahead waits in the schedule instead, cancellable from then on. A job that has ended
        (sent, dead, suppressed or cancelled) is not started again."""
        now = time.time()

        def begin_all(starts: Sequence[tuple[str, str, float | None]]) -> list[Any]:
            def commands(pipe: Any) -> None:
                for job_id, fields, due in starts:
                    keys = (_key("job", job_id), OPEN, SCHEDULED, self.retrying_key)
                    when = due if due is not None else ""
                    pipe.evalsha(BEGIN_SHA, 4, *keys, now, self.job_ttl, fields, when, job_id)

            return self.scripted(commands)

        # records normally exist: try without the fields to create them
        results = begin_all([(job_id, "", due) for job_id, _, due in jobs])
        missing = [i for i, result in enumerate(results) if int(result[0]) == -2]
        if missing:  # a producer that called send_task without the helper
            created = []
            for i in missing:
                job_id, source, due = jobs[i]
                payload = source() if callable(source) else source
                fields = record_fields(job_id, payload, JobState.QUEUED)
                created.append((job_id, json.dumps(fields), due))
            for i, result in zip(missing, begin_all(created), strict=True):
                results[i] = result
        return [Begun.from_reply(reply, now) for reply in results]

    def claim_many(
        self, claims: list[tuple[str, str, str]], ttl: float
    ) -> list[tuple[bool, dict[str, dict[str, Any]]]]:
        """Claim each (account, message_id) for an attempt (its token) and read the recipients
        already delivered, for many in one round trip: (claimed, delivered) per claim."""
        seconds = max(int(ttl), 1)
        raw = self.scripted(
            lambda pipe: [
                pipe.evalsha(
                    CLAIM_SHA,
                    4,
                    _key("claim", account, message_id),
                    _key("claim", message_id),  # an attempt from before the per-account keys
                    _key("delivered", message_id),
                    _key("delivered", account, message_id),
                    token,
                    seconds,
                )
                for account, message_id, token in claims
            ]
        )
        out = []
        lost: list[tuple[str, str, str]] = []
        for (account, message_id, token), (claimed, legacy_claim, legacy, delivered) in zip(
            claims, raw, strict=True
        ):
            marks = {**_pairs(legacy), **_pairs(delivered)}
            if claimed and legacy_claim:
                lost.append((account, message_id, token))
                claimed = False
            out.append((bool(claimed), {r: json.loads(v) for r, v in marks.items()}))
        self.release_many(lost)
        return out

    def release_many(self, claims: list[tuple[str, str, str]]) -> None:
        """Give up (account, message_id, token) claims (only those the token still holds)."""
        if not claims:
            return
        self.scripted(
            lambda pipe: [pipe.evalsha(RELEASE_SHA, 1, _key("claim", a, m), token) for a, m, token in claims]
        )

    def scripted(self, commands: Callable[[Any], object], *scripts: str) -> list[Any]:
        """Run a pipeline whose commands call the scripts by SHA, loading them (the store's own and
        ``scripts``) if Redis lost them."""
        for attempt in (1, 2):
            with self.redis.pipeline(transaction=False) as pipe:
                commands(pipe)
                try:
                    return list(pipe.execute())
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
            self.redis.script_load(BEGIN)
            self.redis.script_load(RELEASE_SCRIPT)
            self.redis.script_load(MARK_SCRIPT)
            self.redis.script_load(CLAIM_SCRIPT)
            for script in scripts:
                self.redis.script_load(script)
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_many(self, marks: list[Mark]) -> None:
        """Sent marks (recipients the server accepted, never sent again), the Message-ID -> job
        entries and the claims given up, for (account, message_id, accepted, claim token, job id),
        in one round trip."""

        def commands(pipe: Any) -> None:
            if marks:
                pipe.evalsha(*mark_command(marks, self.job_ttl, self.sent_as_ttl))

        deadline = time.monotonic() + MARK_PATIENCE
        pause = 0.1
        while True:  # every command is idempotent: a pipeline cut short may run again
            try:
                self.scripted(commands)
                return
            except REDIS_UNAVAILABLE:
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def note_message_id(self, job_id: str, message_id: str) -> None:
        self.redis.hset(_key("job", job_id), "message_id", message_id)

    def claim_remaining(self, account: str, message_id: str) -> float:
        """Seconds until the current claim on ``message_id`` expires (0 when there is none)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.pttl(_key("claim", account, message_id))
            pipe.pttl(_key("claim", message_id))
            ttls = pipe.execute()
        return max(0, *(int(t) for t in ttls)) / 1000.0

    def count_cut_short(self, job_id: str) -> int:
        """One more run of ``job_id`` begins after an earlier one never finished; returns how many."""
        key = _key("job", job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "cut_short", 1)
            pipe.expire(key, self.job_ttl)
            runs, _ = pipe.execute()
        return int(runs)

    def finish(self, job_id: str, account: str, **fields: Any) -> None:
        """Record an attempt's end, its history entry, the account counters and, for
        ``dead``, the dead-letter entry: one round trip (see :meth:`finish_into`)."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.finish_into(pipe, job_id, account, **fields)
            pipe.execute()

    def finish_into(
        self,
        pipe: Any,
        job_id: str,
        account: str,
        *,
        state: JobState,
        attempt: int,
        error: str | None = None,
        recipients: Mapping[str, Mapping[str, Any]] | None = None,
        transport: str | None = None,
        security: str | None = None,
        retry_in: float | None = None,
        counter: str | None = None,
        latency: float | None = None,
        tally: counters.Tally | None = None,
        fence: str = "",
        uncount: bool = False,
        count: bool = True,
    ) -> counters.Counted | None:
        """Queue :meth:`finish`'s commands on ``pipe`` (batches finish many in one round trip).

        ``latency``: seconds from enqueue to this outcome (the delivery-latency metric);
        ``tally``: sum the counters there instead (a batch writes them once); ``fence``: the
        attempt's token from :meth:`begin_many` — nothing is written when another attempt has
        started since ("" writes whatever the record's); ``uncount``: take the attempt back (it
        never reached a server); ``count``: False leaves the delivery counters alone (an attempt
        that was superseded sent nothing). Returns what was counted (None: nothing), for a
        caller that must take it back when FINISH refuses a superseded attempt's outcome."""
        now = time.time()
        entry, fields = _ending(state, attempt, now, error, retry_in, recipients, transport, security)
        # dead letters stay until purged (no TTL); the rest expire after job_ttl. EVAL, not
        # EVALSHA: callers' pipelines mix other commands, and a Redis that lost its scripts must
        # not fail a finished job's record
        pipe.eval(
            FINISH,
            6,
            _key("job", job_id),
            _key("history", job_id),
            OPEN,
            _key("dead"),
            _key("stats", account),
            self.retrying_key,
            job_id,
            state,
            now,
            json.dumps(entry),
            _HISTORY_LIMIT,
            self.job_ttl,
            "0" if state in OPEN_STATES else "1",
            counter or "",
            # a retry that spent no attempt (a provider limit's wait, a Message-ID held by another
            # attempt) is no deferral a producer hears of; one that did counts "retried"
            *emit.emit_args(
                state if state != JobState.RETRYING or counter == "retried" else "", self.event_retention
            ),
            fence,
            "1" if uncount else "0",
            now + (retry_in or 0.0) if state == JobState.RETRYING else "",
            *(part for item in fields.items() for part in item),
        )
        if not count:
            return None
        counted = counters.Counted(
            transport=transport, outcome=state, counter=counter, latency=latency, now=now
        )
        if tally is not None:  # the caller writes the sums with tally.write_into(pipe)
            tally.add(account, **counted)
        else:
            counters.record_into(pipe, account, **counted)
        return counted

    def hold_if_paused(self, job_id: str, account: str, kwargs: Mapping[str, Any], reason: str) -> int:
        """The job waits in its account's held list (worker/ops/health.py releases it) — only if the
        account is paused at this very moment, checked in the same script that files it: a
        resume that drains the list just before can never leave a job behind in it. Returns 1
        (held); 0: the account is not paused (any more), and the caller delivers the job now; -1:
        the job has ended (cancelled, say) and stays so.

        A job enqueued without the producer helper has no record yet: it gets one here."""
        now = time.time()
        keys = [
            _key("paused"),
            _key("held", account),
            _key("job", job_id),
            _key("history", job_id),
            self.retrying_key,
            OPEN,
        ]
        args: list[str | float | int] = [
            account,
            json.dumps({"id": job_id, "kwargs": dict(kwargs)}),
            json.dumps(record_fields(job_id, kwargs, JobState.HELD)),
            now,
            reason,
            json.dumps({"at": now, "outcome": history_word(JobState.HELD), "error": reason}),
            _HISTORY_LIMIT,
            job_id,
        ]
        return int(self._hold(keys=keys, args=args))
