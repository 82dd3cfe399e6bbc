"""Graph and Gmail-OAuth accounts end to end: producer → real Redis → real Celery worker → local cloud.

Producers use a Graph account exactly like an SMTP one; the worker resolves
the auth profile, gets tokens from the local identity platform and delivers
through the local Graph (or, for Gmail, through XOAUTH2 on a real SMTP server).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from support.cloud import CLIENT_ID, CloudServer, Reply, service_account
from support.pki import Pki
from support.queue import OrderNotice, QueueEnv, Worker, cli, finished, unique
from support.smtpd import xoauth2_server
from worker.client import Producer

MAILBOX = "orders@contoso.com"


class GraphRecords:
    """Writes a Graph account, its profile, the CA keystore and a secret file into the queue's folders."""

    def __init__(self, env: QueueEnv, pki: Pki, cloud: CloudServer) -> None:
        self.env, self.cloud = env, cloud
        self.secrets = env.root / "secrets"
        self.secrets.mkdir(exist_ok=True)
        (env.config / "keystores" / "cloud-ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
        self.secret = "cs~" + secrets.token_urlsafe(24)
        cloud.client_secret = self.secret
        cloud.mailboxes.add(MAILBOX)

    def secret_file(self, value: str) -> Path:
        path = self.secrets / unique("secret-")
        path.write_text(value + "\n")
        return path

    def account(self, *, secret: str | None = None) -> str:
        name = unique("graph")
        secret_path = self.secret_file(secret or self.secret)
        (self.env.config / "auth-profiles" / f"{name}-app.yaml").write_text(
            f"type: client_credentials\nauthority: {self.cloud.authority}\nclient_id: {CLIENT_ID}\n"
            f"client_secret: {{file: {secret_path}}}\ntruststore: cloud-ca\n"
        )
        (self.env.accounts / f"{name}.yaml").write_text(
            f"provider: office365\nsend_using: graph\ngraph:\n  user_principal_name: {MAILBOX}\n"
            f"  auth_profile: {name}-app\n  base_url: {self.cloud.url}\n  truststore: cloud-ca\n"
        )
        return name


def test_a_graph_account_delivers_like_an_smtp_one(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    records = GraphRecords(queue_env, pki, cloud)
    account = records.account()
    job = OrderNotice.send(producer, account)
    assert job.state == "sent" and job.attempts == 1, job
    assert job.transport == "graph" and job.security is not None and job.security.startswith("HTTPS TLSv1.")
    assert {a: r["status"] for a, r in job.recipients.items()} == {
        OrderNotice.to: "sent",
        OrderNotice.bcc: "sent",
    }
    (delivered,) = cloud.delivered
    got = delivered.message
    assert got["Message-ID"] == job.message_id and got["X-Order"] == OrderNotice.order
    assert got["Bcc"] == OrderNotice.bcc and got["Subject"] == OrderNotice.subject
    as_json = json.loads(cli(queue_env, "job", job.id, "--json").stdout)
    assert as_json["transport"] == "graph" and as_json["recipients"][OrderNotice.to]["code"] == 202


def test_429_twice_then_202_is_delivered_once_respecting_retry_after(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    records = GraphRecords(queue_env, pki, cloud)
    throttled = Reply(
        429, {"error": {"code": "ApplicationThrottled", "message": "Too many requests"}}, {"Retry-After": "1"}
    )
    cloud.graph_script = [throttled, throttled]
    job = finished(producer, producer.send_notification(records.account(), ["a@example.net"], "Hi", "x"))
    assert job.state == "sent" and job.attempts == 3, job
    assert [h["outcome"] for h in job.history or []] == ["retry", "retry", "sent"], job.history
    assert (
        "429" in (job.history or [])[0]["error"] and "ApplicationThrottled" in (job.history or [])[0]["error"]
    )
    assert len(cloud.delivered) == 1
    first, second, third = cloud.sendmail_times
    # Retry-After: 1 (the test retry policy alone would wait 0.2-0.4 s before the first retry)
    assert second - first >= 0.95 and third - second >= 0.95


def test_503_then_202_is_delivered_on_the_second_attempt(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    records = GraphRecords(queue_env, pki, cloud)
    cloud.graph_script = [Reply(503, {"error": {"code": "ServiceUnavailable", "message": "later"}})]
    job = finished(producer, producer.send_notification(records.account(), ["a@example.net"], "Hi", "x"))
    assert job.state == "sent" and job.attempts == 2
    assert len(cloud.delivered) == 1


def test_an_expired_token_is_refreshed_and_the_job_is_sent_first_time(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    records = GraphRecords(queue_env, pki, cloud)
    account = records.account()
    first = finished(producer, producer.send_notification(account, ["a@example.net"], "One", "x"))
    cloud.expire_tokens()
    second = finished(producer, producer.send_notification(account, ["a@example.net"], "Two", "x"))
    assert first.state == second.state == "sent" and second.attempts == 1
    assert len(cloud.ms_token_requests) == 2 and len(cloud.delivered) == 2


def test_a_wrong_client_secret_is_dead_lettered_with_a_clear_reason_and_no_secret(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    records = GraphRecords(queue_env, pki, cloud)
    wrong = "cs~wrong-" + secrets.token_urlsafe(16)
    good_account = records.account()
    bad_account = records.account(secret=wrong)
    sent = finished(producer, producer.send_notification(good_account, ["a@example.net"], "Hi", "x"))
    dead = finished(producer, producer.send_notification(bad_account, ["a@example.net"], "Hi", "x"))
    assert sent.state == "sent"
    assert dead.state == "dead" and dead.attempts == 1
    assert dead.last_error is not None and "invalid_client" in dead.last_error
    assert "AADSTS7000215" in dead.last_error
    listed = json.loads(cli(queue_env, "dead-letters", "list", "--json").stdout)
    assert any(d["id"] == dead.id and "invalid_client" in d["error"] for d in listed)

    tokens = cloud.valid_tokens()
    assert tokens
    shown = [
        json.dumps(sent.as_dict(with_payload=True)),
        json.dumps(dead.as_dict(with_payload=True)),
        cli(queue_env, "job", dead.id, "--json").stdout,
        cli(queue_env, "dead-letters", "show", dead.id, "--json").stdout,
        queue_env.dump(),
        worker.log(),
    ]
    for text in shown:
        for value in (records.secret, wrong, *tokens):
            assert value not in text


def test_gmail_jwt_token_xoauth2_delivers_through_the_queue(
    queue_env: QueueEnv, worker: Worker, producer: Producer, cloud: CloudServer, pki: Pki
) -> None:
    GraphRecords(queue_env, pki, cloud)  # the CA keystore
    name = unique("gmail")
    user = f"{name}@example.com"
    sa_email = "postroom@postroom-tests.iam.gserviceaccount.com"
    key_path, public_key, private_pem = service_account(queue_env.root, sa_email, name=f"{name}-sa.json")
    cloud.google_public_key, cloud.google_client_email, cloud.google_subject = public_key, sa_email, user
    (queue_env.config / "auth-profiles" / f"{name}-sa.yaml").write_text(
        f"type: jwt_bearer\nservice_account_file: {key_path}\nsubject: {user}\n"
        f"token_url: {cloud.google_token_url}\ntruststore: cloud-ca\n"
    )
    server = xoauth2_server(pki.server_cert, pki.server_key, user, cloud.valid_tokens)
    try:
        (queue_env.accounts / f"{name}.yaml").write_text(
            f"provider: gmail\nsmtp:\n  address: {user}\n  host: 127.0.0.1\n  port: {server.port}\n"
            f"  protocol: starttls\n  truststore: cloud-ca\n  auth: oauth\n  oauth_profile: {name}-sa\n"
        )
        job = finished(producer, producer.send_notification(name, ["a@example.net"], "Hi", "x"))
    finally:
        server.stop()
    assert job.state == "sent" and job.transport == "smtp", job
    (received,) = server.received
    assert received.auth_mechanism == "XOAUTH2" and received.auth_user == user
    (claims,) = cloud.google_claims
    assert claims["iss"] == sa_email and claims["sub"] == user
    key_line = private_pem.splitlines()[1]
    for text in (worker.log(), queue_env.dump()):
        assert key_line not in text
        for token in cloud.valid_tokens():
            assert token not in text
