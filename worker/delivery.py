"""The one delivery pipeline: resolve account → build MIME → send → classify → record.

Runs in the Celery task's thread; only the network part runs on the process
loop (``Runtime.run``), so Redis round-trips never block other tasks' I/O.

Duplicate suppression (DESIGN §4): before talking to a server the attempt
claims the Message-ID; recipients the server accepted are written to
``delivered:<message_id>`` right after its 250, and every later attempt (a
retry, a redelivery after a crash, a retried dead letter) sends only to the
recipients not in there. The one remaining window is a crash between the
server's 250 and that write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from worker import autoreply
from worker.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DeliveryError,
    RecipientStatus,
    TransientError,
)
from worker.jobs import AsyncMarks, JobStore
from worker.message import Attachment, MessageSpec, build_message
from worker.payload import SendPayload
from worker.runtime import Runtime
from worker.settings import Settings
from worker.transports import OutgoingMessage, SendResult

log = logging.getLogger("postroom.delivery")

State = Literal["sent", "suppressed", "retry", "dead"]


@dataclass
class Outcome:
    state: State
    reason: str | None = None
    retry_after: float | None = None
    recipients: dict[str, dict[str, Any]] = field(default_factory=dict)
    transport: str | None = None
    security: str | None = None
    code: int | None = None
    counts: bool = True  # False: nothing was tried (another attempt held the Message-ID)


FLAG_TTL = 7 * 86400  # the account's last authentication failure, for the operator views


def _flag_key(account: str) -> str:
    return f"postroom:account-flag:{account}"


def log_attempt(job_id: str, account: str, attempt: int, outcome: Outcome, seconds: float) -> None:
    """One line per delivery attempt (never a secret: outcomes carry server replies only)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "delivery job=%s account=%s attempt=%d transport=%s security=%s outcome=%s code=%s duration_ms=%d%s",
        job_id,
        account,
        attempt,
        outcome.transport or "-",
        outcome.security or "-",
        outcome.state,
        outcome.code if outcome.code is not None else "-",
        round(seconds * 1000),
        f" reason={outcome.reason!r}" if outcome.reason else "",
    )


def stable_message_id(job_id: str, from_address: str) -> str:
    """A Message-ID derived from the job id, for producers that did not send one."""
    domain = from_address.rsplit("@", 1)[-1]
    return f"<{job_id}@{domain}>"


