"""Where records live, and the small typed settings every process reads.

``config/settings.yaml`` holds the defaults an operator edits; each value can
be overridden by environment (``POSTROOM_RETRY_BASE_DELAY=5``). The broker URL
comes from ``POSTROOM_BROKER_URL``; without it, the embedded broker that
``postroom up`` started (its URL is kept in ``var/broker-url``) or a local
Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import ipaddress
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from worker.errors import ConfigurationError, RecordError
from worker.records.yamlsrc import load_yaml

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
WORKER_POOLS = ("threads", "prefork")
# Publishing a job retries briefly when the broker hiccups, then fails loudly (never silently).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
_INTEGERS = frozenset(
    {
        "max_attempts",
        "worker_concurrency",
        "worker_processes",
        "task_events",
        "coalesce",
        "pause_after",
        "metrics_port",
        "rabbitmq_delivery_limit",
        "webhook_concurrency",
    }
)
LOG_FORMATS = ("text", "json")
RABBITMQ_QUEUE_TYPES = ("quorum", "classic")


def accounts_dir() -> Path:
    return Path(os.environ.get("POSTROOM_ACCOUNTS_DIR", "accounts"))


def config_dir() -> Path:
    return Path(os.environ.get("POSTROOM_CONFIG_DIR", "config"))


def _operator_records(folder: str, variable: str, config: Path | None) -> Path:
    override = os.environ.get(variable, "").strip()
    return Path(override) if override else (config or config_dir()) / folder


def api_keys_dir(config: Path | None = None) -> Path:
    """Where the HTTP API's key records are: ``POSTROOM_API_KEYS_DIR``, else ``CONFIG/api-keys``.
    A deployment whose config folder is read-only (docker-compose mounts it so) points it at a
    writable volume, where ``postroom api-keys new`` writes and the http service reads."""
    return _operator_records("api-keys", "POSTROOM_API_KEYS_DIR", config)


def webhooks_dir(config: Path | None = None) -> Path:
    """Where the webhook records are: ``POSTROOM_WEBHOOKS_DIR``, else ``CONFIG/webhooks``; for
    the same reason as :func:`api_keys_dir` (``postroom webhooks new`` writes them)."""
    return _operator_records("webhooks", "POSTROOM_WEBHOOKS_DIR", config)


def var_dir() -> Path:
    """Runtime state of ``postroom up`` (embedded Redis data, dev mail)."""
    return Path(os.environ.get("POSTROOM_VAR_DIR", "var"))


def broker_url() -> str:
    url = os.environ.get("POSTROOM_BROKER_URL")
    if url:
        return url
    marker = var_dir() / "broker-url"
    if marker.is_file():
        embedded = marker.read_text().strip()
        socket_path = urlparse(embedded).path
        if embedded and (not socket_path or Path(socket_path).exists()):
            return embedded
    return DEFAULT_BROKER_URL


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket", "sentinel")
BROKER_SCHEMES = (*REDIS_SCHEMES, "amqp", "amqps", "pyamqp")


def broker_kind(url: str) -> str:
    """``redis`` (redis, rediss, unix, redis+socket), ``sentinel`` or ``amqp`` (RabbitMQ)."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "sentinel":
        return "sentinel"
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    raise ConfigurationError(
        f"POSTROOM_BROKER_URL: unsupported scheme {scheme + '://' if scheme else '(none)'}; "
        f"use one of {', '.join(s + '://' for s in BROKER_SCHEMES)}"
    )


def redis_url(broker: str) -> str:
    """The redis-py URL for a kombu broker URL (``redis+socket://`` → ``unix://``)."""
    parsed = urlparse(broker)
    if parsed.scheme == "redis+socket":
        query = parse_qs(parsed.query)
        db = query.get("virtual_host", query.get("db", ["0"]))[0]
        return f"unix://{parsed.path}?db={db}"
    return broker


