"""Provider limits shared by every worker process and machine, kept in Redis (contract §5).

Three limits per account (presets supply them, records override):

- **connections**: at most ``max_connections`` SMTP connections open to the
  account's server at once, across all workers. Each connection holds a slot
  (a lease in a sorted set) from before it connects until after it closes; the
  pool renews the leases of its open connections every few seconds, so the
  slots of a crashed worker lapse after :data:`SLOT_LEASE` seconds. Pools that
  use an account's slots share them evenly: each keeps at most
  ``ceil(max_connections / pools)`` connections while others want theirs, and
  closes the rest when they finish their message (no churn in steady state).
- **rate** (e.g. ``30/minute``): GCRA, one send per ``period/count`` seconds. A
  send that must wait reserves its exact future time, so queued jobs of a
  throttled account are spread out instead of all coming back at once, and
  sends never run ahead of the schedule: the n-th send goes out no earlier
  than ``n x period/count`` after the first (a job that comes back late uses
  its slot late; it never takes a later one's).
- **daily recipients**: a rolling 24 hours, counted per minute.

A send that must wait briefly (≤ :data:`INLINE_WAIT` s) waits on the event
loop (nothing else of the worker waits with it); a longer wait raises
:class:`LimitWait`: the job is re-scheduled for that time without spending an
attempt, and the worker moves on to other accounts' jobs.

Keys (all under ``postroom:``)::

    slots:<account>            zset: connection token -> lease expiry
    slots-wanted:<account>     set (5 s) when a worker waits for a connection slot
    slot-users:<account>       zset: pools using the account's slots -> last seen (shares)
    rate:<account>             GCRA theoretical arrival time
    rate-slot:<message_id>     a reserved send time, used when the job comes back
    recipients:<account>       hash: minute -> recipients sent (rolling 24 h)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from worker.db.keys import PREFIX
from worker.errors import LimitWait, Rejected

SLOT_LEASE = 15.0  # seconds a connection slot lives without renewal (a crashed worker's lapse)
SLOT_RENEW = 5.0  # how often a pool renews its connections' leases
WANTED_CHECK = 0.1  # how often a pool with open connections asks whether others wait for one
SLOT_POLL = 0.05  # first wait between two tries for a connection slot (doubles, up to 0.5 s)
SLOT_WAIT = 20.0  # how long a send waits for a connection slot before it is re-scheduled
WANTED_TTL = 5
USER_TTL = 3.0  # a pool that has not asked for slots for this long no longer takes a share
SHARE_PATIENCE = 0.05  # a send waits this long at its pool's share before asking past it
DEMAND_GRACE = (
    1.0  # a pool with no send for this long steps out of the shares (worker/transports/smtp/pool.py)
)
INLINE_WAIT = 0.5  # rate waits up to this are waited out on the loop (longer ones re-schedule)
MAX_RESERVATION = 900.0  # never reserve a send time further ahead than this

# KEYS[1] slots zset, KEYS[2] wanted flag, KEYS[3] users zset; ARGV: now, lease, cap, token,
# wanted TTL, this pool's name (it registers as a user of the account's slots)
_ACQUIRE = """
local now, lease, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('EXPIRE', KEYS[3], 60)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) or redis.call('ZCARD', KEYS[1]) < cap then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
  redis.call('EXPIRE', KEYS[1], math.ceil(lease * 4))
  return 1
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[5])
return 0
"""

# KEYS[1] tat, KEYS[2] this message's reservation; ARGV: now, interval, max reservation, inline wait
# Returns the wait in seconds (reserved), or a negative number: not reserved, ask again then.
# A wait longer than the inline one is kept under KEYS[2]: the job comes back for its own slot.
_RATE = """
local now, interval, horizon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('GET', KEYS[2])
if held then
  local w = tonumber(held) - now
  if w <= tonumber(ARGV[4]) then redis.call('DEL', KEYS[2]) end  -- else: back early, keep the slot
  return tostring(math.max(0, w))
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > horizon then return tostring(-(wait - horizon)) end
local nxt = tat + interval
redis.call('SET', KEYS[1], tostring(nxt), 'PX', math.ceil((nxt - now) * 1000) + 1000)
if wait > tonumber(ARGV[4]) then
  redis.call('SET', KEYS[2], tostring(tat), 'PX', math.ceil(wait * 1000) + 3600000)
