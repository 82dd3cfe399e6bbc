"""SMTP delivery on aiosmtplib: one connection class, one per-account pool.

:class:`SmtpConnection` owns one TCP connection and enforces the account's
security rules while opening it (STARTTLS required when ``secure``, minimum
TLS version, verified certificate, chosen AUTH mechanism). :class:`SmtpTransport`
is the per-account pool that the delivery pipeline uses: bounded, reusing
connections, checking idle ones with NOOP, retiring them by age and message
count, and retrying a message once on a fresh connection when a reused one was
dropped or answered 421 before anything was accepted.

aiosmtplib exceptions never leave this module: they are translated into
:mod:`worker.errors` here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.auth import auth_xoauth2_encode

from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    LimitWait,
    PermanentError,
    RecipientStatus,
    SecurityPolicyError,
    ServerBusy,
    TransientError,
    classify_smtp_reply,
)
from worker.records.accounts import EmailAccount, SmtpEndpoint
from worker.transports import pipelining
from worker.transports.base import ConnectivityReport, OutgoingMessage, SendResult
from worker.transports.limits import (
    DEMAND_GRACE,
    SHARE_PATIENCE,
    SLOT_POLL,
    SLOT_RENEW,
    WANTED_CHECK,
    Limiter,
)
from worker.transports.oauth import TokenSource
from worker.transports.tls import (
    below_minimum,
    client_context,
    describe_handshake_error,
    probe_context,
    version_at_least,
    version_below,
)

log = logging.getLogger("postroom.smtp")

TokenProvider = Callable[[bool], Awaitable[str]]  # (force_refresh) -> access token

_CLOSE_WAIT = 2.0  # seconds to wait for a closed connection's socket to go away
_PROTOCOL_NAMES = {"none": "none", "starttls": "STARTTLS", "smtps": "SMTPS"}
_ehlo_name_cache: str | None = None


CHECK_SLOT_WAIT = 2.0  # a health check waits this long for a connection slot, else reports busy
POOL_RECHECK = 1.0  # a send waiting for one of its pool's connections looks again this often
_NO_SLOT = object()  # "no account slot free right now"


def default_ehlo_name() -> str:
    """This host's FQDN, or an address literal when it has none (RFC 5321 §4.1.4)."""
    global _ehlo_name_cache
    if _ehlo_name_cache is None:
        name = socket.gethostname()
        _ehlo_name_cache = name if "." in name else "[127.0.0.1]"
    return _ehlo_name_cache


class _RetryOnFresh(Exception):
    """The connection failed before the server accepted anything: try a new one."""

    def __init__(self, error: DeliveryError) -> None:
        self.error = error
        super().__init__(str(error))


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_HANDSHAKE_BREAKS = (
    ssl.SSLError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    SMTPServerDisconnected,
)


