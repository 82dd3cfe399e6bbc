"""Reading what arrives after a send (worker/mail/reports.py): DSNs, non-standard bounces, ARF
complaints and auto-replies, from samples modelled on what Postfix, Exim, qmail, Exchange
Online, Gmail, Microsoft's JMRP, Yahoo and vacation programs send (tests/samples/reports/);
hostile and broken input never raises and stays cheap.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worker.mail.reports
from worker.mail.message import check_message_id
from worker.mail.received import MAX_BLOCKS, MAX_BYTES
from worker.mail.reports import Action, RecipientReport, Report, parse_report, xtext_decode, xtext_encode

DSN_ACTIONS: list[Action] = ["failed", "delayed", "delivered", "relayed", "expanded"]
SAMPLES = Path(__file__).resolve().parent / "samples" / "reports"


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.eml").read_bytes()


def failed(address: str, status: str | None, diagnostic: str | None) -> RecipientReport:
    return RecipientReport(address, "failed", status, diagnostic)


def complained(address: str) -> RecipientReport:
    return RecipientReport(address, "complained", None, "abuse")


def auto_reply(message_id: str, report_id: str) -> Report:
    return Report("auto-reply", None, message_id, (), report_id)


POSTFIX_DIAGNOSTIC = (
    "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in virtual mailbox table"
)
GMAIL_DIAGNOSTIC = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 "
    "double-checking the recipient's email address for typos or 550-5.1.1 unnecessary spaces. For "
    "more information, go to 550 5.1.1 https://support.google.com/mail/?p=NoSuchUser "
    "a1si1234567wra.123 - gsmtp"
)
MALFORMED_DIAGNOSTIC = ("550 5.7.1 Message rejected as [31mspam[0m" + " and this server says more" * 30)[
    :500
].rstrip()

# Every sample and what it reports, field by field.
EXPECTED: dict[str, Report | None] = {
    # Postfix's "Undelivered Mail Returned to Sender": two per-recipient blocks, text/rfc822-headers.
    "postfix_bounce": Report(
        "dsn",
        "6f1c2a9e-3b7d-4c55-9e0a-2d8f4b1c7a31",
        "<6f1c2a9e-3b7d-4c55-9e0a-2d8f4b1c7a31@example.com>",
        (
            failed("nobody@example.org", "5.1.1", POSTFIX_DIAGNOSTIC),
            failed(
                "full.mailbox@example.org",
                "5.2.2",
                "552 5.2.2 <Full.Mailbox@Example.ORG>: Mailbox full: quota exceeded",
            ),
        ),
        "<4YXb2H5Rg1z9sWL@mail.example.net>",
    ),
    # Postfix's delay warning (4.4.1), an ENVID xtext-encoded ("+" and "=" in a Celery task id).
    "postfix_delayed": Report(
        "dsn",
        "order-1042+retry=2",
        "<order-1042+retry=2@example.com>",
        (
            RecipientReport(
                "slow@example.net",
                "delayed",
                "4.4.1",
                "connect to mx.example.net[198.51.100.7]:25: Connection timed out",
            ),
        ),
        "<4YXc0T3Cmhz9sWR@mail.example.net>",
    ),
    # Postfix for an SMTPUTF8 message: message/global-delivery-status, utf-8 address type.
    "postfix_smtputf8_dsn": Report(
        "dsn",
        "7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a",
        "<7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a@example.com>",
        (
            failed(
                "jörg@bücher.example",
                "5.1.1",
                "550 5.1.1 <jörg@bücher.example>: Recipient address rejected: User unknown",
            ),
        ),
        "<4YXb2P7Vr9z9sWT@mail.example.net>",
    ),
    # Exchange Online's NDR: 5.1.10 RecipientNotFound, the original as message/rfc822.
    "exchange_online_ndr": Report(
        "dsn",
        None,
        "<b7d0f3e4-81a2-4c6e-9f50-3a2e7c9d1b64@example.com>",
        (
            failed(
                "jdoe@contoso.com",
                "5.1.10",
                "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            ),
        ),
        "<0a9c7a3b-5e2f-4d11-b6a4-7c1f3e2d9b80@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>",
    ),
    # Gmail's DSN: a folded multi-line diagnostic, the human part in multipart/related.
    "gmail_dsn": Report(
        "dsn",
        None,
        "<1b9e4c2d-7f3a-4e8b-a6d1-5c0f2e9b3a77@example.com>",
        (failed("no.such.user@gmail.com", "5.1.1", GMAIL_DIAGNOSTIC),),
        "<67862a1a.050a0220.2b3c41.0f1eGMR@mx.google.com>",
    ),
    # Exim's DSN says Status: 5.0.0; the diagnostic has the real code.
    "exim_dsn_generic_status": Report(
        "dsn",
        "2c4d6e8f-0a1b-4c3d-8e5f-7a9b1c3d5e7f",
        "<2c4d6e8f-0a1b-4c3d-8e5f-7a9b1c3d5e7f@example.com>",
        (
            failed(
                "gone@example.io",
                "5.1.1",
                "550 5.1.1 <gone@example.io>: Recipient address rejected: User unknown in local recipient "
                "table",
            ),
        ),
        "<E1tXk2c-0003Bd-1F@relay.example.com>",
    ),
    # qmail's QSBMF bounce (flufl.bounce): codes read from the text, the original inline.
    "qmail_bounce": Report(
        "bounce",
        None,
        "<c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f@example.com>",
        (
            failed("nobody@example.org", "5.1.1", "Sorry, no mailbox here by that name. (#5.1.1)"),
            failed(
                "over.quota@example.org",
                "5.2.2",
                "192.0.2.9 does not like recipient. Remote host said: 552 5.2.2 Mailbox quota exceeded "
                "Giving up on 192.0.2.9.",
            ),
        ),
        None,
    ),
    # Exim's plain-text bounce with X-Failed-Recipients (and Auto-Submitted: auto-replied).
    "exim_bounce": Report(
        "bounce",
        None,
        "<d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f7a@example.com>",
        (
            failed(
                "old.account@example.co.uk",
                "5.1.1",
                "host mx.example.co.uk [192.0.2.70] SMTP error from remote mail server after RCPT "
                "TO:<old.account@example.co.uk>: 550 5.1.1 <old.account@example.co.uk>: Recipient address "
                "rejected: User unknown in local recipient table",
            ),
        ),
        "<E1tXjAa-0007Kq-4x@smtp.example.co.uk>",
    ),
    # An ARF abuse report with Original-Rcpt-To and the original as message/rfc822.
    "arf_abuse": Report(
        "complaint",
        None,
        "<9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a@example.com>",
        (complained("carol@example.net"),),
        "<ARF.4f2b9c1e0d7a.20250114184001@fbl.example.net>",
    ),
    # Microsoft's JMRP: no Original-Rcpt-To; X-HmXmrOriginalRecipient in the returned original.
    "microsoft_jmrp": Report(
        "complaint",
        None,
        "<5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9@example.com>",
        (complained("dave.reader@hotmail.com"),),
        "<3f0c1d2e-9a8b-4c7d-a6e5-f4d3c2b1a098@hotmail.com>",
    ),
    # Yahoo's CFL: the recipient redacted; the original's Message-ID is all there is.
    "yahoo_arf_redacted": Report(
        "complaint",
        None,
        "<8a7b6c5d-4e3f-4a2b-9c1d-0e9f8a7b6c5d@example.com>",
        (),
        "<1736927058.94532@arf.mail.yahoo.com>",
    ),
    # Exchange's out-of-office: Auto-Submitted: auto-generated, "Automatic reply:", In-Reply-To.
    "exchange_out_of_office": auto_reply(
        "<0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b@example.com>",
        "<PH0PR11MB49993E6A1B2C3D4E5F60718293A4B5C6D7E8F@PH0PR11MB4999.namprd11.prod.outlook.com>",
    ),
    # Dovecot's Sieve vacation: Auto-Submitted: auto-replied (vacation), an encoded subject.
    "sieve_vacation": auto_reply(
        "<4a5b6c7d-8e9f-4a0b-9c1d-2e3f4a5b6c7d@example.com>",
        "<dovecot-sieve-1736845936-418212-0@imap.example.de>",
    ),
    # A helpdesk's acknowledgement: X-Autorespond, Precedence: auto_reply, References only.
    "helpdesk_autoreply": auto_reply(
        "<7c8d9e0f-1a2b-4c3d-9e4f-5a6b7c8d9e0f@example.com>",
        "<ticket-48213-ack.1736845940@helpdesk.contoso.com>",
    ),
    # Ordinary mail: a human reply that quotes bounce words, a parcel notice from a no-reply
    # address with a bounce's subject and one of flufl.bounce's intro lines.
    "ordinary_reply": None,
    "ordinary_parcel_notice": None,
    # A read receipt (multipart/report; report-type=disposition-notification): no delivery news.
    "read_receipt_mdn": None,
    # A DSN cut inside its second recipient's Diagnostic-Code: what is there is read.
    "dsn_truncated": Report(
        "dsn",
        "6f1c2a9e-3b7d-4c55-9e0a-2d8f4b1c7a31",
        None,
        (
            failed("nobody@example.org", "5.1.1", POSTFIX_DIAGNOSTIC),
            failed("full.mailbox@example.org", "5.2.2", "552 5.2"),
        ),
        "<4YXb2H5Rg1z9sWL@mail.example.net>",
    ),
    # Broken fields: an x400 Final-Recipient (Original-Recipient read instead), Status "5.1",
    # control characters and a long diagnostic, blocks without an address or an action,
    # Latin-1 bytes, a bogus charset, a bad xtext escape, a base64 header part, a bad Message-ID.
    "dsn_malformed_fields": Report(
        "dsn",
        "abc+ZZdef+ghi",
        "<0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0@example.com>",
        (
            failed("backup@example.org", "5.7.1", MALFORMED_DIAGNOSTIC),
            RecipientReport("angle@example.org", "delayed", "4.2.2", None),
            failed("latin@example.org", "5.0.0", "550 Empfänger unbekannt"),
        ),
        None,
    ),
}


def test_every_sample_has_its_expectation() -> None:
    assert sorted(p.stem for p in SAMPLES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str, line_end: bytes) -> None:
    raw = sample(name).replace(b"\n", line_end)
    assert parse_report(raw) == EXPECTED[name]


def dsn(*blocks: str, per_message: str = "Reporting-MTA: dns; mx.example.net", top: str = "") -> bytes:
    """A minimal DSN whose delivery-status part holds ``per_message`` and ``blocks``."""
    fields = "\n\n".join([per_message, *blocks])
    return (
        "From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered Mail Returned to Sender\n"
        f"{top}Content-Type: multipart/report; report-type=delivery-status; boundary=BB\n\n"
        "--BB\nContent-Type: text/plain\n\nIt did not go.\n\n"
        f"--BB\nContent-Type: message/delivery-status\n\n{fields}\n\n--BB--\n"
    ).encode()


def only_recipient(raw: bytes) -> RecipientReport | None:
    report = parse_report(raw)
    assert report is not None and report.kind == "dsn"
    assert len(report.recipients) <= 1
    return report.recipients[0] if report.recipients else None


@pytest.mark.parametrize(
    ("fields", "action", "status"),
    [
        ("Action: failed\nStatus: 5.1.1 (bad destination mailbox)", "failed", "5.1.1"),
        ("Action: failed\nDiagnostic-Code: smtp; 550 5.1.1 no such user", "failed", "5.1.1"),
        ("Action: failed\nDiagnostic-Code: smtp; 550 No such user", "failed", "5.0.0"),
        ("Action: failed\nStatus: 5.0.0\nDiagnostic-Code: smtp; 451 4.7.1 later", "failed", "5.0.0"),
        ("Action: failed\nStatus: 5.0.0\nDiagnostic-Code: 550-5.7.26 unauthenticated", "failed", "5.7.26"),
        ("Action: failed\nStatus: 4.4.7", "failed", "4.4.7"),  # expired after retries
        ("Action: failed\nStatus: garbage", "failed", None),
        ("Action: error\nStatus: 5.1.1", "failed", "5.1.1"),  # opensmtpd's word
        ("Action: Delayed (will retry)\nStatus: 4.2.2", "delayed", "4.2.2"),
        ("Status: 4.7.1", "delayed", "4.7.1"),  # no Action: the class says it
        ("Status: 5.2.1", "failed", "5.2.1"),
        ("Action: delivered\nStatus: 2.0.0", "delivered", "2.0.0"),
        ("Action: relayed\nStatus: 2.0.0", "relayed", "2.0.0"),
        ("Action: expanded\nStatus: 2.0.0", "expanded", "2.0.0"),
        ("Action: failed\nStatus: 5.1.1.1", "failed", None),
        ("Action: failed\nDiagnostic-Code: smtp; host 192.0.2.5 said 550", "failed", None),
    ],
)
def test_action_and_status(fields: str, action: str, status: str | None) -> None:
    found = only_recipient(dsn(f"Final-Recipient: rfc822; a@example.org\n{fields}"))
    assert found is not None and (found.action, found.status) == (action, status)


def test_a_block_with_neither_action_nor_status_is_left_out() -> None:
    assert only_recipient(dsn("Final-Recipient: rfc822; a@example.org\nAction: pondering")) is None


@pytest.mark.parametrize(
    ("fields", "address"),
    [
        ("Final-Recipient: rfc822; Bob@Example.ORG", "bob@example.org"),
        ("Final-Recipient: RFC822;<bob@example.org>", "bob@example.org"),
        ("Final-Recipient: rfc822; bob@example.org (Bob)", "bob@example.org"),
        (
            "Final-Recipient: rfc822; inner@relay.example\nOriginal-Recipient: rfc822; bob@example.org",
            "bob@example.org",  # the address the job sent to (ORCPT), not the one a relay forwarded to
        ),
        ("Final-Recipient: unknown; ???\nOriginal-Recipient: rfc822; bob@example.org", "bob@example.org"),
        ("Original-Recipient: rfc822;bob@example.org", "bob@example.org"),
        ("Final-Recipient: utf-8; J\\x{00F6}rg@example.org", "jörg@example.org"),
        ("Final-Recipient: utf-8; j\\x{110000}rg@example.org", None),
        ("Final-Recipient: rfc822; two@example.org, three@example.org", None),
        ("Final-Recipient: rfc822; no-domain@", None),
        ("Final-Recipient: rfc822; a@b@example.org", None),
        ("Final-Recipient: rfc822; " + "x" * 320 + "@example.org", None),
        ("Final-Recipient: x400; /C=US/ADMD=ATTMAIL/S=Smith/", None),
    ],
)
def test_the_recipient_address(fields: str, address: str | None) -> None:
    found = only_recipient(dsn(f"{fields}\nAction: failed\nStatus: 5.1.1"))
    assert (found.address if found else None) == address


def test_the_diagnostic_is_one_short_clean_line() -> None:
    noisy = "smtp; 550 5.1.1 bad\x00\x1b[1m\x7f\u0085\u2028mailbox\t\there" + " and more" * 200
    found = only_recipient(
        dsn(f"Final-Recipient: rfc822; a@example.org\nAction: failed\nDiagnostic-Code: {noisy}")
    )
    assert found is not None and found.diagnostic is not None
    assert found.diagnostic.startswith("550 5.1.1 bad[1m mailbox here and more")
    assert len(found.diagnostic) <= 500 and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028]", found.diagnostic)
    blank = only_recipient(
        dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nDiagnostic-Code: smtp;  ")
    )
    assert blank is not None and blank.diagnostic is None


def test_envelope_id_and_message_id_fallbacks() -> None:
    block = "Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1"
    gmail = parse_report(dsn(block, per_message="X-Original-Message-ID: <orig@example.com>"))
    assert gmail is not None and gmail.message_id == "<orig@example.com>"
    replied = parse_report(dsn(block, top="In-Reply-To: <replied@example.com>\n"))
    assert replied is not None and replied.message_id == "<replied@example.com>"
    envid = parse_report(dsn(block, per_message="Original-Envelope-Id: job+2B1+3D+20x+0D+0Ay"))
    assert envid is not None and envid.envelope_id == "job+1= x y"  # decoded, then made one line
    none = parse_report(dsn(block, top="Message-ID: <not an id>\n"))
    assert none is not None and (none.envelope_id, none.message_id, none.report_id) == (None, None, None)


def test_a_dsn_lists_at_most_max_blocks_recipients() -> None:
    blocks = [
        f"Final-Recipient: rfc822; r{i}@example.org\nAction: failed\nStatus: 5.1.1" for i in range(1000)
    ]
    report = parse_report(dsn(*blocks))
    assert report is not None and 0 < len(report.recipients) <= MAX_BLOCKS


def test_a_dsn_inside_a_signed_message_is_read() -> None:
    inner = dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1").split(b"\n", 2)[2]
    signed = (
        b"From: MAILER-DAEMON@mx.example.net\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=SS\n\n'
        b"--SS\n" + inner + b"\n--SS\nContent-Type: application/pkcs7-signature\n\nMIAGCSqGSIb3\n--SS--\n"
    )
    report = parse_report(signed)
    assert report is not None and report.kind == "dsn" and report.recipients[0].address == "a@example.org"


def test_a_forwarded_report_is_not_ours() -> None:
    """A colleague forwarding a bounce as an attachment: the report is inside message/rfc822."""
    forwarded = (
        b"From: colleague@example.com\nTo: orders@example.com\nSubject: Fwd: look at this\n"
        b"Content-Type: multipart/mixed; boundary=FF\n\n--FF\nContent-Type: text/plain\n\nFYI\n"
        b"--FF\nContent-Type: message/rfc822\n\n" + sample("postfix_bounce") + b"\n--FF--\n"
    )
    assert parse_report(forwarded) is None


def arf(feedback: str, original: str = "Message-ID: <orig@example.com>\n\nbody\n") -> bytes:
    return (
        "From: fbl@isp.example\nMessage-ID: <arf1@isp.example>\n"
        "Content-Type: multipart/report; report-type=feedback-report; boundary=AA\n\n"
        "--AA\nContent-Type: text/plain\n\nAn abuse report.\n\n"
        f"--AA\nContent-Type: message/feedback-report\n\n{feedback}\n\n"
        f"--AA\nContent-Type: message/rfc822\n\n{original}\n--AA--\n"
    ).encode()


def test_complaints() -> None:
    many = parse_report(
        arf(
            "Feedback-Type: fraud\nVersion: 1\nOriginal-Rcpt-To: <A@example.org>\n"
            "Original-Rcpt-To: b@example.org\nOriginal-Rcpt-To: a@example.org\nOriginal-Rcpt-To: junk\n"
            "Original-Envelope-Id: job+2B7"
        )
    )
    assert many == Report(
        "complaint",
        "job+7",
        "<orig@example.com>",
        (
            RecipientReport("a@example.org", "complained", None, "fraud"),
            RecipientReport("b@example.org", "complained", None, "fraud"),
        ),
        "<arf1@isp.example>",
    )
    # RFC 5965 §3.2: Removal-Recipient names the complainer too; no feedback type, no diagnostic.
    removal = parse_report(arf("Version: 1\nRemoval-Recipient: c@example.org"))
    assert removal is not None and removal.recipients == (
        RecipientReport("c@example.org", "complained", None, None),
    )


@pytest.mark.parametrize("kind", ["auth-failure", "not-spam", "Auth-Failure; dmarc"])
def test_feedback_that_is_no_complaint(kind: str) -> None:
    """A DMARC failure report (RFC 6591) or a "not spam" click says nothing against a recipient."""
    assert parse_report(arf(f"Feedback-Type: {kind}\nOriginal-Rcpt-To: a@example.org")) is None


def plain(headers: str, body: str = "Hello.\n", sender: str = "someone@example.org") -> bytes:
    return f"From: {sender}\nTo: orders@example.com\n{headers}\n\n{body}".encode()


@pytest.mark.parametrize(
    "headers",
    [
        "Subject: Re: your order\nAuto-Submitted: auto-replied",
        "Subject: Re: your order\nAuto-Submitted: Auto-Replied (vacation)",
        "Subject: Re: your order\nX-Autoreply: yes",
        "Subject: Re: your order\nX-Autorespond: Re: your order",
        "Subject: Re: your order\nPrecedence: auto_reply",
        "Subject: Automatic reply: your order",
        "Subject: Auto: your order",
        "Subject: AutoReply: your order",
        "Subject: Out of Office",
        "Subject: Out of the office until Monday",
        "Subject: Abwesenheitsnotiz: Ihre Bestellung",
        "Subject: =?utf-8?q?R=C3=A9ponse_automatique_=3A_votre_commande?=",
        "Subject: Respuesta automática: su pedido",
    ],
)
def test_auto_replies(headers: str) -> None:
    raw = plain(f"{headers}\nIn-Reply-To: <orig@example.com> <other@example.com>\nReferences: <a@x> <b@x>")
    assert parse_report(raw) == Report("auto-reply", None, "<orig@example.com>", (), None)


@pytest.mark.parametrize(
    "headers",
    [
        "Subject: Re: your order",
        "Subject: Re: Out of office",  # a human answering an out-of-office
        "Subject: Vacation photos",
        "Subject: Automatically generated invoice",
        "Subject: Your statement\nAuto-Submitted: auto-generated",  # a notification, no reply
        "Subject: Re: your order\nAuto-Submitted: no",
        "Subject: Re: your order\nX-Autoreply: no",
        "Subject: Weekly news\nPrecedence: bulk\nReturn-Path: <>",
        "Subject: Re: your order\nX-Auto-Response-Suppress: All",
    ],
)
def test_mail_that_is_not_a_report(headers: str) -> None:
    assert parse_report(plain(f"{headers}\nIn-Reply-To: <orig@example.com>")) is None


def test_an_auto_reply_without_in_reply_to_names_the_last_reference() -> None:
    raw = plain("Subject: Out of office\nReferences: <first@example.com>\n <last@example.com> junk")
    assert parse_report(raw) == Report("auto-reply", None, "<last@example.com>", (), None)
    bare = parse_report(plain("Subject: Out of office\nIn-Reply-To: not-an-id"))
    assert bare is not None and bare.message_id is None


def test_a_bounce_warning_is_delayed() -> None:
    """Gmail's old non-DSN warning: flufl.bounce calls it temporary."""
    raw = plain(
        "Subject: Delivery Status Notification (Delay)",
        "This is an automatically generated Delivery Status Notification\n\n"
        "THIS IS A WARNING MESSAGE ONLY.\n\nYOU DO NOT NEED TO RESEND YOUR MESSAGE.\n\n"
        "Delivery to the following recipient has been delayed:\n\n     Slow@Example.org\n\n"
        "Message will be retried for 2 more day(s)\n",
        sender="Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
    )
    report = parse_report(raw)
    assert report is not None and report.kind == "bounce"
    assert report.recipients == (RecipientReport("slow@example.org", "delayed", None, None),)


