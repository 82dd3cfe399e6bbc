"""Postroom's end-to-end throughput bench, with its baselines run side by side.

``make bench`` runs ``.venv/bin/python bench/run.py``: in one run on one machine
it measures Postroom (single-message jobs, batch jobs, a slow server, 100
accounts) and the baselines it is judged against (a naive Celery + smtplib
task, a no-op Celery task, Nodemailer's pooled transport), then prints one
table and writes ``bench/RESULTS.md``. Figures are judged as ratios against
baselines measured minutes apart on the same cores, never as absolute numbers.

How a run is measured, and why:

* the queue is filled first (producer time is not the worker's throughput),
  then the worker starts; the clock starts when the first job leaves the queue
  (Celery's boot is not throughput either) and stops at the sink's timestamp of
  the last of the N messages, counted by Message-ID at the sink (Postroom's own
  counters are what is being tested, so they are never trusted);
* CPU is user+sys of the worker's whole process tree between those two
  moments, from /proc; Redis's CPU (``INFO cpu``) is shown too, since job
  records cost Redis time that the worker's CPU figure does not show;
* peak RSS is per process: /proc sampled every 100 ms, and the kernel's VmHWM.

Each scenario runs ``--runs`` times (default 3), interleaved with the others so
that a drift in machine load hits every row alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
LOOPBACK = "127.0.0.1"  # every server and client of the bench: loopback only
REDIS_HOST = LOOPBACK
REDIS_PORT = 6379
POSTROOM_QUEUE = "postroom"
MARKER = "postroom-bench:claimed"  # tells the test suite (which claims empty databases) this one is taken
CLAIM_SCRIPT = """
if redis.call('DBSIZE') == 0 or redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('FLUSHDB')
    redis.call('SET', KEYS[1], ARGV[1])
    return 1
end
return 0
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
MB = 1024 * 1024
CAP = 4  # the default connection cap of an account (provider "other"): Postroom's and Nodemailer's


class ScenarioError(Exception):
    """A run that did not complete; its row says why instead of a figure."""


class Skip(Exception):
    """A scenario that cannot run here (a missing tool or feature); its row says so."""


# ---- processes ---------------------------------------------------------------------------------------


