"""The queue end to end: producer → real Redis → real Celery worker → real SMTP server."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from support.pki import Pki
from support.queue import WRONG_PASSWORD, Live, QueueEnv, Worker, cli, finished, unique, wait_for
from support.smtpd import PASSWORD, Rule, SmtpServer, unknown_user
from worker.client import PayloadError, Producer

ServerFactory = Callable[..., SmtpServer]


def send_task(env: QueueEnv, task: str, kwargs: dict[str, Any]) -> str:
    """Enqueue the way a producer in another language does: task name, queue, JSON kwargs."""
    app = Celery("another-producer", broker=env.broker_url, set_as_current=False)
    try:
        return str(app.send_task(task, kwargs=kwargs, queue="postroom").id)
    finally:
        app.close()


# ---- delivery -------------------------------------------------------------------------


def test_notification_is_delivered_with_every_field(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("notify"), server, display_name="Example Notices")
    job_id = producer.send_notification(
        account,
        to=["to@example.net"],
        cc=["cc@example.net"],
        bcc=["hidden@example.net"],
        subject="Your order shipped",
        text="Plain body\n",
        html="<p>HTML body</p>",
        attachments=[
            {
                "filename": "invoice.txt",
                "content_type": "text/plain",
                "content_base64": base64.b64encode(b"invoice 42").decode(),
            }
        ],
        headers={"X-Order": "42"},
    )
    job = finished(producer, job_id)
    assert job.state == "sent" and job.attempts == 1
    assert job.transport == "smtp" and job.security == "none"
    assert set(job.recipients) == {"to@example.net", "cc@example.net", "hidden@example.net"}
    assert all(r["status"] == "sent" and r["code"] == 250 for r in job.recipients.values())
    (got,) = server.received
    assert sorted(got.rcpt_tos) == ["cc@example.net", "hidden@example.net", "to@example.net"]
    msg = got.message
    assert msg["Message-ID"] == job.message_id
    assert msg["From"] == f"Example Notices <{account}@example.com>"
    assert msg["Subject"] == "Your order shipped" and msg["X-Order"] == "42"
    assert msg["Bcc"] is None and "hidden@example.net" not in got.data.decode()
    assert [p.get_filename() for p in msg.iter_attachments()] == ["invoice.txt"]
    as_json = json.loads(cli(queue_env, "job", job_id, "--json").stdout)
    for key in ("id", "state", "attempts", "account", "transport", "security", "message_id"):
        assert key in as_json
    assert as_json["recipients"]["to@example.net"]["status"] == "sent" and as_json["last_error"] is None


def test_a_producer_without_the_helper_uses_send_task(live: Live) -> None:
    """The documented interface for producers in any language: the task name, the queue, JSON kwargs."""
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("raw"), server)
    job_id = send_task(
        queue_env,
        "postroom.send",
        {"account": account, "to": ["x@example.net"], "subject": "Raw", "text": "hi"},
    )
    job = finished(producer, job_id)
    assert job.state == "sent"
    (got,) = server.received
    assert got.message["Message-ID"] == f"<{job_id}@example.com>" == job.message_id


def test_451_then_accept_is_delivered_once_on_the_second_attempt(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain", rules=[Rule("MAIL", 451, "4.3.0 Try again later", times=1)])
    account = queue_env.account(unique("retry"), server)
    job = finished(producer, producer.send_notification(account, ["a@example.net"], "Hi", "x"))
    assert job.state == "sent" and job.attempts == 2
    assert [h["outcome"] for h in job.history or []] == ["retry", "sent"]
    assert "451" in (job.history or [])[0]["error"]
    assert len(server.received) == 1


def test_550_is_dead_lettered_after_exactly_one_attempt_and_can_be_retried(live: Live) -> None:
    queue_env, worker, producer, smtp_server = live
    server = smtp_server(mode="plain", rules=[unknown_user()])
    account = queue_env.account(unique("dead"), server)
    job_id = producer.send_notification(account, ["gone@example.net"], "Hi", "x")
    job = finished(producer, job_id)
    assert job.state == "dead" and job.attempts == 1
    assert job.last_error is not None and "550 5.1.1 No such user" in job.last_error
    assert job.recipients["gone@example.net"]["status"] == "failed"
    time.sleep(1.5)  # long enough for a (wrong) retry to have happened
    again = producer.job(job_id)
    assert again is not None and again.attempts == 1 and server.commands.count("MAIL") == 1

    listed = json.loads(cli(queue_env, "dead-letters", "list", "--json").stdout)
    (row,) = [r for r in listed if r["id"] == job_id]
    assert set(row) >= {"id", "account", "message_id", "error", "attempts", "failed_at"}
    assert row["account"] == account and row["attempts"] == 1 and "550" in row["error"]
    shown = json.loads(cli(queue_env, "dead-letters", "show", job_id, "--json").stdout)
    assert shown["payload"]["to"] == ["gone@example.net"]

    server.rules.clear()  # the mailbox exists now
    retried = cli(queue_env, "dead-letters", "retry", job_id)
    assert retried.returncode == 0, retried.stderr
    wait_for(lambda: len(server.received) == 1, 20, "the retried dead letter", worker)
    job = finished(producer, job_id)
    assert job.state == "sent"
    assert server.received[0].message["Message-ID"] == job.message_id == row["message_id"]
    assert job_id not in [
        r["id"] for r in json.loads(cli(queue_env, "dead-letters", "list", "--json").stdout)
    ]


def test_dead_letters_purge(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain", rules=[Rule("DATA", 554, "5.7.1 Spam")])
    account = queue_env.account(unique("purge"), server)
    job_id = producer.send_notification(account, ["a@example.net"], "Hi", "x")
    assert finished(producer, job_id).state == "dead"
    purged = cli(queue_env, "dead-letters", "purge", job_id, "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert producer.job(job_id) is None
    assert cli(queue_env, "dead-letters", "show", job_id).returncode == 1


def test_partial_refusal_retries_only_the_deferred_recipient(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    later = Rule("RCPT", 452, "4.2.2 Mailbox full", match="later", times=1)
    server = smtp_server(mode="plain", rules=[unknown_user("bad"), later])
    account = queue_env.account(unique("partial"), server)
    to = ["good@example.net", "bad@example.net", "later@example.net"]
    job = finished(producer, producer.send_notification(account, to, "Hi", "x"))
    assert job.state == "sent" and job.attempts == 2
    assert {a: r["status"] for a, r in job.recipients.items()} == {
        "good@example.net": "sent",
        "bad@example.net": "failed",
        "later@example.net": "sent",
    }
    assert [r.rcpt_tos for r in server.received] == [["good@example.net"], ["later@example.net"]]
    assert len({r.message["Message-ID"] for r in server.received}) == 1


def test_the_same_idempotency_key_sends_once(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("idem"), server)
    first = producer.send_notification(account, ["a@example.net"], "Hi", "x", idempotency_key="order-42")
    second = producer.send_notification(account, ["a@example.net"], "Hi", "x", idempotency_key="order-42")
    assert first == second
    assert finished(producer, first).state == "sent"
    third = producer.send_notification(account, ["a@example.net"], "Hi", "x", idempotency_key="order-42")
    assert third == first
    time.sleep(1)
    assert len(server.received) == 1


# ---- auto-replies ----------------------------------------------------------------------


def test_auto_reply_threads_and_is_sent_once_per_sender_within_the_window(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("reply"), server)
    original = {
        "message_id": "<q1@example.net>",
        "from": "alice@example.net",
        "subject": "Question about my order",
        "headers": {"References": "<q0@example.net>"},
    }
    job = finished(producer, producer.send_auto_reply(account, original, "We got your message."))
    assert job.state == "sent"
    (got,) = server.received
    msg = got.message
    assert got.rcpt_tos == ["alice@example.net"] and msg["To"] == "alice@example.net"
    assert msg["Subject"] == "Re: Question about my order"
    assert msg["In-Reply-To"] == "<q1@example.net>"
    assert msg["References"] == "<q0@example.net> <q1@example.net>"
    assert msg["Auto-Submitted"] == "auto-replied"

    again = {**original, "message_id": "<q2@example.net>"}
    second = finished(producer, producer.send_auto_reply(account, again, "We got your message."))
    assert second.state == "suppressed" and "already auto-replied" in (second.last_error or "")
    time.sleep(0.5)
    assert len(server.received) == 1


@pytest.mark.parametrize(
    ("original", "why"),
    [
        ({"headers": {"Auto-Submitted": "auto-generated"}}, "Auto-Submitted"),
        ({"headers": {"Precedence": "bulk"}}, "Precedence"),
        ({"headers": {"List-Id": "<news.example.net>"}}, "List-Id"),
        ({"return_path": "<>"}, "empty return path"),
        ({"from": "MAILER-DAEMON@example.net"}, "MAILER-DAEMON"),
    ],
)
def test_auto_replies_to_automatic_mail_are_suppressed(
    live: Live, original: dict[str, Any], why: str
) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("supp"), server)
    full = {"from": "bob@example.net", "subject": "Hello", "message_id": "<m@example.net>", **original}
    job = finished(producer, producer.send_auto_reply(account, full, "Out of office"))
    assert job.state == "suppressed" and why in (job.last_error or "")
    assert server.received == [] and "MAIL" not in server.commands


# ---- refused at enqueue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"account": "no-such-account"}, "account: unknown account 'no-such-account'"),
        ({"to": ["not-an-address"]}, "to[0]"),
        ({"to": ["a@example.net\r\nBcc: victim@example.net"]}, "to[0]"),
        ({"headers": {"X-Evil": "a\r\nBcc: victim@example.net"}}, "CR/LF"),
        ({"subject": "Hi\nBcc: victim@example.net"}, "subject: CR/LF"),
        ({"headers": {"Bad Name": "x"}}, "headers"),
        ({"to": []}, "at least one recipient"),
        ({"kind": "auto-reply"}, "needs original"),
        ({"message_id": "no-angle-brackets"}, "message_id"),
        ({"attachments": [{"filename": "a.bin", "content_base64": "%%%"}]}, "not valid base64"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ],
)
def test_bad_payloads_are_refused_at_enqueue_and_nothing_is_enqueued(
    queue_env: QueueEnv, producer: Producer, smtp_server: ServerFactory, change: dict[str, Any], reason: str
) -> None:
    account = queue_env.account(unique("valid"), smtp_server(mode="plain"))
    payload = {"account": account, "to": ["a@example.net"], "subject": "Hi", "text": "x", **change}
    jobs_before = len(queue_env.redis.keys("postroom:job:*"))
    with pytest.raises(PayloadError) as refused:
        producer.enqueue(payload)
    assert reason in str(refused.value)
    assert len(queue_env.redis.keys("postroom:job:*")) == jobs_before


def test_oversized_attachments_are_refused(
    queue_env: QueueEnv, producer: Producer, smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTROOM_MAX_ATTACHMENT_BYTES", "1000")
    account = queue_env.account(unique("big"), smtp_server(mode="plain"))
    attachment = {"filename": "big.bin", "content_base64": base64.b64encode(b"x" * 1001).decode()}
    with pytest.raises(PayloadError, match="attachments total 1001 bytes, over the 1000 byte limit"):
        producer.send_notification(account, ["a@example.net"], "Hi", "x", attachments=[attachment])


def test_a_bad_payload_that_skipped_validation_is_dead_lettered_with_the_reason(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("skip"), server)
    kwargs = {"account": account, "to": ["a@example.net"], "headers": {"X-A": "1\r\nBcc: v@example.net"}}
    job = finished(producer, send_task(queue_env, "postroom.send", kwargs))
    assert job.state == "dead" and "invalid payload" in (job.last_error or "")
    assert server.received == []


def test_cli_send_refuses_clearly_and_delivers_with_wait(
    queue_env: QueueEnv, worker: Worker, smtp_server: ServerFactory
) -> None:
    refused = cli(queue_env, "send", "--account", "nope", "--to", "a@example.net", "--text", "x")
    assert refused.returncode == 2
    assert "refused: invalid payload: account: unknown account 'nope'" in refused.stderr
    bad = cli(queue_env, "send", "--account", "nope", "--to", "a@example.net", "--header", "X-A: 1\nBcc: b")
    assert bad.returncode == 2 and "CR/LF" in bad.stderr

    server = smtp_server(mode="plain")
    account = queue_env.account(unique("cli"), server)
    done = cli(
        queue_env, "send", "--account", account, "--to", "a@example.net", "--subject", "CLI",
        "--text", "from the shell", "--wait", "30", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "sent" and job["recipients"]["a@example.net"]["status"] == "sent"
    assert server.received[0].message["Subject"] == "CLI"
    # the --original-* options build the original; an empty return path is a bounce's, kept
    reply = cli(
        queue_env, "send", "--kind", "auto-reply", "--account", account, "--text", "Away",
        "--original-from", "bob@example.net", "--original-subject", "Hello",
        "--original-message-id", "<m1@example.net>", "--original-return-path", "", "--wait", "30", "--json",
    )  # fmt: skip
    assert json.loads(reply.stdout)["state"] == "suppressed", reply.stdout + reply.stderr
    assert "empty return path" in json.loads(reply.stdout)["last_error"]


# ---- secrets --------------------------------------------------------------------------------


def test_secrets_never_reach_payloads_records_results_or_logs(live: Live, pki: Pki) -> None:
    queue_env, worker, producer, smtp_server = live
    server = smtp_server(mode="starttls", auth_required=True)
    good, bad = queue_env.password_accounts(server, pki.ca_cert)

    sent = finished(producer, producer.send_notification(good, ["a@example.net"], "Hi", "x"))
    assert sent.state == "sent" and sent.security is not None and sent.security.startswith("STARTTLS TLSv1.")
    assert server.received[0].auth_user == "user@example.com"
    dead = finished(producer, producer.send_notification(bad, ["a@example.net"], "Hi", "x"))
    assert dead.state == "dead" and dead.attempts == 1
    assert dead.last_error is not None and "535" in dead.last_error

    shown = [
        json.dumps(sent.as_dict(with_payload=True)),
        json.dumps(dead.as_dict(with_payload=True)),
        cli(queue_env, "job", dead.id, "--json").stdout,
        cli(queue_env, "dead-letters", "show", dead.id, "--json").stdout,
        "\n".join(str(v) for k in queue_env.redis.keys("*") for v in _redis_values(queue_env, str(k))),
        worker.log(),
    ]
    for text in shown:
        assert PASSWORD not in text and WRONG_PASSWORD not in text


def _redis_values(env: QueueEnv, key: str) -> list[Any]:
    kind = env.redis.type(key)
    if kind == "hash":
        return list(env.redis.hgetall(key).items())
    if kind == "string":
        return [env.redis.get(key)]
    if kind == "zset":
        return list(env.redis.zrange(key, 0, -1))
    if kind == "list":
        return list(env.redis.lrange(key, 0, -1))
    return []


# ---- batch jobs -----------------------------------------------------------------------------


def test_a_batch_gives_every_message_its_own_fate(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    later = Rule("RCPT", 451, "4.3.0 Try later", match="later", times=1)
    server = smtp_server(mode="plain", rules=[unknown_user("bad"), later])
    account = queue_env.account(unique("batch"), server)
    to = ["good@example.net", "bad@example.net", "later@example.net", "also-good@example.net"]
    job_ids = producer.send_batch(
        [{"account": account, "to": [rcpt], "subject": f"to {rcpt}", "text": "x"} for rcpt in to]
    )
    assert len(set(job_ids)) == 4
    jobs = dict(zip(to, (finished(producer, j) for j in job_ids), strict=True))
    assert {rcpt: (job.state, job.attempts) for rcpt, job in jobs.items()} == {
        "good@example.net": ("sent", 1),
        "bad@example.net": ("dead", 1),
        "later@example.net": ("sent", 2),
        "also-good@example.net": ("sent", 1),
    }
    assert len({job.message_id for job in jobs.values()}) == 4
    time.sleep(0.5)
    got = sorted(r.rcpt_tos[0] for r in server.received)
    assert got == ["also-good@example.net", "good@example.net", "later@example.net"]  # each exactly once
    dead_ids = [r["id"] for r in json.loads(cli(queue_env, "dead-letters", "list", "--json").stdout)]
    assert jobs["bad@example.net"].id in dead_ids and jobs["good@example.net"].id not in dead_ids


def test_a_batch_with_one_bad_message_is_refused_whole(
    queue_env: QueueEnv, producer: Producer, smtp_server: ServerFactory
) -> None:
    account = queue_env.account(unique("badbatch"), smtp_server(mode="plain"))
    jobs_before = len(queue_env.redis.keys("postroom:job:*"))
    ok = {"account": account, "to": ["a@example.net"], "text": "x"}
    with pytest.raises(PayloadError, match=r"messages\[1\]\.to\[0\]"):
        producer.send_batch([ok, {**ok, "to": ["nope"]}])
    assert len(queue_env.redis.keys("postroom:job:*")) == jobs_before


def test_a_raw_batch_without_job_ids_is_delivered(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("rawbatch"), server)
    messages = [{"account": account, "to": [f"r{i}@example.net"], "text": "x"} for i in range(3)]
    batch_id = send_task(queue_env, "postroom.send_batch", {"messages": messages})
    jobs = [finished(producer, f"{batch_id}-{i}") for i in range(3)]
    assert [job.state for job in jobs] == ["sent"] * 3
    assert sorted(r.message["Message-ID"] for r in server.received) == sorted(
        j.message_id or "" for j in jobs
    )


def test_a_slow_server_does_not_hold_up_other_sends_of_the_same_worker_process(live: Live) -> None:
    queue_env, worker, producer, smtp_server = live
    slow = smtp_server(mode="plain", stall_mail_after=0, stall_seconds=3)
    fast = smtp_server(mode="plain")
    slow_account = queue_env.account(unique("slow"), slow)
    fast_account = queue_env.account(unique("fast"), fast)
    slow_job = producer.send_notification(slow_account, ["a@example.net"], "slow", "x")
    wait_for(slow.stalled.is_set, 10, "the slow server to stall", worker)
    started = time.monotonic()
    fast_job = finished(producer, producer.send_notification(fast_account, ["b@example.net"], "fast", "x"))
    assert fast_job.state == "sent" and time.monotonic() - started < 2.5
    assert slow.received == []  # still waiting on the slow server meanwhile
    assert finished(producer, slow_job).state == "sent"


def test_a_raw_producer_reusing_an_idempotency_key_sends_once(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("rawidem"), server)
    payload = {"account": account, "to": ["a@example.net"], "text": "x", "idempotency_key": "invoice-7"}
    first = send_task(queue_env, "postroom.send", payload)
    assert finished(producer, first).state == "sent"
    duplicate = finished(producer, send_task(queue_env, "postroom.send", payload))
    assert duplicate.state == "suppressed" and f"duplicate of job {first}" in (duplicate.last_error or "")
    assert len(server.received) == 1


def test_a_redis_that_lost_its_scripts_gets_them_again(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("noscript"), server)
    queue_env.redis.script_flush()  # as after a Redis restart
    single = finished(producer, producer.send_notification(account, ["a@example.net"], "one", "x"))
    queue_env.redis.script_flush()
    batch = [
        finished(producer, j) for j in producer.send_batch([{"account": account, "to": ["b@example.net"]}])
    ]
    assert single.state == "sent" and [j.state for j in batch] == ["sent"]
    assert len(server.received) == 2