def state_url(broker: str | None = None) -> str:
    """Where Postroom keeps its own state (job records, claims, limits, health, dead letters):
    ``POSTROOM_REDIS_URL``, else the broker itself when it is Redis (contract §9).

    On a broker that is not Redis there is no default: a process that took messages it could
    not record would lose them, so it refuses to start and names the setting."""
    url = os.environ.get("POSTROOM_REDIS_URL", "").strip()
    if url:
        if urlparse(url).scheme.lower() not in REDIS_SCHEMES:
            raise ConfigurationError(
                f"POSTROOM_REDIS_URL: not a Redis URL (scheme {urlparse(url).scheme or '(none)'}://); "
                f"use one of {', '.join(s + '://' for s in REDIS_SCHEMES)}"
            )
        return redis_url(url)
    broker = broker or broker_url()
    if broker_kind(broker) == "amqp":
        raise ConfigurationError(
            "POSTROOM_REDIS_URL is not set: the broker (POSTROOM_BROKER_URL) is RabbitMQ, and Postroom "
            "keeps its job records, claims, limits, health and dead letters in Redis; set "
            "POSTROOM_REDIS_URL=redis://HOST:6379/0 (or sentinel://…)"
        )
    return redis_url(broker)


def sentinel_master(url: str = "") -> str:
    """The master's name for a ``sentinel://`` URL: ``POSTROOM_SENTINEL_MASTER``, or the URL's
    ``?master_name=``."""
    name = os.environ.get("POSTROOM_SENTINEL_MASTER", "").strip()
    if not name and url:
        name = parse_qs(urlparse(url.split(";")[-1]).query).get("master_name", [""])[0]
    if not name:
        raise ConfigurationError(
            "POSTROOM_SENTINEL_MASTER is not set: a sentinel:// URL needs the name of the master "
            "the sentinels watch (sentinel.conf's `sentinel monitor NAME …`)"
        )
    return name


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 10.0
    max_delay: float = 900.0
    max_age: float = 86400.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter after ``attempt`` failed attempts.

        The server's Retry-After wins when it asks for longer (capped by max_delay).
        """
        doublings = min(max(attempt - 1, 0), 64)  # past 64 any base is beyond every max_delay
        ceiling = min(self.max_delay, self.base_delay * (2**doublings))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


@dataclass(frozen=True)
class Settings:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    auto_reply_window: float = 7 * 86400.0  # RFC 3834: not more than once per sender in days
    job_ttl: float = 14 * 86400.0  # how long job records are kept after the last change
    visibility_timeout: float = 3600.0  # kombu redelivers unacked messages older than this
    soft_time_limit: float = 300.0
    time_limit: float = 360.0
    # Celery's threads pool: every task thread of a process shares its one event loop and
    # account pools, so a slow server never stalls other sends; "prefork" is the classic pool.
    worker_pool: str = "threads"
    worker_concurrency: int = 16  # task threads (or processes, with prefork) per worker
    worker_processes: int = 0  # processes `postroom worker` and `up` run; 0 = one per CPU core
    # Celery task events, for Flower. Only the control tasks (health checks, sweeps) are Celery
    # tasks, so they cost next to nothing; with 0, Flower still works: it switches them on itself.
    task_events: int = 1
    # A worker process's dispatcher takes up to this many ready jobs at a time, fairly across the
    # accounts with room in it (worker/queue/pipeline/dispatch.py): one Redis round trip per step for the
    # whole group. 1 takes them one by one.
    coalesce: int = 64
    # Health checks (celery beat): every account's connectivity every health_interval seconds,
    # each check given up after health_timeout; pause_after failed checks (or authentication
    # failures of deliveries) in a row pause the account: its jobs are held, not burnt.
    health_interval: float = 300.0
    health_timeout: float = 30.0
    pause_after: int = 3
    metrics_port: int = 9464  # `postroom metrics` and `postroom up` (POSTROOM_METRICS_PORT)
    # The orphan sweep (worker/queue/process/sweep.py, run by the beat): an open job found in none of the
    # places its state says it waits is made ready again after two sweeps.
    sweep_interval: float = 60.0
    # Read by earlier releases (RabbitMQ's sweep, when jobs waited in the broker); kept so that a
    # settings file naming it still loads. Jobs wait in Redis now, where the sweep looks them up.
    sweep_unlisted_after: float = 3600.0
    # How long an address stays on an account's suppression list (worker/queue/store/suppressions.py)
    # after a 5.1.x refusal or an operator's add: a mailbox that comes back is tried after that.
    suppression_ttl: float = 365 * 86400.0
    # At most this many entries on one account's list: past it the oldest automatic entry (a
    # refusal or a report) goes; an operator's never does (a new one is refused when all are).
    suppression_limit: int = 100_000
    # How far ahead send_at may be (worker/queue/store/schedule.py); further is refused at enqueue.
    schedule_horizon: float = 90 * 86400.0
    # Webhooks (worker/queue/events/outbox.py, webhook_sender.py): a delivery is retried with backoff
    # (5 s doubling to 1 h) until it is webhook_give_up_after old, at least 24 hours; events and
    # their deliveries are kept webhook_retention for `postroom webhooks replay`.
    webhook_give_up_after: float = 86400.0
    webhook_retention: float = 7 * 86400.0
    webhook_concurrency: int = 8  # requests in flight per worker process
    webhook_timeout: float = 10.0  # seconds per request (connect, send, answer)
    log_format: str = "text"  # the per-attempt delivery line: text (key=value) or json
    # RabbitMQ (worker/queue/broker/kinds.py): the queue type `postroom queues check` expects, a quorum
    # queue (replicated, with a delivery limit after which a message that keeps killing its consumer
    # goes to postroom.poison) or "classic". The queue is declared with no arguments: its type is the
    # vhost's default; dead-lettering and the limit (rabbitmq_delivery_limit) are a policy's.
    rabbitmq_queue_type: str = "quorum"
    rabbitmq_delivery_limit: int = 20  # deliveries of one message before it counts as poison
    # RabbitMQ's management HTTP API (`postroom queues`, the workers' and status's setup check):
    # "" = http://<the broker's host>:15672 with the broker URL's credentials and vhost.
    rabbitmq_api: str = ""
    # The resolver the deliverability preflight asks (worker/ops/preflight.py): IP:PORT ([v6]:PORT;
    # a bare IP means port 53). "" = the system's (/etc/resolv.conf).
    dns_resolver: str = ""
    # How long worker, beat, http and metrics wait at start for Redis and the broker to answer
    # (worker/queue/broker/reach.py): services of a stack start in any order. 0 = one try.
    startup_wait: float = 120.0

    def check(self) -> None:
        """The ordering contract §4 requires: soft < hard < visibility; retries well below it."""
        if not self.soft_time_limit < self.time_limit < self.visibility_timeout:
            raise ConfigurationError(
                "settings: need soft_time_limit < time_limit < visibility_timeout, got "
                f"{self.soft_time_limit} / {self.time_limit} / {self.visibility_timeout}"
            )
        if self.retry.max_delay > self.visibility_timeout / 2:
            raise ConfigurationError(
                f"settings: retry.max_delay ({self.retry.max_delay}) must stay below half the "
                f"visibility_timeout ({self.visibility_timeout}): kombu would redeliver the ETA message"
            )
        if self.worker_pool not in WORKER_POOLS:
            raise ConfigurationError(
                f"settings: worker_pool must be one of {', '.join(WORKER_POOLS)} (got {self.worker_pool!r})"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(
                f"settings: log_format must be one of {', '.join(LOG_FORMATS)} (got {self.log_format!r})"
            )
        if (
            self.pause_after < 1
            or self.health_interval <= 0
            or self.health_timeout <= 0
            or self.sweep_interval <= 0
        ):
            raise ConfigurationError(
                "settings: pause_after, health_interval, health_timeout and sweep_interval must be positive"
            )
        if self.rabbitmq_queue_type not in RABBITMQ_QUEUE_TYPES:
            raise ConfigurationError(
                f"settings: rabbitmq_queue_type must be one of {', '.join(RABBITMQ_QUEUE_TYPES)} "
                f"(got {self.rabbitmq_queue_type!r})"
            )
        if self.rabbitmq_api and urlparse(self.rabbitmq_api).scheme not in ("http", "https"):
            raise ConfigurationError(  # the URL itself is not echoed: it may carry a password
                "settings: rabbitmq_api (POSTROOM_RABBITMQ_API) must be an http:// or https:// URL "
                f"(got scheme {urlparse(self.rabbitmq_api).scheme or '(none)'}://)"
            )
        if self.rabbitmq_delivery_limit < 2:
            raise ConfigurationError("settings: rabbitmq_delivery_limit must be at least 2")
        if self.coalesce < 1:
            raise ConfigurationError(f"settings: coalesce must be at least 1 (got {self.coalesce})")
        if self.webhook_give_up_after < 86400 or self.webhook_retention < self.webhook_give_up_after:
            raise ConfigurationError(
                "settings: webhook_give_up_after must be at least 86400 (24 h of retries) and "
                "webhook_retention at least as long"
            )
        if self.webhook_concurrency < 1 or self.webhook_timeout <= 0:
            raise ConfigurationError("settings: webhook_concurrency and webhook_timeout must be positive")
        if self.suppression_limit < 1:
            raise ConfigurationError("settings: suppression_limit must be at least 1")
        if self.retry.max_attempts < 1:
            raise ConfigurationError("settings: retry.max_attempts must be at least 1")
        if self.dns_resolver:
            resolver_address(self.dns_resolver)

    @property
    def sent_as_ttl(self) -> float:
        """How long the Message-ID -> job entry a sent mark files is kept (worker/queue/store/marks.py):
        at least as long as the job's record, whose job_ttl starts again at the job's last write —
        at most the retry policy's max_age and a time limit after a 250 (its other recipients retried)."""
        return self.job_ttl + self.retry.max_age + self.time_limit


