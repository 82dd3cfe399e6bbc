"""``postroom send``, ``job`` and ``dead-letters …``: producing and following jobs."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from worker.cli.common import emit_json, open_producer
from worker.db.vocabulary import FINAL_STATES, JobState
from worker.records.addresses import escaped

if TYPE_CHECKING:
    from worker.client import Producer


def _attachment(path: str) -> dict[str, str]:
    import base64
    import mimetypes
    from pathlib import Path

    file = Path(path)
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return {
        "filename": file.name,
        "content_type": content_type,
        "content_base64": base64.b64encode(file.read_bytes()).decode("ascii"),
    }


def _header_pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME:VALUE", param_hint=flag)
        out[name.strip()] = value.strip()
    return out


@click.command("send")
@click.option("--account", "-a", required=True, help="Account name (accounts/NAME.yaml).")
@click.option("--kind", type=click.Choice(["notification", "auto-reply"]), default="notification")
@click.option("--to", "to", multiple=True, help="Recipient (repeatable).")
@click.option("--cc", multiple=True, help="Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="Bcc recipient (repeatable; never shown in headers).")
@click.option("--subject", "-s", default="", help="Subject.")
@click.option("--text", help="Plain-text body ('-' reads standard input).")
@click.option("--html", help="HTML body.")
@click.option("--attach", multiple=True, type=click.Path(exists=True, dir_okay=False), help="File to attach.")
@click.option("--header", multiple=True, help="Extra header NAME:VALUE (repeatable).")
@click.option("--idempotency-key", help="The same key twice sends once.")
@click.option("--message-id", help="Use this Message-ID instead of a generated one.")
@click.option("--at", "send_at", help="Send at this time (ISO 8601 with an offset, or UNIX seconds).")
@click.option(
    "--unsubscribe", multiple=True, help="One-click unsubscribe: an https:// URL and/or mailto:ADDRESS."
)
@click.option("--original-message-id", help="auto-reply: Message-ID of the message answered.")
@click.option("--original-from", help="auto-reply: sender of the message answered.")
@click.option("--original-subject", default="", help="auto-reply: its subject.")
@click.option("--original-return-path", help="auto-reply: its return path ('' or '<>' for a bounce).")
@click.option("--original-header", multiple=True, help="auto-reply: one of its headers NAME:VALUE.")
@click.option("--payload", "payload_file", type=click.File("r"), help="Read the whole payload as JSON.")
@click.option(
    "--wait",
    type=float,
    default=None,
    help="Wait up to SECONDS for the outcome. Exit status: 0 sent (or suppressed), 1 dead or "
    "cancelled, 4 not ended when the wait did (still queued, retrying, held or scheduled).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def send_command(
    account: str,
    kind: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    subject: str,
    text: str | None,
    html: str | None,
    attach: tuple[str, ...],
    header: tuple[str, ...],
    idempotency_key: str | None,
    message_id: str | None,
    send_at: str | None,
    unsubscribe: tuple[str, ...],
    original_message_id: str | None,
    original_from: str | None,
    original_subject: str,
    original_return_path: str | None,
    original_header: tuple[str, ...],
    payload_file: Any,
    wait: float | None,
    as_json: bool,
) -> None:
    """Enqueue a notification or an auto-reply; prints the job id (and, with --at, when it is
    due). Exit status: 0 enqueued (with --wait: sent or suppressed), 1 dead or cancelled (--wait),
    2 payload refused, 3 not enqueued, 4 still not ended when --wait's time was up."""
    from worker.client import EnqueueError, PayloadError, message_fields

    if text == "-":
        text = sys.stdin.read()
    payload: dict[str, Any] = json.load(payload_file) if payload_file else {}
    payload.setdefault("account", account)
    payload.setdefault("kind", kind)
    fields = message_fields(
        to,
        subject,
        text,
        html,
        cc=cc,
        bcc=bcc,
        attachments=[_attachment(p) for p in attach],
        headers=_header_pairs(header, "--header"),
        idempotency_key=idempotency_key,
        message_id=message_id,
        list_unsubscribe={("mailto" if u.startswith("mailto:") else "url"): u for u in unsubscribe},
        send_at=float(send_at) if send_at and send_at.replace(".", "", 1).isdigit() else send_at,
    )
    for key, value in fields.items():
        if value not in (None, [], {}, ""):
            payload[key] = value
    if payload["kind"] == "auto-reply" and "original" not in payload:
        given = {  # an empty --original-return-path is the null sender "<>", so it counts
            "from": original_from or None,
            "message_id": original_message_id or None,
            "return_path": original_return_path,
        }
        payload["original"] = {
            "subject": original_subject,
            "headers": _header_pairs(original_header, "--original-header"),
            **{key: value for key, value in given.items() if value is not None},
        }
    try:
        producer = open_producer()
        job_id = producer.enqueue(payload)
    except PayloadError as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(2)
    except EnqueueError as exc:
        click.echo(f"not enqueued: {exc}", err=True)
        sys.exit(3)
    _report_sent(producer, job_id, wait, as_json)