class Delivery:
    def __init__(self, store: JobStore, runtime: Runtime, settings: Settings) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings

    def run(self, job_id: str, payload: SendPayload, attempt: int) -> Outcome:
        started = time.monotonic()
        outcome = self._run(job_id, payload, attempt)
        log_attempt(job_id, payload.account, attempt, outcome, time.monotonic() - started)
        return outcome

    def _run(self, job_id: str, payload: SendPayload, attempt: int) -> Outcome:
        try:
            records = self.runtime.records()
            if payload.account not in records.account_names:
                records = self.runtime.records(fresh=True)  # a record added a moment ago
            account = records.account(payload.account)
        except ConfigurationError as exc:
            return Outcome("dead", reason=f"configuration: {exc}")

        headers = dict(payload.headers)
        to, cc, bcc, subject = list(payload.to), list(payload.cc), list(payload.bcc), payload.subject
        reply_to_sender: str | None = None
        if payload.kind == "auto-reply":
            assert payload.original is not None
            reason = autoreply.suppression_reason(payload.original)
            if reason:
                return Outcome("suppressed", reason=reason)
            reply_to_sender = autoreply.reply_recipient(payload)
            to, cc, bcc = [reply_to_sender], [], []
            subject = autoreply.reply_subject(payload)
            headers.update(autoreply.threading_headers(payload.original))
            owner = self.store.claim_auto_reply(
                account.name, reply_to_sender, self.settings.auto_reply_window, job_id
            )
            if owner is not None:
                return Outcome(
                    "suppressed",
                    reason=f"{account.name} already auto-replied to {reply_to_sender} within the window",
                )

        message_id = payload.message_id
        if message_id is None:  # a producer that called send_task without the helper
            message_id = stable_message_id(job_id, account.from_address)
            self.store.note_message_id(job_id, message_id)
        try:
            built = build_message(
                MessageSpec(
                    from_address=account.from_address,
                    display_name=account.display_name,
                    reply_to=account.reply_to,
                    to=to,
                    cc=cc,
                    bcc=bcc,
                    subject=subject,
                    text=payload.text,
                    html=payload.html,
                    attachments=[
                        Attachment(a.filename, a.content_type, a.content()) for a in payload.attachments
                    ],
                    headers=headers,
                    message_id=message_id,
                    date=payload.enqueued_at,
                )
            )
        except ValueError as exc:
            return self._give_up(account.name, reply_to_sender, job_id, f"invalid message: {exc}")

        token = f"{job_id}:{attempt}:{time.time()}"
        # outlives any live attempt (the hard time limit kills it) and expires soon after a crash
        claim_ttl = self.settings.time_limit + 5
        claimed, already = self.store.claim_send(message_id, token, claim_ttl)
        if not claimed:
            return Outcome(
                "retry",
                reason="another attempt is delivering this Message-ID right now",
                retry_after=self.store.claim_remaining(message_id),
                recipients=already,
                counts=False,
            )
        claim = {"token": token}  # _send gives it up together with the sent mark
        remaining = tuple(r for r in built.recipients if r not in already)
        try:
            if not remaining:
                return Outcome("sent", reason="already delivered (duplicate suppressed)", recipients=already)
            return self._send(
                claim,
                job_id,
                account.name,
                account.smtp.envelope_from if account.smtp else None,
                account.from_address,
                message_id,
                remaining,
                built.data,
                already,
                reply_to_sender,
            )
        finally:
            if "token" in claim:
                self.store.release_send(message_id, claim["token"])

    def _send(
        self,
        claim: dict[str, str],
        job_id: str,
        account_name: str,
        envelope_from: str | None,
        from_address: str,
        message_id: str,
        remaining: tuple[str, ...],
        data: bytes,
        already: dict[str, dict[str, Any]],
        reply_to_sender: str | None,
    ) -> Outcome:
        records = self.runtime.records()
        try:
            account = records.account(account_name)
            transport = self.runtime.transport(account)
        except ConfigurationError as exc:
            return self._give_up(account_name, reply_to_sender, job_id, f"configuration: {exc}")
        outgoing = OutgoingMessage(message_id, envelope_from or from_address, remaining, data)
        try:
            result = self.runtime.run(transport.send(outgoing), timeout=self.settings.soft_time_limit)
        except DeliveryError as exc:
            outcome = outcome_for_error(exc, transport.name, remaining, already)
            self._after_failure(outcome, exc, account_name, reply_to_sender, job_id)
            return outcome
        except ConfigurationError as exc:
            return self._give_up(account_name, reply_to_sender, job_id, f"configuration: {exc}")
        except TimeoutError:
            return Outcome("retry", reason="delivery timed out", transport=transport.name)

        accepted = {a: r for a, r in result.recipients.items() if r.status == "sent"}
        # right after the 250: the duplicate guard (and the claim given up, one round trip)
        self.store.mark_delivered(message_id, accepted, release=claim.pop("token"))
        return outcome_for_result(result, already)

    def _after_failure(
        self, outcome: Outcome, exc: DeliveryError, account: str, reply_to_sender: str | None, job_id: str
    ) -> None:
        if isinstance(exc, AuthenticationFailed):
            self.store.redis.set(_flag_key(account), str(exc), ex=FLAG_TTL)
        if outcome.state == "dead":
            self._release_window(account, reply_to_sender, job_id)

    def _give_up(self, account: str, reply_to_sender: str | None, job_id: str, reason: str) -> Outcome:
        self._release_window(account, reply_to_sender, job_id)
        return Outcome("dead", reason=reason)

    def _release_window(self, account: str, reply_to_sender: str | None, job_id: str) -> None:
        if reply_to_sender is not None:
            self.store.release_auto_reply(account, reply_to_sender, job_id)


