"""Graph delivery and OAuth 2.0 against a local identity platform, Graph and Google (contract §1, §3, §5, §6).

Everything here is real: TLS with the test CA, MSAL talking HTTP to the fake
identity platform, httpx talking to the fake Graph, PyJWT assertions verified
by the fake Google endpoint, and aiosmtpd doing AUTH XOAUTH2.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cloud import CLIENT_ID, TENANT, CloudServer, Reply, app_certificate, service_account
from support.pki import Pki
from support.smtpd import SmtpServer, xoauth2_server
from worker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DeliveryError,
    Rejected,
    SecurityPolicyError,
    TransientError,
)
from worker.mail.message import Attachment, MessageSpec, build_message
from worker.ops.connectivity import check_connectivity
from worker.records.loader import Records
from worker.transports import graph as graph_module
from worker.transports import oauth
from worker.transports.base import OutgoingMessage, SendResult
from worker.transports.factory import build_transport
from worker.transports.graph import GraphTransport
from worker.transports.smtp.pool import SmtpTransport

POSTROOM = str(Path(sys.executable).with_name("postroom"))
MAILBOX = "orders@contoso.com"
GMAIL_USER = "orders@example.com"
SA_EMAIL = "postroom@postroom-tests.iam.gserviceaccount.com"


class Setup:
    """Account, profile and keystore records pointing at the local cloud, loaded the real way."""

    def __init__(self, root: Path, pki: Pki, cloud: CloudServer) -> None:
        self.root, self.pki, self.cloud = root, pki, cloud
        for folder in ("accounts", "config/auth-profiles", "config/keystores", "secrets"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.write("config/keystores/test-ca.yaml", f"type: pem\ncertificates: {pki.ca_cert}\n")
        self.secret = "cs~" + secrets.token_urlsafe(24)
        cloud.client_secret = self.secret
        cloud.mailboxes.add(MAILBOX)
        self.write("secrets/client-secret", self.secret + "\n")
        self.write("secrets/wrong-secret", "cs~wrong-" + secrets.token_urlsafe(12) + "\n")

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.write_text(text)
        return path

    def profile(
        self,
        name: str = "contoso",
        *,
        secret_file: str = "client-secret",  # noqa: S107 - a file name
        **extra: str,
    ) -> str:
        lines = [
            "type: client_credentials",
            f"authority: {self.cloud.authority}",
            f"client_id: {CLIENT_ID}",
            *(
                [f"client_secret: {{file: {self.root / 'secrets' / secret_file}}}"]
                if "certificate" not in extra
                else []
            ),
            "truststore: test-ca",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        self.write(f"config/auth-profiles/{name}.yaml", "\n".join(lines) + "\n")
        return name

    def graph_account(
        self, name: str = "graph", *, profile: str = "contoso", provider: str = "office365"
    ) -> str:
        self.write(
            f"accounts/{name}.yaml",
            f"provider: {provider}\nsend_using: graph\ngraph:\n"
            f"  user_principal_name: {MAILBOX}\n  display_name: Contoso Orders\n"
            f"  auth_profile: {profile}\n  base_url: {self.cloud.url}\n  truststore: test-ca\n",
        )
        return name

    def records(self) -> Records:
        return Records.load(self.root / "accounts", self.root / "config")

    def transport(self, name: str = "graph") -> Any:
        records = self.records()
        return build_transport(records.account(name), records)


@pytest.fixture
def setup(tmp_path: Path, pki: Pki, cloud: CloudServer) -> Setup:
    return Setup(tmp_path, pki, cloud)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def message(
    *,
    to: tuple[str, ...] = ("customer@example.net",),
    bcc: tuple[str, ...] = (),
    attachments: tuple[Attachment, ...] = (),
    headers: dict[str, str] | None = None,
) -> OutgoingMessage:
    built = build_message(
        MessageSpec(
            MAILBOX,
            to=list(to),
            bcc=list(bcc),
            subject="Your order",
            text="Thanks for your order.\n",
            display_name="Contoso Orders",
            reply_to="help@contoso.com",
            attachments=list(attachments),
            own_headers=headers or {},  # Auto-Submitted & co.: headers Postroom itself sets
        )
    )
    return OutgoingMessage(built.message_id, MAILBOX, built.recipients, built.data)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def send_and_close(transport: Any, *messages: OutgoingMessage) -> list[SendResult | DeliveryError]:
    out: list[SendResult | DeliveryError] = []
    try:
        for msg in messages:
            try:
                out.append(await transport.send(msg))
            except DeliveryError as exc:
                out.append(exc)
    finally:
        await transport.aclose()
    return out


def assert_never_shown(texts: list[str], *secret_values: str) -> None:
    for text in texts:
        for value in secret_values:
            assert value not in text


# ---- delivery ------------------------------------------------------------------------------


def test_graph_sends_our_mime_intact_with_the_bearer_token(
    setup: Setup, cloud: CloudServer, logs: pytest.LogCaptureFixture
) -> None:
    setup.profile()
    setup.graph_account()
    transport = setup.transport()
    assert isinstance(transport, GraphTransport)
    msg = message(
        to=("customer@example.net",),
        bcc=("audit@contoso.com",),
        headers={"Auto-Submitted": "auto-replied", "In-Reply-To": "<orig-1@example.net>"},
    )
    (result,) = run(send_and_close(transport, msg))

    assert isinstance(result, SendResult), result
    assert result.transport == "graph" and result.security.startswith("HTTPS TLSv1.")
    assert result.accepted == ["customer@example.net", "audit@contoso.com"]
    assert {r.code for r in result.recipients.values()} == {202}
    (delivered,) = cloud.delivered
    assert delivered.route == "sendMail" and delivered.mailbox == MAILBOX
    # exactly the bytes we built, with the Bcc recipient given to Graph in a header of its own
    assert delivered.mime == b"Bcc: audit@contoso.com\r\n" + msg.data
    got = delivered.message
    assert got["Message-ID"] == msg.message_id
    assert got["Auto-Submitted"] == "auto-replied" and got["In-Reply-To"] == "<orig-1@example.net>"
    assert got["Reply-To"] == "help@contoso.com"
    (call,) = cloud.calls("POST", "/sendMail")
    assert call.headers["content-type"] == "text/plain"
    assert call.bearer in cloud.valid_tokens()
    assert cloud.ms_token_requests == [
        {"grant_type": "client_credentials", "scope": "https://graph.microsoft.com/.default"}
    ]
    token = call.bearer
    assert token is not None
    assert_never_shown(
        [logs.text, repr(transport), repr(transport.tokens), repr(result)], token, setup.secret
    )


def test_a_message_without_bcc_goes_byte_for_byte(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    msg = message()
    run(send_and_close(setup.transport(), msg))
    assert cloud.delivered[0].mime == msg.data


def test_graph_takes_display_names_and_idn_domains_but_no_utf8_local_part(
    setup: Setup, cloud: CloudServer
) -> None:
    setup.profile()
    setup.graph_account()
    msg = message(to=("Zoë Customer <zoe@bücher.example>",), bcc=("Audit <audit@contoso.com>",))
    (result,) = run(send_and_close(setup.transport(), msg))
    assert isinstance(result, SendResult), result
    assert result.accepted == ["zoe@xn--bcher-kva.example", "audit@contoso.com"]
    got = cloud.delivered[0].message
    assert [(a.display_name, a.addr_spec) for a in got["To"].addresses] == [
        ("Zoë Customer", "zoe@xn--bcher-kva.example")
    ]
    assert got["Bcc"] == "audit@contoso.com"
    (refused,) = run(send_and_close(setup.transport(), message(to=("josé@example.net",))))
    assert isinstance(refused, Rejected) and "SMTPUTF8" in str(refused), refused
    assert len(cloud.delivered) == 1  # nothing was posted for it


def test_the_token_is_cached_and_reused(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    results = run(send_and_close(setup.transport(), message(), message(), message()))
    assert all(isinstance(r, SendResult) for r in results)
    assert len(cloud.ms_token_requests) == 1 and len(cloud.delivered) == 3
    assert len({c.bearer for c in cloud.calls("POST", "/sendMail")}) == 1


def test_a_token_close_to_expiry_is_refreshed_before_use(setup: Setup, cloud: CloudServer) -> None:
    cloud.token_lifetime = 2  # a short-lived token is replaced half-way: after one second
    setup.profile()
    setup.graph_account()

    async def two_sends() -> None:
        transport = setup.transport()
        try:
            await transport.send(message())
            await asyncio.sleep(1.2)
            await transport.send(message())
        finally:
            await transport.aclose()

    run(two_sends())
    assert len(cloud.ms_token_requests) == 2 and len(cloud.delivered) == 2
    first, second = cloud.calls("POST", "/sendMail")
    assert first.bearer != second.bearer  # no 401 in between: refreshed before it was refused


def test_tokens_are_replaced_five_minutes_early_or_half_way() -> None:
    hour = oauth.AccessToken.issued("secret-token-value", 3600, now=1000.0)
    assert hour.expires_at == 4600.0 and hour.refresh_at == 4600.0 - oauth.REFRESH_MARGIN == 4300.0
    short = oauth.AccessToken.issued("secret-token-value", 120, now=1000.0)
    assert short.refresh_at == 1060.0
    assert "secret-token-value" not in repr(hour) + str(hour)


def test_a_refused_token_is_refreshed_once_then_the_send_succeeds(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()

    async def scenario() -> list[Any]:
        transport = setup.transport()
        try:
            first = await transport.send(message())
            cloud.expire_tokens()  # revoked or expired early: Graph answers 401
            second = await transport.send(message())
            return [first, second]
        finally:
            await transport.aclose()

    results = run(scenario())
    assert all(isinstance(r, SendResult) for r in results)
    statuses = [c.bearer in cloud.valid_tokens() for c in cloud.calls("POST", "/sendMail")]
    assert statuses == [False, False, True]  # first token (now expired), expired retry, fresh token
    assert len(cloud.ms_token_requests) == 2 and len(cloud.delivered) == 2


def test_401_after_the_refresh_is_an_authentication_failure(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    bad = Reply(401, {"error": {"code": "InvalidAuthenticationToken", "message": "Signature invalid"}})
    cloud.graph_script = [bad, bad]
    (error,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(error, AuthenticationFailed) and not error.transient
    assert error.code == 401 and error.account == "graph" and error.transport == "graph"
    assert "after a refresh" in str(error) and "InvalidAuthenticationToken" in str(error)
    assert len(cloud.ms_token_requests) == 2 and not cloud.delivered


@pytest.mark.parametrize(
    ("reply", "kind", "retry_after"),
    [
        (Reply(429, {"error": {"code": "ApplicationThrottled", "message": "slow"}}, {"Retry-After": "7"}),
         TransientError, 7.0),
        (Reply(503, {"error": {"code": "ServiceUnavailable", "message": "later"}}, {"Retry-After": "2"}),
         TransientError, 2.0),
        (Reply(504, {"error": {"code": "GatewayTimeout", "message": "timeout"}}), TransientError, None),
        (Reply(500, {"error": {"code": "InternalServerError", "message": "oops"}}), TransientError, None),
        (Reply(400, {"error": {"code": "ErrorInvalidRecipients", "message": "bad rcpt"}}), Rejected, None),
        (Reply(403, {"error": {"code": "ErrorAccessDenied", "message": "Access is denied."}}),
         AuthenticationFailed, None),
        (Reply(404, {"error": {"code": "ErrorInvalidUser", "message": "no such user"}}), Rejected, None),
    ],
)  # fmt: skip
def test_graph_answers_are_classified(
    setup: Setup, cloud: CloudServer, reply: Reply, kind: type[DeliveryError], retry_after: float | None
) -> None:
    setup.profile()
    setup.graph_account()
    cloud.graph_script = [reply]
    (error,) = run(send_and_close(setup.transport(), message()))
    assert type(error) is kind, error
    assert error.code == reply.status and error.retry_after == retry_after
    assert reply.body["error"]["code"] in str(error)
    assert error.recipients == {}  # nothing per recipient: Graph takes a message whole or not at all


def test_at_most_four_requests_per_mailbox_at_once(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    cloud.graph_delay = 0.2

    async def many() -> list[Any]:
        transport = setup.transport()
        try:
            return await asyncio.gather(*(transport.send(message()) for _ in range(12)))
        finally:
            await transport.aclose()

    started = time.monotonic()
    results = run(many())
    assert all(isinstance(r, SendResult) for r in results) and len(cloud.delivered) == 12
    assert cloud.max_in_flight[MAILBOX] == graph_module.MAILBOX_CONCURRENCY == 4
    assert time.monotonic() - started >= 3 * 0.2  # 12 requests, 4 at a time
    assert len(cloud.ms_token_requests) == 1  # one token request for all of them


def large_above(setup: Setup, monkeypatch: pytest.MonkeyPatch, size: int, **limits: int) -> Any:
    """The Graph account's transport, with a message over ``size`` bytes sent as large (through
    a draft) and graph.py's other ``limits`` set as given."""
    for name, value in {"LARGE_MESSAGE_BYTES": size, **limits}.items():
        monkeypatch.setattr(graph_module, name, value)
    setup.profile()
    setup.graph_account()
    return setup.transport()


