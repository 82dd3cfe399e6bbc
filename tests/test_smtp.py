"""The SMTP transport against real aiosmtpd servers with real TLS (contract §1, §3, §5)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from support.intolerant import IntolerantRelay
from support.pki import Pki
from support.smtpd import Rule, SmtpServer, unknown_user
from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    PermanentError,
    Rejected,
    SecurityPolicyError,
    ServerBusy,
    TransientError,
)
from worker.mail.message import MessageSpec, build_message
from worker.records.account.account import EmailAccount
from worker.records.loader import Records
from worker.transports.base import OutgoingMessage
from worker.transports.factory import build_transport
from worker.transports.smtp.pool import SmtpTransport

PASSWORD = "s3cret-pass"
ServerFactory = Callable[..., SmtpServer]


class Accounts:
    """Writes account records pointing at test servers and loads them the real way."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.root = root
        (root / "accounts").mkdir()
        (root / "config" / "keystores").mkdir(parents=True)
        (root / "config" / "keystores" / "test-ca.yaml").write_text(
            f"type: pem\ncertificates: {pki.ca_cert}\n"
        )

    def make(self, server: SmtpServer, *, name: str = "acct", **smtp: Any) -> EmailAccount:
        fields: dict[str, Any] = {
            "address": "sender@example.com",
            "host": "127.0.0.1",
            "port": server.port,
            "password": "${TEST_SMTP_PASSWORD}",
            "user_id": "user@example.com",
            "truststore": "test-ca",
        }
        fields.update(smtp)
        if fields.get("secure") is False:
            fields.pop("truststore", None)
        lines = ["provider: other", "smtp:"]
        for key, value in fields.items():
            if value is None:
                continue
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines += [f'    {k}: "{v}"' for k, v in value.items()]
            elif isinstance(value, bool):
                lines.append(f"  {key}: {'true' if value else 'false'}")
            else:
                lines.append(f'  {key}: "{value}"')
        (self.root / "accounts" / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        records = self.records()
        return records.account(name)

    def records(self) -> Records:
        return Records.load(self.root / "accounts", self.root / "config")

    def transport(self, account: EmailAccount, **pool: Any) -> SmtpTransport:
        transport = build_transport(account, self.records())
        assert isinstance(transport, SmtpTransport)
        if pool:
            transport = SmtpTransport(account, cadata=transport._cadata, **pool)
        return transport


@pytest.fixture
def accounts(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Accounts]:
    monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
    yield Accounts(tmp_path, pki)


def message(
    to: tuple[str, ...] = ("rcpt@example.net",), subject: str = "Hello", sender: str = "sender@example.com"
) -> OutgoingMessage:
    built = build_message(MessageSpec(sender, to=list(to), subject=subject, text="Body text\n"))
    return OutgoingMessage(built.message_id, sender, built.recipients, built.data)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def send_once(transport: SmtpTransport, msg: OutgoingMessage) -> Any:
    try:
        return await transport.send(msg)
    finally:
        await transport.aclose()


async def send_expecting(transport: SmtpTransport, msg: OutgoingMessage) -> DeliveryError:
    try:
        await transport.send(msg)
    except DeliveryError as exc:
        return exc
    finally:
        await transport.aclose()
    raise AssertionError("expected a DeliveryError")


# ---- security modes ------------------------------------------------------------


def test_unsecured_delivery(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, secure=False, auth="none", password=None)
    msg = message(to=("a@example.net", "b@example.net"))
    result = run(send_once(accounts.transport(account), msg))
    assert result.security == "none"
    assert result.accepted == ["a@example.net", "b@example.net"]
    (got,) = server.received
    assert got.mail_from == "sender@example.com"
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    assert got.tls_version is None and got.auth_user is None
    assert got.message["Message-ID"] == msg.message_id
    assert got.message["Subject"] == "Hello"


@pytest.mark.parametrize("dsn", [True, False])
def test_where_the_server_offers_dsn_the_job_id_and_each_recipient_go_out_for_its_reports(
    accounts: Accounts, smtp_server: ServerFactory, dsn: bool
) -> None:
    """ENVID (the job id) and ORCPT (the address as sent) come back in a bounce: what finds the
    job and its recipient when a relay forwarded the mail elsewhere (contract §11)."""
    server = smtp_server(mode="plain", dsn=dsn)
    account = accounts.make(server, secure=False, auth="none", password=None)
    msg = replace(message(to=("a+b@example.net", "c@example.net")), envelope_id="order-1=2")
    run(send_once(accounts.transport(account), msg))
    (mail,) = server.mail_options  # aiosmtpd hands the parameters over upper-cased
    assert ("ENVID=ORDER-1+3D2" in mail) is dsn
    expected = [["ORCPT=RFC822;A+2BB@EXAMPLE.NET"], ["ORCPT=RFC822;C@EXAMPLE.NET"]] if dsn else [[], []]
    assert [[o for o in options if o.startswith("ORCPT")] for _, options in server.rcpt_options] == expected


def test_starttls_with_auth(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", auth_required=True)
    account = accounts.make(server)
    result = run(send_once(accounts.transport(account), message()))
    (got,) = server.received
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert got.auth_user == "user@example.com"
    assert result.security == f"STARTTLS {got.tls_version}"
    assert result.recipients["rcpt@example.net"].status == "sent"
    assert result.recipients["rcpt@example.net"].code == 250
    assert server.commands.index("STARTTLS") < server.commands.index("AUTH") < server.commands.index("MAIL")


def test_smtps_with_auth(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="smtps", auth_required=True)
    account = accounts.make(server, protocol="smtps")
    result = run(send_once(accounts.transport(account), message()))
    (got,) = server.received
    assert got.tls_version in ("TLSv1.2", "TLSv1.3") and result.security.startswith("SMTPS TLSv1.")
    assert "STARTTLS" not in server.commands


def test_min_tls_13_is_enforced(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", tls_max_version=ssl.TLSVersion.TLSv1_2)
    account = accounts.make(server, min_tls_version="1.3")
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError)
    assert "below the minimum" in str(error) and "nothing was sent" in str(error)
    assert server.received == [] and "MAIL" not in server.commands


def test_no_starttls_offered_fails_and_sends_nothing(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", advertise_starttls=False)
    account = accounts.make(server)
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError) and isinstance(error, PermanentError)
    assert "does not offer STARTTLS" in str(error)
    assert server.received == []
    assert "AUTH" not in server.commands and "MAIL" not in server.commands


def test_tls_11_only_server_is_refused(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", tls_max_version=ssl.TLSVersion.TLSv1_1)
    account = accounts.make(server)  # min_tls_version defaults to 1.2
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError)
    assert "TLS version" in str(error)
    assert server.received == [] and "AUTH" not in server.commands


@pytest.mark.parametrize("protocol", ["starttls", "smtps"])
def test_tls_11_server_that_resets_a_modern_hello_is_a_permanent_policy_error(
    accounts: Accounts, smtp_server: ServerFactory, protocol: str
) -> None:
    """Old TLS stacks answer a ClientHello naming versions they do not know with a reset, not an
    alert: that is still "below min_tls_version" (permanent), never a transient retry."""
    server = smtp_server(mode=protocol, tls_max_version=ssl.TLSVersion.TLSv1_1)
    relay = IntolerantRelay(server.port, starttls=protocol == "starttls")
    try:
        account = accounts.make(server, port=relay.port, protocol=protocol)  # min_tls_version 1.2
        error = run(send_expecting(accounts.transport(account), message()))
        assert isinstance(error, SecurityPolicyError) and not error.transient, error
        assert str(error) == (
            "[acct] server offers only TLSv1.1, a TLS version below the minimum (min_tls_version 1.2); "
            "nothing was sent"
        )
        assert relay.resets >= 1  # the first handshake was reset, as on a real such server
        # postroom test-connectivity says the same
        report = run(accounts.transport(account).check())
        assert not report.ok and "below the minimum (min_tls_version 1.2)" in (report.error or "")
    finally:
        relay.stop()
    assert server.received == [] and "AUTH" not in server.commands and "MAIL" not in server.commands
    assert all(not ok for *_, ok in server.auth_attempts)


def test_a_reset_in_the_handshake_of_a_modern_server_stays_transient(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="starttls")
    relay = IntolerantRelay(server.port, starttls=True, max_version=0)  # resets every ClientHello
    try:
        account = accounts.make(server, port=relay.port)
        error = run(send_expecting(accounts.transport(account), message()))
    finally:
        relay.stop()
    assert isinstance(error, ConnectionFailed) and error.transient, error
    assert "STARTTLS failed" in str(error)


def test_certificate_from_another_ca_is_not_trusted(
    accounts: Accounts, smtp_server: ServerFactory, pki: Pki
) -> None:
    server = smtp_server(mode="smtps", cert=pki.other_server_cert, key=pki.other_server_key)
    account = accounts.make(server, protocol="smtps")
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError)
    assert "not trusted" in str(error)
    assert server.received == []


def test_system_cas_are_used_without_a_truststore_and_honour_ssl_cert_file(
    accounts: Accounts, smtp_server: ServerFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = smtp_server(mode="starttls")
    monkeypatch.setenv("SSL_CERT_FILE", str(Path("/nonexistent/ca.pem")))
    account = accounts.make(server, truststore=None)
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError) and "not trusted" in str(error)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    run(send_once(accounts.transport(account), message()))
    assert len(server.received) == 1


def test_hostname_is_checked_unless_turned_off(
    accounts: Accounts, smtp_server: ServerFactory, pki: Pki
) -> None:
    server = smtp_server(mode="starttls", cert=pki.wrong_host_cert, key=pki.wrong_host_key)
    account = accounts.make(server)
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError) and "not trusted" in str(error)
    relaxed = accounts.make(server, advanced={"mail.smtp.ssl.checkserveridentity": "false"})
    run(send_once(accounts.transport(relaxed), message()))
    assert len(server.received) == 1


