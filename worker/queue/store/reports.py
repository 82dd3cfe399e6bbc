"""What a delivery report in an account's mailbox does to the job it is about (contract §11),
written in one script: the recipients' results, the job's history, the account's suppression
list, its counters and the webhook event, or nothing at all.

The bounce reader (worker/queue/events/reports_reader.py) reads each account's mailbox under a
lease: one reader per account in the whole cluster. The script writes only for the lease's
holder (a reader that froze and woke after its lease passed to another writes nothing: fencing)
and only once per report (a reader killed between writing and moving the report reads it again
and finds it done). The job's state stays as it was: what happens after the 250 belongs to the
recipient.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import redis

from worker.db.keys import PREFIX, redis_key
from worker.db.vocabulary import EVENT_OF_REPORT, SUPPRESSED_FOR, RecipientState, lua_words
from worker.mail.message import comparable_message_id
from worker.queue.store import emit, suppressions
from worker.queue.store.marks import sent_as_key

SEEN_TTL = 30 * 86400  # a report read again within this long is known as done
HISTORY_LIMIT = 50
WATERMARK_TTL = 400 * 86400

# KEYS: job, history, lease, seen, suppressions, window minute, window hour, deliveries metric,
# suppressions by time, automatic suppressions (suppressions.keys).
# ARGV: 1 lease token ("" = no lease asked: `postroom bounces check`, safe through `seen`),
# 2 now, 3 seen ttl, 4 job ttl, 5 history limit, 6 what the report says of a recipient (a
# RecipientState, or "delayed"), 7 counter ("" = none), 8 event type, 9 event id, 10 retention,
# 11 job id, 12 the suppression list's limit, then per reported recipient: address (lower case),
# result JSON, history entry JSON, suppression entry JSON ("" = none).
# Returns {outcome, recipients changed}: outcome 1 written, 0 already done, -1 lease not held,
# -2 no such job.
APPLY = lua_words(
    emit.EMIT_LUA
    + suppressions.SUPPRESS_LUA
    + """
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return {-1, 0} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2, 0} end
if not redis.call('SET', KEYS[4], ARGV[11], 'NX', 'EX', ARGV[3]) then return {0, 0} end
local raw = redis.call('HGET', KEYS[1], 'recipients')
local ok, recipients = pcall(cjson.decode, raw or '{}')
if not ok or type(recipients) ~= 'table' then recipients = {} end
local by_lower = {}
for address, _ in pairs(recipients) do by_lower[string.lower(address)] = address end
local changed = 0
for i = 13, #ARGV, 4 do
  local address = by_lower[ARGV[i]]
  if address then
    redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    if ARGV[6] ~= 'delayed' then
      recipients[address] = cjson.decode(ARGV[i + 1])
      changed = changed + 1
      if ARGV[i + 3] ~= '' then
        local now = tonumber(ARGV[2])
        suppress(KEYS[5], KEYS[9], KEYS[10], ARGV[i], ARGV[i + 3], now, true, tonumber(ARGV[12]), now)
      end
    end
  end
end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
if changed > 0 then
  redis.call('HSET', KEYS[1], 'recipients', cjson.encode(recipients), 'updated_at', ARGV[2])
  if ARGV[7] ~= '' then
    redis.call('HINCRBY', KEYS[6], ARGV[7], changed)
    redis.call('EXPIRE', KEYS[6], 7200)
    redis.call('HINCRBY', KEYS[7], ARGV[7], changed)
    redis.call('EXPIRE', KEYS[7], 93600)
    -- postroom_deliveries_total by outcome (worker/web/metrics.py)
    local job = redis.call('HMGET', KEYS[1], 'account', 'transport')
    redis.call('HINCRBY', KEYS[8], (job[1] or '') .. '|' .. (job[2] or 'none') .. '|' .. ARGV[6], changed)
  end
  emit(KEYS[1], KEYS[2], ARGV[11], ARGV[8], ARGV[9], ARGV[2], ARGV[10])
end
return {1, changed}
"""
)
APPLY_SHA = hashlib.sha1(APPLY.encode()).hexdigest()  # noqa: S324
# KEYS: lease. ARGV: token, ttl (ms). 1: held by ``token`` now (taken, or renewed), 0: another's.
TAKE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class Applied(IntEnum):
    """What :meth:`ReportStore.apply` did."""

    WRITTEN = 1
    ALREADY_DONE = 0  # the same report was applied before (read again after a crash)
    LEASE_LOST = -1  # another reader holds the account's mailbox now: stop
    NO_JOB = -2  # no record of the job (never ours, or expired): unmatched


@dataclass(frozen=True)
class Finding:
    """What one report says of one of the job's recipients."""

    address: str  # lower case
    said: str  # a RecipientState (bounced, complained) or "delayed"
    code: int | None  # the SMTP reply code in the report's diagnostic, when it has one
    status: str | None  # RFC 3463, e.g. "5.1.1"
    diagnostic: str | None
    permanent: bool  # a bounce that will not change by itself (5.x.x), or a complaint: suppress


def lease_key(account: str) -> str:
    return redis_key("reports", "lease", account)


def seen_key(account: str, report: str) -> str:
    return redis_key("reports", "seen", account, report)


def watermark_key(account: str) -> str:
    return redis_key("reports", "watermark", account)


def stats_key(account: str) -> str:
    """Per account: reports matched, unmatched, not reports (ordinary mail) — all time."""
    return redis_key("reports", "stats", account)


