"""The one interface every delivery transport implements.

The delivery pipeline only ever talks to a :class:`Transport`; SMTP and Graph
differ behind it. Transports raise only :mod:`worker.errors` delivery errors
(library exceptions are translated at this boundary).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.db.vocabulary import RecipientState
from worker.errors import RecipientStatus, Superseded


@dataclass(frozen=True)
class OutgoingMessage:
    """A rendered message and its envelope."""

    message_id: str
    sender: str  # envelope sender (MAIL FROM)
    recipients: tuple[str, ...]  # envelope recipients: to + cc + bcc
    data: bytes  # the RFC 5322 message, CRLF line endings
    # the DSN envelope id (RFC 3461 ENVID) where the server offers DSN: the job id, which comes
    # back in a bounce report so the bounce reader can find the job (worker/queue/events/reports_reader.py)
    envelope_id: str | None = field(default=None, kw_only=True)
    # asked right before the transaction starts (after every wait: limiter, pool slot,
    # connection): False means the attempt no longer holds its job, and the transport raises
    # worker.errors.Superseded instead of sending. None: nothing to ask (a health check).
    fence: Callable[[], Awaitable[bool]] | None = field(default=None, compare=False)

    async def still_ours(self) -> None:
        """Raise :class:`~worker.errors.Superseded` unless the fence says the attempt holds its job."""
        if self.fence is not None and not await self.fence():
            raise Superseded(f"{self.message_id}: another attempt holds this job now; nothing sent")

    def __repr__(self) -> str:
        return (
            f"OutgoingMessage(message_id={self.message_id!r}, sender={self.sender!r}, "
            f"recipients={len(self.recipients)}, size={len(self.data)})"
        )


@dataclass
class SendResult:
    """Per-recipient outcome of one delivery attempt that reached the server."""

    transport: str
    security: str  # e.g. "STARTTLS TLSv1.3", "SMTPS TLSv1.3", "none"
    recipients: dict[str, RecipientStatus] = field(default_factory=dict)

    def by_status(self, status: str) -> list[str]:
        return [addr for addr, r in self.recipients.items() if r.status == status]

    @property
    def accepted(self) -> list[str]:
        return self.by_status(RecipientState.SENT)

    @property
    def deferred(self) -> list[str]:
        return self.by_status(RecipientState.DEFERRED)

    @property
    def failed(self) -> list[str]:
        return self.by_status(RecipientState.FAILED)


@dataclass
class ConnectivityReport:
    """What ``postroom test-connectivity`` prints and the health check stores."""

    account: str
    ok: bool
    result: str  # the contract §6 line, e.g. "SMTP (Connect using STARTTLS)"
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    checked_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "ok": self.ok,
            "result": self.result,
            "checked_at": self.checked_at,
            "detail": self.detail,
            "error": self.error,
        }


class Transport(Protocol):
    name: str

    async def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver once; raise a DeliveryError when no recipient was accepted."""
        ...

    async def check(self) -> ConnectivityReport:
        """Connect and authenticate without sending anything."""
        ...

    async def aclose(self) -> None:
        """Close every connection this transport holds."""
        ...