@pytest.mark.parametrize(
    ("headers", "sender"),
    [
        ("Subject: failure notice", "MAILER-DAEMON@mx.example.org"),
        (
            "Subject: Returned mail\nAuto-Submitted: auto-replied",
            "Mail Delivery System <postmaster@mx.example>",
        ),
        ("Subject: Re: hello\nAuto-Submitted: auto-replied\nX-Failed-Recipients: <>", "x@mx.example.org"),
        ("Subject: Undeliverable: your order\nReturn-Path: <>", "someone@example.org"),
    ],
)
def test_a_bounce_flufl_cannot_read_is_none(headers: str, sender: str) -> None:
    """Not an auto-reply either, though a mailer daemon's bounce says Auto-Submitted: auto-replied."""
    raw = plain(f"{headers}\nIn-Reply-To: <orig@example.com>", "Something went wrong.\n", sender)
    assert parse_report(raw) is None


def test_whatever_flufl_bounce_raises_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(msg: object) -> tuple[frozenset[bytes], frozenset[bytes]]:
        raise RuntimeError("a detector fell over")

    monkeypatch.setattr(worker.mail.reports, "all_failures", broken)
    assert parse_report(sample("qmail_bounce")) is None
    assert parse_report(sample("postfix_bounce")) == EXPECTED["postfix_bounce"]  # no flufl for a DSN


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 100,
        b"\xff\xfe" * 5000,
        b"not a mail at all",
        b"From: x\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=\n\n--\n--\n",
        b"Content-Type: multipart/report; boundary=X\n\n--X\nContent-Type: message/delivery-status\n\n",
        b"Content-Type: message/delivery-status\n\nFinal-Recipient: rfc822; a@b.c\nAction: failed\n",
        b"Content-Type: text/plain; charset=\xff\xfe\n\n\xff",
        b'Content-Type: multipart/report; report-type="feedback-report\n\n\x80\x81',
        b"Subject: =?x-unknown?q?=FF?=\nAuto-Submitted: \xff\xfe\n\n",
        b"From: MAILER-DAEMON@x\nContent-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n!!!\n",
        sample("postfix_bounce")[:700],  # cut before the delivery-status part
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    check(parse_report(raw))


