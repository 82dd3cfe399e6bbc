"""Which Celery task runs on which thread, since when, and which jobs it holds.

Celery's task signals feed it (worker/queue/broker/celery_app.py), the consumer tells it each
message's delivery tag (worker/queue/broker/intake.py), the dispatcher's groups report what they
carry (worker/queue/pipeline/dispatch.py), and the upkeep's hard-time-limit check reads it
(worker/queue/process/liveness.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class _Running:
    started: float
    tags: set[str]  # its own message's delivery tag and the tags of the jobs it carries
    overdue: bool = False


class TaskClock:
    """When each running task started and what it holds, by thread.

    Celery enforces its hard time limit only where it can kill the process
    (prefork); a thread of the threads pool cannot be stopped. So Postroom
    enforces it here: a task still running past the limit stops holding its
    jobs — its process's heartbeat no longer claims their messages (the reaper
    gives them back to the queue) nor renews their Message-ID claims (another
    attempt may send them) — and an error names it. If the thread ever wakes, its
    sends are kept from going twice by the sent marks, as after a kill."""

    EXPECTED_MAX = 10_000  # delivery tags of messages received and not yet started, kept at most

    def __init__(self) -> None:
        self._running: dict[int, _Running] = {}
        self._expected: dict[str, str] = {}  # task id -> its message's delivery tag
        self._lock = threading.Lock()

    def expect(self, task_id: str, tag: str) -> None:
        """The consumer received ``task_id``'s message (Celery's task request does not carry it)."""
        with self._lock:
            if len(self._expected) >= self.EXPECTED_MAX:  # messages that never started (revoked, …)
                for old in list(self._expected)[: self.EXPECTED_MAX // 2]:
                    del self._expected[old]
            self._expected[task_id] = tag

    def started(self, task_id: str | None) -> None:
        with self._lock:
            tag = self._expected.pop(task_id, None) if task_id else None
            self._running[threading.get_ident()] = _Running(time.monotonic(), {tag} if tag else set())

    def carrying(self, tags: list[str]) -> None:
        with self._lock:
            running = self._running.get(threading.get_ident())
            if running is not None:
                running.tags.update(tags)

    def let_go(self, tags: list[str]) -> None:
        with self._lock:
            running = self._running.get(threading.get_ident())
            if running is not None:
                running.tags.difference_update(tags)

    def finished(self) -> None:
        with self._lock:
            self._running.pop(threading.get_ident(), None)

    def overdue(self, limit: float, now: float | None = None) -> list[tuple[int, float, int]]:
        """Tasks that went past ``limit`` seconds since the last call: (thread, age, jobs held)."""
        now = time.monotonic() if now is None else now
        late = []
        with self._lock:
            for thread, running in self._running.items():
                if not running.overdue and now - running.started > limit:
                    running.overdue = True
                    late.append((thread, now - running.started, len(running.tags)))
        return late

    def hostages(self) -> set[str]:
        """The tags held by tasks past their time limit: no longer claimed by this process."""
        with self._lock:
            return {tag for running in self._running.values() if running.overdue for tag in running.tags}


TASKS = TaskClock()
