"""Cancelled means never sent (issue 28): cancel and the start of an attempt are one decision on
the job's record. Raced on purpose, many times over, on a real worker: right after enqueue, at a
scheduled job's due second, and for jobs held by a paused account that is then resumed. A job
whose cancel answered ``cancelled`` is never delivered and never gets a ``job.sent`` event; one
whose cancel lost the race is said to be under way and is sent."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.hookrecv import Receiver
from support.queue import QueueEnv, Worker, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.db.vocabulary import FINAL_STATES
from worker.ops.health import AccountHealth
from worker.records.webhooks import new_secret

TRIES = 50


class Race:
    """A worker, a server and a webhook receiver of their own; every cancel's answer kept."""

    def __init__(self, env: QueueEnv, server: SmtpServer, receiver: Receiver, worker: Worker) -> None:
        self.env, self.server, self.receiver, self.worker = env, server, receiver, worker
        self.producer = Producer(env.broker_url, accounts_dir=env.accounts, config_dir=env.config)
        self.answers: dict[str, tuple[bool, str]] = {}

    def cancel(self, job_id: str) -> None:
        self.answers[job_id] = self.producer.cancel(job_id, by="the race")

    def settle(self) -> None:
        """Every job ended, and the events and late sends of them had time to arrive."""

        def ended() -> bool:
            return all(
                (j := self.producer.job(i)) is not None and j.state in FINAL_STATES for i in self.answers
            )

        wait_for(ended, 60, "every job to end", self.worker)
        time.sleep(2.0)

    def check(self) -> tuple[int, int]:
        """(cancelled, sent): no cancelled job reached the server or got job.sent; the rest were sent."""
        delivered = {r.message["Message-ID"] for r in self.server.received}
        events: dict[str, set[str]] = {}
        for request in self.receiver.requests():
            events.setdefault(str(request["job_id"]), set()).add(str(request["type"]))
        cancelled = sent = 0
        for job_id, (done, state) in self.answers.items():
            job = self.producer.job(job_id)
            assert job is not None and job.message_id
            if done:
                cancelled += 1
                assert job.state == "cancelled", (job_id, job.state, job.history)
                assert job.message_id not in delivered, (
                    f"{job_id}: cancelled ({state} before), then delivered"
                )
                assert "job.sent" not in events.get(job_id, set()), f"{job_id}: cancelled, then job.sent"
            else:
                sent += 1
                assert state in ("sending", "sent"), (job_id, state)  # the answer said it was under way
                assert job.state == "sent" and job.message_id in delivered, (job_id, job.state)
        return cancelled, sent

    def close(self) -> None:
        self.producer.close()


@pytest.fixture
def race(own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path) -> Iterator[Race]:
    server = smtp_server(mode="plain")
    own_queue.account("race", server)
    secret = new_secret()
    receiver = Receiver(tmp_path / "hooks.jsonl", secret).start()
    folder = own_queue.config / "webhooks"
    folder.mkdir()
    (folder / "race.yaml").write_text(f"url: {receiver.url}\nsecret: {secret}\nallow_private: true\n")
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=4).start()
    made = Race(own_queue, server, receiver, worker)
    try:
        yield made
    finally:
        made.close()
        worker.stop()
        receiver.stop()


def enqueue(race: Race, **options: object) -> str:
    payload = {"account": "race", "to": ["a@example.net"], "subject": "race", "text": "x", **options}
    return race.producer.enqueue(payload)


def test_cancel_right_after_enqueue_never_lets_a_cancelled_job_go(race: Race) -> None:
    for _ in range(TRIES):
        race.cancel(enqueue(race))
    race.settle()
    cancelled, sent = race.check()
    assert cancelled + sent == TRIES


def test_cancel_at_the_due_second_never_lets_a_cancelled_job_go(race: Race) -> None:
    start = time.time() + 2.0
    due = {enqueue(race, send_at=start + i * 0.1): start + i * 0.1 for i in range(TRIES)}

    def cancel_each_when_due() -> None:
        for job_id, when in sorted(due.items(), key=lambda item: item[1]):
            time.sleep(max(0.0, when + random.uniform(-0.05, 0.3) - time.time()))
            race.cancel(job_id)

    canceller = threading.Thread(target=cancel_each_when_due)
    canceller.start()
    canceller.join(60)
    race.settle()
    cancelled, sent = race.check()
    assert cancelled + sent == TRIES


def test_a_held_job_cancelled_stays_cancelled_when_its_account_resumes(race: Race) -> None:
    health = AccountHealth(race.env.redis)
    health.pause("race", "the test pauses it", by="operator")
    time.sleep(1.2)  # a worker looks at the paused accounts once a second
    ids = [enqueue(race) for _ in range(TRIES)]
    wait_for(lambda: health.held_count("race") == TRIES, 30, "every job to be held", race.worker)
    for job_id in ids[::2]:
        race.cancel(job_id)
    health.release = race.producer.republish
    assert health.resume("race") == TRIES // 2  # only the jobs still held go back
    for job_id in ids[1::2]:
        race.answers[job_id] = (False, "sent")  # never cancelled: each must be sent
    race.settle()
    assert race.check() == (TRIES // 2, TRIES // 2)
