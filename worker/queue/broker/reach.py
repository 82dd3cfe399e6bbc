"""Waiting for the broker and Postroom's Redis as a long-running process starts.

In a compose stack (or after a reboot) the services start in any order: RabbitMQ takes
seconds longer than Redis, Redis longer than the image's Python. A process that met a refused
connection once and gave up (beat's first health check, a worker's consumer) stayed broken
until something restarted it. So the worker, beat, http and metrics commands first wait for
what they use, retrying with a doubling backoff, logged on every failed try, and bounded by
``startup_wait`` seconds (``POSTROOM_STARTUP_WAIT``; 0 = one try); then they stop with an error
that names the URL without its password, for the supervisor to restart them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote, urlparse

from worker.db.connect import safe_url
from worker.records.secrets import redact

FIRST_PAUSE = 0.5
LONGEST_PAUSE = 10.0
CONNECT_TIMEOUT = 5.0

T = TypeVar("T")


class NotReachable(Exception):
    """What a process needs did not answer within ``startup_wait`` seconds."""


def _redacted(text: str, urls: tuple[str, ...]) -> str:
    """``text`` with every password of ``urls`` replaced: a driver's message may quote a URL."""
    passwords = [urlparse(part.strip()).password or "" for url in urls for part in url.split(";")]
    return redact(text, [*passwords, *(unquote(p) for p in passwords)])


def _say(text: str) -> None:
    print(f"postroom: {text}", file=sys.stderr, flush=True)


def retry_until(
    what: str,
    attempt: Callable[[], T],
    *,
    within: float,
    urls: tuple[str, ...] = (),
    say: Callable[[str], None] = _say,
) -> T:
    """``attempt()``'s result once it succeeds; a failed try is logged and tried again after a
    pause that doubles from FIRST_PAUSE to LONGEST_PAUSE, until ``within`` seconds have passed:
    then NotReachable. Only connection trouble is retried (OSError and the drivers' connection
    errors); a wrong setting fails at once."""
    retried = _connection_errors()
    deadline = time.monotonic() + within
    pause, tries = FIRST_PAUSE, 0
    while True:
        tries += 1
        try:
            result = attempt()
        except retried as exc:
            problem = _redacted(f"{type(exc).__name__}: {exc}", urls)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReachable(f"{what}: still not reachable after {tries} tries ({problem})") from None
            wait = min(pause, left)
            say(f"{what}: not reachable yet ({problem}); try {tries + 1} in {wait:.1f} s")
            time.sleep(wait)
            pause = min(pause * 2, LONGEST_PAUSE)
            continue
        if tries > 1:
            say(f"{what}: reachable after {tries} tries")
        return result


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a server that is not up yet answers. A refused login or a vhost not there yet is
    retried too (a RabbitMQ starting for the first time makes its user and vhost as it boots);
    when it is a wrong setting, the bounded wait ends with the server's words."""
    import amqp.exceptions
    import kombu.exceptions
    import redis.exceptions

    return (
        OSError,
        redis.exceptions.ConnectionError,  # AuthenticationError included
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
        kombu.exceptions.OperationalError,
        amqp.exceptions.AMQPError,
    )


def ping_redis(url: str) -> None:
    """One PING of the Redis at ``url`` (a sentinel:// URL: its master, as the sentinels say)."""
    from worker.db import connect

    client = connect.client(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=CONNECT_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def open_amqp(url: str) -> None:
    """One connection to the RabbitMQ at ``url``, opened and closed (login and vhost included)."""
    import kombu

    with kombu.Connection(url, connect_timeout=CONNECT_TIMEOUT) as connection:
        connection.connect()


def wait_for_backends(command: str, *, within: float | None = None) -> None:
    """Return once Postroom's Redis and the broker both answer (NotReachable after ``within``
    seconds, by default the ``startup_wait`` setting)."""
    from worker.settings import broker_kind, broker_url, load_settings, redis_url, state_url

    broker = broker_url()
    state = state_url(broker)
    limit = load_settings().startup_wait if within is None else within
    started = time.monotonic()
    retry_until(
        f"{command}: Redis at {safe_url(state)}", lambda: ping_redis(state), within=limit, urls=(state,)
    )
    if broker_kind(broker) == "amqp":
        left = max(0.0, limit - (time.monotonic() - started))
        retry_until(
            f"{command}: broker at {safe_url(broker)}", lambda: open_amqp(broker), within=left, urls=(broker,)
        )
    elif redis_url(broker) != state:
        left = max(0.0, limit - (time.monotonic() - started))
        other = redis_url(broker)
        retry_until(
            f"{command}: broker at {safe_url(other)}", lambda: ping_redis(other), within=left, urls=(other,)
        )
