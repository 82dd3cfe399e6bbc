"""An account's page: its activity charts, health history, certificate expiry, suppressions
and, below them, its webhooks' failures summed up (each distinct error once)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from worker.client import Producer
from worker.ops import preflight
from worker.ops.health import AccountHealth
from worker.queue.events.outbox import LOG_LIMIT, Outbox
from worker.queue.store.suppressions import Suppressions
from worker.web.dashboard.auth import Operator
from worker.web.dashboard.base import PREFIX, Refused, State, call, render
from worker.web.dashboard.charts import activity_charts
from worker.web.status import CERT_WARN_DAYS, Status, health_line

router = APIRouter(prefix=PREFIX, include_in_schema=False)


SUPPRESSIONS_SHOWN = 100


def _account_view(producer: Producer, name: str) -> dict[str, Any] | None:
    records = producer.records(fresh=True)
    if name not in records.account_names:
        return None
    client = producer.store.redis
    health = AccountHealth(client)
    info = Status(producer.store, health, records, producer.broker_view()).as_dict()["accounts"][name]
    now = time.time()
    suppressions = Suppressions(
        client, producer.settings.suppression_ttl, producer.settings.suppression_limit
    )
    shown = suppressions.page(name, SUPPRESSIONS_SHOWN)  # the oldest few, never the whole list
    outbox = Outbox(client, producer.settings.webhook_retention)
    hooks = []
    for hook_name, hook in sorted(records.webhooks.items()):
        if hook.record.accounts is None or name in hook.record.accounts:
            attempts = outbox.attempts(hook_name, LOG_LIMIT, account=name)
            hooks.append({**hook.summary(), **outbox.stats(hook_name), **webhook_errors(attempts)})
    account = records.accounts.get(name)
    return {
        "name": name,
        "summary": account.summary() if account else None,
        "info": info,
        "health_now": health_line(info.get("health"), now),
        "deliverability": _deliverability(info.get("health")),
        "history": list(reversed(health.history(name))),
        "certificates": [
            (label, days, days < CERT_WARN_DAYS)
            for label, days in sorted(info["certificate_days_left"].items())
        ],
        "suppressions": shown.entries,
        "suppressed": shown.total,
        "webhooks": hooks,
        "charts": activity_charts(producer, name),
    }


def webhook_errors(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """A webhook's latest attempts (newest first) as one summary: each distinct failure once,
    with how many attempts it ended and when it was first and last seen, newest first, and the
    last delivery. A receiver that is down fails every attempt the same way: a row per attempt
    buried the account's page under identical lines (issue 32)."""
    errors: dict[tuple[str, Any], dict[str, Any]] = {}
    delivered_at = None
    for attempt in attempts:
        if attempt.get("outcome") == "delivered":
            delivered_at = delivered_at or attempt.get("at")
            continue
        error = str(attempt.get("error") or "no answer")
        seen = errors.setdefault(
            (error, attempt.get("status")),
            {
                "error": error,
                "status": attempt.get("status"),
                "count": 0,
                "given_up": 0,
                "last_at": attempt.get("at"),
                "last_job": attempt.get("job_id"),
            },
        )
        seen["count"] += 1
        seen["given_up"] += attempt.get("outcome") == "failed"
        seen["first_at"] = attempt.get("at")  # newest first: the last one read is the first seen
    return {
        "attempts_read": len(attempts),
        "errors": list(errors.values()),
        "last_delivered_at": delivered_at,
    }


def _deliverability(health: dict[str, Any] | None) -> dict[str, Any]:
    """The last check's DNS preflight (worker/ops/preflight.py): its domain, when, and the rows."""
    found = ((health or {}).get("detail") or {}).get("deliverability") or {}
    return {
        "domain": found.get("domain"),
        "resolver": found.get("resolver"),
        "checked_at": found.get("checked_at"),
        "error": found.get("error"),
        "rows": preflight.rows(found),
    }


@router.get("/accounts/{name}")
async def account_page(request: Request, name: str, session: Operator, state: State) -> Response:
    view = await call(_account_view, state.producer, name)
    if view is None:
        raise Refused(404, "No such account.")
    return render(request, "account.html", session=session, refresh_url=f"/accounts/{name}", account=view)
