"""Account health: the last connectivity results, the circuit breaker, and held jobs.

Keys (all under ``postroom:``)::

    health:<account>          JSON of the last check (ConnectivityReport.as_dict()), kept 7 days
    health-history:<account>  list: the last HISTORY checks, newest last (JSON)
    account:<account>         hash: state (paused), paused_by (auto|operator), reason, since,
                              check_failures (consecutive), auth_failures (consecutive)
    held:<account>            list: jobs of a paused account waiting for it, as JSON
                              {"id", "kwargs"}; released to the queue on resume
    paused                    set: the accounts paused now (what workers read)

An account is **paused** after ``pause_after`` consecutive failed health checks
or authentication failures: its jobs are held (no attempt is spent, nothing is
dead-lettered) until a health check passes again or an operator resumes it.
A pause by an operator (``postroom accounts pause``) is lifted only by an
operator. **degraded** means the last check failed or the last delivery met an
authentication failure, but the account is not paused (yet).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from worker.db.keys import redis_key as _key

HISTORY = 20
HEALTH_TTL = 7 * 86400
PAUSE_CACHE_SECONDS = 1.0  # how stale a worker's view of paused accounts may be


class AccountHealth:
    """Health results, account states and held jobs in Redis (shared by every process)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        pause_after: int = 3,
        release: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.redis = client
        self.pause_after = pause_after
        self.release = release  # publishes one held job again (the task layer's send_task)
        self._paused_cache: tuple[float, frozenset[str]] | None = None
        self._lock = threading.Lock()

    # ---- health results --------------------------------------------------------------

    def record_check(self, report: dict[str, Any]) -> str:
        """Store one check's result and move the breaker; returns the account's state after it."""
        name = str(report["account"])
        data = json.dumps(report, default=str)
        account = _key("account", name)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_key("health", name), data, ex=HEALTH_TTL)
            pipe.rpush(_key("health-history", name), data)
            pipe.ltrim(_key("health-history", name), -HISTORY, -1)
            pipe.expire(_key("health-history", name), HEALTH_TTL)
            if report.get("ok"):
                pipe.hset(account, mapping={"check_failures": 0, "auth_failures": 0})
            else:
                pipe.hincrby(account, "check_failures", 1)
            pipe.hgetall(account)
            *_, fields = pipe.execute()
        state = cast(dict[str, str], fields)
        if report.get("ok"):
            if state.get("state") == "paused" and state.get("paused_by") == "auto":
                self.resume(name, by="health check")
                return "ok"
            return "paused" if state.get("state") == "paused" else "ok"
        if state.get("state") != "paused" and int(state.get("check_failures", 0)) >= self.pause_after:
            reason = f"{self.pause_after} health checks failed in a row: {report.get('error') or '?'}"
            self.pause(name, reason, by="auto")
            return "paused"
        return "paused" if state.get("state") == "paused" else "degraded"

    def note_auth_failure(self, name: str, reason: str) -> bool:
        """Count an authentication failure of a delivery; True when it paused the account."""
        account = _key("account", name)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(account, "auth_failures", 1)
            pipe.hget(account, "state")
            failures, state = pipe.execute()
        if state != "paused" and int(failures) >= self.pause_after:
            self.pause(name, f"{failures} authentication failures in a row: {reason}", by="auto")
            return True
        return False

    def auth_succeeded_into(self, pipe: Any, name: str) -> None:
        """A delivery logged in: the run of authentication failures is over."""
        pipe.hset(_key("account", name), "auth_failures", 0)

    def last(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.get(_key("health", name))
        return json.loads(raw) if raw else None

    def last_many(self, names: list[str]) -> dict[str, dict[str, Any] | None]:
        if not names:
            return {}
        raws = cast(list[Any], self.redis.mget([_key("health", n) for n in names]))
        return {n: (json.loads(r) if r else None) for n, r in zip(names, raws, strict=True)}

    def history(self, name: str) -> list[dict[str, Any]]:
        return [
            json.loads(r) for r in cast(list[str], self.redis.lrange(_key("health-history", name), 0, -1))
        ]

    # ---- states ------------------------------------------------------------------------

    def account_state(self, name: str) -> dict[str, str]:
        return cast(dict[str, str], self.redis.hgetall(_key("account", name)))

    def account_states(self, names: list[str]) -> dict[str, dict[str, str]]:
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(_key("account", name))
            return dict(zip(names, cast(list[dict[str, str]], pipe.execute()), strict=True))

    def pause(self, name: str, reason: str, *, by: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _key("account", name),
                mapping={"state": "paused", "paused_by": by, "reason": reason, "since": time.time()},
            )
            pipe.sadd(_key("paused"), name)
            pipe.execute()
        self._paused_cache = None

    def resume(self, name: str, *, by: str = "operator") -> int:
        """Lift a pause and put the held jobs back on the queue; returns how many."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _key("account", name),
                mapping={
                    "state": "ok",
                    "paused_by": "",
                    "reason": f"resumed by {by}",
                    "since": time.time(),
                    "check_failures": 0,
                    "auth_failures": 0,
                },
            )
            pipe.srem(_key("paused"), name)
            pipe.execute()
        self._paused_cache = None
        return self.release_held(name)

    def paused(self) -> frozenset[str]:
        """Accounts paused right now (cached for a second: asked once per task)."""
        now = time.monotonic()
        with self._lock:
            cached = self._paused_cache
            if cached is not None and now - cached[0] < PAUSE_CACHE_SECONDS:
                return cached[1]
        result = frozenset(cast(set[str], self.redis.smembers(_key("paused"))))
        with self._lock:
            self._paused_cache = (now, result)
        return result

    # ---- held jobs ---------------------------------------------------------------------

    def held_count(self, name: str) -> int:
        return int(self.redis.llen(_key("held", name)))

    def release_held(self, name: str) -> int:
        """Publish every job still held (oldest first), then drop them from the list; one that
        is no longer ``held`` (cancelled meanwhile) is dropped unpublished.

        Published before removed: a crash in between enqueues a job twice, and
        its job record skips the second copy; never the other way round. (Should a job be
        cancelled between this look and its run, the start of its attempt refuses it.)
        """
        if self.release is None:
            raise RuntimeError("AccountHealth needs a release function to resume accounts")
        key, released = _key("held", name), 0
        while True:
            batch = [json.loads(raw) for raw in cast(list[str], self.redis.lrange(key, 0, 99))]
            if not batch:
                return released
            with self.redis.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.hget(_key("job", str(item["id"])), "state")
                states = pipe.execute()
            for item, state in zip(batch, states, strict=True):
                if state == "held":
                    self.release(str(item["id"]), dict(item["kwargs"]))
                    released += 1
            self.redis.ltrim(key, len(batch), -1)
