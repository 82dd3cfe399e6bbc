"""A job's page (state, per-recipient results, attempts) and the scheduled jobs: what waits for
its ``send_at``, each with a Cancel button (a POST with the session's CSRF token, as every
change on the dashboard)."""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from worker.client import Producer
from worker.db.keys import redis_key
from worker.db.vocabulary import FINAL_STATES
from worker.queue.store.jobrecord import SCHEDULED
from worker.web.dashboard.auth import Change, Operator
from worker.web.dashboard.base import PREFIX, Refused, State, call, redirect, render

router = APIRouter(prefix=PREFIX, include_in_schema=False)


SCHEDULED_SHOWN = 200


def _job_view(producer: Producer, job_id: str) -> dict[str, Any] | None:
    job = producer.store.get(job_id) if len(job_id) <= 100 else None
    if job is None:
        return None
    payload = job.payload or {}
    return {
        **job.as_dict(),  # never the payload: bodies, headers and attachments stay out
        "subject": payload.get("subject") if isinstance(payload.get("subject"), str) else None,
        "submitted_by": job.submitted_by,
        "dead": producer.store.is_dead(job_id),
    }


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str, session: Operator, state: State) -> Response:
    job = await call(_job_view, state.producer, job_id)
    if job is None:
        raise Refused(404, "No such job (it may have been purged or expired).")
    final = job["state"] in FINAL_STATES
    refresh = None if final else f"/jobs/{quote(job_id, safe='')}"
    return render(request, "job.html", session=session, refresh_url=refresh, job=job)


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
