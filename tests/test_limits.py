"""Provider limits across worker processes (worker/transports/limits.py), against real Redis and servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from support.queue import QueueEnv, Worker, wait_for
from support.smtpd import SmtpServer
from worker.client import Producer
from worker.errors import LimitWait
from worker.queue.store.jobrecord import Job
from worker.records.loader import Records
from worker.transports.limits import Limiter

ServerFactory = Callable[..., SmtpServer]


def jobs(producer: Producer, ids: list[str]) -> list[Job]:
    found = [producer.job(i) for i in ids]
    assert all(j is not None for j in found)
    return [j for j in found if j is not None]


def test_two_worker_processes_share_one_accounts_three_connection_cap(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain", data_delay=0.05)
    account = own_queue.account("capped", server, limits={"max_connections": 3})
    producer = own_queue.producer()
    ids = [producer.send_notification(account, [f"r{i}@example.net"], f"m {i}", "x") for i in range(60)]
    workers = [Worker(own_queue, tmp_path / f"w{n}.log", concurrency=4) for n in (1, 2)]
    try:
        for w in workers:
            w.start()
        wait_for(
            lambda: all(j.state == "sent" for j in jobs(producer, ids)), 60, "every job sent", workers[0]
        )
        odd = [(j.attempts, j.history) for j in jobs(producer, ids) if j.attempts != 1]
        assert not odd, odd[:2]
    finally:
        for w in workers:
            w.stop()
        producer.close()
    # each process alone may open 3; together they never had a fourth open at the server
    assert server.peak_open == 3, server.peak_open
    assert len({r.message["Message-ID"] for r in server.received}) == len(server.received) == 60


def test_two_processes_with_backlogs_keep_the_accounts_whole_cap_busy(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Both pools of each account have sends waiting all the time (each process carries its
    part of the backlog from the start, so no new send asks for a while): neither may take
    itself for idle and hand its share to the other, which did the same (one connection each)."""
    server = smtp_server(mode="plain", data_delay=1.0)
    names = [own_queue.account(f"shared{n}", server, limits={"max_connections": 10}) for n in range(4)]
    producer = own_queue.producer()
    ids = [producer.send_notification(names[i % 4], [f"r{i}@example.net"], f"m {i}", "x") for i in range(240)]
    shipped = {"POSTROOM_SOFT_TIME_LIMIT": "300", "POSTROOM_TIME_LIMIT": "360"}  # so: a 20 s slot wait
    workers = [Worker(own_queue, tmp_path / f"w{n}.log", concurrency=16, extra_env=shipped) for n in (1, 2)]
    samples: list[int] = []
    try:
        for w in workers:
            w.start()
        wait_for(lambda: len(server.received) >= 40, 60, "the backlog under way", workers[0])
        deadline = time.monotonic() + 60
        while len(server.received) < 200 and time.monotonic() < deadline:  # the steady part
            samples.append(server.open_now)
            time.sleep(0.2)
        wait_for(lambda: all(j.state == "sent" for j in jobs(producer, ids)), 60, "every job", workers[0])
    finally:
        for w in workers:
            w.stop()
        producer.close()
    samples.sort()
    assert samples and samples[len(samples) // 2] >= 30, samples  # of 40 (4 accounts x 10)
    assert server.peak_open <= 40


def test_a_rate_of_60_a_minute_sends_about_20_in_20_seconds_never_ahead_of_schedule(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account("paced", server, limits={"rate": '"60/minute"'})
    producer = own_queue.producer()
    ids = [producer.send_notification(account, ["a@example.net"], f"m {i}", "x") for i in range(40)]
    worker = Worker(own_queue, tmp_path / "w.log").start()
    try:
        wait_for(lambda: len(server.received) >= 1, 20, "the first delivery", worker)
        first = server.received[0].at
        time.sleep(max(0.0, first + 20.5 - time.time()))
        times = sorted(r.at for r in server.received)
        within = [t for t in times if t <= first + 20.0]
        assert 17 <= len(within) <= 21, len(within)
        # never ahead of the schedule: the k-th send no earlier than k seconds after the first
        early = [(k, round(t - first, 2)) for k, t in enumerate(times) if t < first + k * 1.0 - 0.05]
        assert not early, early
        waiting = [j for j in jobs(producer, ids) if j.state != "sent"]
        assert waiting and all(j.state in ("queued", "retrying", "sending") for j in waiting)
        assert all(j.attempts <= 1 for j in waiting)  # waiting for a slot spends no attempt
    finally:
        worker.stop()
        producer.close()


def test_a_throttled_account_does_not_hold_up_the_others(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    slow = own_queue.account("slow", server, limits={"rate": '"6/minute"'})
    fast = own_queue.account("fast", server)
    producer = own_queue.producer()
    slow_ids = [producer.send_notification(slow, ["s@example.net"], f"s {i}", "x") for i in range(20)]
    fast_ids = [producer.send_notification(fast, ["f@example.net"], f"f {i}", "x") for i in range(20)]
    worker = Worker(own_queue, tmp_path / "w.log", concurrency=2).start()
    try:
        wait_for(
            lambda: all(j.state == "sent" for j in jobs(producer, fast_ids)), 15, "the fast ones", worker
        )
        sent_slow = [j for j in jobs(producer, slow_ids) if j.state == "sent"]
        assert 1 <= len(sent_slow) <= 3
        assert not [j for j in jobs(producer, slow_ids) if j.state == "dead"]
    finally:
        worker.stop()
        producer.close()


def test_the_daily_recipient_budget_holds_jobs_back_without_spending_attempts(
    own_queue: QueueEnv, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(mode="plain")
    account = own_queue.account("budget", server, limits={"daily_recipients": 3})
    producer = own_queue.producer()
    worker = Worker(own_queue, tmp_path / "w.log").start()
    try:
        two = ["a@example.net", "b@example.net"]
        first = producer.send_notification(account, two, "first", "x")
        wait_for(lambda: (j := producer.job(first)) is not None and j.state == "sent", 20, "first", worker)
        second = producer.send_notification(account, two, "second", "x")
        wait_for(
            lambda: (j := producer.job(second)) is not None and j.state == "retrying", 20, "second", worker
        )
        job = producer.job(second)
        assert job is not None and job.attempts == 0
        assert "daily recipient budget of 3" in (job.last_error or "")
        third = producer.send_notification(account, ["c@example.net"], "third", "x")  # one still fits
        wait_for(lambda: (j := producer.job(third)) is not None and j.state == "sent", 20, "third", worker)
        assert [j.state for j in jobs(producer, [second])] == ["retrying"]
        assert len(server.received) == 2
    finally:
        worker.stop()
        producer.close()


def test_connection_slots_of_a_crashed_worker_lapse_and_waiters_are_announced(own_queue: QueueEnv) -> None:
    async def scenario() -> None:
        client: Any = redis.asyncio.Redis.from_url(own_queue.broker_url, decode_responses=True)
        try:
            limiter = Limiter(client)
            await limiter.acquire_slot("acct", 2, "a", user="worker-1")
            await limiter.acquire_slot("acct", 2, "b", user="worker-1")
            with pytest.raises(LimitWait):
                await limiter.acquire_slot("acct", 2, "c", wait=0.2, user="worker-2")
            # two pools want the account's slots (an even share each), and one of them waits
            assert await limiter.renew_slots("acct", ["a"], "worker-1") == (2, True)
            # "b"'s worker died: its lease is not renewed and runs out
            await client.zadd("postroom:slots:acct", {"b": time.time() - 1})
            await limiter.acquire_slot("acct", 2, "c", wait=0.2, user="worker-2")
            assert await limiter.slots_in_use("acct") == 2
            await limiter.release_slot("acct", "a")
            assert await limiter.slots_in_use("acct") == 1
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_pool_that_gave_its_connections_to_another_worker_takes_one_again(
    own_queue: QueueEnv, smtp_server: ServerFactory
) -> None:
    """An idle pool hands its connections over when another worker waits for the account's
    slots; once the other is done, the first pool must open one again when a send comes."""
    from worker.transports.base import OutgoingMessage
    from worker.transports.smtp.pool import SmtpTransport

    server = smtp_server(mode="plain")
    own_queue.account("handover", server, limits={"max_connections": 1})
    account = Records.load(own_queue.accounts, own_queue.config).account("handover")

    def mail(n: int) -> OutgoingMessage:
        data = f"Message-ID: <handover-{n}@example.com>\r\nSubject: {n}\r\n\r\nbody\r\n".encode()
        return OutgoingMessage(
            f"<handover-{n}@example.com>", "handover@example.com", ("r@example.net",), data
        )

    async def scenario() -> None:
        client: Any = redis.asyncio.Redis.from_url(own_queue.broker_url, decode_responses=True)
        first = SmtpTransport(account, limiter=Limiter(client, slot_wait=10))
        second = SmtpTransport(account, limiter=Limiter(client, slot_wait=10))
        try:
            await first.send(mail(1))  # its connection stays open, idle
            await asyncio.sleep(3.5)  # no demand lately: it gives the connection up when asked
            await asyncio.wait_for(second.send(mail(2)), 8)
            assert first.open_connections == 0
            await second.aclose()
            await asyncio.wait_for(first.send(mail(3)), 5)
        finally:
            await first.aclose()
            await second.aclose()
            await client.aclose()

    asyncio.run(scenario())
    assert [r.message["Subject"] for r in server.received] == ["1", "2", "3"]
    assert server.peak_open == 1


def test_a_dead_connection_no_send_holds_gives_its_slot_back(
    own_queue: QueueEnv, smtp_server: ServerFactory
) -> None:
    """A connection whose socket is gone, waiting in no idle list and held by no send (the
    state a Redis restart followed by the server's left pools in: every slot of the account
    leased by dead connections for about a minute) must not keep its slot lease renewed."""
    from worker.transports.base import OutgoingMessage
    from worker.transports.smtp.pool import SmtpTransport

    server = smtp_server(mode="plain")
    own_queue.account("strays", server, limits={"max_connections": 1})
    account = Records.load(own_queue.accounts, own_queue.config).account("strays")
    data = b"Message-ID: <stray-1@example.com>\r\nSubject: 1\r\n\r\nbody\r\n"
    mail = OutgoingMessage("<stray-1@example.com>", "strays@example.com", ("r@example.net",), data)

    async def scenario() -> None:
        client: Any = redis.asyncio.Redis.from_url(own_queue.broker_url, decode_responses=True)
        pool = SmtpTransport(account, limiter=Limiter(client, slot_wait=10))
        try:
            await pool.send(mail)  # its connection stays open, idle, holding the account's slot
            assert await client.zcard("postroom:slots:strays") == 1
            (conn,) = pool._idle  # the stray: out of the idle list and the count, socket gone
            pool._idle.remove(conn)
            pool._count -= 1
            conn.client.close()
            await asyncio.sleep(1.0)
            assert await client.zcard("postroom:slots:strays") == 0
            assert pool._live == {}
        finally:
            await pool.aclose()
            await client.aclose()

    asyncio.run(scenario())


def _stretching(own_queue: QueueEnv, server: SmtpServer, name: str, each: int, then: int) -> float:
    """Two pools of account ``name`` (cap ``2 x each``) open ``each`` connections apiece; then
    the first sends ``then`` more while the second sits idle. Returns how long those took."""
    from worker.transports.base import OutgoingMessage
    from worker.transports.smtp.pool import SmtpTransport

    own_queue.account(name, server, limits={"max_connections": 2 * each})
    account = Records.load(own_queue.accounts, own_queue.config).account(name)

    def mail(n: int) -> OutgoingMessage:
        data = f"Message-ID: <{name}-{n}@example.com>\r\nSubject: {n}\r\n\r\nbody\r\n".encode()
        return OutgoingMessage(f"<{name}-{n}@example.com>", "stretch@example.com", ("r@example.net",), data)

    async def scenario() -> float:
        client: Any = redis.asyncio.Redis.from_url(own_queue.broker_url, decode_responses=True)
        first = SmtpTransport(account, limiter=Limiter(client, slot_wait=10))
        second = SmtpTransport(account, limiter=Limiter(client, slot_wait=10))
        try:
            pools = [first] * each + [second] * each
            await asyncio.gather(*(pool.send(mail(n)) for n, pool in enumerate(pools)))
            assert (first.open_connections, second.open_connections) == (each, each)
            started = time.monotonic()
            more = range(len(pools), len(pools) + then)
            await asyncio.wait_for(asyncio.gather(*(first.send(mail(n)) for n in more)), 10)
            return time.monotonic() - started
        finally:
            await first.aclose()
            await second.aclose()
            await client.aclose()

    took = asyncio.run(scenario())
    assert len(server.received) == 2 * each + then
    assert server.peak_open <= 2 * each  # the account's cap held throughout
    return took


def test_a_pool_with_waiting_sends_gets_the_slot_another_pools_idle_connection_sits_on(
    own_queue: QueueEnv, smtp_server: ServerFactory
) -> None:
    """Two pools share an account's two connections, one each. The second runs out of work;
    the first still has three messages for a server that takes 1 s each. The second's idle
    connection must go to the first (its waiting send asks past its share, the idle connection
    gives its slot up), so two go at once: about 2 s for the three, not 3 s on one connection."""
    took = _stretching(own_queue, smtp_server(mode="plain", data_delay=1.0), "stretch", 1, 3)
    assert took < 2.7, f"three 1 s messages took {took:.1f} s: the idle connection's slot never moved"


def test_every_waiting_send_of_a_pool_stretches_into_another_pools_idle_slots(
    own_queue: QueueEnv, smtp_server: ServerFactory
) -> None:
    """Two pools share an account's four connections, two each; the second runs out of work
    while the first has four messages for a server that takes 1.5 s each. Both of its waiting
    sends must move into the second's idle slots within a fraction of a second: the one that
    watched for a slot hands the watch on when it leaves (else the other waits POOL_RECHECK
    before anyone looks again, and the four take ~2.6 s instead of ~1.8)."""
    took = _stretching(own_queue, smtp_server(mode="plain", data_delay=1.5), "stretch4", 2, 4)
    assert took < 2.3, f"four 1.5 s messages on 2 + 2 idle connections took {took:.1f} s"
