"""``postroom worker``: one Celery worker process per CPU core, each with its own task threads.

Why several processes: one Python process runs its Python code on one core at a
time (the GIL), so a single threads worker tops out at one core however many
threads it has. Why threads inside each: a job waits on a slow SMTP server or on
Graph for seconds; a thread waiting costs nothing, a prefork child waiting is a
core's worth of capacity gone (bench/RESULTS.md measures both). Each process has
its own event loop, connection pools, heartbeat and holder id
(worker/queue/process/liveness.py), so a process that dies has its jobs restored by the others
within seconds.

The group is supervised here: a stop (SIGTERM, SIGINT, SIGHUP) is passed to every
process as a warm shutdown, a second one as a cold one; a process that exits on
its own is started again (at most every few seconds); every process is tied to
this one (``PR_SET_PDEATHSIG``) so none outlives it. With one process (``--processes
1``, or ``worker_processes: 1``) the supervisor steps aside and Celery runs in
its place, as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from worker.mail.payload import CONTROL_QUEUE
from worker.run.embedded import dies_with_parent

RESTART_MIN = 1.0  # seconds before a process that exited is started again
RESTART_MAX = 30.0  # the longest wait, for a process that keeps exiting at once
STEADY = 60.0  # a process that ran this long before it exited starts again after RESTART_MIN


def process_count(asked: int | None, configured: int) -> int:
    """Asked, else configured, else the cores this process may run on (its CPU affinity, which
    a container's cpuset narrows; a CPU quota does not: set worker_processes then)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, asked or configured or cores or 1)


def celery_command(*args: str) -> list[str]:
    """``celery -A worker.queue.app ARGS`` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "worker.queue.app", *args]


def celery_worker_args(index: int, count: int, pool: str, concurrency: int, extra: list[str]) -> list[str]:
    """The command line of worker process ``index`` of ``count`` (node names must differ)."""
    args = celery_command("worker", "-Q", CONTROL_QUEUE, "-l", "INFO")
    args += ["-P", pool, "-c", str(concurrency)]
    extra = list(extra)
    named = [i for i, a in enumerate(extra[:-1]) if a in ("-n", "--hostname")]
    if not named:
        args += ["-n", f"postroom-{index}@%h" if count > 1 else "postroom@%h"]
    elif count > 1:  # each process its own node name: the one asked for, numbered
        node, at, host = extra[named[-1] + 1].partition("@")
        extra[named[-1] + 1] = f"{node}-{index}{at}{host}"
    return args + extra


@dataclass
class Member:
    index: int
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    wait: float = RESTART_MIN
    due: float = 0.0  # when to start it again after it exited

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own argument list
            self.args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=dies_with_parent()
        )
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"postroom worker: {text}", file=sys.stderr, flush=True)


def run_group(argv_extra: list[str], *, processes: int | None = None) -> int:
    """Run the group until it is told to stop; the exit status is 0 after a requested stop."""
    from worker.settings import load_settings

    settings = load_settings()
    count = process_count(processes, settings.worker_processes)
    if count == 1:
        args = celery_worker_args(1, 1, settings.worker_pool, settings.worker_concurrency, argv_extra)
        os.execvp(args[0], args)  # noqa: S606
    members = [
        Member(i, celery_worker_args(i, count, settings.worker_pool, settings.worker_concurrency, argv_extra))
        for i in range(1, count + 1)
    ]
    stops: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stops.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, on_signal)
    _say(f"{count} processes x {settings.worker_concurrency} {settings.worker_pool} (one per core)")
    for member in members:
        member.start()
    forwarded = 0
    try:
        while True:
            if len(stops) > forwarded:
                # first stop: warm (running tasks finish, the rest go back); again, or SIGQUIT: cold
                cold = forwarded > 0 or signal.SIGQUIT in stops[forwarded:]
                forwarded = len(stops)
                for member in members:
                    member.signal(signal.SIGQUIT if cold else signal.SIGTERM)
            if stops:
                if not any(m.running() for m in members):
                    return 0
            else:
                _restart_exited(members)
            time.sleep(0.2)
    finally:
        for member in members:  # an error here: nothing is left behind (the kernel would too)
            if member.running():
                member.signal(signal.SIGTERM)


def _restart_exited(members: list[Member]) -> None:
    now = time.monotonic()
    for member in members:
        if member.process is None or member.running():
            continue
        if member.due == 0.0:
            code = member.process.returncode
            member.wait = RESTART_MIN if now - member.started >= STEADY else min(member.wait * 2, RESTART_MAX)
            member.due = now + member.wait
            _say(f"process {member.index} exited with {code}; starting it again in {member.wait:.0f} s")
        elif now >= member.due:
            member.due = 0.0
            member.start()
