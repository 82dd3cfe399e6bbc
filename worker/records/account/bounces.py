"""The bounce reader's mailbox (contract §11): where an account's delivery reports (bounces,
complaints) arrive, and how to read them. Opt-in: an account without ``bounces:`` is not read.

By default the mailbox is read as the account sends: the same user, the same password or the
same OAuth profile (XOAUTH2), the same truststore; IMAPS on the provider's IMAP host (an
``other`` account: its SMTP host). A Graph account reads its user principal's mailbox through
Graph, with its auth profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from worker.records.account.advanced import TlsName
from worker.records.account.providers import IMAP_HOSTS, Provider
from worker.records.fields import Line, RecordModel, SecretField, TlsVersion
from worker.records.secrets import Secret

ImapProtocol = Literal["imaps", "starttls", "none"]
IMAPS_PORT, IMAP_PORT = 993, 143


class BouncesSettings(RecordModel):
    """``bounces:`` in an account record, as written."""

    via: Literal["imap", "graph"] | None = None  # default: graph for a Graph account, else imap
    host: Line | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    secure: bool = True
    protocol: Literal["imaps", "starttls"] | None = None  # default: starttls on 143, else imaps
    min_tls_version: TlsVersion = "1.2"
    user: Line | None = None
    password: SecretField | None = None
    truststore: str | None = None
    folder: Line = "INBOX"
    move_to: Line = "Postroom/Processed"
    interval: float = Field(default=60.0, ge=5, le=86400)


@dataclass(frozen=True)
class Mailbox:
    """Where and how the bounce reader reads an account's reports; holds no secret value."""

    via: Literal["imap", "graph"]
    folder: str
    move_to: str
    interval: float
    host: str | None = None  # imap only, from here on
    port: int = IMAPS_PORT
    protocol: ImapProtocol = "imaps"
    min_tls_version: TlsName = "1.2"
    truststore: str | None = None
    user: str | None = None
    password: Secret | None = None
    oauth_profile: str | None = None  # XOAUTH2 with this auth profile's token

    def summary(self) -> dict[str, object]:
        """Secret-free, for ``accounts list`` and the API."""
        out: dict[str, object] = {"via": self.via, "folder": self.folder, "move_to": self.move_to}
        if self.via == "imap":
            out.update(host=self.host, port=self.port, protocol=self.protocol, user=self.user)
        return out


@dataclass(frozen=True)
class SendingIdentity:
    """What the account sends with, the mailbox's defaults."""

    provider: Provider
    send_using: Literal["smtp", "graph"]
    smtp_host: str | None
    user: str | None
    password: Secret | None
    oauth_profile: str | None
    truststore: str | None


Bad = Callable[[tuple[str | int, ...], str], None]


def resolve_mailbox(settings: BouncesSettings, sending: SendingIdentity, bad: Bad) -> Mailbox | None:
    """The mailbox ``settings`` describe, with the sending identity's defaults filled in."""
    via = settings.via or ("graph" if sending.send_using == "graph" else "imap")
    if via == "graph":
        if sending.send_using != "graph":
            bad(("bounces", "via"), "graph reads the mailbox of a Graph account (send_using: graph)")
            return None
        return Mailbox("graph", settings.folder, settings.move_to, settings.interval)
    host = settings.host or IMAP_HOSTS[sending.provider] or sending.smtp_host
    if not host:
        bad(("bounces", "host"), f"required (provider {sending.provider} has no IMAP host to default to)")
        return None
    password, oauth = sending.password, sending.oauth_profile
    if settings.password is not None:
        password, oauth = settings.password, None
    elif settings.user and settings.user != sending.user:
        bad(("bounces", "password"), "required when the mailbox's user is not the one the account sends as")
        return None
    if password is None and oauth is None:
        bad(("bounces", "password"), "required: the account sends with no password or OAuth profile to reuse")
        return None
    port = settings.port or (IMAPS_PORT if settings.protocol != "starttls" else IMAP_PORT)
    protocol: ImapProtocol = (
        "none" if not settings.secure else settings.protocol or ("starttls" if port == IMAP_PORT else "imaps")
    )
    return Mailbox(
        "imap", settings.folder, settings.move_to, settings.interval, host=host, port=port,
        protocol=protocol, min_tls_version=settings.min_tls_version,
        truststore=settings.truststore or sending.truststore, user=settings.user or sending.user,
        password=password if oauth is None else None, oauth_profile=oauth,
    )  # fmt: skip
