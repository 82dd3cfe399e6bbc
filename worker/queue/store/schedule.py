"""Scheduled sends and cancelling (contract §2 ``send_at``, ``postroom cancel``).

A job with ``send_at`` in the future is recorded ``scheduled`` and, in the same MULTI/EXEC,
added to ``postroom:scheduled`` (a sorted set of job ids by due time) instead of being
published: it waits in Redis, never in a worker or the broker, so no worker kill, restart
or visibility timeout can lose it or send it early (long Celery ETAs are redelivered after
the visibility timeout: celery#7009). The delay queue's mover (worker/queue/store/delays.py)
publishes it when it is due, as it does a retry; a copy that reaches a worker early
anyway goes back to waiting (worker/queue/store/jobscripts.py ``BEGIN``), and so does a job a
producer published with a future send_at without the helper (plain Celery, celery-node):
the first worker that reads it records it ``scheduled``.

:func:`cancel` ends a job that has not started sending (``queued``, ``scheduled``,
``retrying`` or ``held``) as ``cancelled``, in one script. Cancel and the start of an attempt
are one decision on the record: whichever script runs first wins, so a job is either cancelled
(and never sent: the start of an attempt, a hold and a resume all refuse an ended job) or
already ``sending`` (and the answer says so), never both. A message of a cancelled job still in
the broker finds the job ended and does nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import JobState, history_word, lua_words
from worker.queue.store.emit import EMIT_LUA, emit_args
from worker.queue.store.jobrecord import OPEN, SCHEDULED

CANCELLABLE = (JobState.QUEUED, JobState.SCHEDULED, JobState.RETRYING, JobState.HELD)

# KEYS: record, history, open, scheduled, retrying, moving. ARGV: job id, now, history entry,
# ttl, event type, event id, event retention (emit.emit_args), the cancellable states...
# Returns {1, state before} or {0, state (or "")}. The job.cancelled event is filed with it.
# A job is under way while an attempt holds its Message-ID claim (a copy of it may have begun
# and ended while another one still sends), and partly sent once a recipient is marked
# delivered: either answers no, whatever the record's state says. The claim and mark keys are
# named from the record (worker/queue/store/marks.py), read in the same step as the decision.
_CANCEL = lua_words(
    EMIT_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
local ok = false
for i = 8, #ARGV do if state == ARGV[i] then ok = true end end
if not ok then return {0, state} end
local account = redis.call('HGET', KEYS[1], 'account') or ''
local mid = redis.call('HGET', KEYS[1], 'message_id') or ''
if mid ~= '' then
  if redis.call('EXISTS', '@claim' .. account .. ':' .. mid, '@claim' .. mid) > 0 then
    return {0, $state.sending}
  end
  if redis.call('EXISTS', '@delivered' .. account .. ':' .. mid, '@delivered' .. mid) > 0 then
    return {0, 'partly sent'}
  end
end
redis.call('ZREM', '@ready' .. account, ARGV[1])  -- its place in its account's ready set
redis.call('HSET', KEYS[1], 'state', $state.cancelled, 'updated_at', ARGV[2], 'last_error', $state.cancelled)
redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('RPUSH', KEYS[2], ARGV[3])
for i = 3, 6 do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[5], ARGV[6], ARGV[2], ARGV[7])
return {1, state}
""".replace("@claim", redis_key("claim", ""))
    .replace("@delivered", redis_key("delivered", ""))
    .replace("@ready", redis_key("ready", ""))
)


def cancel(
    client: redis.Redis, job_id: str, job_ttl: float, *, by: str = "", event_retention: float = 7 * 86400.0
) -> tuple[bool, str]:
    """Cancel ``job_id`` if it has not started sending: (cancelled, its state before or now —
    ``sending`` while an attempt holds its claim, ``partly sent`` once a recipient took it —
    "" when there is no such job)."""
    from worker.queue.store.delays import MOVING, RETRYING

    now = time.time()
    entry = {"attempt": 0, "at": now, "outcome": history_word(JobState.CANCELLED), "error": "cancelled"}
    if by:
        entry["error"] = f"cancelled by {by}"
        entry["by"] = by  # who, as postroom job shows it
    keys = [redis_key("job", job_id), redis_key("history", job_id), OPEN, SCHEDULED, RETRYING, MOVING]
    events = emit_args(JobState.CANCELLED, event_retention)
    args: list[Any] = [job_id, now, json.dumps(entry), max(int(job_ttl), 1), *events, *CANCELLABLE]
    done, state = cast(list[Any], client.eval(_CANCEL, len(keys), *keys, *args))
    text = state.decode() if isinstance(state, bytes) else str(state)
    return bool(done), text


def scheduled_count(client: redis.Redis) -> int:
    return int(client.zcard(SCHEDULED))
