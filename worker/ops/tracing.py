"""OpenTelemetry tracing: the one module that knows OpenTelemetry (docs/tracing.md).

Spans follow a job from its producer (``postroom.enqueue``: the Python helper, the HTTP API's
POST; ``postroom.intake``: a Celery or celery-node message taken off the broker) through each
attempt (``postroom.attempt`` → ``postroom.build``, ``postroom.sign``, ``postroom.claim``,
``postroom.send``). Postroom reads its queue itself (worker/queue/broker/inbox.py), so Celery's
own instrumentation never sees a job: the context travels as a W3C ``traceparent`` instead — in
a broker message's headers (any producer may set it; none has to) and in the job record (its
``traceparent`` and ``trace_id`` fields), from which every attempt, in any process, continues
the job's trace.

Export is set up (:func:`configure`) only when the standard variables ask for it: an OTLP
endpoint set, ``OTEL_SDK_DISABLED`` not true, ``OTEL_TRACES_EXPORTER`` not ``none``. Otherwise
the API's no-op tracer answers: no exporter, no thread, spans that record nothing (callers ask
:func:`recording` before computing an attribute). Each process sets it up for itself, after any
fork (a BatchSpanProcessor's thread does not survive one).

Attributes never carry an address, a subject, message content or a secret: recipients are
counted, server replies reduced to their codes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context as Context
from opentelemetry.trace import Span as Span  # re-exported: callers import no OpenTelemetry
from opentelemetry.trace import SpanKind as SpanKind
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.errors import ConfigurationError

log = logging.getLogger("postroom.tracing")

TRACER_NAME = "postroom"
DEFAULT_SERVICE_NAME = "postroom"
QUEUE_NAME = "postroom"  # messaging.destination.name of every job span
_W3C = TraceContextTextMapPropagator()  # W3C only, whatever OTEL_PROPAGATORS says: records keep it
_TRUE = ("true", "1", "yes", "on")


class _Configured:
    """Which process set export up (a forked child sets it up anew)."""

    lock = threading.Lock()
    pid: int | None = None
    exporting = False


_CONFIGURED = _Configured()


def export_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for spans to be exported over OTLP."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "none" in exporters or "otlp" not in exporters:
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure() -> bool:
    """Set up OTLP/HTTP export for this process when the variables ask for it; True if spans are
    exported. Called by every Postroom process as it starts (a worker process after its fork);
    once per process. A provider the application set up already is kept as it is."""
    with _CONFIGURED.lock:
        if _CONFIGURED.pid == os.getpid():
            return _CONFIGURED.exporting
        _CONFIGURED.pid = os.getpid()
        _CONFIGURED.exporting = False
        if not export_requested():
            return False
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _CONFIGURED.exporting = True  # the application's own SDK set-up: its exporters
            return True
        _CONFIGURED.exporting = _set_up_export()
        return _CONFIGURED.exporting


def require_sdk() -> None:
    """Fail now, with the fix, when the variables ask for export and the SDK or the OTLP
    exporter is missing (a worker checks as its app is built, before it forks or takes a job)."""
    if export_requested():
        _sdk()


def _sdk() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "tracing: OTEL_EXPORTER_OTLP_ENDPOINT asks for OTLP export, but the OpenTelemetry SDK "
            f"is not installed ({exc.name}): pip install 'postroom[otel]', or unset the variable"
        ) from None


def _set_up_export() -> bool:
    _sdk()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans over OTLP/HTTP as %s", resource.attributes.get(SERVICE_NAME))
    return True


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered now (a process about to end: a forked child skips atexit)."""
    provider: Any = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if callable(force_flush):
        force_flush(timeout_ms)


@functools.cache
@functools.cache
def tracer() -> trace.Tracer:
    """Postroom's tracer: the API's proxy, which answers with the provider set up when there
    is one and with the no-op tracer otherwise (made once: no object per span)."""
    return trace.get_tracer(TRACER_NAME)


def start(
    name: str,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A span to end by hand (a batch's jobs each have their own, ended as each one ends);
    ``parent`` None: the current context's span."""
    return tracer().start_span(name, context=parent, kind=kind, attributes=attributes)


def within(span: Span) -> Context:
    """The context whose parent is ``span`` (children of a span that is not the current one)."""
    return trace.set_span_in_context(span)


def recording(span: Span) -> bool:
    return span.is_recording()


@contextmanager
def span_of(
    name: str,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span that is the current one inside the block; an exception marks it as an error."""
    with tracer().start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
        yield span


def from_headers(headers: Any) -> Context | None:
    """The context a W3C ``traceparent`` (and ``tracestate``) in ``headers`` carries: an HTTP
    request's, a broker message's. None when there is none (a root span follows)."""
    if not isinstance(headers, Mapping) or not isinstance(headers.get("traceparent"), str):
        return None
    carrier = {"traceparent": headers["traceparent"]}
    if isinstance(headers.get("tracestate"), str):
        carrier["tracestate"] = headers["tracestate"]
    context = _W3C.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def from_traceparent(traceparent: str | None) -> Context | None:
    """The context a job record's ``traceparent`` names (None: no usable one)."""
    return from_headers({"traceparent": traceparent}) if traceparent else None


def traceparent(span: Span, parent: Context | None = None) -> str:
    """``span`` as a W3C traceparent, kept in the job record; with export off, the producer's
    own context (``parent``) when it sent one, so its trace id is kept all the same; "" when
    there is neither."""
    context = span.get_span_context()
    if not context.is_valid and parent is not None:
        context = trace.get_current_span(parent).get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def trace_id_of(traceparent_value: str) -> str:
    """The trace id (32 hex digits) of a traceparent, "" of none."""
    parts = traceparent_value.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def failed(span: Span, error_type: str, description: str | None = None) -> None:
    """Mark ``span`` as failed with ``error.type`` (a class of failure, never a server's text)."""
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, description))


@contextmanager
def server_span(method: str, route: str, headers: Any) -> Iterator[Span]:
    """An HTTP request's span, the current one inside the block: a child of the caller's
    ``traceparent`` when the request carries one, else a new trace's root. The block sets the
    status code (:func:`answered`). When the web framework made the request's span already
    (FastAPI's own telemetry does, from 0.13x on), that one is the parent of what the block
    starts, and the span yielded records nothing."""
    if trace.get_current_span().get_span_context().is_valid:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        f"{method} {route}",
        context=from_headers(headers),
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        if span.is_recording():
            span.set_attributes({"http.request.method": method, "http.route": route, "url.path": route})
        yield span


def answered(span: Span, status: int) -> None:
    """The HTTP status code a request's span ends with (5xx: an error, as the conventions say)."""
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            failed(span, str(status))
