"""Raw broker entries, written straight into kombu's Redis list as a hostile producer could.

kombu's Redis transport stores a message as a JSON envelope (base64 body,
headers, properties with a delivery tag) pushed with LPUSH and read with
BRPOP; :func:`envelope` builds one the way Celery would, and every part of it
can be replaced by something Celery does not expect.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis

QUEUE = "postroom"
_DEFAULT = object()


def celery_headers(task: Any = "postroom.send", task_id: Any = _DEFAULT, **extra: Any) -> dict[str, Any]:
    task_id = str(uuid.uuid4()) if task_id is _DEFAULT else task_id
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "hostile@test",
        "ignore_result": None,
    }
    headers.update(extra)
    return headers


def envelope(
    body: Any = _DEFAULT,
    *,
    headers: Any = _DEFAULT,
    raw_body: bytes | None = None,
    content_type: str = "application/json",
    properties: Any = _DEFAULT,
    encoded_body: Any = _DEFAULT,
) -> bytes:
    """One kombu envelope; ``body`` is JSON-encoded (``[args, kwargs, embed]`` for Celery)."""
    if raw_body is None:
        raw_body = json.dumps([[], {}, {}] if body is _DEFAULT else body).encode()
    message: dict[str, Any] = {
        "body": base64.b64encode(raw_body).decode() if encoded_body is _DEFAULT else encoded_body,
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": celery_headers() if headers is _DEFAULT else headers,
        "properties": {
            "correlation_id": "x",
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        if properties is _DEFAULT
        else properties,
    }
    return json.dumps(message).encode()


def send_kwargs(kwargs: Any, *, task_id: str | None = None) -> bytes:
    """A well-formed ``postroom.send`` message carrying ``kwargs`` (maybe invalid ones)."""
    return envelope([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                    headers=celery_headers(task_id=task_id or str(uuid.uuid4())))  # fmt: skip


def push(client: redis.Redis, *entries: bytes, queue: str = QUEUE) -> None:
    """Append entries to the queue (read after everything already in it), as kombu publishes."""
    for entry in entries:
        client.lpush(queue, entry)
