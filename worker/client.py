"""The Python producer helper: validate, assign a Message-ID, enqueue, return the job id.

Producers in other languages call ``send_task("postroom.send", kwargs=PAYLOAD,
queue="postroom")`` directly (docs/producers.md); this helper adds the checks a
producer wants *before* anything is enqueued: the payload is valid, the
account exists and its record is sound, the idempotency key is new. It writes the
job straight into Postroom's ready queues (worker/queue/store/ready.py), in one transaction
with its record: no broker message, the payload stored once.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

from celery import Celery
from pydantic import ValidationError

from worker.db.connect import safe_url
from worker.db.vocabulary import FINAL_STATES, JobState
from worker.errors import ConfigurationError, PostroomError
from worker.mail.message import make_message_id
from worker.mail.payload import MAX_BATCH, SendPayload
from worker.ops import tracing
from worker.ops.tracing import Span, SpanKind
from worker.queue.broker import kinds as brokers
from worker.queue.broker.kinds import BrokerView, celery_config
from worker.queue.store import ready, schedule
from worker.queue.store.jobrecord import Job
from worker.queue.store.jobs import JobStore, new_job_id
from worker.queue.store.suppressions import Suppressions
from worker.records.loader import Records
from worker.settings import PUBLISH_RETRY_POLICY, broker_kind, broker_url, load_settings, state_url


class PayloadError(PostroomError, ValueError):
    """The payload was refused at enqueue; nothing was enqueued."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid payload: " + "; ".join(problems))


class EnqueueError(PostroomError):
    """The job could not be enqueued: Redis did not take the transaction that records it, so
    nothing of it is kept (a retry with the same idempotency key enqueues it once)."""

    def __init__(self, message: str, *, recorded: list[str] | None = None) -> None:
        super().__init__(message)
        self.recorded = recorded or []  # kept for callers of earlier releases: always empty now


def describe_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = "".join(
            f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(item["loc"])
        )
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where or 'payload'}: {message}")
    return problems


class MessageOptions(TypedDict, total=False):
    """A notification's optional message fields, as keyword arguments (contract §2)."""

    cc: Sequence[str]
    bcc: Sequence[str]
    attachments: Iterable[Mapping[str, str]]
    headers: Mapping[str, str] | None
    idempotency_key: str | None
    message_id: str | None
    list_unsubscribe: Mapping[str, str] | None  # {url: https://…, mailto: addr}: RFC 8058 headers
    send_at: float | str | None  # a scheduled send: UNIX seconds or ISO 8601 with an offset


def message_fields(
    to: Sequence[str] = (),
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    **options: Unpack[MessageOptions],
) -> dict[str, Any]:
    """A notification's message fields, as :meth:`Producer.send_notification` and
    ``postroom send`` put them in its payload."""
    return {
        "to": list(to),
        "cc": list(options.get("cc", ())),
        "bcc": list(options.get("bcc", ())),
        "subject": subject,
        "text": text,
        "html": html,
        "attachments": [dict(a) for a in options.get("attachments", ())],
        "headers": dict(options.get("headers") or {}),
        "idempotency_key": options.get("idempotency_key"),
        "message_id": options.get("message_id"),
        "list_unsubscribe": dict(options.get("list_unsubscribe") or {}) or None,
        "send_at": options.get("send_at"),
    }


