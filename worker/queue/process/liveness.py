"""Liveness by heartbeat: a dead worker's messages are back on the queue in seconds.

kombu's Redis transport gives back a message a dead worker held only when it has
been unacknowledged for the whole visibility timeout (an hour here: it must
outlast the longest task). Postroom does not wait for that. Every worker process
says what it holds, under its own holder id (host, pid and a nonce):

- ``postroom:holding:<holder>:consumer`` — the delivery tags its Celery consumer
  holds unacknowledged (control tasks: prefetched or running), written anew
  every :data:`BEAT` seconds by its :class:`Upkeep` thread,
expiring :data:`LAPSE` seconds after the last beat, and the holder listed in
``postroom:holders``. A process that dies (SIGKILL, OOM, power) stops beating,
its keys expire, and the :class:`Reaper` that every worker runs finds kombu's
unacknowledged entries that are older than :data:`GRACE` and that no live holder
claims, and restores them at the head of their queue, flagged ``redelivered``
(worker/queue/broker/kombu_redis.py), as kombu's own restore would an hour later. kombu's restore
is still there as the last resort.

The ready jobs a process's dispatcher took (``postroom:taken:<holder>``, worker/queue/store/ready.py)
and the broker entries its inbox took (``postroom:inbox:<holder>``, worker/queue/broker/inbox.py) are
held the same way, under ``holding:<holder>:alive`` in Postroom's own Redis: a holder whose key
lapsed has its jobs put back in their ready sets (each counted as a run cut short) and its
inbox back on the queue (each entry's runs counted: one that keeps killing its reader ends in
the dead letters), by whichever worker's reaper sees it first.

A copy restored while its holder was in fact alive (its beat stalled for
:data:`LAPSE` seconds) runs twice at worst; the job record and the Message-ID
claim keep it from being sent twice. Every worker must run this version: a
worker that does not beat would have its messages restored under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.queue.broker.kombu_redis import BrokerKeys, restore_unacked
from worker.queue.broker.process_state import this_process
from worker.queue.broker.taskclock import TASKS
from worker.queue.store.marks import CLAIMS

log = logging.getLogger("postroom.liveness")

HOLDERS = redis_key("holders")
BEAT = 2.0  # seconds between beats
LAPSE = 15.0  # a holder that has not beaten for this long is dead (its keys expire)
GRACE = 15.0  # an unacknowledged entry younger than this is never restored (its holder may not have said yet)
REAP_EVERY = 2.0


def holder_id() -> str:
    """This process's holder id (a new one after a fork: worker/queue/broker/process_state.py)."""
    return this_process().holder


def holding_key(holder: str, part: str) -> str:
    return redis_key("holding", holder, part)


class Heartbeat:
    """One process's beat: its consumer's tags (if it has a consumer) and what it took (its ready
    jobs and its inbox) kept alive; a group past its time limit lets its jobs go."""

    def __init__(
        self,
        client: redis.Redis | None,
        consumer_tags: Callable[[], list[str] | None] | None = None,
        time_limit: float | None = None,
        state: redis.Redis | None = None,
    ) -> None:
        self.client = client  # the broker's Redis (None on RabbitMQ: nothing to say there)
        self.state = state if state is not None else client  # where the Message-ID claims live
        self.consumer_tags = consumer_tags
        self.time_limit = time_limit
        self.holder = holder_id()

    def beat(self) -> None:
        if self.time_limit is not None:
            for thread, age, held in TASKS.overdue(self.time_limit):
                dropped = CLAIMS.drop_owned_by(thread)
                log.error(
                    "a task has run %.0f s, past its time limit of %.0f s (thread %d): its %d messages go "
                    "back to the queue and its %d Message-ID claims lapse",
                    age, self.time_limit, thread, held, dropped,
                )  # fmt: skip
        hostages = TASKS.hostages()
        tags = self.consumer_tags() if self.consumer_tags is not None else None
        if tags and hostages:
            tags = [t for t in tags if t not in hostages]
        if self.client is not None:
            self._say_what_is_held(tags)
        if self.state is not None:
            self._say_alive(hostages)
            CLAIMS.renew(self.state)  # the Message-ID claims of this process's running attempts

    def _say_alive(self, hostages: set[str]) -> None:
        """This process holds its taken jobs and its inbox for another LAPSE seconds (in
        Postroom's Redis); jobs of a group past its time limit go back to their ready sets."""
        assert self.state is not None
        with self.state.pipeline(transaction=True) as pipe:
            pipe.sadd(HOLDERS, self.holder)
            pipe.set(holding_key(self.holder, "alive"), "1", ex=int(LAPSE))
            pipe.execute()
        if hostages:
            from worker.queue.store.ready import ReadyQueues

            restored = ReadyQueues(self.state).restore(self.holder, sorted(hostages), cut_short=True)
            if restored:
                log.error("%d jobs of a group past its time limit went back to their ready sets", restored)

    def _say_what_is_held(self, tags: list[str] | None) -> None:
        assert self.client is not None
        consumer = holding_key(self.holder, "consumer")
        with self.client.pipeline(transaction=True) as pipe:  # MULTI: never seen half-written
            pipe.sadd(HOLDERS, self.holder)
            if self.consumer_tags is not None:
                pipe.delete(consumer)
                pipe.sadd(consumer, "-", *(tags or []))  # "-": the key exists even when nothing is held
                pipe.expire(consumer, int(LAPSE))
            pipe.execute()


