"""The screen every broker message passes before a job is made of it: what Celery's strategy
(or Postroom's own inbox) would choke on in its headers, and whether its decoded body is a call
of the task it names. Pure functions: used by Celery's consumer (worker/queue/broker/intake.py) and by
Postroom's inbox (worker/queue/broker/inbox.py) alike.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import datetime
from typing import Any

from worker.mail.payload import BATCH_TASK_NAME, TASK_ID, TASK_NAME
from worker.queue.store.jobrecord import safe_text

_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord", "group", "parent_id", "root_id"})
# Headers Celery's request reads as text (names, ids, log reprs).
_TEXT_HEADERS = ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin", "lang")
# Tasks whose messages carry jobs: Celery's `expires` would drop them unrecorded.
NEVER_EXPIRE = frozenset({TASK_NAME, BATCH_TASK_NAME})


def header_problem(headers: dict[str, Any]) -> str | None:
    """Why these protocol 2 headers would make Celery's strategy fail (None: they will not)."""
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not TASK_ID.match(task_id):
        return f"task id {safe_text(task_id, 80)} is not a usable id (1-200 of A-Z a-z 0-9 . _ + = -)"
    for field in ("eta", "expires"):
        value = headers.get(field)
        if value is not None and not _iso_time(value):
            return f"header {field} {safe_text(value, 60)} is not an ISO 8601 time"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits)
    ):
        return "header timelimit is not [soft, hard]"
    for field in ("retries", "replaced_task_nesting", "group_index"):
        value = headers.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"header {field} is not an integer"
    for field in _TEXT_HEADERS:
        value = headers.get(field)
        if value is not None and not isinstance(value, str):
            return f"header {field} is not a string"
    stamped, stamps = headers.get("stamped_headers"), headers.get("stamps")
    if stamped is not None and not (isinstance(stamped, list) and all(isinstance(h, str) for h in stamped)):
        return "header stamped_headers is not a list of names"
    if stamps is not None and not isinstance(stamps, dict):
        return "header stamps is not an object"
    if headers.get("ignore_result") not in (None, True, False):
        return "header ignore_result is not a boolean"
    return None


def body_problem(name: str, body: Any, run: Callable[..., Any]) -> str | None:
    """Why a decoded protocol 2 body is no call of task ``name`` (whose function is ``run``)."""
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "body is not [args, kwargs, embed] (args must be a list, kwargs an object)"
    if embed is not None and not (isinstance(embed, dict) and set(embed) <= _EMBED_KEYS):
        return "body's embed is not an object of callbacks/errbacks/chain/chord"
    if embed and any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord", "group")):
        return "callbacks, errbacks, chains and chords are not accepted on Postroom's tasks"
    try:
        _signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {name}: {exc}"
    return None


@functools.cache
def _signature(run: Callable[..., Any]) -> inspect.Signature:
    """A task function's signature, made once (inspect builds it anew on every call)."""
    return inspect.signature(run)


def _iso_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
