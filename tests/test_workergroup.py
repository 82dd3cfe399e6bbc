"""``postroom worker`` with no flags: one Celery worker process per core, supervised.

Real processes on the real Redis: the group delivers, a worker process killed
with SIGKILL is started again (and its jobs come back, worker/queue/process/liveness.py), a
SIGTERM stops every process warmly with exit status 0, and a SIGKILL of the
supervisor itself takes the whole group down (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from support.queue import QueueEnv, finished, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.run.workergroup import celery_worker_args


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] not in "ZX"
    except FileNotFoundError:
        return False


def start_group(env: QueueEnv, log: Path, processes: int) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--processes", str(processes),
             "-c", "2", "--without-gossip", "--without-mingle"],
            env={**os.environ, **env.env}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def test_node_names_differ_per_process_and_extra_arguments_come_last() -> None:
    args = celery_worker_args(2, 3, "threads", 16, ["-n", "mail@box", "-l", "WARNING"])
    assert args[args.index("-P") + 1] == "threads" and args[args.index("-c") + 1] == "16"
    assert args[-4:] == ["-n", "mail-2@box", "-l", "WARNING"]  # celery takes the last -l
    assert "postroom-1@%h" in celery_worker_args(1, 2, "threads", 16, [])
    assert "postroom@%h" in celery_worker_args(1, 1, "threads", 16, [])


def test_the_group_delivers_restarts_a_killed_process_and_stops_on_sigterm(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    own_queue.account("grp", server)
    log = tmp_path / "group.log"
    group = start_group(own_queue, log, 2)
    producer = Producer(own_queue.broker_url, accounts_dir=own_queue.accounts, config_dir=own_queue.config)
    try:
        wait_for(lambda: log.read_bytes().count(b" ready.") >= 2, 60, "both worker processes to start")
        workers = children(group.pid)
        assert len(workers) == 2
        first = producer.send_notification("grp", ["a@example.net"], "one", "first")
        assert finished(producer, first).state == "sent"

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: b"exited with -9; starting it again" in log.read_bytes(), 15, "the restart notice")
        wait_for(lambda: len(children(group.pid) - {victim}) == 2, 30, "a new worker process")
        wait_for(lambda: log.read_bytes().count(b" ready.") >= 3, 60, "the new process to start")
        second = producer.send_notification("grp", ["b@example.net"], "two", "second")
        assert finished(producer, second).state == "sent"

        running = children(group.pid)
        group.send_signal(signal.SIGTERM)
        assert group.wait(60) == 0
        wait_for(lambda: not any(alive(p) for p in running), 10, "every worker process to stop")
        assert "Warm shutdown" in log.read_text(errors="replace")
    finally:
        producer.close()
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait(10)


def test_a_killed_supervisor_takes_its_worker_processes_with_it(own_queue: QueueEnv, tmp_path: Path) -> None:
    log = tmp_path / "group.log"
    group = start_group(own_queue, log, 2)
    try:
        wait_for(lambda: log.read_bytes().count(b" ready.") >= 2, 60, "both worker processes to start")
        workers = children(group.pid)
        assert len(workers) == 2
        group.send_signal(signal.SIGKILL)
        group.wait(10)
        wait_for(lambda: not any(alive(p) for p in workers), 30, "the orphaned worker processes to stop")
    finally:
        if group.poll() is None:
            group.kill()
            group.wait(10)
