"""The ``postroom`` command. Every command that prints data takes ``--json``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import click

from worker.errors import RecordProblem
from worker.ops.connectivity import check_connectivity
from worker.records.loader import Records


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _problem_dict(problem: RecordProblem) -> dict[str, Any]:
    return {
        "file": problem.file,
        "line": problem.line,
        "field": problem.field,
        "reason": problem.reason,
        "severity": problem.severity,
        "text": str(problem),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Postroom: an outbound mail queue (Celery workers on Redis, SMTP and Microsoft Graph)."""


@main.group()
def accounts() -> None:
    """List and validate email account records."""


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_list(as_json: bool) -> None:
    """Every account record, with its provider, transport and security."""
    records = Records.load()
    rows: list[dict[str, Any]] = []
    for name in records.account_names:
        if name in records.accounts:
            rows.append({**records.accounts[name].summary(), "valid": True, "problems": []})
        else:
            problems = records.account_problems[name]
            rows.append({"name": name, "valid": False, "problems": [str(p) for p in problems]})
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo(f"no account records in {records.accounts_dir}/")
        return
    for row in rows:
        if not row["valid"]:
            count = len(row["problems"])
            click.echo(f"{row['name']:<16} INVALID ({count} problem(s); run `postroom accounts check`)")
            continue
        where = f"{row.get('host')}:{row.get('port')}" if row["send_using"] == "smtp" else row.get("base_url")
        security = row.get("security", "Microsoft Graph")
        click.echo(f"{row['name']:<16} {row['provider']:<10} {row['address']:<32} {where}  {security}")


@accounts.command("check")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_check(name: str | None, as_json: bool) -> None:
    """Validate records and everything they reference; exit 1 on any problem (warnings, such as
    a signing certificate that expires within 30 days, are printed but do not fail)."""
    records = Records.load()
    if name is not None and name not in records.account_names:
        known = ", ".join(records.account_names) or "none"
        click.echo(f"unknown account {name!r} (known accounts: {known})", err=True)
        sys.exit(1)
    results = records.check([name] if name else None)
    others: list[RecordProblem] = []
    if name is None:  # unreferenced broken profiles/keystores are problems too
        for problems in (*records.profile_problems.values(), *records.keystore_problems.values()):
            others += problems
        referenced = {str(p) for ps in results.values() for p in ps}
        others = [p for p in others if str(p) not in referenced]

    def errors(problems: list[RecordProblem]) -> list[RecordProblem]:  # warnings do not fail the check
        return [p for p in problems if p.severity == "error"]

    ok = not errors(others) and all(not errors(ps) for ps in results.values())
    if as_json:
        _emit_json(
            {
                "ok": ok,
                "accounts": {
                    n: {"ok": not errors(ps), "problems": [_problem_dict(p) for p in ps]}
                    for n, ps in results.items()
                },
                "other_records": [_problem_dict(p) for p in others],
            }
        )
    else:
        for account_name, problems in results.items():
            if not errors(problems):
                click.echo(f"{account_name}: ok")
            for problem in problems:
                click.echo(str(problem))
        for problem in others:
            click.echo(str(problem))
        if not results and not others:
            click.echo(f"no account records in {records.accounts_dir}/")
    sys.exit(0 if ok else 1)


@main.command("test-connectivity")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def test_connectivity(name: str, as_json: bool) -> None:
    """Connect, secure and log in as account NAME (nothing is sent); exit 1 on failure."""
    records = Records.load()
    report = asyncio.run(check_connectivity(records, name))
    if name in records.account_names:
        _store_check(report)
    if as_json:
        _emit_json(report.as_dict())
    else:
        click.echo(report.result)
        labels = {
            "host": "host",
            "port": "port",
            "tls_version": "TLS version",
            "cipher": "cipher",
            "certificate_subject": "server certificate",
            "certificate_expires": "certificate expires",
            "auth_mechanisms_offered": "AUTH mechanisms offered",
            "auth_mechanism": "AUTH mechanism used",
            "login": "login",
            # Graph (and the OAuth part of SMTP XOAUTH2 accounts, under "oauth")
            "base_url": "Graph",
            "mailbox": "mailbox",
            "auth_profile": "auth profile",
            "grant": "grant",
            "tenant": "tenant",
            "client_id": "client id",
            "credential": "credential",
            "service_account": "service account",
            "subject": "subject",
            "token": "token",
            "token_expires": "token expires",
            "send_endpoint": "send endpoint",
            "security": "security",
            "duration_ms": "duration (ms)",
        }
        detail = {**report.detail.get("oauth", {}), **report.detail}
        for key, label in labels.items():
            value = detail.get(key)
            if value is None or value == []:
                continue
            if isinstance(value, list):
                value = " ".join(value)
            click.echo(f"  {label}: {value}")
        smime, dkim = report.detail.get("signing"), report.detail.get("dkim")
        if smime and "subject" in smime:
            click.echo(
                f"  signing certificate: {smime['subject']} "
                f"(expires {smime['expires'][:10]}, {smime['days_left']} days left)"
            )
        if dkim and "selector" in dkim:
            click.echo(f"  dkim: d={dkim['domain']} s={dkim['selector']} ({dkim['algorithm']})")
        click.echo("OK" if report.ok else f"FAILED: {report.error}")
    sys.exit(0 if report.ok else 1)


