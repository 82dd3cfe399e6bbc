"""What ``postroom status``, ``postroom health`` and the metrics endpoint show: read from Redis.

Nothing here talks to a worker: queues, job counters, health results and
account states all live in Redis, so any machine with the broker URL sees the
whole deployment.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import redis

from worker.db.keys import redis_key
from worker.errors import ConfigurationError
from worker.ops import counters, preflight
from worker.ops.health import AccountHealth
from worker.queue.broker.kinds import AmqpBrokerView, BrokerView
from worker.queue.broker.rabbitmq import read_setup
from worker.queue.events.outbox import Outbox
from worker.queue.process.liveness import taken_count
from worker.queue.store import reports, suppressions
from worker.queue.store.delays import RETRYING
from worker.queue.store.jobrecord import SCHEDULED
from worker.queue.store.jobs import JobStore
from worker.queue.store.ready import ReadyQueues
from worker.records.loader import Records

CERT_WARN_DAYS = 30
# an account's state: ``invalid`` when its record does not load (nothing of it can be sent, so it
# wins over the others), ``paused`` by the breaker or an operator, ``degraded`` by a failed check
ACCOUNT_STATES = ("ok", "degraded", "paused", "invalid")
INVALID = "invalid"
SETUP_EVERY = 60.0  # seconds a broker-setup answer is reused (status --watch asks every 2 s)
_setups: dict[str, tuple[float, dict[str, Any]]] = {}


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


class Status:
    """One snapshot of the deployment (built per command / per scrape)."""

    def __init__(
        self,
        store: JobStore,
        health: AccountHealth,
        records: Records | None,
        broker: BrokerView | None = None,
    ) -> None:
        if broker is None:
            from worker.queue.broker.celery_app import (
                broker_view,  # the Celery app only where its broker is needed
            )

            broker = broker_view(store.redis)
        self.broker = broker
        self.store = store
        self.redis: redis.Redis = store.redis
        self.health = health
        self.records = records
        self.account_names = sorted(records.account_names) if records is not None else []

    def _webhooks(self) -> dict[str, dict[str, int]]:
        """Per webhook record: deliveries pending, delivered, given up (worker/queue/events/outbox.py)."""
        if self.records is None:
            return {}
        outbox = Outbox(self.redis)
        return {name: outbox.stats(name) for name in sorted(self.records.webhooks)}

    def as_dict(self, *, setup: bool = False) -> dict[str, Any]:
        """The snapshot; with ``setup`` (``postroom status``) also what the broker's setup lacks,
        which on RabbitMQ asks its management API (the per-request views leave it out)."""
        now = time.time()
        ready = ReadyQueues(self.redis)
        waiting = ready.depths()  # per account: due now, not taken yet (worker/queue/store/ready.py)
        # the broker's queue: messages of producers that did not use the helper, not taken in yet
        depths = {**self.broker.depths(), "ready": sum(waiting.values())}
        unacked = taken_count(self.redis)  # taken by the workers: being sent, or next on a connection
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(RETRYING)
            pipe.zcard(self.store.dead_key)
            pipe.zcard(SCHEDULED)
            retrying, dead, scheduled = pipe.execute()
        names = self.account_names
        states = self.health.account_states(names)
        last = self.health.last_many(names)
        windows = counters.windows(self.redis, names, now)
        paused = self.health.paused()
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(redis_key("held", name))
                pipe.hgetall(redis_key("stats", name))
                pipe.lrange(redis_key("health-history", name), 0, -1)
                pipe.hlen(suppressions.key(name))
                pipe.hgetall(reports.stats_key(name))
            per_account = pipe.execute()
        accounts: dict[str, Any] = {}
        for i, name in enumerate(names):
            held, totals, history, suppressed, read = per_account[5 * i : 5 * i + 5]
            accounts[name] = self._account(
                name, states[name], last[name], windows[name], int(held), totals, history, paused, now
            )
            accounts[name]["suppressed"] = int(suppressed)  # addresses on its suppression list
            # what the bounce reader found in its mailbox, all time (contract §11)
            accounts[name]["reports"] = {k: int(v) for k, v in read.items()}
            accounts[name]["ready"] = waiting.get(name, 0)  # due now, waiting for a worker
            self._mark_invalid(name, accounts[name])
        out = {
            "queues": depths,
            # jobs workers hold: being sent or next on a connection (retries wait in Postroom's
            # delay queue, worker/queue/store/delays.py, not in a worker)
            "in_flight": int(unacked),
            "retrying": int(retrying),
            "dead_letters": int(dead),
            "scheduled": int(scheduled),  # waiting for their send_at (worker/queue/store/schedule.py)
            "held": sum(a["held"] for a in accounts.values()),
            "accounts": accounts,
            "webhooks": self._webhooks(),
            "generated_at": now,
        }
        if setup:
            out["broker_setup"] = broker_setup(self.broker)
        return out

    def _mark_invalid(self, name: str, info: dict[str, Any]) -> None:
        """A record that does not load is an error wherever the account is shown, from the moment
        it is read, not once the next health check fails: state ``invalid``, its ``problems``
        (file:line:field findings) and the first of them as the ``reason``."""
        problems = self.records.account_problems.get(name) if self.records is not None else None
        info["problems"] = [p.as_dict() for p in problems or []]
        if problems:
            info["state"] = INVALID
            info["reason"] = f"record does not load: {problems[0]}" + (
                f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            )

    def _account(
        self,
        name: str,
        state: dict[str, str],
        health: dict[str, Any] | None,
        window: dict[str, dict[str, int]],
        held: int,
        totals: dict[str, str],
        history: list[str],
        paused: frozenset[str],
        now: float,
    ) -> dict[str, Any]:
        check_failures = int(state.get("check_failures") or 0)
        auth_failures = int(state.get("auth_failures") or 0)
        if name in paused or state.get("state") == "paused":
            current = "paused"
        elif (health is not None and not health.get("ok")) or check_failures or auth_failures:
            current = "degraded"
        else:
            current = "ok"
        last_success = None
        for raw in reversed(history):
            entry = json.loads(raw)
            if entry.get("ok"):
                last_success = _timestamp(entry.get("checked_at"))
                break
        certificates: dict[str, float] = {}
        detail = (health or {}).get("detail") or {}
        if when := _timestamp(detail.get("certificate_expires")):
            certificates["server"] = when
        signing = detail.get("signing")
        if isinstance(signing, dict) and (when := _timestamp(signing.get("expires"))):
            certificates["signing"] = when
        days_left = {label: int((when - now) // 86400) for label, when in certificates.items()}
        day = window["day"]
        return {
            "state": current,
            "reason": state.get("reason") or None,
            "paused_by": state.get("paused_by") or None,
            "sent": day["sent"],
            "failed": day["failed"],
            "retried": day["retried"],
            "dead": day["dead"],
            "bounced": day["bounced"],
            "complained": day["complained"],
            "last_hour": window["hour"],
            "last_day": day,
            "total": {k: int(v) for k, v in totals.items()},
            "held": held,
            "check_failures": check_failures,
            "auth_failures": auth_failures,
            "health": health,
            "security": detail.get("security") or (health or {}).get("result"),
            "last_success_at": last_success,
            # the last check whatever it found: none for long means the beat or the checks stopped
            "last_check_at": _timestamp((health or {}).get("checked_at")),
            "certificates": certificates,
            "certificate_days_left": days_left,
        }


def broker_setup(broker: BrokerView) -> dict[str, Any]:
    """What the broker's setup lacks for Postroom: ``{broker, checked, ok, lacks, problems,
    error}``. On RabbitMQ read from its management API (worker/queue/broker/kinds.py) at most once a
    minute per process; an API that cannot be reached is an ``error``, never a failure here."""
    if not isinstance(broker, AmqpBrokerView):
        return {"broker": "redis", "checked": True, "ok": True, "lacks": [], "problems": [], "error": None}
    from worker.settings import load_settings

    url = str(broker.app.conf.broker_url)
    cached = _setups.get(url)
    if cached is not None and time.monotonic() - cached[0] < SETUP_EVERY:
        return cached[1]
    report: dict[str, Any] = {"broker": "rabbitmq", "checked": False, "ok": None, "lacks": [], "problems": []}
    try:
        found = read_setup(url, load_settings(), timeout=3.0).as_dict()
        report.update(
            checked=True, ok=found["ok"], lacks=found["lacks"], problems=found["problems"], error=None
        )
    except ConfigurationError as exc:
        report["error"] = str(exc)
    except Exception as exc:  # an answer that is no JSON, a URL httpx cannot use: status goes on
        report["error"] = f"RabbitMQ's management API: {type(exc).__name__}: {exc}"
    _setups[url] = (time.monotonic(), report)
    return report


def setup_line(setup: dict[str, Any]) -> str | None:
    """``postroom status``'s line on the broker's setup (None on Redis: nothing to set up)."""
    if setup.get("broker") != "rabbitmq":
        return None
    if setup.get("error"):
        return f"broker setup: not checked ({setup['error']})"
    if setup.get("lacks"):
        return f"broker setup: queue postroom lacks {', '.join(setup['lacks'])} (see postroom queues check)"
    return "broker setup: ok (see postroom queues check)"


def ago(when: float | None, now: float) -> str:
    """``12s ago``, ``5m ago``, ``3h ago`` (``never`` without a time)."""
    if not when:
        return "never"
    seconds = max(0, int(now - when))
    return (
        f"{seconds}s ago"
        if seconds < 120
        else f"{seconds // 60}m ago"
        if seconds < 7200
        else f"{seconds // 3600}h ago"
    )


def health_line(health: dict[str, Any] | None, now: float) -> str:
    """An account's last check in one line, as ``postroom status`` and the dashboard show it:
    ``ok 12s ago: SMTP (Connect using STARTTLS) TLSv1.3`` or ``FAILED …: … (why)``, then the
    DNS preflight's lines that did not pass (``; DNS: SPF warn, DMARC fail``)."""
    if health is None:
        return "no check yet"
    verdict = "ok" if health.get("ok") else "FAILED"
    line = f"{verdict} {ago(_timestamp(health.get('checked_at')), now)}: {health.get('result')}"
    detail = health.get("detail") or {}
    if detail.get("tls_version"):
        line += f" {detail['tls_version']}"
    if not health.get("ok") and health.get("error"):
        line += f" ({health['error']})"
    if dns := preflight.summary(detail.get("deliverability")):
        line += f"; {dns}"
    return line


def unhealthy(health: dict[str, Any] | None, state: str) -> str | None:
    """Why an account counts as unhealthy for ``postroom health`` (None: healthy)."""
    if state == INVALID:
        return "its record does not load (see postroom accounts check)"
    if state == "paused":
        return "paused"
    if health is None:
        return "no health check yet"
    if not health.get("ok"):
        return str(health.get("error") or "check failed")
    return None