def outcome_for_error(
    exc: DeliveryError, transport: str, remaining: tuple[str, ...], already: dict[str, dict[str, Any]]
) -> Outcome:
    """A failed attempt: retry for the transient family, dead letter for the permanent one."""
    recipients = {**already, **{a: r.as_dict() for a, r in exc.recipients.items()}}
    for rcpt in remaining:
        recipients.setdefault(
            rcpt,
            RecipientStatus(
                "deferred" if exc.transient else "failed", exc.code, exc.server_text or exc.reason
            ).as_dict(),
        )
    state: State = "retry" if isinstance(exc, TransientError) else "dead"
    return Outcome(
        state,
        reason=str(exc),
        retry_after=exc.retry_after if state == "retry" else None,
        recipients=recipients,
        transport=exc.transport or transport,
        code=exc.code,
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
        return Outcome("retry", reason=reason, code=first.code, **common)
    if result.failed:
        first = result.recipients[result.failed[0]]
        reason = f"{len(result.failed)} recipient(s) refused: {first.code} {first.message}"
        return Outcome("sent", reason=reason, code=first.code, **common)
    return Outcome("sent", code=250, **common)


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

    @property
    def remaining(self) -> tuple[str, ...]:
        return tuple(r for r in self.recipients if r not in self.already)


class BatchDelivery:
    """The same pipeline for many messages at once (``postroom.send_batch``).

    The Redis work of the whole batch is pipelined (one round trip to claim,
    one to record), and every send of the batch runs on the process's event
    loop in one go, each message marked sent from the loop right after its
    250. Auto-replies take the one-message path (their window is per sender).
    """

    def __init__(self, store: JobStore, marks: AsyncMarks, runtime: Runtime, settings: Settings) -> None:
        self.store = store
        self.marks = marks
        self.runtime = runtime
        self.settings = settings
        self.single = Delivery(store, runtime, settings)

    def run(self, items: list[tuple[str, SendPayload, int]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        ready: list[_Pending] = []
        records = self.runtime.records()
        for i, (job_id, payload, attempt) in enumerate(items):
            if payload.kind == "auto-reply":
                outcomes[i] = self.single.run(job_id, payload, attempt)
                continue
            try:
                if payload.account not in records.account_names:
                    records = self.runtime.records(fresh=True)
                account = records.account(payload.account)
                transport = self.runtime.transport(account)
            except ConfigurationError as exc:
                outcomes[i] = Outcome("dead", reason=f"configuration: {exc}")
                continue
            message_id = payload.message_id
            if message_id is None:  # a producer that called send_task without the helper
                message_id = stable_message_id(job_id, account.from_address)
                self.store.note_message_id(job_id, message_id)
            try:
                message = build_message(_spec(account, payload, message_id))
            except ValueError as exc:
                outcomes[i] = Outcome("dead", reason=f"invalid message: {exc}")
                continue
            sender = (account.smtp.envelope_from if account.smtp else None) or account.from_address
            token = f"{job_id}:{attempt}:{time.time()}"
            ready.append(
                _Pending(
                    i, account.name, message_id, token, message.recipients, transport, sender, message.data
                )
            )

        claims = self.store.claim_many([(p.message_id, p.token) for p in ready], self.settings.time_limit + 5)
        pending: list[_Pending] = []
        for p, (claimed, already) in zip(ready, claims, strict=True):
            p.already = already
            if claimed:
                pending.append(p)
            else:
                outcomes[p.index] = Outcome(
                    "retry",
                    reason="another attempt is delivering this Message-ID right now",
                    retry_after=self.store.claim_remaining(p.message_id),
                    recipients=already,
                    counts=False,
                )
        try:
            for p, outcome in zip(pending, self._send_all(pending), strict=True):
                outcomes[p.index] = outcome
        finally:
            self.store.release_many(
                [(p.message_id, p.token) for p in pending if not p.marked and not p.accepted]
            )
        return [outcomes.get(i, Outcome("retry", reason="not attempted")) for i in range(len(items))]

    def _send_all(self, pending: list[_Pending]) -> list[Outcome]:
        async def one(p: _Pending) -> Outcome:
            remaining = p.remaining
            if not remaining:
                return Outcome(
                    "sent", reason="already delivered (duplicate suppressed)", recipients=p.already
                )
            try:
                result = await p.transport.send(OutgoingMessage(p.message_id, p.sender, remaining, p.data))
            except DeliveryError as exc:
                if isinstance(exc, AuthenticationFailed):
                    with contextlib.suppress(Exception):  # a flag, not worth failing the outcome for
                        await self.marks.redis.set(_flag_key(p.account), str(exc), ex=FLAG_TTL)
                return outcome_for_error(exc, p.transport.name, remaining, p.already)
            except ConfigurationError as exc:
                return Outcome("dead", reason=f"configuration: {exc}")
            p.accepted = True
            accepted = {a: r for a, r in result.recipients.items() if r.status == "sent"}
            await self.marks.mark_delivered(p.message_id, accepted, p.token)  # right after the 250
            p.marked = True
            p.outcome = outcome_for_result(result, p.already)
            return p.outcome

        async def everything() -> list[Outcome]:
            # every send runs to its end: no claim is given up while a send may still be under way
            results = await asyncio.gather(*(one(p) for p in pending), return_exceptions=True)
            return [
                r
                if isinstance(r, Outcome)
                else Outcome("retry", reason=f"internal error: {type(r).__name__}: {r}")
                for r in results
            ]

        if not pending:
            return []
        try:
            return self.runtime.run(everything(), timeout=self.settings.soft_time_limit)
        except TimeoutError:  # the ones that finished keep their outcome
            return [p.outcome or Outcome("retry", reason="delivery timed out") for p in pending]


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
        attachments=[Attachment(a.filename, a.content_type, a.content()) for a in payload.attachments],
        headers=dict(payload.headers),
        message_id=message_id,
        date=payload.enqueued_at,
    )
