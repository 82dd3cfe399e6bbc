"""The one object a worker process keeps what it makes once in: :class:`ProcessState`, found
through :func:`this_process`, made on first use and anew in a forked child (a fork starts with
nothing of its parent's: no loop, no connection, no thread).

What lives in it: this process's holder id, and what the modules register by name with
:meth:`ProcessState.once` — the job store and the broker views (celery_app.py), the account
health (pipeline/attempts.py), the runtime (process/runtime.py), the upkeep thread
(process/liveness.py), the webhook sender (events/webhook_sender.py), the inbox reader and the
dispatcher (service.py). One lock, one lifetime, one place to look; no module keeps process
state of its own. The settings and the Celery app are configuration, made once on first use
(worker/queue/broker/celery_app.py) and kept by a forked child.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, Self, TypeVar, cast

T = TypeVar("T")


class ProcessState:
    """What one process made once, by name."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # what this process holds (taken jobs, its inbox, its consumer's messages) is kept under it
        self.holder = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._made: dict[str, Any] = {}
        self._lock = threading.RLock()

    def once(self, name: str, make: Callable[[], T]) -> T:
        """The thing registered as ``name``, made by ``make`` the first time it is asked for.
        Asked for on the hot path (the job store, the runtime): once made, no lock is taken."""
        made = self._made.get(name)  # one dict read: atomic
        if made is not None:
            return cast(T, made)
        with self._lock:
            if name not in self._made:
                self._made[name] = make()
            return cast(T, self._made[name])

    def get(self, name: str) -> Any | None:
        with self._lock:
            return self._made.get(name)

    def put(self, name: str, thing: Any) -> None:
        with self._lock:
            self._made[name] = thing

    def drop(self, name: str) -> Any | None:
        """Forget ``name`` and give it back (to be stopped or closed by the caller)."""
        with self._lock:
            return self._made.pop(name, None)


class Background:
    """A daemon thread a process runs beside its work (the webhook sender, the bounce reader),
    kept in its :class:`ProcessState`: started once, stopped on the worker's shutdown."""

    thread_name = "postroom-background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        raise NotImplementedError


_LOCK = threading.Lock()
_THIS: list[ProcessState] = []  # the one object (a list, so no module rebinds a global)


def this_process() -> ProcessState:
    """This process's state (a new one after a fork)."""
    with _LOCK:
        if not _THIS or _THIS[0].pid != os.getpid():
            _THIS[:] = [ProcessState()]
        return _THIS[0]
