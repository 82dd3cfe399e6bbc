"""The overview page: charts of activity, latency and queue depth; every account's state, last
health line, certificate expiry and counts; queue depths, in flight, retrying, held."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from worker.client import Producer
from worker.ops.health import AccountHealth
from worker.web.dashboard.auth import Operator
from worker.web.dashboard.base import PREFIX, State, call, render
from worker.web.dashboard.charts import activity_charts
from worker.web.status import CERT_WARN_DAYS, Status, health_line

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _snapshot(producer: Producer) -> dict[str, Any]:
    records = producer.records(fresh=True)
    return Status(
        producer.store, AccountHealth(producer.store.redis), records, producer.broker_view()
    ).as_dict()


def _account_row(name: str, info: dict[str, Any], now: float) -> dict[str, Any]:
    """One account's line on the overview."""
    health = info.get("health")
    return {
        "name": name,
        "state": info["state"],
        "reason": info.get("reason"),
        "health": health_line(health, now),
        "health_class": "none" if not health else "ok" if health.get("ok") else "failed",
        "certificates": [
            (label, days, days < CERT_WARN_DAYS)
            for label, days in sorted(info["certificate_days_left"].items())
        ],
        "sent_hour": info["last_hour"]["sent"],
        "sent": info["sent"],
        "failed": info["failed"],
        "retried": info["retried"],
        "dead": info["dead"],
        "held": info["held"],
    }


@router.get("")
async def overview(request: Request, session: Operator, state: State) -> Response:
    data = await call(_snapshot, state.producer)
    charts = await call(activity_charts, state.producer)
    now = data["generated_at"]
    accounts = [_account_row(name, info, now) for name, info in data["accounts"].items()]
    return render(
        request, "overview.html", session=session, refresh_url="", data=data, accounts=accounts, charts=charts
    )
