"""Every Redis key of Postroom's own state is ``postroom:`` + a name (kombu's are its own).

One spelling for every layer: the job store, the limits, health, the counters, the sweep
and the HTTP side all build their keys with :func:`redis_key`, so a key's name is found by
searching for its first part (``redis_key("job", ...)``).
"""

from __future__ import annotations

PREFIX = "postroom:"


def redis_key(*parts: str) -> str:
    """The Redis key of Postroom's records, e.g. ``redis_key("job", job_id)``."""
    return PREFIX + ":".join(parts)
