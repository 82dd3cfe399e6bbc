"""Coalescing: a ``postroom.send`` task takes more ready jobs straight from the queue.

Celery hands a worker one message at a time, and its per-task work (receive,
dispatch to the pool, events, acknowledgement) costs more CPU than sending the
mail does. When the queue holds a backlog of single-message jobs, the task that
is running takes up to ``settings.coalesce - 1`` more of them in one Redis call
and delivers them all side by side, as one batch job would.

The messages taken are registered in kombu's own "unacknowledged" hash and
index in the same atomic script that pops them, exactly as kombu's Redis
transport registers a message it hands to a worker. So:

- a message is acknowledged (removed from both) only after its outcome is recorded;
- when the carrying task fails, its messages are given back to the head of the queue;
- when the carrying process dies, kombu's periodic restore (which every worker
  runs) puts them back; they are registered back-dated so that this happens
  shortly after the hard time limit instead of after the whole visibility timeout.

Only plain, due jobs are taken: the script stops at the first message that is
not a protocol-2 JSON ``postroom.send`` message without ETA or expiry (retries
scheduled with a countdown, priorities other than the queue's, anything else),
and leaves that one to Celery. A message kombu gave back after its run died
(flagged ``redelivered``) is left to Celery too: it runs alone, counted, so a
payload that kills its worker cannot take a group of innocent jobs down with
it again and again (worker/queue/tasks.py dead-letters it after bounded runs). Jobs
taken this way send no Celery task events of their own (the carrying task
does); Postroom's job records cover each one.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.mail.payload import ACCOUNT_HEADER
from worker.queue import liveness
from worker.queue.broker import BrokerKeys

log = logging.getLogger("postroom.drain")

RESTORE_MARGIN = 30.0  # seconds after the hard time limit before a dead carrier's jobs come back
SCAN_DEPTH = 1000  # entries of each queue list a take looks through for jobs with room

# KEYS: unacked hash, unacked index, this process's carried set and the holders set
# (worker/queue/liveness.py), then the queue lists in the order kombu reads them.
# ARGV: max count, index score, task name, this process's holder id, scan depth, and JSON of
# {account: how many more of its jobs this process may take}, the carried set's TTL.
# Each list is scanned from its read end (the right) up to the scan depth; an entry is taken
# when it is a plain due postroom.send message whose account (the ACCOUNT_HEADER a Postroom
# producer sets) still has room; the rest keep their places: a slow account's backlog at the
# head does not hide the jobs of other accounts queued behind it.
_TAKE = """
local out = {}
local taken, max, depth = 0, tonumber(ARGV[1]), tonumber(ARGV[5])
local room = cjson.decode(ARGV[6])
redis.call('SADD', KEYS[4], ARGV[4])
for qi = 5, #KEYS do
  if taken >= max then break end
  local queue = KEYS[qi]
  local window = redis.call('LRANGE', queue, -depth, -1)
  local chosen = {}
  for i = #window, 1, -1 do
    if taken >= max then break end
    local raw = window[i]
    local ok, msg = pcall(cjson.decode, raw)
    if not ok or type(msg) ~= 'table' then msg = {} end
    local h, p = msg['headers'], msg['properties']
    if type(h) == 'table' and type(p) == 'table'
        and h['task'] == ARGV[3] and type(h['id']) == 'string' and h['redelivered'] ~= true
        and (h['eta'] == nil or h['eta'] == cjson.null)
        and (h['expires'] == nil or h['expires'] == cjson.null)
        and msg['content-type'] == 'application/json' and p['body_encoding'] == 'base64'
        and type(p['delivery_info']) == 'table' and type(p['delivery_tag']) == 'string' then
      local account = h['ACCOUNT_HEADER']
      local left = type(account) == 'string' and room[account] or nil
      if left == nil or left > 0 then
        if left ~= nil then room[account] = left - 1 end
        chosen[#chosen + 1] = raw
        local info, tag = p['delivery_info'], p['delivery_tag']
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        redis.call('SADD', KEYS[3], tag)
        redis.call('EXPIRE', KEYS[3], ARGV[7])
        local where = cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key'])
        redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. where .. ']')
        out[#out + 1] = queue
        out[#out + 1] = raw
        taken = taken + 1
      end
    end
  end
  for _, raw in ipairs(chosen) do redis.call('LREM', queue, -1, raw) end
end
return out
""".replace("ACCOUNT_HEADER", ACCOUNT_HEADER)

# KEYS: unacked hash, unacked index, carried set. ARGV: triples of (queue, delivery tag, raw message).
# A message kombu restored meanwhile is no longer in the hash: it is not pushed twice.
_GIVE_BACK = """
for i = 1, #ARGV, 3 do
  redis.call('SREM', KEYS[3], ARGV[i + 1])
  if redis.call('HDEL', KEYS[1], ARGV[i + 1]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[i + 1])
    redis.call('RPUSH', ARGV[i], ARGV[i + 2])
  end
end
return 1
"""


@dataclass(frozen=True)
class Carried:
    """One job taken from the queue by a running task."""

    job_id: str
    kwargs: dict[str, Any] | None  # None: the body could not be read (dead-lettered as such)
    queue: str
    delivery_tag: str
    raw: str  # the message as kombu stored it, for giving it back unchanged
    problem: str | None = None

    def __repr__(self) -> str:  # kwargs hold the message content: not for logs
        return f"Carried(job_id={self.job_id!r}, queue={self.queue!r})"


class QueueDrain:
    """Takes, acknowledges and gives back jobs on one queue of the broker's Redis."""

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        task_name: str,
        *,
        visibility_timeout: float,
        time_limit: float,
        keys: BrokerKeys | None = None,
    ) -> None:
        keys = keys or BrokerKeys()
        self.client = client
        self.task_name = task_name
        self.queues = keys.queue_lists(queue)
        self.keys = [keys.unacked, keys.unacked_index]
        # kombu restores index entries older than the visibility timeout: back-date ours so a
        # dead carrier's jobs return soon after its hard time limit, never before it
        self.backdate = max(0.0, visibility_timeout - (time_limit + RESTORE_MARGIN))
        self._take = client.register_script(_TAKE)
        self._give_back = client.register_script(_GIVE_BACK)

    def take(self, count: int, room: Mapping[str, int] | None = None) -> list[Carried]:
        """Up to ``count`` ready jobs, at most ``room[account]`` of an account named there."""
        if count <= 0:
            return []
        score = time.time() - self.backdate
        carried = liveness.carried_key()
        flat = self._take(
            keys=[*self.keys, carried, liveness.HOLDERS, *self.queues],
            args=[
                count,
                score,
                self.task_name,
                liveness.holder_id(),
                SCAN_DEPTH,
                json.dumps(dict(room or {})),
                int(liveness.LAPSE),  # the carried set's TTL; then this process's heartbeat keeps it
            ],
        )
        taken = []
        for queue, raw in zip(flat[0::2], flat[1::2], strict=True):
            taken.append(_decode(_text(queue), _text(raw)))
        liveness.TASKS.carrying([c.delivery_tag for c in taken])
        return taken

    def ack(self, carried: Iterable[Carried]) -> None:
        tags = [c.delivery_tag for c in carried]
        if not tags:
            return
        liveness.TASKS.let_go(tags)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys[1], *tags)
                pipe.hdel(self.keys[0], *tags)
                pipe.srem(liveness.carried_key(), *tags)
                pipe.execute()
        except redis.RedisError:  # this process no longer holds them, whatever Redis still says
            liveness.release_later(tags)
            raise

    def give_back(self, carried: Iterable[Carried]) -> None:
        """Return jobs to the head of their queue (they run next, in their order), untouched.

        When Redis cannot be told (it is restarting), this process stops claiming them at its
        next beat, and the reaper puts them back (worker/queue/liveness.py)."""
        items = list(carried)
        args = [part for c in reversed(items) for part in (c.queue, c.delivery_tag, c.raw)]
        if not args:
            return
        liveness.TASKS.let_go([c.delivery_tag for c in items])
        try:
            self._give_back(keys=[*self.keys, liveness.carried_key()], args=args)
        except redis.RedisError:
            liveness.release_later([c.delivery_tag for c in items])
            raise


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _send(**kwargs: Any) -> None:
    """The signature of ``postroom.send`` (keyword arguments only), for the screen."""


def _decode(queue: str, raw: str) -> Carried:
    from worker.queue.intake import body_problem, header_problem  # the consumer's own screen

    message = json.loads(raw)
    headers, properties = message["headers"], message["properties"]
    job_id, tag = str(headers["id"]), str(properties["delivery_tag"])
    bad_headers = header_problem(headers)
    if bad_headers is not None:
        return Carried(job_id, None, queue, tag, raw, problem=bad_headers)
    try:
        encoded = base64.b64decode(message["body"], validate=True)
        body = json.loads(encoded.decode(message.get("content-encoding") or "utf-8"))
    except RecursionError:
        return Carried(job_id, None, queue, tag, raw, problem="body cannot be decoded (nested too deeply)")
    except (ValueError, TypeError, KeyError, LookupError) as exc:
        problem = f"body cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})"
        return Carried(job_id, None, queue, tag, raw, problem=problem)
    unfit = body_problem("postroom.send", body, _send)
    if unfit is not None:
        return Carried(job_id, None, queue, tag, raw, problem=unfit)
    return Carried(job_id, body[1], queue, tag, raw)
