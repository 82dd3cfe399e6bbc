"""RabbitMQ's management HTTP API: what the queue's setup lacks, and setting it up.

Postroom declares ``postroom`` as every Celery client does (worker/queue/broker/kinds.py), so its type
is the vhost's default and dead-lettering and the delivery limit come from a policy. This module
reads what RabbitMQ has (the vhost, both queues, the policies) for ``postroom queues check``,
``postroom status`` and the workers' one log line, and sets the policy for ``postroom queues
declare``. Never on a hot path: an API that cannot be reached is a ``ConfigurationError`` here,
and callers that must not stop on it (a worker, status) say so and go on.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlparse

import httpx
from amqp import exceptions as amqp_errors
from kombu import Connection
from kombu import exceptions as kombu_errors

from worker.db import connect
from worker.errors import ConfigurationError
from worker.mail.payload import QUEUE
from worker.queue.broker.kinds import POISON_QUEUE, amqp_queues
from worker.settings import Settings, broker_kind

POLICY = QUEUE  # the policy `postroom queues declare` sets: dead-lettering and the delivery limit
PLAIN_CLIENTS = "celery-node, a plain Celery app"
MIGRATE = 'docs/rabbitmq.md, "Migrating a queue"'
log = logging.getLogger("postroom.rabbitmq")


class ManagementApiError(ConfigurationError):
    """RabbitMQ's management API did not answer: one line naming its URL and the setting."""


