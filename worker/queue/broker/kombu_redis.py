"""The one module that knows kombu's Redis transport from the inside.

Postroom reads and writes kombu's own structures in three places — its inbox
(:mod:`worker.queue.broker.inbox` takes raw entries from the ``postroom`` lists),
the reaper (:mod:`worker.queue.process.liveness` restores a dead worker's unacknowledged
control messages) and ``postroom status`` (queue depths, messages in flight) — and
it guards kombu's read of a raw queue entry (Celery's consumer, on the control queue).
Everything those need to know about kombu's private layout lives here, so a kombu
upgrade is checked in one file:

- key names: the unacknowledged hash and index (transport options
  ``unacked_key`` / ``unacked_index_key``), the priority sub-queues
  (``<queue>\\x06\\x16<priority>``) and the ``global_keyprefix`` in front of
  every one of them;
- the envelope kombu stores for a message (a JSON object with ``body``,
  ``properties.delivery_tag``, ``properties.delivery_info.{exchange,
  routing_key}``, ``headers``) and the ``[envelope, exchange, routing_key]``
  triple of the unacknowledged hash;
- :class:`GuardedTransport`, kombu's Redis transport whose channel refuses,
  instead of crashing on, a queue entry it cannot turn into a message: a
  non-JSON entry, or one without the properties kombu files it by, would
  otherwise raise inside the worker's event loop ("Unrecoverable error") after
  ``BRPOP`` already removed it from the queue. The entry goes to
  :data:`UNREADABLE` (Postroom's dead letters, see :mod:`worker.queue.broker.intake`) and
  the worker reads the next one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger("postroom.broker")

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: <queue><sep><priority> sub-queues
PRIORITY_STEPS = (0, 3, 6, 9)

# Called with (raw entry, reason, queue) for an entry kombu cannot deliver; set by worker.queue.broker.intake.
# It must record the entry durably or raise (the entry is then put back at the end of the queue).
Unreadable = Callable[[bytes, str, str], None]
UNREADABLE: list[Unreadable] = []


@dataclass(frozen=True)
class BrokerKeys:
    """The Redis keys kombu's Redis transport uses, as they are stored (prefix applied)."""

    prefix: str = ""
    unacked: str = "unacked"
    unacked_index: str = "unacked_index"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> BrokerKeys:
        """From Celery's ``broker_transport_options`` (kombu's defaults where they say nothing)."""
        options = options or {}
        prefix = str(options.get("global_keyprefix") or "")
        return cls(
            prefix=prefix,
            unacked=prefix + str(options.get("unacked_key") or "unacked"),
            unacked_index=prefix + str(options.get("unacked_index_key") or "unacked_index"),
        )

    def queue_lists(self, queue: str) -> list[str]:
        """The Redis lists of ``queue``, in the order kombu reads them (priority 0 first)."""
        return [self.prefix + (queue if not pri else f"{queue}{PRIORITY_SEP}{pri}") for pri in PRIORITY_STEPS]


def _shape_problem(envelope: Any) -> str | None:
    """Why this decoded queue entry is not shaped as kombu's envelope (None: it is)."""
    if not isinstance(envelope, dict):
        return f"not a kombu message (a JSON {type(envelope).__name__}, not an object)"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "not a kombu message (no properties)"
    if not isinstance(properties.get("delivery_tag"), str) or not properties["delivery_tag"]:
        return "not a kombu message (no delivery tag)"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not isinstance(info.get("exchange", None), str):
        return "not a kombu message (no delivery_info.exchange)"
    if not isinstance(info.get("routing_key"), str):
        return "not a kombu message (no delivery_info.routing_key)"
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "not a kombu message (headers are not an object)"
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        return "not a kombu message (body is not a string)"
    return None


def _body_bytes(envelope: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The message body as bytes, base64 decoded once (a 100 KB body costs a decode per copy)."""
    body = envelope.get("body") or ""
    if body and (envelope.get("properties") or {}).get("body_encoding") == "base64":
        try:
            return base64.b64decode(body, validate=True), None
        except (binascii.Error, ValueError):
            return None, "body is not valid base64"
    return str(body).encode(), None


def envelope_problem(envelope: Any) -> str | None:
    """Why kombu could not deliver this decoded queue entry (None: it can)."""
    return _shape_problem(envelope) or _body_bytes(envelope)[1]


def read_message(raw: bytes | str) -> tuple[dict[str, Any] | None, bytes | None, str | None]:
    """A raw queue entry as (kombu's envelope, its body as bytes, None), or (None, None, why it
    is unreadable)."""
    try:
        envelope = json.loads(bytes_to_str(raw))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, None, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})"
    problem = _shape_problem(envelope)
    if problem is not None:
        return None, None, problem
    body, problem = _body_bytes(envelope)
    return (None, None, problem) if problem else (envelope, body, None)


def read_entry(raw: bytes | str) -> tuple[dict[str, Any] | None, str | None]:
    """A raw queue entry as kombu's envelope, or (None, why it is unreadable)."""
    envelope, _, problem = read_message(raw)
    return envelope, problem


def unacked_envelope(value: bytes | str) -> dict[str, Any] | None:
    """The message inside one value of the unacknowledged hash (``[envelope, exchange, key]``)."""
    try:
        entry = json.loads(bytes_to_str(value))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(entry, list) and entry and isinstance(entry[0], dict):
        return entry[0]
    return None


def delivered_tags(consumer: Any) -> list[str] | None:
    """The delivery tags a Celery consumer holds unacknowledged right now (kombu's virtual QoS
    keeps them in ``_delivered``: prefetched, running, and waiting for an ETA), or None when
    its transport keeps no such table (then nothing can be said about what it holds)."""
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None)
    if not isinstance(delivered, dict):
        return None
    for _ in range(5):  # the consumer's thread may change it while it is copied
        try:
            return [str(tag) for tag in list(delivered)]
        except RuntimeError:
            continue
    return None


