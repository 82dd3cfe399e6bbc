"""The per-account SMTP pool the delivery pipeline uses: :class:`SmtpTransport`.

Bounded, reusing connections (:class:`~worker.transports.smtp.session.SmtpConnection`),
checking idle ones with NOOP, retiring them by age and message count, and
retrying a message once on a fresh connection when a reused one was dropped or
answered 421 before anything was accepted. With a limiter, every connection
holds one of the account's slots (:mod:`worker.transports.limits`; the sharing is
:mod:`worker.transports.smtp.shares`) and the pools
of all worker processes share them: even shares, an idle pool stepping out, a
waiting send stretching into another pool's idle slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from worker.errors import (
    ConnectionFailed,
    DeliveryError,
    LimitWait,
    Superseded,
)
from worker.records.account.account import EmailAccount
from worker.transports.base import ConnectivityReport, OutgoingMessage, SendResult
from worker.transports.limits import (
    SHARE_PATIENCE,
    SLOT_POLL,
    Limiter,
)
from worker.transports.oauth import TokenSource
from worker.transports.smtp.auth import TokenProvider
from worker.transports.smtp.session import RetryOnFresh, SmtpConnection
from worker.transports.smtp.shares import NO_SLOT, SlotShares

log = logging.getLogger("postroom.smtp")

CHECK_SLOT_WAIT = 2.0  # a health check waits this long for a connection slot, else reports busy
POOL_RECHECK = 1.0  # a send waiting for one of its pool's connections looks again this often


class SmtpTransport(SlotShares):
    """The per-account SMTP connection pool (one per account per worker process)."""

    name = "smtp"

    def __init__(
        self,
        account: EmailAccount,
        *,
        cadata: str | None = None,
        token_provider: TokenProvider | None = None,
        token_source: TokenSource | None = None,
        max_connections: int | None = None,
        max_messages_per_connection: int = 1000,
        max_connection_age: float = 300.0,
        idle_check_after: float = 10.0,
        idle_timeout: float = 60.0,
        limiter: Limiter | None = None,
    ) -> None:
        if account.smtp is None:
            raise ValueError(f"account {account.name} has no SMTP settings")
        self.limiter = limiter  # the account's connection cap across every worker (None: this pool only)
        self._live: dict[int, SmtpConnection] = {}  # every open connection, idle or busy
        self._heartbeat: asyncio.Task[None] | None = None
        self._user = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"  # this pool, for the shares
        self.account = account
        self.endpoint = account.smtp
        self._cadata = cadata
        self._token_provider = token_provider
        self._token_source = token_source
        self.max_connections = max_connections or account.limits.max_connections
        # told when this pool takes one more connection: the dispatcher may take more of its jobs
        self.on_grown: Callable[[], None] | None = None
        self._share = self.max_connections  # connections this pool may keep (less while shared)
        self._last_demand = 0.0  # when a send last asked this pool for a connection
        self._waiting = 0  # sends waiting for a connection right now (demand, however long they wait)
        self._stretching = False  # a send asks for a slot beyond this pool's share (see _stretch)
        self._stretched = 0.0  # when one last did (a pool asks at most every SHARE_PATIENCE)
        self._watching = False  # a waiting send looks every SHARE_PATIENCE for one to take
        self.max_messages_per_connection = max_messages_per_connection
        self.max_connection_age = max_connection_age
        self.idle_check_after = idle_check_after
        self.idle_timeout = idle_timeout
        self._idle: list[SmtpConnection] = []
        self._count = 0  # open + opening connections
        self._cond: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._reaping: list[SmtpConnection] = []
        self._retiring: set[asyncio.Task[None]] = set()  # connections closing in the background
        self._closed = False
        self.connections_opened = 0
        self.send_seconds = 0.0  # how long a transaction takes here, smoothed (0: none yet)

    def __repr__(self) -> str:
        return (
            f"SmtpTransport(account={self.account.name!r}, host={self.endpoint.host!r}, "
            f"port={self.endpoint.port}, open={self._count}/{self.max_connections})"
        )

    @property
    def open_connections(self) -> int:
        return self._count

    def _grew(self) -> None:
        if self.on_grown is not None:
            with contextlib.suppress(Exception):  # a hook's trouble is never a send's
                self.on_grown()

    @property
    def connections_here(self) -> int:
        """The connections this pool works with: those open and one more, within its share of
        the account's slots (the dispatcher takes work for this many, worker/queue/pipeline/dispatch.py)."""
        return min(self.max_connections, max(1, self._share), self._count + 1)

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _open(self, *, slot: object = None, slot_wait: float | None = None) -> SmtpConnection:
        """A new connection, holding one of the account's connection slots when limited
        (``slot``: one the caller already holds)."""
        token = slot if isinstance(slot, str) else None
        if self.limiter is not None and token is None:
            token = self.limiter.new_token()
            wait = {} if slot_wait is None else {"wait": slot_wait}
            await self.limiter.acquire_slot(
                self.account.name, self.max_connections, token, user=self._user, **wait
            )
        try:
            conn = await SmtpConnection.open(
                self.account.name, self.endpoint, cadata=self._cadata, token_provider=self._token_provider
            )
        except BaseException:
            if token is not None:
                await asyncio.shield(self._release_slot(token))
            raise
        conn.slot = token
        self._live[id(conn)] = conn
        self.connections_opened += 1
        if token is not None and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew())
        return conn

    async def _close(self, conn: SmtpConnection, *, polite: bool = True) -> None:
        """Close a connection and give its slot back."""
        try:
            await conn.close(polite=polite)
        finally:
            self._live.pop(id(conn), None)
            if conn.slot is not None:
                token, conn.slot = conn.slot, None
                await asyncio.shield(self._release_slot(token))

    async def _retire(self, conn: SmtpConnection, *, polite: bool = True) -> None:
        """Close a connection and free its place in the pool, even when cancelled half-way
        through its QUIT (a place never freed would shrink the pool for good)."""
        try:
            await self._close(conn, polite=polite)
        finally:
            await asyncio.shield(self._forget())

    async def _retire_quietly(self, conn: SmtpConnection) -> None:
        try:
            await self._retire(conn)
        except Exception as exc:  # the connection is gone either way
            log.debug("account %s: closing a connection: %s", self.account.name, exc)

    def _expired(self, conn: SmtpConnection, now: float) -> bool:
        return (
            not conn.usable
            or now - conn.created_at > self.max_connection_age
            or conn.messages >= self.max_messages_per_connection
            or now - conn.last_used > self.idle_timeout
        )

    def _take_idle(self, now: float, to_close: list[SmtpConnection]) -> SmtpConnection | None:
        """The most recently used idle connection not expired; expired ones go to ``to_close``."""
        while self._idle:
            conn = self._idle.pop()  # most recently used first
            if not self._expired(conn, now):
                return conn
            to_close.append(conn)
            self._count -= 1
        return None

    async def _acquire(self, *, fresh: bool = False) -> SmtpConnection:
        """A connection for one transaction; ``fresh`` skips idle ones (used for the retry)."""
        self._waiting += 1
        try:
            return await self._acquire_waiting(fresh=fresh)
        finally:
            self._waiting -= 1
            self._last_demand = time.monotonic()

    async def _acquire_waiting(self, *, fresh: bool) -> SmtpConnection:
        asked = self._last_demand = time.monotonic()
        if self._closed:
            raise ConnectionFailed("transport is closed", account=self.account.name, transport="smtp")
        cond = self._condition()
        deadline = time.monotonic() + (self.limiter.slot_wait if self.limiter is not None else 0.0)
        slot_pause = SLOT_POLL
        token: object = None
        while True:
            to_close: list[SmtpConnection] = []
            reuse: SmtpConnection | None = None
            async with cond:
                watched = False  # this send was the pool's watcher in its last wait
                while True:
                    now = time.monotonic()
                    if not fresh:
                        reuse = self._take_idle(now, to_close)
                        if reuse is not None:
                            break
                    # a share of 0 (handed over while idle) is for idle times: with a send
                    # waiting, one connection may always be asked for (the slots still cap it)
                    if self._count < min(self.max_connections, max(1, self._share)):
                        # room here; with a limiter, also one of the account's slots (asked without
                        # waiting: a connection of this pool may come free first, see below)
                        token = await self._try_slot(deadline)
                        if token is not NO_SLOT:
                            self._count += 1  # reserve a place for the new connection
                            self._grew()
                            break
                        with contextlib.suppress(TimeoutError):  # woken by a released connection,
                            await asyncio.wait_for(cond.wait(), slot_pause)  # or ask again
                        slot_pause = min(slot_pause * 2, 0.1)
                        continue
                    if fresh and self._idle:
                        to_close.append(self._idle.pop(0))  # make room: close the oldest idle
                        self._count -= 1
                        continue
                    if self._may_stretch(asked):
                        token = await self._stretch()
                        if token is not NO_SLOT:
                            self._count += 1
                            self._grew()
                            break
                    # woken when a connection comes free; and looking again now and then, since
                    # a wake-up taken by a waiter cancelled at that moment is lost (Python < 3.13)
                    # one waiter of the pool looks often, for a slot to stretch into; the rest
                    # (hundreds, in a batch) would wake four times a second for nothing
                    watched = not self._watching and self._could_stretch()
                    self._watching = self._watching or watched
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(cond.wait(), SHARE_PATIENCE if watched else POOL_RECHECK)
                    finally:
                        if watched:
                            self._watching = False
                if watched and self._waiting > 1:
                    # the watcher leaves with a connection: wake another waiter to watch in its
                    # place (else the rest wait POOL_RECHECK before one looks for a slot again:
                    # the last messages of a slow server's round waited a whole round for it)
                    cond.notify(1)
            for conn in to_close:
                await self._close(conn)
            if reuse is None:
                try:
                    return await self._open(slot=token)
                except BaseException:
                    await asyncio.shield(self._forget())
                    raise
            try:
                alive = time.monotonic() - reuse.last_used <= self.idle_check_after or await reuse.noop()
            except BaseException:  # cancelled mid-NOOP: drop the connection, keep the slot count right
                await self._discard(reuse)
                raise
            if alive:
                return reuse
            log.debug("account %s: idle connection did not answer NOOP; replacing it", self.account.name)
            await self._retire(reuse)

    async def _discard(self, conn: SmtpConnection) -> None:
        """Close a connection whose state is unknown (e.g. cancelled mid-transaction)."""
        conn.client.close()
        self._live.pop(id(conn), None)
        try:
            if conn.slot is not None:
                token, conn.slot = conn.slot, None
                await asyncio.shield(self._release_slot(token))
        finally:
            await asyncio.shield(self._forget())

    async def _forget(self) -> None:
        cond = self._condition()
        async with cond:
            self._count -= 1
            cond.notify()

    async def _release(self, conn: SmtpConnection) -> None:
        # a send just finished: more may follow; the connection is idle from now
        self._last_demand = conn.last_used = now = time.monotonic()
        # other pools wait for the account's slots: close the one over the share (not every
        # connection released while the first one's QUIT is still under way)
        over_share = len(self._live) - len(self._retiring) > self._share
        if self._closed or over_share or self._expired(conn, now):
            # closed in the background: the caller (whose next step is the sent mark) does not
            # wait for the server's answer to QUIT
            task = asyncio.get_running_loop().create_task(self._retire_quietly(conn))
            self._retiring.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(self._retiring.discard)
            return
        cond = self._condition()
        async with cond:
            self._idle.append(conn)
            cond.notify()
        self._ensure_reaper()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close idle connections after ``idle_timeout``; ends when none are idle.

        Expired connections leave the idle list at once (nobody can pick them)
        but keep their pool slot until their QUIT is done.
        """
        cond = self._condition()
        while self._idle and not self._closed:
            await asyncio.sleep(min(self.idle_timeout, 5.0))
            now = time.monotonic()
            async with cond:
                self._reaping = [c for c in self._idle if self._expired(c, now)]
                self._idle = [c for c in self._idle if c not in self._reaping]
            try:
                for conn in self._reaping:
                    await self._close(conn)
            finally:
                async with cond:
                    self._count -= len(self._reaping)
                    self._reaping = []
                    cond.notify_all()

    async def send(self, message: OutgoingMessage) -> SendResult:
        for attempt in (1, 2):
            conn = await self._acquire(fresh=attempt == 2)
            try:
                await message.still_ours()  # after every wait, right before MAIL FROM
                began = time.monotonic()
                result = await conn.send(message)
                took = time.monotonic() - began
                self.send_seconds = took if not self.send_seconds else 0.8 * self.send_seconds + 0.2 * took
            except RetryOnFresh as retry:
                await self._retire(conn)
                if attempt == 2:
                    raise retry.error from None
                log.info(
                    "account %s: %s; retrying once on a fresh connection", self.account.name, retry.error
                )
                continue
            except (DeliveryError, Superseded):  # a classified answer (the connection was reset or
                await self._release(conn)  # closed), or nothing sent at all: the connection is fine
                raise
            except BaseException:  # cancelled or a bug mid-transaction: never reuse that connection
                await self._discard(conn)
                raise
            await self._release(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def check(self) -> ConnectivityReport:
        """Connect, secure, authenticate, NOOP, QUIT — nothing is sent."""
        report = ConnectivityReport(self.account.name, ok=False, result=self.endpoint.security_label)
        started = time.monotonic()
        report.detail = {"host": self.endpoint.host, "port": self.endpoint.port}
        try:
            conn = await self._open(slot_wait=CHECK_SLOT_WAIT)
        except LimitWait as exc:  # every connection is delivering: the check would break the cap
            report.ok = True
            report.detail["skipped"] = f"not connected: {exc.reason}"
        except DeliveryError as exc:
            report.error = str(exc)
            report.detail["error_class"] = type(exc).__name__
        else:
            try:
                report.ok = await conn.noop()
                if not report.ok:
                    report.error = "server did not answer NOOP"
                report.detail = conn.describe()
            finally:
                await self._close(conn)
        if self._token_source is not None and "skipped" not in report.detail:
            report.detail["oauth"] = self._token_source.describe()
        report.detail["duration_ms"] = round((time.monotonic() - started) * 1000)
        return report

    async def aclose(self) -> None:
        self._closed = True
        if self._reaper is not None:
            if not self._reaping:  # asleep: wake it to end; closing: let it finish its QUITs
                self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        for conn in idle:
            await self._close(conn)
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
