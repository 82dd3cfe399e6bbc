"""Nothing a producer puts on the queue stalls it, loses jobs or crosses into other accounts.

Every test pushes hostile entries straight into kombu's Redis list, between
good jobs, and runs a real worker on it: the worker must stay up, every good
job must be delivered exactly once, every hostile entry must end in the dead
letters with its reason, and nothing may stay behind in the queue.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.envelopes import celery_headers, envelope, push, send_kwargs
from support.queue import QueueEnv, Worker, cli, finished, wait_for
from support.smtpd import Rule, SmtpServer
from worker.client import Producer
from worker.queue.broker.kombu_redis import BrokerKeys
from worker.queue.store.jobs import JobStore


@pytest.fixture
def mail(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer]
) -> Iterator[tuple[SmtpServer, Producer]]:
    server = smtp_server(mode="plain")
    own_queue.account("tenant", server)
    producer = own_queue.producer()
    yield server, producer
    producer.close()


def good(producer: Producer, n: int, tag: str) -> list[str]:
    return [
        producer.send_notification("tenant", [f"{tag}{i}@example.net"], f"{tag}-{i}", "ok") for i in range(n)
    ]


def valid_kwargs(**overrides: Any) -> dict[str, Any]:
    return {"account": "tenant", "to": ["raw@example.net"], "subject": "raw", "text": "t", **overrides}


def drained(env: QueueEnv) -> bool:
    keys = BrokerKeys()
    return (
        all(env.redis.llen(q) == 0 for q in keys.queue_lists("postroom"))
        and env.redis.hlen(keys.unacked) == 0
    )


def dead_reasons(env: QueueEnv) -> list[str]:
    return [str(row["error"]) for row in JobStore(env.redis).dead_letters()]


# (entry, what its dead letter's reason says)
UNREADABLE: list[tuple[str, bytes, str]] = [
    ("body [1, 2]", envelope([1, 2]), "body is not [args, kwargs, embed]"),
    ("not JSON", b"this is {not json", "not JSON"),
    ("a JSON list, not an envelope", b"[1, 2, 3]", "not a kombu message"),
    ("no delivery tag", envelope(properties={"delivery_info": {"exchange": "", "routing_key": "postroom"}}),
     "no delivery tag"),
    ("body not base64", envelope(encoded_body="%%%not-base64%%%"), "base64"),
    ("no id header", envelope(headers={k: v for k, v in celery_headers().items() if k != "id"}), "task id"),
    ("an id with spaces and >", envelope(headers=celery_headers(task_id="a b>c")), "task id"),
    ("headers a list", envelope(headers=[1, 2]), "headers"),
    ("no task name", envelope(headers={"id": str(uuid.uuid4())}), "no task name"),
    ("unknown task", envelope(headers=celery_headers(task="evil.task")), "unknown task 'evil.task'"),
    ("kwargs a list", envelope([[], [1], {}]), "kwargs"),
    ("positional args to postroom.send", envelope([["x"], {}, {}]), "arguments do not fit"),
    ("eta that is no time", envelope(headers=celery_headers(eta="tomorrow")), "eta"),
    ("an expiry (Celery drops it unseen)", envelope(headers=celery_headers(expires="2000-01-01T00:00:00")),
     "does not take an expiry"),
    ("timelimit not a pair", envelope(headers=celery_headers(timelimit="forever")), "timelimit"),
    ("pickle content", envelope(content_type="application/x-python-serialize"), "content type"),
    ("body nested 100,000 deep", envelope(raw_body=b"[" * 100_000 + b"]" * 100_000), "body"),
    ("a callback", envelope([[], {}, {"callbacks": [{"task": "x"}]}]), "callbacks"),
    ("batch messages not a list", envelope([[], {"messages": 7}, {}], headers=celery_headers(
        task="postroom.send_batch")), "messages is a int"),
]  # fmt: skip


def test_unreadable_entries_go_to_the_dead_letters_and_every_good_job_is_delivered_once(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path
) -> None:
    server, producer = mail
    ids = good(producer, 3, "before")
    for _, entry, _ in UNREADABLE:
        push(own_queue.redis, entry)
        ids += good(producer, 1, "between")
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        for job_id in ids:
            assert finished(producer, job_id).state == "sent"
        wait_for(lambda: drained(own_queue), 30, "the queue to drain", worker)
        wait_for(lambda: len(dead_reasons(own_queue)) >= len(UNREADABLE), 30, "the dead letters", worker)
        assert worker.alive(), worker.log()[-3000:]
    finally:
        worker.stop()
    sent = Counter(m.message["Message-ID"] for m in server.received)
    assert len(sent) == len(ids) and set(sent.values()) == {1}
    reasons = dead_reasons(own_queue)
    assert len(reasons) == len(UNREADABLE), reasons
    for what, _, expected in UNREADABLE:
        assert any(expected in r for r in reasons), (what, expected, reasons)
    assert "Unrecoverable error" not in worker.log()
    # an entry with a usable id keeps it: `postroom job <the producer's id>` tells what happened
    _, body_12, _ = UNREADABLE[0]
    kept = producer.job(json.loads(body_12)["headers"]["id"])
    assert kept is not None and kept.state == "dead" and kept.unreadable is not None
    assert "body is not [args, kwargs, embed]" in (kept.last_error or "")


def test_an_unreadable_dead_letter_keeps_its_raw_bytes_and_is_listed_shown_and_purged(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path
) -> None:
    entry = b"\x00\xffnot a message" * 10_000  # 140 kB: kept up to the cap
    push(own_queue.redis, entry)
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        wait_for(lambda: dead_reasons(own_queue), 30, "the dead letter", worker)
        assert worker.alive()
    finally:
        worker.stop()
    listed = json.loads(cli(own_queue, "dead-letters", "list", "--json").stdout)
    (row,) = listed
    assert row["id"].startswith("unreadable-") and "unreadable message: not JSON" in row["error"]
    shown = cli(own_queue, "dead-letters", "show", row["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    unreadable = json.loads(shown.stdout)["unreadable"]
    assert unreadable["size"] == len(entry) and unreadable["queue"] == "postroom"
    kept = base64.b64decode(unreadable["base64"])
    assert entry.startswith(kept) and 0 < len(kept) == unreadable["kept"] < len(entry)
    text = cli(own_queue, "dead-letters", "show", row["id"]).stdout
    assert f"unreadable message: {len(entry)} bytes from queue postroom" in text and "raw (base64): " in text
    retried = cli(own_queue, "dead-letters", "retry", row["id"])
    assert retried.returncode == 1 and "unreadable message: nothing to retry" in retried.stderr
    assert json.loads(cli(own_queue, "dead-letters", "purge", "--json").stdout) == {"purged": 1}


# (payload kwargs, what the dead letter's reason says)
INVALID_PAYLOADS: list[tuple[dict[str, Any], str]] = [
    (valid_kwargs(enqueued_at="x"), "enqueued_at"),
    (valid_kwargs(enqueued_at=1e300), "enqueued_at"),
    (valid_kwargs(account="nope\x00" + "x" * 100_000), "account"),
    (valid_kwargs(to="not-a-list"), "to"),
    (valid_kwargs(subject="bell\x07"), "subject"),
    ({"junk": [[[[[[]]]]]]}, "account"),
]


def test_invalid_payloads_are_dead_lettered_under_their_own_id_without_touching_their_neighbours(
    own_queue: QueueEnv, mail: tuple[SmtpServer, Producer], tmp_path: Path
) -> None:
    server, producer = mail
    raw_ids = [str(uuid.uuid4()) for _ in INVALID_PAYLOADS]
    for job_id, (kwargs, _) in zip(raw_ids, INVALID_PAYLOADS, strict=True):
        push(own_queue.redis, send_kwargs(kwargs, task_id=job_id))
    raw_good, nowhere = str(uuid.uuid4()), str(uuid.uuid4())
    push(own_queue.redis, send_kwargs(valid_kwargs(subject="raw good"), task_id=raw_good))
    push(own_queue.redis, send_kwargs(valid_kwargs(account="nope"), task_id=nowhere))  # no such record
    batch = producer.send_batch([valid_kwargs(subject="batch a"), valid_kwargs(subject="batch b")])
    # a raw batch with one item that is not an object: the two beside it still go out
    items = [valid_kwargs(subject="rb 0"), 17, valid_kwargs(subject="rb 2")]
    raw_batch = envelope([[], {"messages": items}, {}], headers=celery_headers(task="postroom.send_batch"))
    batch_id = json.loads(raw_batch)["headers"]["id"]
    push(own_queue.redis, raw_batch)
    ids = good(producer, 6, "neighbour")
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        for job_id in [*ids, *batch, raw_good, f"{batch_id}-0", f"{batch_id}-2"]:
            assert finished(producer, job_id).state == "sent", job_id
        for job_id, (_, expected) in zip(raw_ids, INVALID_PAYLOADS, strict=True):
            job = finished(producer, job_id)
            assert job.state == "dead" and "invalid payload" in (job.last_error or ""), job
            assert expected in (job.last_error or ""), job
            assert len(job.account) <= 64 and "\x00" not in job.account
        assert finished(producer, nowhere).state == "dead"
        bad_item = finished(producer, f"{batch_id}-1")
        assert bad_item.state == "dead" and "invalid payload" in (bad_item.last_error or "")
        wait_for(lambda: drained(own_queue), 30, "the queue to drain", worker)
        assert worker.alive()
    finally:
        worker.stop()
    subjects = Counter(m.message["Subject"] for m in server.received)
    assert set(subjects.values()) == {1}
    assert {"raw good", "batch a", "batch b", "rb 0", "rb 2"} <= set(subjects)
    # no producer-written name becomes a key: what no record has is counted as (unknown)
    assert set(own_queue.redis.keys("postroom:stats:*")) == {
        "postroom:stats:tenant",
        "postroom:stats:(unknown)",
    }
    assert not [k for k in own_queue.redis.keys("postroom:*") if "nope" in k or "\x00" in k]


def test_message_ids_and_sent_marks_are_scoped_per_account(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    own_queue.account("alpha", server)
    own_queue.account("beta", server)
    producer = own_queue.producer()
    shared = f"<{uuid.uuid4().hex}@example.com>"
    legacy = f"<{uuid.uuid4().hex}@example.com>"
    # a sent mark from before the per-account keys (global) is honoured until it expires
    own_queue.redis.hset(f"postroom:delivered:{legacy}", "old@example.net", json.dumps({"status": "sent"}))
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        first = producer.enqueue({"account": "alpha", "to": ["a@example.net"], "subject": "A", "text": "t",
                                  "message_id": shared})  # fmt: skip
        assert finished(producer, first).state == "sent"
        second = producer.enqueue({"account": "beta", "to": ["a@example.net"], "subject": "B", "text": "t",
                                   "message_id": shared})  # fmt: skip
        job = finished(producer, second)
        assert job.state == "sent" and "duplicate" not in (job.last_error or ""), job
        old = producer.enqueue({"account": "alpha", "to": ["old@example.net"], "subject": "old", "text": "t",
                                "message_id": legacy})  # fmt: skip
        assert "already delivered" in (finished(producer, old).last_error or "")
    finally:
        worker.stop()
        producer.close()
    assert sorted(m.message["Subject"] for m in server.received) == ["A", "B"]
    assert (
        own_queue.redis.exists(f"postroom:delivered:alpha:{shared}", f"postroom:delivered:beta:{shared}") == 2
    )


def test_a_permanent_refusal_is_not_rewritten_by_the_time_limit_of_its_batch(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    refusing = smtp_server(mode="plain", rules=[Rule("RCPT", 550, "5.1.1 no such user")])
    stalling = smtp_server(mode="plain", stall_mail_after=0, stall_seconds=30)
    own_queue.account("refusing", refusing)
    own_queue.account("stalling", stalling)
    producer = own_queue.producer()
    ids = producer.send_batch(
        [
            {"account": "refusing", "to": ["gone@example.net"], "subject": "r", "text": "t"},
            {"account": "stalling", "to": ["slow@example.net"], "subject": "s", "text": "t"},
        ]
    )
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    try:
        refused = finished(producer, ids[0], timeout=30)
        wait_for(lambda: (producer.job(ids[1]) or refused).state != "sending", 30, "the stalled one", worker)
    finally:
        worker.stop()
        producer.close()
    assert refused.state == "dead" and "550" in (refused.last_error or ""), refused
    assert "timed out" not in (refused.last_error or "")


def test_a_job_is_never_held_for_an_account_that_was_resumed(own_queue: QueueEnv) -> None:
    from worker.ops.health import AccountHealth

    store, health = JobStore(own_queue.redis), AccountHealth(own_queue.redis)
    kwargs = valid_kwargs()
    assert not store.hold_if_paused("j-1", "tenant", kwargs, "paused")  # not paused: deliver it now
    assert own_queue.redis.llen("postroom:held:tenant") == 0
    health.pause("tenant", "test", by="operator")
    assert store.hold_if_paused("j-2", "tenant", kwargs, "paused")
    assert own_queue.redis.hget("postroom:job:j-2", "state") == "held"
    released: list[str] = []
    health.release = lambda job_id, _: released.append(job_id)
    assert health.resume("tenant") == 1 and released == ["j-2"]
    assert not store.hold_if_paused("j-3", "tenant", kwargs, "paused")  # resumed in between


def test_broker_key_names_follow_the_transport_options() -> None:
    keys = BrokerKeys.from_options({"global_keyprefix": "pfx:", "unacked_key": "ua"})
    assert keys.unacked == "pfx:ua" and keys.unacked_index == "pfx:unacked_index"
    assert keys.queue_lists("postroom") == ["pfx:postroom", *(f"pfx:postroom\x06\x16{p}" for p in (3, 6, 9))]
    assert BrokerKeys.from_options(None).queue_lists("q")[0] == "q"


def test_the_sweep_lock_is_released_only_by_its_holder(own_queue: QueueEnv) -> None:
    from worker.queue.process.sweep import LOCK, Sweeper

    sweeper = Sweeper(own_queue.redis, lambda *_: None)

    def outlived(now: float, report: Any) -> None:  # our lock lapsed and another sweep took it
        own_queue.redis.set(LOCK, "another sweep", ex=60)

    sweeper._run = outlived  # type: ignore[method-assign]
    sweeper.run(time.time())
    assert own_queue.redis.get(LOCK) == "another sweep"
