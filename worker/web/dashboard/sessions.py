"""Dashboard sessions in Redis: kept apart from the routes so that a session's lifetime rules
(only a hash of its id stored; ended when its operator key changes) sit in one place."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import cast

import redis

from worker.db.keys import redis_key
from worker.web.apikeys import ApiKey
from worker.web.keyring import KeyRing

_SESSION_PREFIX = redis_key("dashboard-session", "")


@dataclass(frozen=True)
class Session:
    key_name: str
    csrf: str


def _fingerprint(key: ApiKey) -> str:
    return hashlib.sha256(key.hash.encode()).hexdigest()


def _session_key(sid: str) -> str:
    return _SESSION_PREFIX + hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    """Dashboard sessions in Redis, under the hash of their id (a copy of Redis opens none)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def create(self, key: ApiKey) -> str:
        sid = secrets.token_urlsafe(32)
        record = _session_key(sid)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                record,
                mapping={
                    "key": key.name,
                    "fingerprint": _fingerprint(key),
                    "csrf": secrets.token_urlsafe(32),
                    "created_at": time.time(),
                },
            )
            pipe.expire(record, self.ttl)
            pipe.execute()
        return sid

    def load(self, sid: str, ring: KeyRing) -> Session | None:
        """The session, while its operator key still exists unchanged."""
        if not sid or len(sid) > 100:
            return None
        data = cast(dict[str, str], self.redis.hgetall(_session_key(sid)))
        if not data:
            return None
        key = ring.keys(data.get("key", "")).get(data.get("key", ""))
        fingerprint = data.get("fingerprint", "")
        if key is None or not key.operator or not hmac.compare_digest(_fingerprint(key), fingerprint):
            self.delete(sid)
            return None
        return Session(key_name=key.name, csrf=data.get("csrf", ""))

    def delete(self, sid: str) -> None:
        self.redis.delete(_session_key(sid))
