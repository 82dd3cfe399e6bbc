"""The bounce reader (contract §11): what a delivery report does to its job, written under the
account's lease and once (worker/queue/store/reports.py), against real Redis; the reader's
choice of findings; and, with Postfix and Dovecot, the whole way from a send to a bounce."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.hookrecv import Receiver, delivered, free_port, new_webhook
from support.mailhost import MailHost
from support.pki import Pki
from support.producers import PRODUCERS, Client
from support.queue import Live, QueueEnv, Worker, cli, finished, unique, wait_for
from support.smtpd import SmtpServer
from support.web import ApiServer, write_key
from worker.db.vocabulary import JobState, RecipientState
from worker.mail.reports import RecipientReport, Report, parse_report
from worker.queue.events.reports_reader import findings, job_of, matched_job
from worker.queue.store.emit import ROUTES
from worker.queue.store.jobs import JobStore
from worker.queue.store.reports import Applied, Finding, ReportStore
from worker.queue.store.suppressions import Suppressions
from worker.web import http as http_api

GONE, KEPT = "gone@example.net", "kept@example.net"
TESTS = Path(__file__).resolve().parent


def sent_job(env: QueueEnv, server: SmtpServer, account: str) -> tuple[str, JobStore]:
    """A job of ``account`` to two recipients, recorded as sent (both accepted)."""
    producer = env.producer()
    try:
        job_id = producer.send_notification(account, [GONE, KEPT], "Order shipped", "x")
    finally:
        producer.close()
    store = JobStore(env.redis, job_ttl=3600, event_retention=3600)
    accepted = {a: {"status": "sent", "code": 250, "message": "2.0.0 OK"} for a in (GONE, KEPT)}
    store.finish(job_id, account, state=JobState.SENT, attempt=1, recipients=accepted, counter="sent")
    return job_id, store


def bounce(address: str = GONE, said: str = RecipientState.BOUNCED, permanent: bool = True) -> Finding:
    return Finding(address, said, 550, "5.1.1", "smtp; 550 5.1.1 <gone@example.net>: User unknown", permanent)


@pytest.fixture
def reports(own_queue: QueueEnv) -> ReportStore:
    return ReportStore(own_queue.redis, job_ttl=3600, retention=3600, suppression_ttl=86400)


def test_a_bounce_marks_the_recipient_suppresses_the_address_files_the_event_and_counts(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], reports: ReportStore
) -> None:
    account = own_queue.account("bouncy", smtp_server(mode="plain"))
    job_id, store = sent_job(own_queue, smtp_server(mode="plain"), account)
    own_queue.redis.hset(ROUTES, "hook", json.dumps({"events": ["job.bounced"], "accounts": None}))
    assert reports.take_lease(account, "me", 60)
    assert reports.apply(account, job_id, "r1", "dsn", [bounce()], "me") == (Applied.WRITTEN, 1)

    job = store.get(job_id)
    assert job is not None and job.state == JobState.SENT  # what happened after the 250 is the recipient's
    assert job.recipients[GONE]["status"] == "bounced" and job.recipients[GONE]["code"] == 550
    assert "5.1.1" in job.recipients[GONE]["message"] and job.recipients[KEPT]["status"] == "sent"
    assert [h["outcome"] for h in job.history or []][-1] == "bounced"
    (entry,) = Suppressions(own_queue.redis).page(account).entries
    assert (entry["address"], entry["reason"], entry["job_id"]) == (GONE, "hard_bounce", job_id)
    filed = [str(e) for e in own_queue.redis.lrange(f"postroom:webhook:job:{job_id}", 0, -1)]
    events = [json.loads(str(own_queue.redis.get(f"postroom:webhook:event:{e}"))) for e in filed]
    assert [e["type"] for e in events][-1] == "job.bounced" and events[-1]["webhooks"] == ["hook"]
    minute = int(time.time() // 60)
    assert own_queue.redis.hget(f"postroom:w:{account}:m:{minute}", "bounced") == "1"

    # the same report read again (a reader killed before it moved the message): nothing twice
    assert reports.apply(account, job_id, "r1", "dsn", [bounce()], "me") == (Applied.ALREADY_DONE, 0)
    assert own_queue.redis.hget(f"postroom:w:{account}:m:{minute}", "bounced") == "1"
    assert reports.stats(account) == {"matched": 2}


def test_a_reader_that_lost_its_lease_writes_nothing(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], reports: ReportStore
) -> None:
    account = own_queue.account("fenced", smtp_server(mode="plain"))
    job_id, store = sent_job(own_queue, smtp_server(mode="plain"), account)
    assert reports.take_lease(account, "frozen", 1)
    own_queue.redis.delete(f"postroom:reports:lease:{account}")  # it lapsed while "frozen" slept
    assert reports.take_lease(account, "other", 60) and not reports.take_lease(account, "frozen", 60)
    assert reports.apply(account, job_id, "r1", "dsn", [bounce()], "frozen") == (Applied.LEASE_LOST, 0)
    job = store.get(job_id)
    assert job is not None and job.recipients[GONE]["status"] == "sent"
    assert Suppressions(own_queue.redis).page(account).entries == []
    assert reports.apply(account, job_id, "r1", "dsn", [bounce()], "other") == (Applied.WRITTEN, 1)


def test_a_delay_is_history_only_and_a_complaint_suppresses(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], reports: ReportStore
) -> None:
    account = own_queue.account("slowish", smtp_server(mode="plain"))
    job_id, store = sent_job(own_queue, smtp_server(mode="plain"), account)
    delayed = Finding(GONE, "delayed", None, "4.4.1", "connection timed out", False)
    assert reports.apply(account, job_id, "d1", "dsn", [delayed], "") == (Applied.WRITTEN, 0)
    job = store.get(job_id)
    assert job is not None and job.recipients[GONE]["status"] == "sent"
    assert (job.history or [])[-1]["outcome"] == "delayed" and Suppressions(own_queue.redis).page(
        account
    ).entries == []
    complaint = Finding(KEPT, RecipientState.COMPLAINED, None, None, "abuse", True)
    assert reports.apply(account, job_id, "c1", "complaint", [complaint], "") == (Applied.WRITTEN, 1)
    job = store.get(job_id)
    assert job is not None and job.recipients[KEPT]["status"] == "complained"
    (entry,) = Suppressions(own_queue.redis).page(account).entries
    assert (entry["address"], entry["reason"]) == (KEPT, "complaint")
    soft = Finding(GONE, RecipientState.BOUNCED, None, "4.2.2", "mailbox full, gave up", False)
    assert reports.apply(account, job_id, "s1", "dsn", [soft], "") == (Applied.WRITTEN, 1)
    assert [e["address"] for e in Suppressions(own_queue.redis).page(account).entries] == [
        KEPT
    ]  # not permanent
    assert reports.apply(account, "no-such-job", "x1", "dsn", [bounce()], "") == (Applied.NO_JOB, 0)


# ---- what the reader makes of a report ------------------------------------------------------

SAMPLES = Path(__file__).resolve().parent / "samples" / "reports"


@pytest.mark.parametrize(
    ("sample", "said"),
    [
        ("postfix_bounce.eml", {("bounced", True)}),
        ("exchange_online_ndr.eml", {("bounced", True)}),
        ("gmail_dsn.eml", {("bounced", True)}),
        ("qmail_bounce.eml", {("bounced", True)}),
        ("postfix_delayed.eml", {("delayed", False)}),
        ("arf_abuse.eml", {("complained", True)}),
        ("microsoft_jmrp.eml", {("complained", True)}),
    ],
)
def test_the_reader_bounces_suppresses_only_what_will_not_change(
    sample: str, said: set[tuple[str, bool]]
) -> None:
    report = parse_report((SAMPLES / sample).read_bytes())
    assert report is not None
    assert {(str(f.said), f.permanent) for f in findings(report)} == said


def test_a_failure_after_days_of_retries_bounces_without_suppressing() -> None:
    report = Report(
        "dsn", None, None, (RecipientReport(GONE, "failed", "4.4.7", "delivery time expired"),), None
    )
    (finding,) = findings(report)
    assert (finding.said, finding.permanent) == ("bounced", False)


def test_the_job_is_named_by_envid_else_by_postrooms_message_id() -> None:
    assert job_of(Report("dsn", "order-1042+2Bretry", "<x@y>", (), None)) == ("order-1042+retry", None)
    assert job_of(Report("dsn", None, "<4f0c9a@example.com>", (), None)) == ("4f0c9a", "<4f0c9a@example.com>")
    assert job_of(Report("dsn", None, "<a b@example.com>", (), None)) == (None, None)
    assert job_of(Report("dsn", None, None, (), None)) == (None, None)


# ---- the whole way: Postfix takes every recipient (like Office 365), bounces later -----------


def relay_account(env: QueueEnv, mailhost: MailHost, pki: Pki, name: str) -> str:
    """An account that submits to the mail host's Postfix (STARTTLS, AUTH) and reads its bounces
    from its own Dovecot mailbox over IMAPS, every 5 s, with the same login."""
    password = secrets.token_hex(12)
    address = mailhost.add_user(name, password)
    secret = env.root / f"{name}.password"
    secret.write_text(password + "\n")
    (env.config / "keystores" / f"{name}-ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
    (env.accounts / f"{name}.yaml").write_text(
        f"provider: other\nsmtp:\n  address: {address}\n  host: 127.0.0.1\n  port: {mailhost.smtp_port}\n"
        f"  protocol: starttls\n  truststore: {name}-ca\n  auth: password\n  password: {{file: {secret}}}\n"
        f"bounces:\n  host: 127.0.0.1\n  port: {mailhost.imap_port}\n  interval: 5\n"
    )
    return name


def test_a_relay_that_takes_everything_bounces_later_and_the_address_is_suppressed(
    live: Live, mailhost: MailHost, pki: Pki, hook_files: list[str], tmp_path: Path
) -> None:
    queue_env, worker, producer, _ = live
    account = relay_account(queue_env, mailhost, pki, unique("relay").lower())
    dead, alive = f"nobody-{unique('x')}@{mailhost.domain}", mailhost.add_user(unique("alice").lower(), "pw")
    hook, port = unique("bounces"), free_port()
    hook_files.append(hook)
    secret = new_webhook(
        queue_env, hook, f"http://127.0.0.1:{port}/hook", "--account", account, "--allow-private"
    )
    receiver = Receiver(tmp_path / "hooks.jsonl", secret, port=port).start()
    try:
        job = finished(producer, producer.send_notification(account, [dead, alive], "Your order", "x"))
        assert job.state == "sent" and job.recipients[dead]["status"] == "sent"  # Postfix said 250

        def bounced() -> bool:
            found = producer.job(job.id)
            return found is not None and found.recipients[dead]["status"] == "bounced"

        wait_for(bounced, 60, "the bounce to reach the job", worker)
        found = producer.job(job.id)
        assert found is not None and found.state == "sent" and found.recipients[alive]["status"] == "sent"
        assert (
            found.recipients[dead]["message"].startswith("5.1.1")
            and found.recipients[dead]["report"] == "dsn"
        )
        entries = json.loads(cli(queue_env, "suppressions", "list", account, "--json").stdout)["entries"]
        assert [(e["address"], e["reason"], e["job_id"]) for e in entries] == [(dead, "hard_bounce", job.id)]
        wait_for(lambda: (job.id, "job.bounced") in delivered(receiver), 30, "job.bounced", worker)
        # the report moved out of the inbox, nothing deleted; the next job skips the address
        moved = mailhost.mailbox(account, "Postroom.Processed")  # Dovecot's Maildir++ delimiter
        assert len(moved) == 1 and b"report-type=delivery-status" in moved[0]
        assert f"Original-Envelope-Id: {job.id}".encode() in moved[0]  # Postroom sent ENVID = the job id
        assert not [m for m in mailhost.mailbox(account) if b"delivery-status" in m]
        again = finished(producer, producer.send_notification(account, [dead], "Again", "x"))
        assert again.state == "suppressed" and again.recipients[dead]["status"] == "suppressed"
        status = json.loads(cli(queue_env, "status", "--json").stdout)["accounts"][account]
        assert status["bounced"] == 1 and status["reports"]["matched"] == 1
    finally:
        receiver.stop()


def test_a_bounce_for_a_forwarded_address_finds_the_address_that_was_sent_to(
    live: Live, mailhost: MailHost, pki: Pki
) -> None:
    """The relay forwards (an alias) to a mailbox that is gone: the report's final recipient is an
    address the job never named; its original recipient is the one it did."""
    queue_env, worker, producer, _ = live
    account = relay_account(queue_env, mailhost, pki, unique("alias").lower())
    job = finished(producer, producer.send_notification(account, [mailhost.forwarded], "Yours", "x"))

    def said() -> str:
        found = producer.job(job.id)
        return found.recipients[mailhost.forwarded]["status"] if found is not None else ""

    wait_for(lambda: said() == "bounced", 60, "the forwarded address's bounce", worker)
    (moved,) = mailhost.mailbox(account, "Postroom.Processed")
    assert f"Final-Recipient: rfc822; {mailhost.forwarded_to}".encode() in moved
    entries = json.loads(cli(queue_env, "suppressions", "list", account, "--json").stdout)["entries"]
    assert [(e["address"], e["job_id"]) for e in entries] == [(mailhost.forwarded, job.id)]


def test_a_bounce_finds_its_job_whoever_produced_it(
    live: Live, mailhost: MailHost, pki: Pki, tmp_path: Path
) -> None:
    """A plain Celery ``send_task``, celery-node and the HTTP API write nothing of the helper's:
    each job is recorded by the worker that reads it, its id goes out as ENVID, and the report
    that comes back later finds it the same way (the helper's own case is the test above)."""
    queue_env, worker, producer, _ = live
    account = relay_account(queue_env, mailhost, pki, unique("producers").lower())
    api = ApiServer(http_api.create_app(producer))
    token = write_key(queue_env, unique("bounces"), [account])
    clients = {
        kind: Client(kind, queue_env, producer, api.url, token) for kind in PRODUCERS if kind != "helper"
    }
    dead = {kind: f"nobody-{kind}-{unique('x')}@{mailhost.domain}" for kind in clients}

    def message(kind: str, subject: str) -> dict[str, Any]:
        return {"account": account, "to": [dead[kind]], "subject": subject, "text": "x"}

    def recipients(ids: dict[str, str]) -> dict[str, str]:
        jobs = {kind: producer.job(job_id) for kind, job_id in ids.items()}
        return {k: j.recipients.get(dead[k], {}).get("status", "") if j else "" for k, j in jobs.items()}

    try:
        ids = {kind: client.send(message(kind, f"from {kind}")) for kind, client in clients.items()}
        every = dict.fromkeys(clients, "bounced")
        wait_for(lambda: recipients(ids) == every, 60, "every producer's bounce", worker)
        moved = b"".join(mailhost.mailbox(account, "Postroom.Processed"))
        for job_id in ids.values():
            assert f"Original-Envelope-Id: {job_id}".encode() in moved
        entries = json.loads(cli(queue_env, "suppressions", "list", account, "--json").stdout)["entries"]
        assert sorted((e["address"], e["reason"], e["job_id"]) for e in entries) == sorted(
            (dead[kind], "hard_bounce", job_id) for kind, job_id in ids.items()
        )
        again = {kind: client.send(message(kind, "again")) for kind, client in clients.items()}
        wait_for(lambda: recipients(again) == dict.fromkeys(clients, "suppressed"), 30, "the skips", worker)
        assert {kind: getattr(producer.job(i), "state", "") for kind, i in again.items()} == dict.fromkeys(
            clients, "suppressed"
        )
    finally:
        for client in clients.values():
            client.close()
        api.stop()


def test_a_reader_killed_between_writing_and_moving_applies_nothing_twice_and_loses_nothing(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, tmp_path: Path
) -> None:
    account = relay_account(own_queue, mailhost, pki, unique("killed").lower())
    dead = [f"gone{i}-{unique('x')}@{mailhost.domain}" for i in range(3)]
    kills = tmp_path / "kills.log"
    hook = {"PYTHONPATH": str(TESTS), "POSTROOM_TEST_KILL_LOG": str(kills)}
    dying = Worker(
        own_queue, tmp_path / "dying.log", extra_args=("-I", "support.die_before_move"), extra_env=hook
    )
    survivor = Worker(own_queue, tmp_path / "survivor.log")
    producer = own_queue.producer()

    def bounced() -> list[str]:  # each job has one recipient
        jobs = [producer.job(i) for i in ids]
        return [
            j.id for j in jobs if j is not None and next(iter(j.recipients.values()))["status"] == "bounced"
        ]

    try:
        ids = [
            producer.send_notification(account, [address], f"order {i}", "x")
            for i, address in enumerate(dead)
        ]
        dying.start()
        wait_for(kills.exists, 60, "the reader to die before its first move", dying)
        assert len(bounced()) == 1  # written, not moved: the report is still in the inbox
        wait_for(lambda: not dying.alive(), 10, "the killed worker to be gone")
        survivor.start()  # takes the account's lease once the dead reader's lapses (30 s)
        wait_for(lambda: len(bounced()) == len(ids), 90, "every bounce", survivor)
        wait_for(
            lambda: len(mailhost.mailbox(account, "Postroom.Processed")) == len(ids),
            20,
            "every move",
            survivor,
        )
        for job_id in ids:
            job = producer.job(job_id)
            assert job is not None
            assert [h["outcome"] for h in job.history or []].count("bounced") == 1, job.history
    finally:
        dying.stop()
        survivor.stop()
        producer.close()
    hour = int(time.time() // 3600)
    assert own_queue.redis.hget(f"postroom:w:{account}:h:{hour}", "bounced") == str(len(ids))
    assert sorted(e["address"] for e in Suppressions(own_queue.redis).page(account).entries) == sorted(dead)
    assert not [m for m in mailhost.mailbox(account) if b"delivery-status" in m]


def complaint_about(message_id: str, recipient: str) -> bytes:
    """The ARF sample (RFC 5965), about ``message_id`` sent to ``recipient``, with a report id of
    its own (a report is applied once by its id: two complaints are two reports)."""
    sample = (SAMPLES / "arf_abuse.eml").read_bytes()
    return (
        sample.replace(b"<9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a@example.com>", message_id.encode())
        .replace(b"Carol@Example.NET", recipient.encode())
        .replace(
            b"<ARF.4f2b9c1e0d7a.20250114184001@fbl.example.net>",
            f"<{unique('ARF.')}@fbl.example.net>".encode(),
        )
    )


def test_bounces_check_applies_a_complaint_and_leaves_what_is_not_ours(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, smtp_server: Callable[..., SmtpServer]
) -> None:
    account = relay_account(own_queue, mailhost, pki, unique("check").lower())
    job_id, store = sent_job(own_queue, smtp_server(mode="plain"), account)
    message_id = f"<{job_id}@{mailhost.domain}>"
    store.note_message_id(job_id, message_id)
    mailhost.deliver_raw(
        account, b"From: a friend <friend@example.org>\r\nSubject: lunch?\r\n\r\nSee you.\r\n"
    )
    mailhost.deliver_raw(account, complaint_about("<not-ours-1@elsewhere.example>", KEPT))
    mailhost.deliver_raw(account, complaint_about(message_id, KEPT))

    done = cli(own_queue, "bounces", "check", account, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["read"], report["unmatched"], report["not_reports"], report["error"]) == (3, 1, 1, None)
    (match,) = report["matched"]
    assert (match["job_id"], match["kind"]) == (job_id, "complaint")
    assert match["recipients"] == {KEPT: {"said": "complained", "status": None}}
    job = store.get(job_id)
    assert job is not None and job.recipients[KEPT]["status"] == "complained"
    assert [(e["address"], e["reason"]) for e in Suppressions(own_queue.redis).page(account).entries] == [
        (KEPT, "complaint")
    ]
    assert len(mailhost.mailbox(account)) == 2 and len(mailhost.mailbox(account, "Postroom.Processed")) == 1

    again = json.loads(cli(own_queue, "bounces", "check", account, "--json").stdout)
    assert again["read"] == 0  # each message is read once
    text = cli(own_queue, "bounces", "check", account)
    assert text.stdout.strip() == f"{account}: read 0, matched 0, unmatched 0, not reports 0"

    # a mailbox that refuses the login: the reason, no secret, exit 1
    password_file = own_queue.root / f"{account}.password"
    password = password_file.read_text().strip()
    password_file.write_text("not-" + password + "\n")
    refused = cli(own_queue, "bounces", "check", account, "--json")
    assert refused.returncode == 1 and "login refused" in json.loads(refused.stdout)["error"]
    assert password not in refused.stdout + refused.stderr


def test_a_complaint_about_a_message_id_the_producer_chose_finds_its_job_in_this_account_only(
    own_queue: QueueEnv, mailhost: MailHost, pki: Pki, tmp_path: Path
) -> None:
    """An ARF complaint carries no ENVID, only the original's headers: a job sent with a
    Message-ID its producer chose (the helper, a plain Celery ``send_task``) is found by the
    sent mark's Message-ID -> job entry, written when the server said 250 — the Message-ID
    quoted without angle brackets or with the domain in another case. The same Message-ID sent by
    another account's job, and one no job was sent as, stay unmatched in this account's mailbox."""
    ours = relay_account(own_queue, mailhost, pki, unique("chosen").lower())
    theirs = relay_account(own_queue, mailhost, pki, unique("other").lower())
    producer = own_queue.producer()
    clients = {kind: Client(kind, own_queue, producer, "", "") for kind in ("helper", "celery")}
    tag = unique("")
    chosen = {kind: f"<Order-{kind}-{tag}@Shop.Example>" for kind in clients}
    only_theirs, never_sent = f"<invoice-{tag}@shop.example>", f"<never-{tag}@shop.example>"
    to = {kind: mailhost.add_user(unique(f"to-{kind}-").lower(), "pw") for kind in clients}
    their_to = mailhost.add_user(unique("them-").lower(), "pw")
    worker = Worker(own_queue, tmp_path / "worker.log")
    try:
        worker.start()
        ids = {
            kind: client.send(
                {"account": ours, "to": [to[kind]], "subject": f"from {kind}", "text": "x",
                 "message_id": chosen[kind]}
            )
            for kind, client in clients.items()
        }  # fmt: skip
        their_ids = [
            producer.enqueue(
                {"account": theirs, "to": [their_to], "subject": "theirs", "text": "x", "message_id": mid}
            )
            for mid in (chosen["helper"], only_theirs)  # the helper's Message-ID, sent by them too
        ]
        for job_id in [*ids.values(), *their_ids]:
            assert finished(producer, job_id, 60).state == "sent"
    finally:
        worker.stop()  # its reader must not read the complaints before `bounces check` does
        for client in clients.values():
            client.close()
    for kind in clients:  # what the recipient got carries the producer's Message-ID, not Postroom's
        (got,) = mailhost.mailbox(to[kind])
        assert f"Message-ID: {chosen[kind]}".encode() in got
    bare = chosen["helper"].strip("<>")
    mailhost.deliver_raw(ours, complaint_about(bare, to["helper"]))  # no angle brackets
    mailhost.deliver_raw(
        ours, complaint_about(chosen["celery"].replace("Shop.Example", "SHOP.example"), to["celery"])
    )
    mailhost.deliver_raw(ours, complaint_about(only_theirs, their_to))
    mailhost.deliver_raw(ours, complaint_about(never_sent, to["helper"]))

    done = cli(own_queue, "bounces", "check", ours, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["read"], report["unmatched"], report["not_reports"], report["error"]) == (4, 2, 0, None)
    assert sorted((m["job_id"], m["kind"], m["already_done"]) for m in report["matched"]) == sorted(
        (job_id, "complaint", False) for job_id in ids.values()
    )
    for kind, job_id in ids.items():
        job = producer.job(job_id)
        assert job is not None and job.state == "sent" and job.recipients[to[kind]]["status"] == "complained"
    entries = Suppressions(own_queue.redis).page(ours).entries
    assert sorted((e["address"], e["reason"], e["job_id"]) for e in entries) == sorted(
        (to[kind], "complaint", job_id) for kind, job_id in ids.items()
    )
    for job_id in their_ids:  # the other account's jobs, one with the very same Message-ID: untouched
        job = producer.job(job_id)
        assert job is not None and job.recipients[their_to]["status"] == "sent"
    assert Suppressions(own_queue.redis).page(theirs).entries == []
    assert len(mailhost.mailbox(ours)) == 2 and len(mailhost.mailbox(ours, "Postroom.Processed")) == 2
    producer.close()


def test_a_message_id_entry_names_a_job_only_when_the_record_is_this_accounts_and_was_sent_so(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], reports: ReportStore
) -> None:
    """The reader believes no Message-ID -> job entry without the record: an entry that outlived
    its job, or whose job was sent as another Message-ID, or that names another account's job,
    matches nothing; Postroom's own ``<job id@domain>`` is still read without any entry."""
    account = own_queue.account("chosen", smtp_server(mode="plain"))
    other = own_queue.account("other", smtp_server(mode="plain"))
    job_id, store = sent_job(own_queue, smtp_server(mode="plain"), account)
    their_job, _ = sent_job(own_queue, smtp_server(mode="plain"), other)
    store.note_message_id(job_id, "<Order-1@Shop.Example>")
    store.note_message_id(their_job, "<Order-2@shop.example>")

    def complaint(message_id: str) -> Report:
        return Report("complaint", None, message_id, (RecipientReport(KEPT, "complained", None, None),), None)

    def filed(account: str, message_id: str, job: str) -> None:
        own_queue.redis.set(f"postroom:sent-as:{account}:{message_id}", job)

    assert matched_job(reports, account, complaint("<Order-1@shop.example>")) is None  # no entry, not ours
    filed(account, "<Order-1@shop.example>", job_id)
    assert matched_job(reports, account, complaint("<Order-1@shop.example>")) == job_id
    assert matched_job(reports, account, complaint("Order-1@SHOP.EXAMPLE")) == job_id
    assert matched_job(reports, account, complaint("<order-1@shop.example>")) is None  # the left part's case
    assert matched_job(reports, other, complaint("<Order-1@shop.example>")) is None  # their mailbox
    filed(account, "<Order-2@shop.example>", their_job)  # an entry naming another account's job
    assert matched_job(reports, account, complaint("<Order-2@shop.example>")) is None
    filed(account, "<Order-3@shop.example>", job_id)  # an entry whose job was sent as another
    assert matched_job(reports, account, complaint("<Order-3@shop.example>")) is None
    filed(account, "<Order-4@shop.example>", "gone")  # an entry that outlived its record
    assert matched_job(reports, account, complaint("<Order-4@shop.example>")) is None
    store.note_message_id(job_id, f"<{job_id}@Example.COM>")  # Postroom's own form: no entry needed
    assert matched_job(reports, account, complaint(f"{job_id}@example.com")) == job_id


def test_a_delay_notice_is_history_and_giving_up_later_bounces_without_suppressing(
    live: Live, mailhost: MailHost, pki: Pki
) -> None:
    # Postfix cannot reach the slow domain: a delay DSN (4.4.1) after about a second, then, when
    # it gives up after GIVE_UP seconds, a failed one that keeps the 4.4.1 (a passing trouble)
    queue_env, worker, producer, _ = live
    account = relay_account(queue_env, mailhost, pki, unique("slow").lower())
    far = f"someone-{unique('x')}@{mailhost.slow_domain}"
    job = finished(producer, producer.send_notification(account, [far], "Your order", "x"))
    assert job.state == "sent"

    def outcomes() -> list[str]:
        found = producer.job(job.id)
        return [h["outcome"] for h in (found.history or [])] if found is not None else []

    wait_for(lambda: "bounced" in outcomes(), 60, "the delay and the bounce", worker)
    assert outcomes().count("delayed") >= 1 and outcomes().index("delayed") < outcomes().index("bounced")
    found = producer.job(job.id)
    assert found is not None and found.recipients[far]["status"] == "bounced"
    assert found.recipients[far]["message"].startswith("4.4.1")
    assert far not in {e["address"] for e in Suppressions(queue_env.redis).page(account).entries}