@dataclass(frozen=True)
class ManagementApi:
    """The management API for a broker URL's vhost: ``rabbitmq_api``, by default
    http://<the broker's host>:15672, with the broker URL's credentials unless it has its own."""

    base: str  # without credentials: safe to print
    auth: tuple[str, str]
    vhost: str

    @classmethod
    def of(cls, broker: str, settings: Settings) -> ManagementApi:
        parsed = urlparse(broker)
        given = urlparse(settings.rabbitmq_api) if settings.rabbitmq_api else None
        if given is not None:
            base = given._replace(netloc=given.netloc.rsplit("@", 1)[-1]).geturl().rstrip("/")
        else:
            host = parsed.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            base = f"https://{host}:15671" if parsed.scheme == "amqps" else f"http://{host}:15672"
        source = given if given is not None and given.username else parsed
        auth = (unquote(source.username or "guest"), unquote(source.password or "guest"))
        return cls(base, auth, unquote(parsed.path[1:]) or "/")

    def request(self, http: httpx.Client, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer (None for a 404)."""
        try:
            response = http.request(method, f"{self.base}/api/{path}", json=body, auth=self.auth)
        except httpx.HTTPError as exc:
            raise self.error(f"cannot be reached ({type(exc).__name__}: {exc})") from None
        if response.status_code == 404 and method == "GET":
            return None
        if response.status_code >= 400:  # 401: the user needs the management (or policymaker) tag
            status, text = response.status_code, response.text[:200]
            raise self.error(f"answered {method} {path} for user {self.auth[0]!r}: {status} {text}")
        return response.json() if response.content else None

    def error(self, what: str, fix: str = "") -> ManagementApiError:
        fix = fix or "enable it (rabbitmq-plugins enable rabbitmq_management) or set POSTROOM_RABBITMQ_API"
        return ManagementApiError(f"RabbitMQ's management API at {self.base} {what}; {fix}")


def effective_policy(policies: list[dict[str, Any]], name: str, kind: str | None) -> dict[str, Any] | None:
    """The policy RabbitMQ applies to queue ``name``: of those matching, the highest priority."""
    applies = {"all", "queues", {"classic": "classic_queues", "quorum": "quorum_queues"}.get(kind or "", "")}

    def matches(policy: dict[str, Any]) -> bool:
        try:
            return policy.get("apply-to", "all") in applies and bool(re.search(policy["pattern"], name))
        except (KeyError, TypeError, re.error):
            return False

    found = [p for p in policies if matches(p)]
    return max(found, key=lambda p: (int(p.get("priority", 0)), str(p.get("name"))), default=None)


@dataclass
class QueueSetup:
    """What RabbitMQ says of Postroom's queues in one vhost, and what that lacks."""

    api: str
    vhost: str
    vhost_default_type: str | None  # None: not set (a queue declared with no arguments is classic)
    wanted_type: str  # rabbitmq_queue_type
    exists: bool
    queue_type: str | None
    arguments: dict[str, Any]
    policy: str | None
    definition: dict[str, Any]  # the policy's, with the operator policy's limits
    poison_exists: bool
    server_major: int = 3  # RabbitMQ's major version (4 gives quorum queues a delivery limit)

    @property
    def kind(self) -> str:
        """The queue's type, or the type it gets when a client declares it with no arguments."""
        return self.queue_type if self.exists and self.queue_type else self.vhost_default_type or "classic"

    def _value(self, key: str) -> Any:  # a queue's x-argument wins over the policy
        return self.arguments.get(f"x-{key}", self.definition.get(key))

    @property
    def dead_lettering(self) -> bool:
        exchange, key = (self._value(f"dead-letter-{k}") for k in ("exchange", "routing-key"))
        return bool(exchange == "" and key == POISON_QUEUE)

    @property
    def delivery_limit(self) -> int | None:
        """Quorum queues only: the lower of argument and policy; RabbitMQ 4 gives every quorum
        queue 20 when neither says (and -1, from either, means none)."""
        if self.kind != "quorum":
            return None
        given = (self.arguments.get("x-delivery-limit"), self.definition.get("delivery-limit"))
        limits = [int(v) for v in given if isinstance(v, int | float) and not isinstance(v, bool)]
        if any(limit < 0 for limit in limits):
            return None
        if not limits and self.server_major >= 4:
            return 20
        return min(limits) if limits else None

    @property
    def plain_clients_compatible(self) -> bool:
        """Whether a declaration with no arguments (celery-node, a plain Celery app) is accepted."""
        extra = [k for k in self.arguments if k != "x-queue-type"]
        return not self.exists or (not extra and self.kind == (self.vhost_default_type or "classic"))

    def problems(self) -> list[tuple[str, str]]:
        """(what is missing, one line saying what it costs and how to fix it)."""
        q, poison, kind, fix = QUEUE, POISON_QUEUE, self.kind, "fix: postroom queues declare"
        quorum = "a vhost with default queue type quorum (rabbitmqctl add_vhost postroom "
        quorum += "--default-queue-type quorum)"
        not_quorum = self.wanted_type == "quorum" and kind != "quorum"
        cost = (
            "a message past the delivery limit is dropped: it" if self.delivery_limit else "a poison message"
        )
        other = f"; policy {self.policy} applies, not {POLICY}" if self.policy not in (None, POLICY) else ""
        given = ", ".join(f"{k}={v}" for k, v in sorted(self.arguments.items()))
        checks = [
            (not self.exists, f"the queue {q}",
             f"queue {q} does not exist in vhost {self.vhost}: the first client to publish declares it "
             f"({kind}); {fix} before any producer runs"),
            (self.exists and not_quorum, "a quorum queue",
             f"queue {q} is {kind}, not quorum: no delivery limit (a message that kills its worker is "
             f"delivered again forever), no replication; fix: move to {quorum}, see {MIGRATE}"),
            (not self.exists and not_quorum, "a vhost whose default queue type is quorum",
             f"vhost {self.vhost}'s default queue type is {self.vhost_default_type or 'not set'}: the queue "
             f"will be {kind}, not quorum; for quorum use {quorum}"),
            (not self.dead_lettering, f"dead-lettering to {poison}",
             f"no dead-lettering to {poison}: {cost} never reaches Postroom's dead letters{other}; {fix} "
             f"(sets the policy {POLICY})"),
            (kind == "quorum" and self.delivery_limit is None, "a delivery limit",
             "no delivery limit: a message that kills its worker is delivered again forever; "
             f"{fix} (sets the policy {POLICY})"),
            (not self.poison_exists, f"the queue {poison}",
             f"queue {poison} does not exist: RabbitMQ drops what it dead-letters; {fix}"),
            (not self.plain_clients_compatible, "compatibility with clients declaring it with no arguments",
             f"queue {q} was declared with {given}: a client that declares it with none ({PLAIN_CLIENTS}) "
             f"is refused (PRECONDITION_FAILED); fix: move to a queue declared without any, see {MIGRATE}"),
        ]  # fmt: skip
        return [(what, line) for lacking, what, line in checks if lacking]

    def as_dict(self) -> dict[str, Any]:
        problems = self.problems()
        queue = {"name": QUEUE, "exists": self.exists, "type": self.queue_type, "arguments": self.arguments}
        return {
            "broker": "rabbitmq", "api": self.api, "vhost": self.vhost,
            "vhost_default_queue_type": self.vhost_default_type, "wanted_queue_type": self.wanted_type,
            "queue": queue, "policy": {"name": self.policy, "definition": self.definition},
            "dead_lettering": self.dead_lettering, "delivery_limit": self.delivery_limit,
            "poison_queue": {"name": POISON_QUEUE, "exists": self.poison_exists},
            "plain_clients_compatible": self.plain_clients_compatible, "ok": not problems,
            "lacks": [what for what, _ in problems], "problems": [line for _, line in problems],
        }  # fmt: skip


def read_setup(broker: str, settings: Settings, *, timeout: float = 5.0) -> QueueSetup:
    """Read the vhost, both queues and the policies (regular and operator) from the API."""
    api = ManagementApi.of(broker, settings)
    vhost = quote(api.vhost, safe="")
    with httpx.Client(timeout=timeout) as http:
        overview = api.request(http, "GET", "overview") or {}
        about = api.request(http, "GET", f"vhosts/{vhost}")
        if about is None:
            raise api.error(f"has no vhost {api.vhost!r}", "check the vhost in POSTROOM_BROKER_URL")
        queue = api.request(http, "GET", f"queues/{vhost}/{QUEUE}") or {}
        poison = api.request(http, "GET", f"queues/{vhost}/{POISON_QUEUE}")
        policies = api.request(http, "GET", f"policies/{vhost}") or []
        try:
            operator = api.request(http, "GET", f"operator-policies/{vhost}") or []
        except ManagementApiError:  # not readable by every user: its limits only narrow ours
            operator = []
    default = about.get("default_queue_type") or (about.get("metadata") or {}).get("default_queue_type")
    kind = queue.get("type")
    chosen = effective_policy(policies, QUEUE, kind) or {}
    definition = dict(chosen.get("definition") or {})
    for key, value in ((effective_policy(operator, QUEUE, kind) or {}).get("definition") or {}).items():
        mine = definition.get(key)
        definition[key] = min(mine, value) if isinstance(mine, int) and isinstance(value, int) else value
    return QueueSetup(
        api=api.base, vhost=api.vhost, vhost_default_type=None if default in (None, "undefined") else default,
        wanted_type=settings.rabbitmq_queue_type, exists=bool(queue), queue_type=kind,
        arguments=dict(queue.get("arguments") or {}), policy=chosen.get("name"), definition=definition,
        poison_exists=poison is not None, server_major=_major(overview.get("rabbitmq_version")),
    )  # fmt: skip


def _major(version: Any) -> int:
    """3 for "3.10.8", 4 for "4.1.0"; 3 when RabbitMQ does not say."""
    match = re.match(r"(\d+)\.", str(version or ""))
    return int(match.group(1)) if match else 3


def declare_setup(broker: str, settings: Settings) -> tuple[QueueSetup, QueueSetup]:
    """Set the policy ``postroom`` (dead-lettering to the poison queue; on a quorum queue the
    delivery limit, at-least-once dead-lettering and the reject-publish overflow it needs), then
    declare both queues with no arguments when they are missing. The setup before and after."""
    before = read_setup(broker, settings)
    definition: dict[str, Any] = {"dead-letter-exchange": "", "dead-letter-routing-key": POISON_QUEUE}
    if before.kind == "quorum":  # at-least-once: never dropped on the way; it needs reject-publish
        limit = settings.rabbitmq_delivery_limit
        definition |= {
            "delivery-limit": limit,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        }
    api = ManagementApi.of(broker, settings)
    body = {"pattern": f"^{re.escape(QUEUE)}$", "apply-to": "queues", "priority": 0, "definition": definition}
    with httpx.Client(timeout=10.0) as http:
        api.request(http, "PUT", f"policies/{quote(api.vhost, safe='')}/{POLICY}", body)
    try:
        with Connection(broker, connect_timeout=10) as connection:
            amqp_queues(settings)[0](connection.default_channel).declare()
    except (OSError, amqp_errors.AMQPError, kombu_errors.OperationalError) as exc:
        raise ConfigurationError(f"RabbitMQ at {connect.safe_url(broker)}: {exc}") from None
    return before, read_setup(broker, settings)


_reported = threading.Event()


def report_setup_once(broker: str, settings: Settings) -> None:
    """A worker says once, when it starts consuming, what the queue's setup lacks (a WARNING),
    or that it could not ask (INFO): in a thread of its own, so nothing waits on the API."""
    if broker_kind(broker) != "amqp" or _reported.is_set():
        return
    _reported.set()

    def report() -> None:
        try:
            lacks = read_setup(broker, settings).as_dict()["lacks"]
        except Exception as exc:  # never stops a worker
            log.info("RabbitMQ: the queue's setup was not checked: %s", exc)
            return
        if lacks:
            log.warning("RabbitMQ: queue %s lacks %s; see `postroom queues check`", QUEUE, ", ".join(lacks))

    threading.Thread(target=report, name="postroom-queue-setup", daemon=True).start()
