"""One process that enqueues and sends with the SDK's in-memory exporter (tests/test_tracing.py):
``python -m support.traced_run ACCOUNT API_KEY REFUSING_ACCOUNT`` with a queue's POSTROOM_*
environment.

The producer helper enqueues one job (and one to REFUSING_ACCOUNT, whose server refuses its
recipient), the HTTP API (a real uvicorn in a thread) another, and the
worker's own dispatcher (worker/queue/pipeline/dispatch.py, no Celery) sends both; then it prints
one JSON object: every finished span, each job's record and its webhook event's body. Run as a
process of its own: the worker's per-process state (settings, job store, loop) stays out of the
test session.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from support.web import ApiServer
from worker.client import Producer
from worker.queue.broker.celery_app import job_store, settings
from worker.queue.events import outbox
from worker.queue.pipeline.dispatch import Dispatcher
from worker.settings import accounts_dir, config_dir
from worker.web import http as http_api


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "start": span.start_time,
        "end": span.end_time,
    }


def main(account: str, token: str, refusing: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    store = job_store()
    outbox.publish_routes(store.redis, {"all": {"events": ["job.sent"], "accounts": [account]}})
    producer = Producer(accounts_dir=accounts_dir(), config_dir=config_dir())
    by_helper = producer.send_notification(account, ["to@example.net"], "By the helper", "Hello\n")
    refused = producer.send_notification(refusing, ["nobody@example.net"], "Refused", "Hello\n")
    server = ApiServer(http_api.create_app(producer))
    reply = httpx.post(
        f"{server.url}/v1/messages",
        headers={"Authorization": f"Bearer {token}"},
        json={"account": account, "to": ["to@example.net"], "subject": "By HTTP", "text": "Hello\n"},
    )
    assert reply.status_code == 202, reply.text
    by_http = reply.json()["job_id"]
    dispatcher = Dispatcher(store.redis, settings()).start()
    try:
        ids = (("helper", by_helper), ("http", by_http), ("refused", refused))
        jobs = {name: producer.wait(job_id, 30) for name, job_id in ids}
    finally:
        dispatcher.stop(10)
        server.stop()
    events = {}
    for name, job in jobs.items():
        assert job is not None
        box = outbox.Outbox(store.redis, 3600)
        found = [box.event(e) for e in box.events_of_job(job.id)]
        events[name] = [json.loads(outbox.event_body(e)) for e in found if e is not None]
    time.sleep(0.2)  # the send spans end on the loop, the attempt's once its record is written
    out = {
        "jobs": {name: job.as_dict() for name, job in jobs.items() if job is not None},
        "events": events,
        "spans": [span_dict(s) for s in exporter.get_finished_spans()],
    }
    producer.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
