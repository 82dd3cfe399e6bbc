"""Each producer as its users drive it — the Python helper, a plain Celery app's ``send_task``,
celery-node (npm) and the HTTP API — behind one interface, so a test can send the same thing
through every one of them (tests/test_producers.py, tests/test_bounces.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from celery import Celery

from support import celerynode
from support.queue import QueueEnv, cli
from worker.client import PayloadError, Producer

PRODUCERS = ("helper", "celery", "celery-node", "http")


class Refused(Exception):
    """The producer refused the payload at enqueue (the helper and the HTTP API validate first)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Client:
    """One producer, as its users drive it: enqueue one, enqueue many, cancel."""

    def __init__(self, kind: str, env: QueueEnv, producer: Producer, api: str, token: str) -> None:
        self.kind, self.env, self.producer, self.api = kind, env, producer, api
        self.headers = {"Authorization": f"Bearer {token}"}
        self.celery = Celery("a-plain-celery-app", broker=env.broker_url, set_as_current=False)

    def send(self, payload: dict[str, Any]) -> str:
        if self.kind == "helper":
            try:
                return self.producer.enqueue(payload)
            except PayloadError as exc:
                raise Refused(exc.problems) from None
        if self.kind == "celery":
            return str(self.celery.send_task("postroom.send", kwargs=payload, queue="postroom").id)
        if self.kind == "celery-node":
            job_id = str(uuid.uuid4())
            celerynode.publish(
                self.env.broker_url, [{"name": "postroom.send", "id": job_id, "kwargs": payload}]
            )
            return job_id
        reply = httpx.post(f"{self.api}/v1/messages", headers=self.headers, json=payload, timeout=30)
        if reply.status_code == 422:  # problems as {field, message}, as the helper's "field: message"
            raise Refused([f"{p['field']}: {p['message']}" for p in reply.json()["problems"]])
        assert reply.status_code == 202, reply.text
        return str(reply.json()["job_id"])

    def batch(self, payloads: list[dict[str, Any]]) -> list[str]:
        if self.kind == "helper":
            return self.producer.send_batch(payloads)
        if self.kind == "http":
            reply = httpx.post(
                f"{self.api}/v1/batches", headers=self.headers, json={"messages": payloads}, timeout=30
            )
            assert reply.status_code == 202, reply.text
            return [str(j) for j in reply.json()["job_ids"]]
        kwargs = {"messages": payloads}
        if self.kind == "celery":
            task_id = str(self.celery.send_task("postroom.send_batch", kwargs=kwargs, queue="postroom").id)
        else:
            task_id = str(uuid.uuid4())
            celerynode.publish(
                self.env.broker_url, [{"name": "postroom.send_batch", "id": task_id, "kwargs": kwargs}]
            )
        # a producer that names no job ids gets <batch task id>-<index> (docs/producers.md)
        return [f"{task_id}-{i}" for i in range(len(payloads))]

    def cancel(self, job_id: str) -> bool:
        """The producer's way to cancel: the API's DELETE, the helper's cancel, and for a producer
        in another language the operator's ``postroom cancel``."""
        if self.kind == "http":
            return (
                httpx.delete(f"{self.api}/v1/jobs/{job_id}", headers=self.headers, timeout=30).status_code
                == 200
            )
        if self.kind == "helper":
            return self.producer.cancel(job_id)[0]
        done = cli(self.env, "cancel", job_id, "--json")
        return done.returncode == 0 and json.loads(done.stdout)["cancelled"] is True

    def close(self) -> None:
        self.celery.close()