end
return tostring(wait)
"""

# KEYS[1] recipients hash; ARGV: now minute, budget, n. Returns 0 (counted) or seconds to wait.
_BUDGET = """
local minute, budget, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
local used, buckets = 0, {}
for i = 1, #fields, 2 do
  local m, c = tonumber(fields[i]), tonumber(fields[i + 1])
  if m <= minute - 1440 then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    used = used + c
    buckets[#buckets + 1] = {m, c}
  end
end
if used + n <= budget then
  redis.call('HINCRBY', KEYS[1], tostring(minute), n)
  redis.call('EXPIRE', KEYS[1], 90000)
  return 0
end
table.sort(buckets, function(a, b) return a[1] < b[1] end)
local free = used + n - budget
for _, b in ipairs(buckets) do
  free = free - b[2]
  if free <= 0 then return (b[1] + 1440 - minute) * 60 end
end
return 86400
"""


class Limiter:
    """The Redis side of the limits, for one worker process's event loop."""

    def __init__(self, client: Any, *, slot_wait: float = SLOT_WAIT) -> None:
        self.redis = client  # redis.asyncio.Redis (decode_responses=True)
        self.slot_wait = slot_wait  # keep it well inside the task's time limit
        self._acquire = client.register_script(_ACQUIRE)
        self._rate = client.register_script(_RATE)
        self._budget = client.register_script(_BUDGET)

    # ---- connection slots ------------------------------------------------------------

    @staticmethod
    def new_token() -> str:
        return uuid.uuid4().hex

    async def acquire_slot(
        self, account: str, cap: int, token: str, *, wait: float | None = None, user: str = ""
    ) -> None:
        """Wait for one of ``cap`` connection slots; LimitWait when none frees up in time.

        ``user`` names the pool asking: pools that asked recently share the slots evenly."""
        deadline = time.monotonic() + (self.slot_wait if wait is None else wait)
        pause = SLOT_POLL
        keys = [
            f"{PREFIX}slots:{account}",
            f"{PREFIX}slots-wanted:{account}",
            f"{PREFIX}slot-users:{account}",
        ]
        while True:
            args = [time.time(), SLOT_LEASE, cap, token, WANTED_TTL, user or token]
            granted = await self._acquire(keys=keys, args=args)
            if int(granted):
                return
            if time.monotonic() + pause > deadline:
                raise LimitWait(
                    f"all {cap} connection slots of the account are in use by other workers",
                    account=account,
                    retry_after=1.0,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def try_slot(self, account: str, cap: int, token: str, *, user: str = "") -> bool:
        """One of ``cap`` connection slots now, or False (and the others are told someone waits)."""
        keys = [
            f"{PREFIX}slots:{account}",
            f"{PREFIX}slots-wanted:{account}",
            f"{PREFIX}slot-users:{account}",
        ]
        args = [time.time(), SLOT_LEASE, cap, token, WANTED_TTL, user or token]
        return bool(int(await self._acquire(keys=keys, args=args)))

    async def renew_slots(
        self, account: str, tokens: list[str], user: str = "", *, leaving: str = ""
    ) -> tuple[int, bool]:
        """Extend these connections' leases (and ``user``'s claim to a share; ``leaving`` gives
        one up); returns how many pools use the account's slots now and whether one waits."""
        now = time.time()
        users = f"{PREFIX}slot-users:{account}"
        async with self.redis.pipeline(transaction=False) as pipe:
            if tokens:
                pipe.zadd(f"{PREFIX}slots:{account}", dict.fromkeys(tokens, now + SLOT_LEASE), xx=True)
            if user:
                pipe.zadd(users, {user: now})
            if leaving:
                pipe.zrem(users, leaving)
            pipe.zremrangebyscore(users, "-inf", now - USER_TTL)
            pipe.zcard(users)
            pipe.exists(f"{PREFIX}slots-wanted:{account}")
            results = await pipe.execute()
        return max(1, int(results[-2])), bool(results[-1])

    async def sharing(self, account: str, user: str, *, leaving: str = "") -> tuple[int, bool]:
        """How many pools use the account's slots, and whether one waits (no lease renewed)."""
        return await self.renew_slots(account, [], user, leaving=leaving)

    async def release_slot(self, account: str, token: str) -> None:
        await self.redis.zrem(f"{PREFIX}slots:{account}", token)

    async def slots_in_use(self, account: str) -> int:
        key = f"{PREFIX}slots:{account}"
        await self.redis.zremrangebyscore(key, "-inf", time.time())
        return int(await self.redis.zcard(key))

    # ---- rate and daily recipients -----------------------------------------------------

    async def rate_wait(self, account: str, per: tuple[int, float], message_id: str) -> float:
        """Seconds until this message may be sent under the account's rate (its slot reserved)."""
        count, period = per
        keys = [f"{PREFIX}rate:{account}", f"{PREFIX}rate-slot:{message_id}"]
        wait = float(
            await self._rate(keys=keys, args=[time.time(), period / count, MAX_RESERVATION, INLINE_WAIT])
        )
        if wait < 0:  # further out than we reserve: ask again then
            raise LimitWait(
                f"rate limit {count}/{period:g}s: the next free slot is over {MAX_RESERVATION:.0f}s away",
                account=account,
                retry_after=MAX_RESERVATION,
            )
        return wait

    async def budget_wait(self, account: str, budget: int, recipients: int) -> float:
        """0 when ``recipients`` fit in the rolling 24 h budget (then counted), else seconds to wait."""
        if recipients > budget:
            raise Rejected(
                f"the message has {recipients} recipients, more than the account's daily budget of {budget}",
                account=account,
            )
        minute = int(time.time() // 60)
        return float(
            await self._budget(keys=[f"{PREFIX}recipients:{account}"], args=[minute, budget, recipients])
        )

    async def admit(
        self,
        account: str,
        *,
        rate: tuple[int, float] | None,
        daily_recipients: int | None,
        message_id: str,
        recipients: int,
    ) -> None:
        """Wait out a short limit on the loop, or raise LimitWait with the exact wait."""
        if rate is not None:
            wait = await self.rate_wait(account, rate, message_id)
            if wait > INLINE_WAIT:
                raise LimitWait(
                    f"rate limit {rate[0]}/{rate[1]:g}s: this message's slot is in {wait:.1f}s",
                    account=account,
                    retry_after=wait,
                )
            if wait > 0:
                await asyncio.sleep(wait)
        if daily_recipients is not None:
            wait = await self.budget_wait(account, daily_recipients, recipients)
            if wait > 0:
                raise LimitWait(
                    f"daily recipient budget of {daily_recipients} used up for the last 24 h; "
                    f"room again in {wait:.0f}s",
                    account=account,
                    retry_after=wait,
                )
