"""Deployment files: Procfile and docker-compose.yml (DESIGN §4, §7)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_procfile_runs_the_worker_and_one_beat() -> None:
    lines = (REPO / "Procfile").read_text().splitlines()
    processes = dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))
    assert {k: v.strip() for k, v in processes.items()} == {
        "worker": "postroom worker",
        "beat": "postroom beat",
    }


def compose_config() -> dict[str, Any]:
    """The file as docker-compose itself resolves it (Debian's docker-compose; no engine needed)."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed: `make test` installs Debian's docker-compose package"
    done = subprocess.run(
        [binary, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_docker_compose_is_valid_and_has_every_service() -> None:
    services = compose_config()["services"]
    assert set(services) == {"redis", "worker", "beat", "flower", "mailcatcher", "metrics", "prometheus"}
    assert "postroom metrics" in services["metrics"]["command"][-1]
    assert any("prometheus.yml" in str(v) for v in services["prometheus"]["volumes"])
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    for name in ("worker", "beat"):
        env = services[name]["environment"]
        assert env["POSTROOM_BROKER_URL"] == "redis://redis:6379/0"
        assert services[name]["command"][-1].endswith(f"exec postroom {name}")
    assert "scale" not in services["beat"] and services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert services["mailcatcher"]["network_mode"] == "service:worker"
