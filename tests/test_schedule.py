"""Scheduled sends (contract §2 ``send_at``): kept in Postroom's delay queue, sent at their time
and not before, across a SIGKILLed worker; ``postroom cancel`` and ``DELETE /v1/jobs/{id}``."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from support.queue import Live, QueueEnv, Worker, cli, finished, unique, wait_for
from support.smtpd import SmtpServer, unknown_user
from support.web import write_key
from worker.client import PayloadError, Producer
from worker.queue.store.jobrecord import SCHEDULED

ServerFactory = Callable[..., SmtpServer]


def test_a_scheduled_job_waits_for_its_time_then_is_sent_once(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("at"), server)
    due = time.time() + 6  # the CLI calls below may take seconds each on a loaded machine
    iso = datetime.fromtimestamp(due, UTC).isoformat()  # ISO 8601 with an offset
    job_id = producer.send_notification(account, ["a@example.net"], "Later", "x", send_at=iso)
    job = producer.job(job_id)
    assert job is not None and job.state == "scheduled"
    assert json.loads(cli(queue_env, "status", "--json").stdout)["scheduled"] >= 1
    assert re.search(r"scheduled: [1-9]", cli(queue_env, "status").stdout)  # the text says so too
    while time.time() < due - 0.3:  # nothing before its time (however long the CLI above took)
        assert server.received == []
        time.sleep(0.1)
    sent = finished(producer, job_id, timeout=20)
    assert sent.state == "sent" and len(server.received) == 1
    assert server.received[0].at >= due - 0.05  # not before its time
    assert server.received[0].at < due + 5
    past = finished(producer, producer.send_notification(account, ["b@example.net"], "Now", "x", send_at=1.0))
    assert past.state == "sent"  # a time already past: sent at once


def test_bad_or_too_distant_send_at_is_refused(
    producer: Producer, queue_env: QueueEnv, smtp_server: ServerFactory
) -> None:
    account = queue_env.account(unique("atbad"), smtp_server(mode="plain"))
    for bad in ("tomorrow", "2026-12-24T09:00:00", True, float("nan"), time.time() + 91 * 86400):
        with pytest.raises(PayloadError, match="send_at"):
            producer.send_notification(account, ["a@example.net"], "x", "x", send_at=bad)


def test_cancel_before_the_time_by_cli_and_http(
    queue_env: QueueEnv,
    worker: Worker,
    producer: Producer,
    api: tuple[str, Producer],
    smtp_server: ServerFactory,
) -> None:
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("cancel"), server)
    later = time.time() + 4
    by_cli = producer.send_notification(account, ["a@example.net"], "Never", "x", send_at=later)
    done = cli(queue_env, "cancel", by_cli, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"id": by_cli, "cancelled": True, "state": "cancelled"}
    assert queue_env.redis.zscore(SCHEDULED, by_cli) is None
    assert cli(queue_env, "cancel", by_cli).returncode == 1  # ended already
    assert cli(queue_env, "cancel", "no-such-job").returncode == 1

    base, _ = api
    headers = {"Authorization": f"Bearer {write_key(queue_env, unique('k'), [account])}"}
    reply = httpx.post(
        f"{base}/v1/messages",
        headers=headers,
        json={"account": account, "to": ["b@example.net"], "text": "x", "send_at": time.time() + 30},
    )
    assert reply.status_code == 202, reply.text
    by_http = reply.json()["job_id"]
    cancelled = httpx.delete(f"{base}/v1/jobs/{by_http}", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert httpx.delete(f"{base}/v1/jobs/{by_http}", headers=headers).status_code == 409
    other = {"Authorization": f"Bearer {write_key(queue_env, unique('k'), [account])}"}
    assert httpx.delete(f"{base}/v1/jobs/{by_http}", headers=other).status_code == 404  # not its job

    sent = finished(producer, producer.send_notification(account, ["c@example.net"], "Sent", "x"))
    assert cli(queue_env, "cancel", sent.id).returncode == 1  # too late: it was sent
    time.sleep(max(0.0, later + 1.5 - time.time()))
    assert [r.message["Subject"] for r in server.received] == ["Sent"]  # the cancelled ones never went


def test_a_scheduled_job_survives_a_sigkilled_worker_and_an_early_copy(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account("kept", server)
    producer = Producer(own_queue.broker_url, accounts_dir=own_queue.accounts, config_dir=own_queue.config)
    first = Worker(own_queue, tmp_path / "worker-1.log").start()
    second = Worker(own_queue, tmp_path / "worker-2.log")
    try:
        due = time.time() + 6
        job_id = producer.send_notification(account, ["k@example.net"], "Kept", "x", send_at=due)
        job = producer.job(job_id)
        assert job is not None
        producer.republish(job_id, job.payload or {})  # ready early: a worker takes it before its time

        def taken_and_waiting_again() -> bool:
            # Taken off the ready set and put back to wait by the worker: the record says so too
            # (the schedule entry alone is no proof, the early copy never removed it).
            waiting = own_queue.redis.zscore("postroom:scheduled", job_id) is not None
            record = producer.job(job_id)
            back = record is not None and record.state == "scheduled"
            return own_queue.redis.zscore("postroom:ready:kept", job_id) is None and waiting and back

        wait_for(taken_and_waiting_again, 10, "the early copy to be taken", first)
        again = producer.job(job_id)
        assert again is not None and again.state == "scheduled" and server.received == []
        first.kill()
        second.start()
        sent = finished(producer, job_id, timeout=30)
        assert sent.state == "sent"
    finally:
        first.stop()
        second.stop()
        producer.close()
    assert len(server.received) == 1 and server.received[0].at >= due - 0.05


def test_job_shows_when_a_scheduled_job_is_due_and_who_cancelled_it(live: Live) -> None:
    queue_env, _, _, smtp_server = live
    account = queue_env.account(unique("due"), smtp_server(mode="plain"))
    due = time.time() + 600
    made = cli(queue_env, "send", "-a", account, "--to", "a@example.net", "--text", "x", "--at", str(due))
    assert made.returncode == 0, made.stderr
    job_id, _, said = made.stdout.strip().partition("  ")
    assert said.startswith("scheduled, due ") and said.endswith(("(in 9m)", "(in 10m)")), said
    as_json = json.loads(cli(queue_env, "job", job_id, "--json").stdout)
    assert as_json["state"] == "scheduled" and abs(as_json["due_at"] - due) < 0.01
    assert as_json["cancelled"] is None
    assert "due: " in cli(queue_env, "job", job_id).stdout
    made = cli(
        queue_env, "send", "-a", account, "--to", "a@example.net", "--text", "x", "--at", str(due), "--json"
    )
    assert abs(json.loads(made.stdout)["due_at"] - due) < 0.01

    assert cli(queue_env, "cancel", job_id).returncode == 0
    text = cli(queue_env, "job", job_id).stdout
    assert "last error" not in text and re.search(
        r"^cancelled at \S+ \S+ \S+ by postroom cancel$", text, re.M
    ), text
    cancelled = json.loads(cli(queue_env, "job", job_id, "--json").stdout)
    assert cancelled["cancelled"]["by"] == "postroom cancel" and cancelled["cancelled"]["at"] > due - 700
    assert (
        cancelled["last_error"] == "cancelled" and cancelled["due_at"] is None
    )  # the contract's key, as before


def test_send_wait_exit_status_tells_sent_dead_and_still_waiting_apart(live: Live) -> None:
    queue_env, _, _, smtp_server = live
    gone = unique("gone")
    server = smtp_server(mode="plain", rules=[unknown_user(f"{gone}@")])
    account = queue_env.account(unique("exit"), server)

    def send(name: str, to: str, wait: str, *more: str) -> int:
        return cli(queue_env, "send", "-a", name, "--to", to, "--text", "x", "--wait", wait, *more).returncode

    assert send(account, "a@example.net", "20") == 0  # sent
    assert send(account, f"{gone}@example.net", "20") == 1  # dead: a permanent refusal
    later = str(time.time() + 600)
    assert send(account, "b@example.net", "1", "--at", later) == 4  # not ended when the wait did
    help_text = cli(queue_env, "send", "--help").stdout
    assert "4 not ended" in help_text and "1 dead or" in help_text
