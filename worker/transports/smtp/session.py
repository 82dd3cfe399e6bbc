"""One SMTP session on aiosmtplib: :class:`SmtpConnection`.

It owns one TCP connection and enforces the account's security rules while
opening it (STARTTLS required when ``secure``, minimum TLS version, verified
certificate, chosen AUTH mechanism), then runs mail transactions on it. The
per-account pool over these sessions is :mod:`worker.transports.smtp.pool`.

Logging in is :mod:`worker.transports.smtp.auth` (the one place a secret is used).
aiosmtplib exceptions never leave these modules: the steps of opening a
session translate them with the one table in :mod:`worker.transports.smtp.errors`;
a mail transaction classifies the replies it reads itself (a lost connection
before the content went out is retried on a fresh one, after it never).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from worker.db.vocabulary import RecipientState
from worker.errors import (
    ConnectionFailed,
    DeliveryError,
    PermanentError,
    RecipientStatus,
    SecurityPolicyError,
    ServerBusy,
    TransientError,
    classify_smtp_reply,
)
from worker.mail.reports import xtext_encode
from worker.records.account.account import SmtpEndpoint
from worker.transports.base import OutgoingMessage, SendResult
from worker.transports.smtp import auth as smtp_auth
from worker.transports.smtp import pipelining
from worker.transports.smtp.auth import TokenProvider
from worker.transports.smtp.errors import CAUGHT, broke_in_handshake, translate
from worker.transports.tls import (
    below_minimum,
    client_context,
    probe_context,
    version_at_least,
    version_below,
)

log = logging.getLogger("postroom.smtp")


_CLOSE_WAIT = 2.0  # seconds to wait for a closed connection's socket to go away
_PROTOCOL_NAMES = {"none": "none", "starttls": "STARTTLS", "smtps": "SMTPS"}


@functools.cache
def default_ehlo_name() -> str:
    """This host's FQDN, or an address literal when it has none (RFC 5321 §4.1.4)."""
    name = socket.gethostname()
    return name if "." in name else "[127.0.0.1]"


class RetryOnFresh(Exception):
    """The connection failed before the server accepted anything: try a new one."""

    def __init__(self, error: DeliveryError) -> None:
        self.error = error
        super().__init__(str(error))


def _client(ep: SmtpEndpoint, context: ssl.SSLContext | None) -> aiosmtplib.SMTP:
    """An aiosmtplib client for the endpoint (not connected yet); STARTTLS is driven by us."""
    return aiosmtplib.SMTP(
        hostname=ep.host,
        port=ep.port,
        use_tls=ep.protocol == "smtps",
        start_tls=False,
        tls_context=context,
        local_hostname=ep.ehlo_name or default_ehlo_name(),
        timeout=ep.connect_timeout,
    )