def test_huge_and_deep_messages_stay_cheap() -> None:
    """Bounded work: 10 MB, ten thousand nested multiparts, ten thousand parts, and lines made to
    make flufl.bounce's regular expressions backtrack (hours unbounded)."""
    bounce = b"From: MAILER-DAEMON@mx.example.org\nSubject: failure notice\n"
    nested = b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(10000)
    )
    cases = {
        "10 MB": sample("qmail_bounce") + b"x" * 10_000_000,
        "deep": bounce + b"Content-Type: multipart/mixed; boundary=b0\n\n" + nested,
        "wide": bounce
        + b"Content-Type: multipart/mixed; boundary=b\n\n"
        + b"--b\n\nHi. This is the\n\n<a@b.c>:\n" * 10000,
        "commas": bounce + b"\n" + b",a" * 1_000_000,
        "no reach": bounce + b"\ndid not reach the following recipient\n" + b"a@" * 1_000_000,
        "warning": bounce + b"\nYour message to:\n" + (b"a" * 20000 + b"\n") * 50,
    }
    for name, raw in cases.items():
        started = time.perf_counter()
        check(parse_report(raw))
        assert time.perf_counter() - started < 10, name
    assert parse_report(cases["10 MB"]) == EXPECTED["qmail_bounce"]  # its first MAX_BYTES are read
    assert len(cases["10 MB"]) > 4 * MAX_BYTES


