"""What every ``postroom`` command shares: JSON output, the producer, health and status views."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import click

from worker.errors import RecordProblem


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def problem_dict(problem: RecordProblem) -> dict[str, Any]:
    return problem.as_dict()


def check_deployment() -> None:
    """Refuse to start a long-running process that could not record what it takes: the broker
    URL must be one Postroom runs on, and Postroom's Redis known (contract §9)."""
    from worker.settings import broker_kind, broker_url, load_settings, state_url

    broker = broker_url()
    broker_kind(broker)
    state_url(broker)
    load_settings()


def wait_for_backends(command: str) -> None:
    """Wait at start for Postroom's Redis and the broker (bounded by ``startup_wait``,
    worker/queue/broker/reach.py); past it, stop with the reason (a supervisor restarts us)."""
    from worker.queue.broker.reach import NotReachable
    from worker.queue.broker.reach import wait_for_backends as wait

    try:
        wait(command)
    except NotReachable as exc:
        raise click.ClickException(str(exc)) from None


def open_producer() -> Any:
    """The producer helper (worker/client.py), imported only by the commands that talk to Redis."""
    from worker.client import Producer

    return Producer()


def health_of(made: Any) -> Any:
    """The accounts' health records (worker/ops/health.py) through ``made``'s Redis."""
    from worker.ops.health import AccountHealth
    from worker.settings import load_settings

    return AccountHealth(made.store.redis, pause_after=load_settings().pause_after, release=made.republish)


def snapshot(made: Any) -> Any:
    """What ``postroom status`` shows, read now (worker/web/status.py)."""
    from worker.web.status import Status

    return Status(made.store, health_of(made), made.records(fresh=True), made.broker_view())


def resolve_hosts(names: Iterable[str]) -> dict[str, list[str]]:
    """Each host name → its A/AAAA addresses as the ``dns_resolver`` setting's resolver answers
    now; a name it cannot resolve maps to [] (the check that asks stays advice, never a hang)."""
    from worker.ops.resolver import DnspythonResolver, DnsTrouble
    from worker.settings import load_settings, resolver_address

    wanted = sorted(set(names))
    if not wanted:
        return {}
    setting = load_settings().dns_resolver
    resolver = DnspythonResolver(resolver_address(setting) if setting else None)

    async def ask(host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found += await resolver.answers(host, rdtype)
            except DnsTrouble:
                break
        return found

    async def ask_all() -> dict[str, list[str]]:
        return {host: await ask(host) for host in wanted}

    return asyncio.run(ask_all())
