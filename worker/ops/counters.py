"""Delivery counters kept in Redis, written in the pipeline that records each outcome.

Every worker process (prefork children, other machines) adds to the same
counters, so ``postroom status`` and any metrics endpoint see the whole
deployment. Keys (all under ``postroom:``)::

    m:deliveries                 hash: "<account>|<transport>|<outcome>" -> count
    m:attempts                   hash: account -> attempts ended
    m:latency:<account>          hash: bucket upper bound (or "+Inf") -> count, "sum", "count"
    w:<account>:m:<minute>       hash: sent / failed / retried / dead / suppressed, and lat:<bound>
                                 (the latency histogram of that minute's sends), kept 2 hours
    w:<account>:h:<hour>         the same per hour, kept 26 hours

``<account>`` is the job's account name only when it can be an account: a name
no record could have (``?``, a NUL byte, 100 kB of text) is counted under
:data:`UNKNOWN`, and so is any name outside ``known`` when the writer passes
the accounts that exist. A producer cannot make these hashes and keys grow
with names of its choosing; :mod:`worker.web.metrics` folds the rest (names of
accounts whose record has gone) the same way when it is scraped.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Collection
from typing import Any, TypedDict, Unpack, cast

import redis

from worker.db.keys import PREFIX
from worker.db.vocabulary import WINDOW_COUNTERS, counted_as
from worker.records.loader import valid_record_name

UNKNOWN = "(unknown)"  # the one label of every account name that is not an account's
# enqueue -> accepted by the server, seconds
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)


def account_label(account: str, known: Collection[str] | None = None) -> str:
    """``account`` when it names an account (one of ``known`` when given, else a name a record
    could have), else :data:`UNKNOWN`."""
    if known is not None:
        return account if account in known else UNKNOWN
    return account if valid_record_name(account) else UNKNOWN


def _bucket(seconds: float) -> str:
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return repr(bound)
    return "+Inf"


def record_into(
    pipe: Any, account: str, *, known: Collection[str] | None = None, **counted: Unpack[Counted]
) -> None:
    """Queue one attempt's counters on ``pipe`` (the job record's own pipeline); ``known``:
    the accounts that exist (see :func:`account_label`)."""
    tally = Tally(known)
    tally.add(account, **counted)
    tally.write_into(pipe)


class Counted(TypedDict):
    """One outcome's counters, as :meth:`Tally.add` and :func:`record_into` take them."""

    transport: str | None
    outcome: str
    counter: str | None
    latency: float | None
    now: float


class Tally:
    """The counters of many outcomes, summed first and written as a few commands (a batch's
    or a carried group's pipeline: a handful of commands instead of a dozen per message).
    ``known``: the accounts that exist; other names count under :data:`UNKNOWN`."""

    def __init__(self, known: Collection[str] | None = None) -> None:
        self.known = known
        self.deliveries: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.latency: dict[str, Counter[str]] = defaultdict(Counter)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.windows: dict[str, Counter[str]] = defaultdict(Counter)
        self.window_ttl: dict[str, int] = {}
        self.signed_in: set[str] = set()  # accounts whose deliveries logged in

    def add(
        self,
        account: str,
        *,
        transport: str | None,
        outcome: str,
        counter: str | None,
        latency: float | None,
        now: float,
    ) -> None:
        account = account_label(account, self.known)
        self.deliveries[f"{account}|{transport or 'none'}|{outcome}"] += 1
        self.attempts[account] += 1
        if latency is not None and outcome == "sent":
            self.latency[account][_bucket(latency)] += 1
            self.latency_sum[account] += latency
        names = counted_as(counter)
        if latency is not None and outcome == "sent":  # the window's histogram (worker/ops/series.py)
            names.append("lat:" + _bucket(latency))
        for step, span, ttl in (("m", 60, 7200), ("h", 3600, 26 * 3600)):
            key = f"{PREFIX}w:{account}:{step}:{int(now // span)}"
            for name in names:
                self.windows[key][name] += 1
            if names:
                self.window_ttl[key] = ttl

    def write_into(self, pipe: Any, sign: int = 1) -> None:
        """Add the sums (``sign`` -1: take them back, for outcomes a superseded attempt counted)."""
        for field, count in self.deliveries.items():
            pipe.hincrby(PREFIX + "m:deliveries", field, sign * count)
        for account, count in self.attempts.items():
            pipe.hincrby(PREFIX + "m:attempts", account, sign * count)
        for account, buckets in self.latency.items():
            key = f"{PREFIX}m:latency:{account}"
            for bucket, count in buckets.items():
                pipe.hincrby(key, bucket, sign * count)
            pipe.hincrbyfloat(key, "sum", sign * round(self.latency_sum[account], 6))
            pipe.hincrby(key, "count", sign * sum(buckets.values()))
        for key, names in self.windows.items():
            for name, count in names.items():
                pipe.hincrby(key, name, sign * count)
            pipe.expire(key, self.window_ttl[key])


Window = list[dict[str, str]]  # the window hashes of consecutive minutes or hours, oldest first


def window_hashes(client: redis.Redis, accounts: list[str], now: float) -> list[tuple[Window, Window]]:
    """Per account, its window hashes of the last 60 minutes and of the last 24 hours (one round trip)."""
    minute, hour = int(now // 60), int(now // 3600)
    with client.pipeline(transaction=False) as pipe:
        for name in accounts:
            for m in range(minute - 59, minute + 1):
                pipe.hgetall(f"{PREFIX}w:{name}:m:{m}")
            for h in range(hour - 23, hour + 1):
                pipe.hgetall(f"{PREFIX}w:{name}:h:{h}")
        raw = cast(list[dict[str, str]], pipe.execute())
    return [(raw[i * 84 : i * 84 + 60], raw[i * 84 + 60 : (i + 1) * 84]) for i in range(len(accounts))]


def windows(
    client: redis.Redis, accounts: list[str], now: float | None = None
) -> dict[str, dict[str, dict[str, int]]]:
    """Per account, the counters of the last hour and the last day: {name: {hour: {..}, day: {..}}}."""
    read = window_hashes(client, accounts, time.time() if now is None else now)
    return {
        name: {"hour": _sum(minutes), "day": _sum(hours)}
        for name, (minutes, hours) in zip(accounts, read, strict=True)
    }


def _sum(hashes: list[dict[str, str]]) -> dict[str, int]:
    total = dict.fromkeys(WINDOW_COUNTERS, 0)
    for fields in hashes:
        for name, value in fields.items():
            if name in total:  # not the latency buckets beside them
                total[name] += int(value)
    return total
