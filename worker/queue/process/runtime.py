"""One asyncio loop per worker process, and the per-account transports living on it.

Celery task bodies are synchronous and may run on several threads of one
process at once. The loop runs in its own daemon thread, created lazily in the
process that uses it (so after the prefork pool forks: a loop never crosses a
fork), and tasks hand it coroutines with ``run_coroutine_threadsafe``. The
account pools are bound to that loop and shared by every task of the process;
``asyncio.run()`` per task would throw the pools away each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from worker.queue.broker.process_state import this_process
from worker.queue.store.marks import AsyncMarks
from worker.records.account.account import EmailAccount
from worker.records.loader import Records
from worker.transports.base import Transport
from worker.transports.factory import build_transport
from worker.transports.limits import Limiter

T = TypeVar("T")
log = logging.getLogger("postroom.runtime")
CANCEL_WAIT_SECONDS = 10.0


class Runtime:
    """The process's event loop thread, record cache and transports."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="postroom-loop", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._records = Records.cache()
        self._transports: dict[str, tuple[EmailAccount, Transport]] = {}
        self._marks: AsyncMarks | None = None
        self._limiter: Limiter | None = None
        self._in_flight: Counter[str] = Counter()  # messages per account being delivered now
        self._reserved = threading.local()  # per group thread: its taken jobs, counted already
        self.on_room: Callable[[str], None] | None = None  # a reserved message is done (the dispatcher)
        self.on_grown: Callable[[str], None] | None = None  # a pool took one more connection (the same)

    def marks(self, redis_url: str, job_ttl: float, sent_as_ttl: float) -> AsyncMarks:
        """The async Redis client batches mark sent messages with, bound to this loop."""
        with self._lock:
            if self._marks is None:
                self._marks = AsyncMarks(redis_url, job_ttl, sent_as_ttl)
            return self._marks

    def limiter(self, redis_url: str, job_ttl: float, sent_as_ttl: float, slot_wait: float) -> Limiter:
        """The account limits shared with every worker (on the marks' async Redis client)."""
        marks = self.marks(redis_url, job_ttl, sent_as_ttl)
        with self._lock:
            if self._limiter is None:
                self._limiter = Limiter(marks.redis, slot_wait=slot_wait)
            return self._limiter

    def in_flight_accounts(self) -> list[str]:
        """The accounts with a message in flight in this process right now."""
        with self._lock:
            return list(self._in_flight)

    def in_flight(self, account: str) -> int:
        """Messages of ``account`` this process is delivering (or waiting to) right now."""
        with self._lock:
            return self._in_flight[account]

    @contextlib.contextmanager
    def sending(self, accounts: list[str]) -> Iterator[None]:
        """Count these messages as in flight while the block runs (those this thread reserved
        when its group was taken are counted already)."""
        with self._counted(Counter(accounts) - self._held()):
            yield

    @contextlib.contextmanager
    def reserving(self, accounts: list[str]) -> Iterator[None]:
        """Count a group's taken jobs as in flight while it runs (worker/queue/pipeline/dispatch.py): the
        dispatcher must see them, or one process takes far more than its bound of an account's
        backlog (and another worker finds nothing left to take)."""
        counts = Counter(accounts)
        before = self._held()
        held = self._reserved.counts = before + counts  # released() takes from it, message by message
        with self._lock:
            self._in_flight.update(counts)
        try:
            yield
        finally:
            self._reserved.counts = before
            with self._lock:
                left = held - before
                self._in_flight.subtract(left)
                for name in left:
                    if self._in_flight[name] <= 0:
                        del self._in_flight[name]

    def releaser(self) -> Callable[[str], None]:
        """For the loop, from a group's thread: counts one of the group's messages out of flight as
        soon as it is done, while the rest of its group may run on for seconds (a slow server):
        the dispatcher sees the room at once and ``on_room`` hears of it."""
        held = getattr(self._reserved, "counts", None)
        if not held:
            return lambda account: None

        def release(account: str) -> None:
            with self._lock:
                if held[account] <= 0:
                    return
                held[account] -= 1
                self._in_flight[account] -= 1
                if self._in_flight[account] <= 0:
                    del self._in_flight[account]
            if self.on_room is not None:
                self.on_room(account)

        return release

    def _held(self) -> Counter[str]:
        return getattr(self._reserved, "counts", None) or Counter()

    @contextlib.contextmanager
    def _counted(self, counts: Counter[str]) -> Iterator[None]:
        with self._lock:
            self._in_flight.update(counts)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.subtract(counts)
                for name in counts:
                    if self._in_flight[name] <= 0:
                        del self._in_flight[name]

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the process loop from a task thread and wait for it.

        When the wait ends early (the timeout, Celery's soft time limit, any
        exception in this thread) the coroutine is cancelled and, for a few
        seconds, waited for: its claims must not be released while a send it
        started may still be running.
        """
        started, finished = threading.Event(), threading.Event()

        async def guarded() -> T:
            started.set()
            try:
                return await coro
            finally:
                finished.set()

        future = self.submit(guarded())
        try:
            return future.result(timeout)
        except BaseException as exc:
            if isinstance(exc, TimeoutError):  # where it hangs, for the log (names and lines only)
                log.warning("loop work timed out after %ss, waiting in %s", timeout, awaiting(coro))
            future.cancel()
            if started.is_set():  # it may have a send under way: let the cancellation land
                finished.wait(CANCEL_WAIT_SECONDS)
            raise

    # ---- records: re-read only when a file changed ---------------------------------

    def cached_records(self) -> Records | None:
        """The cache as it is (None before the first look), without counting as a look: the
        dispatcher asks for the accounts' limits every second, and a send must still see a
        record edited a moment ago."""
        return self._records.peek()

    def records(self, *, fresh: bool = False) -> Records:
        """The cached records, re-read when a file changed (worker/records/loader.py,
        RecordCache; ``fresh`` when a job names an account the cache lacks)."""
        return self._records.get(fresh=fresh)

    def transport(self, account: EmailAccount) -> Transport:
        """The pooled transport for ``account``; replaced when its record changed."""
        with self._lock:
            cached = self._transports.get(account.name)
            if cached is not None and (cached[0] is account or cached[0] == account):
                return cached[1]
            records = self._records.peek() or self._records.get()
            transport = build_transport(account, records, limiter=self._limiter)
            if hasattr(transport, "on_grown"):  # more connections: room for more of its jobs
                transport.on_grown = lambda name=account.name: self._grown(name)
            self._transports[account.name] = (account, transport)
        if cached is not None:
            self.submit(cached[1].aclose())
        return transport

    def _grown(self, account: str) -> None:
        if self.on_grown is not None:
            self.on_grown(account)

    def connections(self, account: str) -> tuple[int, float] | None:
        """The connections of ``account`` this process works with (its pool's ``connections_here``)
        and how long a transaction takes on them (0.0: not known yet): (1, 0.0) before it has a
        pool, None when its transport has no connections to count (Graph)."""
        with self._lock:
            cached = self._transports.get(account)
        if cached is None:
            return 1, 0.0
        count = getattr(cached[1], "connections_here", None)
        if not isinstance(count, int):
            return None
        seconds = getattr(cached[1], "send_seconds", 0.0)
        return count, seconds if isinstance(seconds, float) else 0.0

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            transports = [t for _, t in self._transports.values()]
            self._transports.clear()

        marks, self._marks = self._marks, None
        self._limiter = None

        async def close_all() -> None:
            await asyncio.gather(*(t.aclose() for t in transports), return_exceptions=True)
            if marks is not None:
                await marks.aclose()

        if self.loop.is_running():
            with contextlib.suppress(TimeoutError):
                self.run(close_all(), timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()


def get_runtime() -> Runtime:
    """This process's runtime, created on first use (and anew in a forked child)."""
    return this_process().once("runtime", Runtime)


def shutdown_runtime() -> None:
    runtime = this_process().drop("runtime")
    if runtime is not None:
        runtime.close()


def awaiting(coro: Any) -> str:
    """The chain of coroutines ``coro`` is suspended in, innermost last (``name:line > …``)."""
    parts: list[str] = []
    obj = coro
    while obj is not None and len(parts) < 40:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is None:  # a future or a gather: where the chain of coroutines ends
            parts.append(type(obj).__name__)
            break
        parts.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return " > ".join(parts)