def _report_sent(producer: Producer, job_id: str, wait: float | None, as_json: bool) -> None:
    """What ``send`` prints: the job id (and when a scheduled one is due), or with ``--wait`` the
    outcome, and the exit status that tells them apart."""
    if wait is None:
        due = producer.job(job_id)
        due_at = due.due_at if due is not None and due.state == JobState.SCHEDULED else None
        if as_json:
            emit_json({"id": job_id, "state": due.state if due else "unknown", "due_at": due_at})
        else:
            click.echo(job_id if due_at is None else f"{job_id}  scheduled, due {_when(due_at)}")
        return
    job = producer.wait(job_id, wait)
    if as_json:
        emit_json(job.as_dict() if job else {"id": job_id, "state": "unknown"})
    else:
        click.echo(job_id)
        _print_job(job)
    sys.exit(wait_exit_code(job))


# ``postroom send --wait``'s exit status (contract §8); 2 and 3 are taken by a refused payload
# and a job that could not be enqueued
SENT_EXIT, ENDED_UNSENT_EXIT, STILL_WAITING_EXIT = 0, 1, 4


def wait_exit_code(job: Any) -> int:
    """0: sent, or suppressed (every recipient on the suppression list or an auto-reply not due:
    contract §2 says not an error); 1: ended without being sent (dead or cancelled); 4: not ended
    when the wait did (queued, scheduled, sending, retrying, held, or no record yet)."""
    if job is None or job.state not in FINAL_STATES:
        return STILL_WAITING_EXIT
    return SENT_EXIT if job.state in (JobState.SENT, JobState.SUPPRESSED) else ENDED_UNSENT_EXIT


def _when(at: float) -> str:
    """A time as the operator's clock shows it, and how far off it is."""
    local = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(at))
    seconds = int(at - time.time())
    off = f"in {seconds}s" if 0 <= seconds < 120 else f"in {seconds // 60}m" if seconds >= 0 else "overdue"
    return f"{local} ({off})"


def _print_job(job: Any) -> None:
    if job is None:
        click.echo("state: unknown (no record)")
        return
    click.echo(f"state: {job.state}  attempts: {job.attempts}  account: {job.account}")
    click.echo(
        f"message-id: {job.message_id}  transport: {job.transport or '-'}  security: {job.security or '-'}"
    )
    for address, result in job.recipients.items():
        code = "" if result.get("code") is None else result["code"]
        line = f"  {address}: {result.get('status')} {code} {result.get('message') or ''}".rstrip()
        click.echo(escaped(line))  # a server's reply: shown, never obeyed by the terminal
    if job.due_at is not None and job.state == JobState.SCHEDULED:
        click.echo(f"due: {_when(job.due_at)}")
    elif job.due_at is not None and job.state == JobState.RETRYING:
        click.echo(f"next attempt: {_when(job.due_at)}")
    if (cancelled := job.cancelled()) is not None:  # an end someone chose: not an error
        by = f" by {cancelled['by']}" if cancelled["by"] else ""
        at = (
            time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(cancelled["at"])) if cancelled["at"] else "?"
        )
        click.echo(f"cancelled at {at}{by}")
    elif job.last_error:
        click.echo(escaped(f"last error: {job.last_error}"))
    if job.trace_id:  # its OpenTelemetry trace (docs/tracing.md)
        click.echo(escaped(f"trace: {job.trace_id}"))


def _print_history(job: Any) -> None:
    for entry in job.history or []:
        error = entry.get("error") or ""
        label = f"attempt {entry['attempt']}" if entry.get("attempt") is not None else "waiting"
        click.echo(escaped(f"  {label}: {entry.get('outcome')} {error}".rstrip()))


