"""``postroom up`` as a newcomer runs it: embedded Redis, worker, beat, dev mail catcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.queue import FAST_SETTINGS
from support.smtpd import SmtpServer
from worker.run.devsmtp import DEFAULT_PORT

REPO = Path(__file__).resolve().parent.parent
POSTROOM = str(Path(sys.executable).with_name("postroom"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Up:
    """A ``postroom up`` in its own folder, with no POSTROOM_BROKER_URL (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        self.env.update(FAST_SETTINGS)
        self.log = root / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [POSTROOM, "up", "--processes", "1", "--concurrency", "4"],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for_output("postroom up: ready.", self.output().count("postroom up: ready.") + 1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            assert time.monotonic() < deadline, f"postroom up never printed {text!r}:\n{self.output()}"
            assert self.process is not None and self.process.poll() is None, self.output()
            time.sleep(0.1)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTROOM, *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it to the foreground process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    shutil.copytree(REPO / "accounts", tmp_path / "accounts", ignore=shutil.ignore_patterns("examples"))
    shutil.copytree(REPO / "config", tmp_path / "config", ignore=shutil.ignore_patterns("examples"))
    running = Up(tmp_path)
    yield running
    running.kill()


def test_readme_flow_up_then_send_shows_the_message_in_the_dev_catcher(up: Up) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", DEFAULT_PORT)) == 0:
            pytest.fail(f"port {DEFAULT_PORT} is taken; the shipped dev account delivers there")
    up.start()
    assert "embedded Redis" in up.output()
    sent = up.run(
        "send", "--account", "dev", "--to", "you@example.com", "--subject", "Hello",
        "--text", "It works", "--wait", "30",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "state: sent" in sent.stdout
    caught = json.loads(up.run("dev-smtp", "--list", "--json").stdout)
    assert [(m["subject"], m["rcpt_tos"]) for m in caught] == [("Hello", ["you@example.com"])]
    assert "nobody@example.invalid ends as a dead letter" in up.output()  # said at start-up
    assert_a_dot_invalid_recipient_is_a_dead_letter_then_a_suppression(up)
    assert up.interrupt() == 0
    assert "postroom up: stopped" in up.output()
    assert (up.root / "var" / "redis" / "appendonly.aof").exists() or (
        up.root / "var" / "redis" / "appendonlydir"
    ).is_dir()


def assert_a_dot_invalid_recipient_is_a_dead_letter_then_a_suppression(up: Up) -> None:
    """The README's tour: the catcher refuses ``.invalid`` at RCPT (550 5.1.1), so the job is
    dead, listed where an operator looks, and the address is suppressed for the next job."""
    dead = up.run(
        "send", "--account", "dev", "--to", "nobody@example.invalid", "--subject", "Lost",
        "--text", "Nobody reads this", "--wait", "30",
    )  # fmt: skip
    assert dead.returncode == 1, dead.stdout + dead.stderr
    job_id = dead.stdout.splitlines()[0].strip()
    assert "state: dead" in dead.stdout and "550" in dead.stdout, dead.stdout
    assert "nobody@example.invalid: failed 550 5.1.1" in dead.stdout, dead.stdout
    listed = json.loads(up.run("dead-letters", "list", "--json").stdout)
    assert [entry["id"] for entry in listed] == [job_id]
    assert "dead letters: 1" in up.run("status").stdout
    caught = json.loads(up.run("dev-smtp", "--list", "--json").stdout)
    assert all("nobody@example.invalid" not in m["rcpt_tos"] for m in caught), caught
    again = up.run(
        "send", "--account", "dev", "--to", "nobody@example.invalid", "--subject", "Lost again",
        "--text", "Nobody reads this either", "--wait", "30",
    )  # fmt: skip
    assert again.returncode == 0 and "state: suppressed" in again.stdout, again.stdout + again.stderr
    assert "nobody@example.invalid" in up.run("suppressions", "list", "dev").stdout


def test_ctrl_c_loses_nothing_that_was_enqueued(up: Up, smtp_server: Callable[..., SmtpServer]) -> None:
    port = free_port()  # nothing listens there yet: the job keeps retrying
    (up.root / "accounts" / "later.yaml").write_text(
        f"smtp:\n  address: later@example.com\n  host: 127.0.0.1\n  port: {port}\n"
        "  secure: false\n  auth: none\n"
    )
    up.env["POSTROOM_RETRY_MAX_ATTEMPTS"] = "50"
    up.start()
    sent = up.run("send", "--account", "later", "--to", "a@example.net", "--text", "x", "--json")
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["id"]
    deadline = time.monotonic() + 30
    while json.loads(up.run("job", job_id, "--json").stdout)["state"] != "retrying":
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.2)
    assert up.interrupt() == 0

    server = smtp_server(mode="plain", port=port)
    up.start()  # same var/: the embedded Redis reads its AOF back
    deadline = time.monotonic() + 60
    while not server.received:
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.2)
    job = json.loads(up.run("job", job_id, "--json").stdout)
    assert job["state"] == "sent" and job["attempts"] >= 2
    assert len(server.received) == 1
    assert up.interrupt() == 0


def processes_in(folder: Path) -> list[int]:
    """The pids of live processes whose working directory is ``folder`` (``up`` and its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (
                Path(os.readlink(entry / "cwd")) == folder
                and "Z" not in (entry / "stat").read_text().split()[2]
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(folder: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_up_through_a_pipe_that_closes_still_stops_everything_on_ctrl_c(up: Up) -> None:
    """``make run 2>&1 | tee run.log``, then Ctrl-C: tee goes first, and the supervisor's output
    pipe with it; it must still stop every child instead of dying on the closed pipe."""
    root = up.root.resolve()
    process = subprocess.Popen(
        [POSTROOM, "up", "--processes", "1", "--concurrency", "2"],
        cwd=root, env=up.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    up.process = process  # the fixture kills what is left
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + 60
    while b"postroom up: ready." not in seen:
        assert time.monotonic() < deadline and process.poll() is None, seen.decode(errors="replace")
        seen += process.stdout.readline()
    assert len(processes_in(root)) >= 4  # up, redis, worker, beat (and more)
    process.stdout.close()  # tee is gone
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert wait_gone(root, 10) == []


def test_a_killed_supervisor_takes_its_children_with_it(up: Up) -> None:
    up.start()
    root = up.root.resolve()
    assert len(processes_in(root)) >= 4
    assert up.process is not None
    up.process.kill()  # SIGKILL of `postroom up` alone (not its process group): nothing can clean up
    up.process.wait(10)
    assert wait_gone(root, 60) == [], [Path(f"/proc/{pid}/cmdline").read_text() for pid in processes_in(root)]


def test_the_first_health_check_runs_right_after_start(up: Up) -> None:
    up.env["POSTROOM_HEALTH_INTERVAL"] = "3600"  # only the check at start can explain a result
    up.start()
    deadline = time.monotonic() + 30
    while True:
        health = json.loads(up.run("health", "--json").stdout or "{}")
        if (health.get("accounts") or {}).get("dev", {}).get("checked_at"):
            break
        assert time.monotonic() < deadline, (health, up.output())
        time.sleep(0.5)
    assert health["accounts"]["dev"]["ok"] is True, health
    assert up.interrupt() == 0
