"""The Prometheus view of Postroom: read from Redis at every scrape.

The collector reads the counters of :mod:`worker.ops.counters` and the operator
status (:mod:`worker.web.status`) when scraped; there is no per-process registry
to aggregate, so one ``postroom metrics`` endpoint shows every worker. Only
accounts whose record exists get an ``account`` label of their own: counts
under any other name (a producer's typo, a removed account, garbage) are summed
under ``account="(unknown)"``, so the label set is bounded by the records.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, cast

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker.db.keys import PREFIX
from worker.ops.counters import LATENCY_BUCKETS, UNKNOWN, account_label
from worker.queue.store.ready import ReadyQueues
from worker.web.status import ACCOUNT_STATES

_WORD = re.compile(r"[a-z0-9_-]{1,32}")


def _word(value: str) -> str:
    """A transport or outcome label as Postroom writes them (``smtp``, ``sent``); anything else
    found in the hash is one label, so that it cannot widen the metric either."""
    return value if _WORD.fullmatch(value) else UNKNOWN


class RedisCollector(Collector):
    """Reads Postroom's counters and the operator status from Redis on every scrape."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot  # () -> worker.web.status.Status, built per scrape

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot()
        client: redis.Redis = status.redis
        known = set(status.account_names)  # only accounts whose record exists get a label
        delivered: defaultdict[tuple[str, str, str], float] = defaultdict(float)
        for field, value in cast(dict[str, str], client.hgetall(PREFIX + "m:deliveries")).items():
            account, transport, outcome = field.rsplit("|", 2) if field.count("|") >= 2 else (field, "", "")
            delivered[account_label(account, known), _word(transport), _word(outcome)] += float(value)
        deliveries = CounterMetricFamily(
            "postroom_deliveries", "Delivery attempts by outcome", labels=["account", "transport", "outcome"]
        )
        for labels, total in sorted(delivered.items()):
            deliveries.add_metric(list(labels), total)
        yield deliveries
        ended: defaultdict[str, float] = defaultdict(float)
        for account, value in cast(dict[str, str], client.hgetall(PREFIX + "m:attempts")).items():
            ended[account_label(account, known)] += float(value)
        attempts = CounterMetricFamily("postroom_attempts", "Delivery attempts ended", labels=["account"])
        for account, total in sorted(ended.items()):
            attempts.add_metric([account], total)
        yield attempts
        latency = HistogramMetricFamily(
            "postroom_delivery_latency_seconds",
            "Time from enqueue to acceptance by the server",
            labels=["account"],
        )
        for account in status.account_names:
            fields = cast(dict[str, str], client.hgetall(f"{PREFIX}m:latency:{account}"))
            if not fields:
                continue
            running, buckets = 0.0, []
            for bound in (*(repr(b) for b in LATENCY_BUCKETS), "+Inf"):
                running += float(fields.get(bound, 0))
                buckets.append((bound, running))
            latency.add_metric([account], buckets, float(fields.get("sum", 0)))
        yield latency

        data = status.as_dict()
        depth = GaugeMetricFamily("postroom_queue_depth", "Jobs waiting in a queue", labels=["queue"])
        for queue, count in data["queues"].items():
            depth.add_metric([queue], count)
        yield depth
        yield _oldest_family(ReadyQueues(client).oldest_due(), known, data["generated_at"])
        yield GaugeMetricFamily(
            "postroom_in_flight", "Jobs taken by workers, not yet done", value=data["in_flight"]
        )
        yield GaugeMetricFamily("postroom_retrying", "Jobs waiting for a retry", value=data["retrying"])
        yield GaugeMetricFamily(
            "postroom_dead_letters", "Jobs in the dead letters", value=data["dead_letters"]
        )
        yield from _account_families(data["accounts"])
        yield from _webhook_families(data["webhooks"])