# ---- authentication, EHLO, envelope ------------------------------------------------


def test_plain_disabled_uses_login(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", auth_required=True, auth_mechanisms=("PLAIN", "LOGIN"))
    account = accounts.make(server, advanced={"mail.smtp.auth.plain.disable": "true"})
    run(send_once(accounts.transport(account), message()))
    assert server.auth_attempts == [("LOGIN", "user@example.com", True)]
    assert server.received[0].auth_mechanism == "LOGIN"


def test_plain_is_preferred_by_default(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", auth_required=True, auth_mechanisms=("LOGIN", "PLAIN"))
    run(send_once(accounts.transport(accounts.make(server)), message()))
    assert server.auth_attempts == [("PLAIN", "user@example.com", True)]


def test_wrong_password_is_a_permanent_auth_failure_and_never_leaks(
    accounts: Accounts,
    smtp_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pass-7d1c"
    monkeypatch.setenv("TEST_SMTP_PASSWORD", wrong)
    server = smtp_server(mode="starttls", auth_required=True)
    account = accounts.make(server)
    transport = accounts.transport(account)
    error = run(send_expecting(transport, message()))
    assert isinstance(error, AuthenticationFailed)
    assert error.code == 535 and error.enhanced_status == "5.7.8"
    assert error.account == "acct" and error.transport == "smtp"
    assert server.received == []
    shown = [str(error), repr(error), repr(account), repr(transport), str(error.__dict__)]
    shown += [r.getMessage() for r in caplog.records] + [str(r.exc_info) for r in caplog.records]
    for text in shown:
        assert wrong not in text and PASSWORD not in text


def test_ehlo_name_and_envelope_sender_from_advanced(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls")
    account = accounts.make(
        server,
        advanced={"mail.smtp.localhost": "mailer.example.com", "mail.smtp.from": "bounces@example.com"},
    )
    run(send_once(accounts.transport(account), message()))
    (got,) = server.received
    assert got.ehlo_name == "mailer.example.com"
    assert got.mail_from == "bounces@example.com"
    assert got.message["From"] == "sender@example.com"


def test_no_usable_mechanism_is_a_clear_error(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", auth_required=True, auth_mechanisms=("PLAIN",))
    account = accounts.make(server, advanced={"mail.smtp.auth.mechanisms": "LOGIN"})
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, SecurityPolicyError)
    assert "server offers PLAIN, account allows LOGIN" in str(error)


# ---- reply classification (contract §3) --------------------------------------------------
# Every reply the contract names is classified in test_policy_tables.py; here one transient and
# one permanent reply per stage go over the wire, pipelined and not.


@pytest.mark.parametrize(
    ("stage", "code", "text", "error_class", "enhanced"),
    [
        ("MAIL", 451, "4.3.0 Try again later", TransientError, "4.3.0"),
        ("MAIL", 553, "5.1.8 Bad sender address", Rejected, "5.1.8"),
        ("RCPT", 452, "4.5.3 Too many recipients", TransientError, "4.5.3"),
        ("RCPT", 550, "5.1.1 No such user", Rejected, "5.1.1"),
        ("DATA", 451, "4.3.0 Queue full", TransientError, "4.3.0"),
        ("DATA", 554, "5.7.1 Spam", Rejected, "5.7.1"),
    ],
)
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
def test_replies_are_classified(
    accounts: Accounts,
    smtp_server: ServerFactory,
    stage: str,
    code: int,
    text: str,
    error_class: type[DeliveryError],
    enhanced: str,
    pipelining: bool,
) -> None:
    rules = [Rule(stage, code, text)]  # type: ignore[arg-type]
    server = smtp_server(mode="starttls", rules=rules, pipelining=pipelining)
    account = accounts.make(server)
    error = run(send_expecting(accounts.transport(account), message()))
    assert type(error) is error_class
    assert error.code == code and error.enhanced_status == enhanced
    assert error.transient is issubclass(error_class, TransientError)
    assert server.received == []
    if stage != "MAIL":
        assert error.recipients["rcpt@example.net"].code == code
        assert error.recipients["rcpt@example.net"].status == ("deferred" if error.transient else "failed")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_421_closes_the_connection_and_retries_once_on_a_fresh_one(
    accounts: Accounts, smtp_server: ServerFactory, stage: str, pipelining: bool
) -> None:
    rule = Rule(stage, 421, "4.3.2 Service shutting down", times=1)  # type: ignore[arg-type]
    server = smtp_server(mode="starttls", rules=[rule], pipelining=pipelining)
    account = accounts.make(server)
    result = run(send_once(accounts.transport(account), message()))
    assert result.accepted == ["rcpt@example.net"]
    assert len(server.received) == 1
    assert server.connections == 2


def test_persistent_421_and_432_are_transient_server_busy(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    for code in (421, 432):
        server = smtp_server(mode="starttls", rules=[Rule("MAIL", code, "4.3.2 Too many connections")])
        error = run(send_expecting(accounts.transport(accounts.make(server)), message()))
        assert isinstance(error, ServerBusy) and error.transient and error.code == code
        assert server.connections == 2  # the original and one fresh retry, no more


def test_greeting_421_is_server_busy(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", banner_code=421)
    error = run(send_expecting(accounts.transport(accounts.make(server)), message()))
    assert isinstance(error, ServerBusy) and error.code == 421


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
def test_one_of_two_recipients_refused_is_a_partial_result(
    accounts: Accounts, smtp_server: ServerFactory, pipelining: bool
) -> None:
    rule = unknown_user("bad")
    server = smtp_server(mode="starttls", rules=[rule], pipelining=pipelining)
    account = accounts.make(server)
    result = run(send_once(accounts.transport(account), message(to=("good@example.net", "bad@example.net"))))
    assert result.accepted == ["good@example.net"]
    assert result.failed == ["bad@example.net"]
    assert result.recipients["bad@example.net"].code == 550
    assert result.recipients["bad@example.net"].message == "5.1.1 No such user"
    (got,) = server.received
    assert got.rcpt_tos == ["good@example.net"]


def test_temporarily_refused_recipient_is_deferred(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", rules=[Rule("RCPT", 452, "4.2.2 Mailbox full", match="full")])
    account = accounts.make(server)
    result = run(send_once(accounts.transport(account), message(to=("ok@example.net", "full@example.net"))))
    assert result.accepted == ["ok@example.net"] and result.deferred == ["full@example.net"]


# ---- network failures -------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class SilentListener:
    """Accepts TCP connections and then says nothing (or hangs up at once)."""

    def __init__(self, *, hang_up: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.hang_up = hang_up
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hang_up:
                conn.close()
            else:
                self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_connection_refused_is_transient(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, port=_closed_port())
    error = run(send_expecting(accounts.transport(account), message()))
    assert isinstance(error, ConnectionFailed) and error.transient
    assert "cannot connect to 127.0.0.1" in str(error)


def test_connect_timeout_is_transient(accounts: Accounts, smtp_server: ServerFactory) -> None:
    listener = SilentListener(hang_up=False)
    try:
        account = accounts.make(
            smtp_server(mode="plain"), port=listener.port, advanced={"mail.smtp.connectiontimeout": "300"}
        )
        started = time.monotonic()
        error = run(send_expecting(accounts.transport(account), message()))
        assert isinstance(error, ConnectionFailed) and "timed out" in str(error)
        assert time.monotonic() - started < 5
    finally:
        listener.close()


def test_tls_handshake_io_error_is_transient(accounts: Accounts, smtp_server: ServerFactory) -> None:
    listener = SilentListener(hang_up=True)
    try:
        account = accounts.make(smtp_server(mode="plain"), port=listener.port, protocol="smtps")
        error = run(send_expecting(accounts.transport(account), message()))
        assert isinstance(error, ConnectionFailed) and error.transient
    finally:
        listener.close()


def test_dropped_connections_are_replaced(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="starttls", drop_after=2)
    account = accounts.make(server)
    transport = accounts.transport(account, max_connections=1)

    async def scenario() -> None:
        try:
            for i in range(5):
                await transport.send(message(subject=f"m{i}"))
        finally:
            await transport.aclose()

    run(scenario())
    assert [r.message["Subject"] for r in server.received] == [f"m{i}" for i in range(5)]
    assert server.connections == 3


# ---- the pool ---------------------------------------------------------------------------


def test_200_messages_through_the_pool_open_no_more_connections_than_its_size(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="starttls", auth_required=True)
    account = accounts.make(server)
    transport = accounts.transport(account, max_connections=3)
    msgs = [message(subject=f"n{i}") for i in range(200)]

    async def scenario() -> list[Any]:
        try:
            return await asyncio.gather(*(transport.send(m) for m in msgs))
        finally:
            await transport.aclose()

    results = run(scenario())
    assert all(r.accepted == ["rcpt@example.net"] for r in results)
    assert len(server.received) == 200
    assert {r.message["Message-ID"] for r in server.received} == {m.message_id for m in msgs}
    assert server.connections <= 3
    assert transport.connections_opened == server.connections
    assert server.commands.count("AUTH") == server.connections


def test_messages_per_connection_are_capped(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, max_connections=1, max_messages_per_connection=2)

    async def scenario() -> None:
        try:
            for _ in range(5):
                await transport.send(message())
        finally:
            await transport.aclose()

    run(scenario())
    assert len(server.received) == 5 and server.connections == 3
    assert server.commands.count("QUIT") == 3


def test_idle_connections_are_checked_with_noop_before_reuse(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, max_connections=1, idle_check_after=0.05)

    async def scenario() -> None:
        try:
            await transport.send(message())
            await asyncio.sleep(0.1)
            await transport.send(message())
            await transport.send(message())  # used just now: no NOOP
        finally:
            await transport.aclose()

    run(scenario())
    assert server.connections == 1
    assert server.commands.count("NOOP") == 1
    assert server.commands.index("NOOP") < len(server.commands) - 1


def test_idle_connections_are_closed_after_the_idle_timeout(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, idle_timeout=0.2)

    async def scenario() -> int:
        try:
            await transport.send(message())
            assert transport.open_connections == 1
            for _ in range(100):
                await asyncio.sleep(0.05)
                if transport.open_connections == 0:
                    break
            return transport.open_connections
        finally:
            await transport.aclose()

    assert run(scenario()) == 0
    assert "QUIT" in server.commands


def test_aclose_closes_everything(accounts: Accounts, smtp_server: ServerFactory) -> None:
    server = smtp_server(mode="plain")
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, max_connections=2)

    async def scenario() -> None:
        await asyncio.gather(transport.send(message()), transport.send(message()))
        await transport.aclose()
        assert transport.open_connections == 0
        with pytest.raises(ConnectionFailed, match="closed"):
            await transport.send(message())

    run(scenario())
    assert server.commands.count("QUIT") == server.connections


def test_a_cancelled_send_never_leaves_its_connection_in_the_pool(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="plain", stall_mail_after=1, stall_seconds=2)
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, max_connections=1)

    async def scenario() -> None:
        try:
            await transport.send(message(subject="first"))
            stalled = asyncio.ensure_future(transport.send(message(subject="cancelled")))
            await asyncio.sleep(0.3)  # its MAIL FROM is waiting on the server
            stalled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stalled
            assert transport.open_connections == 0  # discarded, and its slot given back
            await transport.send(message(subject="after"))
        finally:
            await transport.aclose()

    run(scenario())
    assert [r.message["Subject"] for r in server.received] == ["first", "after"]
    assert server.connections == 2


def test_a_retired_connection_closes_in_the_background_and_then_frees_its_place(
    accounts: Accounts, smtp_server: ServerFactory
) -> None:
    """A connection retired after its message (here: its message cap) is closed politely in the
    background: the send returns at the 250 (the sent mark comes next and must not wait for a
    QUIT), and the pool's place is free once the QUIT is answered — a one-connection pool then
    opens its next connection."""
    server = smtp_server(mode="plain", quit_delay=1.0)
    account = accounts.make(server, secure=False, auth="none", password=None)
    transport = accounts.transport(account, max_connections=1, max_messages_per_connection=1)

    async def scenario() -> None:
        try:
            started = time.monotonic()
            await transport.send(message(subject="first"))
            assert time.monotonic() - started < 0.9  # not waiting for the QUIT's answer
            await asyncio.wait_for(transport.send(message(subject="second")), 5)
            assert time.monotonic() - started >= 1.0  # its connection waited for the place
        finally:
            await transport.aclose()

    run(scenario())
    assert [r.message["Subject"] for r in server.received] == ["first", "second"]
    assert server.peak_open == 1 and server.connections == 2
