"""Mail that real servers and clients accept (contract §2): addresses with display names, IDN
domains, UTF-8 local parts (SMTPUTF8), Date, Message-IDs, text attachment charsets, RFC 8058
one-click unsubscribe inside DKIM, and the Basic-auth retirement warning.

Every kind of message is parsed back with Python's ``email`` in strict mode
(``policy.default`` with ``raise_on_defect=True``): zero defects, every header line at
most 998 octets.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from support.mailcheck import strict_parse
from support.queue import Live, QueueEnv, Worker, cli, finished, unique
from support.smtpd import SmtpServer
from worker.mail.message import build_message
from worker.mail.payload import SendPayload
from worker.mail.signing import DkimSigner
from worker.queue.pipeline.delivery import _spec
from worker.records.account.record import DkimSettings
from worker.records.addresses import bare_address, parse_mailbox

ServerFactory = Callable[..., SmtpServer]


class FakeAccount:
    from_address = "orders@example.com"
    display_name = "Example Orders"
    reply_to = None


def built(**fields: Any) -> tuple[bytes, tuple[str, ...]]:
    fields = {"account": "orders", "to": ["a@example.test"], "subject": "Hi", "text": "x", **fields}
    payload = SendPayload.model_validate(fields)
    message = build_message(_spec(FakeAccount(), payload, "<fixed@example.com>"))
    return message.data, message.recipients


# ---- addresses ----------------------------------------------------------------------------------


def test_display_names_and_idn_domains_go_out_right() -> None:
    data, envelope = built(
        to=["Alice Example <alice@example.test>", '"Zoë, the Boss" <zoe@bücher.example>'],
        cc=["bob@BÜCHER.example"],
        bcc=["Hidden <h@example.test>"],
    )
    assert envelope == (
        "alice@example.test",
        "zoe@xn--bcher-kva.example",
        "bob@xn--bcher-kva.example",
        "h@example.test",
    )
    message = strict_parse(data)
    to = message["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Alice Example", "alice@example.test"),
        ("Zoë, the Boss", "zoe@xn--bcher-kva.example"),
    ]
    assert message["Cc"].addresses[0].addr_spec == "bob@xn--bcher-kva.example"
    assert "Bcc" not in message and b"Hidden" not in data
    assert data.split(b"\r\n\r\n")[0].isascii()  # no SMTPUTF8 needed for names and IDN domains


@pytest.mark.parametrize(
    "bad",
    [
        "Alice <alice@example.test",
        "Alice alice@example.test",
        "<>",
        "a@b@c",
        "Alice <a@-x.example>",
        "x@bü_cher.example",
    ],
)
def test_malformed_addresses_are_refused_at_enqueue(bad: str) -> None:
    with pytest.raises(ValidationError):
        SendPayload.model_validate({"account": "a", "to": [bad], "text": "x"})


def test_a_utf8_local_part_gets_utf8_headers() -> None:
    data, envelope = built(to=["José <josé@example.test>"])
    assert envelope == ("josé@example.test",)
    message = strict_parse(data, utf8_local_parts=True)
    assert message["To"].addresses[0].addr_spec == "josé@example.test"
    assert (
        parse_mailbox("josé@example.test").needs_smtputf8 and bare_address("Q <q@bücher.example>").isascii()
    )


# ---- headers ----------------------------------------------------------------------------------


def test_date_has_a_real_offset_and_parses_to_an_aware_datetime() -> None:
    message = strict_parse(built(to=["a@example.test"])[0])
    assert message["Date"].endswith("+0000")
    assert message["Date"].datetime.tzinfo is not None


def test_auto_reply_to_a_named_sender_with_a_bare_message_id() -> None:
    payload = SendPayload.model_validate(
        {
            "account": "orders",
            "kind": "auto-reply",
            "text": "We got it",
            "original": {
                "message_id": "q10@customer.test",
                "from": "Alice Example <alice@customer.test>",
                "subject": "Question",
                "headers": {"References": "<q9@customer.test>"},
            },
        }
    )
    assert payload.original is not None and payload.original.message_id == "<q10@customer.test>"
    from worker.mail import autoreply

    spec = _spec(FakeAccount(), payload, "<r1@example.com>")
    from dataclasses import replace

    spec = replace(
        spec,
        to=[autoreply.reply_recipient(payload)],
        subject=autoreply.reply_subject(payload),
        own_headers=autoreply.threading_headers(payload.original),
    )
    built_reply = build_message(spec)
    message = strict_parse(built_reply.data)
    assert message["In-Reply-To"] == "<q10@customer.test>"
    assert message["References"] == "<q9@customer.test> <q10@customer.test>"
    assert message["To"].addresses[0].display_name == "Alice Example"
    assert built_reply.recipients == ("alice@customer.test",)
    assert message["Subject"] == "Re: Question"


def test_text_attachments_carry_their_charset() -> None:
    csv = "name,city\nZoë,Kraków\n".encode()
    latin = "Müller".encode("latin-1")
    data, _ = built(
        attachments=[
            {
                "filename": "people.csv",
                "content_type": "text/csv",
                "content_base64": base64.b64encode(csv).decode(),
            },
            {
                "filename": "old.txt",
                "content_type": "text/plain",
                "content_base64": base64.b64encode(latin).decode(),
                "charset": "iso-8859-1",
            },
            {"filename": "a.bin", "content_type": "application/octet-stream", "content_base64": "AAE="},
        ]
    )
    message = strict_parse(data)
    parts = {p.get_filename(): p for p in message.iter_attachments()}
    assert parts["people.csv"].get_content_charset() == "utf-8"
    assert parts["people.csv"].get_content() == "name,city\nZoë,Kraków\n"
    assert (
        parts["old.txt"].get_content_charset() == "iso-8859-1" and parts["old.txt"].get_content() == "Müller"
    )
    assert parts["a.bin"].get_content_charset() is None


def test_every_header_line_stays_within_998_octets() -> None:
    names = [
        f"Person Number {i} With A Long Name <person.{i}.with.a.long.local.part@example.test>"
        for i in range(40)
    ]
    data, _ = built(to=names, subject="S" * 900, headers={"X-Long": "v " * 400})
    strict_parse(data)


# ---- RFC 8058 one-click unsubscribe -----------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key, pem


def test_list_unsubscribe_headers_are_inside_the_dkim_signature(
    dkim_key: tuple[rsa.RSAPrivateKey, str],
) -> None:
    key, pem = dkim_key
    data, _ = built(
        to=["a@example.test"],
        list_unsubscribe={"url": "https://example.com/u/123?sig=ab", "mailto": "unsub@example.com"},
    )
    for explicit in (None, ["from", "to", "subject"]):  # dkimpy's defaults, or the account's own list
        settings = DkimSettings.model_validate(
            {"domain": "example.com", "selector": "s1", "private_key": "${DKIM_UNUSED}", "headers": explicit}
        )
        signed = DkimSigner(settings, key, pem).sign(data)
        message = strict_parse(signed)
        assert message["List-Unsubscribe"] == "<https://example.com/u/123?sig=ab>, <mailto:unsub@example.com>"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        tags = dict(
            t.strip().split("=", 1) for t in "".join(str(message["DKIM-Signature"]).split()).split(";") if t
        )
        signed_names = tags["h"].lower().split(":")
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_names), signed_names
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
        assert dkim.verify(signed, dnsfunc=lambda name, timeout=5, txt=record: txt)


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"url": "http://example.com/u"},
        {"url": "https://e.com/a b"},
        {"url": "https://e.com/<x>"},
        {"mailto": "x"},
    ],
)
def test_list_unsubscribe_is_validated(bad: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        SendPayload.model_validate({"account": "a", "to": ["b@example.test"], "list_unsubscribe": bad})


def test_producers_cannot_write_the_unsubscribe_headers_themselves() -> None:
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post"):
        with pytest.raises(ValidationError, match="set by Postroom"):
            SendPayload.model_validate(
                {"account": "a", "to": ["b@example.test"], "headers": {name: "<https://x>"}}
            )


# ---- through a real worker and server --------------------------------------------------------


def test_smtputf8_is_used_when_offered_and_refused_by_name_when_not(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    offered = smtp_server(mode="plain")
    plain = smtp_server(mode="plain", smtputf8=False)
    with_utf8 = queue_env.account(unique("utf8"), offered)
    without = queue_env.account(unique("ascii"), plain)

    sent = finished(producer, producer.send_notification(with_utf8, ["José <josé@example.test>"], "Olá", "x"))
    assert sent.state == "sent" and sent.recipients["josé@example.test"]["status"] == "sent"
    (received,) = offered.received
    assert received.rcpt_tos == ["josé@example.test"]
    assert (
        strict_parse(received.data, utf8_local_parts=True)["To"].addresses[0].addr_spec == "josé@example.test"
    )

    idn = finished(producer, producer.send_notification(without, ["Zoë <zoe@bücher.example>"], "IDN", "x"))
    assert idn.state == "sent"  # an IDN domain needs no SMTPUTF8: punycode
    assert plain.received[0].rcpt_tos == ["zoe@xn--bcher-kva.example"]

    refused = finished(producer, producer.send_notification(without, ["josé@example.test"], "no", "x"))
    assert refused.state == "dead" and "SMTPUTF8" in (refused.last_error or "")
    assert len(plain.received) == 1 and plain.commands.count("MAIL") == 1  # nothing more was offered


def test_office365_basic_auth_gets_a_warning_not_an_error(queue_env: QueueEnv) -> None:
    name = unique("o365")
    (queue_env.accounts / f"{name}.yaml").write_text(  # a closed port: the check fails at once
        "provider: office365\nsmtp:\n  address: svc@contoso.example\n  host: 127.0.0.1\n  port: 9\n"
        "  auth: password\n  password: ${QUEUE_TEST_PASSWORD}\n"
    )
    try:
        checked = cli(queue_env, "accounts", "check", name, "--json")
        assert checked.returncode == 0, checked.stdout + checked.stderr  # a warning, not an error
        (warning,) = json.loads(checked.stdout)["accounts"][name]["problems"]
        assert warning["severity"] == "warning" and "December 2026" in warning["reason"]
        assert "auth: oauth" in warning["reason"] and "send_using: graph" in warning["reason"]
        assert (warning["field"], warning["line"]) == ("smtp.auth", 6)
        connectivity = cli(queue_env, "test-connectivity", name)
        assert "warning: Microsoft turns SMTP Basic authentication" in connectivity.stdout
        as_json = json.loads(cli(queue_env, "test-connectivity", name, "--json").stdout)
        assert "December 2026" in as_json["detail"]["warnings"][0]
    finally:
        (queue_env.accounts / f"{name}.yaml").unlink()


def test_cli_send_takes_named_recipients_and_one_click_unsubscribe(
    queue_env: QueueEnv, worker: Worker, smtp_server: ServerFactory
) -> None:
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("cliu"), server)
    done = cli(
        queue_env, "send", "--account", account, "--to", "Alice Example <alice@bücher.example>",
        "--subject", "Sale", "--text", "x", "--unsubscribe", "https://example.com/u/1",
        "--unsubscribe", "mailto:unsub@example.com", "--wait", "20", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["state"] == "sent"
    (received,) = server.received
    message = strict_parse(received.data)
    assert received.rcpt_tos == ["alice@xn--bcher-kva.example"]
    assert message["To"].addresses[0].display_name == "Alice Example"
    assert message["List-Unsubscribe"] == "<https://example.com/u/1>, <mailto:unsub@example.com>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
