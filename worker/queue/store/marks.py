"""The duplicate guard: Message-ID claims and sent marks in Redis.

A claim (``postroom:claim:<account>:<message-id>``) lets one attempt at a time deliver a
Message-ID; this process's heartbeat renews the claims its attempts hold (:data:`CLAIMS`), so a
dead attempt's claim is gone within :data:`CLAIM_TTL` seconds. A sent mark
(``postroom:delivered:<account>:<message-id>``) is written right after the server's 250 and
lists the recipients it accepted: a later attempt never offers them again. The same write
files which job was sent as that Message-ID (``postroom:sent-as:<account>:<message-id>``, the
Message-ID in :func:`worker.mail.message.comparable_message_id`'s form): the bounce reader
finds a report's job by it when the Message-ID is one the producer chose (contract §11). The job
store
(:mod:`worker.queue.store.jobs`) runs these scripts in its pipelines; :class:`AsyncMarks` writes the
marks from the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from worker.db.keys import REDIS_TIMEOUTS, redis_key
from worker.errors import RecipientStatus
from worker.mail.message import comparable_message_id

_key = redis_key

# The sent mark is the one write that must not be given up on: written after the server's 250,
# it is all that stops a later attempt from sending the message again. A Redis that is restarting
# (seconds, with AOF) is waited out this long before the mark is abandoned.
MARK_PATIENCE = 20.0
REDIS_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

RELEASE_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
# A Message-ID claim for an attempt and what was already delivered, in one command. KEYS: claim,
# the claim and delivered hash of before the per-account keys, delivered hash; ARGV: token, ttl.
CLAIM_SCRIPT = """
local claimed = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
return {claimed and 1 or 0, redis.call('EXISTS', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""
# Sent marks and the claims given up, for any number of messages in one command (a message's
# 250 is followed by this one write; marks that wait together go together). KEYS: delivered
# hash, claim, sent-as (Message-ID -> job id), for each message; ARGV: ttl, sent-as ttl, then
# for each message its claim token, its job id, the number of recipients and their
# recipient/result pairs. A message the server accepted for nobody files no sent-as (no report
# can be about it), nor one whose job id is '' (its Message-ID is Postroom's own <job id@domain>).
MARK_SCRIPT = """
local ttl, sent_as_ttl, a = ARGV[1], ARGV[2], 3
for k = 1, #KEYS, 3 do
  local token, job, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if n > 0 then
    for i = a, a + 2 * n - 2, 2 do redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1]) end
    redis.call('EXPIRE', KEYS[k], ttl)
    if job ~= '' then redis.call('SET', KEYS[k + 2], job, 'EX', sent_as_ttl) end
    a = a + 2 * n
  end
  if redis.call('GET', KEYS[k + 1]) == token then redis.call('DEL', KEYS[k + 1]) end
end
return 1
"""
# The fence, asked right before a transaction starts: is each claim still its attempt's token?
# KEYS: claims; ARGV: ttl (ms), then one token per claim. 1 where it is (renewed for another
# CLAIM_TTL: the transaction is about to run), 0 where it lapsed or another attempt holds it.
HOLDS_SCRIPT = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
HOLDS_SHA = hashlib.sha1(HOLDS_SCRIPT.encode()).hexdigest()  # noqa: S324
RELEASE_SHA = hashlib.sha1(RELEASE_SCRIPT.encode()).hexdigest()  # noqa: S324
MARK_SHA = hashlib.sha1(MARK_SCRIPT.encode()).hexdigest()  # noqa: S324
CLAIM_SHA = hashlib.sha1(CLAIM_SCRIPT.encode()).hexdigest()  # noqa: S324


# account, Message-ID, accepted, claim token, job id
Mark = tuple[str, str, Mapping[str, RecipientStatus], str, str]

# How much longer than a job record the Message-ID -> job entry is kept when the worker's
# settings are not at hand: the record's TTL starts again at the job's last write, which may come
# a retry policy's max_age (one day by default) plus a time limit after a 250 (a job whose other
# recipients are retried). Kept longer than the record, never shorter: the reader checks the record.
SENT_AS_MARGIN = 86400.0 + 360.0


def sent_as_key(account: str, message_id: str) -> str:
    """The key naming the job ``account`` sent as ``message_id`` (compared without angle brackets
    or the domain's case: :func:`comparable_message_id`)."""
    return _key("sent-as", account, comparable_message_id(message_id) or message_id)


def mark_command(marks: Sequence[Mark], ttl: int, sent_as_ttl: int) -> tuple[Any, ...]:
    """The EVALSHA arguments that write ``marks`` (sent marks, Message-ID -> job entries and
    claim releases) at once."""
    keys: list[str] = []
    args: list[Any] = [ttl, sent_as_ttl]
    for account, message_id, accepted, token, job_id in marks:
        keys += (
            _key("delivered", account, message_id),
            _key("claim", account, message_id),
            sent_as_key(account, message_id),
        )
        # Postroom's own <job id@domain> names its job already (the reader's fast path): only a
        # Message-ID the producer chose needs the entry
        own = message_id.strip().lstrip("<").startswith(f"{job_id}@")
        args += (token, "" if own else job_id, len(accepted))
        for address, result in accepted.items():
            args += (address, json.dumps(result.as_dict()))
    return (MARK_SHA, len(keys), *keys, *args)


CLAIM_TTL = 15  # seconds; renewed while its attempt runs, so a dead attempt's claim is gone soon
# A sent mark waits this long for the marks of other sends ending meanwhile, then all go in one
# write: a write per mark cost ~15 % of a worker's CPU at a thousand messages a second (side by
# side), and a crash inside these milliseconds is the same window as the mark's own round trip.
MARK_GATHER = 0.002


class ClaimRegistry:
    """The Message-ID claims this process's attempts hold, renewed by its heartbeat
    (worker/queue/process/liveness.py) every few seconds while they run: a claim outlives its attempt by at
    most :data:`CLAIM_TTL` seconds, however long the attempt was allowed to take. Each claim
    remembers the thread that took it: a thread stuck past its time limit has its claims
    dropped (no longer renewed), so that another worker may send what it was sending."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def add(self, claims: Iterable[tuple[str, str, str]]) -> None:
        owner = threading.get_ident()
        with self._lock:
            for account, message_id, token in claims:
                self._held[_key("claim", account, message_id)] = (token, owner)

    def discard(self, claims: Iterable[tuple[str, str, str]]) -> None:
        with self._lock:
            for account, message_id, token in claims:
                key = _key("claim", account, message_id)
                if self._held.get(key, ("", 0))[0] == token:
                    del self._held[key]

    def drop_owned_by(self, thread: int) -> int:
        with self._lock:
            keys = [key for key, (_, owner) in self._held.items() if owner == thread]
            for key in keys:
                del self._held[key]
        return len(keys)

    def renew(self, client: redis.Redis) -> None:
        with self._lock:
            held = [(key, token) for key, (token, _) in self._held.items()]
        if not held:
            return
        with client.pipeline(transaction=False) as pipe:
            for key, token in held:
                pipe.eval(_RENEW, 1, key, token, CLAIM_TTL * 1000)
            pipe.execute()


_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
CLAIMS = ClaimRegistry()

# An answer that a claim is held, younger than this by the clock that runs on through a freeze,
# stands for one asked now: the claim was set or renewed for CLAIM_TTL seconds at that moment, so
# it cannot have lapsed since (no other attempt can hold it) unless this process was stopped
# meanwhile — and then the clock shows it, and the fence asks Redis.
FENCE_FRESH = 1.0


def fence_clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the host sleeps
    (CLOCK_BOOTTIME; CLOCK_MONOTONIC where there is none)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class Fence:
    """The fence of one attempt at one message (``OutgoingMessage.fence``): asked right before
    the transaction starts, it answers whether the attempt still holds its Message-ID claim. An
    answer younger than :data:`FENCE_FRESH` (the claim itself, taken just before the send) is
    reused; after a longer wait (a rate limit, a pool slot, a connection, a freeze) Redis is asked
    again, for every message in flight in one script call per loop turn (:meth:`AsyncMarks.holds`)."""

    def __init__(self, marks: AsyncMarks, account: str, message_id: str, token: str, held_at: float) -> None:
        self.marks, self.account, self.message_id, self.token = marks, account, message_id, token
        self.held_at = held_at  # fence_clock() when the claim was last known to be held

    async def __call__(self) -> bool:
        asked = fence_clock()
        if asked - self.held_at < FENCE_FRESH:
            return True
        if not await self.marks.holds(self.account, self.message_id, self.token):
            return False
        self.held_at = asked
        return True


class AsyncMarks:
    """The sent mark from the event loop (batches): no thread hop between a server's 250
    and the write that stops any later attempt from sending to those recipients again.

    One write is under way at a time (group commit): the marks that arrive within
    :data:`MARK_GATHER` of the first, or while a write is under way, go together in the next
    one. Every caller waits until its own mark is written. (A pipeline per loop turn carried
    about one mark each in a batch and cost ~8 % of its CPU.)
    """

    def __init__(self, url: str, job_ttl: float, sent_as_ttl: float | None = None) -> None:
        from worker.db.connect import async_client

        self.redis = async_client(url, decode_responses=True, **REDIS_TIMEOUTS)
        self.job_ttl = int(job_ttl)
        self.sent_as_ttl = int(sent_as_ttl if sent_as_ttl is not None else job_ttl + SENT_AS_MARGIN)
        self._queued: list[tuple[Mark, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._asked: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._asker: asyncio.Task[None] | None = None

    async def holds(self, account: str, message_id: str, token: str) -> bool:
        """The fence: whether the attempt holding ``token`` still holds ``message_id``'s claim (its
        process may have frozen past the claim's lapse while another attempt took over). The
        questions of one loop turn go together in one script call; a Redis that cannot answer
        counts as no (the send waits for a retry rather than risk going out twice)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        self._asked.append((_key("claim", account, message_id), token, answer))
        if self._asker is None or self._asker.done():
            self._asker = loop.create_task(self._ask_queued())
        return await answer

    async def _ask_queued(self) -> None:
        while self._asked:
            batch, self._asked = self._asked, []
            try:
                keys, tokens = [k for k, _, _ in batch], [t for _, t, _ in batch]
                args: list[str | int] = [*keys, CLAIM_TTL * 1000, *tokens]
                try:
                    replies = await self.redis.evalsha(HOLDS_SHA, len(keys), *args)
                except redis.exceptions.NoScriptError:
                    await self.redis.script_load(HOLDS_SCRIPT)
                    replies = await self.redis.evalsha(HOLDS_SHA, len(keys), *args)
            except Exception:
                replies = [0] * len(batch)
            except BaseException:  # cancelled: nobody may wait for an answer that never comes
                for _, _, answer in batch:
                    answer.cancel()
                raise
            for (_, _, answer), reply in zip(batch, replies, strict=True):
                if not answer.done():
                    answer.set_result(bool(int(reply)))

    async def mark_delivered(
        self,
        account: str,
        message_id: str,
        accepted: Mapping[str, RecipientStatus],
        release: str,
        job_id: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queued.append(((account, message_id, accepted, release, job_id), done))
        if self._writer is None or self._writer.done():  # it starts next turn: this turn's marks join
            self._writer = loop.create_task(self._write_queued())
        await done

    async def _write_queued(self) -> None:
        await asyncio.sleep(MARK_GATHER)  # the marks of the sends that end meanwhile go along
        while self._queued:
            batch, self._queued = self._queued, []
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Mark, asyncio.Future[None]]]) -> None:
        deadline = time.monotonic() + MARK_PATIENCE
        pause = 0.1
        error: Exception | None = None
        written = False
        try:
            while True:  # a Redis restarting is waited out (see MARK_PATIENCE); writes are idempotent
                try:
                    await self._write(batch)
                    written = True
                except REDIS_UNAVAILABLE as exc:
                    if time.monotonic() + pause <= deadline:
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, 1.0)
                        continue
                    error = exc
                except Exception as exc:
                    error = exc
                break
        finally:  # settled however it ends (cancelled too: nobody waits for a write that never comes)
            for _, done in batch:
                if done.done():
                    continue
                if written:
                    done.set_result(None)
                elif error is not None:
                    done.set_exception(error)
                else:
                    done.cancel()

    async def _write(self, batch: list[tuple[Mark, asyncio.Future[None]]]) -> None:
        command = mark_command([mark for mark, _ in batch], self.job_ttl, self.sent_as_ttl)
        try:
            await self.redis.evalsha(*command)
        except redis.exceptions.NoScriptError:  # a Redis that lost its scripts (a restart)
            await self.redis.script_load(MARK_SCRIPT)
            await self.redis.evalsha(*command)

    async def aclose(self) -> None:
        await self.redis.aclose()
