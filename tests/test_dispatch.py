"""The ready sets and the dispatcher (worker/queue/store/ready.py, worker/queue/pipeline/dispatch.py).

The take script against the real Redis: fair across accounts, bounded by each account's room,
O(what it takes); a real worker sending a backlog in groups with every job keeping its own
fate, no account taking more than its connections can serve, and a slow account's backlog
never in the way of another account's jobs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from support.queue import QueueEnv, Worker, finished, wait_for
from support.smtpd import Rule, SmtpServer
from worker.queue.store.ready import READY_ACCOUNTS, ReadyQueues, ready_key, taken_key


def ready(env: QueueEnv, account: str, n: int, prefix: str = "") -> list[str]:
    ids = [f"{prefix or account}-{i}" for i in range(n)]
    now = time.time()
    for i, job_id in enumerate(ids):
        env.redis.hset(f"postroom:job:{job_id}", mapping={"state": "queued", "account": account})
        env.redis.zadd(ready_key(account), {job_id: now + i})
    env.redis.sadd(READY_ACCOUNTS, account)
    return ids


def test_a_take_is_fair_across_accounts_within_each_ones_room(own_queue: QueueEnv) -> None:
    queues = ReadyQueues(own_queue.redis)
    a, b, c = ready(own_queue, "a", 10), ready(own_queue, "b", 10), ready(own_queue, "c", 2)
    taken = queues.take("h", 9, {"a": 10, "b": 10, "c": 10}, default_room=0)
    assert Counter(account for _, account, _ in taken) == {"a": 4, "b": 3, "c": 2}  # a share each, then fill
    assert [j for j, acc, _ in taken if acc == "a"] == a[:4]  # oldest first within an account
    assert not own_queue.redis.sismember(READY_ACCOUNTS, "c")  # emptied: out of the index
    bounded = queues.take("h", 10, {"a": 1, "b": 0}, default_room=0)
    assert [j for j, _, _ in bounded] == [a[4]]  # b has no room here: its jobs stay for other workers
    assert set(own_queue.redis.hkeys(taken_key("h"))) == {j for j, _, _ in taken + bounded}
    assert own_queue.redis.zcard(ready_key("b")) == 7 and b[3] not in {j for j, _, _ in bounded}
    assert queues.restore("h", [a[0]], cut_short=False) == 1  # given back (a failed group): not counted
    assert own_queue.redis.zscore(ready_key("a"), a[0]) is not None
    assert own_queue.redis.hget(f"postroom:job:{a[0]}", "cut_short") is None
    assert c == [j for j, acc, _ in taken if acc == "c"]


def test_jobs_that_already_waited_their_turn_go_ahead_of_a_backlog(own_queue: QueueEnv) -> None:
    # 2,000 jobs queued before; a dead holder's job, a due retry and a released hold must not wait
    # behind them (minutes at a slow account's pace: the 60 s liveness bound would be missed)
    from worker.queue.store.delays import RETRYING, DelayQueue
    from worker.queue.store.ready import make_ready

    queues = ReadyQueues(own_queue.redis)
    backlog = ready(own_queue, "deep", 2000)
    now = time.time()
    own_queue.redis.zadd(ready_key("deep"), {j: now - 2000 + i for i, j in enumerate(backlog)})  # all older
    [(held, _, _)] = queues.take("dead-holder", 1, {"deep": 1}, default_room=0)
    assert held == backlog[0]
    assert queues.restore("dead-holder", cut_short=True) == 1
    own_queue.redis.hset("postroom:job:retry-1", mapping={"state": "retrying", "account": "deep"})
    own_queue.redis.zadd(RETRYING, {"retry-1": time.time()})  # due now, after the restore
    assert DelayQueue(own_queue.redis).move_due() == ["retry-1"]
    own_queue.redis.hset("postroom:job:hold-1", mapping={"state": "held", "account": "deep"})
    assert make_ready(own_queue.redis, "hold-1", "deep", ["held"])
    first = [j for j, _, _ in queues.take("h", 3, {"deep": 3}, default_room=0)]
    assert first == [held, "retry-1", "hold-1"]  # ahead of the backlog, in the order they came
    assert [j for j, _, _ in queues.take("h", 1, {"deep": 1}, default_room=0)] == [backlog[1]]


def test_a_job_a_live_worker_holds_in_redis_but_runs_nowhere_is_given_back(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # A take or a group cut off by a Redis restart half-way leaves its jobs in the taken set of
    # a process that lives on (so no reaper looks at them) and runs them nowhere: seen so twice
    # by the process's own upkeep, they go back to their ready sets and are sent.
    server = smtp_server(mode="plain")
    account = own_queue.account("strays", server)
    producer = own_queue.producer()
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=1)
    try:
        job_id = producer.send_notification(account, ["s@example.net"], "Stray", "x")
        own_queue.redis.zrem(ready_key(account), job_id)  # as if taken, and the taker lost it
        own_queue.redis.srem(READY_ACCOUNTS, account)
        worker.start()
        holders: list[str] = []

        def beating() -> bool:
            names = [str(h) for h in own_queue.redis.smembers("postroom:holders")]
            holders[:] = [h for h in names if own_queue.redis.exists(f"postroom:holding:{h}:alive")]
            return len(holders) == 1

        wait_for(beating, 30, "the worker process to beat", worker)
        own_queue.redis.hset(taken_key(holders[0]), job_id, f"{account} running")
        sent = finished(producer, job_id, timeout=30)
        assert sent.state == "sent" and len(server.received) == 1
        assert not own_queue.redis.hexists(taken_key(holders[0]), job_id)
    finally:
        worker.stop()
        producer.close()


def test_an_account_unknown_to_the_worker_gets_the_default_room(own_queue: QueueEnv) -> None:
    ready(own_queue, "ghost", 10)
    taken = ReadyQueues(own_queue.redis).take("h", 32, {}, default_room=4)
    assert len(taken) == 4


def test_a_backlog_is_sent_in_groups_and_every_job_keeps_its_own_fate(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # 60 jobs ready before any worker runs; one of them is refused once (451)
    server = smtp_server(mode="plain", rules=[Rule("RCPT", 451, "4.3.0 later", times=1, match="r7@")])
    account = own_queue.account("backlog", server)
    producer = own_queue.producer()
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=1)
    try:
        job_ids = [
            producer.send_notification(account, [f"r{i}@example.net"], f"n {i}", "x") for i in range(60)
        ]
        worker.start()
        wait_for(
            lambda: all((j := producer.job(i)) is not None and j.state == "sent" for i in job_ids),
            60,
            "every job to be sent",
            worker,
        )
        retried = producer.job(job_ids[7])
        assert retried is not None and retried.attempts == 2
        assert all((j := producer.job(i)) is not None and j.attempts == 1 for i in job_ids if i != job_ids[7])
        wait_for(lambda: not any(own_queue.redis.scan_iter(match="postroom:taken:*")), 10, "all let go")
    finally:
        worker.stop()
        producer.close()
    counts = Counter(r.message["Message-ID"] for r in server.received)
    assert len(counts) == 60 and max(counts.values()) == 1
    assert own_queue.redis.zcard(ready_key(account)) == 0


def test_a_slow_accounts_backlog_never_holds_up_another_accounts_jobs(
    own_queue: QueueEnv, smtp_server: Callable[..., SmtpServer], tmp_path: Path
) -> None:
    # one connection taking 1 s per message, 40 of its jobs queued first; then 10 of a fast account
    slow_server = smtp_server(mode="plain", data_delay=1.0)
    fast_server = smtp_server(mode="plain")
    slow = own_queue.account("slow", slow_server, limits={"max_connections": 1})
    fast = own_queue.account("fast", fast_server)
    producer = own_queue.producer()
    worker = Worker(own_queue, tmp_path / "worker.log", concurrency=1).start()
    try:
        for i in range(40):
            producer.send_notification(slow, ["a@example.net"], f"slow {i}", "x")
        wait_for(lambda: len(slow_server.received) >= 1, 20, "the slow account to be under way", worker)
        started = time.monotonic()
        fast_ids = [producer.send_notification(fast, ["b@example.net"], f"fast {i}", "x") for i in range(10)]
        wait_for(
            lambda: all(getattr(producer.job(i), "state", "") == "sent" for i in fast_ids), 20, "fast", worker
        )
        fast_took = time.monotonic() - started
        held = int(own_queue.redis.hlen(next(iter(own_queue.redis.scan_iter(match="postroom:taken:*")))))
    finally:
        worker.stop()
        producer.close()
    assert fast_took < 5, fast_took  # not behind the slow account's 40 seconds of backlog
    assert held <= 4  # at most 4 per connection of the slow account in flight in this process
