"""Job records, duplicate suppression and dead letters, kept in Redis.

Keys (all under ``postroom:``)::

    job:<id>                 hash: state, attempts, account, message_id, recipients, last_error,
                             cut_short (runs redelivered because the one before died), …
    history:<id>             list: one JSON entry per attempt (newest last, capped)
    delivered:<account>:<message_id>  hash: recipient -> JSON result, written right after the 250
    claim:<account>:<message_id>      the attempt currently talking to a server (expires on its own)
    idem:<account>:<key>     job id that owns an idempotency key
    dead                     sorted set of dead-lettered job ids by time
    autoreply:<account>:<to> set when an auto-reply went to that sender (expires after the window)
    stats:<account>          hash: sent / failed / retried / dead / suppressed counters
    retrying                 sorted set of jobs waiting for a retry, by when it is due
    open                     sorted set of jobs not ended yet, by enqueue time (worker/queue/sweep.py)

The claim and sent-mark scripts live in :mod:`worker.queue.marks` (the duplicate guard);
the store runs them in its pipelines. Claims and sent marks are scoped per account
(DESIGN §2): a job of one account can never be suppressed by, or learn about, another
account's Message-IDs.
Marks written before that (``delivered:<message_id>``, ``claim:<message_id>``)
are still honoured until they expire (``job_ttl``).

Everything stored is secret-free by construction: payloads carry account
names, errors carry server replies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis

from worker.keys import REDIS_TIMEOUTS, redis_key
from worker.ops import counters
from worker.queue.marks import (
    CLAIM_SCRIPT,
    CLAIM_SHA,
    MARK_PATIENCE,
    MARK_SCRIPT,
    REDIS_UNAVAILABLE,
    RELEASE_SCRIPT,
    RELEASE_SHA,
    Mark,
    mark_command,
)

PayloadSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
_HISTORY_LIMIT = 50


class JobState(StrEnum):
    """A job's state as its record, ``postroom job --json``, the HTTP API and the dashboard spell
    it (DESIGN §2). A StrEnum: each member is its string, in Redis and in JSON alike."""

    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    HELD = "held"  # its account's circuit breaker is open; released when it closes
    SENT = "sent"
    DEAD = "dead"
    SUPPRESSED = "suppressed"


OPEN_STATES = frozenset({JobState.QUEUED, JobState.SENDING, JobState.RETRYING, JobState.HELD})
FINAL_STATES = frozenset(JobState) - OPEN_STATES


_key = redis_key
OPEN = redis_key("open")


def _idem_key(payload: Mapping[str, Any]) -> str:
    return _key("idem", str(payload["account"]), str(payload["idempotency_key"]))


def new_job_id() -> str:
    return str(uuid.uuid4())


MAX_RAW_KEPT = 64 * 1024  # bytes of an unreadable message kept (base64) with its dead letter
UNKNOWN_ACCOUNT = counters.UNKNOWN  # the account of a job whose payload names none that could exist
_LATEST_TIME = 2.0**40  # far beyond any real clock: larger "timestamps" are not believed


def account_of(payload: Mapping[str, Any]) -> str:
    """The payload's account when it is a well-formed name, else :data:`UNKNOWN_ACCOUNT`
    (what a producer wrote is never a Redis key or a metrics label unchecked)."""
    name = payload.get("account")
    return counters.account_label(name) if isinstance(name, str) else UNKNOWN_ACCOUNT


def safe_text(value: Any, limit: int = 200) -> str:
    """``value`` as printable text of at most ``limit`` characters, for records and logs:
    never raises, whatever a producer sent."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # a repr that fails or recurses without end
        text = f"<{type(value).__name__}>"
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[: limit * 2])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timestamp(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < _LATEST_TIME:
        return float(value)  # NaN fails the comparisons
    return default


def _payload_json(payload: Mapping[str, Any]) -> str:
    """The payload as kept in the record (retries and dead-letter retries publish it again);
    "" when it is no JSON (only a payload that was never validated can be)."""
    try:
        return json.dumps(dict(payload))
    except (TypeError, ValueError, RecursionError):
        return ""


def _record_fields(
    job_id: str, payload: Mapping[str, Any], state: str, submitted_by: str = ""
) -> dict[Any, str | int | float]:
    """A new job record from a payload; safe for any payload (it may not have been validated)."""
    now = time.time()
    kind = payload.get("kind", "notification")
    message_id, key = payload.get("message_id"), payload.get("idempotency_key")
    return {
        "id": job_id,
        "state": state,
        "attempts": 0,
        "account": account_of(payload),
        "kind": kind if kind in ("notification", "auto-reply") else safe_text(kind, 40),
        "message_id": safe_text(message_id, 250) if message_id else "",
        "idempotency_key": safe_text(key) if key else "",
        "payload": _payload_json(payload),
        "recipients": "{}",
        "created_at": now,
        "updated_at": now,
        "enqueued_at": _timestamp(payload.get("enqueued_at"), now),
        "submitted_by": submitted_by,  # the HTTP API key that enqueued it ("" otherwise)
    }


# KEYS[1] job hash; ARGV: now, ttl, JSON of the fields to create the record with when missing
# (empty: report a missing record as -2 instead; -1 means the job already ended).
_BEGIN = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'sent' or state == 'dead' or state == 'suppressed' then return {-1, false} end
if not state then
  if ARGV[3] == '' then return {-2, false} end
  for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, tostring(v)) end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'sending', 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {attempts, redis.call('HGET', KEYS[1], 'enqueued_at')}
