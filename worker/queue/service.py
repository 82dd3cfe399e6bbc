"""What a worker process runs beside Celery's consumer, started once that consumer is ready.

- the **inbox reader** (worker/queue/broker/inbox.py): the broker's ``postroom`` queue, taken in batches
  and turned into jobs (worker/queue/store/admission.py);
- the **dispatcher** (worker/queue/pipeline/dispatch.py): ready jobs, taken in groups and sent;
- the **upkeep** thread (worker/queue/process/liveness.py): the heartbeat (this process holds what it
  took), the reapers (of what dead holders took), the delay queue's mover (retries and
  scheduled sends that came due), the queue-depth samples and, on RabbitMQ, the poison mover;
- the **webhook sender** (worker/queue/events/webhook_sender.py).

Celery's own consumer reads only ``postroom.control`` (health checks, sweeps). Stopped in order
on the worker's shutdown: nothing more is taken, running groups finish, the rest stays ready.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.signals import worker_process_init

from worker.mail.payload import CONTROL_QUEUE
from worker.ops import series, tracing
from worker.queue.broker import celery_app as app_module
from worker.queue.broker import intake as intake_hooks
from worker.queue.broker import kombu_redis as broker
from worker.queue.broker.process_state import this_process
from worker.queue.events.reports_reader import stop_reader
from worker.queue.events.webhook_sender import stop_sender
from worker.queue.process import liveness
from worker.queue.process.runtime import get_runtime, shutdown_runtime
from worker.queue.store.delays import POLL, DelayQueue
from worker.queue.store.jobrecord import SCHEDULED
from worker.queue.store.jobs import JobStore

log = logging.getLogger("postroom.process")

POISON_EVERY = 5.0
DEPTH_EVERY = 60.0


def admission() -> Any:
    """This process's admission (worker/queue/store/admission.py) on its job store and records."""

    def make() -> Any:
        from worker.queue.pipeline.attempts import dead_on_arrival
        from worker.queue.store.admission import Admission

        return Admission(
            app_module.job_store(),
            get_runtime().records,
            schedule_horizon=app_module.settings().schedule_horizon,
            dead_on_arrival=dead_on_arrival,
        )

    return this_process().once("admission", make)


def start(consumer: Any) -> None:
    """Start the inbox reader, the dispatcher, the upkeep thread and the webhook sender."""
    from worker.queue.events.webhook_sender import start_sender
    from worker.settings import config_dir

    if this_process().get("started"):
        return
    this_process().put("started", True)
    tracing.configure()  # in the process that sends, after any fork (docs/tracing.md)
    config = app_module.configuration()
    start_sender(config.state_url, config_dir(), config.settings)  # delivery events, in a thread of its own
    _start_reports_reader(config.settings)  # bounces and complaints, in a thread of its own
    client = app_module.job_store().redis
    on_broker = app_module.broker_redis(client)  # None on RabbitMQ
    _start_upkeep(consumer, client, on_broker)
    _start_sending(app_module.current_app(), client, on_broker, config.settings)


def _start_reports_reader(settings: Any) -> None:
    from worker.queue.events.reports_reader import start_reader
    from worker.queue.store.reports import ReportStore

    store = ReportStore(
        app_module.job_store().redis,
        job_ttl=settings.job_ttl,
        retention=settings.webhook_retention,
        suppression_ttl=settings.suppression_ttl,
        suppression_limit=settings.suppression_limit,
    )
    start_reader(store, lambda: get_runtime().records())


