"""The half of an SMTP pool that shares the account's connection slots with the pools of
every other worker process (:mod:`worker.transports.limits` keeps the slots in Redis).

Each connection holds a leased slot; the pool renews the leases, keeps to an even share
while other pools are busy too, steps out of the shares when idle, and lets a send that
waited long enough stretch into a slot another pool left idle.
:class:`~worker.transports.smtp.pool.SmtpTransport` is one (this is its mixin): the pool's own
connections, idle list and waiting sends stay there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from worker.errors import LimitWait
from worker.records.account.account import EmailAccount
from worker.transports.limits import DEMAND_GRACE, SHARE_PATIENCE, SLOT_RENEW, WANTED_CHECK, Limiter
from worker.transports.smtp.session import SmtpConnection

log = logging.getLogger("postroom.smtp")

NO_SLOT = object()  # "no account slot free right now"


class SlotShares:
    """Slot leasing and sharing for a pool (state owned by the pool, see its __init__)."""

    account: EmailAccount
    limiter: Limiter | None
    max_connections: int
    _user: str  # this pool, in the account's shares
    _live: dict[int, SmtpConnection]
    _idle: list[SmtpConnection]
    _count: int
    _share: int
    _waiting: int
    _last_demand: float
    _stretching: bool
    _stretched: float
    _closed: bool

    def _condition(self) -> asyncio.Condition:  # pragma: no cover - the pool's
        raise NotImplementedError

    async def _close(self, conn: SmtpConnection, *, polite: bool = True) -> None:  # pragma: no cover
        raise NotImplementedError

    async def _try_slot(self, deadline: float) -> object:
        """One of the account's connection slots: its token, None when unlimited, or NO_SLOT
        (LimitWait once ``deadline`` passed: the send is re-scheduled, no attempt spent)."""
        if self.limiter is None:
            return None
        token = self.limiter.new_token()
        if await self.limiter.try_slot(self.account.name, self.max_connections, token, user=self._user):
            return token
        if time.monotonic() > deadline:
            raise LimitWait(
                f"all {self.max_connections} connection slots of the account are in use by other workers",
                account=self.account.name,
                transport="smtp",
                retry_after=1.0,
            )
        return NO_SLOT

    def _could_stretch(self) -> bool:
        """Shared slots, and room in this pool for one more connection than it has."""
        return self.limiter is not None and self._count < self.max_connections

    def _may_stretch(self, asked: float) -> bool:
        now = time.monotonic()
        return (
            self._could_stretch()
            and not self._stretching
            and now - asked > SHARE_PATIENCE
            and now - self._stretched > SHARE_PATIENCE
        )

    async def _stretch(self) -> object:
        """A send that waited SHARE_PATIENCE at this pool's share asks for one more of the
        account's slots: free, or given up by another pool's connection that sat idle that long
        (asking sets the wanted flag it watches). One send of a pool asks at a time, at most
        every SHARE_PATIENCE. Without it, a message could wait a whole round of a slow server
        for this pool's connections while another pool's sat idle (one of the last ten of 100
        did, in the slow-1 bench)."""
        assert self.limiter is not None
        self._stretching, self._stretched = True, time.monotonic()
        try:
            token = self.limiter.new_token()
            name, cap = self.account.name, self.max_connections
            return token if await self.limiter.try_slot(name, cap, token, user=self._user) else NO_SLOT
        finally:
            self._stretching = False

    async def _release_slot(self, token: str) -> None:
        if self.limiter is not None:
            with contextlib.suppress(Exception):  # a lost release lapses with its lease
                await self.limiter.release_slot(self.account.name, token)

    async def _renew(self) -> None:
        """Keep the leases of this pool's connections alive, and keep to this pool's share of
        the account's slots while other pools use them too (idle extra connections close now,
        busy ones when their message is done)."""
        assert self.limiter is not None
        renewed = time.monotonic()
        while self._live and not self._closed:
            await asyncio.sleep(WANTED_CHECK)
            await self._drop_strays()
            try:
                # a pool in demand claims its share; one with nothing to do steps out of them
                user, leaving = (self._user, "") if self._in_demand() else ("", self._user)
                if time.monotonic() - renewed >= SLOT_RENEW:
                    tokens = [c.slot for c in self._live.values() if c.slot is not None]
                    pools, wanted = await self.limiter.renew_slots(
                        self.account.name, tokens, user, leaving=leaving
                    )
                    renewed = time.monotonic()
                else:
                    pools, wanted = await self.limiter.sharing(self.account.name, user, leaving=leaving)
            except Exception:  # Redis trouble: if it lasts, the leases lapse and others may connect
                log.warning("account %s: could not renew connection slots", self.account.name)
                continue
            if self._in_demand():  # sending: an even share
                self._share = -(-self.max_connections // pools)
            else:  # nothing to send lately: keep the connections only while nobody waits
                self._share = 0 if wanted else self.max_connections
            extra = len(self._live) - self._share
            if extra <= 0 and wanted and not self._waiting:  # another pool waits: what sat idle goes
                now = time.monotonic()
                extra = sum(1 for c in self._idle if now - c.last_used > SHARE_PATIENCE)
            if extra > 0 and self._idle:
                cond = self._condition()
                async with cond:
                    idle, self._idle = self._idle[:extra], self._idle[extra:]
                try:
                    for conn in idle:
                        await self._close(conn)
                finally:
                    async with cond:
                        self._count -= len(idle)
                        cond.notify_all()

    async def _drop_strays(self) -> None:
        """Give up connections whose socket is gone and that wait in no idle list: one a send
        holds will be closed and uncounted by that send as well; one nobody holds any more (seen
        after a Redis restart followed by the server's: every slot of the account kept leased by
        dead connections for about a minute) would otherwise have its slot renewed for good."""
        idle = {id(c) for c in self._idle}
        strays = [c for key, c in self._live.items() if not c.usable and key not in idle]
        for conn in strays:
            self._live.pop(id(conn), None)
            conn.client.close()
            if conn.slot is not None:
                token, conn.slot = conn.slot, None
                await asyncio.shield(self._release_slot(token))
        if strays:
            log.info("account %s: gave up %d dead connections", self.account.name, len(strays))

    def _in_demand(self) -> bool:
        """Sends wait for a connection or hold one, or one did within DEMAND_GRACE. (Sends that
        have waited a while count too: judged by the last ask alone, two pools whose sends all
        wait would each think itself idle, hand its share to the other and keep one connection
        each.) A pool with nothing to do steps out of the account's shares at once: the others
        take its connections' slots within a second, not after USER_TTL (a slow server's last
        messages waited on half the connections)."""
        busy = self._count > len(self._idle)
        return self._waiting > 0 or busy or time.monotonic() - self._last_demand < DEMAND_GRACE
