"""Suppression lists (contract §10): a 5.1.x refusal suppresses the address, later jobs never
offer it, a job of only suppressed recipients ends ``suppressed``; CLI, HTTP, status, expiry."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from support.queue import Live, QueueEnv, cli, finished, unique
from support.smtpd import Rule, SmtpServer, unknown_user
from support.web import write_key
from worker.client import Producer
from worker.queue.store.suppressions import Suppressions, hard_bounce

ServerFactory = Callable[..., SmtpServer]


def suppressed(env: QueueEnv, account: str) -> list[dict[str, object]]:
    done = cli(env, "suppressions", "list", account, "--json")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, object]] = json.loads(done.stdout)
    return listed


def test_a_5_1_1_refusal_suppresses_the_address_and_later_jobs_skip_it(live: Live) -> None:
    queue_env, _, producer, smtp_server = live
    policy = Rule("RCPT", 550, "5.7.1 Relaying denied by policy", match="policy@example.net")
    server = smtp_server(mode="plain", rules=[unknown_user("gone@example.net"), policy])
    account = queue_env.account(unique("sup"), server)
    first = finished(
        producer,
        producer.send_notification(
            account, ["ok@example.net", "Gone <gone@example.net>", "policy@example.net"], "One", "x"
        ),
    )
    assert first.state == "sent" and first.recipients["gone@example.net"]["status"] == "failed"
    (entry,) = suppressed(queue_env, account)  # 5.7.1 is the server's policy, not a missing mailbox
    assert entry["address"] == "gone@example.net" and entry["source"] == "automatic"
    assert entry["code"] == 550 and "5.1.1" in str(entry["reason"]) and entry["job_id"] == first.id

    rcpts_before = server.commands.count("RCPT")
    second = finished(
        producer, producer.send_notification(account, ["ok@example.net", "GONE@example.net"], "Two", "x")
    )
    assert second.state == "sent"
    assert second.recipients["GONE@example.net"]["status"] == "suppressed"  # found whatever its case
    assert server.commands.count("RCPT") == rcpts_before + 1  # only ok@ was offered
    assert server.received[-1].rcpt_tos == ["ok@example.net"]

    mails_before = server.commands.count("MAIL")
    only = finished(producer, producer.send_notification(account, ["gone@example.net"], "Three", "x"))
    assert only.state == "suppressed" and "suppression list" in (
        only.last_error or only.history[-1].get("error", "")
    )
    assert server.commands.count("MAIL") == mails_before  # nothing offered at all

    status = json.loads(cli(queue_env, "status", "--json").stdout)
    assert status["accounts"][account]["suppressed"] == 1

    assert cli(queue_env, "suppressions", "remove", account, "gone@example.net").returncode == 0
    assert suppressed(queue_env, account) == []
    assert cli(queue_env, "suppressions", "remove", account, "gone@example.net").returncode == 1
    server.rules.clear()  # the mailbox exists again
    again = finished(producer, producer.send_notification(account, ["gone@example.net"], "Four", "x"))
    assert again.state == "sent" and server.received[-1].rcpt_tos == ["gone@example.net"]


def test_operators_add_by_hand_and_entries_expire(queue_env: QueueEnv, smtp_server: ServerFactory) -> None:
    account = queue_env.account(unique("supcli"), smtp_server(mode="plain"))
    added = cli(
        queue_env, "suppressions", "add", account, "Bob <bob@bücher.example>", "--reason", "asked", "--json"
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["address"] == "bob@xn--bcher-kva.example"
    assert [e["source"] for e in suppressed(queue_env, account)] == ["operator"]
    assert cli(queue_env, "suppressions", "add", "no-such-account", "a@example.net").returncode == 1
    assert cli(queue_env, "suppressions", "add", account, "not an address").returncode == 2

    lists = Suppressions(queue_env.redis, ttl=60)
    lists.add(account, "old@example.net", reason="test", now=0)  # expired long ago
    assert [e["address"] for e in lists.entries(account)] == ["bob@xn--bcher-kva.example"]
    assert lists.among([(account, ["old@example.net", "bob@xn--bcher-kva.example"])]) == [
        {"bob@xn--bcher-kva.example": lists.entries(account)[0]}
    ]


@pytest.mark.parametrize(
    ("result", "bounce"),
    [
        ({"status": "failed", "code": 550, "message": "5.1.1 No such user"}, True),
        ({"status": "failed", "code": 553, "message": "5.1.3 Bad address syntax"}, True),
        ({"status": "failed", "code": 550, "message": "5.7.1 Policy"}, False),
        ({"status": "deferred", "code": 450, "message": "4.1.1 Try later"}, False),
        ({"status": "failed", "code": 550, "message": "No such user"}, False),  # no enhanced code: unsure
        ({"status": "sent", "code": 250, "message": "2.1.5 OK"}, False),
    ],
)
def test_only_a_permanent_5_1_x_refusal_counts_as_a_hard_bounce(
    result: dict[str, object], bounce: bool
) -> None:
    assert hard_bounce(result) is bounce


def test_the_http_api_lists_adds_and_removes_for_its_own_accounts(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    base, _ = api
    mine = queue_env.account(unique("supa"), smtp_server(mode="plain"))
    theirs = queue_env.account(unique("supb"), smtp_server(mode="plain"))
    headers = {"Authorization": f"Bearer {write_key(queue_env, unique('k'), [mine])}"}
    url = f"{base}/v1/accounts/{mine}/suppressions"
    assert httpx.get(url, headers=headers).json() == {"account": mine, "suppressions": []}
    added = httpx.post(
        url, headers=headers, json={"address": "Carol <carol@example.net>", "reason": "bounced"}
    )
    assert added.status_code == 201, added.text
    assert added.json()["address"] == "carol@example.net" and added.json()["source"] == "operator"
    assert [e["address"] for e in httpx.get(url, headers=headers).json()["suppressions"]] == [
        "carol@example.net"
    ]
    other = f"{base}/v1/accounts/{theirs}/suppressions"
    assert httpx.get(other, headers=headers).status_code == 403
    assert httpx.post(other, headers=headers, json={"address": "x@example.net"}).status_code == 403
    assert httpx.post(url, headers=headers, json={"address": "nope"}).status_code == 422
    assert httpx.delete(url, headers=headers, params={"address": "carol@example.net"}).status_code == 204
    assert httpx.delete(url, headers=headers, params={"address": "carol@example.net"}).status_code == 404
    assert httpx.get(url).status_code == 401
