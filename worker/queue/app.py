"""The Celery app a worker runs: ``celery -A worker.queue.app worker`` (what ``postroom worker``
starts), and beat's.

Importing this module builds nothing. Celery asks it for ``app`` as it starts, and
:func:`worker_app` then builds it, once: the app of worker/queue/broker/celery_app.py, its tasks
(worker/queue/tasks.py), what runs beside Celery's consumer (worker/queue/service.py) and the
log format.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery

from worker.ops import tracing
from worker.queue import service, tasks
from worker.queue.broker.celery_app import current_app, settings
from worker.queue.pipeline.attemptlog import LOG_FORMAT


@functools.cache
def worker_app() -> Celery:
    tracing.require_sdk()  # asked to export without the SDK: say so at start, not at the first job
    app = current_app()
    LOG_FORMAT.json = settings().log_format == "json"
    tasks.register(app)
    service.register()
    return app


def __getattr__(name: str) -> Any:
    """``worker.queue.app.app``, the attribute ``celery -A`` looks for."""
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