# KEYS: unacked hash, unacked index, the list to restore to. ARGV: tag, the message flagged
# redelivered. Only an entry still unacknowledged is restored (its holder may have acked it).
_RESTORE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[2])
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""


def restore_unacked(client: Any, keys: BrokerKeys, tags: list[str]) -> int:
    """Put unacknowledged messages back at the head of their queues, flagged ``redelivered``,
    as kombu's own restore does (``Channel._do_restore_message``); returns how many."""
    script = client.register_script(_RESTORE)
    restored = 0
    for tag in tags:
        raw = client.hget(keys.unacked, tag)
        if raw is None:
            client.zrem(keys.unacked_index, tag)
            continue
        try:
            envelope, _exchange, routing_key = json.loads(bytes_to_str(raw))
            envelope["headers"]["redelivered"] = True
            envelope["properties"]["delivery_info"]["redelivered"] = True
            priority = max(0, min(9, int(envelope["properties"].get("priority") or 0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.error("unacknowledged entry %s is unreadable; left for kombu's own restore", tag)
            continue
        step = max(p for p in PRIORITY_STEPS if p <= priority)
        queue = keys.prefix + (routing_key if not step else f"{routing_key}{PRIORITY_SEP}{step}")
        restored += int(
            script(keys=[keys.unacked, keys.unacked_index, queue], args=[tag, json.dumps(envelope)])
        )
    return restored


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel, with every entry read from a queue screened before kombu sees it,
    and one synchronous Redis client per channel instead of a new one for every ack, reject
    and restore (kombu 5.x builds a ``redis.Redis`` each time it needs one: about 8 % of a
    threads worker's GIL time went to that; the client is thread-safe, its pool is kombu's)."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        create = kombu_redis.Channel._create_client  # type: ignore[attr-defined]  # private in kombu
        if asynchronous:
            return create(self, asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = create(self)
        return client

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.x's Channel._brpop_read, with the entry screened (see the module docstring)
        self_: Any = self  # kombu's private attributes are not in its type stubs
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self_.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self_._queue_cycle.rotate(dest)
                envelope = self._admit(item, dest)
                if envelope is not None:
                    self.connection._deliver(envelope, dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        self_: Any = self
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self_._q_for_pri(queue, pri))
                if item:
                    self_._maybe_update_queues_expire(client, queue)
                    envelope = self._admit(item, queue)
                    if envelope is not None:
                        return envelope
                    raise Empty()
            self_._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _admit(self, item: bytes, queue: str) -> dict[str, Any] | None:
        envelope, problem = read_entry(item)
        if envelope is not None:
            return envelope
        raw = item if isinstance(item, bytes) else str(item).encode()
        log.error(
            "queue %s: unreadable entry (%d bytes): %s; moved to the dead letters", queue, len(raw), problem
        )
        try:
            for record in UNREADABLE:
                record(raw, problem or "unreadable", queue)
        except Exception:
            # not recorded: back at the far end of its queue (read after everything else), never lost
            self_: Any = self
            with self.conn_or_acquire() as client:
                client.lpush(self_._q_for_pri(queue, 0), raw)
            raise
        return None


class GuardedTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`GuardedChannel` (``broker_transport`` for redis URLs)."""

    Channel = GuardedChannel


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """The same guard on kombu's Sentinel channel (its pool asks the sentinels for the master)."""


class GuardedSentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with :class:`GuardedSentinelChannel` (``sentinel://`` URLs)."""

    Channel = GuardedSentinelChannel


GUARDED_TRANSPORT = f"{__name__}:GuardedTransport"
GUARDED_SENTINEL_TRANSPORT = f"{__name__}:GuardedSentinelTransport"


def install() -> None:
    """Make kombu's ``redis://``, ``rediss://`` and ``redis+socket://`` URLs use
    :class:`GuardedTransport` in this process (kombu resolves a URL's scheme through its alias
    table; Celery's ``broker_transport`` setting would be overridden by ``redis+socket``)."""
    from kombu import transport

    cache: dict[str | None, Any] = getattr(transport, "_transport_cache", {})
    for alias in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[alias] = GUARDED_TRANSPORT
        cache.pop(alias, None)
    transport.TRANSPORT_ALIASES["sentinel"] = GUARDED_SENTINEL_TRANSPORT
    cache.pop("sentinel", None)
