"""A process's in-flight counts (worker/queue/process/runtime.py): carried jobs count from the moment they are
taken, once, so task threads taking at the same time keep to the per-process bound."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from worker.queue.process.runtime import Runtime


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    made = Runtime()
    yield made
    made.close()


def test_reserved_jobs_count_at_once_and_are_not_counted_twice_when_sent(runtime: Runtime) -> None:
    with runtime.reserving(["a", "a", "a"]):
        assert runtime.in_flight("a") == 3  # another thread deciding what to take sees them
        with runtime.sending(["a", "a", "a", "a", "b"]):  # the task's own job and its carried ones
            assert (runtime.in_flight("a"), runtime.in_flight("b")) == (4, 1)
        assert runtime.in_flight("a") == 3
    assert (runtime.in_flight("a"), runtime.in_flight("b")) == (0, 0)


def test_another_threads_reservation_is_not_this_threads(runtime: Runtime) -> None:
    reserved, done = threading.Event(), threading.Event()

    def other() -> None:
        with runtime.reserving(["a", "a"]):
            reserved.set()
            done.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert reserved.wait(10)
        with runtime.sending(["a"]):  # nothing reserved here: counted on top of the other's
            assert runtime.in_flight("a") == 3
    finally:
        done.set()
        thread.join(10)
    assert runtime.in_flight("a") == 0
