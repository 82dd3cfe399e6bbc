"""The dead letters: the newest shown, retry or purge one, or all of those shown (the same
functions as ``postroom dead-letters``: :meth:`worker.client.Producer.retry_dead_letters`,
:meth:`worker.queue.store.jobs.JobStore.purge`)."""

from __future__ import annotations

import logging
import math
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from worker.client import Producer
from worker.web.dashboard.auth import Change, Operator
from worker.web.dashboard.base import PREFIX, DashboardState, Refused, State, call, redirect, render
from worker.web.dashboard.sessions import Session

router = APIRouter(prefix=PREFIX, include_in_schema=False)
log = logging.getLogger("postroom.dashboard")


DEAD_LETTERS_SHOWN = 500  # newest first; "retry all" / "purge all" take every one up to the newest shown


def _dead_letter_page(producer: Producer) -> tuple[list[dict[str, Any]], int]:
    return (
        producer.store.dead_letters(limit=DEAD_LETTERS_SHOWN, newest_first=True),
        producer.store.dead_count(),
    )


@router.get("/dead-letters")
async def dead_letters(request: Request, session: Operator, state: State) -> Response:
    rows, total = await call(_dead_letter_page, state.producer)
    done = {
        name: int(value)
        for name in ("retried", "purged", "missing")
        if (value := request.query_params.get(name, "")).isdigit() and len(value) < 10
    }
    return render(
        request,
        "dead_letters.html",
        session=session,
        refresh_url="/dead-letters",
        rows=rows,
        total=total,
        upto=repr(rows[0]["failed_at"]) if rows else "",
        done=done,
    )


async def _retry_ids(request: Request, state: DashboardState, session: Session, ids: list[str]) -> Response:
    try:
        retried, missing = await call(state.producer.retry_dead_letters, ids)
    except Refused:
        raise
    except Exception:
        log.exception("dashboard: re-enqueueing failed")
        raise Refused(503, "The broker could not take the job(s); try again in a moment.") from None
    log.info("dashboard: %s retried %d dead letter(s)", session.key_name, len(retried))
    return redirect(request, "/dead-letters?" + urlencode({"retried": len(retried), "missing": len(missing)}))


async def _purge_ids(request: Request, state: DashboardState, session: Session, ids: list[str]) -> Response:
    purged = await call(state.producer.store.purge, ids)
    log.info("dashboard: %s purged %d dead letter(s)", session.key_name, purged)
    return redirect(request, "/dead-letters?" + urlencode({"purged": purged, "missing": len(ids) - purged}))


def _upto(form: dict[str, str]) -> float:
    """The form's time of the newest dead letter shown: "all" means every one up to it."""
    try:
        value = float(form.get("upto", ""))
    except ValueError:
        raise Refused(400, "The form lacks the time of the newest dead letter shown.") from None
    if not math.isfinite(value):
        raise Refused(400, "The form lacks the time of the newest dead letter shown.")
    return value


@router.post("/dead-letters/retry-all")
async def retry_all(request: Request, change: Change, state: State) -> Response:
    ids = await call(state.producer.store.dead_letter_ids, _upto(change.form))
    return await _retry_ids(request, state, change.session, ids)


@router.post("/dead-letters/purge-all")
async def purge_all(request: Request, change: Change, state: State) -> Response:
    ids = await call(state.producer.store.dead_letter_ids, _upto(change.form))
    return await _purge_ids(request, state, change.session, ids)


@router.post("/dead-letters/{job_id}/retry")
async def retry_one(request: Request, job_id: str, change: Change, state: State) -> Response:
    return await _retry_ids(request, state, change.session, [job_id])


@router.post("/dead-letters/{job_id}/purge")
async def purge_one(request: Request, job_id: str, change: Change, state: State) -> Response:
    return await _purge_ids(request, state, change.session, [job_id])
