"""The mail host the bounce tests will stand on is real: Postfix takes the mail, Dovecot stores it,
and the DSNs are the ones Postfix writes (tests/support/mailhost.py).

Every test makes users of its own on the session's one MailHost, so mailboxes never mix.
"""

from __future__ import annotations

import base64
import email.policy
import imaplib
import smtplib
from collections.abc import Callable
from email.message import EmailMessage, Message
from email.utils import make_msgid

import pytest

from support.cloud import CloudServer
from support.mailhost import GIVE_UP, HOST, MailHost
from support.queue import unique


def new_user(mailhost: MailHost, prefix: str) -> str:
    name = unique(prefix)
    return mailhost.add_user(name, f"pw-{name}")


def password(address: str) -> str:
    return f"pw-{address.partition('@')[0]}"


def submit(
    mailhost: MailHost,
    sender: str,
    recipients: list[str],
    *,
    envid: str | None = None,
    notify: str | None = None,
) -> tuple[list[tuple[int, bytes]], str]:
    """One message over STARTTLS and AUTH, as Postroom sends it; the RCPT replies and its Message-ID."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, ", ".join(recipients), "harness"
    message["Message-ID"] = make_msgid(domain=mailhost.domain)
    message.set_content("Sent by tests/test_mailhost.py.\n")
    with smtplib.SMTP(HOST, mailhost.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=mailhost.ssl_context())
        smtp.login(sender, password(sender))
        mail_options = ["RET=HDRS", f"ENVID={envid}"] if envid else []
        assert smtp.mail(sender, mail_options)[0] == 250
        replies = [smtp.rcpt(to, [f"NOTIFY={notify}"] if notify else []) for to in recipients]
        assert smtp.data(message.as_bytes(policy=email.policy.SMTP))[0] == 250
    return replies, str(message["Message-ID"])


def is_report(action: str) -> Callable[[EmailMessage], bool]:
    """A predicate: an RFC 3464 report with a recipient whose Action is ``action``."""
    return lambda message: (
        message.get_param("report-type") == "delivery-status"
        and any(r["Action"] == action for r in delivery_status(message)[1])
    )


def delivery_status(report: EmailMessage) -> tuple[Message, list[Message]]:
    """The per-message fields and each recipient's fields of a multipart/report."""
    assert report.get_content_type() == "multipart/report"
    part = next(p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status")
    blocks = [block for block in part.get_payload() if isinstance(block, Message)]
    return blocks[0], blocks[1:]


def returned_headers(report: EmailMessage) -> str:
    part = next(p for p in report.iter_parts() if p.get_content_type() == "text/rfc822-headers")
    return str(part.get_content())


def test_submission_wants_starttls_and_checks_auth(mailhost: MailHost) -> None:
    sender = new_user(mailhost, "a")
    with smtplib.SMTP(HOST, mailhost.smtp_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and smtp.has_extn("dsn") and not smtp.has_extn("auth")
        assert smtp.mail(sender)[0] == 530  # Must issue a STARTTLS command first
        smtp.starttls(context=mailhost.ssl_context())
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(sender, "wrong")
        assert refused.value.smtp_code == 535


def test_mail_between_two_users_arrives_over_imaps(mailhost: MailHost) -> None:
    sender, recipient = new_user(mailhost, "a"), new_user(mailhost, "b")
    replies, message_id = submit(mailhost, sender, [recipient], notify="SUCCESS,FAILURE")
    assert replies == [(250, b"2.1.5 Ok")]
    got = mailhost.wait_for_mail(recipient, lambda m: m["Message-ID"] == message_id, timeout=10)
    assert got["From"] == sender and got["Delivered-To"] == recipient
    # NOTIFY=SUCCESS: a success DSN too; Postfix calls a hand-over by LMTP "relayed"
    report = mailhost.wait_for_mail(sender, is_report("relayed"), timeout=10)
    (delivered,) = delivery_status(report)[1]
    assert (delivered["Final-Recipient"], delivered["Status"]) == (f"rfc822; {recipient}", "2.0.0")


def test_an_unknown_user_is_taken_at_rcpt_then_bounced_with_a_dsn(mailhost: MailHost) -> None:
    sender = new_user(mailhost, "a")
    nobody = f"{unique('nobody')}@{mailhost.domain}"
    replies, message_id = submit(mailhost, sender, [nobody], envid="job-123")
    assert replies == [(250, b"2.1.5 Ok")]  # like Office 365: no recipient check at RCPT
    report = mailhost.wait_for_mail(sender, is_report("failed"), timeout=15)
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    fields, (recipient,) = delivery_status(report)
    assert fields["Original-Envelope-Id"] == "job-123"
    assert recipient["Final-Recipient"] == f"rfc822; {nobody}"
    assert (recipient["Action"], recipient["Status"]) == ("failed", "5.1.1")
    assert f"Message-ID: {message_id}" in returned_headers(report)  # RET=HDRS: headers only


def test_a_deferred_recipient_gets_a_delay_dsn_then_a_failed_one(mailhost: MailHost) -> None:
    sender = new_user(mailhost, "a")
    later = f"{unique('later')}@{mailhost.slow_domain}"
    replies, message_id = submit(mailhost, sender, [later], envid="job-456", notify="DELAY,FAILURE")
    assert replies == [(250, b"2.1.5 Ok")]
    delayed = mailhost.wait_for_mail(sender, is_report("delayed"), timeout=15)
    fields, (recipient,) = delivery_status(delayed)
    assert fields["Original-Envelope-Id"] == "job-456"
    assert (recipient["Action"], recipient["Status"]) == ("delayed", "4.4.1")
    assert "Connection refused" in " ".join(recipient["Diagnostic-Code"].split())
    # after GIVE_UP seconds in the queue Postfix stops trying: the same 4.4.1, now failed
    failed = mailhost.wait_for_mail(sender, is_report("failed"), timeout=GIVE_UP + 10)
    assert [(r["Action"], r["Status"]) for r in delivery_status(failed)[1]] == [("failed", "4.4.1")]
    assert f"Message-ID: {message_id}" in returned_headers(failed)


ARF = (
    b"From: abuse@isp.example\r\n"
    b"To: postmaster@postroom.test\r\n"
    b"Subject: FW: harness\r\n"
    b"Message-ID: <arf-1@isp.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=feedback-report; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"A complaint about a message from your network.\r\n"
    b"--b1\r\n"
    b"Content-Type: message/feedback-report\r\n"
    b"\r\n"
    b"Feedback-Type: abuse\r\n"
    b"User-Agent: harness/1.0\r\n"
    b"Version: 1\r\n"
    b"--b1\r\n"
    b"Content-Type: text/rfc822-headers\r\n"
    b"\r\n"
    b"Message-ID: <complained@postroom.test>\r\n"
    b"--b1--\r\n"
)


def test_deliver_raw_stores_the_bytes_as_given(mailhost: MailHost) -> None:
    owner = new_user(mailhost, "abuse")
    mailhost.deliver_raw(owner, ARF)
    assert mailhost.mailbox(owner) == [ARF]
    got = mailhost.wait_for_mail(owner, timeout=5)
    assert got.get_param("report-type") == "feedback-report"
    # the same mailbox over IMAP with STARTTLS (Dovecot counts loopback as secure: it would
    # take LOGIN without, so only STARTTLS being offered is checked)
    with imaplib.IMAP4(HOST, mailhost.imap_starttls_port, timeout=10) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(mailhost.ssl_context())
        imap.login(owner, password(owner))
        assert imap.select("INBOX", readonly=True) == ("OK", [b"1"])


def oauth_login(mailhost: MailHost, mechanism: str, user: str, token: str) -> bool:
    """Whether IMAPS takes ``token`` for ``user`` with XOAUTH2 or OAUTHBEARER (RFC 7628)."""
    first = (
        f"user={user}\x01auth=Bearer {token}\x01\x01"
        if mechanism == "XOAUTH2"
        else f"n,a={user},\x01auth=Bearer {token}\x01\x01"
    ).encode()
    after_error = b"" if mechanism == "XOAUTH2" else b"\x01"  # the answer to the error's challenge
    with imaplib.IMAP4_SSL(HOST, mailhost.imap_port, ssl_context=mailhost.ssl_context(), timeout=10) as imap:
        try:
            imap.authenticate(mechanism, lambda challenge: after_error if challenge else first)
        except imaplib.IMAP4.error:
            return False
        return True


def test_oauth_logins_take_active_tokens_of_a_trusted_issuer_for_their_own_user_only(
    mailhost: MailHost, cloud: CloudServer
) -> None:
    owner, other = new_user(mailhost, "oauth"), new_user(mailhost, "other")
    token = cloud.issue(owner)
    assert mailhost.introspection is not None
    assert not oauth_login(mailhost, "XOAUTH2", owner, token)  # no issuer trusted: inactive
    with mailhost.trusting(cloud.introspection_url):
        assert oauth_login(mailhost, "XOAUTH2", owner, token)
        assert oauth_login(mailhost, "OAUTHBEARER", owner, token)
        with smtplib.SMTP(HOST, mailhost.smtp_port, timeout=10) as smtp:  # Postfix asks Dovecot
            smtp.starttls(context=mailhost.ssl_context())
            smtp.ehlo()
            blob = base64.b64encode(f"user={owner}\x01auth=Bearer {token}\x01\x01".encode()).decode()
            assert smtp.docmd("AUTH", f"XOAUTH2 {blob}")[0] == 235
        assert not oauth_login(mailhost, "XOAUTH2", other, token)  # the token is owner's
        # a password is no token (the passwd-file passdb takes PLAIN and LOGIN only: without
        # that, it would answer XOAUTH2 and this login would pass)
        assert not oauth_login(mailhost, "XOAUTH2", owner, password(owner))
        asked = mailhost.introspection.asked
        mailhost.imap(owner).logout()  # LOGIN
        with (
            imaplib.IMAP4_SSL(HOST, mailhost.imap_port, ssl_context=mailhost.ssl_context()) as imap,
            pytest.raises(imaplib.IMAP4.error),
        ):
            imap.login(owner, "wrong")
        assert mailhost.introspection.asked == asked  # a password never reaches the issuer
        cloud.expire_tokens()
        assert not oauth_login(mailhost, "XOAUTH2", owner, token)
    assert len(cloud.calls("POST", "/introspect")) == 6  # relayed once each while trusted
