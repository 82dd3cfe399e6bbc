"""A job's record: its states, the fields a new record starts with, and :class:`Job`, the
record as ``postroom job --json``, the HTTP API and the dashboard read it.

Pure code (no Redis): the store (worker/queue/store/jobs.py) writes these fields, everything
else reads them through :class:`Job`. Safe for any payload, validated or not: what a
producer wrote never becomes a key, a label or a field unchecked.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from worker.db.keys import redis_key
from worker.db.vocabulary import JobState, history_word
from worker.ops import counters
from worker.ops.tracing import trace_id_of

OPEN = redis_key("open")  # sorted set: jobs not ended yet, by enqueue time (worker/queue/process/sweep.py)
DEAD = redis_key("dead")  # sorted set: dead-lettered job ids, by when they died
SCHEDULED = redis_key(
    "scheduled"
)  # sorted set: jobs waiting for their send_at (worker/queue/store/schedule.py)


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


def describe(error: ValidationError) -> str:
    """A payload's validation errors as a dead letter's reason: ``field.0: what is wrong; …``."""
    parts = []
    for item in error.errors(include_input=False, include_url=False)[:20]:
        where = ".".join(safe_text(p, 40) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {safe_text(item['msg'].removeprefix('Value error, '), 300)}")
    return "; ".join(parts)


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


def record_fields(
    job_id: str, payload: Mapping[str, Any], state: str, submitted_by: str = "", traceparent: str = ""
) -> dict[Any, str | int | float]:
    """A new job record from a payload; safe for any payload (it may not have been validated).

    ``traceparent``: the span that made the job (worker/ops/tracing.py), which its attempts
    continue; kept with its trace id only when there is one."""
    now = time.time()
    kind = payload.get("kind", "notification")
    message_id, key = payload.get("message_id"), payload.get("idempotency_key")
    trace = {"traceparent": traceparent, "trace_id": trace_id_of(traceparent)} if traceparent else {}
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
        # a scheduled job's clock (Date, max_age, latency) starts at its send_at
        "enqueued_at": _timestamp(
            payload.get("enqueued_at"), max(now, _timestamp(payload.get("send_at"), 0.0))
        ),
        "submitted_by": submitted_by,  # the HTTP API key that enqueued it ("" otherwise)
        **trace,
    }


@dataclass
class Job:
    """A job record as ``postroom job ID --json`` shows it (contract §8 keys)."""

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
    due_at: float | None = None  # when a scheduled job is sent / a retrying job tried again
    trace_id: str | None = None  # its OpenTelemetry trace (docs/tracing.md); None: not traced

    def cancelled(self) -> dict[str, Any] | None:
        """``{at, by}`` of a cancelled job (``by`` None when unknown): an end an operator or a
        producer chose, not an error, so it is shown apart from ``last_error``."""
        if self.state != JobState.CANCELLED:
            return None
        word = history_word(JobState.CANCELLED)
        ends = [e for e in self.history or [] if e.get("outcome") == word]
        entry: dict[str, Any] = ends[-1] if ends else {}
        by = entry.get("by")
        if by is None and str(entry.get("error") or "").startswith("cancelled by "):
            by = str(entry["error"]).removeprefix("cancelled by ")  # entries before "by" was kept
        return {"at": entry.get("at") or self.updated_at, "by": by or None}

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
            "due_at": self.due_at,
            "cancelled": self.cancelled(),
            "trace_id": self.trace_id,
        }
        if self.unreadable is not None:
            out["unreadable"] = self.unreadable
        if with_payload:
            out["payload"] = self.payload
        return out

    @classmethod
    def from_record(
        cls, job_id: str, data: Mapping[str, str], history: list[str], *, due_at: float | None = None
    ) -> Job:
        """The job from its record hash and its history list as Redis holds them (``due_at``: its
        score in the schedule or the retry queue, kept there, not in the record)."""
        return cls(
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
            due_at=float(due_at) if due_at is not None else None,
            trace_id=data.get("trace_id") or None,
        )


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
