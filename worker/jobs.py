"""Job records, duplicate suppression and dead letters, kept in Redis.

Keys (all under ``postroom:``)::

    job:<id>                 hash: state, attempts, account, message_id, recipients, last_error, …
    delivered:<message_id>   hash: recipient -> JSON result, written right after the server's 250
    claim:<message_id>       the attempt currently talking to a server (expires on its own)
    idem:<account>:<key>     job id that owns an idempotency key
    dead                     sorted set of dead-lettered job ids by time
    autoreply:<account>:<to> set when an auto-reply went to that sender (expires after the window)
    stats:<account>          hash: sent / failed / retried / dead / suppressed counters

Everything stored is secret-free by construction: payloads carry account
names, errors carry server replies.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from worker.errors import RecipientStatus

PREFIX = "postroom:"
STATES = ("queued", "sending", "sent", "retrying", "dead", "suppressed", "partial")
_HISTORY_LIMIT = 50


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def new_job_id() -> str:
    return str(uuid.uuid4())


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
        if with_payload:
            out["payload"] = self.payload
        return out


class JobStore:
    """Synchronous access to job state (called from task threads and the CLI)."""

    def __init__(self, client: redis.Redis, *, job_ttl: float = 14 * 86400.0) -> None:
        self.redis = client
        self.job_ttl = int(job_ttl)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), **kwargs)

    # ---- enqueue side ----------------------------------------------------------

    def claim_idempotency_key(self, account: str, key: str, job_id: str) -> str | None:
        """Reserve ``key`` for ``job_id``; returns the job that already owns it, if any."""
        idem = _key("idem", account, key)
        if self.redis.set(idem, job_id, nx=True, ex=self.job_ttl):
            return None
        owner = cast(str | None, self.redis.get(idem))
        return owner if owner is not None else self.claim_idempotency_key(account, key, job_id)

    def release_idempotency_key(self, account: str, key: str, job_id: str) -> None:
        idem = _key("idem", account, key)
        if self.redis.get(idem) == job_id:
            self.redis.delete(idem)

    def create(self, job_id: str, payload: Mapping[str, Any], *, state: str = "queued") -> None:
        now = time.time()
        fields: dict[Any, str | int | float] = {
            "id": job_id,
            "state": state,
            "attempts": 0,
            "account": payload["account"],
            "kind": payload.get("kind", "notification"),
            "message_id": payload.get("message_id") or "",
            "idempotency_key": payload.get("idempotency_key") or "",
            "payload": json.dumps(dict(payload)),
            "recipients": "{}",
            "created_at": now,
            "updated_at": now,
            "enqueued_at": payload.get("enqueued_at") or now,
            "history": "[]",
        }
        key = _key("job", job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.job_ttl)
            pipe.execute()

    def delete(self, job_id: str) -> None:
        self.redis.delete(_key("job", job_id))

    # ---- reading ---------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        data = cast(dict[str, str], self.redis.hgetall(_key("job", job_id)))
        if not data:
            return None
        return Job(
            id=data.get("id", job_id),
            state=data.get("state", "queued"),
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
            history=json.loads(data.get("history") or "[]"),
            payload=json.loads(data["payload"]) if data.get("payload") else None,
        )

    # ---- execution side -----------------------------------------------------------

    def begin_attempt(self, job_id: str, payload: Mapping[str, Any]) -> tuple[int, float]:
        """Mark the job ``sending`` and count the attempt; creates the record if a
        producer enqueued without the helper. Returns (attempt number, enqueued at)."""
        key = _key("job", job_id)
        if not self.redis.exists(key):
            self.create(job_id, payload)
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, "attempts", 1)
            pipe.hset(key, mapping={"state": "sending", "updated_at": time.time()})
            pipe.expire(key, self.job_ttl)
            pipe.hget(key, "enqueued_at")
            attempts, _, _, enqueued_at = pipe.execute()
        return int(attempts), float(enqueued_at or time.time())

    def note_message_id(self, job_id: str, message_id: str) -> None:
        self.redis.hset(_key("job", job_id), "message_id", message_id)

    def delivered(self, message_id: str) -> dict[str, dict[str, Any]]:
        """Recipients a server already accepted for this Message-ID (never sent again)."""
        raw = cast(dict[str, str], self.redis.hgetall(_key("delivered", message_id)))
        return {rcpt: json.loads(value) for rcpt, value in raw.items()}

    def claim_send(self, message_id: str, token: str, ttl: float) -> bool:
        """Only one attempt at a time may talk to a server about one Message-ID."""
        return bool(self.redis.set(_key("claim", message_id), token, nx=True, ex=max(int(ttl), 1)))

    def claim_remaining(self, message_id: str) -> float:
        """Seconds until the current claim on ``message_id`` expires (0 when there is none)."""
        ttl = int(self.redis.pttl(_key("claim", message_id)))
        return max(ttl, 0) / 1000.0

    def uncount_attempt(self, job_id: str) -> None:
        """Take back an attempt that never reached a server (see Outcome.counts)."""
        self.redis.hincrby(_key("job", job_id), "attempts", -1)

    def release_send(self, message_id: str, token: str) -> None:
        key = _key("claim", message_id)
        # compare-and-delete: never release a claim another attempt took over
        self.redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1,
            key,
            token,
        )

    def mark_delivered(self, message_id: str, accepted: Mapping[str, RecipientStatus]) -> None:
        """Called right after the server's 250: from now on these recipients are done."""
        if not accepted:
            return
        key = _key("delivered", message_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={a: json.dumps(r.as_dict()) for a, r in accepted.items()})
            pipe.expire(key, self.job_ttl)
            pipe.execute()

    def record_attempt(
        self,
        job_id: str,
        *,
        state: str,
        attempt: int,
        recipients: Mapping[str, Mapping[str, Any]] | None = None,
        transport: str | None = None,
        security: str | None = None,
        error: str | None = None,
        outcome: str,
        duration: float | None = None,
        retry_in: float | None = None,
    ) -> None:
        key = _key("job", job_id)
        current = cast(str | None, self.redis.hget(key, "history"))
        history: list[dict[str, Any]] = json.loads(current or "[]")
        entry: dict[str, Any] = {"attempt": attempt, "at": time.time(), "outcome": outcome}
        if error:
            entry["error"] = error
        if duration is not None:
            entry["duration_ms"] = round(duration * 1000)
        if retry_in is not None:
            entry["retry_in"] = round(retry_in, 1)
        history = [*history, entry][-_HISTORY_LIMIT:]
        fields: dict[Any, str | int | float] = {
            "state": state,
            "updated_at": time.time(),
            "history": json.dumps(history),
        }
        if recipients is not None:
            fields["recipients"] = json.dumps(dict(recipients))
        if transport:
            fields["transport"] = transport
        if security:
            fields["security"] = security
        if error is not None:
            fields["last_error"] = error
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.job_ttl)
            pipe.execute()

    def count(self, account: str, outcome: str, amount: int = 1) -> None:
        self.redis.hincrby(_key("stats", account), outcome, amount)

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

    def bury(self, job_id: str, error: str) -> None:
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.zadd(_key("dead"), {job_id: now})
            pipe.hset(_key("job", job_id), mapping={"state": "dead", "failed_at": now, "last_error": error})
            pipe.persist(_key("job", job_id))  # dead letters stay until purged
            pipe.execute()

    def dead_letters(self) -> list[dict[str, Any]]:
        ids = cast(list[tuple[str, float]], self.redis.zrange(_key("dead"), 0, -1, withscores=True))
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

    def is_dead(self, job_id: str) -> bool:
        return self.redis.zscore(_key("dead"), job_id) is not None

    def resurrect(self, job_id: str) -> dict[str, Any]:
        """Take a dead letter out for a retry; returns its payload (same Message-ID)."""
        job = self.get(job_id)
        if job is None or not self.is_dead(job_id) or job.payload is None:
            raise KeyError(job_id)
        key = _key("job", job_id)
        with self.redis.pipeline() as pipe:
            pipe.zrem(_key("dead"), job_id)
            pipe.hset(
                key,
                mapping={
                    "state": "queued",
                    "attempts": 0,
                    "updated_at": time.time(),
                    "enqueued_at": time.time(),
                },
            )
            pipe.hdel(key, "failed_at")
            pipe.expire(key, self.job_ttl)
            pipe.execute()
        return job.payload

    def purge(self, job_ids: Iterable[str] | None = None) -> int:
        ids = (
            list(job_ids) if job_ids is not None else cast(list[str], self.redis.zrange(_key("dead"), 0, -1))
        )
        removed = 0
        for job_id in ids:
            if self.redis.zrem(_key("dead"), job_id):
                self.redis.delete(_key("job", job_id))
                removed += 1
        return removed

    def dead_count(self) -> int:
        return int(self.redis.zcard(_key("dead")))
