"""The webhook outbox (contract §10): delivery events kept in Redis until a receiver took them.

An event is filed by the very script that changes the job's state (``_FINISH`` in
worker/queue/store/jobscripts.py, the cancel script in worker/queue/store/schedule.py), through
:data:`EMIT_LUA`: a job never reaches ``sent`` without its ``job.sent`` being on file, and no
crash between the two can lose one. Which webhooks want which events is read, in the same
script, from ``webhook:routes``, the table the workers publish from ``config/webhooks/``
(:func:`publish_routes`): a writer (a worker, the CLI's ``cancel``, the HTTP API) needs no
records of its own, and with no webhook configured an event costs one HGETALL of an empty key.

Keys (all under ``postroom:webhook:``)::

    routes               hash: webhook name -> {"events": [...], "accounts": [...] | null}
    events               sorted set: event id -> when it happened (``replay --since``)
    event:<id>           the event: type, time, the job's record at that moment (no payload)
    job:<job id>         list: the job's event ids (``replay JOB_ID``)
    due:<name>           sorted set: event id -> when the next attempt to that webhook is due
    delivery:<name>:<id> hash: state (pending | delivered | failed), attempts, last status
    log:<name>           list: the latest attempts to that webhook, newest first (capped)
    stats:<name>         hash: delivered, failed (attempts), given_up

Events, deliveries and job lists expire after ``webhook_retention`` (settings). The sender
(worker/queue/events/webhook_sender.py) takes due deliveries with a lease (:meth:`Outbox.take`): one
whose sender died is taken again when its lease ends, under the same ``webhook-id``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.queue.store.emit import EVENTS, ROUTES, delivery_key, due_key, event_key, job_events_key
from worker.queue.store.jobrecord import Job

LOG_LIMIT = 200


def log_key(name: str) -> str:
    return redis_key("webhook", "log", name)


def stats_key(name: str) -> str:
    return redis_key("webhook", "stats", name)


def routes_table(routes: Mapping[str, Mapping[str, Any]]) -> dict[Any, Any]:
    """The ``webhook:routes`` hash for ``routes`` (webhook name -> :meth:`Webhook.route`)."""
    return {name: json.dumps(dict(route), sort_keys=True) for name, route in routes.items()}


def publish_routes(client: redis.Redis, routes: Mapping[str, Mapping[str, Any]]) -> None:
    """Make ``routes`` the table events are filed by (the sender does the same, async)."""
    table = routes_table(routes)
    with client.pipeline() as pipe:  # MULTI/EXEC: no script sees half a table
        pipe.delete(ROUTES)
        if table:
            pipe.hset(ROUTES, mapping=table)
        pipe.execute()


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_body(event: Mapping[str, Any]) -> bytes:
    """The request body (contract §10): ``{type, timestamp, data}``, ``data`` the job as
    ``postroom job --json`` showed it at the moment of the event."""
    record = event.get("record")
    history = event.get("history")
    job = Job.from_record(
        str(event.get("job_id", "")),
        cast(dict[str, str], record if isinstance(record, dict) else {}),
        [h for h in history if isinstance(h, str)] if isinstance(history, list) else [],
    )
    body = {"type": event.get("type"), "timestamp": iso(float(event.get("at") or 0)), "data": job.as_dict()}
    return json.dumps(body, separators=(",", ":")).encode()


# KEYS: due. ARGV: now, lease, limit. Due event ids, each pushed a lease ahead (taken).
TAKE_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id) end
return ids
"""
# KEYS: delivery, due, log, stats. ARGV: event id, now, outcome (delivered | retry | failed),
# next due (retry), log entry, log limit, status, error, retention. A delivery already
# delivered stays so (a slow sender whose lease ran out must not put it back).
DONE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') == 'delivered' then return 0 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_at', ARGV[2], 'last_status', ARGV[7], 'last_error', ARGV[8])
if ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'next_at', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'failed', 1)
else
  redis.call('HSET', KEYS[1], 'state', ARGV[3])
  redis.call('HDEL', KEYS[1], 'next_at')
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] == 'delivered' then redis.call('HINCRBY', KEYS[4], 'delivered', 1)
  else redis.call('HINCRBY', KEYS[4], 'failed', 1); redis.call('HINCRBY', KEYS[4], 'given_up', 1) end
end
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('LPUSH', KEYS[3], ARGV[5])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
return attempts
"""
# KEYS: delivery, due. ARGV: event id, now, retention, type, job id, account. Back to pending,
# due now, with a fresh retry window (an operator's replay).
_REPLAY = """
redis.call('HSET', KEYS[1], 'state', 'pending', 'created_at', ARGV[2], 'type', ARGV[4],
  'job_id', ARGV[5], 'account', ARGV[6])
redis.call('HDEL', KEYS[1], 'next_at')
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


class Outbox:
    """The outbox's reads and writes outside the state-changing scripts (synchronous: the CLI,
    the HTTP side and the dashboard; the sender has its async twin of :meth:`take`/:meth:`done`)."""

    def __init__(self, client: redis.Redis, retention: float = 7 * 86400.0) -> None:
        self.redis = client
        self.retention = max(int(retention), 60)

    def event(self, event_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(event_key(event_id))
        return parse_event(raw)

    def events_since(self, since: float, limit: int = 10_000) -> list[str]:
        ids = self.redis.zrangebyscore(EVENTS, since, "+inf", start=0, num=limit)
        return [_text(i) for i in cast(list[Any], ids)]

    def events_of_job(self, job_id: str) -> list[str]:
        return [_text(i) for i in cast(list[Any], self.redis.lrange(job_events_key(job_id), 0, -1))]

    def replay(self, event_ids: Iterable[str], only: str | None = None) -> list[tuple[str, str]]:
        """Deliver these events again (to ``only``, or to every webhook each was filed for),
        under their own ids: (webhook, event id) of each delivery put back."""
        done: list[tuple[str, str]] = []
        now = time.time()
        for event_id in event_ids:
            event = self.event(event_id)
            if event is None:
                continue
            targets = [only] if only else [str(t) for t in event.get("webhooks") or []]
            for name in targets:
                args = [event_id, now, self.retention, event.get("type", ""), event.get("job_id", ""),
                        event.get("account", "")]  # fmt: skip
                self.redis.eval(_REPLAY, 2, delivery_key(name, event_id), due_key(name), *args)
                done.append((name, event_id))
        return done

    def stats(self, name: str) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(stats_key(name))
            pipe.zcard(due_key(name))
            raw, pending = pipe.execute()
        counts = {_text(k): int(v) for k, v in cast(dict[Any, Any], raw).items()}
        return {
            "pending": int(pending),
            "delivered": counts.get("delivered", 0),
            "failed_attempts": counts.get("failed", 0),
            "given_up": counts.get("given_up", 0),
        }

    def attempts(self, name: str, limit: int = 50, account: str | None = None) -> list[dict[str, Any]]:
        """The latest attempts to webhook ``name``, newest first (of ``account``'s jobs only)."""
        out = []
        for raw in cast(list[Any], self.redis.lrange(log_key(name), 0, LOG_LIMIT - 1)):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and (account is None or entry.get("account") == account):
                out.append(entry)
            if len(out) >= limit:
                break
        return out


def parse_event(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
