"""The ``postroom`` command. Every command that prints data takes ``--json``.

One module a room of commands: ``records`` (accounts, connectivity, API keys), ``jobs``
(send, job, dead letters), ``suppressions``, ``webhooks``, ``ops`` (status, sweep, health, metrics),
``queues`` (the broker's queue setup), ``serve`` (the long-running ones); ``common`` holds what
they share. This file only gathers them.
"""

from __future__ import annotations

from typing import Any

import click

from worker.cli import bounces, jobs, ops, queues, records, serve, suppressions, webhooks
from worker.errors import ConfigurationError


class PostroomGroup(click.Group):
    """A configuration error (a setting, a URL, a record) is one line naming what to fix and exit
    status 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            click.echo(f"postroom: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=PostroomGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Postroom: an outbound mail queue (Celery workers on Redis, SMTP and Microsoft Graph)."""


for command in (
    records.accounts,
    records.test_connectivity,
    jobs.send_command,
    jobs.job_command,
    jobs.cancel_command,
    ops.status_command,
    ops.sweep_command,
    ops.health_command,
    ops.metrics_command,
    serve.http_command,
    records.api_keys,
    jobs.dead_letters,
    suppressions.suppressions,
    bounces.bounces,
    webhooks.webhooks,
    queues.queues,
    serve.worker_command,
    serve.beat_command,
    serve.dev_smtp,
    serve.up_command,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