def _store_check(report: Any) -> None:
    """The result is stored like a scheduled check's (shown by `postroom health`); no Redis, no store."""
    import redis as redis_lib

    try:
        producer = _producer()
    except Exception:
        return
    try:
        _health(producer).record_check(report.as_dict())
    except redis_lib.RedisError:
        pass
    finally:
        producer.close()


# ---- producing -------------------------------------------------------------------


def _producer() -> Any:
    from worker.client import Producer

    return Producer()


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


@main.command("send")
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
@click.option("--original-message-id", help="auto-reply: Message-ID of the message answered.")
@click.option("--original-from", help="auto-reply: sender of the message answered.")
@click.option("--original-subject", default="", help="auto-reply: its subject.")
@click.option("--original-return-path", help="auto-reply: its return path ('' or '<>' for a bounce).")
@click.option("--original-header", multiple=True, help="auto-reply: one of its headers NAME:VALUE.")
@click.option("--payload", "payload_file", type=click.File("r"), help="Read the whole payload as JSON.")
@click.option("--wait", type=float, default=None, help="Wait up to SECONDS for the outcome.")
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
    original_message_id: str | None,
    original_from: str | None,
    original_subject: str,
    original_return_path: str | None,
    original_header: tuple[str, ...],
    payload_file: Any,
    wait: float | None,
    as_json: bool,
) -> None:
    """Enqueue a notification or an auto-reply; prints the job id."""
    from worker.client import EnqueueError, PayloadError

    if text == "-":
        text = sys.stdin.read()
    payload: dict[str, Any] = json.load(payload_file) if payload_file else {}
    payload.setdefault("account", account)
    payload.setdefault("kind", kind)
    fields: dict[str, Any] = {
        "to": list(to),
        "cc": list(cc),
        "bcc": list(bcc),
        "subject": subject,
        "text": text,
        "html": html,
        "attachments": [_attachment(p) for p in attach],
        "headers": _header_pairs(header, "--header"),
        "idempotency_key": idempotency_key,
        "message_id": message_id,
    }
    for key, value in fields.items():
        if value not in (None, [], {}, ""):
            payload[key] = value
    if payload["kind"] == "auto-reply" and "original" not in payload:
        original: dict[str, Any] = {
            "subject": original_subject,
            "headers": _header_pairs(original_header, "--original-header"),
        }
        if original_from:
            original["from"] = original_from
        if original_message_id:
            original["message_id"] = original_message_id
        if original_return_path is not None:
            original["return_path"] = original_return_path
        payload["original"] = original
    try:
        producer = _producer()
        job_id = producer.enqueue(payload)
    except PayloadError as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(2)
    except EnqueueError as exc:
        click.echo(f"not enqueued: {exc}", err=True)
        sys.exit(3)
    if wait is None:
        _emit_json({"id": job_id}) if as_json else click.echo(job_id)
        return
    job = producer.wait(job_id, wait)
    if as_json:
        _emit_json(job.as_dict() if job else {"id": job_id, "state": "unknown"})
    else:
        click.echo(job_id)
        _print_job(job)
    sys.exit(0 if job is not None and job.state in ("sent", "suppressed") else 1)


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
        click.echo(f"  {address}: {result.get('status')} {code} {result.get('message') or ''}".rstrip())
    if job.last_error:
        click.echo(f"last error: {job.last_error}")


