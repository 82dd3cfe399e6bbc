"""Suppression lists, one per account (contract §10): a mailbox that does not exist is not tried
again and again (repeated hard bounces cost the account its reputation with Gmail, Yahoo and
Microsoft).

- An address refused at RCPT with a permanent 5.1.x status (user unknown, bad mailbox, bad
  domain: ``550 5.1.1``) is added automatically, with the reply, the job and the time; so is
  one a bounce or complaint report names (source ``report``, worker/queue/store/reports.py).
- An operator adds and removes addresses by hand (``postroom suppressions``,
  ``/v1/accounts/{account}/suppressions``).
- A later job never offers a suppressed address to the server: its recipient result is
  ``suppressed``; a job whose every recipient is suppressed ends ``suppressed``.
- Each entry expires after ``suppression_ttl`` (settings; 365 days): a mailbox that comes
  back is tried again after that.
- A list holds at most ``suppression_limit`` entries (settings; 100,000): a new entry past it
  pushes out the oldest automatic one (refusal or report); an operator's entry is never pushed
  out, and when every entry is an operator's the new one is refused (:class:`ListFull`).

Per account, three keys, written together by one script (:data:`SUPPRESS_LUA`):

- a hash, the bare address lower-cased → a JSON entry: the send path's lookup (:meth:`among`,
  HMGET: O(recipients));
- a sorted set of the same addresses by the entry's time: the list, read a page at a time
  (:meth:`page`: O(log n + page), never the whole list);
- a sorted set of the automatic ones alone: who goes first when the list is full.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from worker.db.keys import redis_key
from worker.db.vocabulary import RecipientState
from worker.records.addresses import bare_address

SOURCES = ("automatic", "operator")


DEFAULT_LIMIT = 100_000


def key(account: str) -> str:
    """The hash: address → entry (what the send path reads)."""
    return redis_key("suppressed", account)


def keys(account: str) -> tuple[str, str, str]:
    """The hash, the addresses by time, the automatic ones by time."""
    return key(account), redis_key("suppressed-by-time", account), redis_key("suppressed-automatic", account)


def hard_bounce(result: Mapping[str, Any]) -> bool:
    """Whether a recipient result is a permanent refusal of the mailbox itself (5.1.x)."""
    code, message = result.get("code"), str(result.get("message") or "")
    return (
        result.get("status") == RecipientState.FAILED
        and isinstance(code, int)
        and 500 <= code < 600
        and message.lstrip().startswith("5.1.")
    )


class ListFull(ValueError):
    """The list holds ``suppression_limit`` entries, all of them an operator's: nothing can go."""


# suppress(hash, by time, automatic ones, field, entry JSON, at, automatic?, limit, now): 1 written,
# 0 refused (full of an operator's entries). Expired entries at the head go first, then (when
# the list is full) the oldest automatic ones; re-adding an address moves it to its new time.
SUPPRESS_LUA = """
local function suppress(hkey, tkey, akey, field, entry, at, automatic, limit, now)
  local function drop(f)
    redis.call('HDEL', hkey, f) redis.call('ZREM', tkey, f) redis.call('ZREM', akey, f)
  end
  for _, f in ipairs(redis.call('ZRANGE', tkey, 0, 1)) do
    local ok, e = pcall(cjson.decode, redis.call('HGET', hkey, f) or '')
    if not ok or type(e) ~= 'table' or (tonumber(e.expires_at) or 0) <= now then drop(f) end
  end
  if redis.call('HEXISTS', hkey, field) == 0 then
    while redis.call('HLEN', hkey) >= limit do
      local oldest = redis.call('ZRANGE', akey, 0, 0)
      if #oldest == 0 then return 0 end
      drop(oldest[1])
    end
  end
  redis.call('HSET', hkey, field, entry)
  redis.call('ZADD', tkey, at, field)
  if automatic then redis.call('ZADD', akey, at, field) else redis.call('ZREM', akey, field) end
  return 1
end
"""

# KEYS: hash, by time, automatic. ARGV: limit, now, then per entry: field, entry JSON, at, source.
# Returns how many were written (the rest refused: the list is full of an operator's entries).
ADD = (
    SUPPRESS_LUA
    + """
local written = 0
for i = 3, #ARGV, 4 do
  written = written + suppress(KEYS[1], KEYS[2], KEYS[3], ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]),
    ARGV[i + 3] ~= 'operator', tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return written
"""
)


@dataclass(frozen=True)
class Page:
    """One page of a list, oldest first: ``next`` is the cursor for the page after (None: last)."""

    entries: list[dict[str, Any]]
    next: str | None
    total: int


