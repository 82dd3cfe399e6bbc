"""Failed attempts per client address, counted in Redis (so every HTTP process shares them).

Used by the HTTP service for requests without a valid API key and for failed
dashboard logins: past ``limit`` failures within a fixed window of ``period``
seconds, the address gets 429 (and nothing is checked) until the window ends.
"""

from __future__ import annotations

import math
import time

import redis
from starlette.requests import Request

from worker.db.keys import redis_key


def client_address(request: Request) -> str:
    """The client's address (a trusted proxy's X-Forwarded-For counts: uvicorn's FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client is not None else "unknown"


class FailureLimiter:
    def __init__(self, client: redis.Redis, name: str, limit: int, period: int) -> None:
        self.redis = client
        self.prefix = redis_key("failures", name, "")
        self.limit = limit
        self.period = period

    def _window(self, address: str, now: float) -> tuple[str, int]:
        window = int(now // self.period)
        return f"{self.prefix}{address}:{window}", window

    def blocked(self, address: str, now: float | None = None) -> float | None:
        """Seconds until ``address`` may try again (None: it may now)."""
        now = time.time() if now is None else now
        key, window = self._window(address, now)
        count = self.redis.get(key)
        if count is None or int(count) < self.limit:
            return None
        return (window + 1) * self.period - now

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one failure of ``address``."""
        key, _ = self._window(address, time.time() if now is None else now)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.period + 1)
            pipe.execute()


def retry_after(seconds: float) -> dict[str, str]:
    """The ``Retry-After`` header of a 429: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
