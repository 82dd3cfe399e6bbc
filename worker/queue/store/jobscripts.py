"""The job store's Lua scripts (worker/queue/store/jobs.py): each state change in one step.

``FINISH`` files the change's delivery event in the same script (worker/queue/events/outbox.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from worker.db.vocabulary import FINAL_STATES, lua_words
from worker.queue.store.emit import EMIT_LUA


def _lua_set(states: Iterable[str]) -> str:
    """A Lua table literal whose keys are ``states``: ``ENDED[state]`` is true for each."""
    return "{" + ", ".join(f"['{s}'] = true" for s in sorted(states)) + "}"


# The states no attempt may start from (cancelled among them: a cancel and the start of an
# attempt are decided by whichever script runs first, never both).
ENDED_LUA = "local ENDED = " + _lua_set(FINAL_STATES) + "\n"

# The start of an attempt, or the intake of a job that has no record yet (a producer that
# published without the helper: plain Celery, celery-node), or a copy that came early going back
# to waiting — one decision on the record, in one step.
# KEYS: job, open, scheduled, retrying. ARGV: now, ttl, JSON of the fields to create the record
# with when it is missing ("" = report a missing record as -2), when the job is due ("" = now:
# start the attempt; a time: it waits in the schedule until then), job id.
# Returns {attempts, enqueued_at, fence}: begun, the fence being this attempt's token (every start
# takes a new one, and FINISH writes only for the attempt holding the current one);
# {-1, state}: the job has ended; {-2}: no record; {-3, state}: it waits for its time.
BEGIN = lua_words(
    ENDED_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  if ARGV[3] == '' then return {-2, false, false} end
  for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, tostring(v)) end
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[5])
  state = $state.queued
end
if ENDED[state] then return {-1, state, false} end
if ARGV[4] ~= '' then
  if state ~= $state.queued and state ~= $state.scheduled and state ~= $state.retrying then
    return {-1, state, false}
  end
  redis.call('HSET', KEYS[1], 'state', $state.scheduled, 'updated_at', ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
  -- kept until its time and job_ttl after it (a record that expired would lose the job)
  local keep = math.ceil(tonumber(ARGV[4]) - tonumber(ARGV[1])) + tonumber(ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.max(keep, tonumber(ARGV[2])))
  return {-3, state, false}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'state', $state.sending, 'updated_at', ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[5])  -- an entry of its schedule would start it a second time
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {attempts, redis.call('HGET', KEYS[1], 'enqueued_at'), fence}
"""
)
# A job taken in (worker/queue/store/admission.py): a producer published it without the helper (plain
# Celery, celery-node), or the helper's record is here already. KEYS: job, open, scheduled,
# ready:<account>, ready-accounts, idempotency key (the job key again when it has none). ARGV:
# now, ttl, when it is due ("" = now), job id, its score in the ready set, "1" when KEYS[6] is
# its idempotency key, the account, then the record's small fields as field/value pairs. The
# payload never passes through here (a script would copy it twice, proportional to its size):
# the caller writes it with HSETNX in the same MULTI, before this script. A new record is made
# as the helper makes it (its key claimed, listed open); a job due now joins its account's
# ready set, one not due waits in the schedule (the caller rings the bell once an account).
# Returns {1, state}: ready; {-3, state}: it waits; {-1, state}: it has ended, or is held or
# under way already (a copy: nothing to do).
ADMIT = lua_words(
    ENDED_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], unpack(ARGV, 8))
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if ARGV[6] == '1' then redis.call('SET', KEYS[6], ARGV[4], 'NX', 'EX', ARGV[2]) end
  state = $state.queued
end
if ENDED[state] or (state ~= $state.queued and state ~= $state.scheduled and state ~= $state.retrying) then
  return {-1, state}
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'state', $state.scheduled, 'updated_at', ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  local keep = math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[1])) + tonumber(ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.max(keep, tonumber(ARGV[2])))
  return {-3, state}
