"""The spans of an attempt's stages (docs/tracing.md): the attempt itself, its sign, claim and
send, with what each one may say of a message — counts, sizes, codes and classes, never an
address, a subject, content, a server's text (it may quote an address back) or a secret.

worker/ops/tracing.py owns OpenTelemetry; this module only names the stages and their
attributes, for worker/queue/pipeline/attempts.py and delivery.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.db.vocabulary import JobState, history_word
from worker.errors import ConfigurationError, DeliveryError, RecipientStatus, parse_enhanced_status
from worker.mail.message import MessageSpec
from worker.mail.payload import SendPayload
from worker.mail.signing import sign_message
from worker.ops import tracing
from worker.ops.tracing import Context, Span, SpanKind
from worker.records.account.account import EmailAccount
from worker.records.loader import Records

GRAPH_HOST = "graph.microsoft.com"  # server.address of a send over Microsoft Graph


def attempt_span(job_id: str, payload: SendPayload, attempt: int, traceparent: str) -> Span:
    """One attempt at a job: a child of the span its record keeps (its enqueue, or its intake
    from a broker message), the root of a new trace when the record keeps none."""
    span = tracing.start("postroom.attempt", tracing.from_traceparent(traceparent), SpanKind.CONSUMER)
    if span.is_recording():
        span.set_attributes(
            {
                "messaging.operation.type": "process",
                "messaging.destination.name": tracing.QUEUE_NAME,
                "messaging.message.id": job_id,
                "postroom.job_id": job_id,
                "postroom.account": payload.account,
                "postroom.attempt": attempt,
            }
        )
    return span


def attempt_ended(span: Span, state: str) -> None:
    """The attempt's result (sent, retrying, dead, skipped, …); a dead job's attempt is an error."""
    if span.is_recording():
        span.set_attribute("postroom.result", str(state))
        if state == JobState.DEAD:
            tracing.failed(span, "dead")
    span.end()


def built(spec: MessageSpec, recipients: tuple[str, ...], data: bytes) -> dict[str, Any]:
    """A built message's span attributes: counts and its size."""
    return {
        "postroom.recipients.count": len(recipients),
        "postroom.attachments.count": len(spec.attachments),
        "messaging.message.body.size": len(data),
    }


def signed(data: bytes, account: EmailAccount, records: Records, trace: Context | None) -> bytes | str:
    """``data`` signed (S/MIME then DKIM, as the account says), under a ``postroom.sign`` span
    when it signs; or why it cannot be (the job is a dead letter: broken material is never
    sent unsigned)."""
    if account.signing is None and account.dkim is None:
        return data
    how = "+".join(name for name, on in (("smime", account.signing), ("dkim", account.dkim)) if on)
    with tracing.span_of("postroom.sign", trace, attributes={"postroom.signing": how}) as span:
        try:
            return sign_message(data, account, records)
        except ConfigurationError as exc:
            tracing.failed(span, "configuration")
            return f"configuration: signing: {exc}"
        except (ValueError, TypeError) as exc:
            tracing.failed(span, type(exc).__name__)
            return f"signing failed: {type(exc).__name__}: {exc}"


def claim_ended(span: Span, claimed: bool, already: Mapping[str, Any]) -> None:
    """The Message-ID claim's span: whether this attempt holds it, how many were sent before."""
    if span.is_recording():
        span.set_attributes({"postroom.claimed": claimed, "postroom.recipients.already": len(already)})
    span.end()


def send_span(trace: Context | None, server: str, transport: str, recipients: int, size: int) -> Span:
    """The span of one message's send (limiter, slot, connection and transaction included)."""
    span = tracing.start("postroom.send", trace, SpanKind.CLIENT)
    if span.is_recording():
        span.set_attributes(
            {
                "server.address": server,
                "postroom.transport": transport,
                "postroom.recipients.count": recipients,
                "messaging.message.body.size": size,
            }
        )
    return span


def send_ended(
    span: Span, outcome: Any, failure: DeliveryError | None, accepted: Mapping[str, RecipientStatus]
) -> None:
    """The server's reply on the send span: its code, enhanced status, the outcome, and the
    class of the failure (``error.type``: worker/errors.py's Rejected, ServerBusy, AuthenticationFailed…)."""
    if span.is_recording():
        enhanced = failure.enhanced_status if failure is not None else None
        if enhanced is None and accepted:
            enhanced = parse_enhanced_status(next(iter(accepted.values())).message)
        reply = {
            "postroom.reply.code": outcome.code,
            "postroom.reply.enhanced_status": enhanced,
            "postroom.outcome": history_word(outcome.state),
            "postroom.recipients.accepted": len(accepted),
        }
        span.set_attributes({k: v for k, v in reply.items() if v is not None})
        if failure is not None:
            tracing.failed(span, type(failure).__name__)
        elif outcome.state in (JobState.RETRYING, JobState.DEAD) and outcome.counts:
            tracing.failed(span, history_word(outcome.state))
    span.end()
