"""The Redis inbox's take (worker/queue/broker/inbox.py), on a real Redis: entries move from the read
end of kombu's lists into the holder's inbox one pipelined LMOVE each (no script copies them),
in kombu's read order, a batch about the byte budget, and recover() puts them back as they were.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from support.monitor import monitored
from support.queue import QueueEnv
from worker.queue.broker.inbox import BATCH, BYTE_BUDGET, CHUNK, RedisInbox, inbox_key
from worker.queue.broker.kombu_redis import BrokerKeys


def _entry(n: int, size: int = 10) -> bytes:
    return json.dumps({"n": n, "pad": "x" * size}).encode()


def _numbers(raw: Sequence[bytes | str]) -> list[int]:
    return [int(json.loads(r)["n"]) for r in raw]


def test_entries_are_taken_in_kombus_order_and_held_in_the_inbox(own_queue: QueueEnv) -> None:
    client = redis.Redis("127.0.0.1", 6379, db=own_queue.db)
    keys = BrokerKeys()
    lists = keys.queue_lists("postroom")
    client.lpush(lists[0], *(_entry(n) for n in range(3)))  # read end (right): 0 first
    client.lpush(lists[2], *(_entry(n) for n in range(10, 12)))  # priority 6: after the first list
    inbox = RedisInbox(client, keys, "holder-1")
    taken = inbox.take(0)
    assert _numbers([e.raw for e in taken]) == [0, 1, 2, 10, 11]
    assert _numbers(client.lrange(inbox_key("holder-1"), 0, -1)) == [11, 10, 2, 1, 0]  # newest first
    assert all(client.llen(name) == 0 for name in lists)
    inbox.recover()
    assert client.llen(inbox_key("holder-1")) == 0
    assert _numbers(client.lrange(lists[0], 0, -1))[-1] == 0  # the oldest taken is read first again
    assert sorted(_numbers(client.lrange(lists[0], 0, -1))) == [0, 1, 2, 10, 11]


def test_a_batch_is_bounded_by_count_and_about_the_byte_budget(own_queue: QueueEnv) -> None:
    client = redis.Redis("127.0.0.1", 6379, db=own_queue.db)
    keys = BrokerKeys()
    queue = keys.queue_lists("postroom")[0]
    client.lpush(queue, *(_entry(n) for n in range(BATCH + 20)))
    inbox = RedisInbox(client, keys, "holder-2")
    assert len(inbox.take(0)) == BATCH
    inbox.done()
    client.delete(queue)
    big = BYTE_BUDGET // 5
    client.lpush(queue, *(_entry(n, big) for n in range(60)))
    burst = inbox.take(0)  # larger than any entry seen lately: a chunk's worth at most
    inbox.done()
    assert 1 <= len(burst) <= CHUNK
    for _ in range(3):  # the next batches know the size: one entry past the budget at most
        batch = inbox.take(0)
        inbox.done()
        assert 1 <= len(batch) <= 6
        assert sum(len(e.raw) for e in batch) < BYTE_BUDGET + big + 100
    fresh = RedisInbox(client, keys, "holder-4")  # no entry seen yet: a first guess of 4
    assert 1 <= len(fresh.take(0)) <= 6
    fresh.done()


def test_no_script_touches_an_entry(own_queue: QueueEnv) -> None:
    client = redis.Redis("127.0.0.1", 6379, db=own_queue.db)
    keys = BrokerKeys()
    client.lpush(keys.queue_lists("postroom")[0], *(_entry(n, 50_000) for n in range(4)))
    with monitored(own_queue.db, lambda _, command: command.startswith("DEL"), width=40) as seen:
        inbox = RedisInbox(client, keys, "holder-3")
        assert len(inbox.take(0)) == 4
        inbox.done()
    assert any(line.split(" ", 1)[1].startswith("LMOVE") for line in seen), seen
    assert not [line for line in seen if line.startswith("lua") or " EVAL" in line], seen