"""
# An attempt's end on the record, in one command instead of seven a job (see finish_into).
# KEYS: job, history, open, dead, stats of the account. ARGV: job id, state, now, history entry,
# history limit, ttl, "1" when the state is final (off the open list), counter ("" none; "dead"
# counts failed too), then the record's field/value pairs.
_FINISH = """
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
if ARGV[7] == '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
if ARGV[2] == 'dead' then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'failed_at', ARGV[3])
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if ARGV[8] == 'dead' then
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
  redis.call('HINCRBY', KEYS[5], 'failed', 1)
elseif ARGV[8] ~= '' then
  redis.call('HINCRBY', KEYS[5], ARGV[8], 1)
end
return 1
"""
# A new job given up by its producer, all at once: record, history, open entry and (when it is
# the job's own) its idempotency key. KEYS: job, history, open[, idem]; ARGV: job id.
_DISCARD = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""
# KEYS: paused set, held list, job, history, retrying. ARGV: account, held entry, record fields
# (JSON, for a job without a record), now, reason, history entry, history limit, job id.
_HOLD = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSETNX', KEYS[3], k, tostring(v)) end
redis.call('HSET', KEYS[3], 'state', 'held', 'updated_at', ARGV[4], 'last_error', ARGV[5])
redis.call('RPUSH', KEYS[4], ARGV[6])
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[7]), -1)
redis.call('PERSIST', KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[8])
return 1
"""
# Pipelines call the scripts by SHA: redis-py's Script objects would ask SCRIPT EXISTS on every
# pipeline (an extra round trip); a Redis that lost them (a restart) gets them loaded again.
_BEGIN_SHA = hashlib.sha1(_BEGIN.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as a script returns it (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass
class Job:
    """A job record as ``postroom job ID --json`` shows it (DESIGN §8 keys)."""

    id: str
    state: str
    attempts: int
    account: str
    transport: str | None
    security: str | None
    message_id: str | None
    recipients: dict[str, dict[str, Any]]
    last_error: str | None
    kind: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    enqueued_at: float | None = None
    idempotency_key: str | None = None
    history: list[dict[str, Any]] | None = None
    payload: dict[str, Any] | None = None
    submitted_by: str | None = None
    unreadable: dict[str, Any] | None = None  # an entry no job could be made of: what it was

    def as_dict(self, *, with_payload: bool = False) -> dict[str, Any]:
        out = {
            "id": self.id,
            "state": self.state,
            "attempts": self.attempts,
            "account": self.account,
            "transport": self.transport,
            "security": self.security,
            "message_id": self.message_id,
            "recipients": self.recipients,
            "last_error": self.last_error,
            "kind": self.kind,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "idempotency_key": self.idempotency_key,
            "history": self.history or [],
        }
        if self.unreadable is not None:
            out["unreadable"] = self.unreadable
        if with_payload:
            out["payload"] = self.payload
        return out


class JobStore:
    """Synchronous access to job state (called from task threads and the CLI)."""

    retrying_key = _key("retrying")  # zset: job id -> when its next attempt is due
    dead_key = _key("dead")

    def __init__(self, client: redis.Redis, *, job_ttl: float = 14 * 86400.0) -> None:
        self.redis = client
        self.job_ttl = int(job_ttl)
        self._discard = client.register_script(_DISCARD)
        self._hold = client.register_script(_HOLD)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, **REDIS_TIMEOUTS), **kwargs)

    # ---- enqueue side ----------------------------------------------------------

    def claim_idempotency_key(self, account: str, key: str, job_id: str) -> str | None:
        """Reserve ``key`` for ``job_id``; returns the job that already owns it, if any."""
        idem = _key("idem", account, key)
        if self.redis.set(idem, job_id, nx=True, ex=self.job_ttl):
            return None
        owner = cast(str | None, self.redis.get(idem))
        return owner if owner is not None else self.claim_idempotency_key(account, key, job_id)

    def create_claimed(
        self, jobs: Sequence[tuple[str, Mapping[str, Any]]], *, submitted_by: str = ""
    ) -> list[str | None]:
        """Records for new jobs, each claiming its idempotency key in the same transaction.

        Returns, per job, None (created; its key, if any, is its own) or the job that
        already owns its key (nothing of this one is kept). Record and claim come
        together, so a key never names a job without a record; and a job with a record
        gets published — by its producer or, if the producer failed half-way, by the
        orphan sweep — so a producer that retries after an error with the same key is
        given a job that will be sent, never one that was lost.
        """
        now = time.time()
        claims: list[int | None] = []  # where each job's SET NX result is in the replies
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: all of it, or nothing
            for job_id, payload in jobs:
                key = _key("job", job_id)
                pipe.hset(key, mapping=_record_fields(job_id, payload, JobState.QUEUED, submitted_by))
                pipe.expire(key, self.job_ttl)
                pipe.zadd(OPEN, {job_id: now})
                idem = payload.get("idempotency_key")
                if idem:
                    claims.append(len(pipe))
                    pipe.set(_idem_key(payload), job_id, nx=True, ex=self.job_ttl)
                else:
                    claims.append(None)
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
        keys = [_key("job", job_id), _key("history", job_id), OPEN]
        if payload.get("idempotency_key"):
            keys.append(_idem_key(payload))
        self._discard(keys=keys, args=[job_id])

    def delete(self, job_id: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(_key("job", job_id), _key("history", job_id))
            pipe.zrem(OPEN, job_id)
            pipe.execute()

    def quarantine(
        self, raw: bytes, reason: str, *, queue: str = "", claimed_id: Any = None, task: Any = None
    ) -> str:
        """A dead letter for a broker entry no job can be made of (undecodable, the wrong
        shape, no id, an unknown task…): its reason and its raw bytes (base64, the first
        :data:`MAX_RAW_KEPT`), listed, shown and purged like any other. Returns its id."""
        job_id = f"unreadable-{uuid.uuid4()}"
        now = time.time()
        kept = raw[:MAX_RAW_KEPT]
        fields: dict[Any, str | int | float] = {
            "id": job_id,
            "state": JobState.DEAD,
            "attempts": 0,
            "account": UNKNOWN_ACCOUNT,
            "kind": "unreadable",
            "message_id": "",
            "idempotency_key": "",
            "payload": "",
            "recipients": "{}",
            "created_at": now,
            "updated_at": now,
            "enqueued_at": now,
            "failed_at": now,
            "last_error": f"unreadable message: {reason}",
            "raw_base64": base64.b64encode(kept).decode(),
            "raw_size": len(raw),
            "raw_queue": safe_text(queue),
            "raw_claimed_id": safe_text(claimed_id) if claimed_id is not None else "",
            "raw_task": safe_text(task) if task is not None else "",
        }
        entry = {"attempt": 0, "at": now, "outcome": "dead", "error": fields["last_error"]}
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: the record and its dead-letter entry together
            pipe.hset(_key("job", job_id), mapping=fields)
            pipe.rpush(_key("history", job_id), json.dumps(entry))
            pipe.zadd(_key("dead"), {job_id: now})
            pipe.hincrby(_key("stats", UNKNOWN_ACCOUNT), "dead", 1)
            pipe.execute()
        return job_id

    # ---- reading ---------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key("job", job_id))
            pipe.lrange(_key("history", job_id), 0, -1)
            raw, history = pipe.execute()
        data = cast(dict[str, str], raw)
        if not data:
            return None
        return Job(
            id=data.get("id", job_id),
            state=data.get("state", JobState.QUEUED),
            attempts=int(data.get("attempts", 0)),
            account=data.get("account", ""),
            transport=data.get("transport") or None,
            security=data.get("security") or None,
            message_id=data.get("message_id") or None,
            recipients=json.loads(data.get("recipients") or "{}"),
            last_error=data.get("last_error") or None,
            kind=data.get("kind") or None,
            created_at=float(data["created_at"]) if data.get("created_at") else None,
            updated_at=float(data["updated_at"]) if data.get("updated_at") else None,
            enqueued_at=float(data["enqueued_at"]) if data.get("enqueued_at") else None,
            idempotency_key=data.get("idempotency_key") or None,
            history=[json.loads(entry) for entry in history],
            payload=json.loads(data["payload"]) if data.get("payload") else None,
            submitted_by=data.get("submitted_by") or None,
            unreadable=_unreadable(data),
        )

    # ---- execution side -----------------------------------------------------------

    def begin_attempt(self, job_id: str, payload: PayloadSource) -> tuple[int, float] | None:
        """Count the attempt and mark the job ``sending``, in one round trip.

        Creates the record (from ``payload``, a mapping or a function giving
        one, only called then) for a producer that enqueued without the helper.
        Returns (attempt number, enqueued at), or None when the job already
        ended (sent, dead or suppressed): a redelivery after a crash must not
        start it again.
        """
        return self.begin_many([(job_id, payload)])[0]

    def begin_many(self, jobs: list[tuple[str, PayloadSource]]) -> list[tuple[int, float] | None]:
        """:meth:`begin_attempt` for a whole batch in one round trip."""
        now = time.time()
        results = self._scripted(
            lambda pipe: [
                # records normally exist: try without the fields to create them
                pipe.evalsha(_BEGIN_SHA, 1, _key("job", job_id), now, self.job_ttl, "")
                for job_id, _ in jobs
            ]
        )
        missing = [i for i, (attempts, _) in enumerate(results) if int(attempts) == -2]
        if missing:  # a producer that called send_task without the helper
            created = []
            for i in missing:
                job_id, source = jobs[i]
                payload = source() if callable(source) else source
                created.append((job_id, json.dumps(_record_fields(job_id, payload, JobState.QUEUED))))
            again = self._scripted(
                lambda pipe: [
                    pipe.evalsha(_BEGIN_SHA, 1, _key("job", job_id), now, self.job_ttl, fields)
                    for job_id, fields in created
                ]
            )
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        out: list[tuple[int, float] | None] = []
        for attempts, enqueued_at in results:
            out.append(None if int(attempts) < 0 else (int(attempts), float(enqueued_at or now)))
        return out

    def claim_many(
        self, claims: list[tuple[str, str, str]], ttl: float
    ) -> list[tuple[bool, dict[str, dict[str, Any]]]]:
        """Claim each (account, message_id) for an attempt (its token) and read the recipients
        already delivered, for many in one round trip: (claimed, delivered) per claim."""
        seconds = max(int(ttl), 1)
        raw = self._scripted(
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
        self._scripted(
            lambda pipe: [pipe.evalsha(RELEASE_SHA, 1, _key("claim", a, m), token) for a, m, token in claims]
        )

    def _scripted(self, commands: Callable[[Any], object]) -> list[Any]:
        """Run a pipeline whose commands call the scripts by SHA, loading them if Redis lost them."""
        for attempt in (1, 2):
            with self.redis.pipeline(transaction=False) as pipe:
                commands(pipe)
                try:
                    return list(pipe.execute())
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
            self.redis.script_load(_BEGIN)
            self.redis.script_load(RELEASE_SCRIPT)
            self.redis.script_load(MARK_SCRIPT)
            self.redis.script_load(CLAIM_SCRIPT)
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_many(self, marks: list[Mark]) -> None:
        """Sent marks (recipients the server accepted, never sent again) and the claims
        given up, for (account, message_id, accepted, claim token), in one round trip."""

        def commands(pipe: Any) -> None:
            if marks:
                pipe.evalsha(*mark_command(marks, self.job_ttl))

        deadline = time.monotonic() + MARK_PATIENCE
        pause = 0.1
        while True:  # every command is idempotent: a pipeline cut short may run again
            try:
                self._scripted(commands)
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

    def uncount_attempt(self, job_id: str) -> None:
        """Take back an attempt that never reached a server (see Outcome.counts)."""
        self.redis.hincrby(_key("job", job_id), "attempts", -1)

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
        state: str,
        attempt: int,
        error: str | None = None,
        recipients: Mapping[str, Mapping[str, Any]] | None = None,
        transport: str | None = None,
        security: str | None = None,
        retry_in: float | None = None,
        counter: str | None = None,
        latency: float | None = None,
        tally: counters.Tally | None = None,
    ) -> None:
        """Queue :meth:`finish`'s commands on ``pipe`` (batches finish many in one round trip).

        ``latency``: seconds from enqueue to this outcome (the delivery-latency metric);
        ``tally``: sum the counters there instead (a batch writes them once)."""
        now = time.time()
        entry: dict[str, Any] = {
            "attempt": attempt,
            "at": now,
            "outcome": "retry" if state == JobState.RETRYING else state,
        }
        if error:
            entry["error"] = error
        if retry_in is not None:
            entry["retry_in"] = round(retry_in, 1)
        fields: dict[Any, str | int | float] = {"state": state, "updated_at": now}
        if recipients is not None:
            fields["recipients"] = json.dumps(dict(recipients))
        if transport:
            fields["transport"] = transport
        if security:
            fields["security"] = security
        if error is not None:
            fields["last_error"] = error
        # dead letters stay until purged (no TTL); the rest expire after job_ttl. EVAL, not
        # EVALSHA: callers' pipelines mix other commands, and a Redis that lost its scripts must
        # not fail a finished job's record
        pipe.eval(
            _FINISH,
            5,
            _key("job", job_id),
            _key("history", job_id),
            OPEN,
            _key("dead"),
            _key("stats", account),
            job_id,
            state,
            now,
            json.dumps(entry),
            _HISTORY_LIMIT,
            self.job_ttl,
            "0" if state in OPEN_STATES else "1",
            counter or "",
            *(part for item in fields.items() for part in item),
        )
        if state == JobState.RETRYING:
            pipe.zadd(self.retrying_key, {job_id: now + (retry_in or 0.0)})
        elif tally is not None:
            tally.done_retrying.append(job_id)
        else:
            pipe.zrem(self.retrying_key, job_id)
        if tally is not None:  # the caller writes the sums with tally.write_into(pipe)
            tally.add(account, transport=transport, outcome=state, counter=counter, latency=latency, now=now)
        else:
            counters.record_into(
                pipe, account, transport=transport, outcome=state, counter=counter, latency=latency, now=now
            )

    def hold_if_paused(self, job_id: str, account: str, kwargs: Mapping[str, Any], reason: str) -> bool:
        """The job waits in its account's held list (worker/ops/health.py releases it) — only if the
        account is paused at this very moment, checked in the same script that files it: a
        resume that drains the list just before can never leave a job behind in it. False: the
        account is not paused (any more), and the caller delivers the job now.

        A job enqueued without the producer helper has no record yet: it gets one here."""
        now = time.time()
        keys = [
            _key("paused"),
            _key("held", account),
            _key("job", job_id),
            _key("history", job_id),
            self.retrying_key,
        ]
        args: list[str | float | int] = [
            account,
            json.dumps({"id": job_id, "kwargs": dict(kwargs)}),
            json.dumps(_record_fields(job_id, kwargs, JobState.HELD)),
            now,
            reason,
            json.dumps({"at": now, "outcome": "held", "error": reason}),
            _HISTORY_LIMIT,
            job_id,
        ]
        return bool(self._hold(keys=keys, args=args))

    def stats(self, account: str) -> dict[str, int]:
        raw = cast(dict[str, str], self.redis.hgetall(_key("stats", account)))
        return {k: int(v) for k, v in raw.items()}

    # ---- auto-reply window -------------------------------------------------------

    def claim_auto_reply(self, account: str, sender: str, window: float, job_id: str) -> str | None:
        """Reserve the right to auto-reply to ``sender``; returns the job that already did."""
        key = _key("autoreply", account, sender.lower())
        if self.redis.set(key, job_id, nx=True, ex=max(int(window), 1)):
            return None
        owner = cast(str | None, self.redis.get(key))
        return None if owner == job_id else (owner or "another job")

    def release_auto_reply(self, account: str, sender: str, job_id: str) -> None:
        key = _key("autoreply", account, sender.lower())
        if self.redis.get(key) == job_id:
            self.redis.delete(key)

    # ---- dead letters --------------------------------------------------------------

    def dead_letters(self, *, limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        """Dead letters, oldest first (or the newest ``limit`` of them, newest first)."""
        end = -1 if limit is None else max(limit, 1) - 1
        ids = cast(
            list[tuple[str, float]],
            self.redis.zrange(_key("dead"), 0, end, desc=newest_first, withscores=True),
        )
        out = []
        for job_id, failed_at in ids:
            job = self.get(job_id)
            if job is None:
                continue
            out.append(
                {
                    "id": job_id,
                    "account": job.account,
                    "message_id": job.message_id,
                    "error": job.last_error,
                    "attempts": job.attempts,
                    "failed_at": failed_at,
                }
            )
        return out

    def dead_letter_ids(self, upto: float | None = None) -> list[str]:
        """Every dead letter's id, oldest first; with ``upto``, only those dead by then
        (what an operator saw: "retry all" and "purge all" leave later ones alone)."""
        return cast(
            list[str], self.redis.zrangebyscore(_key("dead"), "-inf", "+inf" if upto is None else upto)
        )

    def is_dead(self, job_id: str) -> bool:
        return self.redis.zscore(_key("dead"), job_id) is not None

    def resurrect(self, job_id: str) -> dict[str, Any]:
        """Take a dead letter out for a retry; returns its payload (same Message-ID).

        KeyError when it is not a dead letter (any more): of two callers at once (a
        double click, two operators), only the one whose removal took it gets the payload."""
        job = self.get(job_id)
        if job is None or job.payload is None or not self.redis.zrem(_key("dead"), job_id):
            raise KeyError(job_id)
        key = _key("job", job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(
                key,
                mapping={
                    "state": JobState.QUEUED,
                    "attempts": 0,
                    "updated_at": time.time(),
                    "enqueued_at": time.time(),
                },
            )
            pipe.hdel(key, "failed_at")
            pipe.zadd(OPEN, {job_id: time.time()})
            pipe.expire(key, self.job_ttl)
            pipe.expire(_key("history", job_id), self.job_ttl)
            pipe.execute()
        return job.payload

    def purge(self, job_ids: Iterable[str] | None = None) -> int:
        ids = (
            list(job_ids) if job_ids is not None else cast(list[str], self.redis.zrange(_key("dead"), 0, -1))
        )
        removed = 0
        for job_id in ids:
            if self.redis.zrem(_key("dead"), job_id):
                self.delete(job_id)
                removed += 1
        return removed

    def dead_count(self) -> int:
        return int(self.redis.zcard(_key("dead")))


def _unreadable(data: Mapping[str, str]) -> dict[str, Any] | None:
    if "raw_base64" not in data:
        return None
    size = int(data.get("raw_size") or 0)
    return {
        "size": size,
        "kept": len(base64.b64decode(data["raw_base64"])),
        "base64": data["raw_base64"],
        "queue": data.get("raw_queue") or None,
        "claimed_id": data.get("raw_claimed_id") or None,
        "task": data.get("raw_task") or None,
    }