def _oldest_family(due: dict[str, float], known: set[str], now: float) -> Metric:
    """Per account, how long its longest-waiting ready job has waited for a worker (0 for an
    account with none waiting: the series stays, so an alert on it resolves instead of
    vanishing); accounts without a record fold into one ``(unknown)`` series, the longest wait."""
    waited: dict[str, float] = dict.fromkeys(known, 0.0)
    for account, since in due.items():
        label = account_label(account, known)
        waited[label] = max(waited.get(label, 0.0), max(0.0, now - since))
    family = GaugeMetricFamily(
        "postroom_oldest_ready_job_age_seconds",
        "Seconds the account's oldest job due now has waited for a worker",
        labels=["account"],
    )
    for account, seconds in sorted(waited.items()):
        family.add_metric([account], round(seconds, 3))
    return family


def _account_families(accounts: dict[str, Any]) -> Iterator[Metric]:
    """The per-account gauges of one snapshot."""
    state = GaugeMetricFamily(
        "postroom_account_state", "1 for the account's current state", labels=["account", "state"]
    )
    held = GaugeMetricFamily(
        "postroom_account_held_jobs", "Jobs held for a paused account", labels=["account"]
    )
    suppressed = GaugeMetricFamily(
        "postroom_account_suppressed_addresses",
        "Addresses on the account's suppression list",
        labels=["account"],
    )
    last_ok = GaugeMetricFamily(
        "postroom_account_last_health_success_timestamp_seconds",
        "When the account last passed a health check",
        labels=["account"],
    )
    last_check = GaugeMetricFamily(
        "postroom_account_last_health_check_timestamp_seconds",
        "When the account was last checked, whatever the check found",
        labels=["account"],
    )
    healthy = GaugeMetricFamily(
        "postroom_account_healthy", "1 when the last check passed", labels=["account"]
    )
    expiry = GaugeMetricFamily(
        "postroom_certificate_expiry_timestamp_seconds",
        "Expiry of a certificate the account depends on",
        labels=["account", "certificate"],
    )
    reports = CounterMetricFamily(
        "postroom_account_reports",
        "Messages the bounce reader read in the account's mailbox, by what they were",
        labels=["account", "kind"],
    )
    for name, info in accounts.items():
        for kind, count in sorted((info.get("reports") or {}).items()):
            reports.add_metric([name, kind], count)
        for candidate in ACCOUNT_STATES:
            state.add_metric([name, candidate], 1.0 if info["state"] == candidate else 0.0)
        held.add_metric([name], info["held"])
        suppressed.add_metric([name], info.get("suppressed", 0))
        if info.get("last_success_at"):
            last_ok.add_metric([name], info["last_success_at"])
        if info.get("last_check_at"):
            last_check.add_metric([name], info["last_check_at"])
        health = info.get("health")
        if health is not None:
            healthy.add_metric([name], 1.0 if health.get("ok") else 0.0)
        for label, when in info.get("certificates", {}).items():
            expiry.add_metric([name, label], when)
    yield from (state, held, suppressed, last_ok, last_check, healthy, expiry, reports)


def serve(port: int, snapshot: Any, host: str = "127.0.0.1") -> Any:
    """Start the Prometheus endpoint in a background thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(snapshot))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread


def _webhook_families(webhooks: dict[str, dict[str, int]]) -> Iterator[Metric]:
    pending = GaugeMetricFamily(
        "postroom_webhook_pending_deliveries",
        "Webhook deliveries not yet taken by the receiver",
        labels=["webhook"],
    )
    done = CounterMetricFamily(
        "postroom_webhook_deliveries", "Webhook deliveries by outcome", labels=["webhook", "outcome"]
    )
    for name, stats in webhooks.items():
        pending.add_metric([name], stats["pending"])
        done.add_metric([name, "delivered"], stats["delivered"])
        done.add_metric([name, "failed_attempt"], stats["failed_attempts"])
        done.add_metric([name, "given_up"], stats["given_up"])
    yield from (pending, done)
