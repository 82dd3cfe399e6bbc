"""A worker SIGKILLed in the middle of a batch: nothing lost, nothing sent twice (contract §4)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from support.queue import QueueEnv, Worker, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.records.loader import Records

BATCH = 1000
KILL_AFTER = 300


def test_sigkill_mid_batch_loses_nothing_and_sends_nothing_twice(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # The server stalls once at MAIL; the worker is killed while it waits there.
    # (A kill between the server's 250 and the sent mark is the documented
    # duplicate window; with one process stalled at MAIL nothing is inside it.)
    # One connection: the worker carries many jobs at once (worker/queue/pipeline/dispatch.py), and with a
    # single connection their sends still go one after another, so the kill lands at MAIL.
    server = smtp_server(mode="plain", stall_mail_after=KILL_AFTER, stall_seconds=30)
    account = own_queue.account("batch", server, limits={"max_connections": 1})
    records = Records.load(own_queue.accounts, own_queue.config)
    producer = Producer(own_queue.broker_url, records=records)
    first = Worker(own_queue, tmp_path / "worker-1.log", concurrency=1).start()
    second = Worker(own_queue, tmp_path / "worker-2.log", concurrency=1)
    try:
        job_ids = [
            producer.send_notification(account, [f"r{i}@example.net"], f"batch {i}", "x")
            for i in range(BATCH)
        ]
        wait_for(server.stalled.is_set, 60, "the batch to reach the stall", first)
        # the next MAIL goes out right after a DATA's 250, and the sent mark a moment later (marks
        # are gathered for a few ms): wait for the marks, so the kill lands at MAIL alone
        marks = f"postroom:delivered:{account}:*"
        wait_for(lambda: len(own_queue.redis.keys(marks)) >= KILL_AFTER, 10, "the sent marks", first)
        first.kill()
        assert len(server.received) == KILL_AFTER
        second.start()
        wait_for(lambda: len(server.received) >= BATCH, 90, "every message after the restart", second)
        wait_for(
            lambda: all((job := producer.job(j)) is not None and job.state == "sent" for j in job_ids),
            30,
            "every job to be marked sent",
            second,
        )
    finally:
        first.stop()
        second.stop()
        producer.close()
    counts = Counter(r.message["Message-ID"] for r in server.received)
    assert len(counts) == BATCH, "a message was lost"
    assert [mid for mid, n in counts.items() if n > 1] == [], "a message was sent twice"
    assert own_queue.queue_length() == 0
