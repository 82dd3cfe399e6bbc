"""``postroom webhooks new|list|remove|attempts|replay``: where delivery events go (contract §10)."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from typing import Any

import click

from worker.cli.common import emit_json, open_producer
from worker.db.vocabulary import EVENT_TYPES
from worker.records.addresses import escaped


def _outbox(producer: Any) -> Any:
    from worker.queue.events.outbox import Outbox

    return Outbox(producer.store.redis, producer.settings.webhook_retention)


def _republish() -> bool:
    """Publish the routing table now; False when Redis cannot be reached (the workers publish
    it when they see the change)."""
    try:
        producer = open_producer()
        try:
            _publish(producer)
        finally:
            producer.close()
    except Exception as exc:
        click.echo(f"(routing table not updated now: {exc})", err=True)
        return False
    return True


def _publish(producer: Any) -> None:
    """The routing table from the records as they are now (the workers publish it too)."""
    from worker.queue.events.outbox import publish_routes

    records = producer.records(fresh=True)
    publish_routes(producer.store.redis, {n: hook.route() for n, hook in records.webhooks.items()})


@click.group("webhooks")
def webhooks() -> None:
    """Signed delivery events (job.sent, job.deferred, job.failed, job.suppressed, job.cancelled,
    job.bounced, job.complained)."""


@webhooks.command("new")
@click.argument("name")
@click.option("--url", required=True, help="Where the events are POSTed (https).")
@click.option("--event", "events", multiple=True, type=click.Choice(EVENT_TYPES), help="Only these events.")
@click.option("--account", "accounts", multiple=True, help="Only these accounts' jobs.")
@click.option("--allow-private", is_flag=True, help="Allow a loopback, private or link-local target.")
def new_command(
    name: str, url: str, events: tuple[str, ...], accounts: tuple[str, ...], allow_private: bool
) -> None:
    """Write config/webhooks/NAME.yaml (POSTROOM_WEBHOOKS_DIR/NAME.yaml when set) with a fresh
    whsec_ signing secret and print the secret, once (give it to the receiver: it verifies every
    request with it)."""
    from worker.records.loader import load_webhooks, valid_record_name
    from worker.records.webhooks import new_secret
    from worker.settings import config_dir, webhooks_dir

    if not valid_record_name(name):
        raise click.UsageError(f"{name!r} is not a record name (letters, digits, '.', '_', '-')")
    _refuse_private(url, allow_private)
    folder = webhooks_dir()
    path = folder / f"{name}.yaml"
    if path.exists():
        raise click.ClickException(f"{path} exists; remove it first to replace the webhook")
    secret = new_secret()
    lines = [f"url: {json.dumps(url)}", f"secret: {secret}"]
    if events:
        lines.append(f"events: [{', '.join(events)}]")
    if accounts:
        lines.append(f"accounts: [{', '.join(json.dumps(a) for a in accounts)}]")
    lines.append(f"allow_private: {'true' if allow_private else 'false'}")
    folder.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")
    _, problems = load_webhooks(config_dir())
    if name in problems:
        path.unlink()
        raise click.ClickException("\n".join(str(p) for p in problems[name]))
    _republish()
    click.echo(f"wrote {path}; the signing secret (shown only now):", err=True)
    click.echo(secret)


def _refuse_private(url: str, allow_private: bool) -> None:
    """Exit 2 for a loopback/private target (an IP literal or localhost; DNS is not asked here,
    ``accounts check`` warns about names) without --allow-private: the sender would refuse every
    delivery to it for 24 h."""
    from worker.records.webhooks import private_target, url_problem

    if problem := url_problem(url):
        click.echo(f"--url {url!r} {problem}", err=True)
        sys.exit(2)
    if allow_private:
        return
    if why := private_target(url):
        click.echo(
            f"--url: {why}; deliveries to it are refused (a webhook receiver on this machine or a "
            "private network needs --allow-private)",
            err=True,
        )
        sys.exit(2)


@webhooks.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def remove_command(name: str, as_json: bool) -> None:
    """Delete config/webhooks/NAME.yaml (POSTROOM_WEBHOOKS_DIR/NAME.yaml when set) and take it out
    of the routing table (events already filed for it stay in the outbox until they expire); exit
    1 when there is no such webhook."""
    from worker.records.loader import valid_record_name
    from worker.settings import webhooks_dir

    path = webhooks_dir() / f"{name}.yaml"
    if not valid_record_name(name) or not path.is_file():
        if as_json:
            emit_json({"removed": None, "name": name})
        click.echo(f"no webhook {name!r}", err=True)
        sys.exit(1)
    path.unlink()
    published = _republish()
    if as_json:
        emit_json({"removed": str(path), "name": name, "routes_published": published})
    else:
        click.echo(f"removed {path}")


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(as_json: bool) -> None:
    """Every webhook record (never its secret), with its deliveries: pending, delivered, failed."""
    producer = open_producer()
    try:
        records = producer.records(fresh=True)
        outbox = _outbox(producer)
        rows: list[dict[str, Any]] = []
        for name in sorted({*records.webhooks, *records.webhook_problems}):
            hook = records.webhooks.get(name)
            if hook is None:
                problems = [str(p) for p in records.webhook_problems[name]]
                rows.append({"name": name, "valid": False, "problems": problems})
                continue
            last = outbox.attempts(name, limit=1)
            stats = outbox.stats(name)
            rows.append({**hook.summary(), "valid": True, **stats, "last_attempt": last[0] if last else None})
    finally:
        producer.close()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no webhook records (postroom webhooks new NAME --url URL)")
    for row in rows:
        if not row["valid"]:
            click.echo(f"{row['name']:<16} INVALID: {'; '.join(row['problems'])}")
            continue
        last = row["last_attempt"]
        seen = f"last {last['outcome']} {_when(last['at'])}" if last else "no attempt yet"
        click.echo(
            f"{row['name']:<16} {row['url']}  pending {row['pending']}, delivered {row['delivered']}, "
            f"given up {row['given_up']}; {seen}"
        )


@webhooks.command("attempts")
@click.argument("name")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def attempts_command(name: str, limit: int, as_json: bool) -> None:
    """The latest attempts to webhook NAME, newest first (status, error, outcome)."""
    producer = open_producer()
    try:
        entries = _outbox(producer).attempts(name, limit=limit)
    finally:
        producer.close()
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        status = e.get("status") or "-"
        error = f"  {e['error']}" if e.get("error") else ""
        what = f"{e['event_id']}  {e.get('type')}  #{e['attempt']}"
        click.echo(
            escaped(f"{_when(e['at'])}  {what}  {status}  {e['outcome']}{error}")
        )  # a receiver's words


@webhooks.command("replay")
@click.argument("event_or_job", required=False)
@click.option("--since", help="Every event since: UNIX seconds, ISO 8601 with an offset, or an age (2h, 1d).")
@click.option("--webhook", "only", help="Only to this webhook (default: each event's own).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def replay_command(event_or_job: str | None, since: str | None, only: str | None, as_json: bool) -> None:
    """Deliver events again, under their own webhook-id: one event (msg_…), every event of a
    job (its id), or every event --since a time."""
    if (event_or_job is None) == (since is None):
        raise click.UsageError("give an event id, a job id or --since")
    producer = open_producer()
    try:
        if only is not None and only not in producer.records(fresh=True).webhooks:
            click.echo(f"unknown webhook {only!r}", err=True)
            sys.exit(1)
        outbox = _outbox(producer)
        if since is not None:
            ids = outbox.events_since(_since(since))
        elif event_or_job is not None and event_or_job.startswith("msg_"):
            ids = [event_or_job]
        else:
            ids = outbox.events_of_job(str(event_or_job))
        done = outbox.replay(ids, only)
    finally:
        producer.close()
    if as_json:
        emit_json({"replayed": [{"webhook": w, "event_id": e} for w, e in done]})
    else:
        click.echo(f"{len(done)} deliveries queued again")
    sys.exit(0 if done else 1)


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _since(text: str) -> float:
    if match := _AGE.match(text.strip()):
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: UNIX seconds, ISO 8601 with an offset, or 30m/2h/1d") from None
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{text!r} has no UTC offset")
    return parsed.timestamp()


def _when(at: Any) -> str:
    try:
        return datetime.fromtimestamp(float(at)).astimezone().isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return "?"
