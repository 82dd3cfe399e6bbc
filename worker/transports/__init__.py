"""Delivery transports behind one :class:`~worker.transports.base.Transport` interface."""

from __future__ import annotations

from worker.accounts import EmailAccount
from worker.errors import ConfigurationError
from worker.records import Records
from worker.transports.base import ConnectivityReport, OutgoingMessage, SendResult, Transport
from worker.transports.smtp import SmtpTransport

__all__ = [
    "ConnectivityReport",
    "OutgoingMessage",
    "SendResult",
    "SmtpTransport",
    "Transport",
    "build_transport",
]


def build_transport(account: EmailAccount, records: Records) -> Transport:
    """The transport an account's ``send_using`` names, with its truststore loaded."""
    if account.send_using == "graph":
        raise ConfigurationError(
            f"account {account.name}: send_using: graph is not available in this version yet"
        )
    assert account.smtp is not None
    cadata = None
    if account.smtp.truststore:
        cadata = records.keystore(account.smtp.truststore).cadata()
    if account.smtp.auth == "oauth":
        raise ConfigurationError(
            f"account {account.name}: auth: oauth (XOAUTH2) is not available in this version yet"
        )
    return SmtpTransport(account, cadata=cadata)
