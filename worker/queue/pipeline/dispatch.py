"""The dispatcher: each worker process takes ready jobs in groups and runs their attempts.

One thread per worker process takes up to ``coalesce`` ready jobs at a time (worker/queue/store/ready.py:
one script, fair across the accounts that have room here) and hands each group to one of
``worker_concurrency`` threads, which runs :func:`worker.queue.pipeline.attempts.attempt_all` on it —
validate, begin, build, sign, claim, send, record, for the whole group at once, on the
process's event loop and pooled connections. Several groups are in flight at a time, so while
one message is inside DATA the next ones of its account are already built, signed and claimed,
waiting for the connection (a hot connection), and every Redis step of a group is one round
trip for all its jobs.

Bounds: an account has at most 2 to 64 jobs in flight in one process (about 0.1 s of work) per
connection its pool has open, and as many for one more, within the pool's share of the account's
``max_connections`` (a slow account's backlog stays in its ready set for whichever worker's
connection comes free, and never hides other accounts' jobs); a paused account's jobs
go to its held list (worker/ops/health.py), unspent. A job whose last run died (its holder's
reaper put it back, counted) runs alone, and after ``max_attempts`` such runs is dead-lettered; a
group still running past the hard time limit gives its jobs back (worker/queue/process/liveness.py).
With nothing ready the thread sleeps until the bell rings (a producer, the delay queue, a
released hold) or a second has passed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.queue.broker.taskclock import TASKS
from worker.queue.process import liveness
from worker.queue.store.ready import BELL, ReadyQueues, taken_key

log = logging.getLogger("postroom.dispatch")

# Messages of one account a process keeps in flight per connection it works with: about
# HOT_WINDOW seconds of that connection's work, at least 2 (one sending, the next built, signed
# and claimed before its 250) and at most 64 (quick transactions: a group's Redis round trips are
# shared by many; the bench's 1 KB rows measured about a fifth less CPU per message than with 8).
# A slow server's backlog so waits in Redis, for whichever worker's connection is free next, and
# never hides other accounts' jobs.
MIN_DEPTH, MAX_DEPTH = 2, 64
UNKNOWN_DEPTH = 4  # before this process has timed a transaction of the account: neither hoard
HOT_WINDOW = 0.1  # a slow server's backlog nor starve a quick one for long (it is timed at once)
UNKNOWN_ROOM = 4  # an account no record names: its jobs are dead-lettered, a few at a time
IDLE_WAIT = 1.0


@dataclass(frozen=True)
class Taken:
    job_id: str
    account: str
    payload: Any  # the record's payload (None: the record is gone)
    cut_short: int  # runs of it that died before
    traceparent: str = ""  # the record's: the trace its attempt continues (worker/ops/tracing.py)


class Dispatcher:
    """Takes ready jobs for this process and runs them in groups (see the module docstring)."""

    def __init__(self, client: redis.Redis, settings: Any, *, groups: int | None = None) -> None:
        self.client = client
        self.settings = settings
        self.ready = ReadyQueues(client)
        self.holder = liveness.holder_id()
        self.groups = groups or settings.worker_concurrency
        self.executor = ThreadPoolExecutor(max_workers=self.groups, thread_name_prefix="postroom-send")
        self._lock = threading.Condition()
        self._running = 0  # groups under way
        self._paused = 0  # something runs alone in this process (see alone()): take nothing
        self._pending: Counter[str] = Counter()  # taken, not yet counted in flight by their group
        self._bell = threading.Event()
        self._stop = threading.Event()
        self._offset = 0
        self._wake_after: dict[str, int] = {}  # accounts short of room: wake after this many done
        self._freed: Counter[str] = Counter()
        self._held: set[str] = set()  # taken and not yet let go by a group of this process
        self._suspects: set[str] = set()  # held in Redis, not here, at the last look (strays)
        self._thread = threading.Thread(target=self._run, name="postroom-dispatch", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="postroom-bell", daemon=True)

    def start(self) -> Dispatcher:
        from worker.queue.process.runtime import get_runtime

        get_runtime().on_room = self._room_freed
        get_runtime().on_grown = self._room_grown
        self._listener.start()
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Take nothing more; let the running groups finish (up to ``timeout``)."""
        self._stop.set()
        self._bell.set()
        self._thread.join(timeout)
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ---- the taking thread ------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            with self._lock:
                while (self._running >= self.groups or self._paused) and not self._stop.is_set():
                    self._lock.wait(0.5)
            if self._stop.is_set():
                return
            try:
                taken = self._take()
                pause = 0.1
            except redis.RedisError as exc:
                log.warning("dispatch: could not take ready jobs (%s); again in %.1f s", exc, pause)
                self._stop.wait(pause)
                pause = min(pause * 2, 5.0)
                continue
            if not taken:
                self._bell.wait(IDLE_WAIT)
                self._bell.clear()
                continue
            together, alone = self._grouped(taken)
            if together:
                with self._lock:
                    self._running += 1
                self.executor.submit(self._run_group, together)
            for job in alone:  # a job whose last run died runs alone: nothing else runs beside it
                with self._lock:
                    while self._running and not self._stop.is_set():
                        self._lock.wait(0.5)
                    self._running += 1
                self._run_group([job])

    def _rooms(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many more jobs of each account this process may take now, and the depth behind
        each account's bound (see depth())."""
        from worker.queue.process.runtime import get_runtime

        runtime = get_runtime()
        with self._lock:
            pending = Counter(self._pending)
        records = runtime.cached_records()
        if records is None:  # the first look: read them now (else every account had UNKNOWN_ROOM,
            with contextlib.suppress(Exception):  # and a slow one's first round ran connections short)
                records = runtime.records()
        bounds: dict[str, int] = {}
        depths: dict[str, int] = {}
        for name, account in (records.accounts if records is not None else {}).items():
            cap = account.limits.max_connections
            here = runtime.connections(name)
            connections, seconds = (cap, 0.0) if here is None else (min(cap, here[0]), here[1])
            depths[name] = depth(seconds)
            bounds[name] = depths[name] * connections
        # an account no record names yet (or not in this process's cache yet) has UNKNOWN_ROOM
        names = {*bounds, *pending, *runtime.in_flight_accounts()}
        rooms = {
            name: max(0, bounds.get(name, UNKNOWN_ROOM) - runtime.in_flight(name) - pending[name])
            for name in names
        }
        return rooms, depths

    def _take(self) -> list[Taken]:
        room, depths = self._rooms()
        pairs = self.ready.take(
            self.holder, self.settings.coalesce, room, default_room=UNKNOWN_ROOM, offset=self._offset
        )
        self._offset += 1
        taken = Counter(account for _, account, _ in pairs)
        with self._lock:
            # accounts that used up their room may have more ready: a connection's worth of room
            # coming free wakes this thread (on_room), not only a whole group's end
            self._wake_after = {
                name: depths.get(name, MIN_DEPTH) for name, left in room.items() if taken[name] >= left
            }
            self._freed.clear()
            self._pending.update(taken)
            self._held.update(job_id for job_id, _, _ in pairs)
        if not pairs:
            return []
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for job_id, _, _ in pairs:
                    pipe.hmget(redis_key("job", job_id), "payload", "traceparent")
                fields: list[Any] = pipe.execute()
        except BaseException:  # taken in Redis, run by nobody here: give_back_strays() finds them
            with self._lock:
                self._held.difference_update(job_id for job_id, _, _ in pairs)
            raise
        return [
            Taken(job_id, account, _json(payload), cut_short, _text(traceparent or ""))
            for (job_id, account, cut_short), (payload, traceparent) in zip(pairs, fields, strict=True)
        ]

    def _room_freed(self, account: str) -> None:
        """A message of a group is done (on the loop, worker/queue/process/runtime.py releaser())."""
        with self._lock:
            step = self._wake_after.get(account)
            if step is None:
                return
            self._freed[account] += 1
            if self._freed[account] < step:
                return
            self._freed[account] = 0
        self._bell.set()

    def _room_grown(self, account: str) -> None:
        """The account's pool here took one more connection (on the loop): room for a
        connection's worth more of its jobs, if it had used up its room — a slow server's
        first round fills every connection without waiting for a message to finish."""
        with self._lock:
            if account not in self._wake_after:
                return
        self._bell.set()

    @staticmethod
    def _grouped(taken: list[Taken]) -> tuple[list[Taken], list[Taken]]:
        """The jobs that ran fine so far (one group), and those whose last run died (each alone)."""
        return [t for t in taken if not t.cut_short], [t for t in taken if t.cut_short]

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Run the block with nothing else under way in this process: no group running, none
        taken meanwhile (the inbox takes an entry a reader already died on in with it: should it
        kill the process again, no send is caught between its server's 250 and its sent mark)."""
        with self._lock:
            self._paused += 1
            while self._running and not self._stop.is_set():
                self._lock.wait(0.5)
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._lock.notify_all()
            self._bell.set()

    # ---- a group, on one of the executor's threads ----------------------------------------

    def _run_group(self, group: list[Taken]) -> None:
        from worker.queue.pipeline.attempts import attempt_all, cut_short_too_often
        from worker.queue.process.runtime import get_runtime

        accounts = [t.account for t in group]
        ids = [t.job_id for t in group]
        try:
            with get_runtime().reserving(accounts):
                with self._lock:
                    self._pending.subtract(accounts)
                    self._pending += Counter()  # drop the zeros
                TASKS.started(None)
                TASKS.carrying(ids)
                runnable = [t for t in group if t.payload is not None]
                if len(group) == 1 and group[0].cut_short:  # it runs alone now: a death counts again
                    with self.client.pipeline(transaction=False) as pipe:
                        self.ready.running_into(pipe, self.holder, [(ids[0], group[0].account)])
                        pipe.execute()
                    if group[0].payload is not None:
                        done = cut_short_too_often(ids[0], group[0].payload, runs=group[0].cut_short)
                        runnable = [] if done is not None else runnable

                def release(pipe: Any) -> None:  # in the group's last round trip
                    self.ready.done_into(pipe, self.holder, ids)

                if runnable:
                    attempt_all(
                        [t.job_id for t in runnable],
                        [t.payload for t in runnable],
                        also=release,
                        traces=[t.traceparent for t in runnable],
                    )
                else:
                    self._release(ids)
        except Exception:
            log.exception("dispatch: a group of %d jobs failed; they go back to their ready sets", len(ids))
            with contextlib.suppress(redis.RedisError):
                self.ready.restore(self.holder, ids, cut_short=False)
        finally:
            TASKS.finished()
            with self._lock:
                self._held.difference_update(ids)  # let go here; what Redis still holds is a stray
                self._running -= 1
                self._lock.notify_all()
            self._bell.set()  # room came free: take again now, not at the next bell

    def give_back_strays(self) -> int:
        """Jobs this process's taken set holds in Redis that no group here runs or will run, back
        to their ready sets. A take or a group cut off by a Redis error half-way (Redis restarted,
        and its answer or the give-back was lost) leaves them there, and a live holder's jobs are
        never reaped: they would wait for good. A job is a stray only when seen so at two looks in
        a row (one just taken is counted here within milliseconds of its take)."""
        in_redis = {_text(j) for j in cast(list[Any], self.client.hkeys(taken_key(self.holder)))}
        with self._lock:
            strays = in_redis - self._held
        again, self._suspects = strays & self._suspects, strays
        if not again:
            return 0
        back = self.ready.restore(self.holder, sorted(again), cut_short=False)
        log.warning("dispatch: %d taken jobs no group here was running went back to their ready sets", back)
        return back

    def _release(self, ids: list[str]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            self.ready.done_into(pipe, self.holder, ids)
            pipe.execute()

    # ---- the bell -----------------------------------------------------------------------

    def _listen(self) -> None:
        """Wake the taking thread whenever work arrives (a publish on the bell channel)."""
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(BELL)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._bell.set()
            except redis.RedisError:
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()


def depth(send_seconds: float) -> int:
    """Messages to keep in flight per connection, for transactions that take ``send_seconds``
    (0.0: not timed yet)."""
    if send_seconds <= 0:
        return UNKNOWN_DEPTH
    return max(MIN_DEPTH, min(MAX_DEPTH, 1 + math.ceil(HOT_WINDOW / send_seconds)))


def _json(raw: Any) -> Any:
    import json

    if raw is None:
        return None
    try:
        return json.loads(_text(raw))
    except ValueError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
