"""Redis's MONITOR, for tests that must see which commands (and which of them inside a script)
a piece of code sends: what it says is proof that no script carries a message body."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import redis


@contextlib.contextmanager
def monitored(db: int, last: Callable[[str, str], bool], width: int = 200) -> Iterator[list[str]]:
    """Yields the list MONITOR fills with ``"<client type> <command>"`` lines (each cut at
    ``width``) of database ``db``, while the block runs and until ``last(client_type, command)``
    says the last command of interest arrived (waited for 10 s after the block)."""
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        client = redis.Redis("127.0.0.1", 6379, db=db)
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]  # untyped in redis-py
            ready.set()
            for command in monitor.listen():
                if command.get("db") == db:
                    kind, text = str(command.get("client_type")), str(command["command"])
                    seen.append(f"{kind} {text[:width]}")
                    if last(kind, text):
                        return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.2)  # MONITOR is on in the server before the first command of the block
    yield seen
    thread.join(10)