def report_identity(report_id: str | None, raw: bytes) -> str:
    """What a report is known by in ``seen``: its own Message-ID, else a digest of its bytes."""
    source = report_id.encode() if report_id else raw
    return hashlib.sha256(source).hexdigest()[:32]


class ReportStore:
    """The reports' side of Postroom's Redis: leases, the write, the reader's place in a folder."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        job_ttl: float,
        retention: float,
        suppression_ttl: float,
        suppression_limit: int = suppressions.DEFAULT_LIMIT,
    ) -> None:
        self.client = client
        self.job_ttl = job_ttl
        self.retention = retention
        self.suppression_ttl = suppression_ttl
        self.suppression_limit = suppression_limit

    def take_lease(self, account: str, token: str, ttl: float) -> bool:
        """Hold ``account``'s mailbox for ``ttl`` seconds (renewed when already ours)."""
        ms = max(int(ttl * 1000), 1000)
        return bool(self.client.eval(TAKE_LEASE, 1, lease_key(account), token, ms))

    def release_lease(self, account: str, token: str) -> None:
        self.client.eval(RELEASE_LEASE, 1, lease_key(account), token)

    def apply(
        self, account: str, job_id: str, report: str, kind: str, findings: Sequence[Finding], token: str
    ) -> tuple[Applied, int]:
        """Write what ``findings`` say of job ``job_id``'s recipients (see :data:`APPLY`)."""
        now = time.time()
        said = findings[0].said if findings else RecipientState.BOUNCED
        event = EVENT_OF_REPORT.get(said, "")
        counter = said if said in EVENT_OF_REPORT else ""
        args: list[Any] = [
            token, now, SEEN_TTL, int(self.job_ttl), HISTORY_LIMIT, said, counter,
            event, emit.new_event_id() if event else "", max(int(self.retention), 60), job_id,
            self.suppression_limit,
        ]  # fmt: skip
        for finding in findings:
            args += [finding.address, *self._entries(account, job_id, kind, finding, now)]
        minute, hour = int(now // 60), int(now // 3600)
        keys = [
            redis_key("job", job_id), redis_key("history", job_id), lease_key(account),
            seen_key(account, report), suppressions.key(account),
            f"{PREFIX}w:{account}:m:{minute}", f"{PREFIX}w:{account}:h:{hour}", f"{PREFIX}m:deliveries",
            *suppressions.keys(account)[1:],
        ]  # fmt: skip
        outcome, changed = self.client.eval(APPLY, len(keys), *keys, *args)
        if outcome != Applied.LEASE_LOST:
            self.count(account, "matched" if outcome != Applied.NO_JOB else "unmatched")
        return Applied(int(outcome)), int(changed)

    def _entries(self, account: str, job_id: str, kind: str, finding: Finding, now: float) -> list[str]:
        """The recipient's new result, its history entry and its suppression entry ("": none)."""
        text = " ".join(p for p in (finding.status, finding.diagnostic) if p) or finding.said
        result = {
            "status": finding.said,
            "code": finding.code,
            "message": text[:500],
            "at": now,
            "report": kind,
        }
        history = {
            "at": now,
            "outcome": finding.said,
            "recipient": finding.address,
            "report": kind,
            "error": text[:500],
        }
        reason = SUPPRESSED_FOR.get(finding.said) if finding.permanent else None
        entry = ""
        if reason is not None:
            entry = json.dumps({
                "address": finding.address, "reason": reason, "code": finding.code, "source": "report",
                "job_id": job_id, "detail": text[:300], "at": now, "expires_at": now + self.suppression_ttl,
            })  # fmt: skip
        return [json.dumps(result), json.dumps(history), entry]

    def belongs(self, job_id: str, account: str, message_id: str | None) -> bool:
        """Whether job ``job_id`` is ``account``'s (and sent as ``message_id``, when given: compared
        without angle brackets or the domain's case, :func:`comparable_message_id`)."""
        found = self.client.hmget(redis_key("job", job_id), ["account", "message_id"])
        found_account, found_id = cast(list[str | None], found)
        if found_account != account:
            return False
        if message_id is None:
            return True
        wanted = comparable_message_id(message_id)
        return wanted is not None and comparable_message_id(found_id) == wanted

    def job_sent_as(self, account: str, message_id: str) -> str | None:
        """The job ``account`` sent as ``message_id``, as its sent mark filed it (marks.py): a
        Message-ID the producer chose. Only this account's entries are read; the caller checks
        the record with :meth:`belongs` (the entry may have outlived its job, or been rewritten)."""
        if comparable_message_id(message_id) is None:
            return None
        return cast(str | None, self.client.get(sent_as_key(account, message_id)))

    def count(self, account: str, what: str, by: int = 1) -> None:
        self.client.hincrby(stats_key(account), what, by)

    def stats(self, account: str) -> dict[str, int]:
        raw = cast(dict[str, str], self.client.hgetall(stats_key(account)))
        return {name: int(value) for name, value in raw.items()}

    def watermark(self, account: str, folder: str, validity: str) -> str:
        """Where the reader is in ``folder``: the position of the last message it is done with
        ("": none yet, or the folder's validity changed: its positions mean other messages now)."""
        raw = self.client.hget(watermark_key(account), folder)
        seen_validity, _, position = str(raw or "").partition(" ")
        return position if raw and seen_validity == validity else ""

    def advance(self, account: str, folder: str, validity: str, position: str) -> None:
        key = watermark_key(account)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, folder, f"{validity} {position}")
            pipe.expire(key, WATERMARK_TTL)
            pipe.execute()
