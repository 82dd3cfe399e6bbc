"""Postroom's own delay queue: a job waiting for its retry or its send_at waits in Redis, not in a
worker.

A job that must try again later is only a member of ``postroom:retrying`` (a sorted set of job
ids by due time), written in the same script as its record's ``retrying`` state (FINISH,
worker/queue/store/jobscripts.py); a scheduled send is a member of ``postroom:scheduled``
(worker/queue/store/schedule.py). Its payload is in its record. Retries, limit waits (a rate or a
connection slot not free yet) and claim waits all go this way.

Every worker process's upkeep thread (worker/queue/process/liveness.py) runs :meth:`DelayQueue.move_due`
every :data:`POLL` seconds: one script moves the due jobs into their accounts' ready sets
(worker/queue/store/ready.py), scored by when they came due less ``ready.AHEAD`` — ahead of every job
that arrived the ordinary way, so a due retry or send_at never waits behind a backlog — and
rings the dispatchers' bell. A job
whose record is no longer waiting (it ended, was cancelled, or was retried by hand) is only
dropped. Moving is one atomic step: no job is half-moved when a worker dies.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import lua_words
from worker.queue.store.jobrecord import SCHEDULED
from worker.queue.store.jobs import JobStore
from worker.queue.store.ready import AHEAD, BELL, READY_ACCOUNTS, ready_key

log = logging.getLogger("postroom.delays")

RETRYING = JobStore.retrying_key
MOVING = redis_key("retrying", "moving")  # (used by releases before the ready sets; only cleared)
POLL = 0.5  # seconds between looks for due jobs: a retry runs at most about this late
BATCH = 200

# KEYS: the waiting set (retrying or scheduled), ready-accounts. ARGV: now, limit, bell channel.
# Returns the ids moved to their ready sets.
_MOVE_DUE = lua_words(
    """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local moved = {}
for i = 1, #due, 2 do
  local id, at = due[i], due[i + 1]
  redis.call('ZREM', KEYS[1], id)
  local job = '@job' .. id
  local state = redis.call('HGET', job, 'state')
  if state == $state.retrying or state == $state.scheduled then
    local account = redis.call('HGET', job, 'account') or ''
    redis.call('HSET', job, 'state', $state.queued)
    redis.call('ZADD', '@ready' .. account, 'NX', tonumber(at) - @ahead, id)
    redis.call('SADD', KEYS[2], account)
    moved[#moved + 1] = id
  end
end
if #moved > 0 then redis.call('PUBLISH', ARGV[3], 'due') end
return moved
""".replace("@job", redis_key("job", ""))
    .replace("@ready", ready_key(""))
    .replace("@ahead", f"{AHEAD:.0f}")
)


class DelayQueue:
    """Moves due jobs from Postroom's delay queue to their ready sets."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._move = client.register_script(_MOVE_DUE)

    def move_due(self, now: float | None = None, *, limit: int = BATCH) -> list[str]:
        """Make every job due by ``now`` ready (at most ``limit`` of each kind); returns their ids."""
        now = time.time() if now is None else now
        moved = [  # retries, then scheduled sends (worker/queue/store/schedule.py) that came due
            _text(j)
            for source in (RETRYING, SCHEDULED)
            for j in cast(list[Any], self._move(keys=[source, READY_ACCOUNTS], args=[now, limit, BELL]))
        ]
        return moved

    def waiting(self) -> int:
        """Jobs waiting for their retry."""
        return int(self.client.zcard(RETRYING))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
