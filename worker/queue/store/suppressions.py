"""Suppression lists, one per account (contract §10): a mailbox that does not exist is not tried
again and again (repeated hard bounces cost the account its reputation with Gmail, Yahoo and
Microsoft).

- An address refused at RCPT with a permanent 5.1.x status (user unknown, bad mailbox, bad
  domain: ``550 5.1.1``) is added automatically, with the reply, the job and the time.
- An operator adds and removes addresses by hand (``postroom suppressions``,
  ``/v1/accounts/{account}/suppressions``).
- A later job never offers a suppressed address to the server: its recipient result is
  ``suppressed``; a job whose every recipient is suppressed ends ``suppressed``.
- Each entry expires after ``suppression_ttl`` (settings; 365 days): a mailbox that comes
  back is tried again after that.

One Redis hash per account: the bare address, lower-cased → a JSON entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import RecipientState
from worker.records.addresses import bare_address

SOURCES = ("automatic", "operator")


def key(account: str) -> str:
    return redis_key("suppressed", account)


def hard_bounce(result: Mapping[str, Any]) -> bool:
    """Whether a recipient result is a permanent refusal of the mailbox itself (5.1.x)."""
    code, message = result.get("code"), str(result.get("message") or "")
    return (
        result.get("status") == RecipientState.FAILED
        and isinstance(code, int)
        and 500 <= code < 600
        and message.lstrip().startswith("5.1.")
    )


class Suppressions:
    """The suppression lists in ``client`` (Postroom's Redis)."""

    def __init__(self, client: redis.Redis, ttl: float = 365 * 86400.0) -> None:
        self.client = client
        self.ttl = ttl

    def add(
        self,
        account: str,
        address: str,
        *,
        reason: str,
        code: int | None = None,
        source: str = "operator",
        job_id: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        (entry,) = self.add_many(account, [(address, reason, code, job_id)], source=source, now=now)
        return entry

    def add_many(
        self,
        account: str,
        items: Iterable[tuple[str, str, int | None, str | None]],
        *,
        source: str = "automatic",
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """(address, reason, code, job id) each; an address already listed gets the new entry."""
        now = time.time() if now is None else now
        entries: list[dict[str, Any]] = []
        for address, reason, code, job_id in items:
            bare = bare_address(address)
            entries.append({
                "address": bare, "reason": reason[:300], "code": code, "source": source,
                "job_id": job_id, "at": now, "expires_at": now + self.ttl,
            })  # fmt: skip
        if entries:
            mapping: dict[Any, Any] = {str(e["address"]).lower(): json.dumps(e) for e in entries}
            self.client.hset(key(account), mapping=mapping)
        return entries

    def lift(self, account: str, addresses: Iterable[str], job_id: str) -> int:
        """Take off the entries ``job_id``'s own refusals made (its dead letter is being retried:
        the operator says the mailbox is back); how many."""
        fields = [bare_address(a).lower() for a in addresses]
        if not fields:
            return 0
        values = cast(list[Any], self.client.hmget(key(account), fields))
        mine = [f for f, v in zip(fields, values, strict=True) if (_entry(v) or {}).get("job_id") == job_id]
        return int(self.client.hdel(key(account), *mine)) if mine else 0

    def remove(self, account: str, address: str) -> bool:
        return bool(self.client.hdel(key(account), bare_address(address).lower()))

    def entries(self, account: str, now: float | None = None) -> list[dict[str, Any]]:
        """Every live entry, oldest first (expired ones are dropped on the way)."""
        now = time.time() if now is None else now
        raw = cast(dict[str, str], self.client.hgetall(key(account)))
        live, expired = [], []
        for field_name, value in raw.items():
            entry = _entry(value)
            if entry is None or entry["expires_at"] <= now:
                expired.append(field_name)
            else:
                live.append(entry)
        if expired:
            self.client.hdel(key(account), *expired)
        return sorted(live, key=lambda e: e["at"])

    def among(
        self, wanted: list[tuple[str, Iterable[str]]], now: float | None = None
    ) -> list[dict[str, dict[str, Any]]]:
        """For each (account, envelope addresses): the suppressed ones → their entry; one round trip."""
        now = time.time() if now is None else now
        asked = [(account, list(addresses)) for account, addresses in wanted]
        with self.client.pipeline(transaction=False) as pipe:
            for account, addresses in asked:
                pipe.hmget(key(account), [a.lower() for a in addresses] or ["-"])
            replies = pipe.execute()
        out = []
        for (_, addresses), values in zip(asked, replies, strict=True):
            found = {}
            for address, value in zip(addresses, values, strict=False):
                entry = _entry(value) if value is not None else None
                if entry is not None and entry["expires_at"] > now:
                    found[address] = entry
            out.append(found)
        return out

    def count(self, account: str) -> int:
        return int(self.client.hlen(key(account)))


def _entry(value: Any) -> dict[str, Any] | None:
    try:
        entry = json.loads(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("expires_at"), int | float):
        return None
    return entry
