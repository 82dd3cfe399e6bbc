"""Redis Sentinel for broker and state (contract §9): a failover under a running worker.

The test starts a master, a replica and a sentinel (redis-server processes on ports of
their own), runs a real worker and a producer on ``sentinel://…`` with
``POSTROOM_SENTINEL_MASTER``, SIGKILLs the master, and checks that the sentinel promotes
the replica and that the same worker and the same producer carry on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from support.queue import QueueEnv, Worker, cli, finished, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer

MASTER = "postroom-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server() -> str:
    from worker.run.embedded import redis_server_binary

    return redis_server_binary()


@dataclass
class Trio:
    """A master, its replica and one sentinel watching them."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> Trio:
        for role in ("master", "replica", "sentinel"):
            self.ports[role] = free_port()
        master, replica = self.ports["master"], self.ports["replica"]
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._run("master", [redis_server(), "--port", str(master), *common])
        self._run("replica", [redis_server(), "--port", str(replica), *common,
                              "--replicaof", "127.0.0.1", str(master)])  # fmt: skip
        conf = self.root / "sentinel.conf"
        conf.write_text(
            f"port {self.ports['sentinel']}\nbind 127.0.0.1\ndir {self.root}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        self._run("sentinel", [redis_server(), str(conf), "--sentinel"])
        wait_for(self._replicating, 20, "the replica to sync")
        wait_for(lambda: self.master_port() == master, 20, "the sentinel to see the master")
        return self

    def _run(self, role: str, args: list[str]) -> None:
        with (self.root / f"{role}.log").open("ab") as log:
            self.processes[role] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        wait_for(lambda: self._answers(self.ports[role]), 10, f"{role} to start")

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _replicating(self) -> bool:
        info = redis.Redis(port=self.ports["replica"]).info("replication")
        return info.get("master_link_status") == "up"

    def master_port(self) -> int | None:
        try:
            reply: Any = redis.Redis(port=self.ports["sentinel"]).sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            return None
        return int(reply[1]) if reply else None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.ports['sentinel']}/0"

    def kill_master(self) -> None:
        self.processes["master"].send_signal(signal.SIGKILL)
        self.processes["master"].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Trio]:
    started = Trio(tmp_path / "redis")
    started.root.mkdir()
    try:
        yield started.start()
    finally:
        started.stop()


def test_a_failover_under_a_running_worker_and_producer(
    trio: Trio, tmp_path: Path, smtp_server: Callable[..., SmtpServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = QueueEnv(tmp_path / "env", 0)
    env.broker_url = trio.url
    env.env.update(POSTROOM_BROKER_URL=trio.url, POSTROOM_SENTINEL_MASTER=MASTER)
    monkeypatch.setenv("POSTROOM_SENTINEL_MASTER", MASTER)
    monkeypatch.delenv("POSTROOM_REDIS_URL", raising=False)
    server = smtp_server(mode="plain")
    account = env.account("ha", server)
    producer = Producer(trio.url, accounts_dir=env.accounts, config_dir=env.config)
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        before = finished(producer, producer.send_notification(account, ["a@example.net"], "before", "x"))
        assert before.state == "sent"
        pid = worker.process.pid if worker.process else None
        trio.kill_master()
        killed = time.monotonic()
        wait_for(lambda: trio.master_port() == trio.ports["replica"], 30, "the replica to be promoted")
        promoted = time.monotonic() - killed
        job_id = None
        deadline = time.monotonic() + 30
        while job_id is None:  # the producer's publish retries ride out the last of the switch
            try:
                job_id = producer.send_notification(account, ["b@example.net"], "after", "x")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        after = finished(producer, job_id, timeout=60)
        carried_on = time.monotonic() - killed
        assert after.state == "sent"
        status = cli(env, "status", "--json")  # the CLI finds the new master too
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["queues"]["postroom"] == 0
        assert worker.alive() and worker.process is not None and worker.process.pid == pid
    finally:
        worker.stop()
        producer.close()
    print(f"\nSentinel: promoted after {promoted:.1f} s, the next job sent {carried_on:.1f} s after the kill")
    assert [r.message["Subject"] for r in server.received] == ["before", "after"]
    assert os.path.exists(trio.root / "sentinel.conf")
