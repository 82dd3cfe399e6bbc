"""The bounce reader (contract §11): each account that opts in (``bounces:`` in its record) has
its mailbox read for the delivery reports that arrive after the 250 — bounces (RFC 3464 DSNs and
the other formats worker/mail/reports.py knows) and complaints (ARF) — and each report that is
about one of its jobs is written to that job (worker/queue/store/reports.py) and moved to
``move_to``.

One reader per account in the whole cluster: every worker process runs a :class:`ReportsReader`
thread, and an account's mailbox is read only by the holder of its lease. The reader keeps its
place in the folder (the highest UID it is done with; through Graph, the receivedDateTime and id
of the last message: worker/transports/mailbox_graph.py), so a message is read once: a report that
matches no job, an auto-reply and ordinary mail stay where they are, counted; a reader killed
mid-pass reads its last messages again and finds their reports done (nothing applied twice).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.db.vocabulary import RecipientState
from worker.errors import ConfigurationError, DeliveryError
from worker.mail.message import comparable_message_id
from worker.mail.reports import Report, parse_report, xtext_decode
from worker.queue.broker.process_state import Background, this_process
from worker.queue.store.reports import Applied, Finding, ReportStore, report_identity
from worker.records.account.account import EmailAccount
from worker.records.loader import Records
from worker.transports.mailbox import ImapMailbox, MailboxError, MailboxSession
from worker.transports.mailbox_graph import graph_mailbox

log = logging.getLogger("postroom.reports")

TICK = 5.0  # seconds between looks at which mailboxes are due (and renewals of the leases held)
# An account's lease lapses this long after its holder last renewed it (every tick, and before
# each message): a reader that died is replaced within about this long.
LEASE_TTL = 30.0
PASS_LIMIT = 200  # messages one pass reads at most (the next pass reads on)
_CODE = re.compile(r"(?:^|[\s;])([245]\d\d)(?=[\s-]|$)")
_MESSAGE_ID = re.compile(r"^<([^<>@\s]+)@[^<>\s]+>$")


@dataclass
class PassReport:
    """What one pass over an account's mailbox did (``postroom bounces check --json``)."""

    account: str
    read: int = 0
    matched: list[dict[str, Any]] = field(default_factory=list)
    unmatched: int = 0
    not_reports: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account, "read": self.read, "matched": self.matched,
            "unmatched": self.unmatched, "not_reports": self.not_reports, "error": self.error,
        }  # fmt: skip


def findings(report: Report) -> list[Finding]:
    """What ``report`` says of each recipient that the job's record can take: a bounce, a
    complaint or a delay (a delivered/relayed/expanded notice says nothing to act on)."""
    out = []
    for r in report.recipients:
        said: str
        if r.action == "complained":
            said, permanent = RecipientState.COMPLAINED, True
        elif r.action == "failed":  # a 4.x.x failure gave up on a passing trouble: not suppressed
            said, permanent = RecipientState.BOUNCED, not (r.status or "5").startswith("4")
        elif r.action == "delayed":
            said, permanent = "delayed", False
        else:
            continue
        code = _CODE.search(r.diagnostic or "")
        out.append(
            Finding(r.address, said, int(code.group(1)) if code else None, r.status, r.diagnostic, permanent)
        )
    return out


def job_of(report: Report) -> tuple[str | None, str | None]:
    """The job a report names (its ENVID, which Postroom sends as the job id, else the left part
    of the original Message-ID ``<job id@domain>``), and the Message-ID to check it by."""
    if report.envelope_id:
        return xtext_decode(report.envelope_id).strip(), None
    message_id = comparable_message_id(report.message_id)
    found = _MESSAGE_ID.match(message_id or "")
    return (found.group(1), report.message_id) if found else (None, None)


def matched_job(store: ReportStore, account: str, report: Report) -> str | None:
    """The job of ``account``'s that ``report`` is about, or None: the job its ENVID or its
    ``<job id@domain>`` Message-ID names, else the job ``account`` sent as the report's
    Message-ID (one the producer chose: the sent mark filed it). Whichever way it is found, the
    job must be ``account``'s and, when found by Message-ID, have been sent as that Message-ID:
    one account's mailbox never touches another's jobs."""
    job_id, message_id = job_of(report)
    if job_id is not None and store.belongs(job_id, account, message_id):
        return job_id
    if report.message_id is None:
        return None
    filed = store.job_sent_as(account, report.message_id)
    if filed is not None and filed != job_id and store.belongs(filed, account, report.message_id):
        return filed
    return None


