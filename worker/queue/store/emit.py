"""How a state-changing script files its delivery event (contract §10), in the same script as
the change: :data:`EMIT_LUA` (a Lua function the store's scripts start with) and
:func:`emit_args` (what they pass it). The outbox that keeps and hands out the events is
worker/queue/events/outbox.py; this is the part the store's scripts need, so the store never
imports the events room.
"""

from __future__ import annotations

import uuid

from worker.db.keys import PREFIX, redis_key
from worker.db.vocabulary import EVENT_OF_STATE

ROUTES = redis_key("webhook", "routes")
EVENTS = redis_key("webhook", "events")

# The record fields an event carries: those `postroom job --json` shows, never the payload.
SNAPSHOT_FIELDS = (
    "id", "state", "attempts", "account", "transport", "security", "message_id", "recipients",
    "last_error", "kind", "created_at", "updated_at", "enqueued_at", "idempotency_key", "trace_id",
)  # fmt: skip


def event_key(event_id: str) -> str:
    return redis_key("webhook", "event", event_id)


def job_events_key(job_id: str) -> str:
    return redis_key("webhook", "job", job_id)


def due_key(name: str) -> str:
    return redis_key("webhook", "due", name)


def delivery_key(name: str, event_id: str) -> str:
    return redis_key("webhook", "delivery", name, event_id)


def new_event_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


# A Lua function the state-changing scripts start with: emit(job key, history key, job id,
# event type, event id, now, retention) files the event for every webhook that wants it.
EMIT_LUA = (
    """
local function emit(jobkey, histkey, jobid, etype, evid, now, retention)
  if etype == '' then return end
  local routes = redis.call('HGETALL', '@routes')
  if #routes == 0 then return end
  local account = redis.call('HGET', jobkey, 'account') or ''
  local targets = {}
  for i = 1, #routes, 2 do
    local ok, route = pcall(cjson.decode, routes[i + 1])
    if ok and type(route) == 'table' then
      local wanted = false
      for _, e in ipairs(route.events or {}) do if e == etype then wanted = true end end
      if wanted and type(route.accounts) == 'table' then
        wanted = false
        for _, a in ipairs(route.accounts) do if a == account then wanted = true end end
      end
      if wanted then targets[#targets + 1] = routes[i] end
    end
  end
  if #targets == 0 then return end
  local names = {@fields}
  local values = redis.call('HMGET', jobkey, unpack(names))
  local record = {}
  for i, name in ipairs(names) do if values[i] then record[name] = values[i] end end
  local event = cjson.encode({id = evid, type = etype, at = now, job_id = jobid, account = account,
    record = record, history = redis.call('LRANGE', histkey, 0, -1), webhooks = targets})
  redis.call('SET', '@event' .. evid, event, 'EX', retention)
  redis.call('ZADD', '@events', now, evid)
  redis.call('RPUSH', '@job' .. jobid, evid)
  redis.call('EXPIRE', '@job' .. jobid, retention)
  for _, name in ipairs(targets) do
    redis.call('ZADD', '@due' .. name, now, evid)
    local d = '@delivery' .. name .. ':' .. evid
    redis.call('HSET', d, 'state', 'pending', 'attempts', 0, 'created_at', now, 'type', etype,
      'job_id', jobid, 'account', account)
    redis.call('EXPIRE', d, retention)
  end
end
""".replace("@routes", ROUTES)
    .replace("@events", EVENTS)
    .replace("@fields", ", ".join(f"'{f}'" for f in SNAPSHOT_FIELDS))
    .replace("@event", PREFIX + "webhook:event:")
    .replace("@job", PREFIX + "webhook:job:")
    .replace("@due", PREFIX + "webhook:due:")
    .replace("@delivery", PREFIX + "webhook:delivery:")
)


def emit_args(state: str, retention: float) -> tuple[str, str, int]:
    """The ARGV a state-changing script passes to ``emit``: event type ("" for a state that
    files none), a fresh event id, the retention in seconds."""
    event_type = EVENT_OF_STATE.get(state, "")
    return event_type, new_event_id() if event_type else "", max(int(retention), 60)
