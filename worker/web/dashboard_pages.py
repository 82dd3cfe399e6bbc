"""The dashboard's charts, account pages and scheduled jobs (worker/web/dashboard.py has the rest).

Charts (worker/web/charts.py, server-rendered SVG): sent / failed / retried per minute over
the last hour and per hour over the last day, delivery latency p50 / p95 over the same spans,
queue depth (ready, retrying, scheduled) per minute over the last day. An account page adds
its health history, certificate expiry, suppressions and its webhooks' latest attempts. The
scheduled jobs page lists what waits for its ``send_at``, each with a Cancel button (a POST
with the session's CSRF token, as every change on the dashboard).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from worker.client import Producer
from worker.db.keys import redis_key
from worker.ops import series
from worker.ops.health import AccountHealth
from worker.queue.events.outbox import Outbox
from worker.queue.store.jobrecord import SCHEDULED
from worker.queue.store.suppressions import Suppressions
from worker.web.charts import line_chart
from worker.web.dashboard_auth import Change, Operator
from worker.web.dashboard_core import PREFIX, Refused, State, call, redirect, render
from worker.web.status import CERT_WARN_DAYS, Status, health_line

router = APIRouter(prefix=PREFIX, include_in_schema=False)
SCHEDULED_SHOWN = 200
SUPPRESSIONS_SHOWN = 100


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
    hour_ends = {"first": _clock(now - 59 * 60), "last": _clock(now)}
    day_ends = {"first": _clock(now - 23 * 3600), "last": _clock(now)}
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
        charts.append(line_chart("depth-day", "Queue depth per minute, last day", lines, **day_ends))
    return charts


def _account_view(producer: Producer, name: str) -> dict[str, Any] | None:
    records = producer.records(fresh=True)
    if name not in records.account_names:
        return None
    client = producer.store.redis
    health = AccountHealth(client)
    info = Status(producer.store, health, records, producer.broker_view()).as_dict()["accounts"][name]
    now = time.time()
    suppressions = Suppressions(client, producer.settings.suppression_ttl)
    outbox = Outbox(client, producer.settings.webhook_retention)
    hooks = [
        {
            **hook.summary(),
            **outbox.stats(hook_name),
            "attempts": outbox.attempts(hook_name, 10, account=name),
        }
        for hook_name, hook in sorted(records.webhooks.items())
        if hook.record.accounts is None or name in hook.record.accounts
    ]
    account = records.accounts.get(name)
    return {
        "name": name,
        "summary": account.summary() if account else None,
        "info": info,
        "health_now": health_line(info.get("health"), now),
        "history": list(reversed(health.history(name))),
        "certificates": [
            (label, days, days < CERT_WARN_DAYS)
            for label, days in sorted(info["certificate_days_left"].items())
        ],
        "suppressions": suppressions.entries(name)[:SUPPRESSIONS_SHOWN],
        "suppressed": suppressions.count(name),
        "webhooks": hooks,
        "charts": activity_charts(producer, name),
    }


@router.get("/accounts/{name}")
async def account_page(request: Request, name: str, session: Operator, state: State) -> Response:
    view = await call(_account_view, state.producer, name)
    if view is None:
        raise Refused(404, "No such account.")
    return render(request, "account.html", session=session, refresh_url=f"/accounts/{name}", account=view)


def _scheduled(producer: Producer) -> tuple[list[dict[str, Any]], int]:
    client = producer.store.redis
    due = cast(list[tuple[str, float]], client.zrange(SCHEDULED, 0, SCHEDULED_SHOWN - 1, withscores=True))
    with client.pipeline(transaction=False) as pipe:  # one round trip for every row's record
        for job_id, _at in due:
            pipe.hmget(redis_key("job", job_id), ["account", "state", "payload"])
        records = cast(list[list[str | None]], pipe.execute())
    rows = []
    for (job_id, at), (account, job_state, raw) in zip(due, records, strict=True):
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        subject = payload.get("subject")
        rows.append({
            "id": job_id,
            "due": at,
            "account": account or "?",
            "state": job_state or "missing",
            "subject": subject if isinstance(subject, str) else "",
            "recipients": sum(len(v) for f in ("to", "cc", "bcc") if isinstance(v := payload.get(f), list)),
        })  # fmt: skip
    return rows, int(client.zcard(SCHEDULED))


@router.get("/scheduled")
async def scheduled_page(request: Request, session: Operator, state: State) -> Response:
    rows, total = await call(_scheduled, state.producer)
    done = request.query_params.get("cancelled", "")
    return render(
        request, "scheduled.html", session=session, refresh_url="/scheduled", rows=rows, total=total,
        cancelled=done if done in ("1", "0") else "",
    )  # fmt: skip


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, change: Change, state: State) -> Response:
    if len(job_id) > 100:
        raise Refused(404, "No such job.")
    cancelled, _state = await call(
        lambda: state.producer.cancel(job_id, by=f"dashboard ({change.session.key_name})")
    )
    return redirect(request, f"/scheduled?cancelled={1 if cancelled else 0}")