def read_once(
    store: ReportStore, records: Records, account: EmailAccount, token: str, *, limit: int = PASS_LIMIT
) -> PassReport:
    """One pass over ``account``'s mailbox, as the holder of ``token`` ("": no lease, the CLI)."""
    assert account.bounces is not None
    mb = account.bounces
    result = PassReport(account.name)
    try:
        with open_mailbox(records, account) as mailbox:
            done = store.watermark(account.name, mb.folder, mailbox.validity)
            for ref, position in mailbox.pending(done, limit):
                if token and not store.take_lease(account.name, token, LEASE_TTL):
                    break  # another reader's now
                raw = mailbox.fetch(ref)
                result.read += 1
                outcome = _handle(store, account.name, raw, token, result)
                if outcome == "stop":
                    break  # the lease is another reader's now: stop here, move nothing
                if outcome == "move":
                    mailbox.move(ref, mb.move_to)
                store.advance(account.name, mb.folder, mailbox.validity, position)
    except (MailboxError, ConfigurationError) as exc:  # the mailbox, or its records: next pass
        result.error = str(exc)
    except DeliveryError as exc:  # the OAuth profile's token could not be had
        result.error = f"{account.name}: mailbox: {exc}"
    return result


def _handle(
    store: ReportStore, account: str, raw: bytes, token: str, result: PassReport
) -> Literal["move", "stay", "stop"]:
    """Apply one message: ``move`` it (its report is written), let it ``stay`` (not a report, or
    about no job of this account's), or ``stop`` (the lease was lost: nothing written)."""
    report = parse_report(raw)
    if report is None or report.kind == "auto-reply":
        result.not_reports += 1
        store.count(account, "not_reports" if report is None else "auto_replies")
        return "stay"
    found = findings(report)
    job_id = matched_job(store, account, report) if found else None
    if job_id is None:
        result.unmatched += 1
        store.count(account, "unmatched")
        return "stay"
    applied, changed = store.apply(
        account, job_id, report_identity(report.report_id, raw), report.kind, found, token
    )
    if applied == Applied.LEASE_LOST:
        return "stop"
    if applied == Applied.NO_JOB:
        result.unmatched += 1
        return "stay"
    result.matched.append({
        "job_id": job_id, "kind": report.kind, "changed": changed,
        "already_done": applied == Applied.ALREADY_DONE,
        "recipients": {f.address: {"said": str(f.said), "status": f.status} for f in found},
    })  # fmt: skip
    return "move"


def open_mailbox(records: Records, account: EmailAccount) -> MailboxSession:
    """A session to ``account``'s mailbox with its credentials (opened by ``with``)."""
    from worker.transports.oauth import token_source

    mb = account.bounces
    assert mb is not None
    if mb.via == "graph":
        return graph_mailbox(records, account)
    cadata = records.keystore(mb.truststore).cadata() if mb.truststore else None
    token: Callable[[bool], str] | None = None
    if mb.oauth_profile is not None:
        source = token_source(mb.oauth_profile, records)
        token = lambda force: asyncio.run(source.access_token(force_refresh=force))  # noqa: E731
    password = mb.password.reveal if mb.password is not None else None
    return ImapMailbox(account.name, mb, cadata=cadata, password=password, token=token)


class ReportsReader(Background):
    """This process's bounce reader: a thread that reads the mailboxes whose lease it holds."""

    thread_name = "postroom-reports"

    def __init__(self, store: ReportStore, records: Callable[[], Records]) -> None:
        super().__init__()
        self.store, self.records = store, records
        self.token = f"{this_process().holder}:{uuid.uuid4().hex[:8]}"
        self._due: dict[str, float] = {}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current message, and let the leases go (another reader takes over now)."""
        super().stop(timeout)
        for name in list(self._due):
            try:
                self.store.release_lease(name, self.token)
            except Exception as exc:  # Redis away: the leases lapse by themselves
                log.warning("bounce reader: lease of %s not released: %s", name, exc)

    def _main(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick()
            except Exception:  # a record unreadable, Redis away: the next tick tries again
                log.exception("bounce reader: tick failed")

    def tick(self, now: float | None = None) -> list[PassReport]:
        """Read each opted-in mailbox that is due and whose lease this reader holds."""
        now = time.monotonic() if now is None else now
        records, passes = self.records(), []
        for account in records.accounts.values():
            mb = account.bounces
            if (
                mb is None
                or self._stop.is_set()
                or not self.store.take_lease(account.name, self.token, LEASE_TTL)
            ):
                continue
            if self._due.setdefault(account.name, 0.0) > now:
                continue
            self._due[account.name] = now + mb.interval
            done = read_once(self.store, records, account, self.token)
            if done.error:
                log.warning("bounce reader: %s", done.error)
            elif done.read:
                log.info(
                    "bounce reader: account=%s read=%d matched=%d unmatched=%d not_reports=%d",
                    account.name, done.read, len(done.matched), done.unmatched, done.not_reports,
                )  # fmt: skip
            passes.append(done)
        return passes


def start_reader(store: ReportStore, records: Callable[[], Records]) -> ReportsReader:
    """This process's reader, started once."""
    return this_process().once("reports-reader", lambda: ReportsReader(store, records).start())


def stop_reader() -> None:
    reader = this_process().drop("reports-reader")
    if reader is not None:
        reader.stop()