def _start_sending(app: Any, client: Any, on_broker: Any, settings: Any) -> None:
    from worker.queue.broker.inbox import AmqpInbox, InboxReader, Intake, RedisInbox
    from worker.queue.pipeline.dispatch import Dispatcher

    def forward(name: str, task_id: str, args: Any, kwargs: Any) -> None:  # a beat of an earlier release
        app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue=CONTROL_QUEUE)

    source: Any = AmqpInbox(app, settings)
    if on_broker is not None:  # its own client, answering bytes: an entry may be anything
        from worker.db.connect import client as redis_client
        from worker.db.keys import REDIS_TIMEOUTS
        from worker.settings import redis_url

        raw = redis_client(redis_url(app_module.broker_url()), decode_responses=False, **REDIS_TIMEOUTS)
        source = RedisInbox(raw, app_module.broker_keys(), liveness.holder_id())
    dispatcher = Dispatcher(client, settings).start()
    this_process().put("dispatcher", dispatcher)
    intake = Intake(
        admission(),
        app_module.job_store().quarantine,
        forward,
        client,
        settings.retry.max_attempts,
        alone=dispatcher.alone,
    )
    reader = InboxReader(source, intake)
    this_process().put("inbox", reader)
    reader.start()


def stop(timeout: float) -> None:
    """Take nothing more in; let the running groups finish (up to ``timeout`` seconds)."""
    reader, dispatcher = this_process().drop("inbox"), this_process().drop("dispatcher")
    if reader is not None:
        reader.stop()
    if dispatcher is not None:
        dispatcher.stop(timeout)


STRAYS_EVERY = 5.0  # seconds between looks for taken jobs this process lost track of


def _give_back_strays() -> None:
    dispatcher = this_process().get("dispatcher")
    if dispatcher is not None:
        dispatcher.give_back_strays()


def _start_upkeep(consumer: Any, client: Any, on_broker: Any) -> None:
    from worker.queue.broker.intake import move_poison

    app, settings = app_module.current_app(), app_module.settings()
    delays = DelayQueue(client)
    view = app_module.broker_view(client)

    def sample_depth() -> None:  # the dashboard's queue-depth chart (worker/ops/series.py)
        from worker.queue.store.ready import ReadyQueues

        with client.pipeline(transaction=False) as pipe:
            pipe.zcard(JobStore.retrying_key)
            pipe.zcard(SCHEDULED)
            retrying, scheduled = pipe.execute()
        queued = sum(view.depths().values()) + sum(ReadyQueues(client).depths().values())
        series.record_depth(client, queued, int(retrying), int(scheduled))

    keys = app_module.broker_keys() if on_broker is not None else None
    holders = liveness.HolderReaper(client, on_broker, keys)
    steps: list[tuple[float, Callable[[], object]]] = [
        (POLL, delays.move_due),
        (DEPTH_EVERY, sample_depth),
        (liveness.REAP_EVERY, holders.reap),
        (STRAYS_EVERY, _give_back_strays),
    ]
    tags: Callable[[], list[str] | None] | None = None
    if keys is not None and broker.delivered_tags(consumer) is not None:  # control messages
        tags = lambda: broker.delivered_tags(consumer)  # noqa: E731
        steps.append((liveness.REAP_EVERY, liveness.Reaper(on_broker, keys).reap))
    if on_broker is None:
        steps.append((POISON_EVERY, lambda: move_poison(app, settings)))
        from worker.queue.broker.rabbitmq import report_setup_once

        report_setup_once(str(app.conf.broker_url), settings)  # once, in a thread of its own
    # a group (or a task thread) stuck past the hard time limit lets its jobs go
    liveness.keep_beating(on_broker, tags, more=steps, time_limit=settings.time_limit, state=client)


def _start_runtime(**_: Any) -> None:
    """A fresh loop in each pool process, created after the fork (and its span exporter: the
    parent's export thread did not come along)."""
    tracing.configure()
    get_runtime()


def register() -> None:
    """Hook what runs beside Celery's consumer into the worker's start and stop (called once, by
    worker/queue/app.py as it builds the worker's app)."""
    worker_process_init.connect(_start_runtime, weak=False, dispatch_uid="postroom-runtime")
    intake_hooks.ON_READY.append(start)  # once Celery's consumer is ready (broker/intake.py)
    app_module.ON_SHUTDOWN.extend(  # in this order: nothing more taken, running groups end, the loop
        [
            lambda: stop(app_module.settings().time_limit),
            stop_sender,
            stop_reader,
            shutdown_runtime,
            tracing.flush,  # the last spans out before the process ends
        ]
    )
