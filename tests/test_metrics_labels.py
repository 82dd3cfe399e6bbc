"""Metrics labels only for accounts that exist: a real Redis, the counters written the way the
worker writes them (JobStore.finish), and a scrape of a real ``postroom metrics`` endpoint."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.queue import QueueEnv, unique
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.db.keys import PREFIX
from worker.ops.health import AccountHealth
from worker.queue.store.jobs import JobStore
from worker.web import metrics
from worker.web.status import Status

UNKNOWN = "(unknown)"  # the one label of every name that is not an existing account
HOSTILE = ["nope", "?", "x" * 100_000, "a\x00b", "a|b|c", "ünïcode", ""]


def scrape(own_queue: QueueEnv, producer: Producer) -> dict[str, list[Any]]:
    def snapshot() -> Status:
        return Status(producer.store, AccountHealth(producer.store.redis), producer.records(fresh=True))

    server, thread = metrics.serve(0, snapshot)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_only_existing_accounts_get_a_label(
    own_queue: QueueEnv, smtp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: SmtpServer = smtp_server(mode="plain")
    real = own_queue.account(unique("real"), server)
    gone = own_queue.account(unique("gone"), server)
    store = JobStore(own_queue.redis)
    for name in [real, gone, *HOSTILE]:
        for outcome in ("sent", "dead"):
            store.finish(unique("job"), name, state=outcome, attempt=1, transport="smtp", latency=0.2)
    (own_queue.accounts / f"{gone}.yaml").unlink()  # its counts stay; its label goes
    # nothing a producer wrote became a Redis field or key of its own
    client = own_queue.redis
    fields = {*client.hkeys(PREFIX + "m:deliveries"), *client.hkeys(PREFIX + "m:attempts")}
    assert not [f for f in fields if any(h in f for h in ("?", "\x00", "x" * 100, "ü"))], fields
    assert not [k for k in client.scan_iter(f"{PREFIX}w:*") if "\x00" in k or "x" * 100 in k]

    producer = Producer(own_queue.broker_url, accounts_dir=own_queue.accounts, config_dir=own_queue.config)
    try:
        families = scrape(own_queue, producer)
    finally:
        producer.close()
    deliveries = families["postroom_deliveries"]
    labels = {sample.labels["account"] for sample in deliveries}
    assert labels == {real, UNKNOWN}, labels
    unknown_sent = sum(
        s.value
        for s in deliveries
        if s.labels["account"] == UNKNOWN and s.labels["outcome"] == "sent" and s.name.endswith("_total")
    )
    assert unknown_sent == len(HOSTILE) + 1  # every other name's attempt, the removed account's too
    ended = families["postroom_attempts"]
    attempts = {s.labels["account"]: s.value for s in ended if s.name.endswith("_total")}
    assert attempts == {real: 2.0, UNKNOWN: 2.0 * (len(HOSTILE) + 1)}
    for family, samples in families.items():
        for sample in samples:
            assert sample.labels.get("account", real) in (real, UNKNOWN), (family, sample)
