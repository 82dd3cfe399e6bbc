"""Who may call the /v1 API: the API key check, the per-key request rate and the per-address
limit on requests without a valid key, as one FastAPI dependency (:data:`Key`)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from worker.db.keys import redis_key
from worker.web import apikeys
from worker.web.api.models import HttpError
from worker.web.apikeys import ApiKey
from worker.web.keyring import KeyRing
from worker.web.ratelimit import FailureLimiter, client_address, retry_after

log = logging.getLogger("postroom.http")

_RATE_PREFIX = redis_key("http-rate", "")


class RateLimiter:
    """A fixed window per key in Redis (so several API processes share one budget)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def hit(self, key: ApiKey, now: float | None = None) -> float | None:
        """Count one request; None when allowed, else seconds until the window resets."""
        now = time.time() if now is None else now
        window = int(now // key.period)
        name = f"{_RATE_PREFIX}{key.name}:{window}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(name)
            pipe.expire(name, key.period + 1)
            count, _ = pipe.execute()
        if int(count) <= key.limit:
            return None
        return (window + 1) * key.period - now


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <name>.<secret>")


async def authorised(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    """The request's API key (401 without a valid one, 429 over its rate or after too many 401s)."""
    ring: KeyRing = request.app.state.ring
    limiter: RateLimiter = request.app.state.limiter
    failures: FailureLimiter = request.app.state.auth_failures
    address = client_address(request)
    blocked = await run_in_threadpool(failures.blocked, address)
    if blocked is not None:
        raise HttpError(
            429, "too many requests without a valid API key from this address", headers=retry_after(blocked)
        )
    token = credentials.credentials if credentials is not None else None
    key = apikeys.verify(ring.keys(apikeys.key_name(token)), token)
    if key is None:
        await run_in_threadpool(failures.failed, address)
        log.info("401 %s %s: %s", request.method, request.url.path, "bad key" if token else "no key")
        raise HttpError(401, "a valid API key is needed", headers={"WWW-Authenticate": "Bearer"})
    wait = await run_in_threadpool(limiter.hit, key)
    if wait is not None:
        raise HttpError(
            429, f"over this key's rate of {key.limit} requests per {key.period} s", headers=retry_after(wait)
        )
    return key


Key = Annotated[ApiKey, Depends(authorised)]