def resolver_address(text: str) -> tuple[str, int]:
    """``IP:PORT``, ``[IPv6]:PORT`` or a bare IP (port 53) → (ip, port). A name is refused: the
    resolver is what turns names into addresses."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ip = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        ip, number = None, 0
    if ip is None or not 0 < number < 65536:
        raise ConfigurationError(
            f"settings: dns_resolver (POSTROOM_DNS_RESOLVER) must be IP:PORT, [IPv6]:PORT or an IP "
            f"(got {text!r})"
        )
    return str(ip), number


_ENV_NUMBERS: dict[str, tuple[str, str | None]] = {
    "POSTROOM_RETRY_MAX_ATTEMPTS": ("max_attempts", "retry"),
    "POSTROOM_RETRY_BASE_DELAY": ("base_delay", "retry"),
    "POSTROOM_RETRY_MAX_DELAY": ("max_delay", "retry"),
    "POSTROOM_RETRY_MAX_AGE": ("max_age", "retry"),
    "POSTROOM_AUTO_REPLY_WINDOW": ("auto_reply_window", None),
    "POSTROOM_JOB_TTL": ("job_ttl", None),
    "POSTROOM_VISIBILITY_TIMEOUT": ("visibility_timeout", None),
    "POSTROOM_SOFT_TIME_LIMIT": ("soft_time_limit", None),
    "POSTROOM_TIME_LIMIT": ("time_limit", None),
    "POSTROOM_WORKER_CONCURRENCY": ("worker_concurrency", None),
    "POSTROOM_WORKER_PROCESSES": ("worker_processes", None),
    "POSTROOM_TASK_EVENTS": ("task_events", None),
    "POSTROOM_COALESCE": ("coalesce", None),
    "POSTROOM_HEALTH_INTERVAL": ("health_interval", None),
    "POSTROOM_HEALTH_TIMEOUT": ("health_timeout", None),
    "POSTROOM_PAUSE_AFTER": ("pause_after", None),
    "POSTROOM_METRICS_PORT": ("metrics_port", None),
    "POSTROOM_SWEEP_INTERVAL": ("sweep_interval", None),
    "POSTROOM_SWEEP_UNLISTED_AFTER": ("sweep_unlisted_after", None),
    "POSTROOM_SUPPRESSION_TTL": ("suppression_ttl", None),
    "POSTROOM_SUPPRESSION_LIMIT": ("suppression_limit", None),
    "POSTROOM_SCHEDULE_HORIZON": ("schedule_horizon", None),
    "POSTROOM_RABBITMQ_DELIVERY_LIMIT": ("rabbitmq_delivery_limit", None),
    "POSTROOM_WEBHOOK_GIVE_UP_AFTER": ("webhook_give_up_after", None),
    "POSTROOM_WEBHOOK_RETENTION": ("webhook_retention", None),
    "POSTROOM_WEBHOOK_CONCURRENCY": ("webhook_concurrency", None),
    "POSTROOM_WEBHOOK_TIMEOUT": ("webhook_timeout", None),
    "POSTROOM_STARTUP_WAIT": ("startup_wait", None),
}


def _number(name: str, value: Any, integer: bool) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}: expected a number, got {value!r}") from None
    if number < 0:
        raise ConfigurationError(f"{name}: must not be negative")
    return int(number) if integer else number


def load_settings() -> Settings:
    path = config_dir() / "settings.yaml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:  # the records' loader: bounded in size, depth and alias expansion, errors with lines
            data = dict(load_yaml(path).data)
        except RecordError as exc:
            if "the file is empty" not in str(exc):
                raise
    retry_data = data.get("retry") or {}
    retry_fields = {"max_attempts", "base_delay", "max_delay", "max_age"}
    unknown = set(retry_data) - retry_fields
    if unknown:
        raise ConfigurationError(f"{path}: retry: unknown keys {sorted(unknown)}")
    retry = RetryPolicy(
        **{k: _number(f"{path}: retry.{k}", v, k == "max_attempts") for k, v in retry_data.items()}  # type: ignore[arg-type]
    )
    top = {k: v for k, v in data.items() if k != "retry"}
    settings_fields = set(Settings.__dataclass_fields__) - {"retry"}
    unknown = set(top) - settings_fields
    if unknown:
        raise ConfigurationError(f"{path}: unknown keys {sorted(unknown)}")
    pool = os.environ.get("POSTROOM_WORKER_POOL") or str(top.pop("worker_pool", "threads"))
    top.pop("worker_pool", None)
    log_format = os.environ.get("POSTROOM_LOG_FORMAT") or str(top.pop("log_format", "text"))
    top.pop("log_format", None)
    queue_type = os.environ.get("POSTROOM_RABBITMQ_QUEUE_TYPE") or str(
        top.pop("rabbitmq_queue_type", "quorum")
    )
    top.pop("rabbitmq_queue_type", None)
    api = os.environ.get("POSTROOM_RABBITMQ_API") or str(top.pop("rabbitmq_api", None) or "")
    top.pop("rabbitmq_api", None)
    resolver = os.environ.get("POSTROOM_DNS_RESOLVER") or str(top.pop("dns_resolver", None) or "")
    top.pop("dns_resolver", None)
    settings = Settings(
        retry=retry,
        worker_pool=pool,
        log_format=log_format,
        rabbitmq_queue_type=queue_type,
        rabbitmq_api=api.strip(),
        dns_resolver=resolver.strip(),
        **{k: _number(f"{path}: {k}", v, k in _INTEGERS) for k, v in top.items()},  # type: ignore[arg-type]
    )
    for env, (name, group) in _ENV_NUMBERS.items():
        if env in os.environ:
            value = _number(env, os.environ[env], name in _INTEGERS)
            if group == "retry":
                retry = replace(settings.retry, **{name: value})  # type: ignore[arg-type]
                settings = replace(settings, retry=retry)
            else:
                settings = replace(settings, **{name: value})  # type: ignore[arg-type]
    settings.check()
    return settings
