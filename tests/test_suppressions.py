"""Suppression lists (contract §10): a 5.1.x refusal suppresses the address, later jobs never
offer it, a job of only suppressed recipients ends ``suppressed``; CLI, HTTP, status, expiry."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest

from support.queue import POSTROOM, Live, QueueEnv, cli, finished, unique
from support.smtpd import Rule, SmtpServer, unknown_user
from support.web import write_key
from worker.client import Producer
from worker.mail.message import check_text
from worker.queue.store import suppressions
from worker.queue.store.suppressions import ListFull, Suppressions, hard_bounce
from worker.records.addresses import parse_mailbox

ServerFactory = Callable[..., SmtpServer]


def suppressed(env: QueueEnv, account: str) -> list[dict[str, object]]:
    done = cli(env, "suppressions", "list", account, "--json")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, object]] = json.loads(done.stdout)["entries"]
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
    assert [e["address"] for e in lists.page(account).entries] == ["bob@xn--bcher-kva.example"]
    assert lists.among([(account, ["old@example.net", "bob@xn--bcher-kva.example"])]) == [
        {"bob@xn--bcher-kva.example": lists.page(account).entries[0]}
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
    assert httpx.get(url, headers=headers).json() == {
        "account": mine,
        "suppressions": [],
        "next": None,
        "total": 0,
    }
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


def test_a_list_is_read_a_page_at_a_time_in_order(own_queue: QueueEnv) -> None:
    lists, t = Suppressions(own_queue.redis), time.time() - 1000
    lists.add_many("acct", [(f"a{i:03}@example.net", "gone", 550, None) for i in range(250)], now=t + 10)
    lists.add("acct", "tie-b@example.net", reason="b", now=t)  # two entries at the same time
    lists.add("acct", "tie-a@example.net", reason="a", now=t)
    lists.add("acct", "expired@example.net", reason="old", now=t - 400 * 86400)
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = lists.page("acct", 100, after)
        assert page.total >= 251 and len(page.entries) <= 100
        seen += [str(e["address"]) for e in page.entries]
        pages += 1
        if page.next is None:
            break
        after = page.next
        if pages == 1:
            lists.remove("acct", seen[-1])  # the cursor's own entry gone: the next page still follows
    assert seen == ["tie-a@example.net", "tie-b@example.net", *(f"a{i:03}@example.net" for i in range(250))]
    assert pages == 3 and lists.count("acct") == 251  # the expired one was dropped on the way
    one = lists.page("acct", 1)
    assert lists.page("acct", 1, one.next).entries[0]["address"] == "tie-b@example.net"
    with pytest.raises(ValueError, match="cursor"):
        lists.page("acct", 10, "not-a-cursor")


def test_entries_written_without_the_index_are_indexed_when_listed(own_queue: QueueEnv) -> None:
    """A hash an earlier release wrote (address → entry alone) is listed all the same."""
    entry = {"address": "old@example.net", "reason": "r", "code": None, "source": "operator",
             "job_id": None, "at": time.time(), "expires_at": time.time() + 60}  # fmt: skip
    own_queue.redis.hset(suppressions.key("acct"), "old@example.net", json.dumps(entry))
    assert [e["address"] for e in Suppressions(own_queue.redis).page("acct").entries] == ["old@example.net"]


def test_a_full_list_drops_its_oldest_automatic_entry_never_an_operators(own_queue: QueueEnv) -> None:
    lists, t = Suppressions(own_queue.redis, limit=3), time.time() - 100
    lists.add("acct", "op1@example.net", reason="by hand", now=t)
    lists.add_many("acct", [("auto1@example.net", "550 5.1.1", 550, "j1")], now=t + 1)
    lists.add_many("acct", [("auto2@example.net", "550 5.1.1", 550, "j2")], now=t + 2)
    lists.add_many("acct", [("auto3@example.net", "550 5.1.1", 550, "j3")], now=t + 3)
    assert addresses(lists) == ["op1@example.net", "auto2@example.net", "auto3@example.net"]
    lists.add("acct", "op2@example.net", reason="by hand", now=t + 4)
    lists.add("acct", "op3@example.net", reason="by hand", now=t + 5)
    assert addresses(lists) == ["op1@example.net", "op2@example.net", "op3@example.net"]
    with pytest.raises(ListFull):
        lists.add("acct", "op4@example.net", reason="by hand", now=t + 6)
    assert lists.add_many("acct", [("auto4@example.net", "550 5.1.1", 550, "j4")], now=t + 7) == []
    assert lists.count("acct") == 3 and lists.among([("acct", ["auto4@example.net"])]) == [{}]
    lists.add("acct", "op1@example.net", reason="again", now=t + 8)  # already listed: room enough
    assert addresses(lists)[-1] == "op1@example.net"


def addresses(lists: Suppressions) -> list[str]:
    return [str(e["address"]) for e in lists.page("acct", 1000).entries]


def test_the_cli_and_the_api_page_and_the_limit_holds(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    account = queue_env.account(unique("suppage"), smtp_server(mode="plain"))
    lists = Suppressions(queue_env.redis)
    lists.add_many(account, [(f"p{i}@example.net", "gone", 550, None) for i in range(5)])
    first = cli(queue_env, "suppressions", "list", account, "--limit", "2", "--json")
    page = json.loads(first.stdout)
    assert [e["address"] for e in page["entries"]] == ["p0@example.net", "p1@example.net"]
    assert page["total"] == 5 and page["next"]
    text = cli(queue_env, "suppressions", "list", account, "--limit", "2")
    assert text.stdout.count("@example.net") == 2 and "first 2 of 5; more: --after" in text.stderr
    rest = json.loads(
        cli(queue_env, "suppressions", "list", account, "--after", page["next"], "--json").stdout
    )
    assert [e["address"] for e in rest["entries"]] == [f"p{i}@example.net" for i in range(2, 5)]
    assert rest["next"] is None
    assert cli(queue_env, "suppressions", "list", account, "--after", "nonsense").returncode == 2
    base, _ = api
    headers = {"Authorization": f"Bearer {write_key(queue_env, unique('k'), [account])}"}
    url = f"{base}/v1/accounts/{account}/suppressions"
    got = httpx.get(url, headers=headers, params={"limit": 3}).json()
    assert len(got["suppressions"]) == 3 and got["total"] == 5
    after = httpx.get(url, headers=headers, params={"limit": 3, "after": got["next"]}).json()
    assert [e["address"] for e in after["suppressions"]] == ["p3@example.net", "p4@example.net"]
    assert httpx.get(url, headers=headers, params={"limit": 100_000}).status_code == 422
    full = dict(queue_env.env, POSTROOM_SUPPRESSION_LIMIT="5")
    crowded = subprocess.run(
        [POSTROOM, "suppressions", "add", account, "new@example.net"], env={**os.environ, **full},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert crowded.returncode == 0 and lists.count(account) == 5  # the oldest automatic one went
    assert "p0@example.net" not in {e["address"] for e in lists.page(account).entries}


@pytest.mark.parametrize("reason", ["two\r\nlines", "nul\x00", "esc \x1b[2J", "rlo \u202e", "zwsp \u200b"])
def test_a_reason_an_operator_reads_refuses_control_and_bidi_characters(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory, reason: str
) -> None:
    account = queue_env.account(unique("supctl"), smtp_server(mode="plain"))
    if "\x00" not in reason:  # no argv holds a NUL: the API's test alone
        done = cli(queue_env, "suppressions", "add", account, "a@example.net", "--reason", reason)
        assert done.returncode == 2 and "U+" in done.stderr and reason not in done.stderr
    base, _ = api
    headers = {"Authorization": f"Bearer {write_key(queue_env, unique('k'), [account])}"}
    url = f"{base}/v1/accounts/{account}/suppressions"
    reply = httpx.post(url, headers=headers, json={"address": "a@example.net", "reason": reason})
    assert reply.status_code == 422 and reply.json()["problems"][0]["field"] == "reason", reply.text
    assert Suppressions(queue_env.redis).count(account) == 0


@pytest.mark.parametrize(
    "address", ["bob\u202e@example.net", "\u200bbob@example.net", "Bo\u202eb <bob@example.net>"]
)
def test_an_address_with_a_bidi_or_invisible_character_is_refused(queue_env: QueueEnv, address: str) -> None:
    with pytest.raises(ValueError, match="U\\+20"):
        parse_mailbox(address)
    with pytest.raises(ValueError, match="U\\+202E"):
        check_text("Your order \u202etxt.exe", "subject")
    assert check_text("family \U0001f468\u200d\U0001f469\u200d\U0001f467", "subject")  # ZWJ: an emoji's


def test_text_from_elsewhere_is_printed_escaped(queue_env: QueueEnv, smtp_server: ServerFactory) -> None:
    """A server's reply (or an older record) may hold ESC or CR: the terminal never obeys it."""
    account = queue_env.account(unique("supesc"), smtp_server(mode="plain"))
    Suppressions(queue_env.redis).add_many(
        account, [("x@example.net", "5.1.1 \x1b[2J\r\u202egone", 550, None)]
    )
    done = cli(queue_env, "suppressions", "list", account)
    assert done.returncode == 0 and "\x1b" not in done.stdout and "\r" not in done.stdout
    assert "\\u001b[2J\\u000d\\u202egone" in done.stdout
