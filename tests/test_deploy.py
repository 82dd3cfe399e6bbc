"""Deployment files: Procfile, Dockerfile, constraints.txt and docker-compose.yml (contract §4, §7, §9).

docker-compose validates the file as it would deploy it (Debian's docker-compose: no engine
is needed for ``config``); the checks below read what it resolved.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.records.loader import Records

REPO = Path(__file__).resolve().parent.parent
POSTROOM_SERVICES = ("worker", "beat", "http", "metrics", "mailcatcher")


def test_procfile_runs_the_worker_and_one_beat() -> None:
    lines = (REPO / "Procfile").read_text().splitlines()
    processes = dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))
    assert {k: v.strip() for k, v in processes.items()} == {
        "worker": "postroom worker",
        "beat": "postroom beat",
    }


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed: `make test` installs Debian's docker-compose package"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTROOM_", "FLOWER_"))}
    return subprocess.run(
        [binary, "-f", str(REPO / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **(env or {})},
        cwd=REPO,
    )


def compose_config(*profiles: str, **env: str) -> dict[str, Any]:
    """The file as docker-compose itself resolves it."""
    flags = [part for p in profiles for part in ("--profile", p)]
    done = compose(*flags, "config", env={"FLOWER_BASIC_AUTH": "ops:test-pass", **env})
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_has_every_service_on_one_image_built_here() -> None:
    services = compose_config()["services"]
    assert set(services) == {"redis", "rabbitmq", "flower", "prometheus", "grafana", *POSTROOM_SERVICES}
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]  # only with --profile rabbitmq
    assert services["grafana"]["profiles"] == ["grafana"]  # only with --profile grafana
    assert all("profiles" not in s for n, s in services.items() if n not in ("rabbitmq", "grafana"))
    for name in POSTROOM_SERVICES:
        service = services[name]
        assert service["build"]["context"] == str(REPO) and service["image"] == "postroom:local", name
        assert "pip install" not in str(service), f"{name} installs at start"
    assert [services[n]["command"][0] for n in POSTROOM_SERVICES] == [
        "worker",
        "beat",
        "http",
        "metrics",
        "dev-smtp",
    ]
    assert "8425:8425" in str(services["http"]["ports"][0])
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1  # exactly one beat


def test_images_are_pinned() -> None:
    config = compose_config("rabbitmq")
    for name, service in config["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert "@sha256:" in image or re.fullmatch(r"v?\d+\.\d+\.\d+.*", tag), f"{name}: {image} floats"
    dockerfile = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.M)
    assert bases and re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", bases[0]), bases


def test_the_image_is_multi_stage_installs_the_constraints_and_runs_as_a_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2
    assert "-c constraints.txt" in dockerfile and "COPY --from=build" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["postroom"]' in dockerfile


def test_constraints_pin_every_package_and_bound_the_internals_postroom_uses() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower()] = version
    assert {"celery", "kombu", "aiosmtplib", "redis", "amqp", "pytest"} <= set(pins)
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("celery[redis]", "kombu", "aiosmtplib"):
        bound = re.search(rf'"{re.escape(package)}>=[\d.]+,<([\d.]+)"', pyproject)
        assert bound and bound.group(1).count(".") == 1, f"{package}: no upper bound on its minor version"
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "\nlock:" in makefile


def test_redis_persists_and_refuses_writes_when_full() -> None:
    redis_service = compose_config()["services"]["redis"]
    command = " ".join(redis_service["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert re.search(r"--maxmemory \d+[kmg]b", command), command
    assert "redis-cli" in redis_service["healthcheck"]["test"]


def test_healthchecks_use_postroom_health_and_readyz() -> None:
    services = compose_config()["services"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "postroom", "health"]
    assert "/readyz" in " ".join(services["http"]["healthcheck"]["test"])
    assert "/metrics" in " ".join(services["metrics"]["healthcheck"]["test"])
    rabbit = compose_config("rabbitmq")["services"]["rabbitmq"]
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]


def test_secrets_come_from_compose_secrets_read_by_records_as_files() -> None:
    config = compose_config()
    secrets = config["secrets"]
    assert secrets and all("file" in s for s in secrets.values())
    examples = "\n".join(p.read_text() for p in (REPO / "accounts" / "examples").glob("*.yaml"))
    for name in secrets:
        assert f"{{file: /run/secrets/{name}}}" in examples, f"no record reads /run/secrets/{name}"
        for service in ("worker", "beat", "http"):
            assert name in [s["source"] for s in config["services"][service]["secrets"]], service
    for service in POSTROOM_SERVICES:
        assert "PASSWORD" not in str(config["services"][service].get("environment", {})).upper()


def test_flower_needs_basic_auth_to_start() -> None:
    done = compose("config")
    assert done.returncode != 0 and "FLOWER_BASIC_AUTH" in done.stderr
    assert compose_config()["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:test-pass"


def test_every_worker_replica_reaches_the_mail_catcher_by_name(tmp_path: Path) -> None:
    services = compose_config()["services"]
    catcher = services["mailcatcher"]
    assert "network_mode" not in catcher and catcher["command"][-4:] == [
        "--host",
        "0.0.0.0",
        "--port",
        "1025",
    ]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["worker"]["volumes"] if m.startswith("/")}
    dev = Path(mounts["/srv/postroom/accounts/dev.yaml"])
    (tmp_path / "accounts").mkdir()
    (tmp_path / "config").mkdir()
    shutil.copy(dev, tmp_path / "accounts" / "dev.yaml")
    records = Records.load(tmp_path / "accounts", tmp_path / "config")
    assert records.check() == {"dev": []}
    account = yaml.safe_load(dev.read_text())["smtp"]
    assert (account["host"], int(account["port"])) == ("mailcatcher", 1025)


def test_the_rabbitmq_profile_keeps_the_state_in_redis() -> None:
    amqp = "amqp://postroom:postroom@rabbitmq:5672/postroom"
    services = compose_config("rabbitmq", POSTROOM_BROKER_URL=amqp)["services"]
    for name in ("worker", "beat", "http"):
        env = services[name]["environment"]
        assert env["POSTROOM_BROKER_URL"] == amqp and env["POSTROOM_REDIS_URL"] == "redis://redis:6379/0"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == amqp
    default = compose_config()["services"]["worker"]["environment"]
    assert default["POSTROOM_BROKER_URL"] == default["POSTROOM_REDIS_URL"] == "redis://redis:6379/0"


PORT_VARIABLES = {
    "http": ("POSTROOM_HTTP_PORT", 8425),
    "metrics": ("POSTROOM_METRICS_PORT", 9464),
    "prometheus": ("POSTROOM_PROMETHEUS_PORT", 9090),
    "flower": ("POSTROOM_FLOWER_PORT", 5555),
    "grafana": ("POSTROOM_GRAFANA_PORT", 3000),
}


def test_every_published_port_comes_from_a_variable_named_in_the_header() -> None:
    """A `postroom up` on the host holds 8425 and 9464: the stack's host ports move with variables."""
    raw = (REPO / "docker-compose.yml").read_text()
    published = re.findall(r'^\s+- "([^"]*:\d+)"\s*$', raw, re.M)
    assert published and all(
        re.fullmatch(r"127\.0\.0\.1:\$\{POSTROOM_\w+_PORT:-\d+\}:\d+", p) for p in published
    ), published
    header = "\n".join(line for line in raw.splitlines() if line.startswith("#"))
    defaults = compose_config("rabbitmq")["services"]
    moved = compose_config(
        "rabbitmq", **{var: str(20000 + n) for n, (var, _) in enumerate(PORT_VARIABLES.values())}
    )["services"]
    for n, (service, (variable, port)) in enumerate(PORT_VARIABLES.items()):
        assert f"{variable}={port}" in header, f"{variable} is not named in the file's header"
        assert str(defaults[service]["ports"][0]).startswith(f"127.0.0.1:{port}:{port}"), service
        assert str(moved[service]["ports"][0]).startswith(f"127.0.0.1:{20000 + n}:{port}"), service
    exposed = {name for name, service in defaults.items() if service.get("ports")}
    assert exposed == set(PORT_VARIABLES), exposed


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore line as Docker reads it: ``**`` any folders, ``*`` and ``?`` within one."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            close = glob.index("]", i)
            out, i = out + glob[i : close + 1], close + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out: the last line matching it or a folder above it wins
    (a ``!`` line takes it back in)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = _pattern(line.removeprefix("!").strip("/"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            verdict = not negate
    return verdict


def test_the_build_context_leaves_out_the_checkout_s_weight_but_not_what_the_image_copies() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for heavy in (".venv/bin/python", ".git/objects/pack", "var/mail/x.eml", ".cache/pip/x",
                  "worker/__pycache__/x.pyc", "bench/out/run.json", ".mypy_cache/x", ".env",
                  "config/compose/secrets/support-smtp-password"):  # fmt: skip
        assert _ignored(patterns, heavy), f"{heavy} would be sent to the daemon"
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = [
        src for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M) for src in line.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "constraints.txt", "worker"} <= set(copied), copied
    for source in copied:
        assert not _ignored(patterns, source), f"{source} is copied by the Dockerfile but ignored"
    assert not _ignored(patterns, "worker/queue/broker/celery_app.py")
    assert not _ignored(patterns, "worker/web/openapi.json")  # package data the image serves


@pytest.mark.parametrize(
    ("volume", "variable"),
    [("postroom-api-keys", "POSTROOM_API_KEYS_DIR"), ("postroom-webhooks", "POSTROOM_WEBHOOKS_DIR")],
)
def test_records_the_cli_writes_are_a_writable_volume_every_postroom_service_shares(
    volume: str, variable: str
) -> None:
    """`config/` is mounted read-only; `postroom api-keys new` and `postroom webhooks new` in the
    stack write their records into a volume (POSTROOM_API_KEYS_DIR, POSTROOM_WEBHOOKS_DIR), where
    every service reads them (docs/compose.md). Not inside the read-only mount: Docker cannot
    make a mount point there."""
    config = compose_config()
    assert volume in config["volumes"]
    for name in POSTROOM_SERVICES:
        service = config["services"][name]
        folder = service["environment"][variable]
        assert f"{volume}:{folder}:rw" in service["volumes"], name
        assert any(m.endswith(":/srv/postroom/config:ro") for m in service["volumes"]), name
        assert not folder.startswith("/srv/postroom/config/"), folder
    dockerfile = (REPO / "Dockerfile").read_text()
    # a new named volume takes the image's folder: owned by the user the services run as
    assert re.search(rf"chown postroom:postroom [^\n]*{folder}", dockerfile)


def test_non_interactive_execs_are_shown_with_minus_t() -> None:
    """`docker-compose exec` without -T wants a TTY: the documented commands work in scripts too."""
    for doc in ("docker-compose.yml", "README.md", "docs/compose.md", "Makefile"):
        text = (REPO / doc).read_text()
        bare = re.findall(r"docker[- ]compose(?: [-\w]+ \S+)*? exec (?!-T)\S+", text)
        assert not bare, f"{doc}: {bare}"
