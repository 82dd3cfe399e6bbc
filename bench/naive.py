"""The baselines Postroom is judged against: a naive Celery sender and a no-op task.

Same broker, same queue semantics and the same worker settings as ``worker.queue.app``
(acks_late, reject on worker loss, prefetch 1, JSON, task events on), so the
difference the bench measures is the task body: Postroom's pooled, recorded
delivery against "build an EmailMessage, open smtplib, send, quit" per message.
Run by ``bench/run.py`` as ``celery -A bench.naive worker -Q bench``.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from celery import Celery

QUEUE = "bench"
NAIVE_TASK = "bench.naive_send"
NOOP_TASK = "bench.noop"

app = Celery("bench-naive", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/13"))
app.conf.update(
    broker_transport_options={
        "visibility_timeout": 3600,
        "unacked_restore_interval": 60,
        "unacked_restore_throttle": 1,
        "socket_timeout": 15,
        "socket_connect_timeout": 10,
        "retry_on_timeout": True,
        "health_check_interval": 30,
    },
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    worker_hijack_root_logger=False,
    enable_utc=True,
)


@app.task(name=NAIVE_TASK)
def naive_send(
    host: str, port: int, sender: str, to: list[str], subject: str, text: str, message_id: str
) -> None:
    """One message, one fresh SMTP connection: what a first implementation would do."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id
    msg.set_content(text)
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.send_message(msg)


@app.task(name=NOOP_TASK)
def noop(**_: Any) -> None:
    """Celery's own cost per task (same payload size), the ceiling for any task body."""
