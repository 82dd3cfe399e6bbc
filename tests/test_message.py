"""MIME building: headers, bodies, attachments, Bcc, header injection."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

import worker.mail.message
from worker.mail.message import Attachment, MessageSpec, build_message


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
    assert msg["Date"] == "Thu, 01 Jan 1970 00:00:00 +0000"  # a real offset (-0000: zone unknown)
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


@pytest.mark.parametrize(
    "spec",
    [
        MessageSpec("s@example.com", to=["a@example.net"], subject="Hi", text="plain\nbody\n"),
        MessageSpec("s@example.com", to=["a@example.net"], subject="Hi", html="<p>only html</p>"),
        MessageSpec(
            "s@example.com",
            display_name="Sénder Näme",
            to=[f"user{i}@example.net" for i in range(40)],
            cc=["c@example.net"],
            bcc=["hidden@example.net"],
            reply_to="help@example.com",
            subject="Grüße, " + "a long subject that goes past the fold " * 4,
            text="café " * 300 + "\n" + "x" * 1200,
            html="<p>" + "long html line " * 100 + "</p>",
            headers={"X-Order": "42", "X-Long": "word " * 60, "X-Name": "värde"},
        ),
        MessageSpec("s@example.com", to=["a@example.net"], subject="", text=""),
        MessageSpec(  # an invoice and an image: base64 parts, written directly too
            "s@example.com",
            to=["a@example.net"],
            subject="Invoice",
            text="See the attachment.\n",
            html="<p>See the attachment.</p>",
            attachments=[
                Attachment("invoice-42.pdf", "application/pdf", bytes(range(256)) * 700),
                Attachment("logo.png", "image/png", b"\x89PNG\r\n" + b"\x00\xff" * 50),
                Attachment("empty.bin", "application/octet-stream", b""),
            ],
        ),
        MessageSpec(
            "s@example.com",
            to=["a@example.net"],
            subject="One part and a file",
            text="x",
            attachments=[Attachment("a.zip", "application/zip", b"PK\x03\x04" * 40)],
        ),
    ],
)
def test_the_direct_renderer_writes_what_the_email_package_writes(
    spec: MessageSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = MessageSpec(**{**spec.__dict__, "message_id": "<fixed@example.com>", "date": 1_700_000_000})
    generated = build_message(spec, fast=False)
    with monkeypatch.context() as patched:  # prove the direct path is the one taken
        patched.setattr(worker.mail.message, "_render_mime", None)
        direct = build_message(spec)
    assert direct.recipients == generated.recipients
    assert all(len(line) <= 998 for line in direct.data.split(b"\r\n"))
    assert b"\n" not in direct.data.replace(b"\r\n", b"")  # CRLF only
    a, b = parse(direct.data), parse(generated.data)
    assert [(k, str(v)) for k, v in a.items() if k != "Content-Type"] == [
        (k, str(v)) for k, v in b.items() if k != "Content-Type"
    ]
    assert a.get_content_type() == b.get_content_type()
    parts_a = [(p.get_content_type(), p.get_content()) for p in a.walk() if not p.is_multipart()]
    parts_b = [(p.get_content_type(), p.get_content()) for p in b.walk() if not p.is_multipart()]
    assert parts_a == parts_b
    files_a = [(p.get_filename(), p["Content-Transfer-Encoding"]) for p in a.walk() if p.get_filename()]
    files_b = [(p.get_filename(), p["Content-Transfer-Encoding"]) for p in b.walk() if p.get_filename()]
    assert files_a == files_b
