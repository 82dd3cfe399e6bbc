"""The transport an account's record names (``send_using``), built with its truststore and token source."""

from __future__ import annotations

from worker.errors import ConfigurationError
from worker.records.account.account import EmailAccount
from worker.records.loader import Records
from worker.transports import oauth
from worker.transports.base import Transport
from worker.transports.graph import GraphTransport
from worker.transports.limits import Limiter
from worker.transports.smtp.pool import SmtpTransport


def build_transport(account: EmailAccount, records: Records, *, limiter: Limiter | None = None) -> Transport:
    """The transport an account's ``send_using`` names, with its truststore and token source.

    ``limiter``: the account-wide connection cap shared with every worker (worker/transports/limits.py)."""
    if account.send_using == "graph":
        assert account.graph is not None
        graph_cadata = None
        if account.graph.truststore:
            graph_cadata = records.keystore(account.graph.truststore).cadata()
        tokens = oauth.token_source(account.graph.auth_profile, records)
        return GraphTransport(account, tokens, cadata=graph_cadata, limiter=limiter)
    assert account.smtp is not None
    cadata = None
    if account.smtp.truststore:
        cadata = records.keystore(account.smtp.truststore).cadata()
    if account.smtp.auth == "oauth":
        if account.smtp.oauth_profile is None:  # pragma: no cover - refused when the record loads
            raise ConfigurationError(f"account {account.name}: auth: oauth needs oauth_profile")
        source = oauth.token_source(account.smtp.oauth_profile, records)
        return SmtpTransport(
            account, cadata=cadata, token_provider=source.access_token, token_source=source, limiter=limiter
        )
    return SmtpTransport(account, cadata=cadata, limiter=limiter)
