"""Redis clients from any URL form contract §9 names, for Postroom's state and a Redis broker.

redis-py's ``from_url`` reads ``redis://``, ``rediss://`` and ``unix://``. A
``sentinel://h:p[;sentinel://h2:p2]/DB`` URL (kombu's form) becomes a client of
the master named by ``POSTROOM_SENTINEL_MASTER``, managed by the sentinels: after a
connection error it asks them again who the master is, so a failover needs no
restart (what the master had not yet copied to the replica is lost: docs/operations.md,
"High availability with Sentinel").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from worker.errors import ConfigurationError
from worker.settings import sentinel_master

SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a ``sentinel://`` URL (passwords are the master's, and the sentinels' too)."""

    hosts: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        hosts: list[tuple[str, int]] = []
        db, username, password, tls = 0, None, None, False
        for part in url.split(";"):
            parsed = urlparse(part.strip())
            if parsed.scheme != "sentinel":
                raise ConfigurationError(f"not a sentinel:// URL part: {parsed.scheme or '(no scheme)'}://…")
            hosts.append((parsed.hostname or "127.0.0.1", parsed.port or SENTINEL_PORT))
            path = parsed.path.strip("/")
            if path:
                if not path.isdigit():
                    raise ConfigurationError(f"sentinel:// URL: the database must be a number (got {path!r})")
                db = int(path)
            username = unquote(parsed.username) if parsed.username else username
            password = unquote(parsed.password) if parsed.password else password
            tls = tls or "ssl=true" in parsed.query.lower()
        return cls(tuple(hosts), db, username, password, tls)

    def kombu_url(self, url: str) -> str:
        """The same URL with the database on every part (kombu reads it from the first one)."""
        parts = []
        for part in url.split(";"):
            parsed = urlparse(part.strip())
            parts.append(parsed._replace(path=f"/{self.db}").geturl())
        return ";".join(parts)


def is_sentinel(url: str) -> bool:
    return urlparse(url).scheme == "sentinel"


def _sentinel_options(parts: SentinelUrl, options: dict[str, Any]) -> dict[str, Any]:
    auth = {"username": parts.username, "password": parts.password}
    return {
        "sentinel_kwargs": {
            **auth,
            **{k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")},
        },
        **({"ssl": True} if parts.tls else {}),
    }


def client(url: str, **options: Any) -> redis.Redis:
    """A synchronous client for ``url`` (options: redis-py's, e.g. ``decode_responses``)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    parts = SentinelUrl.parse(url)
    sentinels = redis.sentinel.Sentinel(list(parts.hosts), **_sentinel_options(parts, options))  # type: ignore[no-untyped-call]
    return sentinels.master_for(  # type: ignore[no-any-return,no-untyped-call]
        sentinel_master(url),
        db=parts.db,
        username=parts.username,
        password=parts.password,
        **options,
    )


def async_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """The same, for an event loop (redis-py's asyncio client)."""
    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **options)
    parts = SentinelUrl.parse(url)
    sentinels = redis.asyncio.sentinel.Sentinel(list(parts.hosts), **_sentinel_options(parts, options))  # type: ignore[no-untyped-call]
    return sentinels.master_for(  # type: ignore[no-any-return]
        sentinel_master(url),
        db=parts.db,
        username=parts.username,
        password=parts.password,
        **options,
    )


def safe_url(url: str) -> str:
    """``url`` without its credentials (each part of a sentinel list), for messages and logs."""
    out = []
    for part in url.split(";"):
        if "@" in part and "://" in part:
            scheme, rest = part.split("://", 1)
            part = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        out.append(part)
    return ";".join(out)
