"""``postroom bounces check ACCOUNT``: one pass of the bounce reader over an account's mailbox,
now (contract §11); the workers read every opted-in mailbox on their own."""

from __future__ import annotations

import sys
from typing import Any

import click

from worker.cli.common import emit_json, open_producer


def report_store(producer: Any) -> Any:
    """The reports' side of Postroom's Redis (worker/queue/store/reports.py), on ``producer``'s."""
    from worker.queue.store.reports import ReportStore

    s = producer.settings
    return ReportStore(
        producer.store.redis,
        job_ttl=s.job_ttl,
        retention=s.webhook_retention,
        suppression_ttl=s.suppression_ttl,
        suppression_limit=s.suppression_limit,
    )


@click.group("bounces")
def bounces() -> None:
    """Bounces and complaints that arrive in an account's mailbox after the send."""


@bounces.command("check")
@click.argument("account")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check_command(account: str, as_json: bool) -> None:
    """Read ACCOUNT's mailbox once now and apply what its reports say; print what matched."""
    from worker.errors import ConfigurationError
    from worker.queue.events.reports_reader import read_once

    producer = open_producer()
    try:
        records = producer.records(fresh=True)
        try:
            found = records.account(account)
        except ConfigurationError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
        if found.bounces is None:
            click.echo(f"account {account!r} has no bounces: section (the mailbox is not read)", err=True)
            sys.exit(1)
        done = read_once(report_store(producer), records, found, token="")
    finally:
        producer.close()
    if as_json:
        emit_json(done.as_dict())
    else:
        for match in done.matched:
            for address, said in match["recipients"].items():
                status = f" {said['status']}" if said["status"] else ""
                click.echo(f"{match['job_id']}  {address}  {said['said']}{status}  ({match['kind']})")
        click.echo(
            f"{account}: read {done.read}, matched {len(done.matched)}, unmatched {done.unmatched}, "
            f"not reports {done.not_reports}"
        )
        if done.error:
            click.echo(f"error: {done.error}", err=True)
    sys.exit(1 if done.error else 0)