def _print_history(job: Any) -> None:
    for entry in job.history or []:
        error = entry.get("error") or ""
        label = f"attempt {entry['attempt']}" if entry.get("attempt") is not None else "waiting"
        click.echo(f"  {label}: {entry.get('outcome')} {error}".rstrip())


@main.command("job")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def job_command(job_id: str, as_json: bool) -> None:
    """Show a job: state, attempts, per-recipient results, transport, security, last error."""
    job = _producer().job(job_id)
    if job is None:
        if as_json:
            _emit_json({"id": job_id, "state": "unknown"})
        else:
            click.echo(f"no job {job_id}", err=True)
        sys.exit(1)
    if as_json:
        _emit_json(job.as_dict())
    else:
        click.echo(job.id)
        _print_job(job)
        _print_history(job)


# ---- the operator's view -------------------------------------------------------------


def _health(producer: Any) -> Any:
    from worker.ops.health import AccountHealth
    from worker.settings import load_settings

    return AccountHealth(
        producer.store.redis, pause_after=load_settings().pause_after, release=producer.republish
    )


def _snapshot(producer: Any) -> Any:
    from worker.web.status import Status

    return Status(producer.store, _health(producer), producer.records(fresh=True))


def _print_status(data: dict[str, Any]) -> None:
    from worker.web.status import health_line

    now = data["generated_at"]
    queues = "  ".join(f"{name}={depth}" for name, depth in data["queues"].items())
    click.echo(f"queues: {queues}")
    click.echo(
        f"in flight: {data['in_flight']}  retrying: {data['retrying']}  held: {data['held']}  "
        f"dead letters: {data['dead_letters']}"
    )
    click.echo("")
    columns = ("ACCOUNT", "STATE", "SENT 1h/24h", "FAILED", "RETRIED", "DEAD", "HELD")
    click.echo("{:<20} {:<9} {:>12} {:>7} {:>8} {:>5} {:>5}  HEALTH".format(*columns))
    for name, info in data["accounts"].items():
        hour, day = info["last_hour"], info["last_day"]
        line = health_line(info["health"], now)
        for label, days in info["certificate_days_left"].items():
            line += f"; {label} cert {days}d"
        click.echo(
            f"{name:<20} {info['state']:<9} {str(hour['sent']) + '/' + str(day['sent']):>12} "
            f"{day['failed']:>7} {day['retried']:>8} {day['dead']:>5} {info['held']:>5}  {line}"
        )
        if info["state"] == "paused" and info.get("reason"):
            click.echo(f"{'':<20} paused ({info.get('paused_by')}): {info['reason']}")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds (Ctrl-C to stop).")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status_command(as_json: bool, watch: bool, interval: float) -> None:
    """Queues, in-flight and retrying jobs, dead letters, and every account's state and health."""
    producer = _producer()
    try:
        while True:
            data = _snapshot(producer).as_dict()
            if as_json:
                _emit_json(data)
            else:
                if watch:
                    click.clear()
                    click.echo(time.strftime("postroom status  %Y-%m-%d %H:%M:%S  (Ctrl-C to stop)"))
                _print_status(data)
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        producer.close()


@main.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep_command(as_json: bool) -> None:
    """Publish again every job whose message went missing from the broker (the beat does this
    every sweep_interval): a job missing at two looks a few seconds apart is re-sent."""
    from worker.mail.payload import QUEUE
    from worker.queue.sweep import Sweeper

    producer = _producer()
    try:
        sweeper = Sweeper(producer.store.redis, QUEUE, producer.republish)
        report = sweeper.run()
        if report.suspects and not report.skipped:
            time.sleep(sweeper.confirm + 0.1)
            again = sweeper.run()
            again.closed += report.closed
            report = again
    finally:
        producer.close()
    if as_json:
        _emit_json(report.as_dict())
    elif report.skipped:
        click.echo(f"skipped: {report.skipped}")
    else:
        click.echo(
            f"open jobs {report.open_jobs}, looked for {report.checked}, "
            f"published again {len(report.republished)}, still missing {report.suspects}"
        )
        for job_id in report.republished:
            click.echo(f"  published again {job_id}")


