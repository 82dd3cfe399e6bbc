"""The Celery app a worker runs: ``celery -A worker.queue.app worker`` (what ``postroom worker``
starts), and beat's.

The app is configured in worker/queue/broker/celery_app.py; this module adds what a worker runs
with it: the tasks (worker/queue/tasks.py) and what runs beside Celery's consumer
(worker/queue/service.py), both registered when they are imported.
"""

from __future__ import annotations

from worker.queue import service, tasks
from worker.queue.broker.celery_app import app

__all__ = ["app", "service", "tasks"]
