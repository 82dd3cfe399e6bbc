"""A pause is not a death (issue 28): a worker frozen with SIGSTOP past its claims and woken with
SIGCONT after another worker redid its jobs sends none of them again.

Real processes with production settings: two ``postroom worker`` groups (no flags: one threads
process per core, the shipped time limits, retry delays and coalescing) share a queue of jobs to
a server that takes 0.5 s per DATA; one group is frozen for 45 s (a VM pause, a long GC, a
swapped host) while it holds jobs on connections, in its pool's wait and carried along. The
survivor gets them back by heartbeat (worker/queue/process/liveness.py) and sends them; the woken one
asks its fence right before each MAIL FROM (worker/queue/store/marks.py ``holds``) and stands down.
What may still go twice is only what was inside DATA at the freeze.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.queue import FAST_SETTINGS, QueueEnv, claim_database, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer

JOBS = 120
FREEZE = 45.0
CONNECTIONS = 4  # the default connection cap of a provider: other account, across every worker


@pytest.fixture
def production_env(real_redis: None, tmp_path: Path) -> Iterator[QueueEnv]:
    """A queue of its own, with the shipped settings (none of the tests' short delays)."""
    env = QueueEnv(tmp_path, claim_database())
    for name in FAST_SETTINGS:
        env.env.pop(name)
    yield env
    env.release()


def start_group(env: QueueEnv, log: Path) -> subprocess.Popen[bytes]:
    """``postroom worker`` with no flags, in a process group of its own (signalled as a whole)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"],
            env={**os.environ, **env.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def ready(log: Path) -> int:
    """How many of a group's worker processes said they are ready."""
    return log.read_bytes().count(b" ready.")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (each worker process runs in a session of its own)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [pid, *(p for kid in kids for p in tree(int(kid)))]


def signal_all(group: subprocess.Popen[bytes], sig: signal.Signals) -> list[int]:
    pids = tree(group.pid)
    for pid in pids:
        os.kill(pid, sig)
    return pids


def stop(group: subprocess.Popen[bytes]) -> None:
    if group.poll() is None:
        signal_all(group, signal.SIGCONT)
        os.killpg(group.pid, signal.SIGTERM)
        try:
            group.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait(10)


def test_a_worker_frozen_past_its_claims_sends_nothing_another_worker_sent(
    production_env: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    server = smtp_server(mode="plain", data_delay=0.5)
    account = production_env.account("frozen", server)
    processes = os.cpu_count() or 1
    logs = [tmp_path / "frozen.log", tmp_path / "survivor.log"]
    frozen, survivor = (start_group(production_env, log) for log in logs)
    producer = Producer(
        production_env.broker_url, accounts_dir=production_env.accounts, config_dir=production_env.config
    )
    try:
        wait_for(lambda: min(ready(log) for log in logs) >= processes, 60, "both groups up")
        ids = [
            producer.send_notification(account, [f"r{i}@example.net"], f"job {i}", "x") for i in range(JOBS)
        ]
        # both groups are delivering: each holds connections, sends waiting for one, carried jobs
        wait_for(lambda: len(server.received) >= 12, 60, "the first deliveries")
        assert len(signal_all(frozen, signal.SIGSTOP)) == processes + 1  # the supervisor and its workers
        frozen_at = time.monotonic()
        in_data_at_freeze = server.open_now  # connections open: at most this many were inside DATA
        wait_for(lambda: time.monotonic() - frozen_at >= FREEZE, FREEZE + 5, "the freeze")
        signal_all(frozen, signal.SIGCONT)
        wait_for(
            lambda: all((job := producer.job(j)) is not None and job.state == "sent" for j in ids),
            120,
            "every job to be sent",
        )
        time.sleep(5)  # the woken group's late sends, if it made any, arrive by now
    finally:
        stop(frozen)
        stop(survivor)
        producer.close()
    counts = Counter(r.message["Message-ID"] for r in server.received)
    twice = [mid for mid, n in counts.items() if n > 1]
    assert len(counts) == JOBS, "a message was lost"
    assert len(twice) <= min(CONNECTIONS, in_data_at_freeze), f"{len(twice)} sent twice: {twice}"
    woken = logs[0].read_text(errors="replace")
    # the scenario happened: the woken group had attempts another worker had taken over
    assert "was superseded by a later attempt" in woken, woken[-3000:]