def check(report: Report | None) -> None:
    """What any report holds, whatever came in: short clean text, checked ids and addresses."""
    if report is None:
        return
    assert report.kind in ("dsn", "bounce", "complaint", "auto-reply")
    for value in (report.message_id, report.report_id):
        assert value is None or check_message_id(value) == value
    assert report.envelope_id is None or 0 < len(report.envelope_id) <= 500
    for text in (report.envelope_id, *(r.diagnostic for r in report.recipients)):
        assert text is None or (len(text) <= 500 and not re.search(r"[\x00-\x1f\x7f-\x9f]", text))
    for recipient in report.recipients:
        assert recipient.address == recipient.address.lower() and "@" in recipient.address
        assert not re.search(r"[\s<>\x00-\x1f]", recipient.address)
        assert recipient.action in ("failed", "delayed", "delivered", "relayed", "expanded", "complained")
        assert recipient.status is None or re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", recipient.status)
    if report.kind == "auto-reply":
        assert report.recipients == ()


FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=4000))
def test_random_bytes(raw: bytes) -> None:
    check(parse_report(raw))


@FUZZ
@given(
    st.sampled_from(sorted(EXPECTED)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.binary(max_size=40)), max_size=6),
    st.integers(0, 12_000),
)
def test_damaged_samples(name: str, edits: list[tuple[int, int, bytes]], cut: int) -> None:
    """Samples with bytes replaced here and there and their tail cut off."""
    raw = sample(name)
    for at, length, data in edits:
        raw = raw[:at] + data + raw[at + length :]
    check(parse_report(raw[: cut or None]))


