"""The time series the dashboard draws: activity, delivery latency and queue depth over time.

Activity and latency come from the windows the delivery counters keep already
(worker/ops/counters.py: ``w:<account>:m:<minute>`` for two hours, ``w:<account>:h:<hour>``
for 26): sent / failed / retried per minute over the last hour and per hour over the last
day, and the latency histogram of the sends of that minute or hour (``lat:<bound>`` fields),
from which p50 and p95 are read the way Prometheus' ``histogram_quantile`` does.

Queue depth is sampled by every worker's upkeep once a minute (:func:`record_depth`) into
``series:depth``, a sorted set of ``[minute, ready, retrying, scheduled]`` by minute, trimmed
to a day; readers take the largest sample of each minute (two workers may sample it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.ops import counters

DEPTH = redis_key("series", "depth")
DAY_MINUTES = 1440
ACTIVITY = ("sent", "failed", "retried")
LATENCY_FIELD = "lat:"  # a window hash's latency bucket: lat:<upper bound> (or lat:+Inf)
Series = dict[str, list[float | None]]


def record_depth(
    client: redis.Redis, ready: int, retrying: int, scheduled: int, now: float | None = None
) -> None:
    minute = int((time.time() if now is None else now) // 60)
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(DEPTH, {json.dumps([minute, ready, retrying, scheduled]): minute})
        pipe.zremrangebyscore(DEPTH, "-inf", minute - DAY_MINUTES)
        pipe.execute()


def depth_series(client: redis.Redis, now: float | None = None, minutes: int = DAY_MINUTES) -> Series:
    """ready / retrying / scheduled per minute, oldest first (None: no worker sampled it)."""
    last = int((time.time() if now is None else now) // 60)
    first = last - minutes + 1
    best: dict[int, list[int]] = {}
    for raw in cast(list[Any], client.zrangebyscore(DEPTH, first, last)):
        try:
            minute, *values = json.loads(raw)
            sample = [int(v) for v in values[:3]]
        except (ValueError, TypeError):
            continue
        best[int(minute)] = [max(a, b) for a, b in zip(best.get(int(minute), sample), sample, strict=True)]
    out: Series = {"ready": [], "retrying": [], "scheduled": []}
    for minute in range(first, last + 1):
        sample_or_none = best.get(minute)
        for i, name in enumerate(out):
            out[name].append(float(sample_or_none[i]) if sample_or_none else None)
    return out


def quantile(q: float, buckets: Mapping[str, int]) -> float | None:
    """The ``q`` quantile of a histogram {upper bound: count} (None when it is empty)."""
    bounds = sorted(((math.inf if b == "+Inf" else float(b)), n) for b, n in buckets.items() if n > 0)
    total = sum(n for _, n in bounds)
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    finite = [b for b, _ in bounds if b != math.inf]
    for bound, count in bounds:
        if seen + count >= rank:
            if bound == math.inf:
                return finite[-1] if finite else None
            return lower + (bound - lower) * (rank - seen) / count
        seen, lower = seen + count, bound
    return finite[-1] if finite else None


def _window(hashes: Iterable[Mapping[str, str]]) -> Series:
    out: Series = {name: [] for name in (*ACTIVITY, "p50", "p95")}
    for fields in hashes:
        for name in ACTIVITY:
            out[name].append(float(fields.get(name, 0)))
        buckets = {
            k.removeprefix(LATENCY_FIELD): int(v) for k, v in fields.items() if k.startswith(LATENCY_FIELD)
        }
        out["p50"].append(quantile(0.5, buckets))
        out["p95"].append(quantile(0.95, buckets))
    return out


def _summed(rows: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Column-wise sums of many accounts' window hashes (the whole deployment's)."""
    out: list[dict[str, str]] = []
    for column in zip(*rows, strict=True):
        total: dict[str, int] = {}
        for fields in column:
            for name, value in fields.items():
                total[name] = total.get(name, 0) + int(value)
        out.append({name: str(value) for name, value in total.items()})
    return out


def activity(
    client: redis.Redis, accounts: list[str], now: float | None = None
) -> dict[str, dict[str, Series]]:
    """Per account and overall (key ``""``): {"hour": per minute, "day": per hour} series of
    sent, failed, retried, p50 and p95 (seconds), oldest first."""
    read = counters.window_hashes(client, accounts, time.time() if now is None else now)
    minutes, hours = [m for m, _ in read], [h for _, h in read]
    out = {name: {"hour": _window(minutes[i]), "day": _window(hours[i])} for i, name in enumerate(accounts)}
    empty_hour: list[Mapping[str, str]] = [{}] * 60
    empty_day: list[Mapping[str, str]] = [{}] * 24
    out[""] = {
        "hour": _window(_summed(minutes) if accounts else empty_hour),
        "day": _window(_summed(hours) if accounts else empty_day),
    }
    return out
