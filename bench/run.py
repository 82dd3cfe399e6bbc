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

    @property
    def worker(self) -> str:
        if self.kind == "nodemailer":
            return f"node, {self.max_connections} conns"
        each = f"{self.pool}x{self.concurrency}"
        return f"{self.processes} procs x {each}" if self.processes > 1 else each

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
        return list(self.redis.scan_iter(count=1000, _type="LIST"))

    def queued(self, keys: list[bytes]) -> int:
        self.own_calls += len(keys)
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

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
        """Run the clock from ``wait_start`` to ``done``, sampling ``proc``'s tree meanwhile."""
        with TreeSampler(proc.pid) as sampler:
            start = wait_start()
            cpu0, (redis0, calls0) = sampler.sample(), self.redis_counters()
            deadline = time.monotonic() + sc.timeout
            while not done():
                if time.monotonic() > deadline:
                    raise ScenarioError(f"timed out after {sc.timeout:.0f}s with {progress()}")
                if proc.poll() is not None and not done():
                    raise ScenarioError(f"process exited with {proc.returncode} with {progress()}")
                time.sleep(poll)
            cpu1, (redis1, calls1) = sampler.sample(), self.redis_counters()
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
        from worker.records.loader import Records

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
            payloads: list[dict[str, Any]] = [
                {
                    # interleaved, as mixed traffic arrives; or one account's backlog after another's
                    "account": names[i * len(names) // sc.msgs] if sc.blocks else names[i % len(names)],
                    "kind": "notification",
                    "to": [f"rcpt{i}@example.net"],
                    "subject": f"bench {i}",
                    "text": body,
                    "message_id": f"<{prefix}.{i}@example.com>",
                }
                for i in range(sc.msgs)
            ]
            producer = Producer(self.broker_url, records=Records.load(accounts_dir, config_dir))
            try:
                if batch:
                    for i in range(0, len(payloads), sc.batch_size):
                        producer.send_batch(payloads[i : i + sc.batch_size])
                else:
                    for p in payloads:
                        producer.send_notification(
                            p["account"], p["to"], p["subject"], p["text"], message_id=p["message_id"]
                        )
            finally:
                producer.close()
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
            return self.finish(result, sink)
        finally:
            sink.stop()

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
    slow = args.slow_n or (30 if args.quick else 100)
    shipped = shipped_worker()
    # Postroom's rows run what `postroom worker` runs unless told otherwise (then the Worker column
    # says what ran instead); the Celery baselines run prefork with one process per core
    fast: dict[str, Any] = {
        "pool": args.pool or shipped[0],
        "concurrency": args.concurrency or shipped[1],
        "processes": args.processes or shipped[2],
    }
    baseline: dict[str, Any] = {"pool": "prefork", "concurrency": os.cpu_count() or 1}
    tuned: dict[str, Any] = {"pool": "prefork", "concurrency": os.cpu_count() or 1}
    slowp: dict[str, Any] = {
        "pool": args.slow_pool or shipped[0],
        "concurrency": args.slow_concurrency or shipped[1],
        "processes": args.processes or shipped[2],
        "delay": 1.0,
        "max_connections": 10,
    }
    bs = args.batch_size
    return [
        Scenario("single-1k", "Postroom, single-message jobs, 1 KB", "postroom", n, **fast),
        Scenario("single-20k", "Postroom, single-message jobs, 20 KB", "postroom", n, body=20 * 1024, **fast),
        Scenario("batch-1k", f"Postroom, batch jobs ({bs}/job), 1 KB", "batch", n, batch_size=bs, **fast),
        Scenario(
            "single-1k-prefork",
            "Postroom, single-message jobs, 1 KB (tuned: -P prefork, one process per core)",
            "postroom",
            n,
            **tuned,
        ),
        Scenario(
            "naive-1k",
            "baseline: naive Celery task (smtplib, 1 connection/msg), 1 KB",
            "naive",
            n,
            **baseline,
        ),
        Scenario("noop", "baseline: no-op Celery task (same payload)", "noop", n, **baseline),
        Scenario("nodemailer-1k", "baseline: Nodemailer pooled transport, 1 KB", "nodemailer", n),
        # the same two at five times the messages, one run each (informational): Nodemailer's first
        # 2,000 include V8 warming up, so the short rows flatter Postroom against it
        Scenario(
            "batch-long",
            f"Postroom, batch jobs ({bs}/job), 1 KB, {5 * n} msgs (steady state)",
            "batch",
            5 * n,
            batch_size=bs,
            runs=1,
            **fast,
        ),
        Scenario(
            "nodemailer-long",
            f"baseline: Nodemailer pooled transport, 1 KB, {5 * n} msgs",
            "nodemailer",
            5 * n,
            runs=1,
        ),
        Scenario("slow-1", "slow server (DATA +1 s): 1 account, 10 conns", "postroom", slow, **slowp),
        Scenario(
            "slow-4",
            "slow server (DATA +1 s): 4 accounts, 10 conns each",
            "postroom",
            4 * slow,
            accounts=4,
            **slowp,
        ),
        Scenario(
            "slow-4-blocks",
            "slow server: 4 accounts enqueued one after another (head-of-line)",
            "postroom",
            4 * slow,
            accounts=4,
            blocks=True,
            runs=1,  # informational: one run keeps the full bench inside its 10 minutes
            **slowp,
        ),
        Scenario("rss-100", "100 account records, 1 msg each", "postroom", 100, accounts=100, **fast),
        Scenario(
            "rss-100-prefork",
            "100 account records, 1 msg each (tuned: prefork)",
            "postroom",
            100,
            accounts=100,
            **tuned,
        ),
    ]


# ---- report ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def results_table(rows: list[Row]) -> list[str]:
    out = [
        "| Scenario | Worker | Msgs | msgs/s (median) | min-max | worker CPU ms/msg | Redis CPU ms/msg "
        "| Redis cmds/msg | peak RSS MB | Runs | Notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
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
        cells = [
            f"{sc.key}: {sc.label}",
            sc.worker,
            str(sc.msgs),
            _fmt(row.rate, ".1f"),
            spread,
            _fmt(cpu, ".2f"),
            _fmt(rcpu, ".2f"),
            _fmt(calls, ".1f"),
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
        ratio("postroom single 1KB (shipped defaults) / naive", "single-1k", "naive-1k", 3.0),
        ratio("postroom single 1KB (shipped defaults) / noop", "single-1k", "noop", 1.5),
        ratio("postroom single 1KB, tuned prefork / naive", "single-1k-prefork", "naive-1k", 3.0),
        ratio("postroom batch 1KB / naive", "batch-1k", "naive-1k", 5.0),
        ratio("postroom batch 1KB / nodemailer", "batch-1k", "nodemailer-1k", 1.5),
        ratio("slow server: four accounts / one account", "slow-4", "slow-1", 3.5),
    ]
    blocks = ratio(
        "slow server: 4 accounts enqueued one after another / one account", "slow-4-blocks", "slow-1", 0
    )
    out.append(replace(blocks, target="info", ok=None))
    steady = ratio(
        "postroom batch 1KB / nodemailer, 5x the messages (steady state)", "batch-long", "nodemailer-long", 0
    )
    out.append(replace(steady, target="info", ok=None))
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
    rss_rows = [r for k, r in rows.items() if k.startswith("rss-") and r.results]
    if rss_rows:
        worst = max(max(res.peak_rss for res in r.results) for r in rss_rows) / MB
        which = ", ".join(r.scenario.key for r in rss_rows)
        out.append(
            Check(
                f"peak RSS per worker process, 100 accounts ({which})",
                worst,
                f"{worst:.1f} MB",
                "< 150 MB",
                worst < 150,
            )
        )
    else:
        out.append(
            Check("peak RSS per worker process, 100 accounts", None, "n/a (rss-* missing)", "< 150 MB", None)
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
    ]


METHOD = """\
How it is measured: the queue is filled before the worker starts; the clock runs from the first job
leaving the queue to the sink's timestamp of the last of the N messages, counted by Message-ID at the
sink (no-op: until nothing is queued or unacknowledged; Nodemailer: from its first `sendMail`).
msgs/s is the median over the runs (min-max beside it). Worker CPU is user+sys of the worker's
process tree over the same interval (for Nodemailer, the node process); Redis CPU is `INFO cpu`
over it (job records cost Redis time). Peak RSS is the largest single process of the tree, sampled
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
        default=540.0,
        help="seconds; runs not started by then are skipped (keeps make bench < 10 min)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="where to write the Markdown report (default bench/RESULTS.md for a full run; "
        "--quick and --only runs write nothing unless given)",
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
            print(
                f"{res.seconds:.2f} s: {res.rate:.1f} msgs/s, "
                f"worker CPU {res.cpu_s / res.msgs * 1000:.2f} ms/msg, "
                f"Redis CPU {res.redis_cpu_s / res.msgs * 1000:.2f} ms/msg "
                f"({res.redis_calls / res.msgs:.1f} cmds/msg), "
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
