"""What differs between the brokers Postroom runs on (contract §9), in one place.

- **Redis** (``redis://``, ``rediss://``, ``unix://``) and **Sentinel** (``sentinel://h:p[;…]/DB``
  with ``POSTROOM_SENTINEL_MASTER``): kombu's Redis transport, whose structures Postroom reads
  (worker/queue/broker/kombu_redis.py) for coalescing, the sweep, the reaper and ``postroom status``.
- **RabbitMQ** (``amqp://``): ``postroom`` is declared as every Celery client declares it
  (durable, no arguments: its type is the vhost's default) unless it exists, else used as it
  is; dead-lettering to ``postroom.poison`` and the delivery limit are the policy ``postroom
  queues declare`` sets (worker/queue/broker/rabbitmq.py). Publisher confirms; depth read from the
  broker; a killed worker's messages come back when its connection drops (no reaper); the sweep
  looks only for jobs recorded but never published; no coalescing (a basic.get per message
  costs more than it saves).

:func:`celery_config` is what the worker's app and every producer configure;
:func:`broker_view` is what ``status`` and the sweep read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from amqp import exceptions as amqp_errors
from kombu import Exchange, Queue

from worker.db import connect
from worker.db.keys import REDIS_TIMEOUTS
from worker.mail.payload import CONTROL_QUEUE, QUEUE
from worker.queue.broker.kombu_redis import PRIORITY_STEPS, BrokerKeys
from worker.settings import Settings, broker_kind, redis_url, sentinel_master

POISON_QUEUE = f"{QUEUE}.poison"
_CHUNK = 500


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "visibility_timeout": settings.visibility_timeout,
        # how often a worker looks for messages a dead worker left unacknowledged
        # (kombu's default, interval x throttle, is ~100 s on top of the timeout)
        "unacked_restore_interval": max(1, min(60, round(settings.visibility_timeout / 10))),
        "unacked_restore_throttle": 1,
        "socket_timeout": 15,
        "socket_connect_timeout": 10,
        "retry_on_timeout": True,
        "health_check_interval": 30,
    }


def ensure_queue(channel: Any, name: str) -> bool:
    """Declare ``name`` as every Celery client does (durable, no arguments) unless it exists, else
    use it as it is: RabbitMQ refuses a declaration unlike the first. True: declared now. On
    channels of their own: a 404 or 406 closes the channel, and ``channel`` is the caller's."""
    for passive in (True, False):
        probe = channel.connection.channel()
        try:
            probe.queue_declare(name, passive=passive, durable=True, auto_delete=False)
            return not passive
        except amqp_errors.NotFound:  # not there: declare it
            continue
        except amqp_errors.PreconditionFailed:  # another client declared it first, otherwise
            return False
        finally:
            if probe.is_open:
                probe.close()
    return False


class SharedQueue(Queue):
    """A queue other clients may declare first (:func:`ensure_queue`), with its exchange and
    binding when it has a named exchange."""

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        channel = channel or self.channel
        ensure_queue(channel, self.name)
        if self.exchange is not None and self.exchange.name:
            self.exchange.declare(nowait=nowait, channel=channel)
            self.queue_bind(nowait=nowait, channel=channel)
        return self.name


class SendQueue(SharedQueue):
    """The send queue with the poison queue (RabbitMQ drops a message dead-lettered to a queue
    that does not exist), its exchange and binding (celery-node publishes to the default
    exchange and declares neither). ``queue_arguments`` is never sent: Celery reads its
    ``x-queue-type`` to use per-consumer prefetch, which a quorum queue requires (it refuses
    global QoS) and a classic one takes alike."""

    attrs = (*Queue.attrs, ("poison", None))  # kept by kombu's copies (a bind is a copy)
    poison: Queue | None

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        channel = channel or self.channel
        if self.poison is not None:
            ensure_queue(channel, self.poison.name)
        return super().declare(nowait=nowait, channel=channel)


