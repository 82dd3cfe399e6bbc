"""Real aiosmtpd servers on port 0, each on its own thread and event loop.

One :class:`SmtpServer` speaks plain SMTP, STARTTLS or SMTPS with the test
PKI, may require AUTH (PLAIN/LOGIN, advertised in a chosen order), and can be
told to misbehave the ways real servers do: answer a rule's code at MAIL, RCPT
or DATA, greet with 421, hang up after N messages, stall once (or every time)
at MAIL, not advertise STARTTLS, or speak only old TLS. It records what a test
wants to assert: every command verb, every connection, every AUTH attempt and
every accepted message with the TLS version and login it arrived under (and
when).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
import json
import ssl
import threading
import time
import warnings
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

Mode = Literal["plain", "starttls", "smtps"]
Stage = Literal["MAIL", "RCPT", "DATA"]

USERNAME = "user@example.com"
PASSWORD = "s3cret-pass"


@dataclass
class Rule:
    """Answer ``code text`` at ``stage`` (for addresses containing ``match``), ``times`` times."""

    stage: Stage
    code: int
    text: str
    times: int | None = None
    match: str | None = None

    def applies(self, stage: str, address: str) -> bool:
        if stage != self.stage or (self.times is not None and self.times <= 0):
            return False
        if self.match is not None and self.match not in address:
            return False
        if self.times is not None:
            self.times -= 1
        return True

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def unknown_user(match: str | None = None, times: int | None = None) -> Rule:
    """RCPT refused for good, as for an address that does not exist (550 5.1.1)."""
    return Rule("RCPT", 550, "5.1.1 No such user", times=times, match=match)


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls_version: str | None
    auth_user: str | None
    auth_mechanism: str | None
    ehlo_name: str | None
    at: float = field(default_factory=time.time)  # when the server accepted it
    message: EmailMessage = field(init=False)

    def __post_init__(self) -> None:
        self.message = email.message_from_bytes(self.data, policy=email.policy.default)


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        out = [
            "250-AUTH " + " ".join(self.server.auth_mechanisms) if line.startswith("250-AUTH ") else line
            for line in responses[:-1]
        ]
        if self.server.dsn:
            out.append("250-DSN")
        if self.server.pipelining:
            out.append("250-PIPELINING")
        return [*out, responses[-1]]

    async def auth_XOAUTH2(self, smtp: SMTP, args: list[str]) -> AuthResult:
        """Google/Microsoft XOAUTH2: accepts only a token the test token server issued.

        A refused token gets the base64 JSON error challenge real servers send;
        the client answers with an empty line and then gets the final 535.
        """
        user, token = None, None
        try:
            fields = base64.b64decode(args[1], validate=True).decode().split("\x01")
            user = fields[0].removeprefix("user=")
            token = fields[1].removeprefix("auth=Bearer ")
        except (IndexError, binascii.Error, UnicodeDecodeError):
            pass
        valid = self.server.oauth_tokens() if self.server.oauth_tokens else set()
        ok = user == self.server.username and token is not None and token in valid
        self.server.auth_attempts.append(("XOAUTH2", user or "", ok))
        if ok and isinstance(smtp, _Protocol):
            smtp.auth_user = user
            smtp.auth_mechanism = "XOAUTH2"
            return AuthResult(success=True, auth_data=user)
        challenge = json.dumps({"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"})
        await smtp.challenge_auth(challenge)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.server.mail_commands += 1
        if (
            self.server.stall_mail_after is not None
            and self.server.mail_commands > self.server.stall_mail_after
        ):
            if not self.server.stall_all:
                self.server.stall_mail_after = None
            self.server.stalls += 1
            self.server.stalled.set()
            await asyncio.sleep(self.server.stall_seconds)  # a client that dies meanwhile cancels this
        rule = self.server.rule("MAIL", address)
        if rule is not None:
            return rule.reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.server.mail_options.append(list(options))
        return "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rule = self.server.rule("RCPT", address)
        if rule is not None:
            return rule.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        self.server.rcpt_options.append((address, list(options)))
        return "250 OK"

    async def handle_DATA(self, smtp: _Protocol, session: Session, envelope: Envelope) -> str:
        rule = self.server.rule("DATA", ",".join(envelope.rcpt_tos))
        if rule is not None:
            return rule.reply
        if self.server.data_delay:
            await asyncio.sleep(self.server.data_delay)
        ssl_object = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
        data = envelope.original_content or b""
        self.server.received.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=data,
                tls_version=ssl_object.version() if ssl_object is not None else None,
                auth_user=smtp.auth_user,
                auth_mechanism=smtp.auth_mechanism,
                ehlo_name=session.host_name,
            )
        )
        smtp.messages += 1
        return "250 2.0.0 OK queued"


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """Sends the TLS alert before hanging up on a failed handshake.

    OpenSSL-based servers (Postfix, Exchange) tell the client *why* they refuse
    ("protocol version"); asyncio's server side drops that alert, which would
    make a policy refusal look like a network error.
    """

    def _do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except sslproto.SSLAgainErrors:
            self._process_outgoing()  # type: ignore[attr-defined]
        except ssl.SSLError as exc:
            self._process_outgoing()  # type: ignore[attr-defined]
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)


class _Protocol(SMTP):
    """aiosmtpd's SMTP with the hooks the test server needs."""

    def __init__(self, owner: SmtpServer, **kwargs: Any) -> None:
        self.owner = owner
        self.auth_user: str | None = None
        self.auth_mechanism: str | None = None
        self.messages = 0
        super().__init__(_Handler(owner), **kwargs)
        if owner.mode == "smtps":
            self._auth_require_tls = False  # the whole connection is TLS already
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._recording(name, method)

    def _recording(self, name: str, method: Callable[[str | None], Awaitable[None]]) -> Any:
        async def record(arg: str | None) -> None:
            self.owner.commands.append(name)
            if name == "QUIT" and self.owner.quit_delay:
                await asyncio.sleep(self.owner.quit_delay)
            await method(arg)
            if name == "DATA":
                self._maybe_drop()

        return record

    def _getparams(self, params: Any) -> Any:
        """aiosmtpd's MAIL/RCPT parameters, less DSN's (RFC 3461) where the server offers DSN:
        aiosmtpd refuses every parameter it does not know (555); the handler still sees them."""
        found = super()._getparams(params)
        if found is not None and self.owner.dsn:
            for name in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                found.pop(name, None)
        return found

    def _maybe_drop(self) -> None:
        limit = self.owner.drop_after
        if limit is not None and self.messages >= limit and self.transport:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """aiosmtpd's STARTTLS, with the alert-sending TLS layer."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        waiter = self.loop.create_future()
        self._tls_protocol = _AlertingSSLProtocol(self.loop, self, self.tls_context, waiter, server_side=True)
        assert self.transport is not None
        self._original_transport = self.transport
        self.transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:
            self.owner.connections += 1
            self.owner.open_now += 1
            self.owner.peak_open = max(self.owner.peak_open, self.owner.open_now)
            self.owner.protocols.append(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not getattr(self, "_counted_lost", False):
            self._counted_lost = True
            self.owner.open_now -= 1
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        if self.owner.banner_code is not None:
            await self.push(f"{self.owner.banner_code} 4.3.2 Service not available, try later")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()


class SmtpServer:
    """A running test server; ``port`` is where it listens on 127.0.0.1."""

    def __init__(
        self,
        *,
        mode: Mode = "plain",
        port: int = 0,
        cert: Path,
        key: Path,
        auth_required: bool = False,
        auth_mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
        advertise_starttls: bool = True,
        tls_max_version: ssl.TLSVersion | None = None,
        rules: Sequence[Rule] = (),
        banner_code: int | None = None,
        drop_after: int | None = None,
        dsn: bool = False,
        pipelining: bool = True,
        stall_mail_after: int | None = None,
        stall_seconds: float = 5.0,
        stall_all: bool = False,
        username: str = USERNAME,
        password: str = PASSWORD,
        oauth_tokens: Callable[[], set[str]] | None = None,
        data_delay: float = 0.0,
        quit_delay: float = 0.0,
        smtputf8: bool = True,
    ) -> None:
        self.mode = mode
        self.auth_required = auth_required
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.rules = list(rules)
        self.banner_code = banner_code
        self.drop_after = drop_after
        self.dsn = dsn
        self.pipelining = pipelining  # advertise PIPELINING (RFC 2920), as most real servers do
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (RFC 6531); off: a UTF-8 address must be refused
        self.stall_mail_after = stall_mail_after  # the next MAIL after this many stalls once
        self.stall_seconds = stall_seconds
        self.stall_all = stall_all  # every MAIL after stall_mail_after stalls (until it is set to None)
        self.stalls = 0
        self.stalled = threading.Event()
        self.mail_commands = 0
        self.username = username
        self.password = password
        self.oauth_tokens = oauth_tokens  # XOAUTH2: the tokens currently valid
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.mail_options: list[list[str]] = []
        self.rcpt_options: list[tuple[str, list[str]]] = []  # (address, its parameters) per RCPT
        self.connections = 0
        self.open_now = 0  # connections open right now
        self.peak_open = 0  # the most that were ever open at once
        self.data_delay = data_delay  # seconds before answering DATA's end (a slow server)
        self.quit_delay = quit_delay  # seconds before answering QUIT
        self.protocols: list[_Protocol] = []
        self._tls = self._context(cert, key, tls_max_version) if mode != "plain" else None
        self._advertise_starttls = advertise_starttls
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"smtpd-{mode}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test SMTP server did not start")
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    @staticmethod
    def _context(cert: Path, key: Path, max_version: ssl.TLSVersion | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if max_version is not None:
            with warnings.catch_warnings():  # a server stuck on TLS 1.1 is the point of the test
                warnings.simplefilter("ignore", DeprecationWarning)
                context.maximum_version = max_version
                if max_version < ssl.TLSVersion.TLSv1_2:
                    context.minimum_version = ssl.TLSVersion.TLSv1
                    context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    def rule(self, stage: str, address: str) -> Rule | None:
        return next((r for r in self.rules if r.applies(stage, address)), None)

    def _authenticate(
        self, smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode()
        ok = user == self.username and auth_data.password.decode() == self.password
        self.auth_attempts.append((mechanism, user, ok))
        if ok and isinstance(smtp, _Protocol):
            smtp.auth_user = user
            smtp.auth_mechanism = mechanism
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    def _protocol(self) -> _Protocol:
        return _Protocol(
            self,
            hostname="localhost",
            tls_context=self._tls if self.mode == "starttls" and self._advertise_starttls else None,
            auth_required=self.auth_required,
            authenticator=self._authenticate,
            auth_exclude_mechanism=[
                m for m in ("PLAIN", "LOGIN", "XOAUTH2") if m not in self.auth_mechanisms
            ],
            enable_SMTPUTF8=self.smtputf8,
            loop=self._loop,
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        ssl_context = self._tls if self.mode == "smtps" else None
        self._server = self._loop.run_until_complete(
            self._loop.create_server(self._protocol, "127.0.0.1", self._port, ssl=ssl_context)
        )
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in self.protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await asyncio.sleep(0.01)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def xoauth2_server(cert: Path, key: Path, user: str, tokens: Callable[[], set[str]]) -> SmtpServer:
    """Gmail's submission server as the tests stand it in: STARTTLS, XOAUTH2 only, for ``user``,
    accepting the access tokens ``tokens()`` lists (the token endpoint's)."""
    return SmtpServer(
        mode="starttls",
        cert=cert,
        key=key,
        auth_required=True,
        auth_mechanisms=("XOAUTH2",),
        username=user,
        oauth_tokens=tokens,
    )
