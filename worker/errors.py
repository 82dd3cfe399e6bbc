"""Postroom's exception family.

Configuration problems (a bad record, a secret that cannot be resolved) are
deliberately *outside* the delivery family: they are the operator's to fix,
not the server's to answer. Delivery errors carry what the server said and are
split by what the job layer must do with them::

    PostroomError
    ├── ConfigurationError            record/secret problems (never retried)
    │   └── RecordError               ``file:line: field: reason`` (one or many)
    ├── Superseded                    the attempt no longer holds its job: nothing was sent
    └── DeliveryError                 carries account, transport, code, enhanced status, text
        ├── TransientError            retry with backoff
        │   ├── ConnectionFailed      refused / timeout / lost / TLS handshake I/O
        │   ├── ServerBusy            421 / 432: that connection is closed too
        │   └── LimitWait             a provider limit: re-scheduled, no attempt spent
        └── PermanentError            dead letter, no retry
            ├── Rejected              5xx answers
            ├── AuthenticationFailed  535 (flags the account)
            └── SecurityPolicyError   no STARTTLS, TLS below minimum, untrusted cert

Retries exhausted (max attempts or max age) is no exception: the attempt policy
(worker/queue/pipeline/attempts.py) turns the last retrying outcome into a dead one.

Nothing in this module ever formats a secret: errors are built from server
replies and record field names only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

# Transient: every 4xx reply and every enhanced 4.x.x (contract §3 names 421, 432, 450, 451,
# 452, 454; RFC 5321 makes every 4xx so): see classify_smtp_reply.

# Replies after which the server is going away: the connection must not be reused.
CLOSING_SMTP_CODES = frozenset({421, 432})
AUTH_FAILURE_CODES = frozenset({534, 535})


class PostroomError(Exception):
    """Base of everything Postroom raises on purpose."""


class ConfigurationError(PostroomError):
    """Something an operator must fix in a record, a secret or the settings."""


@dataclass(frozen=True)
class RecordProblem:
    """One ``file:line: field: reason`` finding; a ``warning`` (e.g. a certificate that
    expires soon) is reported but does not stop the account from working."""

    file: str
    line: int | None
    field: str
    reason: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        reason = f"warning: {self.reason}" if self.severity == "warning" else self.reason
        return f"{where}: {self.field}: {reason}" if self.field else f"{where}: {reason}"

    def as_dict(self) -> dict[str, Any]:
        """The finding as the commands' ``--json`` and ``postroom status`` print it."""
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "reason": self.reason,
            "severity": self.severity,
            "text": str(self),
        }


class Superseded(PostroomError):
    """Raised by a transport right before a transaction would start (MAIL FROM, Graph's send)
    when the attempt's fence says it no longer holds its job: its process froze (GC, VM pause,
    SIGSTOP) past its claim and another attempt took the job over. Nothing was sent."""


class RecordError(ConfigurationError):
    """A record that failed validation; ``problems`` lists every finding."""

    def __init__(self, problems: list[RecordProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def parse_enhanced_status(text: str) -> str | None:
    """Return the RFC 3463 enhanced status code that starts ``text`` (``"4.7.0"``)."""
    match = _ENHANCED.match(text)
    return ".".join(match.groups()) if match else None


class DeliveryError(PostroomError):
    """A failed delivery attempt, with what the server said."""

    transient: bool = False

    def __init__(
        self,
        reason: str,
        *,
        account: str | None = None,
        transport: str | None = None,
        code: int | None = None,
        server_text: str | None = None,
        enhanced_status: str | None = None,
        retry_after: float | None = None,
        recipients: Mapping[str, RecipientStatus] | None = None,
    ) -> None:
        self.reason = reason
        self.account = account
        self.transport = transport
        self.code = code
        self.server_text = server_text
        self.enhanced_status = enhanced_status or (
            parse_enhanced_status(server_text) if server_text else None
        )
        self.retry_after = retry_after
        self.recipients: dict[str, RecipientStatus] = dict(recipients or {})
        super().__init__(reason)

    def __str__(self) -> str:
        parts = [self.reason]
        if self.code is not None:
            reply = f"{self.code} {self.server_text}".strip() if self.server_text else str(self.code)
            parts.append(f"(server said: {reply})")
        if self.account:
            parts.insert(0, f"[{self.account}]")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, account={self.account!r}, "
            f"code={self.code!r}, enhanced_status={self.enhanced_status!r})"
        )

    def with_context(self, *, account: str | None, transport: str | None) -> DeliveryError:
        """Fill in account/transport where a lower layer did not know them."""
        self.account = self.account or account
        self.transport = self.transport or transport
        return self


class TransientError(DeliveryError):
    """Worth retrying later: the server or network may recover."""

    transient = True


class ConnectionFailed(TransientError):
    """Connect refused or timed out, connection lost, TLS handshake I/O error."""


class ServerBusy(TransientError):
    """421/432: the server is closing or over its connection limit."""


class LimitWait(TransientError):
    """A provider limit (connections, rate, daily recipients) says: not now, at ``retry_after``.

    Nothing was sent and no attempt is spent: the job is re-scheduled for then."""


class PermanentError(DeliveryError):
    """Retrying will not help: dead-letter the job."""


class Rejected(PermanentError):
    """A 5xx answer to MAIL, RCPT or DATA."""


class AuthenticationFailed(PermanentError):
    """The server refused our credentials (535); the account should be flagged."""


class SecurityPolicyError(PermanentError):
    """The connection would not meet the account's security settings.

    No STARTTLS offered while ``secure: true``, TLS below ``min_tls_version``,
    or a certificate the truststore does not trust. Nothing was sent.
    """


@dataclass(frozen=True)
class RecipientStatus:
    """What happened to one recipient: ``sent``, ``deferred`` (4xx) or ``failed`` (5xx)."""

    status: str
    code: int | None = None
    message: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "code": self.code, "message": self.message}


def classify_smtp_reply(
    code: int,
    text: str,
    *,
    stage: str,
    account: str | None = None,
) -> DeliveryError:
    """Map one SMTP reply to the error class contract §3 assigns it."""
    enhanced = parse_enhanced_status(text)
    where = f"{stage} refused"
    if code in CLOSING_SMTP_CODES:
        return ServerBusy(where, account=account, transport="smtp", code=code, server_text=text)
    if 400 <= code < 500 or (enhanced or "").startswith("4."):
        return TransientError(where, account=account, transport="smtp", code=code, server_text=text)
    if code in AUTH_FAILURE_CODES:
        reason = where if stage.startswith("AUTH") else "authentication failed"
        return AuthenticationFailed(reason, account=account, transport="smtp", code=code, server_text=text)
    return Rejected(where, account=account, transport="smtp", code=code, server_text=text)