@main.command("health")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health_command(as_json: bool) -> None:
    """The last health check of every account; exit 1 when any is unhealthy (paused, failing or
    never checked), for container health checks and cron."""
    from worker.web.status import ago, unhealthy

    producer = _producer()
    try:
        data = _snapshot(producer).as_dict()
    finally:
        producer.close()
    accounts: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, info in data["accounts"].items():
        health = info["health"] or {}
        accounts[name] = {
            "ok": bool(health.get("ok")),
            "result": health.get("result"),
            "checked_at": health.get("checked_at"),
            "detail": health.get("detail", {}),
            "error": health.get("error"),
            "state": info["state"],
        }
        if why := unhealthy(info["health"], info["state"]):
            problems[name] = why
    if as_json:
        _emit_json({"accounts": accounts, "healthy": not problems})
    else:
        now = time.time()
        for name, item in accounts.items():
            mark = "ok  " if name not in problems else "FAIL"
            when = ago(item["checked_at"], now) if item["checked_at"] else "never"
            click.echo(
                f"{mark} {name:<20} {item['result'] or '-'}  ({when})  {problems.get(name, '')}".rstrip()
            )
        if not accounts:
            click.echo("no accounts")
    sys.exit(1 if problems else 0)


@main.command("metrics")
@click.option("--port", type=int, default=None, help="Port (default: settings metrics_port, 9464).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def metrics_command(port: int | None, host: str) -> None:
    """Serve Prometheus metrics (read from Redis at each scrape) until interrupted."""
    from worker.settings import load_settings
    from worker.web.metrics import serve

    port = port if port is not None else load_settings().metrics_port
    producer = _producer()
    server, _ = serve(port, lambda: _snapshot(producer), host=host)
    click.echo(f"metrics on http://{host}:{server.server_port}/metrics", err=True)
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        producer.close()


@main.command("http")
@click.option("--port", type=int, default=None, help="Port (default: POSTROOM_HTTP_PORT or 8425).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--openapi", "print_openapi", is_flag=True, help="Print the OpenAPI document and exit.")
def http_command(port: int | None, host: str, print_openapi: bool) -> None:
    """Serve the HTTP submission API (POST /v1/messages, /v1/batches; GET /v1/jobs/ID)."""
    from worker.web import http

    if print_openapi:
        _emit_json(http.openapi_document())
        return
    http.serve(host, port if port is not None else http.http_port())


@main.group("api-keys")
def api_keys() -> None:
    """Producer keys of the HTTP submission API (config/api-keys/NAME.yaml)."""


@api_keys.command("new")
@click.argument("name")
@click.option("--account", "accounts", multiple=True, help="An account it may send from ('*': all).")
@click.option("--operator", is_flag=True, help="An operator key: it logs in to the dashboard (/dashboard).")
@click.option("--rate", default="60/minute", show_default=True, help="Requests per second, minute or hour.")
def api_keys_new(name: str, accounts: tuple[str, ...], operator: bool, rate: str) -> None:
    """Write a key record (hash only) and print the key, once. A producer key needs --account;
    an --operator key opens the operator dashboard (and sends from the --account given, if any)."""
    from worker.settings import config_dir
    from worker.web import apikeys

    if not accounts and not operator:
        raise click.UsageError("give --account (a producer key) or --operator (an operator key)")
    folder = config_dir() / "api-keys"
    path = folder / f"{name}.yaml"
    if path.exists():
        raise click.ClickException(f"{path} exists; remove it first to replace the key")
    token = apikeys.new_token(name)
    folder.mkdir(parents=True, exist_ok=True)
    listed = ", ".join(json.dumps(a) for a in accounts)
    record = f"hash: {apikeys.hash_token(token)}\naccounts: [{listed}]\nrate: {json.dumps(rate)}\n"
    path.write_text(record + ("operator: true\n" if operator else ""))
    _, problems = apikeys.load_api_keys(config_dir())
    if name in problems:
        path.unlink()
        raise click.ClickException("\n".join(str(p) for p in problems[name]))
    click.echo(f"wrote {path}; the key (shown only now):", err=True)
    click.echo(token)


@accounts.command("pause")
@click.argument("name")
@click.option("--reason", default="paused by an operator", show_default=True)
def accounts_pause(name: str, reason: str) -> None:
    """Hold NAME's jobs (nothing is sent, nothing is dead-lettered) until `accounts resume`."""
    producer = _producer()
    try:
        if name not in producer.records(fresh=True).account_names:
            click.echo(f"no account {name}", err=True)
            sys.exit(1)
        _health(producer).pause(name, reason, by="operator")
        click.echo(f"{name}: paused")
    finally:
        producer.close()


@accounts.command("resume")
@click.argument("name")
def accounts_resume(name: str) -> None:
    """Lift a pause and put NAME's held jobs back on the queue."""
    producer = _producer()
    try:
        released = _health(producer).resume(name, by="operator")
        click.echo(f"{name}: resumed, {released} held job(s) back on the queue")
    finally:
        producer.close()


# ---- dead letters ------------------------------------------------------------------


@main.group("dead-letters")
def dead_letters() -> None:
    """List, inspect, retry and purge jobs that failed permanently."""


@dead_letters.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_list(as_json: bool) -> None:
    rows = _producer().store.dead_letters()
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["failed_at"]))
        click.echo(f"{row['id']}  {when}  {row['account']}  attempts={row['attempts']}  {row['error']}")


