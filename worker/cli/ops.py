"""``postroom status``, ``sweep``, ``health`` and ``metrics``: the operator's view."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click

from worker.cli.common import emit_json, open_producer, snapshot, wait_for_backends


def _print_status(data: dict[str, Any]) -> None:
    from worker.web.status import health_line, setup_line

    now = data["generated_at"]
    queues = "  ".join(f"{name}={depth}" for name, depth in data["queues"].items())
    click.echo(f"queues: {queues}")
    click.echo(
        f"in flight: {data['in_flight']}  retrying: {data['retrying']}  held: {data['held']}  "
        f"scheduled: {data['scheduled']}  dead letters: {data['dead_letters']}"
    )
    if line := setup_line(data.get("broker_setup") or {}):
        click.echo(line)
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
        for problem in info.get("problems") or []:  # a record that does not load (state invalid)
            click.echo(f"{'':<20} {problem['text']}")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds (Ctrl-C to stop).")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status_command(as_json: bool, watch: bool, interval: float) -> None:
    """Queues, in-flight and retrying jobs, dead letters, and every account's state and health."""
    producer = open_producer()
    try:
        while True:
            data = snapshot(producer).as_dict(setup=True)
            if as_json:
                emit_json(data)
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


@click.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep_command(as_json: bool) -> None:
    """Make ready again every open job found nowhere it can wait (the beat does this every
    sweep_interval): a job missing at two looks a few seconds apart goes back to its ready set."""
    from worker.queue.process.sweep import Sweeper

    producer = open_producer()
    try:
        sweeper = Sweeper(producer.store.redis, producer.republish)
        report = sweeper.run()
        if report.suspects and not report.skipped:
            time.sleep(sweeper.confirm + 0.1)
            again = sweeper.run()
            again.closed += report.closed
            report = again
    finally:
        producer.close()
    if as_json:
        emit_json(report.as_dict())
    elif report.skipped:
        click.echo(f"skipped: {report.skipped}")
    else:
        click.echo(
            f"open jobs {report.open_jobs}, looked for {report.checked}, "
            f"made ready again {len(report.republished)}, still missing {report.suspects}"
        )
        for job_id in report.republished:
            click.echo(f"  made ready again {job_id}")


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health_command(as_json: bool) -> None:
    """The last health check of every account; exit 1 when any is unhealthy (paused, failing or
    never checked), for container health checks and cron."""
    from worker.web.status import ago, unhealthy

    producer = open_producer()
    try:
        data = snapshot(producer).as_dict()
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
        emit_json({"accounts": accounts, "healthy": not problems})
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


@click.command("metrics")
@click.option("--port", type=int, default=None, help="Port (default: settings metrics_port, 9464).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def metrics_command(port: int | None, host: str) -> None:
    """Serve Prometheus metrics (read from Redis at each scrape) until interrupted."""
    from worker.settings import load_settings
    from worker.web.metrics import serve

    port = port if port is not None else load_settings().metrics_port
    wait_for_backends("metrics")
    producer = open_producer()
    server, _ = serve(port, lambda: snapshot(producer), host=host)
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
