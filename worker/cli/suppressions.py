"""``postroom suppressions list|add|remove``: an account's suppression list (contract §10)."""

from __future__ import annotations

import shlex
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from worker.cli.common import emit_json, open_producer
from worker.records.addresses import escaped


def _list_of(producer: Any) -> Any:
    from worker.queue.store.suppressions import Suppressions

    return Suppressions(
        producer.store.redis, producer.settings.suppression_ttl, producer.settings.suppression_limit
    )


def _known(producer: Any, account: str) -> None:
    if account not in producer.records(fresh=True).account_names:
        click.echo(f"unknown account {account!r}", err=True)
        sys.exit(1)


@click.group("suppressions")
def suppressions() -> None:
    """Addresses an account never offers to its server (added after a 5.1.x refusal, or by hand)."""


@suppressions.command("list")
@click.argument("account")
@click.option(
    "--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000), help="At most this many."
)
@click.option("--after", help="Continue after this cursor (the `next` of the page before).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {entries, next, total}.")
def list_command(account: str, limit: int, after: str | None, as_json: bool) -> None:
    """The account's suppressed addresses, oldest first, a page at a time."""
    producer = open_producer()
    try:
        _known(producer, account)
        try:
            page = _list_of(producer).page(account, limit, after)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--after") from None
    finally:
        producer.close()
    entries = page.entries
    if as_json:
        emit_json({"entries": entries, "next": page.next, "total": page.total})
        return
    for entry in entries:
        when = datetime.fromtimestamp(entry["at"], UTC).strftime("%Y-%m-%d %H:%M")
        until = datetime.fromtimestamp(entry["expires_at"], UTC).strftime("%Y-%m-%d")
        reply = f"{entry['code']} {entry['reason']}" if entry.get("code") else str(entry["reason"])
        # a reason is a server's reply or an older record's text: shown escaped, never obeyed
        click.echo(escaped(f"{entry['address']:<40} {when}  {entry['source']:<9} until {until}  {reply}"))
    if not entries:
        click.echo(f"no suppressed addresses for {account}")
    if page.next is not None:
        click.echo(
            f"(first {len(entries)} of {page.total}; more: --after {shlex.quote(page.next)})", err=True
        )


@suppressions.command("add")
@click.argument("account")
@click.argument("address")
@click.option("--reason", default="added by an operator", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def add_command(account: str, address: str, reason: str, as_json: bool) -> None:
    """Suppress ADDRESS for ACCOUNT (until suppression_ttl has passed); exit 1 when the list
    holds suppression_limit entries, all an operator's."""
    from worker.records.addresses import check_visible_text, parse_mailbox

    try:
        parse_mailbox(address)
        check_visible_text(reason, "--reason")
    except ValueError as exc:
        click.echo(f"{escaped(address)!r}: {exc}", err=True)
        sys.exit(2)
    producer = open_producer()
    try:
        _known(producer, account)
        entry = _list_of(producer).add(account, address, reason=reason, source="operator", now=time.time())
    except ValueError as exc:  # ListFull: every entry an operator's, suppression_limit of them
        click.echo(str(exc), err=True)
        sys.exit(1)
    finally:
        producer.close()
    if as_json:
        emit_json(entry)
    else:
        click.echo(f"suppressed {entry['address']} for {account}")


@suppressions.command("remove")
@click.argument("account")
@click.argument("address")
def remove_command(account: str, address: str) -> None:
    """Take ADDRESS off ACCOUNT's list; exit 1 when it was not on it."""
    producer = open_producer()
    try:
        removed = _list_of(producer).remove(account, address)
    except ValueError as exc:
        click.echo(f"{address!r}: {exc}", err=True)
        sys.exit(2)
    finally:
        producer.close()
    click.echo(
        f"removed {address} from {account}'s suppressions" if removed else f"{address} was not suppressed"
    )
    sys.exit(0 if removed else 1)
