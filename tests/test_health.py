"""Scheduled health checks, the circuit breaker and the operator's view, end to end.

A real beat schedules the checks every second; a real worker runs them against real
aiosmtpd servers: one healthy, one down (started later), one refusing our password.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.pki import Pki
from support.queue import WRONG_PASSWORD, QueueEnv, Worker, claim_database, wait_for
from support.smtpd import PASSWORD, SmtpServer
from worker.db.vocabulary import JobState
from worker.ops.health import PAUSE_CACHE_SECONDS, AccountHealth
from worker.queue.pipeline.attemptlog import LOG_FORMAT, log_attempt
from worker.queue.pipeline.delivery import Outcome
from worker.queue.store.jobs import JobStore
from worker.records.loader import RECORDS_RECHECK_SECONDS

POSTROOM = str(Path(sys.executable).with_name("postroom"))
ServerFactory = Callable[..., SmtpServer]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Ops:
    """The operator's commands against one queue environment."""

    def __init__(self, env: QueueEnv) -> None:
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTROOM, *args],
            env={**os.environ, **self.env.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def state(self, account: str) -> str:
        return str(self.status()["accounts"][account]["state"])


@pytest.fixture
def health_env(real_redis: None, tmp_path: Path) -> Iterator[QueueEnv]:
    env = QueueEnv(tmp_path, claim_database())
    env.env.update(
        {"POSTROOM_HEALTH_INTERVAL": "1", "POSTROOM_HEALTH_TIMEOUT": "3", "POSTROOM_PAUSE_AFTER": "2"}
    )
    yield env
    env.release()


@pytest.fixture
def beat(health_env: QueueEnv, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "beat.log").open("wb")
    args = [sys.executable, "-m", "celery", "-A", "worker.queue.app", "beat", "-l", "INFO"]
    args += ["-s", str(tmp_path / "schedule")]
    process = subprocess.Popen(
        args,
        env={**os.environ, **health_env.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield process
    process.terminate()
    process.wait(10)
    log.close()


def test_checks_pause_broken_accounts_hold_their_jobs_and_release_them_when_fixed(
    health_env: QueueEnv, beat: subprocess.Popen[bytes], smtp_server: ServerFactory, pki: Pki, tmp_path: Path
) -> None:
    ops = Ops(health_env)
    healthy_server = smtp_server(mode="plain")
    (health_env.config / "keystores" / "health-ca.yaml").write_text(
        f"type: pem\ncertificates: {pki.ca_cert}\n"
    )
    locked_server = smtp_server(mode="starttls", auth_required=True)
    down_port = free_port()
    healthy = health_env.account("healthy", healthy_server)
    locked = health_env.account(
        "locked",
        locked_server,
        secure=True,
        truststore="health-ca",
        auth="password",
        user_id="user@example.com",
        password="${QUEUE_TEST_WRONG_PASSWORD}",
    )
    (health_env.accounts / "down.yaml").write_text(
        "provider: other\nsmtp:\n  address: down@example.com\n  host: 127.0.0.1\n"
        f"  port: {down_port}\n  secure: false\n  auth: none\n"
    )
    producer = health_env.producer()
    worker = Worker(health_env, tmp_path / "worker.log").start()
    metrics_port = free_port()
    metrics = metrics_server(health_env, metrics_port)
    try:
        # the breaker: two failed checks in a row pause "locked" (535) and "down" (refused)
        wait_for(
            lambda: ops.state(locked) == "paused" and ops.state("down") == "paused", 40, "both paused", worker
        )
        status = ops.status()
        assert status["accounts"][healthy]["state"] == "ok"
        assert status["accounts"][healthy]["health"]["ok"] is True
        assert status["accounts"][healthy]["health"]["result"] == "SMTP (Connect using default)"
        # the DNS preflight rides along (the session's resolver refuses: "no verdict", and ok all the same)
        dns = status["accounts"][healthy]["health"]["detail"]["deliverability"]
        assert dns["domain"] == "example.com" and dns["resolver"] == os.environ["POSTROOM_DNS_RESOLVER"]
        assert {dns[n]["result"] for n in ("mx", "spf", "dkim", "dmarc")} == {"warn"}
        assert "no verdict: " in dns["spf"]["reason"]
        assert "; DNS: MX warn, SPF warn, DKIM warn, DMARC warn" in ops.run("status").stdout
        assert status["accounts"][locked]["paused_by"] == "auto"
        assert "535" in status["accounts"][locked]["reason"]
        assert status["accounts"]["down"]["health"]["ok"] is False

        # jobs for paused accounts are held (no attempt spent), the others flow
        sent_id = producer.send_notification(healthy, ["a@example.net"], "fine", "x")
        held_locked = producer.send_notification(locked, ["b@example.net"], "held 1", "x")
        held_down = producer.send_notification("down", ["c@example.net"], "held 2", "x")
        wait_for(
            lambda: (j := producer.job(sent_id)) is not None and j.state == "sent", 20, "healthy sent", worker
        )

        def held(job_id: str) -> bool:
            job = producer.job(job_id)
            return job is not None and job.state == "held"

        for job_id in (held_locked, held_down):
            wait_for(lambda: held(job_id), 20, "held")  # noqa: B023 - called within the iteration
            job = producer.job(job_id)
            assert job is not None and job.attempts == 0

        # status, field by field
        status = ops.status()
        assert set(status) >= {"queues", "in_flight", "retrying", "dead_letters", "accounts"}
        assert status["queues"]["postroom"] >= 0 and isinstance(status["in_flight"], int)
        assert status["retrying"] == 0 and status["dead_letters"] == 0 and status["held"] == 2
        info = status["accounts"][healthy]
        assert (info["sent"], info["failed"], info["retried"], info["dead"]) == (1, 0, 0, 0)
        assert info["last_hour"]["sent"] == 1 and info["held"] == 0 and info["last_success_at"]
        assert status["accounts"][locked]["held"] == 1 and status["accounts"]["down"]["held"] == 1

        # health: JSON per contract §8, and a failing exit code while any account is unhealthy
        health = ops.run("health", "--json")
        assert health.returncode == 1
        accounts = json.loads(health.stdout)["accounts"]
        assert set(accounts[healthy]) >= {"ok", "result", "checked_at", "detail"}
        assert accounts[healthy]["ok"] is True and accounts[locked]["ok"] is False

        # metrics, scraped over HTTP and parsed
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert (
            samples[
                (
                    "postroom_deliveries_total",
                    (("account", healthy), ("outcome", "sent"), ("transport", "smtp")),
                )
            ]
            == 1
        )
        assert samples[("postroom_account_state", (("account", locked), ("state", "paused")))] == 1
        assert samples[("postroom_account_held_jobs", (("account", "down"),))] == 1
        assert samples[("postroom_delivery_latency_seconds_count", (("account", healthy),))] == 1
        assert samples[("postroom_dead_letters", ())] == 0
        assert ("postroom_queue_depth", (("queue", "postroom"),)) in samples

        # "down" comes up: the next check passes, the account resumes and its job goes out
        fixed = smtp_server(mode="plain", port=down_port)
        wait_for(
            lambda: (j := producer.job(held_down)) is not None and j.state == "sent", 30, "down's job", worker
        )
        assert len(fixed.received) == 1

        # "locked" gets the right password; an operator holds it meanwhile (else the next passing
        # check resumes it before every worker has re-read the record) and then resumes it
        assert ops.run("accounts", "pause", locked).returncode == 0
        record = health_env.accounts / "locked.yaml"
        record.write_text(record.read_text().replace("QUEUE_TEST_WRONG_PASSWORD", "QUEUE_TEST_PASSWORD"))
        time.sleep(RECORDS_RECHECK_SECONDS + 0.5)
        assert ops.state(locked) == "paused"  # passing checks do not lift an operator's pause
        resumed = ops.run("accounts", "resume", locked)
        assert resumed.returncode == 0 and "1 held job" in resumed.stdout
        wait_for(
            lambda: (j := producer.job(held_locked)) is not None and j.state == "sent",
            30,
            "locked's job",
            worker,
        )

        # an operator's pause holds even while checks pass, until the operator resumes
        assert ops.run("accounts", "pause", healthy).returncode == 0
        time.sleep(PAUSE_CACHE_SECONDS + 0.2)  # workers see a pause within a second
        paused_job = producer.send_notification(healthy, ["d@example.net"], "later", "x")
        wait_for(
            lambda: (j := producer.job(paused_job)) is not None and j.state == "held", 20, "held", worker
        )
        wait_for(
            lambda: ops.state(healthy) == "paused" and ops.status()["accounts"][healthy]["health"]["ok"],
            10,
            "",
        )
        assert ops.run("accounts", "resume", healthy).returncode == 0
        wait_for(
            lambda: (j := producer.job(paused_job)) is not None and j.state == "sent", 20, "released", worker
        )
        wait_for(lambda: ops.run("health").returncode == 0, 20, "every account healthy again", worker)
    finally:
        metrics.terminate()
        metrics.wait(10)
        worker.stop()
        producer.close()
    logs = worker.log() + (tmp_path / "beat.log").read_text(errors="replace")
    assert "health account=" in logs
    for secret in (PASSWORD, WRONG_PASSWORD):
        assert secret not in logs


def test_repeated_authentication_failures_pause_and_a_success_resets_the_count(health_env: QueueEnv) -> None:
    released: list[str] = []
    health = AccountHealth(health_env.redis, pause_after=3, release=lambda job_id, _: released.append(job_id))
    assert not health.note_auth_failure("acct", "535 no")
    with health_env.redis.pipeline() as pipe:
        health.auth_succeeded_into(pipe, "acct")  # a delivery logged in: the run is broken
        pipe.execute()
    assert not health.note_auth_failure("acct", "535 no")
    assert not health.note_auth_failure("acct", "535 no")
    assert health.note_auth_failure("acct", "535 no")
    assert "acct" in health.paused()
    assert health.account_state("acct")["paused_by"] == "auto"
    assert JobStore(health_env.redis).hold_if_paused("job-1", "acct", {"account": "acct"}, "paused")
    assert health.resume("acct") == 1 and released == ["job-1"]
    assert "acct" not in health.paused() and health.held_count("acct") == 0


def test_the_delivery_line_is_json_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    outcome = Outcome(JobState.SENT, transport="smtp", security="STARTTLS TLSv1.3", code=250)
    caplog.set_level(logging.INFO, logger="postroom.delivery")
    LOG_FORMAT.json = True
    try:
        log_attempt("job-1", "acct", 1, outcome, 0.0123)
    finally:
        LOG_FORMAT.json = False
    line = json.loads(caplog.records[-1].getMessage())
    assert line == {
        "event": "delivery",
        "job": "job-1",
        "account": "acct",
        "attempt": 1,
        "transport": "smtp",
        "security": "STARTTLS TLSv1.3",
        "outcome": "sent",
        "code": 250,
        "duration_ms": 12,
    }


def test_a_record_that_does_not_load_is_invalid_in_status_health_and_metrics(
    own_queue: QueueEnv, smtp_server: ServerFactory
) -> None:
    """Not ``ok  no check yet`` until the next health check: the record's problems, at once."""
    good = own_queue.account("fine", smtp_server(mode="plain"))
    (own_queue.accounts / "broken.yaml").write_text("provider: other\nsmtp:\n  address: [oops\n")
    ops = Ops(own_queue)
    status = ops.status()
    broken = status["accounts"]["broken"]
    assert broken["state"] == "invalid" and status["accounts"][good]["state"] == "ok"
    assert broken["problems"] and broken["problems"][0]["file"].endswith("broken.yaml")
    assert broken["problems"][0]["line"] is not None
    assert "broken.yaml:" in broken["reason"]
    text = ops.run("status").stdout
    row = next(line for line in text.splitlines() if line.startswith("broken "))
    assert row.split()[1] == "invalid", text
    assert broken["problems"][0]["text"] in text  # file:line: field: reason under the row
    health = ops.run("health", "--json")
    assert health.returncode == 1 and json.loads(health.stdout)["accounts"]["broken"]["state"] == "invalid"

    text = scraped_once(own_queue)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("postroom_account_state", (("account", "broken"), ("state", "invalid")))] == 1
    assert samples[("postroom_account_state", (("account", "broken"), ("state", "ok")))] == 0
    assert samples[("postroom_account_state", (("account", good), ("state", "invalid")))] == 0


def metrics_server(env: QueueEnv, port: int) -> subprocess.Popen[bytes]:
    """``postroom metrics --port PORT`` for ``env``, a process of its own (the caller stops it)."""
    return subprocess.Popen(
        [POSTROOM, "metrics", "--port", str(port)],
        env={**os.environ, **env.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def scraped_once(env: QueueEnv) -> str:
    """What a ``postroom metrics`` of ``env``'s own serves at its first answer (then stopped)."""
    port = free_port()
    server = metrics_server(env, port)
    scraped: list[str] = []

    def scrape() -> bool:
        scraped.append(_scrape(port) or "")
        return bool(scraped[-1])

    try:
        wait_for(scrape, 20, "the metrics endpoint")
    finally:
        server.terminate()
        server.wait(10)
    return scraped[-1]


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None
