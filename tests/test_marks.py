"""Sent marks against a real Redis: what a later attempt reads back, and marks written together.

A sent mark is what stops a second attempt from sending to a recipient the server already
accepted; the claim released with it lets the next attempt of that Message-ID go ahead. The
loop side writes the marks of sends that finish while a write is under way in one command
(group commit), so these tests check both the contents and the grouping.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

from support.queue import QueueEnv
from worker.errors import RecipientStatus
from worker.mail.message import comparable_message_id
from worker.queue.store.jobs import JobStore
from worker.queue.store.marks import FENCE_FRESH, AsyncMarks, Fence, fence_clock

SENT = RecipientStatus("sent", 250, "ok")


def test_marks_written_together_each_keep_their_recipients_and_release_only_their_own_claims(
    own_queue: QueueEnv,
) -> None:
    store = JobStore(own_queue.redis)
    claims = [("acct", "<m1@x>", "t1"), ("acct", "<m2@x>", "t2"), ("acct", "<m3@x>", "t3")]
    assert [claimed for claimed, _ in store.claim_many(claims, 60)] == [True, True, True]
    store.mark_many(
        [
            ("acct", "<m1@x>", {"a@x": SENT, "b@x": SENT}, "t1", "job-1"),
            ("acct", "<m2@x>", {}, "t2", "job-2"),  # nothing accepted: the claim still goes
            ("acct", "<m3@x>", {"c@x": SENT}, "someone-else", "job-3"),  # not this token's claim: it stays
        ]
    )
    again = store.claim_many(
        [("acct", "<m1@x>", "u1"), ("acct", "<m2@x>", "u2"), ("acct", "<m3@x>", "u3")], 60
    )
    (c1, d1), (c2, d2), (c3, d3) = again
    assert (c1, c2, c3) == (True, True, False)
    assert sorted(d1) == ["a@x", "b@x"] and d1["a@x"]["code"] == 250
    assert d2 == {}
    assert list(d3) == ["c@x"]


def test_a_sent_mark_files_its_job_under_its_account_and_message_id_for_as_long_as_the_record(
    own_queue: QueueEnv,
) -> None:
    """The bounce reader finds the job of a Message-ID the producer chose by this entry (contract
    §11): written by the sent mark's own script (no round trip more), one key per accepted
    message, per account, and kept longer than the job's record (job_ttl), never shorter."""
    store = JobStore(own_queue.redis, job_ttl=3600)
    assert store.sent_as_ttl > 3600
    store.mark_many(
        [
            ("acct", "<Order-7@Shop.Example>", {"a@x": SENT}, "t1", "job-1"),
            ("other", "<Order-7@Shop.Example>", {"a@x": SENT}, "t2", "job-2"),  # another account's
            ("acct", "<refused@shop.example>", {}, "t3", "job-3"),  # accepted for nobody: no report
            ("acct", "<job-4@shop.example>", {"a@x": SENT}, "t4", "job-4"),  # Postroom's own: named
        ]
    )
    redis = own_queue.redis
    # the domain is compared without case; the left part as written
    assert redis.get("postroom:sent-as:acct:<Order-7@shop.example>") == "job-1"
    assert redis.get("postroom:sent-as:other:<Order-7@shop.example>") == "job-2"
    assert redis.get("postroom:sent-as:acct:<refused@shop.example>") is None
    assert redis.get("postroom:sent-as:acct:<job-4@shop.example>") is None  # costs no memory
    assert 3600 < redis.ttl("postroom:sent-as:acct:<Order-7@shop.example>") <= store.sent_as_ttl
    assert redis.ttl("postroom:delivered:acct:<Order-7@Shop.Example>") <= 3600


def test_message_ids_compare_without_angle_brackets_or_the_domains_case() -> None:
    assert comparable_message_id("<Order-7@Shop.Example>") == "<Order-7@shop.example>"
    assert comparable_message_id(" Order-7@SHOP.example ") == "<Order-7@shop.example>"
    assert comparable_message_id("<order-7@shop.example>") != comparable_message_id("<Order-7@shop.example>")
    assert comparable_message_id("<a@[192.0.2.1]>") == "<a@[192.0.2.1]>"
    for nothing in (None, "", "<>", "no-at-sign", "<a b@x>", "@x", "a@", "<a@x"):
        assert comparable_message_id(nothing) is None, nothing


def test_marks_that_wait_for_a_write_go_in_one_command_and_every_caller_hears_it_done(
    own_queue: QueueEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(own_queue.redis)
    ids = [f"<g{n}@x>" for n in range(40)]
    store.claim_many([("acct", m, f"t-{m}") for m in ids], 60)
    own_queue.redis.script_flush()  # a Redis that lost its scripts (a restart) has them loaded again
    replies = 0  # one per command Redis ran for the loop-side client (a pipeline reads one each)
    read_response = redis.asyncio.connection.AbstractConnection.read_response

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal replies
        replies += 1
        return await read_response(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "read_response", counted)

    async def mark(marks: AsyncMarks, message_id: str) -> None:
        await marks.mark_delivered("acct", message_id, {"r@x": SENT}, f"t-{message_id}", f"job-{message_id}")

    async def scenario() -> None:
        nonlocal replies
        marks = AsyncMarks(own_queue.broker_url, 60)
        try:
            await marks.redis.ping()  # connected: the handshake's replies are not the marks'
            replies = 0
            first = asyncio.gather(*(mark(marks, m) for m in ids[:20]))
            await asyncio.sleep(0)  # the first write is under way; these wait for the next
            rest = asyncio.gather(*(mark(marks, m) for m in ids[20:]))
            await asyncio.wait_for(asyncio.gather(first, rest), 10)
        finally:
            await marks.aclose()

    asyncio.run(scenario())
    # two writes, plus the script load and the retry after the flush (40 or more without grouping)
    assert replies <= 4, f"40 marks took {replies} commands"
    again = store.claim_many([("acct", m, "next") for m in ids], 60)
    assert all(claimed and list(delivered) == ["r@x"] for claimed, delivered in again)
    # each mark filed its own job under its Message-ID (the bounce reader's lookup)
    filed = own_queue.redis.mget([f"postroom:sent-as:acct:{m}" for m in ids])
    assert filed == [f"job-{m}" for m in ids]


def test_the_fence_asks_redis_after_a_wait_and_says_no_once_another_attempt_holds_the_claim(
    own_queue: QueueEnv,
) -> None:
    store = JobStore(own_queue.redis)
    assert store.claim_many([("acct", "<f1@x>", "mine")], 60)[0][0]

    async def scenario() -> tuple[bool, bool, bool, bool]:
        marks = AsyncMarks(own_queue.broker_url, 60)
        try:
            fresh = Fence(marks, "acct", "<f1@x>", "mine", fence_clock())
            waited = Fence(marks, "acct", "<f1@x>", "mine", fence_clock() - FENCE_FRESH - 1)
            ours = await waited()  # asked Redis: the claim is still this attempt's
            own_queue.redis.set("postroom:claim:acct:<f1@x>", "a later attempt")  # ours lapsed, taken
            stale = Fence(marks, "acct", "<f1@x>", "mine", fence_clock() - 60)  # woken after a freeze
            return await fresh(), ours, await waited(), await stale()
        finally:
            await marks.aclose()

    fresh, ours, asked_just_now, woken = asyncio.run(scenario())
    assert fresh and ours  # the claim answered a moment ago stands; after a wait Redis said yes
    assert asked_just_now  # its answer a moment ago stands too (nobody can take a held claim)
    assert not woken  # after the freeze: Redis says another attempt holds it