@click.command("job")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def job_command(job_id: str, as_json: bool) -> None:
    """Show a job: state, attempts, per-recipient results, transport, security, last error."""
    job = open_producer().job(job_id)
    if job is None:
        if as_json:
            emit_json({"id": job_id, "state": "unknown"})
        else:
            click.echo(f"no job {job_id}{NOT_READ_YET}", err=True)
        sys.exit(1)
    if as_json:
        emit_json(job.as_dict())
    else:
        click.echo(job.id)
        _print_job(job)
        _print_history(job)


# A job a producer published without the helper (plain Celery, celery-node) has a record from
# the moment the first worker reads it off the queue.
NOT_READ_YET = " (a job published without Postroom's helper has a record once a worker has read it)"


@click.command("cancel")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel_command(job_id: str, as_json: bool) -> None:
    """Cancel a job that has not started sending (scheduled, queued, retrying or held); exit 1
    when there is no such job or it is sending or has ended."""
    producer = open_producer()
    try:
        cancelled, state = producer.cancel(job_id, by="postroom cancel")
        job = producer.job(job_id)
    finally:
        producer.close()
    if as_json:
        emit_json({"id": job_id, "cancelled": cancelled, "state": job.state if job else "unknown"})
    elif cancelled:
        click.echo(f"cancelled {job_id} (it was {state})")
    elif not state:
        click.echo(f"not cancelled: no such job{NOT_READ_YET}", err=True)
    elif state == JobState.SENDING:
        click.echo("not cancelled: already under way (sending)", err=True)
    else:
        click.echo(f"not cancelled: the job is {state}", err=True)
    sys.exit(0 if cancelled else 1)


@click.group("dead-letters")
def dead_letters() -> None:
    """List, inspect, retry and purge jobs that failed permanently."""


@dead_letters.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_list(as_json: bool) -> None:
    rows = open_producer().store.dead_letters()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["failed_at"]))
        click.echo(
            escaped(f"{row['id']}  {when}  {row['account']}  attempts={row['attempts']}  {row['error']}")
        )


@dead_letters.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_show(job_id: str, as_json: bool) -> None:
    producer = open_producer()
    job = producer.job(job_id)
    if job is None or not producer.store.is_dead(job_id):
        click.echo(f"no dead letter {job_id}", err=True)
        sys.exit(1)
    if as_json:
        emit_json(job.as_dict(with_payload=True))
        return
    click.echo(job.id)
    _print_job(job)
    for entry in job.history or []:
        said = f"  attempt {entry.get('attempt')}: {entry.get('outcome')} {entry.get('error') or ''}"
        click.echo(escaped(said.rstrip()))
    if job.unreadable is not None:
        raw = job.unreadable
        click.echo(
            f"unreadable message: {raw['size']} bytes from queue {raw['queue'] or '?'}"
            + (f" (claimed id {raw['claimed_id']})" if raw["claimed_id"] else "")
            + (f", first {raw['kept']} kept" if raw["kept"] < raw["size"] else "")
        )
        click.echo("raw (base64): " + raw["base64"])
        return
    click.echo("payload: " + json.dumps(job.payload, indent=2))


@dead_letters.command("retry")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_retry(job_ids: tuple[str, ...], retry_all: bool, as_json: bool) -> None:
    """Re-enqueue dead letters (same job id, same Message-ID)."""
    producer = open_producer()
    ids = producer.store.dead_letter_ids() if retry_all else list(job_ids)
    if not ids:
        click.echo("nothing to retry (give job ids or --all)", err=True)
        sys.exit(1)
    retried, missing = producer.retry_dead_letters(ids)
    if as_json:
        emit_json({"retried": retried, "missing": missing})
    else:
        for job_id in retried:
            click.echo(f"retried {job_id}")
        for job_id in missing:
            job = producer.job(job_id)
            if job is not None and job.unreadable is not None:
                click.echo(
                    f"{job_id} is an unreadable message: nothing to retry (see show, then purge)", err=True
                )
            else:
                click.echo(f"no dead letter {job_id}", err=True)
    sys.exit(1 if missing else 0)


@dead_letters.command("purge")
@click.argument("job_ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_purge(job_ids: tuple[str, ...], as_json: bool) -> None:
    """Delete dead letters (all of them when no id is given)."""
    removed = open_producer().store.purge(list(job_ids) or None)
    emit_json({"purged": removed}) if as_json else click.echo(f"purged {removed}")
