"""Every producer is first-class (issue 28): the parity matrix.

Each payload feature goes through each producer — the Python helper (``Producer``), a plain
Celery app's ``send_task`` (the README's first example), celery-node (npm, a producer nobody here
wrote) and the HTTP API — against one real worker, one SMTP server and one webhook receiver, and
must end the same way: the job's record and state (as ``postroom job --json`` prints it), what
the server received, the dead letter, the webhook events. Jobs a producer published without the
helper get their record from the first worker that reads them (worker/queue/store/jobscripts.py
``BEGIN``): scheduled, cancellable, deduplicated, dead-lettered under their own id.

Every cell is submitted at once by a module fixture (the whole matrix costs one wait, not one per
cell); each test below checks one cell.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from celery import Celery

from support import celerynode
from support.hookrecv import Receiver
from support.queue import QueueEnv, Worker, claim_database, cli, wait_for
from support.smtpd import SmtpServer
from support.web import ApiServer, write_key
from worker.client import PayloadError, Producer
from worker.db.vocabulary import FINAL_STATES
from worker.queue.store.jobrecord import Job
from worker.records.webhooks import new_secret
from worker.web import http as http_api

PRODUCERS = ("helper", "celery", "celery-node", "http")
FEATURES = (
    "plain",
    "send_at",
    "cancel",
    "idempotency_key",
    "auto-reply",
    "list_unsubscribe",
    "attachments",
    "batch",
    "invalid",
)
ACCOUNT = "parity"
SEND_AT_AHEAD = 6.0  # seconds: long enough to see the job waiting, short for the suite
CANCEL_AHEAD = 10.0


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


@dataclass
class Cell:
    """One producer x feature: what was submitted and what was seen."""

    producer: str
    feature: str
    subject: str
    ids: list[str] = field(default_factory=list)
    refused: list[str] | None = None  # problems, when the producer refused the payload
    submitted_at: float = 0.0
    due: float | None = None
    scheduled_seen: float | None = None  # when its record first said "scheduled"
    cancelled: bool | None = None


@dataclass
class Matrix:
    env: QueueEnv
    server: SmtpServer
    receiver: Receiver
    worker: Worker
    producer: Producer
    cells: dict[tuple[str, str], Cell]

    def job(self, job_id: str) -> Job | None:
        return self.producer.job(job_id)

    def received(self, subject: str) -> list[Any]:
        return [r for r in self.server.received if r.message["Subject"] in (subject, f"Re: {subject}")]

    def events(self, job_id: str) -> list[str]:
        return [str(r["type"]) for r in self.receiver.requests() if r["job_id"] == job_id]


def payload(subject: str, **fields: Any) -> dict[str, Any]:
    return {
        "account": ACCOUNT,
        "to": [f"{uuid.uuid4().hex[:8]}@example.net"],
        "subject": subject,
        "text": "hi",
        **fields,
    }


def submit(client: Client, cell: Cell) -> None:
    """Send the cell's feature through the client; the submission's own facts go on the cell."""
    subject, feature = cell.subject, cell.feature
    cell.submitted_at = time.time()
    try:
        if feature == "plain":
            cell.ids = [client.send(payload(subject))]
        elif feature in ("send_at", "cancel"):
            cell.due = cell.submitted_at + (SEND_AT_AHEAD if feature == "send_at" else CANCEL_AHEAD)
            when = datetime.fromtimestamp(cell.due, UTC).isoformat()  # ISO 8601 with an offset
            cell.ids = [client.send(payload(subject, send_at=when))]
        elif feature == "idempotency_key":
            key = f"order-{uuid.uuid4().hex}"
            cell.ids = [client.send(payload(subject, idempotency_key=key)) for _ in range(2)]
        elif feature == "auto-reply":
            original = {
                "message_id": f"<{uuid.uuid4().hex}@asker.example.org>",
                "from": f"Asker <asker-{uuid.uuid4().hex[:6]}@example.org>",
                "subject": subject,
            }
            message = {"account": ACCOUNT, "kind": "auto-reply", "original": original, "text": "On it."}
            cell.ids = [client.send(message)]
        elif feature == "list_unsubscribe":
            unsubscribe = {"url": "https://example.com/u/1", "mailto": "unsub@example.com"}
            cell.ids = [client.send(payload(subject, list_unsubscribe=unsubscribe))]
        elif feature == "attachments":
            attachment = {
                "filename": "hello.txt",
                "content_type": "text/plain",
                "content_base64": base64.b64encode(b"attached hello").decode(),
            }
            cell.ids = [client.send(payload(subject, attachments=[attachment]))]
        elif feature == "batch":
            cell.ids = client.batch([payload(subject) for _ in range(3)])
        elif feature == "invalid":
            cell.ids = [client.send(payload(subject, to=["not an address"]))]
    except Refused as exc:
        cell.refused = exc.problems


class Watcher(threading.Thread):
    """Follows every cell from before the first submission to its end: notes when scheduled jobs
    were first seen waiting, cancels the cancel cells once their jobs wait, and ends when every
    submitted job has ended (and the receiver had time for the last events)."""

    def __init__(self, matrix: Matrix, clients: dict[str, Client]) -> None:
        super().__init__(daemon=True)
        self.matrix, self.clients = matrix, clients
        self.submitted = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = not self.submitted.is_set()
            for cell in list(self.matrix.cells.values()):
                for job_id in list(cell.ids):
                    busy = self.look(cell, job_id) or busy
            if not busy:
                time.sleep(2.0)  # the webhook sender's last deliveries
                return
            time.sleep(0.05)

    def look(self, cell: Cell, job_id: str) -> bool:
        """True while the job has not ended."""
        job = self.matrix.job(job_id)
        state = job.state if job is not None else "unknown"
        if cell.due is not None and state == "scheduled" and cell.scheduled_seen is None:
            cell.scheduled_seen = time.time()
        if cell.feature == "cancel" and cell.cancelled is None and state == "scheduled":
            cell.cancelled = self.clients[cell.producer].cancel(job_id)
        return state not in FINAL_STATES


@pytest.fixture(scope="module")
def matrix(real_redis: None, pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("parity")
    env = QueueEnv(root, claim_database())
    server = SmtpServer(mode="plain", cert=pki.server_cert, key=pki.server_key)
    env.account(ACCOUNT, server)
    secret = new_secret()
    receiver = Receiver(root / "hooks.jsonl", secret).start()
    (env.config / "webhooks").mkdir()
    (env.config / "webhooks" / "parity.yaml").write_text(
        f"url: {receiver.url}\nsecret: {secret}\nallow_private: true\n"
    )
    token = write_key(env, "parity", [ACCOUNT])
    worker = Worker(env, root / "worker.log", concurrency=4).start()
    producer = Producer(env.broker_url, accounts_dir=env.accounts, config_dir=env.config)
    api = ApiServer(http_api.create_app(producer))
    clients = {kind: Client(kind, env, producer, api.url, token) for kind in PRODUCERS}
    run = uuid.uuid4().hex[:6]
    cells = {(p, f): Cell(p, f, subject=f"{run} {p} {f}") for p in PRODUCERS for f in FEATURES}
    made = Matrix(env, server, receiver, worker, producer, cells)
    watcher = Watcher(made, clients)
    watcher.start()
    try:
        for cell in cells.values():
            submit(clients[cell.producer], cell)
        watcher.submitted.set()
        watcher.join(90)  # a cell whose jobs never ended fails its own check below
        yield made
    finally:
        for client in clients.values():
            client.close()
        api.stop()
        producer.close()
        worker.stop()
        receiver.stop()
        server.stop()
        env.release()


CHECKS: dict[str, Callable[[Matrix, Cell], None]] = {}


def check(feature: str) -> Callable[[Callable[[Matrix, Cell], None]], Callable[[Matrix, Cell], None]]:
    def register(function: Callable[[Matrix, Cell], None]) -> Callable[[Matrix, Cell], None]:
        CHECKS[feature] = function
        return function

    return register


def sent_once(matrix: Matrix, cell: Cell, job_id: str) -> Any:
    """The job is sent, its record says so, the server has its message once under its
    Message-ID, and the receiver heard job.sent for it."""
    job = matrix.job(job_id)
    assert job is not None and job.state == "sent", job
    assert all(r["status"] == "sent" for r in job.recipients.values()) and job.recipients, job.recipients
    mine = [r for r in matrix.received(cell.subject) if r.message["Message-ID"] == job.message_id]
    assert len(mine) == 1, f"{job.message_id} received {len(mine)} times"
    assert "job.sent" in matrix.events(job_id), matrix.events(job_id)
    return mine[0]


@check("plain")
def _plain(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    sent_once(matrix, cell, job_id)
    shown = cli(matrix.env, "job", job_id, "--json")  # what an operator sees, whoever produced it
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["state"] == "sent" and record["account"] == ACCOUNT and record["attempts"] == 1
    assert record["message_id"] and record["transport"] == "smtp"


@check("send_at")
def _send_at(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    assert cell.due is not None and cell.scheduled_seen is not None, "never seen waiting as scheduled"
    assert cell.scheduled_seen - cell.submitted_at < 2.5, "scheduled more than 2 s after it was published"
    delivered = sent_once(matrix, cell, job_id)
    assert cell.due - 0.05 <= delivered.at <= cell.due + 2.0, delivered.at - cell.due


@check("cancel")
def _cancel(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    assert cell.cancelled is True
    job = matrix.job(job_id)
    assert job is not None and job.state == "cancelled", job
    assert cell.due is not None and time.time() > cell.due  # its time has passed, and still:
    assert matrix.received(cell.subject) == []
    assert matrix.events(job_id) == ["job.cancelled"]


@check("idempotency_key")
def _idempotency_key(matrix: Matrix, cell: Cell) -> None:
    assert len(matrix.received(cell.subject)) == 1, "the same key twice must send once"
    first, second = (matrix.job(j) for j in cell.ids)
    assert first is not None and second is not None
    sent = [job for job in (first, second) if job.state == "sent"]
    assert len(sent) >= 1
    owner = sent[0]
    for job in (first, second):  # the helper and the API hand back the owner's id itself
        assert job.id == owner.id or (
            job.state == "suppressed" and f"duplicate of job {owner.id}" in (job.last_error or "")
        ), job


@check("auto-reply")
def _auto_reply(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    reply = sent_once(matrix, cell, job_id).message
    assert reply["Subject"] == f"Re: {cell.subject}"
    assert reply["Auto-Submitted"] == "auto-replied" and reply["In-Reply-To"].endswith("@asker.example.org>")
    assert reply["To"].addresses[0].addr_spec.startswith("asker-")


@check("list_unsubscribe")
def _list_unsubscribe(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    message = sent_once(matrix, cell, job_id).message
    assert message["List-Unsubscribe"] == "<https://example.com/u/1>, <mailto:unsub@example.com>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@check("attachments")
def _attachments(matrix: Matrix, cell: Cell) -> None:
    (job_id,) = cell.ids
    message = sent_once(matrix, cell, job_id).message
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == "hello.txt" and attachment.get_content() == "attached hello"


@check("batch")
def _batch(matrix: Matrix, cell: Cell) -> None:
    assert len(cell.ids) == 3
    for job_id in cell.ids:
        sent_once(matrix, cell, job_id)


@check("invalid")
def _invalid(matrix: Matrix, cell: Cell) -> None:
    assert matrix.received(cell.subject) == []
    if cell.producer in ("helper", "http"):  # refused at enqueue, with the field and the reason
        assert cell.refused is not None and any(p.startswith("to[0]") for p in cell.refused), cell.refused
        return
    (job_id,) = cell.ids  # published as is: a dead letter under the producer's own id
    job = matrix.job(job_id)
    assert job is not None and job.state == "dead", job
    assert job.last_error is not None and job.last_error.startswith("invalid payload: to.0"), job.last_error
    assert job_id in {row["id"] for row in matrix.producer.store.dead_letters()}
    assert "job.failed" in matrix.events(job_id)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("producer", PRODUCERS)
def test_every_feature_ends_the_same_through_every_producer(
    matrix: Matrix, producer: str, feature: str
) -> None:
    CHECKS[feature](matrix, matrix.cells[(producer, feature)])


def test_the_matrix_checks_every_feature() -> None:
    assert set(CHECKS) == set(FEATURES)


def test_an_unreadable_entry_keeps_the_producers_id(matrix: Matrix) -> None:
    """A body that is no Celery call ([1, 2]) but carries a usable id: its dead letter is filed
    under that id, so ``postroom job <id>`` tells the producer what happened."""
    job_id = str(uuid.uuid4())
    celerynode.publish(
        matrix.env.broker_url, [{"name": "postroom.send", "id": job_id, "args": [1, 2], "kwargs": {}}]
    )
    wait_for(
        lambda: (job := matrix.job(job_id)) is not None and job.state == "dead",
        30,
        "its dead letter",
        matrix.worker,
    )
    job = matrix.job(job_id)
    assert job is not None and job.unreadable is not None and "unreadable message" in (job.last_error or "")


def test_a_celery_countdown_is_a_scheduled_send(matrix: Matrix) -> None:
    """A plain Celery producer's ``countdown`` (an ETA) is a send_at: the first worker that reads
    it records it ``scheduled`` (cancellable; Celery alone would hold it unrecorded in a worker's
    memory), and it is sent at its time, not before."""
    app = Celery("a-plain-celery-app", broker=matrix.env.broker_url, set_as_current=False)
    subject = f"countdown {uuid.uuid4().hex[:6]}"
    try:
        published = time.time()
        going, cancelled = (
            str(
                app.send_task(
                    "postroom.send", kwargs=payload(f"{subject} {n}"), queue="postroom", countdown=4
                ).id
            )
            for n in (1, 2)
        )
    finally:
        app.close()

    def scheduled() -> bool:
        jobs = [matrix.job(j) for j in (going, cancelled)]
        return all(job is not None and job.state == "scheduled" for job in jobs)

    wait_for(scheduled, 2.5, "both jobs recorded scheduled", matrix.worker)
    assert matrix.producer.cancel(cancelled)[0]
    wait_for(
        lambda: (job := matrix.job(going)) is not None and job.state == "sent", 20, "the send", matrix.worker
    )
    (delivered,) = matrix.received(f"{subject} 1")
    assert delivered.at >= published + 4 - 0.05  # not before its time
    time.sleep(1.0)
    assert matrix.received(f"{subject} 2") == [] and (job := matrix.job(cancelled)) is not None
    assert job.state == "cancelled"


def test_a_raw_send_at_past_the_horizon_is_a_dead_letter_as_the_helper_refuses_it(matrix: Matrix) -> None:
    job_id = str(uuid.uuid4())
    far = time.time() + 400 * 86400  # schedule_horizon is 90 days
    celerynode.publish(
        matrix.env.broker_url,
        [{"name": "postroom.send", "id": job_id, "kwargs": payload("far", send_at=far)}],
    )
    wait_for(lambda: getattr(matrix.job(job_id), "state", "") == "dead", 20, "its dead letter", matrix.worker)
    job = matrix.job(job_id)
    assert job is not None and "send_at: more than 90 days ahead" in (job.last_error or "")
    with pytest.raises(PayloadError, match="send_at: more than 90 days ahead"):
        matrix.producer.enqueue(payload("far", send_at=far))