class Producer:
    """Enqueues jobs; one per application is enough (it holds a broker connection pool)."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        records: Records | None = None,
        app: Celery | None = None,
        accounts_dir: Path | None = None,
        config_dir: Path | None = None,
        state: str | None = None,
    ) -> None:
        self.broker = broker or broker_url()
        self.settings = load_settings()
        tracing.configure()  # OTLP export when the OTEL_* variables ask for it (docs/tracing.md)
        self._records = records
        self.accounts_dir = accounts_dir
        self.config_dir = config_dir
        self._loaded = Records.cache(accounts_dir, config_dir)
        if app is None:
            config = celery_config(self.broker, self.settings)  # the queue as the workers declare it
            if broker_kind(self.broker) != "amqp":  # a producer gives up sooner than a worker
                config["broker_transport_options"].update(socket_connect_timeout=5, socket_timeout=10)
            app = Celery("postroom-producer", set_as_current=False)
            app.conf.update(
                task_serializer="json",
                broker_connection_retry_on_startup=True,
                task_publish_retry=True,
                task_publish_retry_policy=PUBLISH_RETRY_POLICY,
                **config,
            )
        self.app = app
        self.state = state or state_url(self.broker)
        self.store = JobStore.from_url(
            self.state, job_ttl=self.settings.job_ttl, event_retention=self.settings.webhook_retention
        )
        self._view: BrokerView | None = None

    def broker_view(self) -> BrokerView:
        """What ``status`` and the sweep read of this producer's broker (worker/queue/broker/kinds.py)."""
        if self._view is None:
            self._view = brokers.broker_view(self.app, self.state, self.store.redis)
        return self._view

    def close(self) -> None:
        """Release the broker and Redis connections."""
        self.app.close()
        if self._view is not None:
            self._view.close()
        self.store.redis.close()

    def records(self, *, fresh: bool = False) -> Records:
        """Fixed records if given; else read from disk, again when a record file changed (looked
        at every couple of seconds, or at once with ``fresh``: an account added a moment ago
        counts)."""
        if self._records is not None:
            return self._records
        return self._loaded.get(fresh=fresh)

    def validate(self, payload: SendPayload | Mapping[str, Any], *, where: str = "") -> SendPayload:
        """The payload as it will be enqueued, or PayloadError with every reason."""
        try:
            model = payload if isinstance(payload, SendPayload) else SendPayload.model_validate(dict(payload))
        except ValidationError as exc:
            raise PayloadError([where + p for p in describe_validation_error(exc)]) from None
        records = self.records()
        if model.account not in records.account_names:
            records = self.records(fresh=True)
        try:
            account = records.account(model.account)
        except ConfigurationError as exc:
            raise PayloadError([f"{where}account: {exc}"]) from None
        limit = account.limits.max_recipients_per_message
        count = len(model.to) + len(model.cc) + len(model.bcc)
        if limit and count > limit:
            raise PayloadError(
                [f"{where}recipients: {count} recipients, over {account.name}'s limit of {limit}"]
            )
        now = time.time()
        if model.send_at is not None and model.send_at - now > self.settings.schedule_horizon:
            days = self.settings.schedule_horizon / 86400
            raise PayloadError([f"{where}send_at: more than {days:g} days ahead (schedule_horizon)"])
        return model.model_copy(
            update={
                "message_id": model.message_id or make_message_id(account.from_address),
                # a scheduled job's clock (Date, max_age, latency) starts at its send_at
                "enqueued_at": model.enqueued_at or max(now, model.send_at or 0.0),
            }
        )

    def cancel(self, job_id: str, *, by: str = "") -> tuple[bool, str]:
        """Cancel a job that has not started sending: (cancelled, its state; "" if unknown)."""
        retention = self.settings.webhook_retention
        return schedule.cancel(
            self.store.redis, job_id, self.settings.job_ttl, by=by, event_retention=retention
        )

    def enqueue(self, payload: SendPayload | Mapping[str, Any], *, submitted_by: str = "") -> str:
        """Validate and enqueue; returns the job id (an existing one for a reused idempotency key).

        ``submitted_by`` names the HTTP API key that asked, kept in the job record."""
        return self._enqueue([self.validate(payload)], submitted_by)[0]

    def send_batch(
        self, payloads: Sequence[SendPayload | Mapping[str, Any]], *, submitted_by: str = ""
    ) -> list[str]:
        """Validate every payload, then enqueue them all in one transaction.

        Each message gets a job id of its own (returned in order), its own Message-ID, state,
        retries and dead-letter entry; the workers send them side by side. One invalid payload
        refuses the whole batch (PayloadError names it as ``messages[i].field``) and nothing is
        enqueued. A reused idempotency key returns the job that owns it.
        """
        if not payloads:
            raise PayloadError(["messages: a batch needs at least one message"])
        if len(payloads) > MAX_BATCH:
            raise PayloadError([f"messages: at most {MAX_BATCH} messages per batch, got {len(payloads)}"])
        problems: list[str] = []
        models: list[SendPayload] = []
        for i, payload in enumerate(payloads):
            try:
                models.append(self.validate(payload, where=f"messages[{i}]."))
            except PayloadError as exc:
                problems += exc.problems
        if problems:
            raise PayloadError(problems)
        return self._enqueue(models, submitted_by)

    def _enqueue(self, models: Sequence[SendPayload], submitted_by: str) -> list[str]:
        """Record the jobs in one transaction, each ready for every worker at once (its payload
        stored once, in its record: worker/queue/store/ready.py) or waiting for its send_at."""
        jobs = [(new_job_id(), model.to_task_kwargs()) for model in models]
        spans = [enqueue_span(job_id, model) for (job_id, _), model in zip(jobs, models, strict=True)]
        traces = [tracing.traceparent(span) for span in spans]
        try:
            owners = self.store.create_claimed(jobs, submitted_by=submitted_by, traces=traces)
        except Exception as exc:  # nothing was written (one MULTI/EXEC) or Redis is gone
            for span in spans:
                tracing.failed(span, type(exc).__name__, "not enqueued")
                span.end()
            raise EnqueueError(f"could not enqueue (Redis {safe_url(self.state)}): {exc}") from exc
        for span, owner in zip(spans, owners, strict=True):
            if owner is not None and span.is_recording():  # a reused idempotency key: that job
                span.set_attribute("postroom.duplicate_of", owner)
            span.end()
        return [owner or job_id for (job_id, _), owner in zip(jobs, owners, strict=True)]

    def republish(self, job_id: str, kwargs: Mapping[str, Any]) -> None:
        """Make a job that has a record ready again (a retried dead letter, a held job released, a
        job the sweep found nowhere): into its account's ready set, under its own id."""
        states = (JobState.QUEUED, JobState.HELD, JobState.RETRYING, JobState.SCHEDULED, JobState.SENDING)
        ready.make_ready(self.store.redis, job_id, str(kwargs.get("account", "")), states)

    def retry_dead_letters(self, job_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Put dead letters back on the queue with their job ids and Message-IDs (what the
        CLI's ``dead-letters retry`` and the dashboard's Retry buttons do).

        Returns (retried, missing): ids that are not, or no longer, dead letters are
        missing; of two callers retrying the same id at once only one re-enqueues it.
        """
        retried: list[str] = []
        missing: list[str] = []
        for job_id in job_ids:
            try:
                payload = self.store.resurrect(job_id)
            except KeyError:
                missing.append(job_id)
                continue
            payload["enqueued_at"] = time.time()
            self._lift_suppressions(job_id, payload)
            self.republish(job_id, payload)
            retried.append(job_id)
        return retried, missing

    def _lift_suppressions(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """A retried dead letter is offered to the addresses its own 5.1.x refusals suppressed."""
        account = payload.get("account")
        addresses = [a for k in ("to", "cc", "bcc") for a in payload.get(k) or [] if isinstance(a, str)]
        if isinstance(account, str) and addresses:
            with contextlib.suppress(ValueError):
                Suppressions(self.store.redis, self.settings.suppression_ttl).lift(account, addresses, job_id)

    def job(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def wait(self, job_id: str, timeout: float, *, poll: float = 0.1) -> Job | None:
        """Wait until the job is sent, dead or suppressed (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        job = self.store.get(job_id)
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            if job is not None and job.state in FINAL_STATES:
                return job
            time.sleep(poll)
        return job

    def send_notification(
        self,
        account: str,
        to: Sequence[str] = (),
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        **options: Unpack[MessageOptions],
    ) -> str:
        """Enqueue a notification (see :class:`MessageOptions` for cc, bcc, attachments, …)."""
        fields = message_fields(to, subject, text, html, **options)
        return self.enqueue({"account": account, "kind": "notification", **fields})

    def send_auto_reply(
        self,
        account: str,
        original: Mapping[str, Any],
        text: str | None = None,
        html: str | None = None,
        *,
        subject: str = "",
        to: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        return self.enqueue(
            {
                "account": account,
                "kind": "auto-reply",
                "original": dict(original),
                "to": list(to),
                "subject": subject,
                "text": text,
                "html": html,
                "headers": dict(headers or {}),
                "idempotency_key": idempotency_key,
            }
        )


def enqueue_span(job_id: str, model: SendPayload) -> Span:
    """The producer's span of one job (a child of the caller's current span, e.g. the HTTP
    API's POST), its traceparent kept in the job's record for the attempts to continue."""
    span = tracing.start("postroom.enqueue", kind=SpanKind.PRODUCER)
    if span.is_recording():
        span.set_attributes(
            {
                "messaging.operation.type": "send",
                "messaging.destination.name": tracing.QUEUE_NAME,
                "messaging.message.id": job_id,
                "postroom.job_id": job_id,
                "postroom.account": model.account,
                "postroom.kind": model.kind,
                "postroom.recipients.count": len(model.to) + len(model.cc) + len(model.bcc),
                "postroom.scheduled": model.send_at is not None,
            }
        )
    return span


@functools.cache
def default_producer() -> Producer:
    """The producer the module-level helpers use (one per process, made on first use)."""
    return Producer()


def send_notification(
    account: str, to: Sequence[str] = (), subject: str = "", text: str | None = None, **kwargs: Any
) -> str:
    """Enqueue a notification on the default broker; returns the job id."""
    return default_producer().send_notification(account, to, subject, text, **kwargs)


def send_auto_reply(account: str, original: Mapping[str, Any], text: str | None = None, **kwargs: Any) -> str:
    """Enqueue an auto-reply to ``original`` on the default broker; returns the job id."""
    return default_producer().send_auto_reply(account, original, text, **kwargs)


def send_batch(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Enqueue many messages as one batch job on the default broker; returns their job ids."""
    return default_producer().send_batch(messages)
