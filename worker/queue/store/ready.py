"""Postroom's own ready queues: the jobs due now, one sorted set per account, taken by workers.

Every job that is due — whatever produced it (the helper, the HTTP API, a plain Celery or
celery-node message taken in by worker/queue/broker/inbox.py), a retry or a scheduled send whose time
came (worker/queue/store/delays.py), a held job released, a dead letter retried — is one member of
``ready:<account>`` (scored by when it became due: oldest first; a job that already waited its
turn — a retry, a send_at reached, one given back — ahead of those, :data:`AHEAD`) and its
account a member of ``ready-accounts``. Its payload is in its record (``job:<id>``) only: stored once.

A worker process's dispatcher (worker/queue/pipeline/dispatch.py) takes up to ``coalesce`` jobs at a time,
fairly across the accounts that have room in it, in one script (:data:`TAKE`): O(jobs taken +
accounts waiting), never O(queue depth) and never reading a body. What it takes it holds in
``taken:<holder>`` (job id → account) until the attempt is recorded; a holder that stops
beating (worker/queue/process/liveness.py) has its jobs put back by any worker's reaper, each counted as
a run cut short (so a job that kills its worker runs alone, and after ``max_attempts`` such runs
is dead-lettered). Keys (under ``postroom:``)::

    ready:<account>   sorted set: job id -> when it became due
    ready-accounts    set: the accounts with a job in their ready set
    taken:<holder>    hash: job id -> account (+ " running"), what one worker process holds
    bell              pub/sub channel: work arrived (dispatchers wake at once instead of polling)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import lua_words

READY_ACCOUNTS = redis_key("ready-accounts")
BELL = redis_key("bell")
# A job that already waited its turn (given back by a holder that died, a retry or a scheduled
# send whose time came, a released hold, a dead letter retried) is scored this much lower than
# the time it became ready: ahead of every job that arrived the ordinary way, oldest first among
# its kind. Behind a deep backlog it would wait for all of it (minutes), and a dead worker's jobs
# must run again within a minute whatever the depth.
AHEAD = 1e10


def ready_key(account: str) -> str:
    return redis_key("ready", account)


def taken_key(holder: str) -> str:
    return redis_key("taken", holder)


# KEYS: ready-accounts, taken:<holder>. ARGV: most jobs to take, where to start in the accounts'
# order (rotated by every take, so no account always goes first), the room of an account not
# in ARGV[4], JSON {account: room}. The first pass takes each account's even share of the
# total, the second fills what is left; an account whose ready set empties leaves the index.
# A job whose last run died (cut_short > 0: it will run alone, after everything else here) is
# held as waiting; every other one as running at once (its group starts right away: should the
# process die now, the run is counted). Returns job id, account, cut_short, job id, ...
TAKE = """
local accounts = redis.call('SMEMBERS', KEYS[1])
local n = #accounts
if n == 0 then return {} end
table.sort(accounts)
local max, offset, default = tonumber(ARGV[1]), tonumber(ARGV[2]) % n, tonumber(ARGV[3])
local room = cjson.decode(ARGV[4])
local share = math.ceil(max / n)
local out, taken = {}, 0
for pass = 1, 2 do
  for k = 0, n - 1 do
    if taken >= max then break end
    local account = accounts[((offset + k) % n) + 1]
    local left = room[account]
    if left == nil then left = default end
    local want = math.min(left, max - taken)
    if pass == 1 then want = math.min(want, share) end
    if want > 0 then
      local key = '@ready' .. account
      local got = redis.call('ZPOPMIN', key, want)
      for i = 1, #got, 2 do
        local cut = redis.call('HGET', '@job' .. got[i], 'cut_short') or '0'
        redis.call('HSET', KEYS[2], got[i], cut == '0' and (account .. ' running') or account)
        out[#out + 1] = got[i]
        out[#out + 1] = account
        out[#out + 1] = cut
        taken = taken + 1
      end
      room[account] = left - #got / 2
      if redis.call('EXISTS', key) == 0 then redis.call('SREM', KEYS[1], account) end
    end
  end
end
return out
""".replace("@ready", ready_key("")).replace("@job", redis_key("job", ""))

# Jobs a holder held, back to their ready sets: KEYS: taken:<holder>, ready-accounts. ARGV: score
# (now - AHEAD), "1" to count a run cut short for each job that was running (its holder died, or
# gave up on it past the time limit; a job only waiting for its turn in that process is not
# counted), then the job ids (none: every one the holder held). Only a job still waiting to
# start or caught mid-attempt ("queued", "sending") goes back; one that waits elsewhere (retrying, scheduled,
# held) or has ended is only let go. A taken entry's value is its account, followed by
# " running" once its group started (:meth:`ReadyQueues.running_into`). Returns how many went back.
RESTORE = lua_words(
    """
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('HKEYS', KEYS[1])
end
local n = 0
for _, id in ipairs(ids) do
  local held = redis.call('HGET', KEYS[1], id)
  if held then
    local space = string.find(held, ' ', 1, true)
    local account = space and string.sub(held, 1, space - 1) or held
    redis.call('HDEL', KEYS[1], id)
    local job = '@job' .. id
    local state = redis.call('HGET', job, 'state')
    if state == $state.queued or state == $state.sending then
      if ARGV[2] == '1' and space then redis.call('HINCRBY', job, 'cut_short', 1) end
      redis.call('ZADD', '@ready' .. account, 'NX', ARGV[1], id)
      redis.call('SADD', KEYS[2], account)
      n = n + 1
    end
  end
end
if n > 0 then redis.call('PUBLISH', '@bell', 'restored') end
return n
""".replace("@ready", ready_key(""))
    .replace("@job", redis_key("job", ""))
    .replace("@bell", BELL)
)


# A job back in its ready set, ``queued`` again — only if its state is one of ARGV[5..] (a held job
# cancelled meanwhile stays cancelled). KEYS: job, ready:<account>, ready-accounts. ARGV: job id,
# score (now - AHEAD), account, bell channel, the states it may come from. Returns 1 when it was
# made ready.
MAKE_READY = lua_words("""
local state = redis.call('HGET', KEYS[1], 'state')
local ok = false
for i = 5, #ARGV do if state == ARGV[i] then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'state', $state.queued)
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
""")


def make_ready(client: redis.Redis, job_id: str, account: str, from_states: Iterable[str]) -> bool:
    """Make ``job_id`` ready again if it is in one of ``from_states`` (a released hold, a retried
    dead letter, a job the sweep found nowhere): ``queued``, in its account's ready set."""
    keys = [redis_key("job", job_id), ready_key(account), READY_ACCOUNTS]
    args: list[str | float] = [job_id, time.time() - AHEAD, account, BELL, *from_states]
    return bool(client.eval(MAKE_READY, len(keys), *keys, *args))


def add_into(pipe: Any, job_id: str, account: str, due: float) -> None:
    """Queue the commands that make ``job_id`` ready on ``pipe`` (a producer's transaction)."""
    pipe.zadd(ready_key(account), {job_id: due}, nx=True)
    pipe.sadd(READY_ACCOUNTS, account)


def ring_into(pipe: Any, account: str) -> None:
    """Wake the dispatchers: work arrived for ``account``."""
    pipe.publish(BELL, account)


class ReadyQueues:
    """The ready sets and what each worker process holds of them."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(TAKE)
        self._restore = client.register_script(RESTORE)

    def take(
        self, holder: str, most: int, room: Mapping[str, int], *, default_room: int, offset: int = 0
    ) -> list[tuple[str, str, int]]:
        """Up to ``most`` ready jobs as (job id, account, runs cut short), at most
        ``room[account]`` of an account (``default_room`` of one not named), fairly across
        accounts; held by ``holder`` until released (:meth:`done_into`)."""
        if most <= 0:
            return []
        flat = cast(
            list[Any],
            self._take(
                keys=[READY_ACCOUNTS, taken_key(holder)],
                args=[most, offset, default_room, json.dumps(dict(room))],
            ),
        )
        return [
            (_text(j), _text(a), int(c)) for j, a, c in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
        ]

    def running_into(self, pipe: Any, holder: str, taken: Iterable[tuple[str, str]]) -> None:
        """Queue the mark that these (job id, account) started running: should the process die
        now, each counts as a run cut short (a job that kills its worker is found out)."""
        marks = {job_id: f"{account} running" for job_id, account in taken}
        if marks:
            pipe.hset(taken_key(holder), mapping=marks)

    def done_into(self, pipe: Any, holder: str, job_ids: Iterable[str]) -> None:
        """Queue the release of jobs whose attempt is recorded (they are no longer held)."""
        ids = list(job_ids)
        if ids:
            pipe.hdel(taken_key(holder), *ids)

    def restore(self, holder: str, job_ids: Iterable[str] = (), *, cut_short: bool) -> int:
        """Put jobs ``holder`` held back in their ready sets (all of them when none are named)."""
        keys = [taken_key(holder), READY_ACCOUNTS]
        return int(self._restore(keys=keys, args=[time.time() - AHEAD, "1" if cut_short else "0", *job_ids]))

    def depths(self) -> dict[str, int]:
        """Ready jobs per account (only the accounts that have some)."""
        accounts = sorted(_text(a) for a in cast(set[Any], self.redis.smembers(READY_ACCOUNTS)))
        with self.redis.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.zcard(ready_key(account))
            counts = pipe.execute()
        return {a: int(n) for a, n in zip(accounts, counts, strict=True) if int(n)}

    def oldest_due(self) -> dict[str, float]:
        """Per account with ready jobs, when its longest-waiting one became due (epoch seconds):
        the alerts' "oldest waiting job" (worker/web/metrics.py). A job put back ahead of the
        others is scored :data:`AHEAD` lower than when it became ready again, so each account's
        two kinds are read apart (scores below 0 and from 0 up) and the earlier of both wins."""
        accounts = sorted(_text(a) for a in cast(set[Any], self.redis.smembers(READY_ACCOUNTS)))
        with self.redis.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.zrangebyscore(ready_key(account), "-inf", "(0", start=0, num=1, withscores=True)
                pipe.zrangebyscore(ready_key(account), 0, "+inf", start=0, num=1, withscores=True)
            found = pipe.execute()
        out: dict[str, float] = {}
        for i, account in enumerate(accounts):
            ahead, ordinary = found[2 * i], found[2 * i + 1]
            times = [score + AHEAD for _, score in ahead] + [score for _, score in ordinary]
            if times:
                out[account] = min(times)
        return out

    def is_ready(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """For (job id, account) pairs: whether each is in its account's ready set (O(1) each)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, account in pairs:
                pipe.zscore(ready_key(account), job_id)
            return [score is not None for score in pipe.execute()]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
