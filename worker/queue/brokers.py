"""What differs between the brokers Postroom runs on (DESIGN §9), in one place.

- **Redis** (``redis://``, ``rediss://``, ``unix://``) and **Redis Sentinel**
  (``sentinel://h:p[;sentinel://h2:p2]/DB`` with ``POSTROOM_SENTINEL_MASTER``):
  kombu's Redis transport. Postroom reads its structures (worker/queue/broker.py)
  for coalescing, the orphan sweep, the reaper of dead workers' messages and
  ``postroom status``.
- **RabbitMQ** (``amqp://``): a durable quorum queue with a delivery limit (a
  message that kills its consumer again and again goes to ``postroom.poison``,
  which the workers move into Postroom's dead letters), publisher confirms, and
  queue depth read from the broker. A killed worker's messages come back the moment
  its connection drops (RabbitMQ's own guarantee), so there is no reaper; a
  message cannot be taken half-way, so the sweep only looks for jobs a producer
  recorded but never published; coalescing is off (basic.get per message would cost
  more than the task it saves).

:func:`celery_config` is what the worker's app and every producer configure (they
must declare the queue alike: RabbitMQ refuses a queue declared twice with other
arguments); :func:`broker_view` is what ``status`` and the sweep read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kombu import Exchange, Queue

from worker.keys import REDIS_TIMEOUTS
from worker.mail.payload import QUEUE
from worker.queue import connect
from worker.queue.broker import PRIORITY_STEPS, BrokerKeys, job_ids_in
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


class SendQueue(Queue):
    """The send queue, declared together with the queue its poison messages are dead-lettered to:
    RabbitMQ drops a dead-lettered message whose queue does not exist, so whoever declares the
    one (a worker, a producer) declares the other."""

    attrs = (*Queue.attrs, ("poison", None))  # kept by kombu's copies (a bind is a copy)
    poison: Queue | None

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        name = super().declare(nowait=nowait, channel=channel)
        if self.poison is not None:
            self.poison.bind(channel or self.channel).declare(nowait=nowait)
        return name


def amqp_queues(settings: Settings) -> tuple[SendQueue, Queue]:
    """The send queue (a quorum queue: replicated, with a delivery limit and at-least-once
    dead-lettering of the messages past it; a classic queue with ``rabbitmq_queue_type:
    classic``) and the poison queue those messages go to (both durable)."""
    arguments: dict[str, Any] = {
        "x-queue-type": settings.rabbitmq_queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": POISON_QUEUE,
    }
    if settings.rabbitmq_queue_type == "quorum":
        arguments["x-delivery-limit"] = settings.rabbitmq_delivery_limit
        arguments["x-dead-letter-strategy"] = "at-least-once"  # never dropped on the way (3.10+)
        arguments["x-overflow"] = "reject-publish"  # what at-least-once needs
    poison = Queue(
        POISON_QUEUE,
        Exchange("", type="direct"),
        routing_key=POISON_QUEUE,
        durable=True,
        queue_arguments={"x-queue-type": settings.rabbitmq_queue_type},
    )
    send = SendQueue(
        QUEUE, Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE, durable=True,
        queue_arguments=arguments, poison=poison,
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
            "task_queues": [amqp_queues(settings)[0]],
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

    def job_ids(self) -> set[str] | None:
        """The job id of every message in the broker (waiting or held), or None when the
        broker cannot list its messages."""

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

    def job_ids(self) -> set[str] | None:
        found: set[str] = set()
        for key in self.lists().values():
            start = 0
            while True:
                raw = list(self.client.lrange(key, start, start + _CHUNK - 1))
                for message in raw:
                    found.update(job_ids_in(_text(message)))
                if len(raw) < _CHUNK:
                    break
                start += _CHUNK
        for _, value in self.client.hscan_iter(self.keys.unacked, count=_CHUNK):
            found.update(job_ids_in(_text(value)))
        return found

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

    def job_ids(self) -> set[str] | None:
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
