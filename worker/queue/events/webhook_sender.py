"""The webhook sender: each worker's main process delivers the outbox's due events.

It runs in a thread of its own with its own event loop and its own httpx clients (one per
webhook), so a slow or hostile receiver never delays mail: at most ``webhook_concurrency``
requests in flight, each given ``webhook_timeout`` seconds, redirects not followed, answers
not read beyond the status line. Every request is signed per Standard Webhooks
(``webhook-id`` = the event id, the same on every retry; ``webhook-timestamp`` = now;
``webhook-signature: v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``).

Deliveries are taken from the outbox with a lease (worker/queue/events/outbox.py): a sender killed
mid-request leaves its deliveries to be taken again when the lease ends. A non-2xx answer,
a timeout or a refused connection is retried after 5 s, doubling to an hour, until the
delivery is ``webhook_give_up_after`` old (24 h by default); then it is ``failed`` (and
``postroom webhooks replay`` can send it again). The sender also publishes the routing
table from ``config/webhooks/`` (re-read when a file changes) that the job store's scripts
file events by.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis.asyncio

from worker.db import connect
from worker.db.keys import REDIS_TIMEOUTS
from worker.errors import ConfigurationError
from worker.queue.broker.process_state import Background, this_process
from worker.queue.events.outbox import (
    DONE_SCRIPT,
    LOG_LIMIT,
    TAKE_SCRIPT,
    event_body,
    log_key,
    parse_event,
    routes_table,
    stats_key,
)
from worker.queue.store.emit import ROUTES, delivery_key, due_key, event_key
from worker.records.loader import RecordCache, load_webhooks
from worker.records.webhooks import Webhook, key_bytes
from worker.settings import Settings, webhooks_dir
from worker.transports.public_http import public_transport

log = logging.getLogger("postroom.webhooks")
LEASE = 120.0  # seconds a taken delivery is this sender's before another may take it again
POLL = 0.5  # seconds between looks at the due deliveries when there is nothing to do
PUBLISH_EVERY = 30.0  # the routing table is written again this often (a flushed Redis gets it back)
FIRST_RETRY, LAST_RETRY = 5.0, 3600.0


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of Standard Webhooks (v1, HMAC-SHA256)."""
    mac = hmac.new(key_bytes(secret), f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 5 s doubling to 1 h, ±10 %."""
    base = min(FIRST_RETRY * float(2 ** min(max(attempts - 1, 0), 20)), LAST_RETRY)
    return base * random.uniform(0.9, 1.1)


@dataclass
class Attempt:
    status: int | None
    error: str
    ms: int

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender(Background):
    thread_name = "postroom-webhooks"

    def __init__(self, state_url: str, config_dir: Path, settings: Settings) -> None:
        super().__init__()
        self.state_url = state_url
        self.config_dir = config_dir
        self.settings = settings
        self._hooks: dict[str, Webhook] = {}
        self._records = RecordCache(lambda: [webhooks_dir(config_dir)], self._load)
        self._published = 0.0
        self._turn = 0
        self._clients: dict[str, tuple[Webhook, httpx.AsyncClient]] = {}

    def _main(self) -> None:
        asyncio.run(self.run())

    async def run(self) -> None:
        client = connect.async_client(self.state_url, decode_responses=True, **REDIS_TIMEOUTS)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while not self._stop.is_set():
                taken = 0
                try:
                    await self._refresh(client)
                    taken = await self._take(client, in_flight)
                except Exception as exc:  # Redis away, a record unreadable: next time
                    log.warning("webhooks: %s", exc)
                await asyncio.sleep(0.05 if taken else POLL)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await self.aclose_clients()
            await client.aclose()

    async def aclose_clients(self) -> None:
        clients, self._clients = self._clients, {}
        for _hook, http in clients.values():
            await http.aclose()

    def _load(self) -> dict[str, Webhook]:
        hooks, problems = load_webhooks(self.config_dir)
        for name, found in problems.items():
            log.error("webhook %s not used: %s", name, "; ".join(str(p) for p in found))
        return hooks

    async def _refresh(self, client: redis.asyncio.Redis) -> None:
        """Re-read config/webhooks/ when a file changed; publish the routing table then (and
        every PUBLISH_EVERY seconds)."""
        now = time.monotonic()
        hooks = self._records.get()
        if hooks is not self._hooks:  # read again: publish the new table now
            self._hooks, self._published = hooks, 0.0
        if now - self._published >= PUBLISH_EVERY:
            table = routes_table({name: hook.route() for name, hook in self._hooks.items()})
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(ROUTES)
                if table:
                    pipe.hset(ROUTES, mapping=table)
                await pipe.execute()
            self._published = now

    async def _take(self, client: redis.asyncio.Redis, in_flight: set[asyncio.Task[None]]) -> int:
        taken = 0
        hooks = list(self._hooks.items())
        self._turn = (self._turn + 1) % max(len(hooks), 1)  # who is asked first goes round: no starving
        for name, hook in hooks[self._turn :] + hooks[: self._turn]:
            free = self.settings.webhook_concurrency - len(in_flight)
            if free <= 0:
                break
            ids = await client.eval(TAKE_SCRIPT, 1, due_key(name), time.time(), LEASE, free)
            for event_id in ids:
                task = asyncio.create_task(self._deliver(client, hook, str(event_id)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            taken += len(ids)
        return taken

    async def _http(self, hook: Webhook) -> httpx.AsyncClient:
        cached = self._clients.get(hook.name)
        if cached is not None and cached[0] == hook:
            return cached[1]
        if cached is not None:
            await cached[1].aclose()
        http = httpx.AsyncClient(
            transport=public_transport(
                allow_private=hook.record.allow_private, max_connections=self.settings.webhook_concurrency
            ),
            timeout=httpx.Timeout(self.settings.webhook_timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": "Postroom-Webhooks/1"},
        )
        self._clients[hook.name] = (hook, http)
        return http

    async def _deliver(self, client: redis.asyncio.Redis, hook: Webhook, event_id: str) -> None:
        try:
            await self._attempt(client, hook, event_id)
        except Exception as exc:  # Redis away: the lease ends and it is taken again, same webhook-id
            log.warning("webhook=%s event=%s: not recorded (%s); taken again later", hook.name, event_id, exc)

    async def _attempt(self, client: redis.asyncio.Redis, hook: Webhook, event_id: str) -> None:
        name = hook.name
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(event_key(event_id))
            pipe.hmget(delivery_key(name, event_id), ["created_at", "attempts"])
            raw, (created, attempts) = await pipe.execute()
        event = parse_event(raw)
        if event is None:
            result = Attempt(None, "the event is no longer kept (webhook_retention) or unreadable", 0)
        else:
            result = await self._post(hook, event_id, event_body(event))
        now = time.time()
        tries = int(attempts or 0) + 1
        age = now - float(created or now)
        if result.ok:
            outcome = "delivered"
        elif event is None or age >= self.settings.webhook_give_up_after:
            outcome = "failed"
        else:
            outcome = "retry"
        next_at = now + retry_delay(tries) if outcome == "retry" else 0.0
        event = event or {}
        entry = {
            "event_id": event_id, "type": event.get("type"), "job_id": event.get("job_id"),
            "account": event.get("account"), "attempt": tries, "at": now, "status": result.status,
            "error": result.error, "ms": result.ms, "outcome": outcome,
            **({"next_at": round(next_at, 1)} if next_at else {}),
        }  # fmt: skip
        keys = [delivery_key(name, event_id), due_key(name), log_key(name), stats_key(name)]
        retention = max(int(self.settings.webhook_retention), 60)
        args: list[str | float] = [event_id, now, outcome, next_at, json.dumps(entry), LOG_LIMIT,
                                   result.status or "", result.error, retention]  # fmt: skip
        await client.eval(DONE_SCRIPT, len(keys), *keys, *args)
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "webhook=%s event=%s attempt=%d outcome=%s status=%s%s", name, event_id, tries,
                outcome, result.status, f" error={result.error!r}" if result.error else "")  # fmt: skip

    async def _post(self, hook: Webhook, event_id: str, body: bytes) -> Attempt:
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": event_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(hook.record.secret.reveal(), event_id, timestamp, body),
            }
            async with asyncio.timeout(self.settings.webhook_timeout * 2):  # a receiver dripping bytes
                http = await self._http(hook)
                async with http.stream("POST", hook.url, content=body, headers=headers) as reply:
                    status = reply.status_code
        except ConfigurationError as exc:
            return Attempt(None, f"secret: {exc}", took())
        except (httpx.TimeoutException, TimeoutError):
            return Attempt(None, f"no answer within {self.settings.webhook_timeout:g}s", took())
        except httpx.HTTPError as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}"[:300], took())
        error = "" if 200 <= status < 300 else f"HTTP {status}"
        return Attempt(status, error, took())


def start_sender(state_url: str, config_dir: Path, settings: Settings) -> WebhookSender:
    """This process's sender, started once."""
    return this_process().once(
        "webhook-sender", lambda: WebhookSender(state_url, config_dir, settings).start()
    )


def stop_sender() -> None:
    sender = this_process().drop("webhook-sender")
    if sender is not None:
        sender.stop()
