"""The dashboard's time series (worker/ops/series.py) and its SVG charts (worker/web/dashboard/charts.py)."""

from __future__ import annotations

import time

import pytest

from support.queue import QueueEnv
from worker.db.vocabulary import WINDOW_COUNTERS
from worker.ops import counters, series
from worker.web.dashboard.charts import line_chart, nice_ceiling


def test_quantiles_are_read_from_the_histogram_like_prometheus() -> None:
    assert series.quantile(0.5, {}) is None
    assert series.quantile(0.5, {"0.1": 10}) == 0.05  # the middle of the first bucket
    assert series.quantile(0.5, {"0.1": 5, "1.0": 5}) == 0.1
    assert series.quantile(0.95, {"0.1": 5, "1.0": 5}) == pytest.approx(0.1 + 0.9 * 0.9)
    assert series.quantile(0.99, {"0.1": 1, "+Inf": 9}) == 0.1  # beyond the last bound: that bound


def test_activity_and_latency_come_from_the_counter_windows(own_queue: QueueEnv) -> None:
    now = time.time()
    with own_queue.redis.pipeline() as pipe:
        for latency in (0.02, 0.03, 4.0):
            counters.record_into(
                pipe, "a", transport="smtp", outcome="sent", counter="sent", latency=latency, now=now
            )
        counters.record_into(
            pipe, "b", transport="smtp", outcome="dead", counter="dead", latency=None, now=now
        )
        pipe.execute()
    data = series.activity(own_queue.redis, ["a", "b"], now)
    assert data["a"]["hour"]["sent"][-1] == 3 and data["b"]["hour"]["failed"][-1] == 1
    assert data[""]["hour"]["sent"][-1] == 3 and data[""]["day"]["failed"][-1] == 1
    assert len(data[""]["hour"]["sent"]) == 60 and len(data[""]["day"]["sent"]) == 24
    p50, p95 = data["a"]["hour"]["p50"][-1], data["a"]["hour"]["p95"][-1]
    assert p50 is not None and 0.025 <= p50 <= 0.05 and p95 is not None and 2.5 < p95 <= 5.0
    assert data["a"]["hour"]["p50"][0] is None  # no send an hour ago
    status = counters.windows(own_queue.redis, ["a"], now)["a"]["hour"]
    assert set(status) == set(WINDOW_COUNTERS)  # the latency buckets stay out of status


def test_queue_depth_keeps_the_largest_sample_of_a_minute_for_a_day(own_queue: QueueEnv) -> None:
    now = time.time()
    series.record_depth(own_queue.redis, 5, 1, 0, now - 2 * 86400)  # trimmed by the next one
    series.record_depth(own_queue.redis, 3, 0, 2, now - 120)
    series.record_depth(own_queue.redis, 7, 0, 1, now)
    series.record_depth(own_queue.redis, 4, 2, 1, now)  # another worker, the same minute
    depth = series.depth_series(own_queue.redis, now)
    assert len(depth["ready"]) == series.DAY_MINUTES
    assert (depth["ready"][-1], depth["retrying"][-1], depth["scheduled"][-1]) == (7, 2, 1)
    assert depth["ready"][-3] == 3 and depth["ready"][-2] is None
    assert own_queue.redis.zcard(series.DEPTH) == 3


def test_a_chart_escapes_every_text_and_draws_gaps() -> None:
    svg = str(
        line_chart(
            "x<y", "<script>alert(1)</script>", [("sent", [1.0, None, 3.0, 4.0])], first="a&b", last="z"
        )
    )
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg
    assert svg.count('data-series="sent"') == 2  # one dot before the gap, one line after it
    assert (
        nice_ceiling(0) == 1
        and nice_ceiling(3.2) == 5
        and nice_ceiling(21) == 25
        and nice_ceiling(100) == 100
    )
