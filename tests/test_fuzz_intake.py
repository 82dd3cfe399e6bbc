"""Fuzzing the queue: random kwargs and random broker envelopes between good jobs.

Hypothesis builds hostile entries — random payloads, envelopes with a part
replaced by random JSON, random bytes — and they are pushed straight into
kombu's Redis list between jobs from the producer helper, with one real worker
running all along. The invariant, for every example: the worker process stays
up, every good job is delivered exactly once, every hostile entry ends as one
dead letter, and nothing stays in the queue. Bounded: a few examples, each
waited for at most 30 s, derandomised so CI runs the same examples each time.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.envelopes import celery_headers, envelope, push, send_kwargs
from support.queue import QueueEnv, Worker, finished, wait_for
from support.smtpd import SmtpServer
from worker.mail.payload import TASK_ID
from worker.queue.broker.kombu_redis import BrokerKeys
from worker.queue.store.jobs import JobStore

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["account", "kind", "to", "cc", "bcc", "subject", "text", "html", "attachments", "headers",
          "original", "idempotency_key", "message_id", "enqueued_at"]  # fmt: skip
OURS = {"postroom.send", "postroom.send_batch", "postroom.health_check", "postroom.sweep"}


def _iso(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


# A payload that is always invalid (an unknown field), whatever else it holds.
HOSTILE_KWARGS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=6).map(
    lambda d: {**d, "\x00not-a-field": 1}
)
# Header values that can never be right for that header.
BAD_HEADER = st.one_of(
    st.tuples(st.just("id"), JSON.filter(lambda v: not (isinstance(v, str) and TASK_ID.match(v)))),
    st.tuples(st.just("task"), JSON.filter(lambda v: not (isinstance(v, str) and v in OURS))),
    st.tuples(st.sampled_from(["eta", "expires"]), JSON.filter(lambda v: v is not None and not _iso(v))),
    st.tuples(st.just("timelimit"), JSON.filter(lambda v: v is not None and not _pair(v))),
    st.tuples(st.just("retries"), JSON.filter(lambda v: v is not None and not isinstance(v, int))),
    st.tuples(st.sampled_from(["shadow", "root_id", "parent_id", "group", "argsrepr", "origin"]),
              JSON.filter(lambda v: v is not None and not isinstance(v, str))),
    st.tuples(st.sampled_from(["stamped_headers", "stamps"]), st.integers() | st.text(max_size=5)),
)  # fmt: skip


def _with_header(item: tuple[str, Any]) -> bytes:
    name, value = item
    return envelope(headers=celery_headers(**{name: value}))


def _with_part(item: tuple[str, Any]) -> bytes:
    part, value = item
    message = json.loads(envelope())
    message[part] = value
    return json.dumps(message).encode()


ENTRIES = st.one_of(
    HOSTILE_KWARGS.map(send_kwargs),
    JSON.map(lambda body: envelope(body)),
    BAD_HEADER.map(_with_header),
    st.tuples(st.sampled_from(["properties", "headers", "body"]), JSON).map(_with_part),
    st.tuples(st.just("content-type"), st.text(max_size=20).filter(lambda t: t != "application/json")).map(
        _with_part
    ),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
)


def test_random_entries_never_stop_the_worker_or_touch_good_jobs(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    own_queue.account("tenant", server)
    producer = own_queue.producer()
    store = JobStore(own_queue.redis)
    keys = BrokerKeys()
    worker = Worker(own_queue, tmp_path / "worker.log").start()
    examples = 0

    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(entries=st.lists(ENTRIES, min_size=1, max_size=10))
    def one_example(entries: list[bytes]) -> None:
        nonlocal examples
        examples += 1
        dead_before = store.dead_count()
        received_before = len(server.received)
        tag = uuid.uuid4().hex[:8]
        ids = [producer.send_notification("tenant", [f"{tag}-0@example.net"], f"{tag} 0", "ok")]
        for i, entry in enumerate(entries, 1):
            push(own_queue.redis, entry)
            ids.append(producer.send_notification("tenant", [f"{tag}-{i}@example.net"], f"{tag} {i}", "ok"))
        for job_id in ids:
            assert finished(producer, job_id).state == "sent"
        wait_for(lambda: store.dead_count() - dead_before >= len(entries), 30, "dead letters", worker)
        wait_for(
            lambda: (
                all(own_queue.redis.llen(q) == 0 for q in keys.queue_lists("postroom"))
                and own_queue.redis.hlen(keys.unacked) == 0
            ),
            30,
            "the queue to drain",
            worker,
        )
        assert worker.alive(), worker.log()[-3000:]
        assert store.dead_count() - dead_before == len(entries), [r["error"] for r in store.dead_letters()]
        subjects = Counter(m.message["Subject"] for m in server.received[received_before:])
        assert sorted(subjects) == sorted(f"{tag} {i}" for i in range(len(ids)))
        assert set(subjects.values()) == {1}

    try:
        one_example()
    finally:
        worker.stop()
        producer.close()
    assert examples >= 3
    assert "Unrecoverable error" not in worker.log()