DSN_FIELDS = ["Final-Recipient", "Original-Recipient", "Action", "Status", "Diagnostic-Code",
              "Original-Envelope-Id", "X-Original-Message-ID", "Feedback-Type",
              "Original-Rcpt-To"]  # fmt: skip
PLAUSIBLE = ["rfc822; a@example.org", "utf-8; \\x{F6}@example.org", "failed", "delayed", "5.1.1", "4.0.0",
             "smtp; 550 5.1.1 no", "<id@example.org>", "abuse", "auth-failure", "a+2Bb"]  # fmt: skip
FIELD_VALUE = st.sampled_from(PLAUSIBLE) | st.text(
    st.characters(codec="utf-8", exclude_characters="\n"), max_size=60
)


@FUZZ
@given(
    st.lists(st.lists(st.tuples(st.sampled_from(DSN_FIELDS), FIELD_VALUE), max_size=6), max_size=5),
    st.sampled_from(["message/delivery-status", "message/global-delivery-status", "message/feedback-report"]),
)
def test_random_fields(blocks: list[list[tuple[str, str]]], part_type: str) -> None:
    fields = "\n\n".join("\n".join(f"{name}: {value}" for name, value in block) for block in blocks)
    raw = (
        "From: MAILER-DAEMON@x.example\nContent-Type: multipart/report; boundary=BB\n\n"
        f"--BB\nContent-Type: {part_type}\n\n{fields}\n--BB--\n"
    ).encode("utf-8", "surrogatepass")
    check(parse_report(raw))


