"""The one delivery pipeline: resolve account → build MIME → sign → claim → send → classify.

Runs in the Celery task's thread; only the network part (and the sent mark
right after it) runs on the process loop (``Runtime.run``).

Duplicate suppression (contract §4): before talking to a server the attempt
claims the Message-ID; recipients the server accepted are written to
``delivered:<account>:<message_id>`` right after its 250, and every later attempt (a
retry, a redelivery after a crash, a retried dead letter) sends only to the
recipients not in there. The one remaining window is a crash between the
server's 250 and that write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from worker.db.vocabulary import JobState, RecipientState
from worker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DeliveryError,
    LimitWait,
    RecipientStatus,
    Superseded,
    TransientError,
)
from worker.mail import autoreply
from worker.mail.message import Attachment, MessageSpec, build_message, message_id_for
from worker.mail.payload import SendPayload
from worker.ops import tracing
from worker.ops.tracing import Context
from worker.queue.pipeline import spans
from worker.queue.pipeline.attemptlog import log_attempt
from worker.queue.process.runtime import Runtime
from worker.queue.store.jobs import JobStore
from worker.queue.store.marks import CLAIM_TTL, CLAIMS, AsyncMarks, Fence, fence_clock
from worker.queue.store.suppressions import Suppressions, hard_bounce
from worker.records.account.account import EmailAccount, Limits
from worker.records.addresses import bare_address
from worker.records.loader import Records
from worker.settings import Settings
from worker.transports.base import OutgoingMessage, SendResult, Transport
from worker.transports.limits import Limiter

log = logging.getLogger("postroom.delivery")


@dataclass
class Outcome:
    state: JobState  # the state this attempt leaves the job in: sent, suppressed, retrying or dead
    reason: str | None = None
    retry_after: float | None = None
    recipients: dict[str, dict[str, Any]] = field(default_factory=dict)
    transport: str | None = None
    security: str | None = None
    code: int | None = None
    counts: bool = True  # False: nothing was tried (another attempt held the Message-ID)
    auth_failure: bool = False  # the server refused our credentials (the circuit breaker counts it)
    limit_wait: bool = False  # a provider limit: come back exactly at retry_after
    superseded: bool = False  # the attempt lost its job to a later one before sending: nothing sent


def stable_message_id(job_id: str, from_address: str) -> str:
    """A Message-ID derived from the job id, for producers that did not send one (a job id
    that is not a safe token is hashed: see :func:`worker.mail.message.message_id_for`)."""
    return message_id_for(job_id, from_address.rsplit("@", 1)[-1])


def outcome_for_error(
    exc: DeliveryError, transport: str, remaining: tuple[str, ...], already: dict[str, dict[str, Any]]
) -> Outcome:
    """A failed attempt: retry for the transient family, dead letter for the permanent one."""
    recipients = {**already, **{a: r.as_dict() for a, r in exc.recipients.items()}}
    for rcpt in remaining:
        recipients.setdefault(
            rcpt,
            RecipientStatus(
                RecipientState.DEFERRED if exc.transient else RecipientState.FAILED,
                exc.code,
                exc.server_text or exc.reason,
            ).as_dict(),
        )
    state = JobState.RETRYING if isinstance(exc, TransientError) else JobState.DEAD
    return Outcome(
        state,
        reason=str(exc),
        retry_after=exc.retry_after if state == JobState.RETRYING else None,
        recipients=recipients,
        transport=exc.transport or transport,
        code=exc.code,
        auth_failure=isinstance(exc, AuthenticationFailed),
        counts=not isinstance(exc, LimitWait),  # a limit's wait is not an attempt
        limit_wait=isinstance(exc, LimitWait),
    )


def outcome_for_result(result: SendResult, already: dict[str, dict[str, Any]]) -> Outcome:
    """An attempt the server answered: sent, or retry for the recipients it deferred."""
    recipients = {**already, **{a: r.as_dict() for a, r in result.recipients.items()}}
    common: dict[str, Any] = {
        "recipients": recipients,
        "transport": result.transport,
        "security": result.security,
    }
    if result.deferred:
        first = result.recipients[result.deferred[0]]
        reason = f"{len(result.deferred)} recipient(s) deferred: {first.code} {first.message}"
        return Outcome(JobState.RETRYING, reason=reason, code=first.code, **common)
    if result.failed:
        first = result.recipients[result.failed[0]]
        reason = f"{len(result.failed)} recipient(s) refused: {first.code} {first.message}"
        return Outcome(JobState.SENT, reason=reason, code=first.code, **common)
    return Outcome(JobState.SENT, code=250, **common)


@dataclass
class _Pending:
    """One message of a batch on its way to a server."""

    index: int
    account: str
    message_id: str
    token: str
    recipients: tuple[str, ...]
    transport: Any
    sender: str
    data: bytes
    already: dict[str, dict[str, Any]] = field(default_factory=dict)
    marked: bool = False  # the sent mark is written (it gave the claim up too)
    accepted: bool = False  # the server took it: if the mark failed, the claim must stay until it expires
    outcome: Outcome | None = None  # set as soon as this message's attempt ended
    accepted_by: dict[str, RecipientStatus] = field(default_factory=dict)  # recipients the server took
    limits: Limits | None = None  # the account's rate and daily budget (None: none apply)
    job_id: str = ""
    fence: Fence | None = None  # asked right before the transaction (set once the claim is taken)
    trace: Context | None = None  # the attempt's span: parent of this message's claim and send
    server: str = ""  # the server it goes to (server.address of its send span)
    failure: DeliveryError | None = None  # what the transport raised, for the send span

    @property
    def remaining(self) -> tuple[str, ...]:
        return tuple(r for r in self.recipients if r not in self.already)


class Delivery:
    """The pipeline, for one message (``postroom.send``) or many (``postroom.send_batch``).

    The Redis work of all the messages is pipelined (one round trip to claim,
    one to record, in tasks), and every send runs on the process's event loop
    in one hop, each message marked sent from the loop right after its 250.
    A dead auto-reply's per-sender window is given back by the task layer.
    """

    def __init__(
        self,
        store: JobStore,
        marks: AsyncMarks,
        runtime: Runtime,
        settings: Settings,
        limiter: Limiter | None = None,
    ) -> None:
        self.store = store
        self.marks = marks
        self.limiter = limiter
        self.runtime = runtime
        self.settings = settings
        self.suppressions = Suppressions(store.redis, settings.suppression_ttl, settings.suppression_limit)

    def run(self, job_id: str, payload: SendPayload, attempt: int) -> Outcome:
        started = time.monotonic()
        (outcome,) = self.run_many([(job_id, payload, attempt)])
        log_attempt(job_id, payload.account, attempt, outcome, time.monotonic() - started)
        return outcome

    def _prepare(
        self,
        index: int,
        job_id: str,
        payload: SendPayload,
        attempt: int,
        account: EmailAccount,
        transport: Transport,
        records: Records,
        trace: Context | None = None,
    ) -> _Pending | Outcome:
        """Build and sign one message for sending, or the outcome that ends it here (an
        auto-reply not to send, a message that cannot be built or signed). ``trace``: the
        attempt's span, parent of the build, sign and send spans."""
        message_id = payload.message_id
        if message_id is None:  # a producer that called send_task without the helper
            message_id = stable_message_id(job_id, account.from_address)
            self.store.note_message_id(job_id, message_id)
        spec = _spec(account, payload, message_id)
        if payload.kind == "auto-reply":
            answered = self._auto_reply(job_id, payload, account.name, spec)
            if isinstance(answered, Outcome):
                return answered
            spec = answered
        with tracing.span_of("postroom.build", trace) as span:
            try:
                message = build_message(spec)
            except ValueError as exc:
                tracing.failed(span, "invalid_message")
                return Outcome(JobState.DEAD, reason=f"invalid message: {exc}")
            if span.is_recording():
                span.set_attributes(spans.built(spec, message.recipients, message.data))
        data = spans.signed(message.data, account, records, trace)
        if isinstance(data, str):
            return Outcome(JobState.DEAD, reason=data)
        sender = (account.smtp.envelope_from if account.smtp else None) or account.from_address
        token = f"{job_id}:{attempt}:{time.time()}"
        return _Pending(
            index,
            account.name,
            message_id,
            token,
            message.recipients,
            transport,
            sender,
            data,
            limits=account.limits if account.limits.rate or account.limits.daily_recipients else None,
            job_id=job_id,
            trace=trace,
            server=account.smtp.host if account.smtp else spans.GRAPH_HOST,
        )

    def run_many(
        self, items: list[tuple[str, SendPayload, int]], traces: Sequence[Context | None] = ()
    ) -> list[Outcome]:
        """Each item's outcome, in order; ``traces``: each one's attempt span (its context), the
        parent of its build, sign, claim and send spans (worker/ops/tracing.py)."""
        outcomes: dict[int, Outcome] = {}
        ready: list[_Pending] = []
        records = self.runtime.records()
        for i, (job_id, payload, attempt) in enumerate(items):
            try:
                if payload.account not in records.account_names:
                    records = self.runtime.records(fresh=True)  # a record added a moment ago
                account = records.account(payload.account)
                transport = self.runtime.transport(account)
            except ConfigurationError as exc:
                outcomes[i] = Outcome(JobState.DEAD, reason=f"configuration: {exc}")
                continue
            trace = traces[i] if i < len(traces) else None
            prepared = self._prepare(i, job_id, payload, attempt, account, transport, records, trace)
            if isinstance(prepared, Outcome):
                outcomes[i] = prepared
            else:
                ready.append(prepared)

        # a claim lives while its attempt does (renewed by this process's heartbeat) and is gone
        # CLAIM_TTL seconds after the process dies
        claimed_at = fence_clock()  # before asking: each claim holds CLAIM_TTL from a moment after this
        claiming = [tracing.start("postroom.claim", p.trace) for p in ready]
        claims = self.store.claim_many([(p.account, p.message_id, p.token) for p in ready], CLAIM_TTL)
        pending: list[_Pending] = []
        for p, (claimed, already), span in zip(ready, claims, claiming, strict=True):
            spans.claim_ended(span, claimed, already)
            p.already = already
            if claimed:
                p.fence = Fence(self.marks, p.account, p.message_id, p.token, claimed_at)
                pending.append(p)
            else:
                outcomes[p.index] = Outcome(
                    JobState.RETRYING,
                    reason="another attempt is delivering this Message-ID right now",
                    retry_after=self.store.claim_remaining(p.account, p.message_id),
                    recipients=already,
                    counts=False,
                )
        self._skip_suppressed(pending)
        held = [(p.account, p.message_id, p.token) for p in pending]
        CLAIMS.add(held)
        try:
            with self.runtime.sending([p.account for p in pending]):
                for p, outcome in zip(pending, self._send_all(pending), strict=True):
                    outcomes[p.index] = outcome
        finally:
            CLAIMS.discard(held)
            self.store.release_many(
                [(p.account, p.message_id, p.token) for p in pending if not p.marked and not p.accepted]
            )
        self._note_hard_bounces(pending, outcomes)
        return [
            outcomes.get(i, Outcome(JobState.RETRYING, reason="not attempted")) for i in range(len(items))
        ]

    def _skip_suppressed(self, pending: list[_Pending]) -> None:
        """Recipients on their account's suppression list are never offered to the server: their
        result is ``suppressed`` (worker/queue/store/suppressions.py)."""
        listed = self.suppressions.among([(p.account, p.remaining) for p in pending])
        for p, found in zip(pending, listed, strict=True):
            for address, entry in found.items():
                if entry.get("job_id") == p.job_id:  # this job's own hard bounce: it stays failed
                    p.already[address] = {
                        "status": RecipientState.FAILED,
                        "code": entry.get("code"),
                        "message": entry["reason"],
                    }
                    continue
                reason = f"suppressed ({entry.get('source')}): {entry.get('reason')}"
                p.already[address] = {
                    "status": RecipientState.SUPPRESSED,
                    "code": entry.get("code"),
                    "message": reason,
                }

    def _note_hard_bounces(self, pending: list[_Pending], outcomes: dict[int, Outcome]) -> None:
        """A permanent 5.1.x refusal of a mailbox puts it on the account's suppression list."""
        for p in pending:
            results = outcomes[p.index].recipients or {}
            bounced = [
                (address, str(r.get("message")), r.get("code"), p.job_id)
                for address, r in results.items()
                if address in p.remaining and hard_bounce(r)
            ]
            if bounced:
                written = self.suppressions.add_many(p.account, bounced, source="automatic")
                log.info(
                    "account %s: %d address(es) suppressed after a 5.1.x refusal%s",
                    p.account,
                    len(written),
                    "" if len(written) == len(bounced) else " (the list is full of an operator's entries)",
                )

    def _auto_reply(
        self, job_id: str, payload: SendPayload, account: str, spec: MessageSpec
    ) -> MessageSpec | Outcome:
        """The reply's spec (RFC 3834 headers, to the original's sender), or why it is suppressed."""
        assert payload.original is not None
        reason = autoreply.suppression_reason(payload.original)
        if reason:
            return Outcome(JobState.SUPPRESSED, reason=reason)
        sender = autoreply.reply_recipient(payload)  # "Name <a@b>" as it came: the reply's To
        bare = bare_address(sender)  # the window is per address, whatever name it came with
        if self.store.claim_auto_reply(account, bare, self.settings.auto_reply_window, job_id) is not None:
            return Outcome(
                JobState.SUPPRESSED, reason=f"{account} already auto-replied to {bare} within the window"
            )
        return replace(
            spec,
            to=[sender],
            cc=[],
            bcc=[],
            subject=autoreply.reply_subject(payload),
            own_headers={**spec.own_headers, **autoreply.threading_headers(payload.original)},
        )

    def _send_all(self, pending: list[_Pending]) -> list[Outcome]:
        done_with = self.runtime.releaser()  # each message out of flight as it ends, not its group

        async def one(p: _Pending) -> Outcome:
            if (done := _nothing_to_send(p)) is not None:
                return done
            remaining = p.remaining
            try:
                if p.limits is not None and self.limiter is not None:
                    await self.limiter.admit(
                        p.account,
                        rate=p.limits.rate,
                        daily_recipients=p.limits.daily_recipients,
                        message_id=p.message_id,
                        recipients=len(remaining),
                    )
                outgoing = OutgoingMessage(
                    p.message_id, p.sender, remaining, p.data, fence=p.fence, envelope_id=p.job_id
                )
                result = await p.transport.send(outgoing)
            except Superseded as exc:  # frozen past its claim: the later attempt sends, this one not
                return Outcome(
                    JobState.RETRYING, reason=str(exc), recipients=p.already, counts=False, superseded=True
                )
            except DeliveryError as exc:
                p.failure = exc
                # an AuthenticationFailed flags the account: outcome_for_error sets auth_failure,
                # which the attempt policy counts in the account's health (worker/ops/health.py)
                return outcome_for_error(exc, p.transport.name, remaining, p.already)
            except ConfigurationError as exc:
                return Outcome(JobState.DEAD, reason=f"configuration: {exc}")
            p.accepted = True
            p.accepted_by = {a: r for a, r in result.recipients.items() if r.status == "sent"}
            p.outcome = outcome_for_result(result, p.already)
            if on_loop:  # right after the 250, without waiting for the rest of the batch
                await self.marks.mark_delivered(p.account, p.message_id, p.accepted_by, p.token, p.job_id)
                p.marked = True
            return p.outcome

        async def guarded(p: _Pending) -> Outcome:
            span = spans.send_span(p.trace, p.server, p.transport.name, len(p.remaining), len(p.data))
            try:
                outcome = await one(p)
            except Exception as exc:  # a bug or a library surprise: this message retries on its own
                outcome = Outcome(JobState.RETRYING, reason=f"internal error: {type(exc).__name__}: {exc}")
                p.failure = None
                tracing.failed(span, type(exc).__name__)
            spans.send_ended(span, outcome, p.failure, p.accepted_by)
            # kept on the message itself: a time limit that ends the rest of the batch must not
            # rewrite what this one already ended with (a 550 stays a 550, never "timed out")
            p.outcome = outcome
            done_with(p.account)
            return outcome

        async def everything() -> list[Outcome]:
            if len(pending) == 1:
                return [await guarded(pending[0])]
            # every send runs to its end: no claim is given up while a send may still be under way
            return list(await asyncio.gather(*(guarded(p) for p in pending)))

        if not pending:
            return []
        # One message is marked from this thread as soon as the loop hands its 250 back (cheaper
        # than the loop's async client); a batch is marked from the loop, message by message.
        on_loop = len(pending) > 1
        try:
            outcomes = self.runtime.run(everything(), timeout=self.settings.soft_time_limit)
        except TimeoutError:  # the ones that finished keep their outcome
            outcomes = [p.outcome or Outcome(JobState.RETRYING, reason="delivery timed out") for p in pending]
        unmarked = [p for p in pending if p.accepted and not p.marked]
        if unmarked:
            self.store.mark_many(
                [(p.account, p.message_id, p.accepted_by, p.token, p.job_id) for p in unmarked]
            )
            for p in unmarked:
                p.marked = True
        return outcomes


def _nothing_to_send(p: _Pending) -> Outcome | None:
    """The outcome of a message no recipient is left to send to, without a send."""
    if p.remaining:
        return None
    if all(r.get("status") == "suppressed" for r in p.already.values()):
        reason = "every recipient is on the account's suppression list"
        return Outcome(JobState.SUPPRESSED, reason=reason, recipients=p.already)
    return Outcome(JobState.SENT, reason="already delivered (duplicate suppressed)", recipients=p.already)


def _spec(account: Any, payload: SendPayload, message_id: str) -> MessageSpec:
    return MessageSpec(
        from_address=account.from_address,
        display_name=account.display_name,
        reply_to=account.reply_to,
        to=list(payload.to),
        cc=list(payload.cc),
        bcc=list(payload.bcc),
        subject=payload.subject,
        text=payload.text,
        html=payload.html,
        attachments=[
            Attachment(a.filename, a.content_type, a.content(), a.charset) for a in payload.attachments
        ],
        headers=dict(payload.headers),
        own_headers=payload.list_unsubscribe.headers() if payload.list_unsubscribe else {},
        message_id=message_id,
        date=payload.enqueued_at,
    )
