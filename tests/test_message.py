"""MIME building: headers, bodies, attachments, Bcc, header injection."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from worker.message import Attachment, MessageSpec, build_message


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_plain_text_message_headers() -> None:
    built = build_message(
        MessageSpec(
            from_address="orders@example.com",
            display_name="Example Orders",
            to=["a@example.com", "b@example.com"],
            cc=["c@example.com"],
            bcc=["hidden@example.com"],
            reply_to="help@example.com",
            subject="Your order",
            text="Thanks!\n",
            message_id="<fixed@example.com>",
            date=0,
        )
    )
    msg = parse(built.data)
    assert msg["From"] == "Example Orders <orders@example.com>"
    assert msg["To"] == "a@example.com, b@example.com"
    assert msg["Cc"] == "c@example.com"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["Subject"] == "Your order"
    assert msg["Message-ID"] == "<fixed@example.com>"
    assert msg["Date"] == "Thu, 01 Jan 1970 00:00:00 -0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().replace("\r\n", "\n") == "Thanks!\n"
    assert b"hidden@example.com" not in built.data
    assert "Bcc" not in msg
    assert built.recipients == ("a@example.com", "b@example.com", "c@example.com", "hidden@example.com")
    assert b"\r\n" in built.data and b"\n" not in built.data.replace(b"\r\n", b"")


def test_text_and_html_make_multipart_alternative_with_attachments() -> None:
    built = build_message(
        MessageSpec(
            from_address="a@example.com",
            to=["b@example.com"],
            subject="Rechnung für Müller",
            text="Grüße\n" + "x" * 2000,
            html="<p>Grüße</p>",
            attachments=[
                Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4 \x00\xff"),
                Attachment("prix-été.csv", "text/csv", b"a,b\n1,2\n"),
            ],
            headers={"X-Campaign": "Herbst ✓"},
        )
    )
    msg = parse(built.data)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["Subject"] == "Rechnung für Müller"
    assert msg["X-Campaign"] == "Herbst ✓"
    body, pdf, csv = list(msg.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    plain, html = list(body.iter_parts())
    assert plain.get_content().replace("\r\n", "\n") == "Grüße\n" + "x" * 2000
    assert html.get_content() == "<p>Grüße</p>"
    assert pdf.get_filename() == "invoice.pdf" and pdf.get_content() == b"%PDF-1.4 \x00\xff"
    assert csv.get_content_type() == "text/csv" and csv.get_filename() == "prix-été.csv"
    assert all(len(line) <= 998 for line in built.data.split(b"\r\n"))
    assert built.data.isascii()


def test_message_ids_are_unique_and_in_the_sender_domain() -> None:
    ids = {build_message(MessageSpec("a@example.org", to=["b@example.com"])).message_id for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("<") and i.endswith("@example.org>") for i in ids)


@pytest.mark.parametrize(
    "spec",
    [
        MessageSpec("a@example.com", to=["b@example.com"], subject="hi\r\nBcc: victim@example.com"),
        MessageSpec("a@example.com", to=["b@example.com"], headers={"X-Tag": "a\nBcc: x@example.com"}),
        MessageSpec("a@example.com", to=["b@example.com\r\nBcc: x@example.com"]),
        MessageSpec("a@example.com", to=["b@example.com"], headers={"Bad Name": "v"}),
        MessageSpec("a@example.com", to=["b@example.com"], headers={"From": "ceo@example.com"}),
        MessageSpec("a@example.com", display_name="Evil\r\nBcc: x@example.com", to=["b@example.com"]),
        MessageSpec("a@example.com"),
    ],
)
def test_header_injection_and_bad_input_are_refused(spec: MessageSpec) -> None:
    with pytest.raises(ValueError):
        build_message(spec)


def test_duplicate_recipients_are_sent_once() -> None:
    built = build_message(MessageSpec("a@example.com", to=["b@example.com"], cc=["B@example.com"]))
    assert built.recipients == ("b@example.com",)