@FUZZ
@given(
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}@[a-z0-9-]{1,12}\.[a-z]{2,6}", fullmatch=True),
    st.sampled_from(DSN_ACTIONS),
    st.tuples(st.sampled_from("245"), st.integers(1, 999), st.integers(0, 999)),  # not X.0.0
    st.text(st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]), max_size=80),
)
def test_what_a_dsn_says_is_what_is_read(
    address: str, action: Action, status: tuple[str, int, int], diagnostic: str
) -> None:
    code = ".".join(map(str, status))
    block = f"Final-Recipient: rfc822; {address.upper()}\nAction: {action}\nStatus: {code}"
    found = only_recipient(dsn(f"{block}\nDiagnostic-Code: smtp; {diagnostic}"))
    assert found == RecipientReport(address, action, code, " ".join(diagnostic.split()) or None)


@pytest.mark.parametrize(
    ("text", "xtext"),
    [
        ("6f1c2a9e-3b7d-4c55-9e0a-2d8f4b1c7a31", "6f1c2a9e-3b7d-4c55-9e0a-2d8f4b1c7a31"),
        ("order-1042+retry=2", "order-1042+2Bretry+3D2"),
        ("a b\tc", "a+20b+09c"),
        ("é~!", "+C3+A9~!"),
        ("", ""),
    ],
)
def test_xtext(text: str, xtext: str) -> None:
    assert xtext_encode(text) == xtext
    assert xtext_decode(xtext) == text


def test_xtext_decoding_is_lenient() -> None:
    assert xtext_decode("a+2bb") == "a+b"  # lower-case hex
    assert xtext_decode("a+ZZ+2") == "a+ZZ+2"  # not an escape: kept
    assert xtext_decode("+FF+FE") == "\ufffd\ufffd"  # not UTF-8


@given(st.text())
def test_xtext_round_trips(text: str) -> None:
    encoded = xtext_encode(text)
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", encoded)
    assert xtext_decode(encoded) == text


@given(st.from_regex(r"(?:[!-*,-<>-~]|\+(?:[01][0-9A-F]|2[0B]|3D|7F))*", fullmatch=True))
def test_canonical_xtext_round_trips(xtext: str) -> None:
    """Every escape where one is due and none elsewhere: decoded and encoded, the same."""
    assert xtext_encode(xtext_decode(xtext)) == xtext
