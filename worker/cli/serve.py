"""``postroom http``, ``worker``, ``beat``, ``dev-smtp`` and ``up``: the long-running commands."""

from __future__ import annotations

import os
import signal
import sys

import click

from worker.cli.common import check_deployment, emit_json, wait_for_backends


@click.command("http")
@click.option("--port", type=int, default=None, help="Port (default: POSTROOM_HTTP_PORT or 8425).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--openapi", "print_openapi", is_flag=True, help="Print the OpenAPI document and exit.")
def http_command(port: int | None, host: str, print_openapi: bool) -> None:
    """Serve the HTTP submission API (POST /v1/messages, /v1/batches; GET /v1/jobs/ID)."""
    from worker.web import http

    if print_openapi:
        emit_json(http.openapi_document())
        return
    check_deployment()
    wait_for_backends("http")
    http.serve(host, port if port is not None else http.http_port())


@click.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--processes", type=int, default=None, help="Worker processes (default: one per CPU core).")
@click.pass_context
def worker_command(ctx: click.Context, processes: int | None) -> None:
    """Run the workers on the postroom queue: one Celery worker process per CPU core, each with
    its task threads (extra arguments go to every celery worker)."""
    from worker.run.workergroup import run_group

    check_deployment()
    wait_for_backends("worker")
    sys.exit(run_group(list(ctx.args), processes=processes))


@click.command("beat", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def beat_command(ctx: click.Context) -> None:
    """Run Celery beat (exactly one per deployment)."""
    check_deployment()
    wait_for_backends("beat")
    from worker.settings import var_dir

    var_dir().mkdir(parents=True, exist_ok=True)
    schedule = str(var_dir() / "celerybeat-schedule")
    from worker.run.workergroup import celery_command

    os.execvp(sys.executable, celery_command("beat", "-l", "INFO", "-s", schedule, *ctx.args))  # noqa: S606


@click.command("dev-smtp")
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
            emit_json(rows)
        else:
            for row in rows:
                click.echo(
                    f"{row['file']}  {row['subject']!r}  to {', '.join(row['rcpt_tos'])}  {row['message_id']}"
                )
        return
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before any thread starts
    controller = start_catcher(directory, host, port)
    click.echo(
        f"dev-smtp: catching mail on {host}:{port}, saving to {directory}/; recipients in the"
        " .invalid domain (nobody@example.invalid) are refused with 550 5.1.1",
        err=True,
    )
    try:
        signal.sigwait(stop_signals)
    finally:
        controller.stop()


@click.command("up")
@click.option("--processes", type=int, default=None, help="Worker processes (default: one per CPU core).")
@click.option("--concurrency", type=int, default=None, help="Task threads per worker process (default 16).")
@click.option("--no-dev-smtp", is_flag=True, help="Do not start the development mail catcher.")
def up_command(processes: int | None, concurrency: int | None, no_dev_smtp: bool) -> None:
    """Everything on one machine: broker (embedded unless POSTROOM_BROKER_URL), worker, beat,
    and the dev mail catcher. Ctrl-C stops it cleanly; nothing enqueued is lost."""
    from worker.run.supervisor import run_up

    sys.exit(run_up(processes=processes, concurrency=concurrency, dev_smtp=not no_dev_smtp))