@dead_letters.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_show(job_id: str, as_json: bool) -> None:
    producer = _producer()
    job = producer.job(job_id)
    if job is None or not producer.store.is_dead(job_id):
        click.echo(f"no dead letter {job_id}", err=True)
        sys.exit(1)
    if as_json:
        _emit_json(job.as_dict(with_payload=True))
        return
    click.echo(job.id)
    _print_job(job)
    for entry in job.history or []:
        click.echo(
            f"  attempt {entry.get('attempt')}: {entry.get('outcome')} {entry.get('error') or ''}".rstrip()
        )
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
    producer = _producer()
    ids = producer.store.dead_letter_ids() if retry_all else list(job_ids)
    if not ids:
        click.echo("nothing to retry (give job ids or --all)", err=True)
        sys.exit(1)
    retried, missing = producer.retry_dead_letters(ids)
    if as_json:
        _emit_json({"retried": retried, "missing": missing})
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
    removed = _producer().store.purge(list(job_ids) or None)
    _emit_json({"purged": removed}) if as_json else click.echo(f"purged {removed}")


# ---- running ---------------------------------------------------------------------


@main.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--processes", type=int, default=None, help="Worker processes (default: one per CPU core).")
@click.pass_context
def worker_command(ctx: click.Context, processes: int | None) -> None:
    """Run the workers on the postroom queue: one Celery worker process per CPU core, each with
    its task threads (extra arguments go to every celery worker)."""
    from worker.run.workergroup import run_group

    sys.exit(run_group(list(ctx.args), processes=processes))


@main.command("beat", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat_command(ctx: click.Context) -> None:
    """Run Celery beat (exactly one per deployment)."""
    from worker.settings import var_dir

    var_dir().mkdir(parents=True, exist_ok=True)
    schedule = str(var_dir() / "celerybeat-schedule")
    from worker.run.workergroup import celery_command

    os.execvp(sys.executable, celery_command("beat", "-l", "INFO", "-s", schedule, *ctx.args))  # noqa: S606


@main.command("dev-smtp")
@click.option("--host", default="127.0.0.1")
@click.option("--port", default=1025, type=int)
@click.option("--list", "list_only", is_flag=True, help="List the caught messages and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --list).")
def dev_smtp(host: str, port: int, list_only: bool, as_json: bool) -> None:
    """Run the development mail catcher (messages go to var/mail/)."""
    from worker.run.devsmtp import caught, start_catcher
    from worker.settings import var_dir

    directory = var_dir() / "mail"
    if list_only:
        rows = caught(directory)
        if as_json:
            _emit_json(rows)
        else:
            for row in rows:
                click.echo(
                    f"{row['file']}  {row['subject']!r}  to {', '.join(row['rcpt_tos'])}  {row['message_id']}"
                )
        return
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before any thread starts
    controller = start_catcher(directory, host, port)
    click.echo(f"dev-smtp: catching mail on {host}:{port}, saving to {directory}/", err=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        controller.stop()


@main.command("up")
@click.option("--processes", type=int, default=None, help="Worker processes (default: one per CPU core).")
@click.option("--concurrency", type=int, default=None, help="Task threads per worker process (default 16).")
@click.option("--no-dev-smtp", is_flag=True, help="Do not start the development mail catcher.")
def up_command(processes: int | None, concurrency: int | None, no_dev_smtp: bool) -> None:
    """Everything on one machine: broker (embedded unless POSTROOM_BROKER_URL), worker, beat,
    and the dev mail catcher. Ctrl-C stops it cleanly; nothing enqueued is lost."""
    from worker.run.supervisor import run_up

    sys.exit(run_up(processes=processes, concurrency=concurrency, dev_smtp=not no_dev_smtp))


if __name__ == "__main__":
    main()