def test_a_large_message_goes_through_a_draft_and_an_upload_session(
    setup: Setup, cloud: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = large_above(
        setup, monkeypatch, 40_000, SMALL_ATTACHMENT_BYTES=20_000, UPLOAD_CHUNK_BYTES=16_384
    )
    big = secrets.token_bytes(60_000)
    small = b"small attachment\n" * 10
    msg = message(
        bcc=("audit@contoso.com",),
        attachments=(
            Attachment("report.bin", "application/octet-stream", big),
            Attachment("note.txt", "text/plain", small),
        ),
        headers={"Auto-Submitted": "auto-generated"},
    )
    assert len(msg.data) > 40_000
    (result,) = run(send_and_close(transport, msg))

    assert isinstance(result, SendResult), result
    assert result.accepted == ["customer@example.net", "audit@contoso.com"]
    assert not cloud.calls("POST", "/sendMail")
    (delivered,) = cloud.delivered
    assert delivered.route == "draft"
    got = delivered.message
    assert got["Message-ID"] == msg.message_id and got["Auto-Submitted"] == "auto-generated"
    assert got["Bcc"] == "audit@contoso.com"
    assert [p.get_filename() for p in got.iter_attachments()] == []  # the body went as MIME, alone
    by_name = {a["name"]: a for a in delivered.attachments}
    assert by_name["report.bin"]["content"] == big and by_name["report.bin"]["route"] == "upload"
    assert by_name["report.bin"]["chunks"] == 4  # 60,000 bytes in 16 KiB chunks
    assert by_name["note.txt"]["content"] == small and by_name["note.txt"]["route"] == "post"
    uploads = cloud.calls("PUT", "/upload/")
    assert len(uploads) == 4 and all("authorization" not in u.headers for u in uploads)
    assert len(cloud.calls("POST", "/send")) == 1 and not cloud.drafts


def test_a_failed_large_send_deletes_its_draft(
    setup: Setup, cloud: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = large_above(setup, monkeypatch, 10_000)
    cloud.graph_script = [
        Reply(503, {"error": {"code": "ServiceUnavailable", "message": "x"}}, {"Retry-After": "3"})
    ]
    msg = message(attachments=(Attachment("a.bin", "application/octet-stream", secrets.token_bytes(20_000)),))
    (error,) = run(send_and_close(transport, msg))
    assert isinstance(error, TransientError) and error.retry_after == 3.0
    assert len(cloud.deleted_drafts) == 1 and not cloud.drafts and not cloud.delivered


def test_a_large_message_that_cannot_be_split_is_refused_clearly(
    setup: Setup, cloud: CloudServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (error,) = run(send_and_close(large_above(setup, monkeypatch, 100), message()))
    assert isinstance(error, Rejected) and "cannot be split" in str(error)
    assert not cloud.calls("POST", "/v1.0/")  # nothing was tried


def test_a_413_from_sendmail_falls_back_to_the_upload_route(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    cloud.graph_script = [Reply(413, {"error": {"code": "RequestEntityTooLarge", "message": "too big"}})]
    msg = message(attachments=(Attachment("a.txt", "text/plain", b"hello\n"),))
    (result,) = run(send_and_close(setup.transport(), msg))
    assert isinstance(result, SendResult), result
    assert cloud.delivered[0].route == "draft"
    assert cloud.delivered[0].attachments[0]["content"] == b"hello\n"


def test_graph_refuses_an_untrusted_certificate(setup: Setup, cloud: CloudServer, pki: Pki) -> None:
    setup.profile()
    setup.write(
        "accounts/graph.yaml",
        f"provider: office365\nsend_using: graph\ngraph:\n  user_principal_name: {MAILBOX}\n"
        f"  auth_profile: contoso\n  base_url: {cloud.url}\n",  # no truststore: system CAs
    )
    # the token endpoint is trusted (the profile has the test CA), Graph is not
    (error,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(error, SecurityPolicyError) and "not trusted" in str(error)


# ---- Microsoft credentials ---------------------------------------------------------------------


def test_a_wrong_client_secret_is_an_authentication_failure_without_the_secret(
    setup: Setup, cloud: CloudServer, logs: pytest.LogCaptureFixture
) -> None:
    setup.profile(secret_file="wrong-secret")
    setup.graph_account()
    (error,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(error, AuthenticationFailed), error
    assert "invalid_client" in str(error) and "AADSTS7000215" in str(error)
    assert error.account == "graph" and error.transport == "graph"
    wrong = (setup.root / "secrets" / "wrong-secret").read_text().strip()
    assert_never_shown([str(error), repr(error), logs.text], wrong, setup.secret)
    assert not cloud.calls("POST", "/sendMail")


def test_a_certificate_credential_signs_the_client_assertion(setup: Setup, cloud: CloudServer) -> None:
    p12_password = "p12-" + secrets.token_hex(6)
    path, cert = app_certificate(setup.root, p12_password)
    cloud.certificate = cert
    setup.write("secrets/p12", p12_password)
    setup.write(
        "config/keystores/graph-app.yaml",
        f"type: pkcs12\npath: {path}\npassword: {{file: {setup.root / 'secrets' / 'p12'}}}\n",
    )
    setup.profile(certificate="{keystore: graph-app}")
    setup.graph_account()
    (result,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(result, SendResult), result
    (token_call,) = cloud.calls("POST", "/oauth2/v2.0/token")
    form = dict(p.split("=", 1) for p in token_call.body.decode().split("&"))
    assert "client_secret" not in form and form["client_assertion_type"].startswith("urn")


def test_the_password_grant_with_a_confidential_client(setup: Setup, cloud: CloudServer) -> None:
    password = "pw-" + secrets.token_urlsafe(12)
    cloud.users["svc@contoso.com"] = password
    setup.write("secrets/user-password", password)
    setup.write(
        "config/auth-profiles/contoso-user.yaml",
        f"type: password\nauthority: {cloud.authority}\nclient_id: {CLIENT_ID}\n"
        f"client_secret: {{file: {setup.root / 'secrets' / 'client-secret'}}}\n"
        f"username: svc@contoso.com\npassword: {{file: {setup.root / 'secrets' / 'user-password'}}}\n"
        "truststore: test-ca\n",
    )
    setup.graph_account(profile="contoso-user")
    (result,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(result, SendResult), result
    assert cloud.ms_token_requests[0]["grant_type"] == "password"
    # MSAL's realm lookup drops the authority's port; it still reached this server
    assert cloud.calls("GET", "/common/userrealm/svc@contoso.com")


@pytest.mark.filterwarnings("ignore:This API has been deprecated for public client flows:DeprecationWarning")
def test_the_password_grant_with_a_public_client_and_a_wrong_password(
    setup: Setup, cloud: CloudServer, logs: pytest.LogCaptureFixture
) -> None:
    cloud.users["svc@contoso.com"] = "the-right-one"
    setup.write("secrets/user-password", "not-the-right-one")
    setup.write(
        "config/auth-profiles/public.yaml",
        f"type: password\nauthority: {cloud.authority}\nclient_id: {CLIENT_ID}\n"
        f"username: svc@contoso.com\npassword: {{file: {setup.root / 'secrets' / 'user-password'}}}\n"
        "truststore: test-ca\n",
    )
    setup.graph_account(profile="public")
    (error,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(error, AuthenticationFailed) and "invalid_grant" in str(error)
    assert "AADSTS50126" in str(error)
    assert_never_shown([str(error), logs.text], "not-the-right-one")


def test_token_endpoint_trouble_is_transient(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    cloud.token_errors = [
        Reply(400, {"error": "temporarily_unavailable", "error_description": "busy"}),
        Reply(503, {"error": "server_error"}, {"Retry-After": "0"}),
    ]
    (unavailable, server_error, result) = run(send_and_close(setup.transport(), *[message()] * 3))
    assert isinstance(unavailable, TransientError) and "temporarily_unavailable" in str(unavailable)
    assert isinstance(server_error, TransientError) and "server error" in str(server_error)
    assert isinstance(result, SendResult), result


def test_an_unreachable_token_endpoint_is_a_connection_failure(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    cloud.stop()
    (error,) = run(send_and_close(setup.transport(), message()))
    assert isinstance(error, TransientError) and "token request" in str(error)


# ---- Gmail: JWT bearer + XOAUTH2 -----------------------------------------------------------


def gmail_setup(setup: Setup, cloud: CloudServer, pki: Pki, *, key_file: Path | None = None) -> SmtpServer:
    path, public_key, _ = service_account(setup.root, SA_EMAIL)
    cloud.google_public_key, cloud.google_client_email, cloud.google_subject = (
        public_key,
        SA_EMAIL,
        GMAIL_USER,
    )
    setup.write(
        "config/auth-profiles/google-sa.yaml",
        f"type: jwt_bearer\nservice_account_file: {key_file or path}\nsubject: {GMAIL_USER}\n"
        f"token_url: {cloud.google_token_url}\ntruststore: test-ca\n",
    )
    server = xoauth2_server(pki.server_cert, pki.server_key, GMAIL_USER, cloud.valid_tokens)
    setup.write(
        "accounts/gmail.yaml",
        f"provider: gmail\nsmtp:\n  address: {GMAIL_USER}\n  host: 127.0.0.1\n  port: {server.port}\n"
        "  protocol: starttls\n  truststore: test-ca\n  auth: oauth\n  oauth_profile: google-sa\n",
    )
    return server


def test_gmail_jwt_is_exchanged_and_xoauth2_delivers(
    setup: Setup, cloud: CloudServer, pki: Pki, logs: pytest.LogCaptureFixture
) -> None:
    server = gmail_setup(setup, cloud, pki)
    try:
        transport = setup.transport("gmail")
        assert isinstance(transport, SmtpTransport)
        (result,) = run(send_and_close(transport, message()))
    finally:
        server.stop()
    assert isinstance(result, SendResult), result
    (received,) = server.received
    assert received.auth_mechanism == "XOAUTH2" and received.auth_user == GMAIL_USER
    (claims,) = cloud.google_claims  # verified with the service account's public key
    assert claims["iss"] == SA_EMAIL and claims["sub"] == GMAIL_USER
    assert claims["scope"] == "https://mail.google.com/" and claims["aud"] == cloud.google_token_url
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 60
    (token,) = cloud.valid_tokens()
    key = json.loads((setup.root / "sa.json").read_text())["private_key"]
    assert_never_shown([logs.text, repr(transport)], token, key.splitlines()[1])


def test_a_refused_xoauth2_token_gets_the_json_challenge_then_one_refresh(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    server = gmail_setup(setup, cloud, pki)
    try:
        first = run(send_and_close(setup.transport("gmail"), message()))
        cloud.expire_tokens()  # the cached token is now refused: 334 JSON challenge, then 535
        second = run(send_and_close(setup.transport("gmail"), message()))
    finally:
        server.stop()
    assert isinstance(first[0], SendResult) and isinstance(second[0], SendResult)
    assert [ok for mech, _, ok in server.auth_attempts] == [True, False, True]
    assert len(cloud.google_claims) == 2 and len(server.received) == 2


def test_xoauth2_refused_after_the_refresh_is_an_authentication_failure(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    server = gmail_setup(setup, cloud, pki)
    server.username = "someone-else@example.com"  # the token is fine, the mailbox is not delegated
    try:
        (error,) = run(send_and_close(setup.transport("gmail"), message()))
    finally:
        server.stop()
    assert isinstance(error, AuthenticationFailed) and error.code == 535
    assert "status 400" in str(error) and "https://mail.google.com/" in str(error)  # the JSON challenge
    assert len(server.auth_attempts) == 2 and len(cloud.google_claims) == 2


def test_a_jwt_signed_with_the_wrong_key_is_refused_clearly(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    other, _, _ = service_account(setup.root, SA_EMAIL, name="other-sa.json")
    server = gmail_setup(setup, cloud, pki, key_file=other)
    try:
        (error,) = run(send_and_close(setup.transport("gmail"), message()))
    finally:
        server.stop()
    assert isinstance(error, AuthenticationFailed)
    assert "invalid_grant" in str(error) and "Invalid JWT Signature" in str(error)
    assert error.account == "gmail" and not server.received and not server.auth_attempts


def test_a_service_account_file_without_a_usable_key_is_a_configuration_error(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    broken = setup.write("broken-sa.json", json.dumps({"client_email": SA_EMAIL, "private_key": "nope"}))
    server = gmail_setup(setup, cloud, pki, key_file=broken)
    try:
        transport = setup.transport("gmail")
        with pytest.raises(ConfigurationError, match=r"private_key in .* is not a PEM private key"):
            run(send_and_close_raising(transport))
    finally:
        server.stop()


async def send_and_close_raising(transport: Any) -> None:
    try:
        await transport.send(message())
    finally:
        await transport.aclose()


def test_an_office365_smtp_account_logs_in_with_xoauth2_and_a_microsoft_profile(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    setup.profile("o365-smtp", scopes="[https://outlook.office365.com/.default]")
    server = SmtpServer(
        mode="starttls",
        cert=pki.server_cert,
        key=pki.server_key,
        auth_required=True,
        auth_mechanisms=("LOGIN", "XOAUTH2"),
        username=MAILBOX,
        oauth_tokens=cloud.valid_tokens,
    )
    setup.write(
        "accounts/o365.yaml",
        f"provider: office365\nsmtp:\n  address: {MAILBOX}\n  host: 127.0.0.1\n  port: {server.port}\n"
        "  truststore: test-ca\n  auth: oauth\n  oauth_profile: o365-smtp\n",
    )
    try:
        (result,) = run(send_and_close(setup.transport("o365"), message()))
    finally:
        server.stop()
    assert isinstance(result, SendResult), result
    assert server.received[0].auth_mechanism == "XOAUTH2"
    assert cloud.ms_token_requests == [
        {"grant_type": "client_credentials", "scope": "https://outlook.office365.com/.default"}
    ]


# ---- connectivity ----------------------------------------------------------------------------


def test_connectivity_for_graph_reports_the_token_and_the_send_endpoint(
    setup: Setup, cloud: CloudServer
) -> None:
    setup.profile()
    setup.graph_account()
    report = run(check_connectivity(setup.records(), "graph"))
    assert report.ok, report.error
    assert report.result == graph_module.RESULT_LINE
    detail = report.detail
    assert detail["tenant"] == TENANT and detail["client_id"] == CLIENT_ID
    assert detail["token"] == "acquired" and detail["token_expires"]
    assert detail["send_endpoint"] == "answered 400" and detail["security"].startswith("HTTPS TLSv1.")
    assert not cloud.delivered  # nothing was sent
    shown = json.dumps(report.as_dict())
    assert_never_shown([shown], *cloud.valid_tokens(), setup.secret)


def test_connectivity_for_graph_says_why_no_token(setup: Setup, cloud: CloudServer) -> None:
    setup.profile(secret_file="wrong-secret")
    setup.graph_account()
    report = run(check_connectivity(setup.records(), "graph"))
    assert not report.ok and report.detail["token"] == "not acquired"
    assert report.error is not None and "invalid_client" in report.error
    assert report.detail["error_class"] == "AuthenticationFailed"


def test_connectivity_for_gmail_oauth_reports_the_xoauth2_login(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    server = gmail_setup(setup, cloud, pki)
    try:
        report = run(check_connectivity(setup.records(), "gmail"))
    finally:
        server.stop()
    assert report.ok, report.error
    assert report.result == "SMTP (Connect using STARTTLS)"
    assert report.detail["auth_mechanism"] == "XOAUTH2" and report.detail["login"] == "succeeded"
    assert report.detail["oauth"]["subject"] == GMAIL_USER
    assert report.detail["oauth"]["service_account"] == SA_EMAIL and report.detail["oauth"]["token_expires"]
    assert_never_shown([json.dumps(report.as_dict())], *cloud.valid_tokens())


# ---- validation (postroom accounts check) ------------------------------------------------------


def problems_of(setup: Setup, name: str) -> list[str]:
    return [str(p) for p in setup.records().check([name])[name]]


def test_graph_with_another_provider_is_refused_with_file_and_line(setup: Setup) -> None:
    setup.profile()
    setup.graph_account(provider="gmail")
    (problem,) = problems_of(setup, "graph")
    assert problem.endswith(
        "graph.yaml:2: send_using: graph can only be used with provider office365 (provider is gmail)"
    )


def test_a_missing_profile_a_wrong_type_and_missing_secrets_are_reported(
    setup: Setup, cloud: CloudServer, pki: Pki
) -> None:
    setup.graph_account("missing", profile="nope")
    (problem,) = problems_of(setup, "missing")
    assert "missing.yaml:6: graph.auth_profile: no auth profile 'nope' in " in problem
    assert problem.endswith("config/auth-profiles (known: none)")

    gmail_setup(setup, cloud, pki).stop()
    setup.graph_account("wrongtype", profile="google-sa")
    (problem,) = problems_of(setup, "wrongtype")
    assert (
        "profile 'google-sa' is of type jwt_bearer" in problem and "client_credentials or password" in problem
    )

    setup.write(
        "config/auth-profiles/nosecret.yaml",
        f"type: client_credentials\nauthority: {cloud.authority}\nclient_id: {CLIENT_ID}\n"
        "client_secret: ${POSTROOM_TEST_UNSET_SECRET}\n",
    )
    setup.graph_account("nosecret", profile="nosecret")
    (problem,) = problems_of(setup, "nosecret")
    assert problem.endswith(
        "nosecret.yaml:4: client_secret: environment variable POSTROOM_TEST_UNSET_SECRET is not set"
    )


def test_an_unusable_service_account_file_is_reported(setup: Setup, cloud: CloudServer, pki: Pki) -> None:
    not_json = setup.write("not-json.json", "this is not json")
    gmail_setup(setup, cloud, pki, key_file=not_json).stop()
    (problem,) = problems_of(setup, "gmail")
    assert "google-sa.yaml:2: service_account_file:" in problem and "is not JSON" in problem


def test_a_certificate_keystore_without_a_key_is_reported(setup: Setup, pki: Pki) -> None:
    setup.write("config/keystores/only-ca.yaml", f"type: pem\ncertificates: {pki.ca_cert}\n")
    setup.profile(certificate="{keystore: only-ca}")
    setup.graph_account()
    (problem,) = problems_of(setup, "graph")
    assert "contoso.yaml" in problem and "certificate.keystore" in problem and "key" in problem


def test_records_reprs_hold_no_secret(setup: Setup) -> None:
    setup.profile()
    setup.graph_account()
    records = setup.records()
    shown = [
        repr(records.account("graph")),
        repr(records.profile("contoso")),
        str(records.profile("contoso")),
    ]
    assert_never_shown(shown, setup.secret)
    assert base64.b64encode(setup.secret.encode()).decode() not in "".join(shown)


# ---- the commands a user types -----------------------------------------------------------------


def postroom(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "POSTROOM_ACCOUNTS_DIR": str(setup.root / "accounts"),
        "POSTROOM_CONFIG_DIR": str(setup.root / "config"),
    }
    return subprocess.run(
        [POSTROOM, *args], cwd=setup.root, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_postroom_test_connectivity_for_a_graph_account(setup: Setup, cloud: CloudServer) -> None:
    setup.profile()
    setup.graph_account()
    done = postroom(setup, "test-connectivity", "graph")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == graph_module.RESULT_LINE and lines[-1] == "OK"
    assert f"  tenant: {TENANT}" in lines and f"  client id: {CLIENT_ID}" in lines
    assert "  grant: client_credentials" in lines and "  credential: client secret" in lines
    assert "  token: acquired" in lines and "  send endpoint: answered 400" in lines
    assert any(line.startswith("  token expires: 20") for line in lines)
    assert_never_shown([done.stdout, done.stderr], *cloud.valid_tokens(), setup.secret)

    as_json = json.loads(postroom(setup, "test-connectivity", "graph", "--json").stdout)
    assert as_json["ok"] is True and as_json["detail"]["tenant"] == TENANT


def test_postroom_accounts_check_prints_graph_problems_with_file_and_line(setup: Setup) -> None:
    setup.graph_account("graph", profile="nope")
    done = postroom(setup, "accounts", "check")
    assert done.returncode == 1
    assert "accounts/graph.yaml:6: graph.auth_profile: no auth profile 'nope'" in done.stdout