@dataclass
class SmtpConnection:
    """One authenticated SMTP connection. Not shared between concurrent sends."""

    account: str
    endpoint: SmtpEndpoint
    client: aiosmtplib.SMTP
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages: int = 0
    tls_version: str | None = None
    cipher: str | None = None
    peer_certificate: dict[str, Any] | None = None
    auth_mechanism: str | None = None
    offered_mechanisms: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    protocol: Any = None  # aiosmtplib's protocol: outlives client.close() so closing can be awaited
    slot: str | None = None  # the account-wide connection slot it holds (worker/transports/limits.py)

    @property
    def security(self) -> str:
        name = _PROTOCOL_NAMES[self.endpoint.protocol]
        return f"{name} {self.tls_version}" if self.tls_version else name

    @property
    def usable(self) -> bool:
        return self.client.is_connected

    # ---- opening ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        account: str,
        endpoint: SmtpEndpoint,
        *,
        cadata: str | None,
        token_provider: TokenProvider | None = None,
    ) -> SmtpConnection:
        """Connect, secure, authenticate. Raises a DeliveryError; nothing is ever sent here."""
        ep = endpoint
        context = None
        if ep.protocol != "none":
            context = client_context(
                cadata=cadata,
                min_version=ep.min_tls_version,
                max_version=ep.max_tls_version,
                check_hostname=ep.check_hostname,
            )
        client = _client(ep, context)
        conn = cls(account, ep, client)
        try:
            await conn._connect()
            await conn._secure(context)
            conn.auth_mechanism = await smtp_auth.authenticate(
                client, ep, conn.offered_mechanisms, token_provider, account=account, fail=conn._error
            )
        except BaseException:
            await conn.close(polite=False)
            raise
        return conn

    def _error(self, error: DeliveryError) -> DeliveryError:
        return error.with_context(account=self.account, transport="smtp")

    async def _connect(self) -> None:
        ep = self.endpoint
        where = f"{ep.host}:{ep.port}"
        try:
            await self.client.connect()
        except SMTPConnectResponseError as exc:
            self.protocol = self.client.protocol
            raise self._error(translate(exc, "greeting")) from None
        except CAUGHT as exc:
            error = self._error(
                translate(
                    exc,
                    "connect",
                    lost=f"cannot connect to {where}",
                    timed_out=f"timed out connecting to {where}",
                )
            )
            if ep.protocol == "smtps" and not isinstance(exc, TimeoutError) and broke_in_handshake(exc):
                error = await self._version_policy(error)
            raise error from None
        self.protocol = self.client.protocol
        self.client.timeout = ep.command_timeout
        await self._ehlo()

    async def _version_policy(self, error: DeliveryError) -> DeliveryError:
        """A failed handshake whose cause is the server's TLS version is a permanent policy
        failure, however the server refused (an alert, or a reset some servers answer a
        modern ClientHello with): probe once to learn the version it negotiates, and when
        that is below ``min_tls_version`` say so; otherwise ``error`` stands."""
        if isinstance(error, SecurityPolicyError) and "not trusted" in str(error):
            return error  # the certificate, not the version
        negotiated = await self._probe_version()
        minimum = self.endpoint.min_tls_version
        if negotiated is None or version_at_least(negotiated, minimum):
            return error
        return self._error(SecurityPolicyError(f"{below_minimum(negotiated, minimum)}; nothing was sent"))

    async def _probe_version(self) -> str | None:
        """The TLS version the server negotiates when offered every version, or else (a server
        that drops a ClientHello naming versions it does not know) only those below the
        minimum; None when neither handshake completes. Nothing but EHLO and STARTTLS is
        sent on these connections: no credentials, no mail."""
        ep = self.endpoint
        below = version_below(ep.min_tls_version)
        if below is None:
            return None
        for top in (None, below):
            context = probe_context(top)
            probe = _client(ep, context)
            probing = SmtpConnection(self.account, ep, probe)
            negotiated: str | None = None
            try:
                await probe.connect()
                probing.protocol = probe.protocol
                if ep.protocol == "starttls":
                    await probe.ehlo()
                    await probe.starttls(server_hostname=ep.host, tls_context=context)
                ssl_object = probe.get_transport_info("ssl_object")
                negotiated = ssl_object.version() if ssl_object is not None else None
            except (SMTPException, OSError, TimeoutError):
                negotiated = None
            finally:
                if negotiated is not None:  # wait for the TLS close, as for any connection
                    await probing.close(polite=True)
                else:  # broken in the handshake: nothing to wait for
                    probe.close()
            if negotiated is not None:
                log.info(
                    "%s: %s:%d negotiates %s when offered it", self.account, ep.host, ep.port, negotiated
                )
                return str(negotiated)
        return None

    async def _ehlo(self) -> None:
        try:
            response = await self.client.ehlo()
        except CAUGHT as exc:
            raise self._error(translate(exc, "EHLO")) from None
        del response
        self.extensions = tuple(sorted(self.client.esmtp_extensions))
        self.offered_mechanisms = tuple(m.upper() for m in self.client.server_auth_methods)

    async def _secure(self, context: ssl.SSLContext | None) -> None:
        ep = self.endpoint
        if ep.protocol == "starttls":
            if not self.client.supports_extension("starttls"):
                raise self._error(
                    SecurityPolicyError(
                        "server does not offer STARTTLS and the account requires a secure "
                        "connection (secure: true); nothing was sent"
                    )
                )
            try:
                await self.client.starttls(server_hostname=ep.host, tls_context=context)
            except CAUGHT as exc:
                error = self._error(
                    translate(
                        exc,
                        "STARTTLS",
                        lost="STARTTLS failed",
                        timed_out="timed out during the TLS handshake",
                    )
                )
                in_handshake = not isinstance(
                    exc, SMTPResponseException | TimeoutError
                ) and broke_in_handshake(exc)
                raise (await self._version_policy(error) if in_handshake else error) from None
            await self._ehlo()
        if ep.protocol != "none":
            ssl_object = self.client.get_transport_info("ssl_object")
            if ssl_object is None:  # pragma: no cover - aiosmtplib guarantees it after TLS
                raise self._error(SecurityPolicyError("connection is not encrypted; nothing was sent"))
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.cipher = cipher[0] if cipher else None
            self.peer_certificate = ssl_object.getpeercert()
            if not version_at_least(self.tls_version, ep.min_tls_version):
                raise self._error(
                    SecurityPolicyError(
                        f"negotiated {self.tls_version}, below min_tls_version {ep.min_tls_version}; "
                        "nothing was sent"
                    )
                )

    # ---- using -----------------------------------------------------------

    async def noop(self) -> bool:
        """True when the server still answers; used on connections that sat idle."""
        try:
            response = await self.client.noop(timeout=min(self.endpoint.command_timeout, 10.0))
        except (SMTPException, OSError, TimeoutError):
            return False
        return response.code == 250

    async def send(self, message: OutgoingMessage) -> SendResult:
        """One SMTP transaction. Raises RetryOnFresh when nothing was accepted and the
        connection is gone, a DeliveryError when no recipient was accepted."""
        self.last_used = time.monotonic()
        client, ep = self.client, self.endpoint
        sender = ep.envelope_from or message.sender
        mail_options, rcpt_options, encoding = self._envelope_options(sender, message)
        try:
            replies = await pipelining.send_envelope(
                client,
                sender,
                message.recipients,
                mail_options=mail_options,
                rcpt_options=rcpt_options,
                original_recipient=client.supports_extension("dsn"),
                encoding=encoding,
                timeout=ep.command_timeout,
            )
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
            # no content went out: the message was not taken
            raise RetryOnFresh(self._error(ConnectionFailed("connection lost before DATA"))) from None
        except SMTPResponseException as exc:
            client.close()
            raise RetryOnFresh(self._error(ConnectionFailed(f"unreadable reply: {exc.message}"))) from None

        if replies.mail.code != pipelining.COMPLETED:
            await self._abandon(replies)
            raise await self._refused(replies.mail.code, replies.mail.message, "MAIL FROM") from None
        results, accepted = self._recipient_replies(message, replies)
        if not accepted:
            await self._abandon(replies)
            await self._reset()
            raise self._all_refused(results)

        data_reply = replies.data
        if data_reply is not None and data_reply.code == pipelining.START_INPUT:
            try:
                data_reply = await pipelining.send_content(client, message.data, timeout=ep.data_timeout)
            except (SMTPServerDisconnected, SMTPTimeoutError, OSError, SMTPResponseException):
                # the server may or may not have taken the message: never retried here
                client.close()
                lost = ConnectionFailed(
                    "connection lost during DATA; the server may have accepted the message"
                )
                raise self._error(lost) from None
            if data_reply.code == pipelining.COMPLETED:
                self.messages += 1
                for rcpt in accepted:
                    results[rcpt] = RecipientStatus(RecipientState.SENT, data_reply.code, data_reply.message)
                return SendResult(transport="smtp", security=self.security, recipients=results)
        raise await self._content_refused(data_reply, accepted, results)

    def _envelope_options(self, sender: str, message: OutgoingMessage) -> tuple[list[str], list[str], str]:
        """MAIL FROM and RCPT TO parameters the server's extensions allow, and the envelope's
        encoding. Raises a PermanentError for a non-ASCII address the server cannot take."""
        client, ep = self.client, self.endpoint
        needs_utf8 = not (sender + "".join(message.recipients)).isascii()
        mail_options: list[str] = []
        if client.supports_extension("size"):
            mail_options.append(f"SIZE={len(message.data)}")
        if client.supports_extension("8bitmime") and not message.data.isascii():
            mail_options.append("BODY=8BITMIME")
        if needs_utf8:
            if not client.supports_extension("smtputf8"):
                raise self._error(
                    PermanentError("an address is not ASCII and the server does not support SMTPUTF8")
                )
            mail_options.append("SMTPUTF8")
        dsn = client.supports_extension("dsn")
        if dsn and ep.dsn_ret:
            mail_options.append(f"RET={ep.dsn_ret}")
        envid = xtext_encode(message.envelope_id) if dsn and message.envelope_id else ""
        if 0 < len(envid) <= 100:  # RFC 3461's limit; it comes back in a bounce: the job it is about
            mail_options.append(f"ENVID={envid}")
        rcpt_options = [f"NOTIFY={ep.dsn_notify}"] if dsn and ep.dsn_notify else []
        return mail_options, rcpt_options, "utf-8" if needs_utf8 else "ascii"

    def _recipient_replies(
        self, message: OutgoingMessage, replies: pipelining.EnvelopeReplies
    ) -> tuple[dict[str, RecipientStatus], list[str]]:
        """The refused recipients' results and the accepted recipients. Raises RetryOnFresh
        when a RCPT reply closes the connection (421, 432, or it is gone)."""
        results: dict[str, RecipientStatus] = {}
        accepted: list[str] = []
        for rcpt, reply in zip(message.recipients, replies.rcpts, strict=False):
            if reply.code in pipelining.RCPT_ACCEPTED:
                accepted.append(rcpt)
                continue
            if reply.code in (421, 432) or not self.client.is_connected:
                self.client.close()
                raise RetryOnFresh(
                    self._error(classify_smtp_reply(reply.code, reply.message, stage="RCPT TO"))
                ) from None
            status = RecipientState.DEFERRED if 400 <= reply.code < 500 else RecipientState.FAILED
            results[rcpt] = RecipientStatus(status, reply.code, reply.message)
        return results, accepted

    async def _content_refused(
        self, data_reply: SMTPResponse | None, accepted: list[str], results: dict[str, RecipientStatus]
    ) -> DeliveryError | RetryOnFresh:
        """DATA (or the content after it) refused: the accepted recipients' results, the error."""
        code, text = (data_reply.code, data_reply.message) if data_reply else (554, "no reply to DATA")
        error = classify_smtp_reply(code, text, stage="DATA")
        if isinstance(error, ServerBusy):
            self.client.close()
            return RetryOnFresh(self._error(error))
        status = RecipientState.DEFERRED if error.transient else RecipientState.FAILED
        for rcpt in accepted:
            results[rcpt] = RecipientStatus(status, code, text)
        error.recipients = results
        await self._reset()
        return self._error(error)

    async def _abandon(self, replies: pipelining.EnvelopeReplies) -> None:
        """A 354 the message will not follow (MAIL or every RCPT refused): end its input empty."""
        if replies.data is not None and replies.data.code == pipelining.START_INPUT:
            with contextlib.suppress(SMTPException, OSError):
                await pipelining.abandon_content(self.client, timeout=self.endpoint.command_timeout)

    async def _refused(self, code: int, text: str, stage: str) -> DeliveryError | RetryOnFresh:
        error = self._error(classify_smtp_reply(code, text, stage=stage))
        if isinstance(error, ServerBusy) or not self.client.is_connected:
            self.client.close()
            return RetryOnFresh(error)
        await self._reset()
        return error

    def _all_refused(self, results: dict[str, RecipientStatus]) -> DeliveryError:
        deferred = {a: r for a, r in results.items() if r.status == "deferred"}
        first = next(iter(deferred.values() or results.values()))
        error: DeliveryError
        if deferred:
            error = TransientError(
                "every recipient was refused (some temporarily)",
                code=first.code,
                server_text=first.message,
                recipients=results,
            )
        else:
            error = classify_smtp_reply(first.code or 550, first.message, stage="RCPT TO")
            error.reason = "every recipient was refused"
            error.recipients = results
        return self._error(error)

    async def _reset(self) -> None:
        try:
            await self.client.rset()
        except (SMTPException, OSError, TimeoutError):
            self.client.close()

    async def close(self, *, polite: bool = True) -> None:
        """QUIT (bounded) when ``polite``, then close and wait until the socket is gone.

        Waiting matters for TLS: closing starts a close_notify exchange, and a
        socket abandoned half-way (say, by a loop that is shutting down) leaks.
        """
        if polite and self.client.is_connected:
            with contextlib.suppress(SMTPException, OSError, TimeoutError):
                await self.client.quit(timeout=5.0)
        self.client.close()
        protocol, self.protocol = self.protocol, None
        deadline = time.monotonic() + _CLOSE_WAIT
        while protocol is not None and protocol.transport is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def describe(self) -> dict[str, Any]:
        cert = self.peer_certificate or {}
        subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        not_after = cert.get("notAfter")
        expires = (
            datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC).isoformat()
            if not_after
            else None
        )
        return {
            "host": self.endpoint.host,
            "port": self.endpoint.port,
            "security": self.security,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "certificate_subject": subject or None,
            "certificate_expires": expires,
            "auth_mechanisms_offered": list(self.offered_mechanisms),
            "auth_mechanism": self.auth_mechanism,
            "login": (
                "not configured"
                if self.endpoint.auth == "none"
                else ("succeeded" if self.auth_mechanism else "not attempted")
            ),
        }