end
redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[7])
return {1, state}
"""
)
ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
# An attempt's end on the record, in one command instead of seven a job (see finish_into).
# KEYS: job, history, open, dead, stats of the account, retrying. ARGV: job id, state, now,
# history entry, history limit, ttl, "1" when the state is final (off the open list), counter
# ("" none; "dead" counts failed too), the event type ("" none), its id and retention
# (emit.emit_args), the attempt's fence ("" = write whatever the record's), "1" to take the
# attempt back (it never reached a server), when a retry is due ("" = none), then the record's
# field/value pairs. Returns 0 and writes nothing when another attempt has started since this
# one (its fence is no longer the record's: a process that froze and woke late). The event is
# filed after the record changed: it carries the new state.
FINISH = lua_words(
    EMIT_LUA
    + """
if ARGV[12] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[12] then return 0 end
-- an end written from outside an attempt (no fence given) fences off any attempt still running
if ARGV[12] == '' and ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'fence', 1) end
redis.call('HSET', KEYS[1], unpack(ARGV, 15))
if ARGV[13] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
if ARGV[14] ~= '' then redis.call('ZADD', KEYS[6], ARGV[14], ARGV[1])
else redis.call('ZREM', KEYS[6], ARGV[1]) end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
if ARGV[7] == '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
if ARGV[2] == $state.dead then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'failed_at', ARGV[3])
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if ARGV[8] == $counter.dead then
  redis.call('HINCRBY', KEYS[5], $counter.dead, 1)
  redis.call('HINCRBY', KEYS[5], $counter.failed, 1)
elseif ARGV[8] ~= '' then
  redis.call('HINCRBY', KEYS[5], ARGV[8], 1)
end
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[9], ARGV[10], ARGV[3], ARGV[11])
return 1
"""
)
# A new job given up by its producer, all at once: record, history, open and ready entries and
# (when it is the job's own) its idempotency key. KEYS: job, history, open, ready set[, idem];
# ARGV: job id.
DISCARD = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if KEYS[5] and redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
return 1
"""
# KEYS: paused set, held list, job, history, retrying, open. ARGV: account, held entry, record
# fields (JSON, for a job without a record), now, reason, history entry, history limit, job id.
# Returns 1 (held), 0 (the account is not paused: deliver it) or -1 (the job has ended, a
# cancelled one included: it stays ended). Holding takes a new fence: no earlier attempt's
# outcome is written over it.
HOLD = lua_words(
    ENDED_LUA
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
local state = redis.call('HGET', KEYS[3], 'state')
if state and ENDED[state] then return -1 end
if not state then
  for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[3], k, tostring(v)) end
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[8])
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], 'state', $state.held, 'updated_at', ARGV[4], 'last_error', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'fence', 1)
redis.call('RPUSH', KEYS[4], ARGV[6])
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[7]), -1)
redis.call('PERSIST', KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[8])
return 1
"""
)
# A dead letter for a broker entry no job could be made of, under the producer's own job id
# when the entry carried a usable one (else an ``unreadable-…`` id): ``postroom job <that id>``
# then tells the producer what happened. An id that already has a record is left alone (a job
# of the helper's, perhaps under way: the caller files the entry under a fresh id). KEYS: job,
# history, open, dead, stats. ARGV: job id, now, JSON of the record's fields, history entry,
# event type, event id, retention. Returns 1, or 0 when the id is taken.
QUARANTINE = lua_words(
    EMIT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, tostring(v)) end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('HINCRBY', KEYS[5], $counter.dead, 1)
emit(KEYS[1], KEYS[2], ARGV[1], ARGV[5], ARGV[6], ARGV[2], ARGV[7])
return 1
"""
)
# Pipelines call the scripts by SHA: redis-py's Script objects would ask SCRIPT EXISTS on every
# pipeline (an extra round trip); a Redis that lost them (a restart) gets them loaded again.
BEGIN_SHA = hashlib.sha1(BEGIN.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
