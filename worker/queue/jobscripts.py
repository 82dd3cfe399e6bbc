"""The job store's Lua scripts (worker/queue/jobs.py): each state change in one step.

``FINISH`` files the change's delivery event in the same script (worker/queue/outbox.py).
"""

from __future__ import annotations

import hashlib

from worker.queue.outbox import EMIT_LUA

# KEYS[1] job hash; ARGV: now, ttl, JSON of the fields to create the record with when missing
# (empty: report a missing record as -2 instead; -1 means the job already ended).
BEGIN = """
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
# counts failed too), the event type ("" none), its id and retention (outbox.emit_args), then the
# record's field/value pairs. The event is filed after the record changed: it carries the new state.
FINISH = (
    EMIT_LUA
    + """
for i = 12, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
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
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[9], ARGV[10], ARGV[3], ARGV[11])
return 1
"""
)
# A new job given up by its producer, all at once: record, history, open entry and (when it is
# the job's own) its idempotency key. KEYS: job, history, open[, idem]; ARGV: job id.
DISCARD = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""
# KEYS: paused set, held list, job, history, retrying. ARGV: account, held entry, record fields
# (JSON, for a job without a record), now, reason, history entry, history limit, job id.
HOLD = """
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
BEGIN_SHA = hashlib.sha1(BEGIN.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