def _libc_prctl() -> Callable[[], None] | None:
    """PR_SET_PDEATHSIG for children: if the bench is SIGKILLed, its servers and workers go too."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return die_with_parent


_DIE_WITH_PARENT = _libc_prctl()


class Procs:
    """Every process the bench starts, each in its own process group, stopped on any exit path."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: list[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        out: Any = subprocess.PIPE if stdout_pipe else subprocess.DEVNULL
        err: Any = subprocess.DEVNULL
        log_file = None
        if log is not None:
            log_file = log.open("ab")
            err = log_file
            if not stdout_pipe:
                out = log_file
        try:
            proc = subprocess.Popen(  # noqa: S603 - fixed argument lists built by this module
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the rest in order
                preexec_fn=_DIE_WITH_PARENT,
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the group leader (Celery's warm shutdown), then SIGKILL the whole group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # pool children left behind by a leader that died: the group outlives its leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            try:
                self.stop(proc, timeout=10.0)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScenarioError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ScenarioError(f"{what} did not listen on {port} within {timeout:.0f}s")


# ---- /proc sampling ----------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of every thread of ``pid``, in clock ticks."""
    data = _read(f"/proc/{pid}/stat")
    if data is None:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _rss(pid: int) -> int:
    """max(VmRSS, VmHWM) in bytes: the current RSS and the kernel's high-water mark."""
    data = _read(f"/proc/{pid}/status")
    peak = 0
    for line in (data or "").splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            kids += [int(p) for p in text.split()]
    return kids


class TreeSampler:
    """Samples a process tree every ``interval`` seconds: CPU ticks and peak RSS per process.

    Keeps the last CPU figure of a process that exited, so the tree's total
    stays right when a pool child is replaced during a run.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.cpu: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def pids(self) -> list[int]:
        seen: list[int] = []
        todo = [self.root]
        while todo and len(seen) < 1000:
            pid = todo.pop()
            if pid not in seen:
                seen.append(pid)
                todo += _children(pid)
        return seen

    def sample(self) -> dict[int, int]:
        """Take a sample now; returns the CPU ticks per process seen so far."""
        with self._lock:
            for pid in self.pids():
                ticks = _cpu_ticks(pid)
                if ticks is None:
                    continue
                self.cpu[pid] = ticks
                self.rss[pid] = max(self.rss.get(pid, 0), _rss(pid))
            return dict(self.cpu)

    @property
    def peak_rss(self) -> int:
        with self._lock:
            return max(self.rss.values(), default=0)

    @property
    def processes(self) -> int:
        with self._lock:
            return len(self.rss)


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / CLK_TCK


# ---- sinks: the only place deliveries are counted -----------------------------------------------------


class Sink:
    """A local SMTP server counting the messages whose Message-ID starts with ``<prefix``."""

    name = "sink"

    def __init__(self, procs: Procs, workdir: Path, prefix: str, delay: float) -> None:
        self.procs = procs
        self.workdir = workdir
        self.prefix = "<" + prefix
        self.delay = delay
        self.port = free_port()
        self.ids: dict[str, int] = {}  # Message-ID -> times received
        self.proc: subprocess.Popen[bytes] | None = None

    def poll(self) -> None:
        """Count what arrived since the last call."""
        raise NotImplementedError

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = _log_tail(self.workdir / "sink.log")
            raise ScenarioError(f"the sink exited with {self.proc.returncode}{tail}")

    def end_ns(self) -> int:
        """When the last counted message was received (the sink's own timestamps)."""
        raise NotImplementedError

    def _count(self, message_id: str) -> bool:
        if not message_id.startswith(self.prefix):
            return False
        self.ids[message_id] = self.ids.get(message_id, 0) + 1
        return True

    @property
    def distinct(self) -> int:
        return len(self.ids)

    @property
    def duplicates(self) -> int:
        return sum(self.ids.values()) - len(self.ids)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, timeout=5.0)
            self.proc = None


SINK_CACHE = ROOT / ".cache" / "postfix"


def fetch_smtp_sink() -> str | None:
    """Postfix's smtp-sink without installing Postfix: Debian's package unpacked under .cache/.

    Installing the ``postfix`` package would start a mail server on port 25; the bench
    only needs one binary and its libraries, so ``apt-get download`` + ``dpkg-deb -x``
    and a wrapper that points the loader at them. None when apt is not available.
    """
    wrapper = SINK_CACHE / "smtp-sink"
    if os.access(wrapper, os.X_OK):
        return str(wrapper)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    print("fetching Debian's postfix package for its smtp-sink (unpacked under .cache/, not installed)")
    SINK_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        for old in SINK_CACHE.glob("postfix_*.deb"):
            old.unlink()
        subprocess.run(
            ["apt-get", "download", "-q", "postfix"],  # noqa: S607
            cwd=SINK_CACHE,
            check=True,
            capture_output=True,
            timeout=120,
        )
        deb = next(SINK_CACHE.glob("postfix_*.deb"))
        subprocess.run(  # noqa: S603 - fixed arguments
            ["dpkg-deb", "-x", str(deb), str(SINK_CACHE / "root")],  # noqa: S607
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        print(f"could not fetch smtp-sink ({exc}); using the aiosmtpd sink")
        return None
    libs, binary = SINK_CACHE / "root/usr/lib/postfix", SINK_CACHE / "root/usr/sbin/smtp-sink"
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}" exec "{binary}" "$@"\n', encoding="ascii")
    wrapper.chmod(0o755)
    return str(wrapper)


class PostfixSink(Sink):
    """Postfix's ``smtp-sink`` (C, event driven: light on the 2 cores), one dump file per message."""

    name = "Postfix smtp-sink"

    def __init__(self, procs: Procs, workdir: Path, prefix: str, delay: float, binary: str) -> None:
        super().__init__(procs, workdir, prefix, delay)
        self.dump = workdir / "dump"
        self.dump.mkdir(parents=True)
        args = [binary]
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u; staying root keeps PR_SET_PDEATHSIG,
            # which switching to another user would clear
            args += ["-u", "root"]
        if delay:
            args += ["-w", f"{delay:g}"]
        args += ["-d", f"{self.dump}/m.", f"{LOOPBACK}:{self.port}", "256"]
        self.proc = procs.start(args, log=workdir / "sink.log")
        wait_listening(self.port, self.proc, "smtp-sink")
        self._files: dict[str, bool] = {}  # file name -> counted (False: no Message-ID seen yet)

    def poll(self) -> None:
        self.check_alive()
        with os.scandir(self.dump) as entries:
            names = [e.name for e in entries if not self._files.get(e.name)]
        for name in names:
            try:
                data = (self.dump / name).read_bytes()
            except OSError:
                continue
            head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
            found = MESSAGE_ID.search(head)
            if found is None:
                self._files[name] = False  # still arriving: read again next time
                continue
            self._files[name] = True
            self._count(found.group(1).decode("ascii", "replace"))

    def end_ns(self) -> int:
        latest = 0
        for name, counted in self._files.items():
            if counted:
                with contextlib.suppress(OSError):
                    latest = max(latest, (self.dump / name).stat().st_mtime_ns)
        return latest


class AiosmtpdSink(Sink):
    """Fallback: ``bench/sink.py`` (aiosmtpd) in a subprocess, one log line per message."""

    name = "aiosmtpd (bench/sink.py)"

    def __init__(self, procs: Procs, workdir: Path, prefix: str, delay: float) -> None:
        super().__init__(procs, workdir, prefix, delay)
        self.log = workdir / "sink-deliveries.log"
        self.log.touch()
        args = [sys.executable, str(BENCH_DIR / "sink.py"), "--port", str(self.port)]
        args += ["--delay", str(delay), "--log", str(self.log)]
        self.proc = procs.start(args, log=workdir / "sink.log")
        wait_listening(self.port, self.proc, "aiosmtpd sink")
        self._offset = 0
        self._latest = 0

    def poll(self) -> None:
        self.check_alive()
        with self.log.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("ascii", "replace").splitlines():
            stamp, _, message_id = line.partition(" ")
            if self._count(message_id):
                self._latest = max(self._latest, int(stamp))

    def end_ns(self) -> int:
        return self._latest


# ---- scenarios ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One row of the table. Pool and concurrency are parameters so they can be varied."""

    key: str
    label: str
    kind: str  # postroom | batch | naive | noop | nodemailer
    msgs: int
    pool: str = "prefork"
    concurrency: int = 2
    processes: int = 1  # worker processes (Postroom rows: what `postroom worker` starts)
    body: int = 1024
    accounts: int = 1
    max_connections: int = 16  # the account's cap across all worker processes; Nodemailer gets as many
    delay: float = 0.0  # seconds the sink waits before answering DATA
    batch_size: int = 50
    blocks: bool = False  # enqueue account by account instead of interleaved
    runs: int | None = None  # None: --runs
    producer: str = "helper"  # helper (Producer) | celery (a plain Celery send_task) | http (the API)
    attachment: int = 0  # bytes of a binary attachment (an invoice) on every message

    @property
    def worker(self) -> str:
        if self.kind == "nodemailer":
            return f"node, {self.max_connections} conns"
        each = f"{self.pool}x{self.concurrency}"
        running = f"{self.processes} procs x {each}" if self.processes > 1 else each
        return f"{running}, {self.max_connections} conns" if self.kind in ("postroom", "batch") else running

    @property
    def timeout(self) -> float:
        """Bounded wait for one run: generous, but a stuck run cannot eat the 10-minute budget."""
        return 60.0 + self.msgs * 0.05 + self.msgs * self.delay / self.max_connections


@dataclass
class RunResult:
    msgs: int
    seconds: float
    cpu_s: float
    redis_cpu_s: float
    redis_calls: int
    peak_rss: int
    note: str = ""
    ping_worst_ms: float = math.nan  # the slowest PING another client saw during the run
    ping_over_10ms: int = 0  # PINGs (one every 5 ms) that waited more than 10 ms
    ping_lag_ms: float = math.nan  # the side client's own worst oversleep (the machine's latency)
    ping_realtime: bool = False  # the side client ran SCHED_FIFO: its PINGs never waited for a CPU
    slowlog_worst_ms: float = math.nan  # Redis's SLOWLOG: the slowest command during the run
    mem_per_job: float = math.nan  # bytes of Redis memory per queued job (before the worker ran)

    @property
    def rate(self) -> float:
        return self.msgs / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Row:
    scenario: Scenario
    results: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    def median(self, pick: Callable[[RunResult], float]) -> float | None:
        values = [pick(r) for r in self.results]
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float | None:
        return self.median(lambda r: r.rate)


def body_text(size: int) -> str:
    """A plain ASCII body of exactly ``size`` bytes in short lines (7bit for every sender)."""
    line = "Postroom bench body: the quick brown fox jumps over the lazy dog, 0123456789.\n"
    return (line * (size // len(line) + 1))[: size - 1] + "\n"


def account_yaml(name: str, port: int, max_connections: int) -> str:
    return (
        "provider: other\n"
        "smtp:\n"
        f"  address: {name}@example.com\n"
        f"  host: {LOOPBACK}\n"
        f"  port: {port}\n"
        "  secure: false\n"
        "  auth: none\n"
        "limits:\n"
        f"  max_connections: {max_connections}\n"
    )


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The bench's environment without the caller's POSTROOM_* overrides, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(extra)
    return env


# The side client, a process of its own (a thread of this one would wait for this process's GIL
# behind the sampler and the sink's counting, and report that as Redis's latency), SCHED_FIFO when
# allowed (else its own wait for a CPU on a busy machine would be counted as Redis's): it PINGs
# every 5 ms and prints "<time_ns> <seconds waited> <seconds it overslept its 5 ms>" for each.
_SIDE_PING = """
import os, sys, time, redis
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    realtime = "1"
except (AttributeError, OSError):
    realtime = "0"
client = redis.Redis(sys.argv[1], int(sys.argv[2]), socket_timeout=10)
client.ping()
print("ready", realtime, flush=True)
while True:
    began = time.perf_counter()
    try:
        client.ping()
    except redis.RedisError:
        pass
    waited = time.perf_counter() - began
    slept = time.perf_counter()
    time.sleep(0.005)
    print(time.time_ns(), waited, time.perf_counter() - slept - 0.005, flush=True)
"""


class SidePing:
    """Another Redis client, PINGing every 5 ms in a process of its own; what it waited while
    ``measuring`` (between :meth:`start` and :meth:`stop`) is how long every other producer,
    worker and the HTTP API would have waited for Redis."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.over = 0
        self.lag_worst = 0.0  # the side client's own worst oversleep: the machine's, not Redis's
        self.realtime = False  # it runs SCHED_FIFO (root): its PINGs never wait for a CPU
        self._window: list[int] = []
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def __enter__(self) -> SidePing:
        self._proc = subprocess.Popen(  # noqa: S603 (our own interpreter and script)
            [sys.executable, "-c", _SIDE_PING, REDIS_HOST, str(REDIS_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        self.realtime = self._proc.stdout.readline().split()[-1:] == ["1"]  # "ready 1|0"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)

    def start(self) -> None:
        self._window = [time.time_ns()]

    def stop(self) -> None:
        """End the window and read what was waited in it (the samples up to its end)."""
        ended = time.time_ns()
        began = self._window[0] if self._window else ended
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not self._past(ended):
            time.sleep(0.01)
        for line in list(self._lines):
            with contextlib.suppress(ValueError):
                at, waited, lag = line.split()
                if began <= int(at) <= ended:
                    self.worst = max(self.worst, float(waited))
                    self.over += float(waited) > 0.010
                    self.lag_worst = max(self.lag_worst, float(lag))

    def _past(self, ended: int) -> bool:
        with contextlib.suppress(ValueError, IndexError):
            return int(self._lines[-1].split()[0]) > ended
        return False

    def __exit__(self, *_: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)


class Bench:
    """The shared state of one bench invocation: Redis, sinks, temporary folders, processes."""

    def __init__(self, args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.db: int = args.db
        self.broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"
        self.redis = redis.Redis(REDIS_HOST, REDIS_PORT, db=self.db, socket_timeout=10)
        self.smtp_sink = shutil.which("smtp-sink") or next(
            (p for p in ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink") if os.access(p, os.X_OK)), None
        )
        if self.smtp_sink is None and args.sink != "aiosmtpd":
            self.smtp_sink = fetch_smtp_sink()
        if args.sink == "aiosmtpd":
            self.smtp_sink = None
        elif args.sink == "smtp-sink" and self.smtp_sink is None:
            raise SystemExit("--sink smtp-sink: Postfix's smtp-sink is not installed")
        self.node = shutil.which("node")
        self._nodemailer: Path | str | None = None  # Path: installed; str: why not
        self._naive: ModuleType | None = None
        self._bodies: dict[int, Path] = {}
        self._runs = 0
        self.load_at_start = ""
        self.own_calls = 0  # Redis commands the bench itself sent (not counted against the worker)
        self.claimed = False  # True once the database was flushed as the bench's own
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._slowlog_was: str | None = None
        self.side_realtime: bool | None = None  # the side client ran SCHED_FIFO in every run
        self.redis_sched = "scheduling unknown"  # how the kernel ran the Redis server meanwhile

    @property
    def sink_name(self) -> str:
        return PostfixSink.name if self.smtp_sink else AiosmtpdSink.name

    # ---- Redis ----------------------------------------------------------------------------------------

    def fresh_db(self) -> None:
        """FLUSHDB, atomically, only if the database is empty or already the bench's, and mark it
        ours: the test suite claims empty databases (15 down to 1) the same way."""
        if not self._claim(keys=[MARKER], args=[os.getpid()]):
            self.claimed = False  # someone else's now: never flush it on the way out
            raise SystemExit(
                f"Redis db {self.db} on {REDIS_HOST}:{REDIS_PORT} holds keys that are not the bench's "
                "(a test session?); pick another with --db N"
            )
        self.claimed = True

    def list_keys(self) -> list[bytes]:
        """Where jobs wait to be taken: the broker's lists (a baseline's Celery queue, a raw
        producer's messages) and Postroom's ready sets (worker/queue/store/ready.py)."""
        lists = list(self.redis.scan_iter(count=1000, _type="LIST"))
        return lists + list(self.redis.scan_iter(match=b"postroom:ready:*", count=1000, _type="ZSET"))

    def queued(self, keys: list[bytes]) -> int:
        self.own_calls += len(keys)
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                if key.startswith(b"postroom:ready:"):
                    pipe.zcard(key)
                else:
                    pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

    def slowlog_reset(self) -> None:
        """Log every command slower than 1 ms from now on (restored by :meth:`slowlog_restore`)."""
        if self._slowlog_was is None:
            self._slowlog_was = str(
                self.redis.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
            )
            self.redis.config_set("slowlog-log-slower-than", 1000)
        self.redis.slowlog_reset()

    def slowlog_worst(self) -> float:
        entries = self.redis.slowlog_get(128)
        if os.environ.get("BENCH_SLOWLOG"):  # what was slow, for a look (not in the report)
            for e in sorted(entries, key=lambda e: -float(e["duration"]))[:5]:
                print(
                    f"\n    slowlog {float(e['duration']) / 1000:.1f} ms: {str(e['command'])[:160]}", end=""
                )
        return max((float(e["duration"]) / 1000 for e in entries), default=0.0)

    def slowlog_restore(self) -> None:
        if self._slowlog_was is not None:
            with contextlib.suppress(redis.RedisError):
                self.redis.config_set("slowlog-log-slower-than", self._slowlog_was)

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def redis_counters(self) -> tuple[float, int]:
        """Redis's CPU seconds and commands executed so far, less the bench's own polling."""
        info = self.redis.info("cpu")
        stats = self.redis.info("commandstats")
        calls = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"]), calls - self.own_calls

    # ---- helpers --------------------------------------------------------------------------------------

    def rundir(self, key: str) -> Path:
        self._runs += 1
        path = self.tmp / f"{self._runs:03d}-{key}"
        path.mkdir()
        return path

    def sink(self, workdir: Path, prefix: str, delay: float) -> Sink:
        if self.smtp_sink:
            return PostfixSink(self.procs, workdir, prefix, delay, self.smtp_sink)
        return AiosmtpdSink(self.procs, workdir, prefix, delay)

    def body_file(self, size: int) -> Path:
        if size not in self._bodies:
            path = self.tmp / f"body-{size}.txt"
            path.write_text(body_text(size), encoding="ascii")
            self._bodies[size] = path
        return self._bodies[size]

    def naive(self) -> ModuleType:
        """``bench.naive`` imported the way the worker imports it (the repository on sys.path)."""
        if self._naive is None:
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            os.environ["BENCH_BROKER_URL"] = self.broker_url
            self._naive = importlib.import_module("bench.naive")
        return self._naive

    def start_worker(
        self, app: str, queue_name: str, sc: Scenario, workdir: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        if app == "worker.queue.app":  # the shipped command: `postroom worker` (one process per core)
            args = [sys.executable, "-m", "worker.cli", "worker", "--processes", str(sc.processes)]
        else:
            args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue_name]
        args += ["-P", sc.pool, "-c", str(sc.concurrency), "-l", "WARNING", "--without-gossip"]
        args += ["--without-mingle", "-n", f"bench-{uuid.uuid4().hex[:8]}@%h"]
        # Celery takes "-P prefork" for its default and lets a configured worker_pool win over it
        # (worker.queue.app configures one): the setting must say the same, or Postroom rows run threads.
        env = {**env, "POSTROOM_WORKER_POOL": sc.pool}
        return self.procs.start(args, log=workdir / "worker.log", env=_clean_env(env), cwd=workdir)

    def wait_dequeue(
        self, proc: subprocess.Popen[bytes], keys: list[bytes], initial: int
    ) -> Callable[[], int]:
        """A start clock: the moment the first job leaves the queue (Celery's boot excluded)."""

        def wait() -> int:
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline:
                if self.queued(keys) < initial:
                    return time.time_ns()
                if proc.poll() is not None:
                    raise ScenarioError(f"worker exited with {proc.returncode} before taking a job")
                time.sleep(0.005)
            raise ScenarioError("worker took no job within 60 s")

        return wait

    def measure(
        self,
        sc: Scenario,
        proc: subprocess.Popen[bytes],
        *,
        wait_start: Callable[[], int],
        done: Callable[[], bool],
        end_ns: Callable[[], int],
        progress: Callable[[], str],
        poll: float = 0.05,
        settle: float = 0.0,
    ) -> RunResult:
        """Run the clock from ``wait_start`` to ``done``, sampling ``proc``'s tree meanwhile, and
        a side client PINGing Redis every 5 ms (what every other producer and worker would wait)."""
        with TreeSampler(proc.pid) as sampler, SidePing() as ping:
            start = wait_start()
            self.slowlog_reset()
            ping.start()
            cpu0, (redis0, calls0) = sampler.sample(), self.redis_counters()
            deadline = time.monotonic() + sc.timeout
            while not done():
                if time.monotonic() > deadline:
                    raise ScenarioError(f"timed out after {sc.timeout:.0f}s with {progress()}")
                if proc.poll() is not None and not done():
                    raise ScenarioError(f"process exited with {proc.returncode} with {progress()}")
                time.sleep(poll)
            cpu1, (redis1, calls1) = sampler.sample(), self.redis_counters()
            ping.stop()
            time.sleep(0.05)  # the last dump file's final write; then the sink's own timestamp
            end = end_ns()
            if settle:
                time.sleep(settle)
            sampler.sample()
            return RunResult(
                msgs=sc.msgs,
                seconds=(end - start) / 1e9,
                cpu_s=cpu_seconds(cpu0, cpu1),
                redis_cpu_s=redis1 - redis0,
                redis_calls=calls1 - calls0,
                peak_rss=sampler.peak_rss,
                ping_worst_ms=ping.worst * 1000,
                ping_over_10ms=ping.over,
                ping_lag_ms=ping.lag_worst * 1000,
                ping_realtime=ping.realtime,
                slowlog_worst_ms=self.slowlog_worst(),
            )

    def sink_done(self, sink: Sink, expected: int) -> Callable[[], bool]:
        def done() -> bool:
            sink.poll()
            return sink.distinct >= expected

        return done

    def finish(self, result: RunResult, sink: Sink) -> RunResult:
        sink.poll()
        if sink.duplicates:
            result.note = f"{sink.duplicates} duplicate deliveries at the sink"
        return result

    # ---- Postroom ---------------------------------------------------------------------------------------

    def run_postroom(self, sc: Scenario) -> RunResult:
        from worker.client import Producer  # here, so a broken worker/ fails its rows, not the bench

        batch = sc.kind == "batch"
        if batch and not hasattr(Producer, "send_batch"):
            raise Skip("not available (worker.client.Producer has no send_batch)")
        self.fresh_db()
        workdir = self.rundir(sc.key)
        prefix = f"b{uuid.uuid4().hex[:10]}"
        accounts_dir, config_dir = workdir / "accounts", workdir / "config"
        for folder in (accounts_dir, config_dir / "auth-profiles", config_dir / "keystores"):
            folder.mkdir(parents=True)
        sink = self.sink(workdir, prefix, sc.delay)
        try:
            names = [f"bench{i:03d}" for i in range(1, sc.accounts + 1)]
            for name in names:
                (accounts_dir / f"{name}.yaml").write_text(account_yaml(name, sink.port, sc.max_connections))
            body = body_text(sc.body)
            attachments = []
            if sc.attachment:
                content = base64.b64encode(self.attachment_bytes(sc.attachment)).decode()
                attachments = [
                    {
                        "filename": "invoice.bin",
                        "content_type": "application/octet-stream",
                        "content_base64": content,
                    }
                ]
            payloads: list[dict[str, Any]] = [
                {
                    # interleaved, as mixed traffic arrives; or one account's backlog after another's
                    "account": names[i * len(names) // sc.msgs] if sc.blocks else names[i % len(names)],
                    "kind": "notification",
                    "to": [f"rcpt{i}@example.net"],
                    "subject": f"bench {i}",
                    "text": body,
                    "message_id": f"<{prefix}.{i}@example.com>",
                    **({"attachments": attachments} if attachments else {}),
                }
                for i in range(sc.msgs)
            ]
            memory = self.used_memory()
            self.enqueue(sc, payloads, accounts_dir, config_dir, workdir)
            per_job = (self.used_memory() - memory) / sc.msgs
            keys = self.list_keys()
            initial = self.queued(keys)
            env = {
                "POSTROOM_BROKER_URL": self.broker_url,
                "POSTROOM_ACCOUNTS_DIR": str(accounts_dir),
                "POSTROOM_CONFIG_DIR": str(config_dir),
                "POSTROOM_VAR_DIR": str(workdir / "var"),
            }
            proc = self.start_worker("worker.queue.app", POSTROOM_QUEUE, sc, workdir, env)
            try:
                result = self.measure(
                    sc,
                    proc,
                    wait_start=self.wait_dequeue(proc, keys, initial),
                    done=self.sink_done(sink, sc.msgs),
                    end_ns=sink.end_ns,
                    progress=lambda: f"{sink.distinct}/{sc.msgs} delivered",
                    settle=0.5 if sc.accounts > 1 else 0.0,
                )
            except ScenarioError as exc:
                raise ScenarioError(f"{exc}{_log_tail(workdir / 'worker.log')}") from None
            finally:
                self.procs.stop(proc)
            result.mem_per_job = per_job
            return self.finish(result, sink)
        finally:
            sink.stop()

    def attachment_bytes(self, size: int) -> bytes:
        """Incompressible bytes (an invoice PDF's worth): the same for every row and for Nodemailer."""
        path = self.tmp / f"attachment-{size}.bin"
        if not path.exists():
            path.write_bytes(random.Random(size).randbytes(size))
        return path.read_bytes()

    def enqueue(
        self,
        sc: Scenario,
        payloads: list[dict[str, Any]],
        accounts_dir: Path,
        config_dir: Path,
        workdir: Path,
    ) -> None:
        """Queue the row's jobs before the worker starts, as its producer would."""
        from worker.client import Producer
        from worker.records.loader import Records

        if sc.producer == "celery":  # the README's first producer example: a plain Celery app's send_task
            from celery import Celery

            app = Celery("a-plain-celery-app", broker=self.broker_url, set_as_current=False)
            try:
                for payload in payloads:
                    app.send_task("postroom.send", kwargs=payload, queue=POSTROOM_QUEUE)
            finally:
                app.close()
            return
        if sc.producer == "http":
            self.enqueue_http(payloads, accounts_dir, config_dir, workdir)
            return
        producer = Producer(self.broker_url, records=Records.load(accounts_dir, config_dir))
        try:
            if sc.kind == "batch":
                for i in range(0, len(payloads), sc.batch_size):
                    producer.send_batch(payloads[i : i + sc.batch_size])
            else:
                for payload in payloads:
                    producer.enqueue(payload)
        finally:
            producer.close()

    def enqueue_http(
        self, payloads: list[dict[str, Any]], accounts_dir: Path, config_dir: Path, workdir: Path
    ) -> None:
        """``postroom http`` (its own process, stopped before the worker starts) and one POST each."""
        import httpx

        from worker.web import apikeys

        token = apikeys.new_token("bench")
        (config_dir / "api-keys").mkdir(exist_ok=True)
        accounts = sorted({str(p["account"]) for p in payloads})
        (config_dir / "api-keys" / "bench.yaml").write_text(
            f"hash: {apikeys.hash_token(token)}\naccounts: {json.dumps(accounts)}\nrate: 1000000/minute\n"
        )
        port = free_port()
        env = {
            "POSTROOM_BROKER_URL": self.broker_url,
            "POSTROOM_ACCOUNTS_DIR": str(accounts_dir),
            "POSTROOM_CONFIG_DIR": str(config_dir),
            "POSTROOM_VAR_DIR": str(workdir / "var"),
        }
        args = [sys.executable, "-m", "worker.cli", "http", "--port", str(port)]
        proc = self.procs.start(args, log=workdir / "http.log", env=_clean_env(env), cwd=workdir)
        try:
            wait_listening(port, proc, "postroom http")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", headers=headers, timeout=30) as client:
                for payload in payloads:
                    reply = client.post("/v1/messages", json=payload)
                    if reply.status_code != 202:
                        raise ScenarioError(f"POST /v1/messages: {reply.status_code} {reply.text[:200]}")
        finally:
            self.procs.stop(proc)

    # ---- baselines --------------------------------------------------------------------------------------

    def run_celery_baseline(self, sc: Scenario) -> RunResult:
        naive = self.naive()
        self.fresh_db()
        workdir = self.rundir(sc.key)
        prefix = f"b{uuid.uuid4().hex[:10]}"
        sink = self.sink(workdir, prefix, sc.delay) if sc.kind == "naive" else None
        try:
            body = body_text(sc.body)
            task = naive.NAIVE_TASK if sc.kind == "naive" else naive.NOOP_TASK
            for i in range(sc.msgs):
                kwargs = {
                    "host": LOOPBACK,
                    "port": sink.port if sink else 0,
                    "sender": "naive@example.com",
                    "to": [f"rcpt{i}@example.net"],
                    "subject": f"bench {i}",
                    "text": body,
                    "message_id": f"<{prefix}.{i}@example.com>",
                }
                naive.app.send_task(task, kwargs=kwargs, queue=naive.QUEUE)
            keys = self.list_keys()
            initial = self.queued(keys)
            env = {"BENCH_BROKER_URL": self.broker_url, "PYTHONPATH": str(ROOT)}
            proc = self.start_worker("bench.naive", naive.QUEUE, sc, workdir, env)
            try:
                if sink is not None:
                    result = self.measure(
                        sc,
                        proc,
                        wait_start=self.wait_dequeue(proc, keys, initial),
                        done=self.sink_done(sink, sc.msgs),
                        end_ns=sink.end_ns,
                        progress=lambda: f"{sink.distinct}/{sc.msgs} delivered",
                    )
                    return self.finish(result, sink)
                drained = _Drained(self, keys)
                return self.measure(
                    sc,
                    proc,
                    wait_start=self.wait_dequeue(proc, keys, initial),
                    done=drained,
                    end_ns=lambda: drained.at,
                    progress=lambda: f"{self.queued(keys)} still queued",
                    poll=0.005,
                )
            except ScenarioError as exc:
                raise ScenarioError(f"{exc}{_log_tail(workdir / 'worker.log')}") from None
            finally:
                self.procs.stop(proc)
        finally:
            if sink is not None:
                sink.stop()

    def nodemailer(self) -> Path:
        """``npm install nodemailer`` into a temporary folder, once per bench run."""
        if self._nodemailer is None:
            if not self.node or not shutil.which("npm"):
                self._nodemailer = "skipped: node/npm not found"
            else:
                target = self.tmp / "node"
                target.mkdir()
                npm = shutil.which("npm") or "npm"
                args = [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund"]
                args += ["--no-package-lock", "--loglevel", "error", "nodemailer"]
                try:
                    subprocess.run(  # noqa: S603 - fixed argument list
                        args, check=True, capture_output=True, timeout=180, stdin=subprocess.DEVNULL
                    )
                    self._nodemailer = target / "node_modules"
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                    detail = getattr(exc, "stderr", b"") or b""
                    self._nodemailer = f"skipped: npm install nodemailer failed ({exc}) {detail[-200:]!r}"
        if isinstance(self._nodemailer, str):
            raise Skip(self._nodemailer)
        return self._nodemailer

    def nodemailer_version(self) -> str | None:
        if not isinstance(self._nodemailer, Path):
            return None
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads((self._nodemailer / "nodemailer" / "package.json").read_text())
            return str(data["version"])
        return None

    def run_nodemailer(self, sc: Scenario) -> RunResult:
        node_modules = self.nodemailer()
        assert self.node is not None
        workdir = self.rundir(sc.key)
        prefix = f"b{uuid.uuid4().hex[:10]}"
        sink = self.sink(workdir, prefix, sc.delay)
        try:
            args = [self.node, str(BENCH_DIR / "nodemailer_send.js"), str(sink.port), str(sc.msgs)]
            args += [str(self.body_file(sc.body)), prefix, str(sc.max_connections)]
            if sc.attachment:
                self.attachment_bytes(sc.attachment)
                args.append(str(self.tmp / f"attachment-{sc.attachment}.bin"))
            env = {**os.environ, "NODE_PATH": str(node_modules)}
            proc = self.procs.start(args, log=workdir / "node.log", env=env, cwd=workdir, stdout_pipe=True)
            lines: queue.Queue[str] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
            reader.start()

            def wait_start() -> int:
                deadline = time.monotonic() + 60.0
                while time.monotonic() < deadline:
                    with contextlib.suppress(queue.Empty):
                        line = lines.get(timeout=0.5)
                        if line.startswith("START "):
                            return int(line.split()[1]) * 1_000_000
                    if proc.poll() is not None and lines.empty():
                        raise ScenarioError(
                            f"node exited with {proc.returncode}{_log_tail(workdir / 'node.log')}"
                        )
                raise ScenarioError("node did not start within 60 s")

            try:
                result = self.measure(
                    sc,
                    proc,
                    wait_start=wait_start,
                    done=self.sink_done(sink, sc.msgs),
                    end_ns=sink.end_ns,
                    progress=lambda: f"{sink.distinct}/{sc.msgs} delivered",
                )
                summary = ""
                with contextlib.suppress(queue.Empty):
                    deadline = time.monotonic() + 30.0
                    while not summary.startswith("DONE") and time.monotonic() < deadline:
                        summary = lines.get(timeout=1.0)
                if "failed=0" not in summary:
                    result.note = f"nodemailer: {summary or 'no DONE line'}"
            finally:
                self.procs.stop(proc, timeout=5.0)
                reader.join(5)
                if proc.stdout is not None:
                    proc.stdout.close()
            return self.finish(result, sink)
        finally:
            sink.stop()

    def run(self, sc: Scenario) -> RunResult:
        if sc.kind in ("postroom", "batch"):
            return self.run_postroom(sc)
        if sc.kind in ("naive", "noop"):
            return self.run_celery_baseline(sc)
        if sc.kind == "nodemailer":
            return self.run_nodemailer(sc)
        raise ValueError(sc.kind)


class _Drained:
    """Done when no job is queued or unacknowledged (the no-op task leaves nothing to count);
    seen twice in a row, since kombu moves a message to ``unacked`` just after popping it."""

    def __init__(self, bench: Bench, keys: list[bytes]) -> None:
        self.bench = bench
        self.keys = keys
        self.at = 0
        self._first = 0

    def __call__(self) -> bool:
        now = time.time_ns()
        self.bench.own_calls += 1
        empty = self.bench.queued(self.keys) == 0 and int(self.bench.redis.hlen("unacked")) == 0
        if not empty:
            self._first = 0
            return False
        if not self._first:
            self._first = now
            return False
        self.at = self._first
        return True


def _pump(proc: subprocess.Popen[bytes], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        lines.put(raw.decode("utf-8", "replace").strip())


def _log_tail(path: Path, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        if tail:
            return "\n      " + "\n      ".join(tail)
    return ""


def shipped_worker() -> tuple[str, int, int]:
    """The pool, concurrency and process count `postroom worker` runs with no flags
    (config/settings.yaml; worker_processes 0 is one per core)."""
    sys.path.insert(0, str(ROOT))
    from worker.run.workergroup import process_count
    from worker.settings import load_settings

    settings = load_settings()
    return settings.worker_pool, settings.worker_concurrency, process_count(None, settings.worker_processes)


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    n = args.n or (300 if args.quick else 2000)
    big = max(100, n // 10)  # the 1 MB rows: a tenth of the messages (a gigabyte through Redis otherwise)
    slow = args.slow_n or (30 if args.quick else 100)
    shipped = shipped_worker()
    # Postroom's rows run what `postroom worker` runs unless told otherwise (then the Worker column
    # says what ran instead), on an account with the default connection cap (4) unless the row says;
    # Nodemailer gets the same cap. The Celery baselines run prefork with one process per core.
    fast: dict[str, Any] = {
        "pool": args.pool or shipped[0],
        "concurrency": args.concurrency or shipped[1],
        "processes": args.processes or shipped[2],
        "max_connections": CAP,
    }
    baseline: dict[str, Any] = {"pool": "prefork", "concurrency": os.cpu_count() or 1}
    slowp: dict[str, Any] = {
        "pool": args.slow_pool or shipped[0],
        "concurrency": args.slow_concurrency or shipped[1],
        "processes": args.processes or shipped[2],
        "delay": 1.0,
        "max_connections": 10,
    }
    bs = args.batch_size
    kb, mb = 1024, 1024 * 1024
    rows = [
        Scenario("single-1k", "single jobs, 1 KB, Python helper", "postroom", n, **fast),
        Scenario(
            "single-1k-celery",
            "single jobs, 1 KB, plain Celery send_task",
            "postroom",
            n,
            producer="celery",
            **fast,
        ),
        Scenario("single-1k-http", "single jobs, 1 KB, HTTP API", "postroom", n, producer="http", **fast),
        Scenario("single-20k", "single jobs, 20 KB, Python helper", "postroom", n, body=20 * kb, **fast),
        Scenario("single-100k", "single jobs, 100 KB, Python helper", "postroom", n, body=100 * kb, **fast),
        Scenario(
            "single-100k-celery",
            "single jobs, 100 KB, plain Celery send_task",
            "postroom",
            n,
            body=100 * kb,
            producer="celery",
            **fast,
        ),
        Scenario(
            "single-100k-http",
            "single jobs, 100 KB, HTTP API",
            "postroom",
            n,
            body=100 * kb,
            producer="http",
            **fast,
        ),
        Scenario(
            "single-1m",
            "single jobs, 1 KB + a 1 MB attachment, Python helper",
            "postroom",
            big,
            attachment=mb,
            **fast,
        ),
        Scenario("batch-1k", f"batch jobs ({bs}/job), 1 KB", "batch", n, batch_size=bs, **fast),
        Scenario(
            "batch-100k", f"batch jobs ({bs}/job), 100 KB", "batch", n, body=100 * kb, batch_size=bs, **fast
        ),
        Scenario("nodemailer-1k", "baseline: Nodemailer pool, 1 KB", "nodemailer", n, max_connections=CAP),
        Scenario(
            "nodemailer-20k",
            "baseline: Nodemailer pool, 20 KB",
            "nodemailer",
            n,
            body=20 * kb,
            max_connections=CAP,
        ),
        Scenario(
            "nodemailer-100k",
            "baseline: Nodemailer pool, 100 KB",
            "nodemailer",
            n,
            body=100 * kb,
            max_connections=CAP,
        ),
        Scenario(
            "nodemailer-1m",
            "baseline: Nodemailer pool, 1 KB + a 1 MB attachment",
            "nodemailer",
            big,
            attachment=mb,
            max_connections=CAP,
        ),
        Scenario(
            "single-1k-16",
            "single jobs, 1 KB, Python helper, 16 connections",
            "postroom",
            n,
            **{**fast, "max_connections": 16},
        ),
        Scenario(
            "nodemailer-1k-16",
            "baseline: Nodemailer pool, 1 KB, 16 connections",
            "nodemailer",
            n,
            max_connections=16,
        ),
        Scenario(
            "naive-1k",
            "baseline: naive Celery task (smtplib, 1 connection/msg), 1 KB",
            "naive",
            n,
            **baseline,
        ),
        Scenario("noop", "baseline: no-op Celery task (same payload)", "noop", n, **baseline),
        Scenario("slow-1", "slow server (DATA +1 s): 1 account, 10 conns", "postroom", slow, **slowp),
        Scenario(
            "slow-4",
            "slow server (DATA +1 s): 4 accounts, 10 conns each",
            "postroom",
            4 * slow,
            accounts=4,
            **slowp,
        ),
        Scenario("rss-100", "100 account records, 1 msg each", "postroom", 100, accounts=100, **fast),
    ]
    return rows


# ---- report ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def results_table(rows: list[Row]) -> list[str]:
    out = [
        "| Scenario | Worker | Msgs | msgs/s (median) | min-max | worker CPU ms/msg | Redis CPU ms/msg "
        "| Redis cmds/msg | worst PING ms | PINGs > 10 ms | slowest command ms | Redis KiB/queued job "
        "| peak RSS MB | Runs | Notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        sc = row.scenario
        notes = sorted({r.note for r in row.results if r.note} | {e.splitlines()[0] for e in row.errors})
        if row.skipped:
            notes.insert(0, row.skipped)
        rates = [r.rate for r in row.results]
        spread = f"{min(rates):.1f}-{max(rates):.1f}" if len(rates) > 1 else ""
        cpu = row.median(lambda r: r.cpu_s / r.msgs * 1000)
        rcpu = row.median(lambda r: r.redis_cpu_s / r.msgs * 1000)
        calls = row.median(lambda r: r.redis_calls / r.msgs)
        rss = max((r.peak_rss for r in row.results), default=0) / MB if row.results else None
        ping = max((r.ping_worst_ms for r in row.results), default=None)
        over = max((r.ping_over_10ms for r in row.results), default=None)
        slowest = max((r.slowlog_worst_ms for r in row.results), default=None)
        memory = row.median(lambda r: r.mem_per_job / 1024)
        cells = [
            f"{sc.key}: {sc.label}",
            sc.worker,
            str(sc.msgs),
            _fmt(row.rate, ".1f"),
            spread,
            _fmt(cpu, ".2f"),
            _fmt(rcpu, ".2f"),
            _fmt(calls, ".1f"),
            _fmt(ping, ".1f"),
            "-" if over is None else str(over),
            _fmt(slowest, ".1f"),
            _fmt(memory, ".1f"),
            _fmt(rss, ".1f"),
            f"{len(row.results)}",
            "; ".join(notes).replace("|", "/"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


@dataclass
class Check:
    label: str
    value: float | None
    shown: str
    target: str
    ok: bool | None


def checks(rows: dict[str, Row]) -> list[Check]:
    def rate(key: str) -> float | None:
        row = rows.get(key)
        return row.rate if row else None

    def ratio(label: str, num: str, den: str, target: float) -> Check:
        a, b = rate(num), rate(den)
        value = a / b if a is not None and b else None
        shown = f"{value:.2f}x" if value is not None else f"n/a ({num if a is None else den} missing)"
        return Check(label, value, shown, f"≥ {target:g}x", None if value is None else value >= target)

    out = [
        ratio(f"single 1 KB, {who} / Nodemailer (same cap)", key, "nodemailer-1k", 0.8)
        for who, key in (
            ("helper", "single-1k"),
            ("plain Celery", "single-1k-celery"),
            ("HTTP", "single-1k-http"),
        )
    ]
    out += [
        ratio(f"single 100 KB, {who} / Nodemailer (same cap)", key, "nodemailer-100k", 1.0)
        for who, key in (
            ("helper", "single-100k"),
            ("plain Celery", "single-100k-celery"),
            ("HTTP", "single-100k-http"),
        )
    ]
    out += [
        ratio("batch 1 KB / Nodemailer (same cap)", "batch-1k", "nodemailer-1k", 1.5),
        ratio("batch 100 KB / Nodemailer (same cap)", "batch-100k", "nodemailer-100k", 1.5),
        ratio("single 1 KB / naive Celery", "single-1k", "naive-1k", 3.0),
        ratio("slow server: four accounts / one account", "slow-4", "slow-1", 3.5),
    ]
    for label, key in (
        ("1 MB attachment", "single-1m"),
        ("20 KB", "single-20k"),
        ("16 conns", "single-1k-16"),
    ):
        den = {"single-1m": "nodemailer-1m", "single-20k": "nodemailer-20k"}.get(key, "nodemailer-1k-16")
        out.append(
            replace(ratio(f"single {label} / Nodemailer (same cap)", key, den, 0), target="info", ok=None)
        )
    postroom = [r for r in rows.values() if r.results and r.scenario.kind in ("postroom", "batch")]
    worst = max((res.ping_worst_ms for r in postroom for res in r.results), default=None)
    over = sum(res.ping_over_10ms for r in postroom for res in r.results)
    out.append(
        Check(
            "worst PING of a side client in any Postroom row",
            worst,
            "n/a" if worst is None else f"{worst:.1f} ms ({over} over 10 ms)",
            "≤ 10 ms",
            None if worst is None else worst <= 10,
        )
    )
    slowest = max((res.slowlog_worst_ms for r in postroom for res in r.results), default=None)
    out.append(
        Check(
            "slowest Redis command (SLOWLOG) in any Postroom row",
            slowest,
            "n/a" if slowest is None else f"{slowest:.1f} ms",
            "≤ 10 ms",
            None if slowest is None else slowest <= 10,
        )
    )
    hundred = rows.get("single-100k")
    if hundred is not None and hundred.results:
        per_job = statistics.median(r.mem_per_job for r in hundred.results)
        payload = 100 * 1024
        out.append(
            Check(
                "Redis memory per queued 100 KB job (helper)",
                per_job,
                f"{per_job / 1024:.1f} KiB ({per_job / payload:.2f}x the payload)",
                "≤ 1.3x payload + 2 KiB",
                per_job <= 1.3 * payload + 2048,
            )
        )
    one = rate("slow-1")
    out.append(
        Check(
            "slow server: one account (10 conns), msgs/s vs 10 msgs/s",
            one,
            f"{one:.2f} msgs/s ({one / 10:.2f}x of 10)" if one is not None else "n/a (slow-1 missing)",
            "≥ 9 msgs/s",
            None if one is None else one >= 9.0,
        )
    )
    rss = rows.get("rss-100")
    if rss is not None and rss.results:
        worst_rss = max(res.peak_rss for res in rss.results) / MB
        out.append(
            Check(
                "peak RSS per worker process, 100 accounts",
                worst_rss,
                f"{worst_rss:.1f} MB",
                "< 150 MB",
                worst_rss < 150,
            )
        )
    return out


def checks_table(found: list[Check]) -> list[str]:
    out = ["| Check | Value | Target | Result |", "|---|--:|--:|---|"]
    for check in found:
        result = "n/a" if check.ok is None else ("PASS" if check.ok else "FAIL")
        if check.target == "info":
            result = "(not a target)"
        out.append(f"| {check.label} | {check.shown} | {check.target} | {result} |")
    return out


def environment(bench: Bench) -> list[str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    redis_version = str(bench.redis.info("server").get("redis_version", "?"))
    node = "not found"
    if bench.node:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            node = subprocess.run(  # noqa: S603 - fixed argument list
                [bench.node, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        nodemailer = bench.nodemailer_version()
        node += f", nodemailer {nodemailer}" if nodemailer else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, load average at start {bench.load_at_start}, at end {load}",
        f"- Celery {version('celery')}, kombu {version('kombu')}, aiosmtplib {version('aiosmtplib')}; "
        f"Redis {redis_version} on {REDIS_HOST}:{REDIS_PORT} db {bench.db}",
        f"- Sink: {bench.sink_name}; Node: {node}",
        f"- Scheduling: Redis {bench.redis_sched}; the side client that PINGs "
        + ("SCHED_FIFO (its PINGs never wait for a CPU)" if bench.side_realtime else "the default policy"),
    ]


def redis_policy(client: redis.Redis) -> str:
    """How the kernel schedules the Redis server (its process id from INFO; same machine)."""
    try:
        pid = int(client.info("server")["process_id"])
        policy = os.sched_getscheduler(pid)
    except (redis.RedisError, KeyError, ValueError, OSError):
        return "scheduling unknown"
    if policy == os.SCHED_FIFO:
        return "SCHED_FIFO (--redis-realtime: never preempted; not how Redis runs by default)"
    return "the default policy (SCHED_OTHER: it shares the cores with everything else)"


@contextlib.contextmanager
def redis_realtime(client: redis.Redis, on: bool) -> Iterator[None]:
    """With ``on``, every thread of the Redis server SCHED_FIFO for the block, then back."""
    if not on:
        yield
        return
    pid = int(client.info("server")["process_id"])
    tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    try:
        for tid in tasks:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(10))
    except PermissionError as exc:
        raise SystemExit(f"--redis-realtime: cannot change Redis's scheduling ({exc}); run as root") from exc
    try:
        yield
    finally:
        for tid in tasks:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


METHOD = """\
How it is measured: the queue is filled before the worker starts; the clock runs from the first job
leaving the queue to the sink's timestamp of the last of the N messages, counted by Message-ID at the
sink (no-op: until nothing is queued or unacknowledged; Nodemailer: from its first `sendMail`).
msgs/s is the median over the runs (min-max beside it). Worker CPU is user+sys of the worker's
process tree over the same interval (for Nodemailer, the node process); Redis CPU is `INFO cpu`
over it (job records cost Redis time; a plain Celery row also pays for taking its jobs in during the
clock, which the helper and HTTP rows did at enqueue). Worst PING and PINGs > 10 ms: a side client in
a process of its own PINGs Redis every 5 ms during the drain (what every other producer and worker
waits); slowest command: Redis's SLOWLOG over the drain. Redis KiB per queued job: `used_memory`
after filling the queue, less before, over N (a plain Celery row: the jobs in kombu's list, as the
client wrote them). Peak RSS is the largest single process of the tree, sampled
every 100 ms from /proc (VmRSS and VmHWM), worst run. Postroom and the Celery baselines use the same
broker, database and worker flags (acks_late, prefetch 1, `--without-gossip --without-mingle`).
Slow server: the sink waits 1 s before answering DATA; four accounts share one sink, jobs
interleaved by account. rss-*: 100 account records, one message to each."""


def report(bench: Bench, rows: list[Row], started: dt.datetime, command: str, elapsed: float) -> str:
    lines = [
        "# Postroom bench results",
        "",
        f"- Command: `{command}` (what `make bench` runs)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}, {elapsed:.0f} s in all",
        *environment(bench),
        "",
        *results_table(rows),
        "",
        *checks_table(checks({r.scenario.key: r for r in rows})),
        "",
        METHOD,
        "",
    ]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Postroom's throughput against baselines run side by side.")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 run, smaller N")
    parser.add_argument("--runs", type=int, help="runs per scenario (default 3; 1 with --quick)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run scenarios whose key starts with NAME (repeatable, or comma-separated)",
    )
    parser.add_argument("--n", type=int, help="messages per throughput run (default 2000; 300 with --quick)")
    parser.add_argument(
        "--slow-n", type=int, help="messages per account, slow server (default 100; 30 quick)"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="messages per batch job")
    parser.add_argument("--pool", help="worker pool for Postroom's rows (default: the shipped setting)")
    parser.add_argument(
        "--concurrency", type=int, help="worker concurrency, Postroom's rows (default: shipped)"
    )
    parser.add_argument(
        "--processes", type=int, help="worker processes, Postroom's rows (default: shipped, one per core)"
    )
    parser.add_argument("--slow-pool", help="worker pool for the slow-server rows (default: shipped)")
    parser.add_argument(
        "--slow-concurrency", type=int, help="worker concurrency, slow rows (default: shipped)"
    )
    parser.add_argument("--db", type=int, default=13, help="Redis database (flushed before each run)")
    parser.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto")
    parser.add_argument(
        "--budget",
        type=float,
        default=1200.0,
        help="seconds; runs not started by then are skipped (keeps make bench < 20 min)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="where to write the Markdown report (default bench/RESULTS.md for a full run; "
        "--quick and --only runs write nothing unless given)",
    )
    parser.add_argument(
        "--redis-realtime",
        action="store_true",
        help="run the Redis server SCHED_FIFO for the bench (root, a Redis on this machine): tells "
        "Redis's own blocking apart from Redis waiting for a CPU on a small machine. Not a default: "
        "RESULTS.md says so when it was on",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep worker logs and sink dumps")
    parser.add_argument("--list", action="store_true", help="list the scenarios (keys for --only) and exit")
    args = parser.parse_args(argv)
    args.only = [name for item in args.only for name in item.split(",") if name]
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def ensure_redis(procs: Procs, tmp: Path) -> None:
    """Use the Redis on 127.0.0.1:6379; start the bundled one there if nothing listens."""
    client = redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1)
    try:
        client.ping()
        return
    except redis.ConnectionError:
        pass
    finally:
        client.close()
    from worker.run.embedded import redis_server_binary

    print("no Redis on 127.0.0.1:6379: starting the bundled redis-server for this run")
    args = [redis_server_binary(), "--bind", REDIS_HOST, "--port", str(REDIS_PORT)]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
    proc = procs.start(args, log=tmp / "redis.log")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError), redis.Redis(REDIS_HOST, REDIS_PORT) as probe:
            if probe.ping():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit("could not start the bundled redis-server on 127.0.0.1:6379")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(bench: Bench, scenarios: list[Scenario], budget: float, t0: float) -> list[Row]:
    rows = [Row(sc) for sc in scenarios]
    rounds = max((sc.runs or bench.args.runs) for sc in scenarios)
    for index in range(rounds):
        for row in rows:
            sc = row.scenario
            if row.skipped or index >= (sc.runs or bench.args.runs):
                continue
            if time.monotonic() - t0 > budget:
                row.errors.append(f"run {index + 1} skipped: over the {budget:.0f}s budget")
                continue
            tag = f"[{sc.key} {index + 1}/{sc.runs or bench.args.runs}]"
            print(f"  {tag} {sc.msgs} msgs, {sc.worker} ...", end=" ", flush=True)
            try:
                res = bench.run(sc)
            except Skip as exc:
                row.skipped = str(exc)
                print(row.skipped, flush=True)
                if sc.kind == "batch":
                    print("batch: not available", flush=True)
                continue
            except ScenarioError as exc:
                row.errors.append(f"run {index + 1}: {exc}")
                print(f"FAILED: {exc}", flush=True)
                continue
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a broken scenario must not take the other rows down
                row.errors.append(f"run {index + 1}: {type(exc).__name__}: {exc}")
                print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
                continue
            row.results.append(res)
            bench.side_realtime = res.ping_realtime and bench.side_realtime is not False
            print(
                f"{res.seconds:.2f} s: {res.rate:.1f} msgs/s, "
                f"worker CPU {res.cpu_s / res.msgs * 1000:.2f} ms/msg, "
                f"Redis CPU {res.redis_cpu_s / res.msgs * 1000:.2f} ms/msg "
                f"({res.redis_calls / res.msgs:.1f} cmds/msg), worst PING {res.ping_worst_ms:.1f} ms "
                f"(side client {'SCHED_FIFO' if res.ping_realtime else 'normal'}, its own worst "
                f"oversleep {res.ping_lag_ms:.1f} ms, slowest command {res.slowlog_worst_ms:.1f} ms), "
                f"peak RSS {res.peak_rss / MB:.1f} MB" + (f" ({res.note})" if res.note else ""),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [
        sc for sc in build_scenarios(args) if not args.only or any(sc.key.startswith(o) for o in args.only)
    ]
    if args.list:
        for sc in scenarios:
            print(f"{sc.key:16} {sc.worker:14} {sc.msgs:5} msgs  {sc.label}")
        return 0
    if not scenarios:
        print(f"no scenario matches {args.only}", file=sys.stderr)
        return 2
    command = " ".join([os.path.relpath(sys.executable, ROOT), "bench/run.py", *(argv or sys.argv[1:])])
    results = args.results
    if results is None and not (args.quick or args.only):
        results = DEFAULT_RESULTS
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    procs = Procs()
    shm = "/dev/shm"  # noqa: S108 - tmpfs: a dump file per message must not measure the disk
    tmp = Path(tempfile.mkdtemp(prefix="postroom-bench-", dir=shm if os.path.isdir(shm) else None))
    bench: Bench | None = None
    code = 0
    with sigterm_as_interrupt():
        try:
            ensure_redis(procs, tmp)
            bench = Bench(args, procs, tmp)
            bench.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
            bench.fresh_db()  # refuses a database someone else is using
            print(
                f"Postroom bench: {len(scenarios)} scenarios x {args.runs} runs, sink: {bench.sink_name}, "
                f"Redis db {bench.db}, temp {tmp}",
                flush=True,
            )
            with redis_realtime(bench.redis, args.redis_realtime):
                bench.redis_sched = redis_policy(bench.redis)
                rows = execute(bench, scenarios, args.budget, t0)
            elapsed = time.monotonic() - t0
            text = report(bench, rows, started, command, elapsed)
            print()
            print(text)
            if results is not None:
                results.write_text(text, encoding="utf-8")
                print(f"written to {os.path.relpath(results, Path.cwd())}")
            else:
                print("(--quick/--only: bench/RESULTS.md left as it was; --results PATH writes one)")
            if any(row.errors for row in rows):
                code = 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything the bench started", file=sys.stderr)
            code = 130
        finally:
            procs.stop_all()
            if bench is not None:
                bench.slowlog_restore()
                if bench.claimed:
                    with contextlib.suppress(redis.RedisError):
                        bench.redis.flushdb()  # leave the database empty, as the test suite expects
                bench.redis.close()
            if args.keep_tmp:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