def _in_handshake(exc: BaseException) -> bool:
    """The connection was up and broke in the TLS handshake (an alert, a reset, an EOF), not
    refused or unreachable: only then can the server's TLS version be the cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _HANDSHAKE_BREAKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _xoauth2_challenge(message: str) -> str | None:
    """``status 401, scope https://mail.google.com/`` from a base64 JSON error challenge."""
    try:
        data = json.loads(base64.b64decode(message.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    parts = [f"{k} {data[k]}" for k in ("status", "scope", "schemes") if isinstance(data.get(k), str)]
    return ", ".join(parts)[:200] or None


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
            await conn._authenticate(token_provider)
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
            raise self._error(classify_smtp_reply(exc.code, exc.message, stage="greeting")) from None
        except (SMTPTimeoutError, TimeoutError):
            raise self._error(ConnectionFailed(f"timed out connecting to {where}")) from None
        except (SMTPException, OSError) as exc:
            error = self._handshake_or_io(exc, f"cannot connect to {where}")
            if ep.protocol == "smtps" and _in_handshake(exc):
                error = await self._version_policy(error)
            raise error from None
        self.protocol = self.client.protocol
        self.client.timeout = ep.command_timeout
        await self._ehlo()

    def _handshake_or_io(self, exc: BaseException, what: str) -> DeliveryError:
        ssl_error = _ssl_cause(exc)
        if ssl_error is not None:
            reason, policy = describe_handshake_error(ssl_error)
            if policy:
                return self._error(SecurityPolicyError(f"{reason}; nothing was sent"))
            return self._error(ConnectionFailed(f"{what}: {reason}"))
        cause = exc.__cause__ or exc
        detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return self._error(ConnectionFailed(f"{what}: {detail}"))

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
        except SMTPResponseException as exc:
            raise self._error(classify_smtp_reply(exc.code, exc.message, stage="EHLO")) from None
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
            raise self._error(ConnectionFailed("connection lost during EHLO")) from None
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
            except SMTPResponseException as exc:
                raise self._error(classify_smtp_reply(exc.code, exc.message, stage="STARTTLS")) from None
            except (SMTPTimeoutError, TimeoutError):
                raise self._error(ConnectionFailed("timed out during the TLS handshake")) from None
            except (SMTPException, OSError) as exc:
                error = self._handshake_or_io(exc, "STARTTLS failed")
                raise (await self._version_policy(error) if _in_handshake(exc) else error) from None
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

    async def _authenticate(self, token_provider: TokenProvider | None) -> None:
        ep = self.endpoint
        if ep.auth == "none":
            return
        if not self.client.supports_extension("auth"):
            raise self._error(
                SecurityPolicyError(
                    "server offers no AUTH but the account is configured to log in"
                    + ("" if ep.protocol != "none" else " (some servers only offer AUTH over TLS)")
                )
            )
        usable = [m for m in ep.mechanisms if m in self.offered_mechanisms]
        if not usable:
            raise self._error(
                SecurityPolicyError(
                    f"no usable AUTH mechanism: server offers {' '.join(self.offered_mechanisms) or 'none'}, "
                    f"account allows {' '.join(ep.mechanisms) or 'none'}"
                )
            )
        mechanism = usable[0]
        assert ep.username is not None
        try:
            if mechanism == "XOAUTH2":
                if token_provider is None:
                    raise self._error(SecurityPolicyError("XOAUTH2 needs an OAuth token provider"))
                code, text = await self._xoauth2(ep.username, await self._token(token_provider, False))
                if code >= 500:
                    # the token may have been revoked or expired early: refresh once, then give up
                    log.info("account %s: XOAUTH2 refused (%s); refreshing the token", self.account, code)
                    code, text = await self._xoauth2(ep.username, await self._token(token_provider, True))
                if code != 235:
                    raise SMTPAuthenticationError(code, text)
            else:
                if ep.password is None:
                    raise self._error(SecurityPolicyError("no password configured"))
                secret = ep.password.reveal()
                method = {
                    "PLAIN": self.client.auth_plain,
                    "LOGIN": self.client.auth_login,
                    "CRAM-MD5": self.client.auth_crammd5,
                }[mechanism]
                await method(ep.username, secret)
        except SMTPAuthenticationError as exc:
            error = classify_smtp_reply(exc.code, exc.message, stage=f"AUTH {mechanism}")
            if isinstance(error, PermanentError) and not isinstance(error, AuthenticationFailed):
                error = AuthenticationFailed(
                    f"AUTH {mechanism} refused", code=exc.code, server_text=exc.message
                )
            raise self._error(error) from None
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
            raise self._error(ConnectionFailed("connection lost during AUTH")) from None
        self.auth_mechanism = mechanism

    async def _token(self, token_provider: TokenProvider, force: bool) -> str:
        try:
            return await token_provider(force)
        except DeliveryError as exc:
            raise self._error(exc) from None

    async def _xoauth2(self, username: str, token: str) -> tuple[int, str]:
        """One AUTH XOAUTH2 (RFC 7628 style): (final code, text).

        A server that refuses the token answers 334 with a base64 JSON error
        challenge; the client sends an empty line and gets the final 5xx.
        The challenge's status and scope are kept in the text (never the token).
        """
        response = await self.client.execute_command(
            b"AUTH", b"XOAUTH2", auth_xoauth2_encode(username, token)
        )
        challenge = None
        if response.code == 334:
            challenge = _xoauth2_challenge(response.message)
            response = await self.client.execute_command(b"")
        text = response.message
        if challenge and response.code != 235:
            text = f"{text} ({challenge})"
        return response.code, text

    # ---- using -----------------------------------------------------------

    async def noop(self) -> bool:
        """True when the server still answers; used on connections that sat idle."""
        try:
            response = await self.client.noop(timeout=min(self.endpoint.command_timeout, 10.0))
        except (SMTPException, OSError, TimeoutError):
            return False
        return response.code == 250

    async def send(self, message: OutgoingMessage) -> SendResult:
        """One SMTP transaction. Raises _RetryOnFresh when nothing was accepted and the
        connection is gone, a DeliveryError when no recipient was accepted."""
        self.last_used = time.monotonic()
        client, ep = self.client, self.endpoint
        sender = ep.envelope_from or message.sender
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
        rcpt_options = [f"NOTIFY={ep.dsn_notify}"] if dsn and ep.dsn_notify else []
        encoding = "utf-8" if needs_utf8 else "ascii"

        try:
            replies = await pipelining.send_envelope(
                client,
                sender,
                message.recipients,
                mail_options=mail_options,
                rcpt_options=rcpt_options,
                encoding=encoding,
                timeout=ep.command_timeout,
            )
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
            # no content went out: the message was not taken
            raise _RetryOnFresh(self._error(ConnectionFailed("connection lost before DATA"))) from None
        except SMTPResponseException as exc:
            client.close()
            raise _RetryOnFresh(self._error(ConnectionFailed(f"unreadable reply: {exc.message}"))) from None

        if replies.mail.code != pipelining.COMPLETED:
            await self._abandon(replies)
            raise await self._refused(replies.mail.code, replies.mail.message, "MAIL FROM") from None

        results: dict[str, RecipientStatus] = {}
        accepted: list[str] = []
        for rcpt, reply in zip(message.recipients, replies.rcpts, strict=False):
            if reply.code in pipelining.RCPT_ACCEPTED:
                accepted.append(rcpt)
                continue
            if reply.code in (421, 432) or not client.is_connected:
                client.close()
                raise _RetryOnFresh(
                    self._error(classify_smtp_reply(reply.code, reply.message, stage="RCPT TO"))
                ) from None
            status = "deferred" if 400 <= reply.code < 500 else "failed"
            results[rcpt] = RecipientStatus(status, reply.code, reply.message)

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
                    results[rcpt] = RecipientStatus("sent", data_reply.code, data_reply.message)
                return SendResult(transport="smtp", security=self.security, recipients=results)

        code, text = (data_reply.code, data_reply.message) if data_reply else (554, "no reply to DATA")
        error = classify_smtp_reply(code, text, stage="DATA")
        if isinstance(error, ServerBusy):
            client.close()
            raise _RetryOnFresh(self._error(error)) from None
        status = "deferred" if error.transient else "failed"
        for rcpt in accepted:
            results[rcpt] = RecipientStatus(status, code, text)
        error.recipients = results
        await self._reset()
        raise self._error(error) from None

    async def _abandon(self, replies: pipelining.EnvelopeReplies) -> None:
        """A 354 the message will not follow (MAIL or every RCPT refused): end its input empty."""
        if replies.data is not None and replies.data.code == pipelining.START_INPUT:
            with contextlib.suppress(SMTPException, OSError):
                await pipelining.abandon_content(self.client, timeout=self.endpoint.command_timeout)

    async def _refused(self, code: int, text: str, stage: str) -> DeliveryError | _RetryOnFresh:
        error = self._error(classify_smtp_reply(code, text, stage=stage))
        if isinstance(error, ServerBusy) or not self.client.is_connected:
            self.client.close()
            return _RetryOnFresh(error)
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


class SmtpTransport:
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

    def __repr__(self) -> str:
        return (
            f"SmtpTransport(account={self.account.name!r}, host={self.endpoint.host!r}, "
            f"port={self.endpoint.port}, open={self._count}/{self.max_connections})"
        )

    @property
    def open_connections(self) -> int:
        return self._count

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _try_slot(self, deadline: float) -> object:
        """One of the account's connection slots: its token, None when unlimited, or _NO_SLOT
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
        return _NO_SLOT

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
            return token if await self.limiter.try_slot(name, cap, token, user=self._user) else _NO_SLOT
        finally:
            self._stretching = False

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

    async def _release_slot(self, token: str) -> None:
        if self.limiter is not None:
            with contextlib.suppress(Exception):  # a lost release lapses with its lease
                await self.limiter.release_slot(self.account.name, token)

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

    def _expired(self, conn: SmtpConnection, now: float) -> bool:
        return (
            not conn.usable
            or now - conn.created_at > self.max_connection_age
            or conn.messages >= self.max_messages_per_connection
            or now - conn.last_used > self.idle_timeout
        )

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
                        while self._idle and reuse is None:
                            conn = self._idle.pop()  # most recently used first
                            if self._expired(conn, now):
                                to_close.append(conn)
                                self._count -= 1
                            else:
                                reuse = conn
                        if reuse is not None:
                            break
                    # a share of 0 (handed over while idle) is for idle times: with a send
                    # waiting, one connection may always be asked for (the slots still cap it)
                    if self._count < min(self.max_connections, max(1, self._share)):
                        # room here; with a limiter, also one of the account's slots (asked without
                        # waiting: a connection of this pool may come free first, see below)
                        token = await self._try_slot(deadline)
                        if token is not _NO_SLOT:
                            self._count += 1  # reserve a place for the new connection
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
                        if token is not _NO_SLOT:
                            self._count += 1
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
                result = await conn.send(message)
            except _RetryOnFresh as retry:
                await self._retire(conn)
                if attempt == 2:
                    raise retry.error from None
                log.info(
                    "account %s: %s; retrying once on a fresh connection", self.account.name, retry.error
                )
                continue
            except DeliveryError:  # a classified answer: the connection was reset or closed
                await self._release(conn)
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
            report.detail["duration_ms"] = round((time.monotonic() - started) * 1000)
            return report
        except DeliveryError as exc:
            report.error = str(exc)
            report.detail["error_class"] = type(exc).__name__
            report.detail["duration_ms"] = round((time.monotonic() - started) * 1000)
            if self._token_source is not None:
                report.detail["oauth"] = self._token_source.describe()
            return report
        try:
            report.ok = await conn.noop()
            if not report.ok:
                report.error = "server did not answer NOOP"
            report.detail = conn.describe()
            if self._token_source is not None:
                report.detail["oauth"] = self._token_source.describe()
        finally:
            await self._close(conn)
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
