"""Line charts as server-rendered SVG for the dashboard (worker/ops/series.py has the data).

No script and nothing from elsewhere: an ``<svg>`` element inside the page, styled by
/dashboard/static/dashboard.css (classes ``s-<series>``), so it needs nothing the page's
Content-Security-Policy does not allow. Every text in it is escaped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TypedDict

from markupsafe import Markup, escape

from worker.client import Producer
from worker.ops import series

Line = tuple[str, Sequence[float | None]]  # series name (its CSS class s-<name>), values oldest first
WIDTH, HEIGHT = 600, 190
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 26, 24


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times 10^n at or above ``value`` (1 for nothing to show)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power + 1e-12:
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop ends at 10


def _number(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.3g} s"
    return f"{value:.3g}"


def _segments(
    values: Sequence[float | None], x: list[float], y: float, height: float, top: float
) -> list[str]:
    """Polyline point lists of the runs of values without a gap (None)."""
    runs: list[list[str]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(f"{x[i]:.1f},{top + height - min(value / y, 1.0) * height:.1f}")
    return [" ".join(points) for points in runs if points]


DOT_RADIUS = 3.5  # a value with no neighbour is a dot, large enough to be seen at a glance


def legend_value(values: Sequence[float | None], unit: str, *, latest: bool) -> str:
    """The number beside a series' name: the sum of a counter over the chart (``sent 12``), the
    latest sample of a level (``scheduled 2``: summing once-a-minute samples of a depth would
    count the same jobs again every minute); none for a unit (latencies do not add up)."""
    shown = [v for v in values if v is not None]
    if not shown or unit:
        return ""
    return f" {_number(shown[-1] if latest else sum(shown), unit)}"


def line_chart(
    chart_id: str,
    title: str,
    lines: Sequence[Line],
    *,
    first: str,
    last: str,
    unit: str = "",
    levels: bool = False,
) -> Markup:
    """An SVG line chart: ``lines`` over the same time steps, ``first``/``last`` the labels of
    its ends (the oldest and newest step); ``levels``: the series are samples of a level (queue
    depth), their legend shows the latest, not the sum."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    steps = max((len(values) for _, values in lines), default=0)
    x = [LEFT + (i * plot_w / (steps - 1) if steps > 1 else plot_w / 2) for i in range(steps)]
    peak = max((v for _, values in lines for v in values if v is not None), default=0.0)
    top_value = nice_ceiling(peak)
    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" data-chart="{escape(chart_id)}" role="img" '
        f'aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{LEFT}" y="14">{escape(title)}</text>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h - fraction * plot_h
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        label = escape(_number(top_value * fraction, unit))
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text class="axis" x="{LEFT}" y="{HEIGHT - 6}">{escape(first)}</text>')
    parts.append(
        f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" text-anchor="end">{escape(last)}</text>'
    )
    legend_x = WIDTH - RIGHT
    for name, values in reversed(lines):
        text = f"{name}{legend_value(values, unit, latest=levels)}"
        parts.append(
            f'<text class="legend s-{escape(name)}" x="{legend_x}" y="14" '
            f'text-anchor="end">{escape(text)}</text>'
        )
        legend_x -= 12 + 7 * len(text)
        for points in _segments(values, x, top_value, plot_h, TOP):
            if " " in points:
                parts.append(
                    f'<polyline class="s-{escape(name)}" data-series="{escape(name)}" points="{points}"/>'
                )
            else:
                cx, cy = points.split(",")
                dot = f'cx="{cx}" cy="{cy}" r="{DOT_RADIUS}"'
                parts.append(f'<circle class="s-{escape(name)}" data-series="{escape(name)}" {dot}/>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it went through escape()


class Ends(TypedDict):
    """The labels of a chart's ends (oldest and newest step)."""

    first: str
    last: str


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M")


def activity_charts(producer: Producer, account: str | None = None) -> list[Markup]:
    """The charts of one account, or of the whole deployment (with queue depth) when None."""
    client = producer.store.redis
    now = time.time()
    names = [account] if account else producer.records(fresh=True).account_names
    data = series.activity(client, names, now)[account or ""]
    key = account or "all"
    hour, day = data["hour"], data["day"]
    hour_ends = Ends(first=_clock(now - 59 * 60), last=_clock(now))
    day_ends = Ends(first=_clock(now - 23 * 3600), last=_clock(now))
    charts = [
        line_chart(f"activity-hour-{key}", "Per minute, last hour",
                   [(n, hour[n]) for n in series.ACTIVITY], **hour_ends),
        line_chart(f"activity-day-{key}", "Per hour, last day",
                   [(n, day[n]) for n in series.ACTIVITY], **day_ends),
        line_chart(f"latency-hour-{key}", "Delivery latency per minute, last hour",
                   [("p50", hour["p50"]), ("p95", hour["p95"])], unit="s", **hour_ends),
        line_chart(f"latency-day-{key}", "Delivery latency per hour, last day",
                   [("p50", day["p50"]), ("p95", day["p95"])], unit="s", **day_ends),
    ]  # fmt: skip
    if account is None:
        depth = series.depth_series(client, now)
        lines = [(name, depth[name]) for name in ("ready", "retrying", "scheduled")]
        charts.append(
            line_chart("depth-day", "Queue depth per minute, last day", lines, levels=True, **day_ends)
        )
    return charts
