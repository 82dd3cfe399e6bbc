"""The Celery application, configured per contract §4, and what it is built from.

Nothing happens when this module is imported: :func:`configuration` reads the settings and the
URLs, and :func:`current_app` builds the app, the first time each is asked for (in a worker,
by worker/queue/app.py as it starts; in the CLI or the web process, when it first needs the
broker). Both are one per process, and a forked pool child keeps its parent's.

``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged
only after its task finished, and a worker that dies mid-task gives the message
back (attempts are counted in the job record, so a poison message still ends
in the dead letters). Prefetch 1 so a slow account cannot hoard messages.
soft < hard time limit < visibility timeout, and retry countdowns are capped
well below the visibility timeout: kombu's Redis transport redelivers any
unacknowledged message older than it, ETA or not.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import (
    beat_init,
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_shutdown,
)

from worker import settings as settings_module
from worker.mail.payload import (
    BATCH_TASK_NAME,
    CONTROL_QUEUE,
    HEALTH_TASK_NAME,
    QUEUE,
    SWEEP_TASK_NAME,
    TASK_NAME,
)
from worker.queue.broker import kinds as brokers
from worker.queue.broker import kombu_redis as broker
from worker.queue.broker.process_state import this_process
from worker.queue.broker.taskclock import TASKS
from worker.queue.store.jobs import JobStore
from worker.settings import PUBLISH_RETRY_POLICY, Settings


@dataclass(frozen=True)
class Configuration:
    """What the app is built from, read once per process."""

    settings: Settings
    broker_url: str
    # Where job records, claims, limits, health and dead letters live: without it (a broker that
    # is not Redis and no POSTROOM_REDIS_URL) no app is built, so no worker takes a message it
    # could not record (contract §9).
    state_url: str


@functools.cache
def configuration() -> Configuration:
    """The settings (environment and config/settings.yaml) and URLs of this process."""
    url = settings_module.broker_url()
    return Configuration(settings_module.load_settings(), url, settings_module.state_url(url))


def settings() -> Settings:
    return configuration().settings


def state_url() -> str:
    return configuration().state_url


def broker_url() -> str:
    return configuration().broker_url


# Called first on the worker's shutdown, before its loop and pools go (registered by the modules
# above this one that run beside Celery's consumer: worker/queue/service.py).
ON_SHUTDOWN: list[Callable[[], None]] = []


@functools.cache
def current_app() -> Celery:
    """The Celery app of this process, built on first use."""
    config = configuration()
    broker.install()  # kombu's Redis channel screens raw queue entries (kombu_redis.py)
    app = Celery("postroom")
    app.conf.update(**_celery_settings(config))
    # the receivers hold no reference to the app: they ask for it (weak=False: kept by the signal)
    beat_init.connect(_check_at_start, weak=False, dispatch_uid="postroom-check-at-start")
    task_prerun.connect(_task_started, weak=False, dispatch_uid="postroom-task-started")
    task_postrun.connect(_task_finished, weak=False, dispatch_uid="postroom-task-finished")
    worker_process_shutdown.connect(_stop, weak=False, dispatch_uid="postroom-stop-process")
    worker_shutdown.connect(_stop, weak=False, dispatch_uid="postroom-stop-worker")
    return app


def __getattr__(name: str) -> Any:
    """``celery_app.app``: the app, built when first asked for (``from … import app`` too)."""
    if name == "app":
        return current_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broker_keys() -> broker.BrokerKeys:
    """kombu's key names on this app's broker (its transport options; worker/queue/broker/kombu_redis.py)."""
    return broker.BrokerKeys.from_options(current_app().conf.broker_transport_options)


def broker_view(state_client: Any) -> brokers.BrokerView:
    """What ``status``, the sweep, coalescing and the reaper read of this app's broker
    (worker/queue/broker/kinds.py): one per process, on ``state_client`` when the broker is that Redis."""
    return this_process().once(
        f"broker-view:{id(state_client)}",
        lambda: brokers.broker_view(current_app(), state_url(), state_client),
    )


def job_store() -> JobStore:
    """This process's job store, on the state Redis (one per process)."""

    def make() -> JobStore:
        config = configuration()
        retention = config.settings.webhook_retention
        settings = config.settings
        return JobStore.from_url(
            config.state_url,
            job_ttl=settings.job_ttl,
            event_retention=retention,
            sent_as_ttl=settings.sent_as_ttl,
        )

    return this_process().once("job-store", make)


def broker_redis(state_client: Any) -> Any | None:
    """The broker's Redis client (``state_client`` itself when they are one Redis), or None on
    RabbitMQ."""
    view = broker_view(state_client)
    return view.client if isinstance(view, brokers.RedisBrokerView) else None


def _celery_settings(config: Configuration) -> dict[str, Any]:
    settings = config.settings
    return dict(
        **brokers.celery_config(config.broker_url, settings),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # job state lives in Postroom's own records (postroom job ID)
        task_serializer="json",
        accept_content=["json"],
        # Celery's consumer reads the control queue (health checks, sweeps); the jobs' queue is read
        # by Postroom's own inbox (worker/queue/broker/inbox.py), in batches
        task_default_queue=CONTROL_QUEUE,
        task_routes={TASK_NAME: {"queue": QUEUE}, BATCH_TASK_NAME: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.time_limit,
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_send_task_events=bool(settings.task_events),  # Flower works unchanged
        task_send_sent_event=bool(settings.task_events),
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        # messages no job can be made of go to the dead letters instead of being dropped or
        # crashing the consumer (worker/queue/broker/intake.py)
        worker_consumer="worker.queue.broker.intake:Consumer",
        enable_utc=True,
        # The one beat (contract §7) checks every account; a run that could not start within one
        # interval expires instead of piling up behind the next.
        beat_schedule={
            "postroom-health-check": {
                "task": HEALTH_TASK_NAME,
                "schedule": settings.health_interval,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.health_interval},
            },
            "postroom-sweep": {
                "task": SWEEP_TASK_NAME,
                "schedule": settings.sweep_interval,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.sweep_interval},
            },
        },
    )


def _check_at_start(**_: Any) -> None:
    """The one beat checks every account as soon as it starts (its schedule's first run is one
    interval later): an operator sees real health lines at once, not "no check yet" for minutes.

    A broker that is not up yet (a stack starting in any order) is waited for, up to
    ``startup_wait`` (worker/queue/broker/reach.py); failing that the schedule's run checks."""
    from worker.queue.broker.reach import NotReachable, retry_until

    interval = settings().health_interval

    def publish() -> None:
        current_app().send_task(HEALTH_TASK_NAME, queue=CONTROL_QUEUE, expires=interval)

    try:
        retry_until(
            "beat: the first health check", publish, within=settings().startup_wait, urls=(broker_url(),)
        )
    except NotReachable as exc:
        print(f"postroom: {exc}; the schedule checks in {interval:g} s", file=sys.stderr, flush=True)


def _task_started(task_id: str | None = None, **_: Any) -> None:
    """Every task's start, by thread: one stuck past its hard time limit lets its jobs go
    (worker/queue/process/liveness.py, TaskClock)."""
    TASKS.started(task_id)


def _task_finished(**_: Any) -> None:
    TASKS.finished()


def _stop(**_: Any) -> None:
    """The worker's shutdown: the hooks of what runs beside Celery's consumer, in the order they
    were registered (worker/queue/service.py: take nothing more, let running groups finish, stop
    the webhook sender, then the loop)."""
    for stop in ON_SHUTDOWN:
        stop()
