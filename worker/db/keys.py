"""Postroom's own state in Redis: every key is ``postroom:`` + a name (kombu's are its own).

One spelling for every layer: the job store, the limits, health, the counters, the sweep
and the HTTP side all build their keys with :func:`redis_key`, so a key's name is found by
searching for its first part (``redis_key("job", ...)``).
"""

from __future__ import annotations

from typing import Any

PREFIX = "postroom:"


def redis_key(*parts: str) -> str:
    """The Redis key of Postroom's records, e.g. ``redis_key("job", job_id)``."""
    return PREFIX + ":".join(parts)


# Every client of Postroom's state: a half-open connection (a Redis that vanished without a FIN,
# a network partition) fails a command after this long instead of hanging its thread for ever.
# No command Postroom sends blocks on the server, so a longer wait always means trouble.
REDIS_TIMEOUTS: dict[str, Any] = {
    "socket_timeout": 15.0,
    "socket_connect_timeout": 10.0,
    "health_check_interval": 30,
}
