"""OpenTelemetry tracing (worker/ops/tracing.py, docs/tracing.md): one trace per job, from the
producer's enqueue (the helper, the HTTP API's POST, a broker message) through each attempt's
build, claim and send to the server's 250, its trace id kept in the job record and its events.

In one process with the SDK's in-memory exporter (tests/support/traced_run.py), then end to end:
``postroom http`` and a real worker exporting over OTLP/HTTP to a receiver written here.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from support.queue import QueueEnv, Worker, unique, wait_for
from support.smtpd import SmtpServer, unknown_user
from support.web import postroom_http, write_key
from worker.ops import tracing

TESTS = Path(__file__).resolve().parent
Spans = list[dict[str, Any]]


def by_name(spans: Spans, trace_id: str) -> dict[str, dict[str, Any]]:
    """The spans of one trace by name (the last of a name wins: one attempt per job here)."""
    return {s["name"]: s for s in spans if s["trace_id"] == trace_id}


def assert_chain(spans: dict[str, dict[str, Any]], *names: str) -> None:
    """Each span named is the parent of the next."""
    for parent, child in itertools.pairwise(names):
        assert spans[child]["parent_id"] == spans[parent]["span_id"], (parent, child, spans)


def assert_ancestor(spans: Spans, ancestor: str, name: str) -> None:
    """The span named ``ancestor`` is above the one named ``name`` (spans between: the web
    framework's own, e.g. FastAPI's ``fastapi.endpoint``)."""
    by_id = {s["span_id"]: s for s in spans}
    (span,) = [s for s in spans if s["name"] == name]
    seen = []
    while span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        seen.append(span["name"])
    assert ancestor in seen, (name, seen)


# ---- in one process, the in-memory exporter ------------------------------------------------


def test_helper_and_http_enqueues_each_make_one_trace_to_the_250(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer]
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account(unique("traced"), server)
    refusing = own_queue.account(unique("refusing"), smtp_server(mode="plain", rules=[unknown_user()]))
    token = write_key(own_queue, unique("shop"), [account])
    run = subprocess.run(
        [sys.executable, "-m", "support.traced_run", account, token, refusing],
        env={**os.environ, **own_queue.env, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    spans: Spans = out["spans"]
    for name in ("helper", "http"):
        job = out["jobs"][name]
        assert job["state"] == "sent", job
        trace_id = job["trace_id"]
        assert isinstance(trace_id, str) and len(trace_id) == 32
        traced = by_name(spans, trace_id)
        assert {"postroom.enqueue", "postroom.attempt", "postroom.build", "postroom.claim"} <= set(traced)
        assert_chain(traced, "postroom.enqueue", "postroom.attempt", "postroom.build")
        assert_chain(traced, "postroom.attempt", "postroom.send")
        send = traced["postroom.send"]["attributes"]
        assert send["postroom.reply.code"] == 250 and send["postroom.outcome"] == "sent", send
        assert send["server.address"] == "127.0.0.1" and send["postroom.recipients.count"] == 1
        enqueue = traced["postroom.enqueue"]["attributes"]
        assert enqueue["postroom.job_id"] == job["id"] and enqueue["postroom.account"] == account
        assert traced["postroom.attempt"]["attributes"]["postroom.result"] == "sent"
        # the trace id in the webhook event, as the job shows it
        (event,) = out["events"][name]
        assert event["type"] == "job.sent" and event["data"]["trace_id"] == trace_id
        # no address, subject or content in any attribute
        text = json.dumps([s["attributes"] for s in traced.values()])
        assert "to@example.net" not in text and "By the helper" not in text and "By HTTP" not in text
    http_id = out["jobs"]["http"]["trace_id"]
    assert_ancestor([s for s in spans if s["trace_id"] == http_id], "POST /v1/messages", "postroom.enqueue")
    (post,) = [s for s in spans if s["trace_id"] == http_id and s["name"] == "POST /v1/messages"]
    assert post["parent_id"] is None and post["attributes"]["http.response.status_code"] == 202
    assert "POST /v1/messages" not in by_name(spans, out["jobs"]["helper"]["trace_id"])
    assert out["jobs"]["helper"]["trace_id"] != out["jobs"]["http"]["trace_id"]
    # a refusal: the failure's class, the reply's codes, never its text
    refused = out["jobs"]["refused"]
    assert refused["state"] == "dead", refused
    failed = by_name(spans, refused["trace_id"])
    send = failed["postroom.send"]
    assert send["status"] == "ERROR" and send["attributes"]["error.type"] == "Rejected", send
    assert send["attributes"]["postroom.reply.code"] == 550
    assert send["attributes"]["postroom.reply.enhanced_status"] == "5.1.1"
    assert "No such user" not in json.dumps(send) and "nobody@" not in json.dumps(failed)
    attempt = failed["postroom.attempt"]
    assert attempt["attributes"]["postroom.result"] == "dead" and attempt["status"] == "ERROR"


# ---- end to end: real processes, OTLP/HTTP -------------------------------------------------


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: ``POST /v1/traces`` (protobuf), the spans kept as dicts."""

    def __init__(self) -> None:
        self.spans: Spans = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = (
                    self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                )
                if ok:
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.keep(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def keep(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    with self.lock:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex() or None,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "status": span.status.code,
                                "service": resource.get("service.name"),
                            }
                        )

    def of_trace(self, trace_id: str) -> Spans:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def tree(spans: Spans) -> str:
    """The spans of one trace as an indented tree: name, duration, key attributes (docs/tracing.md)."""
    children: dict[str | None, Spans] = {}
    ids = {s["span_id"] for s in spans}
    for span in sorted(spans, key=lambda s: s["start"]):
        children.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(span)
    lines: list[str] = []
    began = min(s["start"] for s in spans)

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            at, ms = (span["start"] - began) / 1e6, (span["end"] - span["start"]) / 1e6
            keep = {k: v for k, v in span["attributes"].items() if not k.startswith("messaging.destination")}
            attrs = " ".join(f"{k}={v}" for k, v in sorted(keep.items()))
            name = f"{'  ' * depth}{span['name']}"
            lines.append(f"{name:<32} +{at:7.1f} ms {ms:7.1f} ms  {attrs}".rstrip())
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    made = OtlpReceiver()
    yield made
    made.stop()


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def signed_with_dkim(record: Path, folder: Path) -> None:
    """The account ``record`` signs with DKIM (a key of its own): its attempts have a sign span."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = folder / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    dkim = f"dkim:\n  domain: example.com\n  selector: s1\n  private_key: {{file: {key_file}}}\n"
    record.write_text(record.read_text() + dkim)


def test_a_job_from_http_post_to_250_is_one_exported_trace(
    own_queue: QueueEnv,
    smtp_server: Callable[..., SmtpServer],
    receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account(unique("otlp"), server)
    signed_with_dkim(own_queue.accounts / f"{account}.yaml", tmp_path)
    token = write_key(own_queue, unique("shop"), [account])
    env = {**os.environ, **own_queue.env, **otel_env(receiver)}
    worker = Worker(own_queue, tmp_path / "worker.log", extra_env=otel_env(receiver)).start()
    try:
        with postroom_http(env, tmp_path / "http.log") as base:
            reply = httpx.post(
                f"{base}/v1/messages",
                headers={"Authorization": f"Bearer {token}"},
                json={"account": account, "to": ["to@example.net"], "subject": "Traced", "text": "Hi\n"},
            )
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["job_id"]
            producer = own_queue.producer()
            job = producer.wait(job_id, 30)
            producer.close()
            assert job is not None and job.state == "sent", job
            shown = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
            assert shown.json()["trace_id"] == job.trace_id
            names = {"POST /v1/messages", "postroom.enqueue", "postroom.attempt", "postroom.send"}
            wait_for(
                lambda: names <= {s["name"] for s in receiver.of_trace(str(job.trace_id))},
                20,
                "the trace's spans at the receiver",
            )
    finally:
        worker.stop()
    spans = receiver.of_trace(str(job.trace_id))
    traced = {s["name"]: s for s in spans}
    assert_ancestor(spans, "POST /v1/messages", "postroom.enqueue")
    assert_chain(traced, "postroom.enqueue", "postroom.attempt", "postroom.build")
    assert_chain(traced, "postroom.attempt", "postroom.send")
    assert_chain(traced, "postroom.attempt", "postroom.sign")
    assert traced["postroom.sign"]["attributes"]["postroom.signing"] == "dkim"
    assert traced["POST /v1/messages"]["parent_id"] is None
    assert traced["postroom.send"]["attributes"]["postroom.reply.code"] == 250
    assert {s["service"] for s in spans} == {"postroom"}
    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "job", job_id, "--json"],
        env={**os.environ, **own_queue.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(cli.stdout)["trace_id"] == job.trace_id
    text = subprocess.run(
        [sys.executable, "-m", "worker.cli", "job", job_id],
        env={**os.environ, **own_queue.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"trace: {job.trace_id}" in text.stdout, text.stdout
    shown_tree = tree(spans)
    (tmp_path / "trace.txt").write_text(shown_tree + "\n")
    print(f"trace {job.trace_id}\n{shown_tree}")  # what docs/tracing.md shows (pytest -s)


def test_a_plain_celery_send_task_gets_a_root_at_intake_and_is_sent(
    own_queue: QueueEnv,
    smtp_server: Callable[..., SmtpServer],
    receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account(unique("plain"), server)
    worker = Worker(own_queue, tmp_path / "worker.log", extra_env=otel_env(receiver)).start()
    app = Celery("plain-producer", broker=own_queue.broker_url, set_as_current=False)
    payload = {"account": account, "to": ["to@example.net"], "subject": "Plain", "text": "Hi\n"}
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a producer's own trace
    try:
        bare = app.send_task("postroom.send", kwargs=payload, queue="postroom").id
        carried = app.send_task(
            "postroom.send", kwargs=payload, queue="postroom", headers={"traceparent": theirs}
        ).id
        producer = own_queue.producer()
        jobs = {job_id: producer.wait(job_id, 30) for job_id in (bare, carried)}
        producer.close()
        for job in jobs.values():
            assert job is not None and job.state == "sent", job
        bare_job, carried_job = jobs[bare], jobs[carried]
        assert bare_job is not None and carried_job is not None
        assert carried_job.trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert bare_job.trace_id and bare_job.trace_id != carried_job.trace_id
        names = {"postroom.intake", "postroom.attempt", "postroom.send"}
        for trace_id in (str(bare_job.trace_id), str(carried_job.trace_id)):

            def arrived(trace_id: str = trace_id) -> bool:
                return names <= {s["name"] for s in receiver.of_trace(trace_id)}

            wait_for(arrived, 20, "the trace's spans at the receiver")
    finally:
        worker.stop()
        app.close()
    root = {s["name"]: s for s in receiver.of_trace(str(bare_job.trace_id))}
    assert root["postroom.intake"]["parent_id"] is None  # no context came: the trace starts here
    assert_chain(root, "postroom.intake", "postroom.attempt", "postroom.send")
    assert root["postroom.send"]["attributes"]["postroom.reply.code"] == 250
    child = {s["name"]: s for s in receiver.of_trace(str(carried_job.trace_id))}
    assert child["postroom.intake"]["parent_id"] == "b7ad6b7169203331"  # the producer's span
    assert_chain(child, "postroom.intake", "postroom.attempt", "postroom.send")


# ---- off: nothing exported, no thread ------------------------------------------------------

SET_UP = """
import json, sys, threading
from pathlib import Path
from opentelemetry import trace
from worker.client import Producer
from worker.ops import tracing
from worker.records.loader import Records
producer = Producer(sys.argv[1], records=Records.load(Path(sys.argv[2]), Path(sys.argv[3])))
job_id = producer.send_notification(sys.argv[4], ["to@example.net"], "Traced or not", "Hi\\n")
record = producer.store.redis.hgetall("postroom:job:" + job_id)
print(json.dumps({
    "exporting": tracing.configure(),
    "proxy": isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider),
    "recording": tracing.start("probe").is_recording(),
    "record_fields": sorted(k for k in map(str, record) if k.startswith("trace")),
    "trace_id": producer.job(job_id).as_dict()["trace_id"],
    "threads": sorted(t.name for t in threading.enumerate()),
}))
"""


def set_up_in_a_process(env: QueueEnv, account: str, otel: dict[str, str]) -> dict[str, Any]:
    """What a fresh process that makes a Producer and enqueues one job set up, with ``otel``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run(
        [sys.executable, "-c", SET_UP, env.broker_url, str(env.accounts), str(env.config), account],
        env={**clean, **env.env, **otel},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return found


def test_without_otel_variables_nothing_is_set_up(
    own_queue: QueueEnv, smtp_server: Callable[..., Any], receiver: OtlpReceiver
) -> None:
    account = own_queue.account(unique("off"), smtp_server(mode="plain"))
    off = set_up_in_a_process(own_queue, account, {})
    assert off["exporting"] is False and off["proxy"] is True and off["recording"] is False, off
    assert off["record_fields"] == [] and off["trace_id"] is None, off
    assert not any("Otel" in name or "Batch" in name for name in off["threads"]), off["threads"]
    # the same process with the endpoint set: a provider, its export thread, the trace kept
    on = set_up_in_a_process(own_queue, account, otel_env(receiver))
    assert on["exporting"] is True and on["proxy"] is False and on["recording"] is True, on
    assert on["record_fields"] == ["trace_id", "traceparent"] and len(on["trace_id"]) == 32, on
    assert "OtelBatchSpanRecordProcessor" in on["threads"], on["threads"]
    wait_for(lambda: receiver.of_trace(on["trace_id"]) != [], 20, "the enqueue span at the receiver")
    # and the variables that turn it off again
    for off_again in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        quiet = set_up_in_a_process(own_queue, account, {**otel_env(receiver), **off_again})
        assert quiet["exporting"] is False and quiet["trace_id"] is None, (off_again, quiet)
        assert not any("Otel" in name for name in quiet["threads"]), quiet["threads"]


@pytest.mark.parametrize(
    ("environ", "asked"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_SERVICE_NAME": "mail"}, False),
    ],
)
def test_the_standard_variables_decide_export(environ: dict[str, str], asked: bool) -> None:
    assert tracing.export_requested(environ) is asked


MISSING_SDK = """
import sys
sys.modules["opentelemetry.sdk"] = None  # as if postroom[otel] were not installed
from worker.errors import ConfigurationError
from worker.ops import tracing
for step in (tracing.configure, tracing.require_sdk):
    try:
        step()
    except ConfigurationError as exc:
        print(exc)
    else:
        raise SystemExit(f"no error from {step.__name__}")
"""


def test_export_asked_without_the_sdk_fails_with_a_clear_message() -> None:
    run = subprocess.run(
        [sys.executable, "-c", MISSING_SDK],
        env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pip install 'postroom[otel]'" in run.stdout
    assert "pip install 'postroom[otel]'" in run.stdout.splitlines()[-1]  # require_sdk, as a worker starts


def test_a_traceparent_is_read_only_when_well_formed() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.from_headers({"traceparent": good}) is not None
    for bad in (None, 42, "", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert tracing.from_headers({"traceparent": bad}) is None
    assert tracing.from_headers("not a mapping") is None
    assert tracing.trace_id_of(good) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.trace_id_of("garbage") == ""
