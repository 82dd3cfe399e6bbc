"""config/settings.yaml and its POSTROOM_* overrides (contract §3, §4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.errors import ConfigurationError
from worker.settings import load_settings, redis_url, resolver_address

REPO = Path(__file__).resolve().parent.parent


def test_shipped_settings_load_and_keep_the_time_limit_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    settings = load_settings()
    assert settings.soft_time_limit < settings.time_limit < settings.visibility_timeout
    assert settings.retry.max_delay <= settings.visibility_timeout / 2
    assert settings.worker_pool == "threads" and settings.task_events == 1


def test_environment_overrides_each_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("POSTROOM_RETRY_BASE_DELAY", "5")
    monkeypatch.setenv("POSTROOM_RETRY_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("POSTROOM_WORKER_POOL", "prefork")
    monkeypatch.setenv("POSTROOM_TASK_EVENTS", "0")
    settings = load_settings()
    assert settings.retry.base_delay == 5.0 and settings.retry.max_attempts == 3
    assert settings.worker_pool == "prefork" and settings.task_events == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("retry: {max_delay: 3000}\n", "must stay below half the visibility_timeout"),
        ("soft_time_limit: 400\n", "need soft_time_limit < time_limit < visibility_timeout"),
        ("worker_pool: gevent\n", "worker_pool must be one of threads, prefork"),
        ("retry: {max_atempts: 3}\n", "retry: unknown keys ['max_atempts']"),
        ("retry: {base_delay: soon}\n", "retry.base_delay: expected a number"),
        ("retry: " + "[" * 20_000 + "]" * 20_000 + "\n", "settings.yaml:1: retry: nested deeper than 64"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                for p, c in zip("abcdefg", "bcdefgh", strict=True)
            ),
            "values",
        ),
        ("- not a mapping\n", "must be a mapping"),
    ],
)
def test_bad_settings_are_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    (tmp_path / "settings.yaml").write_text(text)
    monkeypatch.setenv("POSTROOM_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings()


def test_backoff_grows_with_jitter_and_honours_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    policy = load_settings().retry
    first = [policy.delay(1) for _ in range(50)]
    assert all(policy.base_delay / 2 <= d <= policy.base_delay for d in first) and len(set(first)) > 1
    assert all(d <= policy.max_delay for d in (policy.delay(30) for _ in range(50)))
    assert policy.delay(1, retry_after=120) >= 120


def test_embedded_broker_url_maps_to_a_redis_socket_url() -> None:
    assert redis_url("redis+socket:///tmp/x/redis.sock") == "unix:///tmp/x/redis.sock?db=0"
    assert redis_url("redis://127.0.0.1:6379/3") == "redis://127.0.0.1:6379/3"


def test_rabbitmq_api_is_an_http_url_and_a_bad_one_is_refused_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTROOM_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("POSTROOM_RABBITMQ_API", raising=False)
    assert load_settings().rabbitmq_api == ""  # derived from the broker URL (worker/queue/broker/kinds.py)
    (tmp_path / "settings.yaml").write_text("rabbitmq_api: https://mgmt.internal:15671\n")
    assert load_settings().rabbitmq_api == "https://mgmt.internal:15671"
    monkeypatch.setenv("POSTROOM_RABBITMQ_API", "amqp://admin:s3cret@mgmt.internal")
    with pytest.raises(
        ConfigurationError, match=r"rabbitmq_api \(POSTROOM_RABBITMQ_API\) must be an http"
    ) as err:
        load_settings()
    assert "s3cret" not in str(err.value)


def test_dns_resolver_is_an_address_from_settings_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTROOM_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("POSTROOM_DNS_RESOLVER", raising=False)  # the tests' session sets one
    assert load_settings().dns_resolver == ""  # the system's resolver
    (tmp_path / "settings.yaml").write_text("dns_resolver: 10.0.0.53:5353\n")
    assert load_settings().dns_resolver == "10.0.0.53:5353"
    monkeypatch.setenv("POSTROOM_DNS_RESOLVER", "[::1]:53")
    assert load_settings().dns_resolver == "[::1]:53"
    assert resolver_address("[::1]:5300") == ("::1", 5300)
    assert resolver_address("192.0.2.53") == ("192.0.2.53", 53)
    assert resolver_address("2001:db8::53") == ("2001:db8::53", 53)
    for bad in ("dns.example:53", "10.0.0.53:0", "10.0.0.53:dns", "[::1]:70000"):
        monkeypatch.setenv("POSTROOM_DNS_RESOLVER", bad)
        with pytest.raises(
            ConfigurationError, match=r"dns_resolver \(POSTROOM_DNS_RESOLVER\) must be IP:PORT"
        ):
            load_settings()


IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys, worker
for found in pkgutil.walk_packages(worker.__path__, "worker."):
    if not found.name.endswith("__main__"):
        importlib.import_module(found.name)
from worker.queue.broker import celery_app
assert celery_app.configuration.cache_info().currsize == 0, "settings were read at import"
assert celery_app.current_app.cache_info().currsize == 0, "the Celery app was built at import"
import worker.queue.app
try:
    worker.queue.app.app  # what celery -A asks for as a worker starts: now the settings are read
except Exception as exc:
    sys.exit(f"at start: {exc}")
"""


def test_importing_a_module_reads_no_settings_and_builds_no_app(tmp_path: Path) -> None:
    """Every module imports with a settings file that cannot be read and a broker that has no
    store for job records; the settings are read, and the app built, when a worker starts."""
    (tmp_path / "settings.yaml").write_text("retry: [not: valid\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env |= {"POSTROOM_BROKER_URL": "amqp://guest@127.0.0.1:1//", "POSTROOM_CONFIG_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("at start: ") and "settings.yaml:2: invalid YAML" in done.stderr, (
        done.stderr
    )