def control_queue() -> SharedQueue:
    """The control queue (health checks, sweeps): the one Celery's consumer reads. Declared as
    every client declares a queue; ``queue_arguments`` is never sent (see SendQueue)."""
    exchange = Exchange(CONTROL_QUEUE, type="direct", durable=True)
    return SharedQueue(
        CONTROL_QUEUE,
        exchange,
        routing_key=CONTROL_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def amqp_queues(settings: Settings) -> tuple[SendQueue, Queue]:
    """The send queue and the poison queue, both durable and declared with no arguments (their
    type is the vhost's default; dead-lettering and the delivery limit are the policy's)."""
    poison = SharedQueue(POISON_QUEUE, Exchange("", type="direct"), routing_key=POISON_QUEUE, durable=True)
    send = SendQueue(
        QUEUE, Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE, durable=True,
        queue_arguments={"x-queue-type": "quorum"}, poison=poison,
    )  # fmt: skip
    return send, poison


def celery_config(url: str, settings: Settings) -> dict[str, Any]:
    """Celery settings that depend on the broker: its URL as kombu reads it, the transport
    options and, on RabbitMQ, the queue declarations."""
    kind = broker_kind(url)
    if kind == "amqp":
        return {
            "broker_url": url,
            "broker_transport_options": {"confirm_publish": True},
            "broker_heartbeat": 30,
            "task_queues": [control_queue()],  # the jobs' queue is read by worker/queue/broker/inbox.py
            "worker_detect_quorum_queues": True,
        }
    options = redis_transport_options(settings)
    if kind == "sentinel":
        options["master_name"] = sentinel_master(url)
        url = connect.SentinelUrl.parse(url).kombu_url(url)
    return {"broker_url": url, "broker_transport_options": options}


class BrokerView(Protocol):
    """What Postroom reads of a broker."""

    def depths(self) -> dict[str, int]:
        """Messages waiting, per queue name as ``postroom status`` shows it."""

    def in_flight(self) -> int | None:
        """Messages workers hold unacknowledged, or None when the broker does not say."""

    def close(self) -> None: ...


@dataclass
class RedisBrokerView:
    """kombu's Redis structures: the queue's priority lists and the unacknowledged hash."""

    client: Any
    keys: BrokerKeys
    queue: str = QUEUE
    owns_client: bool = False  # False: the client is Postroom's state client, closed by its owner

    def lists(self) -> dict[str, str]:
        lists = self.keys.queue_lists(self.queue)
        return {
            (self.queue if not p else f"{self.queue}.p{p}"): k
            for p, k in zip(PRIORITY_STEPS, lists, strict=True)
        }

    def depths(self) -> dict[str, int]:
        lists = self.lists()
        with self.client.pipeline(transaction=False) as pipe:
            for key in lists.values():
                pipe.llen(key)
            return {name: int(n) for name, n in zip(lists, pipe.execute(), strict=True)}

    def in_flight(self) -> int | None:
        return int(self.client.hlen(self.keys.unacked))

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


@dataclass
class AmqpBrokerView:
    """RabbitMQ: queue depths from a passive ``queue.declare`` (it cannot list messages)."""

    app: Any

    def depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.app.connection_for_read() as connection:
            channel = connection.default_channel
            for name in (QUEUE, POISON_QUEUE):
                try:
                    out[name] = int(channel.queue_declare(name, passive=True).message_count)
                except connection.channel_errors:  # not declared yet: nothing waits in it
                    out[name] = 0
                    channel = connection.channel()
        return out

    def in_flight(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def broker_view(app: Any, state_url: str | None = None, state_client: Any | None = None) -> BrokerView:
    """The view of ``app``'s broker; ``state_client`` (for ``state_url``) is reused when the
    broker is that same Redis."""
    url = str(app.conf.broker_url)
    if broker_kind(url) == "amqp":
        return AmqpBrokerView(app)
    keys = BrokerKeys.from_options(app.conf.broker_transport_options)
    if state_client is not None and state_url is not None and same_redis(url, state_url):
        return RedisBrokerView(state_client, keys)
    client = connect.client(redis_url(url), decode_responses=True, **REDIS_TIMEOUTS)
    return RedisBrokerView(client, keys, owns_client=True)


def same_redis(broker: str, state: str) -> bool:
    """Whether Postroom's state is kept in the broker's own Redis (and database)."""
    if broker_kind(broker) == "amqp":
        return False
    if connect.is_sentinel(broker) and connect.is_sentinel(state):
        a, b = connect.SentinelUrl.parse(broker), connect.SentinelUrl.parse(state)
        return set(a.hosts) == set(b.hosts) and a.db == b.db
    return redis_url(broker) == state


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