def taken_count(state: redis.Redis) -> int:
    """Jobs the live worker processes hold right now (taken from their ready sets)."""
    from worker.queue.store.ready import taken_key

    holders = [_text(h) for h in cast(set[Any], state.smembers(HOLDERS))]
    with state.pipeline(transaction=False) as pipe:
        for holder in holders:
            pipe.exists(holding_key(holder, "alive"))
            pipe.hlen(taken_key(holder))
        replies = pipe.execute()
    return sum(int(n) for alive, n in zip(replies[0::2], replies[1::2], strict=True) if alive)


class HolderReaper:
    """Gives back what dead holders took: their ready jobs (in Postroom's Redis) and their inbox
    entries (in the broker's Redis, when it is one)."""

    def __init__(self, state: redis.Redis, broker: redis.Redis | None, keys: BrokerKeys | None) -> None:
        self.state = state
        self.broker = broker
        self.keys = keys

    def reap(self) -> int:
        holders = [_text(h) for h in cast(set[Any], self.state.smembers(HOLDERS))]
        if not holders:
            return 0
        with self.state.pipeline(transaction=False) as pipe:
            for holder in holders:
                pipe.exists(*(holding_key(holder, part) for part in ("alive", "consumer")))
            alive = pipe.execute()
        gone = [holder for holder, live in zip(holders, alive, strict=True) if not live]
        restored = 0
        for holder in gone:
            restored += self._give_back(holder)
            self.state.srem(HOLDERS, holder)
            if self.broker is not None and self.broker is not self.state:  # the broker's own registry
                self.broker.srem(HOLDERS, holder)
        return restored

    def _give_back(self, holder: str) -> int:
        from worker.queue.store.ready import ReadyQueues

        jobs = ReadyQueues(self.state).restore(holder, cut_short=True)
        entries = 0
        if self.broker is not None and self.keys is not None:
            from worker.queue.broker.inbox import give_back

            entries = give_back(self.broker, self.keys, holder, runs=self.state)
        if jobs or entries:
            log.warning(
                "holder %s stopped beating: %d jobs back in their ready sets, %d entries back on the queue",
                holder, jobs, entries,
            )  # fmt: skip
        return jobs + entries


class Reaper:
    """Restores unacknowledged entries that no live holder claims (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: BrokerKeys) -> None:
        self.client = client
        self.keys = keys

    def reap(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        old = [
            _text(t)
            for t in cast(
                list[Any],
                self.client.zrangebyscore(self.keys.unacked_index, "-inf", now - GRACE, start=0, num=5000),
            )
        ]
        if not old:
            return 0
        holders = [_text(h) for h in cast(set[Any], self.client.smembers(HOLDERS))]
        claimed: set[str] = set()
        with self.client.pipeline(transaction=False) as pipe:
            for holder in holders:
                pipe.smembers(holding_key(holder, "consumer"))
            replies = pipe.execute()
        for held in replies:  # (HolderReaper forgets a dead holder once it gave its work back)
            claimed.update(_text(t) for t in held)
        orphans = [tag for tag in old if tag not in claimed]
        if not orphans:
            return 0
        restored = restore_unacked(self.client, self.keys, orphans)
        if restored:
            log.warning("restored %d messages held by workers that stopped beating", restored)
        return restored


class Upkeep:
    """A worker process's daemon thread: its heartbeat, the reaper and the delay queue's mover,
    each on its own period (one thread; each step is a few Redis calls)."""

    def __init__(self, steps: list[tuple[float, Callable[[], object]]]) -> None:
        self.steps = steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postroom-upkeep", daemon=True)

    def start(self) -> Upkeep:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        due = [0.0] * len(self.steps)
        tick = min(period for period, _ in self.steps)
        while not self._stop.is_set():
            now = time.monotonic()
            for i, (period, step) in enumerate(self.steps):
                if now < due[i]:
                    continue
                due[i] = now + period
                try:
                    step()
                except Exception as exc:  # Redis or the broker away: next time
                    log.warning("upkeep: %s failed (%s)", getattr(step, "__qualname__", step), exc)
            self._stop.wait(tick)


def keep_beating(
    client: redis.Redis | None,
    consumer_tags: Callable[[], list[str] | None] | None = None,
    *,
    more: list[tuple[float, Callable[[], object]]] | None = None,
    time_limit: float | None = None,
    state: redis.Redis | None = None,
) -> Upkeep:
    """This process's upkeep thread, started once per process: the heartbeat (with its
    consumer's tags when it has a consumer), and ``more`` steps (the reaper, the delay mover).
    A prefork child gets one too (its claims are renewed while it lives).
    ``client`` is the broker's Redis (None on RabbitMQ), ``state`` Postroom's (default: the same)."""

    def start() -> Upkeep:
        beat = Heartbeat(client, consumer_tags, time_limit, state=state).beat
        return Upkeep([(BEAT, beat), *(more or [])]).start()

    return this_process().once("upkeep", start)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