class Suppressions:
    """The suppression lists in ``client`` (Postroom's Redis)."""

    def __init__(self, client: redis.Redis, ttl: float = 365 * 86400.0, limit: int = DEFAULT_LIMIT) -> None:
        self.client = client
        self.ttl = ttl
        self.limit = limit

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
        """One entry; :class:`ListFull` when the list has no room for it."""
        entries = self.add_many(account, [(address, reason, code, job_id)], source=source, now=now)
        if not entries:
            raise ListFull(
                f"{account}'s suppression list holds {self.limit} operator entries (suppression_limit)"
            )
        return entries[0]

    def add_many(
        self,
        account: str,
        items: Iterable[tuple[str, str, int | None, str | None]],
        *,
        source: str = "automatic",
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """(address, reason, code, job id) each; an address already listed gets the new entry. The
        entries written (fewer when the list is full of an operator's entries)."""
        now = time.time() if now is None else now
        entries: list[dict[str, Any]] = []
        for i, (address, reason, code, job_id) in enumerate(items):
            at = now + i * 1e-6  # one batch keeps its order, and pages never split a tie
            entries.append({
                "address": bare_address(address), "reason": reason[:300], "code": code, "source": source,
                "job_id": job_id, "at": at, "expires_at": at + self.ttl,
            })  # fmt: skip
        if not entries:
            return []
        args: list[Any] = [self.limit, now]
        for e in entries:
            args += [str(e["address"]).lower(), json.dumps(e), repr(e["at"]), source]
        written = int(cast(int, self.client.eval(ADD, 3, *keys(account), *args)))
        return entries[:written]

    def lift(self, account: str, addresses: Iterable[str], job_id: str) -> int:
        """Take off the entries ``job_id``'s own refusals made (its dead letter is being retried:
        the operator says the mailbox is back); how many."""
        fields = [bare_address(a).lower() for a in addresses]
        if not fields:
            return 0
        values = cast(list[Any], self.client.hmget(key(account), fields))
        mine = [f for f, v in zip(fields, values, strict=True) if (_entry(v) or {}).get("job_id") == job_id]
        return self._drop(account, mine)

    def remove(self, account: str, address: str) -> bool:
        return bool(self._drop(account, [bare_address(address).lower()]))

    def _drop(self, account: str, fields: list[str]) -> int:
        if not fields:
            return 0
        hkey, tkey, akey = keys(account)
        with self.client.pipeline() as pipe:  # MULTI/EXEC: the three keys agree
            pipe.hdel(hkey, *fields)
            pipe.zrem(tkey, *fields)
            pipe.zrem(akey, *fields)
            removed = pipe.execute()[0]
        return int(removed)

    def page(
        self, account: str, limit: int = 100, after: str | None = None, now: float | None = None
    ) -> Page:
        """Up to ``limit`` live entries, oldest first, after cursor ``after`` (a page's ``next``):
        O(log n + limit) whatever the list's length. Expired entries met are dropped."""
        now = time.time() if now is None else now
        self._index(account)
        hkey, tkey, _ = keys(account)
        low, after_field = _cursor(after)
        out: list[dict[str, Any]] = []
        stale: list[str] = []
        offset, more, cursor = 0, True, (low, after_field)
        while len(out) < limit and more:
            want = limit - len(out) + 1  # one more: is there a page after?
            rows = cast(list[tuple[str, float]], self.client.zrangebyscore(
                tkey, low, "+inf", start=offset, num=want, withscores=True))  # fmt: skip
            offset += len(rows)
            more = len(rows) == want
            rows = [
                (f, at) for f, at in rows if not (at == low and after_field is not None and f <= after_field)
            ]
            values = cast(list[Any], self.client.hmget(hkey, [f for f, _ in rows])) if rows else []
            for (field_name, at), value in zip(rows, values, strict=True):
                entry = _entry(value)
                if entry is None or entry["expires_at"] <= now:
                    stale.append(field_name)
                elif len(out) < limit:
                    out.append(entry)
                    cursor = (at, field_name)
                else:
                    more = True
                    break
        if stale:
            self._drop(account, stale)
        return Page(out, _cursor_text(*cursor) if more and out else None, self.count(account))

    def _index(self, account: str) -> None:
        """Index entries written without it (a hash from an earlier release): once, in chunks."""
        hkey, tkey, akey = keys(account)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hlen(hkey)
            pipe.zcard(tkey)
            held, indexed = pipe.execute()
        if int(held) <= int(indexed):
            return
        for field_name, value in self.client.hscan_iter(hkey, count=1000):
            entry = _entry(value)
            if entry is None:
                continue
            at = float(entry.get("at") or 0)
            self.client.zadd(tkey, {field_name: at}, nx=True)
            if entry.get("source") != "operator":
                self.client.zadd(akey, {field_name: at}, nx=True)

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


def _cursor(after: str | None) -> tuple[float, str | None]:
    """A page's ``next`` → (time, last address) to start after; ValueError when it is not one."""
    if after is None or after == "":
        return float("-inf"), None
    at, sep, last = after.partition(":")
    try:
        value = float(at)
    except ValueError:
        raise ValueError("not a cursor from a page's next") from None
    if not sep or not last or value != value:
        raise ValueError("not a cursor from a page's next")
    return value, last


def _cursor_text(at: float, last: str | None) -> str:
    return f"{at!r}:{last}"


def _entry(value: Any) -> dict[str, Any] | None:
    try:
        entry = json.loads(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("expires_at"), int | float):
        return None
    return entry


class AutoReplyWindow:
    """The auto-reply window, a suppression of its own kind: at most one auto-reply per sender and
    account within the window (contract §2), a key per (account, sender) that the first job to
    claim it holds. Part of :class:`worker.queue.store.jobs.JobStore`."""

    redis: redis.Redis

    def claim_auto_reply(self, account: str, sender: str, window: float, job_id: str) -> str | None:
        """Reserve the right to auto-reply to ``sender``; returns the job that already did."""
        key = redis_key("autoreply", account, sender.lower())
        if self.redis.set(key, job_id, nx=True, ex=max(int(window), 1)):
            return None
        owner = cast(str | None, self.redis.get(key))
        return None if owner == job_id else (owner or "another job")

    def release_auto_reply(self, account: str, sender: str, job_id: str) -> None:
        key = redis_key("autoreply", account, sender.lower())
        if self.redis.get(key) == job_id:
            self.redis.delete(key)
