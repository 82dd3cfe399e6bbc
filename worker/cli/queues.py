"""``postroom queues check`` and ``postroom queues declare``: the broker's queue setup.

On RabbitMQ the queue ``postroom`` is declared with no arguments, as every Celery client
declares it (celery-node, a plain Celery app), so whoever publishes first creates it alike;
what Postroom needs beyond that (dead-lettering to ``postroom.poison``, a delivery limit, a
quorum queue) comes from the vhost and a policy, which only an operator's command sets.
The management API and RabbitMQ's rules live in worker/queue/broker/rabbitmq.py; this is the door.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from worker.cli.common import emit_json

REDIS = {"broker": "redis", "ok": True, "lacks": [], "problems": [], "notes": []}


@click.group("queues")
def queues() -> None:
    """The broker's queue setup: see what it lacks (check), or set it up (declare)."""


def _on_rabbitmq() -> tuple[str, Any] | None:
    """(broker URL, settings) when the broker is RabbitMQ; None on Redis (nothing to set up)."""
    from worker.settings import broker_kind, broker_url, load_settings

    broker = broker_url()
    return (broker, load_settings()) if broker_kind(broker) == "amqp" else None


def _nothing_to_set_up(as_json: bool) -> None:
    if as_json:
        emit_json(REDIS)
    else:
        click.echo("nothing to set up: the broker is Redis (its lists need no declaring, no policy)")


def _print(data: dict[str, Any]) -> None:
    queue, policy = data["queue"], data["policy"]
    default = data["vhost_default_queue_type"] or "not set (classic)"
    click.echo(f"RabbitMQ {data['api']} vhost {data['vhost']} (default queue type: {default})")
    arguments = ", ".join(f"{k}={v}" for k, v in sorted(queue["arguments"].items())) or "none"
    state = f"{queue['type']}, arguments: {arguments}" if queue["exists"] else "does not exist"
    click.echo(f"queue {queue['name']}: {state}")
    definition = ", ".join(f"{k}={v!r}" for k, v in sorted(policy["definition"].items()))
    click.echo(f"policy: {policy['name']} ({definition})" if policy["name"] else "policy: none")
    click.echo(
        f"dead-lettering to {data['poison_queue']['name']}: {'yes' if data['dead_lettering'] else 'no'}"
    )
    limit = data["delivery_limit"] or (
        "none" if data["queue"]["type"] != "classic" else "none (quorum queues only)"
    )
    click.echo(f"delivery limit: {limit}")
    poison = data["poison_queue"]
    click.echo(f"queue {poison['name']}: {'exists' if poison['exists'] else 'does not exist'}")
    accepted = "accepted" if data["plain_clients_compatible"] else "REFUSED"
    click.echo(f"a client declaring it with no arguments (celery-node, a plain Celery app): {accepted}")
    for note in data.get("notes", []):
        click.echo(f"note: {note}")
    for line in data["problems"]:
        click.echo(f"MISSING: {line}")
    if data["ok"]:
        click.echo("ok")


@queues.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check_command(as_json: bool) -> None:
    """What the queue's setup lacks, each with what it costs and how to fix it; exit 1 when
    something is missing (RabbitMQ, through its management API; nothing to set up on Redis)."""
    from worker.queue.broker.rabbitmq import read_setup

    rabbit = _on_rabbitmq()
    if rabbit is None:
        return _nothing_to_set_up(as_json)
    data = {**read_setup(*rabbit).as_dict(), "notes": []}
    if as_json:
        emit_json(data)
    else:
        _print(data)
    sys.exit(0 if data["ok"] else 1)


@queues.command("declare")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def declare_command(as_json: bool) -> None:
    """Set up RabbitMQ for Postroom, before any producer runs: the policy ``postroom``
    (dead-lettering to postroom.poison; on a quorum queue the delivery limit,
    rabbitmq_delivery_limit), and both queues, declared with no arguments when missing. Then
    what ``check`` says (exit 1 when something is still missing)."""
    from worker.queue.broker.rabbitmq import declare_setup

    rabbit = _on_rabbitmq()
    if rabbit is None:
        return _nothing_to_set_up(as_json)
    before, after = declare_setup(*rabbit)
    # the queue was declared now, of the vhost's default type, which is not the one wanted
    notes = [
        f"before declaring: {line}" for what, line in before.problems() if what.startswith("a vhost whose")
    ]
    data = {**after.as_dict(), "notes": notes}
    if as_json:
        emit_json(data)
    else:
        _print(data)
    sys.exit(0 if data["ok"] else 1)
