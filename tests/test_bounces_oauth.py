"""The bounce reader's XOAUTH2 path against real Dovecot: an account that sends with an OAuth auth
profile reads its mailbox with that profile's token (worker/transports/mailbox.py), and Dovecot's
oauth2 passdb asks the token's issuer (the local Google token endpoint, tests/support/cloud.py)
whether it is active and whose it is (tests/support/mailhost.py)."""

from __future__ import annotations

import email.policy
import json
import secrets
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from support.cloud import CloudServer, service_account
from support.mailhost import HOST, MailHost
from support.pki import Pki
from support.queue import QueueEnv, cli, unique
from worker.db.vocabulary import JobState
from worker.queue.events.reports_reader import open_mailbox
from worker.queue.store.jobs import JobStore
from worker.queue.store.suppressions import Suppressions
from worker.records.loader import Records

SA_EMAIL = "postroom@postroom-tests.iam.gserviceaccount.com"


@pytest.fixture
def trusted(mailhost: MailHost, cloud: CloudServer) -> Iterator[CloudServer]:
    """The test's token issuer, whose tokens the mail host's Dovecot takes for XOAUTH2."""
    with mailhost.trusting(cloud.introspection_url):
        yield cloud


def oauth_account(env: QueueEnv, mailhost: MailHost, pki: Pki, cloud: CloudServer) -> tuple[str, str]:
    """An account of a mail host user (its password never given to Postroom) that sends with a
    Google service-account profile delegated to that user, and reads its bounces over IMAPS with
    the same profile (XOAUTH2). Its name and address."""
    name = unique("oauth")
    address = mailhost.add_user(name, secrets.token_hex(12))
    key_file, public_key, _ = service_account(env.root, SA_EMAIL, f"{name}-sa.json")
    cloud.google_public_key, cloud.google_client_email, cloud.google_subject = public_key, SA_EMAIL, address
    (env.config / "keystores" / f"{name}-ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
    (env.config / "auth-profiles" / f"{name}-sa.yaml").write_text(
        f"type: jwt_bearer\nservice_account_file: {key_file}\nsubject: {address}\n"
        f"token_url: {cloud.google_token_url}\ntruststore: {name}-ca\n"
    )
    (env.accounts / f"{name}.yaml").write_text(
        f"provider: other\nsmtp:\n  address: {address}\n  host: 127.0.0.1\n  port: {mailhost.smtp_port}\n"
        f"  protocol: starttls\n  truststore: {name}-ca\n  auth: oauth\n  oauth_profile: {name}-sa\n"
        f"bounces:\n  host: 127.0.0.1\n  port: {mailhost.imap_port}\n"
    )
    return name, address


def sent_job(env: QueueEnv, account: str, recipient: str) -> tuple[str, JobStore]:
    """A job of ``account`` to ``recipient``, recorded as sent (no worker reads this queue)."""
    producer = env.producer()
    try:
        job_id = producer.send_notification(account, [recipient], "Order shipped", "x")
    finally:
        producer.close()
    store = JobStore(env.redis, job_ttl=3600, event_retention=3600)
    accepted = {recipient: {"status": "sent", "code": 250, "message": "2.0.0 OK"}}
    store.finish(job_id, account, state=JobState.SENT, attempt=1, recipients=accepted, counter="sent")
    return job_id, store


def submit_as(mailhost: MailHost, sender: str, recipient: str, envid: str) -> None:
    """The job's message, handed to the mail host's Postfix as Postroom hands it (STARTTLS, the
    job id as ENVID); from 127.0.0.1 without AUTH, which Postfix allows for loopback."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, recipient, "Order shipped"
    message["Message-ID"] = make_msgid(domain=mailhost.domain)
    message.set_content("x\n")
    with smtplib.SMTP(HOST, mailhost.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=mailhost.ssl_context())
        smtp.ehlo()  # anew after STARTTLS: smtplib sends ENVID only to a server it knows speaks DSN
        assert smtp.mail(sender, ["RET=HDRS", f"ENVID={envid}"])[0] == 250
        assert smtp.rcpt(recipient)[0] == 250
        assert smtp.data(message.as_bytes(policy=email.policy.SMTP))[0] == 250


def is_dsn(message: EmailMessage) -> bool:
    return message.get_param("report-type") == "delivery-status"


def test_bounces_check_reads_the_mailbox_with_xoauth2_and_applies_a_real_bounce(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, trusted: CloudServer
) -> None:
    account, address = oauth_account(own_queue, mailhost, pki, trusted)
    dead = f"nobody-{unique('x')}@{mailhost.domain}"
    job_id, store = sent_job(own_queue, account, dead)
    submit_as(mailhost, address, dead, job_id)
    mailhost.wait_for_mail(address, is_dsn)  # Postfix's own DSN: Dovecot refused the user (5.1.1)

    done = cli(own_queue, "bounces", "check", account, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["read"], report["unmatched"], report["not_reports"], report["error"]) == (1, 0, 0, None)
    (match,) = report["matched"]
    assert (match["job_id"], match["kind"]) == (job_id, "dsn")
    assert match["recipients"] == {dead: {"said": "bounced", "status": "5.1.1"}}
    job = store.get(job_id)
    assert job is not None and job.recipients[dead]["status"] == "bounced"
    assert [(e["address"], e["reason"]) for e in Suppressions(own_queue.redis).page(account).entries] == [
        (dead, "hard_bounce")
    ]
    # moved, not deleted; and Dovecot took the login as XOAUTH2 with the token issued for the user
    assert mailhost.mailbox(address) == [] and len(mailhost.mailbox(address, "Postroom.Processed")) == 1
    (claims,) = trusted.google_claims
    (token,) = trusted.issued
    assert claims["sub"] == address and trusted.subjects[token] == address
    assert trusted.calls("POST", "/introspect")
    assert f"user=<{account}>, method=XOAUTH2" in mailhost.log(lines=400)


def test_a_token_the_mailbox_refuses_is_replaced_once_then_login_refused_without_it(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, trusted: CloudServer
) -> None:
    account, _ = oauth_account(own_queue, mailhost, pki, trusted)
    trusted.expire_tokens(future=True)  # issued, but the introspection calls every one inactive

    refused = cli(own_queue, "bounces", "check", account, "--json")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    report = json.loads(refused.stdout)
    assert "login refused" in report["error"] and report["read"] == 0, report
    first, fresh = trusted.issued  # the refused token, then one fresh one, refused too
    assert len(trusted.calls("POST", "/introspect")) == 2
    shown = refused.stdout + refused.stderr
    assert first not in shown and fresh not in shown
    key = json.loads((own_queue.root / f"{account}-sa.json").read_text())["private_key"]
    assert key.splitlines()[1] not in shown


def test_the_worker_replaces_a_cached_token_the_mailbox_refuses_and_reads_on(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, trusted: CloudServer
) -> None:
    account, address = oauth_account(own_queue, mailhost, pki, trusted)
    mailhost.deliver_raw(address, b"From: a friend <friend@example.org>\r\nSubject: lunch?\r\n\r\nSoon.\r\n")
    records = Records.load(own_queue.accounts, own_queue.config)
    with open_mailbox(records, records.account(account)) as mailbox:  # as the worker's reader opens it
        assert [uid for uid, _ in mailbox.pending("", 10)] == ["1"]
    trusted.expire_tokens()  # revoked early: the token the process caches still looks good for an hour
    with open_mailbox(records, records.account(account)) as mailbox:
        assert [uid for uid, _ in mailbox.pending("", 10)] == ["1"]
    first, fresh = trusted.issued  # one refresh, once the mailbox refused the first
    assert fresh in trusted.valid_tokens() and first not in trusted.valid_tokens()
    assert len(trusted.calls("POST", "/introspect")) == 3  # taken, refused, taken
