"""Webhooks (contract §10): events filed with the state change, signed per Standard Webhooks
(checked with the ``standardwebhooks`` package by a real receiver process), retried with the
same ``webhook-id`` across 500s and a receiver SIGKILLed mid-run, replayed on demand; SSRF
refused after DNS resolution; records checked with file:line; the secret shown once."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from support.dnsserver import DnsServer
from support.hookrecv import Receiver, delivered, free_port, new_webhook, refusing_webhook
from support.queue import Live, QueueEnv, cli, finished, unique, wait_for
from support.smtpd import Rule, SmtpServer, unknown_user
from worker.db.vocabulary import JobState
from worker.queue.events import outbox
from worker.queue.events.webhook_sender import WebhookSender, retry_delay, sign
from worker.queue.store import emit
from worker.queue.store.jobs import JobStore
from worker.records.loader import load_webhooks
from worker.records.webhooks import new_secret
from worker.settings import Settings
from worker.transports.public_http import public_transport

ServerFactory = Callable[..., SmtpServer]


def test_the_signature_verifies_with_the_standardwebhooks_package() -> None:
    secret, body = new_secret(), b'{"type":"job.sent"}'
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, body),
    }
    assert Verifier(secret).verify(body, headers) == {"type": "job.sent"}
    headers["webhook-signature"] = sign(new_secret(), "msg_1", now, body)
    with pytest.raises(Exception, match="No matching signature"):
        Verifier(secret).verify(body, headers)


def test_retries_back_off_from_5_seconds_to_an_hour() -> None:
    delays = [retry_delay(n) for n in range(1, 40)]
    assert 4.5 <= delays[0] <= 5.5 and 9 <= delays[1] <= 11
    assert all(3240 <= d <= 3960 for d in delays[12:])  # capped at an hour (± jitter)
    assert sum(delays) > 86400  # 39 attempts span more than the 24 h window


def test_events_reach_a_receiver_that_fails_first_and_is_killed_mid_run(
    live: Live, hook_files: list[str], tmp_path: Path
) -> None:
    queue_env, worker, producer, smtp_server = live
    server = smtp_server(
        mode="plain", rules=[unknown_user("gone@"), Rule("RCPT", 451, "4.3.0 Later", match="slow@")]
    )
    account = queue_env.account(unique("hook"), server)
    name, port = unique("hook"), free_port()
    hook_files.append(name)
    secret = new_webhook(
        queue_env, name, f"http://127.0.0.1:{port}/hook", "--account", account, "--allow-private"
    )
    record = queue_env.config / "webhooks" / f"{name}.yaml"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    receiver = Receiver(tmp_path / "hooks.jsonl", secret, fail_first=1, port=port).start()
    try:
        sent = finished(
            producer, producer.send_notification(account, ["ok@example.net"], "Hello there", "body")
        )
        assert sent.state == "sent"
        wait_for(lambda: (sent.id, "job.sent") in delivered(receiver), 40, "job.sent after a 500", worker)
        first, second = receiver.requests()[:2]
        assert first["answered"] == 500 and second["answered"] == 204
        assert first["webhook_id"] == second["webhook_id"]  # a retry keeps its webhook-id

        receiver.kill()  # events of these jobs are attempted while nobody listens
        failed = finished(producer, producer.send_notification(account, ["gone@example.net"], "s", "b"))
        skipped = finished(producer, producer.send_notification(account, ["gone@example.net"], "s", "b"))
        deferred = finished(producer, producer.send_notification(account, ["slow@example.net"], "s", "b"))
        later = producer.send_notification(account, ["ok@example.net"], "s", "b", send_at=time.time() + 600)
        assert producer.cancel(later)[0]
        assert (failed.state, skipped.state, deferred.state) == ("dead", "suppressed", "dead")
        wait_for(lambda: any(a["status"] is None for a in attempts(queue_env, name)), 20, "a refused attempt")
        receiver.start()

        expected = {
            (failed.id, "job.failed"),
            (skipped.id, "job.suppressed"),
            (deferred.id, "job.deferred"),
            (deferred.id, "job.failed"),
            (later, "job.cancelled"),
        }
        wait_for(lambda: expected <= delivered(receiver), 90, "every event after the restart", worker)
        requests = receiver.requests()
        assert all(r["verified"] for r in requests)
        by_id: dict[str, set[tuple[str, str]]] = {}
        for r in requests:
            by_id.setdefault(r["webhook_id"], set()).add((r["job_id"], r["type"]))
        assert all(len(events) == 1 for events in by_id.values())  # duplicates share their webhook-id
        deferrals = {i for i, ev in by_id.items() if ev == {(deferred.id, "job.deferred")}}
        assert len(deferrals) == 2  # attempts 1 and 2 were deferred, each its own event
        body = json.loads(
            next(r["body"] for r in requests if r["type"] == "job.failed" and r["job_id"] == failed.id)
        )
        assert body["data"]["recipients"]["gone@example.net"]["code"] == 550
        assert body["data"]["state"] == "dead" and "payload" not in body["data"]
        assert body["timestamp"].endswith("Z")
        assert all("Hello there" not in r["body"] for r in requests)  # never the message itself

        def settled() -> bool:  # the receiver logs a request before it answers: the sender records after
            done = cli(queue_env, "status", "--json")
            return done.returncode == 0 and json.loads(done.stdout)["webhooks"][name]["pending"] == 0

        wait_for(settled, 30, "every delivery recorded", worker)
        listed = cli(queue_env, "webhooks", "list", "--json")
        assert listed.returncode == 0 and secret not in listed.stdout
        (row,) = [r for r in json.loads(listed.stdout) if r["name"] == name]
        assert row["pending"] == 0 and row["delivered"] >= 7 and row["failed_attempts"] >= 2
        status = json.loads(cli(queue_env, "status", "--json").stdout)["webhooks"][name]
        assert status["pending"] == 0 and status["delivered"] == row["delivered"]
        assert secret not in worker.log() and secret not in json.dumps(attempts(queue_env, name))

        from worker.web.dashboard.accounts import _account_view

        view = _account_view(producer, account)  # the account page's summary of its webhooks' errors
        assert view is not None
        (shown,) = [h for h in view["webhooks"] if h["name"] == name]
        assert shown["attempts_read"] and shown["errors"] and shown["last_delivered_at"]
        ours = {sent.id, failed.id, skipped.id, deferred.id, later}  # this account's attempts only
        assert {e["last_job"] for e in shown["errors"]} <= ours, shown["errors"]
        assert secret not in json.dumps(view, default=str)

        original = second["webhook_id"]
        again = cli(queue_env, "webhooks", "replay", sent.id, "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {"replayed": [{"webhook": name, "event_id": original}]}
        count = sum(r["webhook_id"] == original for r in requests)
        wait_for(
            lambda: sum(r["webhook_id"] == original for r in receiver.requests()) > count, 20, "the replay"
        )
    finally:
        receiver.stop()


def attempts(env: QueueEnv, name: str) -> list[dict[str, Any]]:
    done = cli(env, "webhooks", "attempts", name, "--json", "--limit", "200")
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def test_a_private_target_is_refused_after_dns_resolution(
    live: Live, hook_files: list[str], tmp_path: Path
) -> None:
    queue_env, worker, producer, smtp_server = live
    account = queue_env.account(unique("ssrf"), smtp_server(mode="plain"))
    name, port = unique("ssrf"), free_port()
    hook_files.append(name)
    secret = new_secret()  # written by hand: `webhooks new` refuses localhost without --allow-private
    (queue_env.config / "webhooks").mkdir(exist_ok=True)  # this test may be the session's first
    (queue_env.config / "webhooks" / f"{name}.yaml").write_text(
        f"url: http://localhost:{port}/hook\nsecret: {secret}\naccounts: [{account}]\n"
    )
    hooks, _ = load_webhooks(queue_env.config)
    queue_env.redis.hset(emit.ROUTES, mapping=outbox.routes_table({name: hooks[name].route()}))
    receiver = Receiver(tmp_path / "ssrf.jsonl", secret, port=port).start()
    try:
        checked = cli(queue_env, "accounts", "check", "--json")
        problems = json.loads(checked.stdout)["webhooks"][name]["problems"]
        assert checked.returncode == 1
        assert any(p["field"] == "url" and p["line"] == 1 and "loopback" in p["reason"] for p in problems)
        finished(producer, producer.send_notification(account, ["ok@example.net"], "s", "b"))
        wait_for(lambda: attempts(queue_env, name), 20, "the refused attempt", worker)
        refused = attempts(queue_env, name)[-1]  # the first (a slow machine may have seen a second)
        assert refused["attempt"] == 1 and refused["outcome"] == "retry" and refused["status"] is None
        assert "localhost resolves to 127.0.0.1, a loopback address: refused" in refused["error"]
        assert receiver.requests() == []  # nothing reached it
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/", "http://[::1]:9/", "http://169.254.169.254/", "http://10.1.2.3/"]
)
def test_the_guard_refuses_every_non_public_address(url: str) -> None:
    async def post() -> None:
        async with httpx.AsyncClient(transport=public_transport()) as client:
            await client.post(url, content=b"{}")

    with pytest.raises(httpx.ConnectError, match="refused"):
        asyncio.run(post())


def test_webhook_records_are_checked_with_file_and_line(own_queue: QueueEnv) -> None:
    folder = own_queue.config / "webhooks"
    folder.mkdir()
    (folder / "typo.yaml").write_text('url: "ftp://x"\nsecret: whsec_short\nevents: [job.sent, job.opened]\n')
    key = new_secret()
    (folder / "stray.yaml").write_text(
        f"url: https://hooks.example.com/x\nsecret: {key}\naccounts: [nobody]\n"
    )
    (folder / "envref.yaml").write_text("url: https://hooks.example.com/y\nsecret: ${HOOK_SECRET_NOT_SET}\n")
    done = cli(own_queue, "accounts", "check", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)["webhooks"]
    texts = {name: [p["text"] for p in entry["problems"]] for name, entry in report.items()}
    typo = "\n".join(texts["typo"])
    assert "webhooks/typo.yaml:1: url: must be an http(s) URL" in typo
    assert "typo.yaml:2: secret:" in typo and "typo.yaml:3: events" in typo and "job.opened" in typo
    assert any("stray.yaml:3: accounts[0]: no account 'nobody'" in t for t in texts["stray"])
    assert any("HOOK_SECRET_NOT_SET is not set" in t for t in texts["envref"])
    hooks, problems = load_webhooks(own_queue.config)
    assert set(hooks) == {"stray", "envref"} and set(problems) == {"typo"}
    assert key not in repr(hooks["stray"]) and key not in done.stdout  # never the key itself


def test_a_delivery_is_given_up_after_its_window_and_retried_with_backoff_before(
    own_queue: QueueEnv, tmp_path: Path
) -> None:
    receiver, _, down = refusing_webhook(own_queue, tmp_path / "down.jsonl")
    store = JobStore(own_queue.redis)
    settings = Settings()
    sender = WebhookSender(f"redis://127.0.0.1:6379/{own_queue.db}", own_queue.config, settings)

    def event_for(job_id: str) -> str:
        own_queue.redis.hset(
            f"postroom:job:{job_id}", mapping={"id": job_id, "account": "a", "state": "sending"}
        )
        store.finish(job_id, "a", state=JobState.SENT, attempt=1)
        (event_id,) = outbox.Outbox(own_queue.redis, 3600).events_of_job(job_id)
        return event_id

    async def deliver(event_id: str) -> None:
        client = sender_client(own_queue)
        try:
            await sender._deliver(client, down, event_id)
        finally:
            await sender.aclose_clients()
            await client.aclose()

    try:
        old = event_for("job-old")
        own_queue.redis.hset(emit.delivery_key("down", old), "created_at", time.time() - 86401)
        asyncio.run(deliver(old))
        assert own_queue.redis.hget(emit.delivery_key("down", old), "state") == "failed"
        assert own_queue.redis.zscore(emit.due_key("down"), old) is None

        fresh = event_for("job-new")
        asyncio.run(deliver(fresh))
        assert own_queue.redis.hget(emit.delivery_key("down", fresh), "state") == "pending"
        due = own_queue.redis.zscore(emit.due_key("down"), fresh)
        assert due is not None and 4.4 < due - time.time() < 5.6
        stats = outbox.Outbox(own_queue.redis, 3600).stats("down")
        assert stats == {"pending": 1, "delivered": 0, "failed_attempts": 2, "given_up": 1}
        assert [r["verified"] for r in receiver.requests()] == [True, True]
    finally:
        receiver.stop()


def sender_client(env: QueueEnv) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis(host="127.0.0.1", port=6379, db=env.db, decode_responses=True)


def test_no_webhook_means_no_event_is_kept(own_queue: QueueEnv) -> None:
    store = JobStore(own_queue.redis)
    own_queue.redis.hset("postroom:job:j1", mapping={"id": "j1", "account": "a", "state": "sending"})
    store.finish("j1", "a", state=JobState.SENT, attempt=1)
    assert own_queue.redis.keys("postroom:webhook:*") == []


def test_only_a_retry_that_spent_an_attempt_is_a_deferral(own_queue: QueueEnv) -> None:
    outbox.publish_routes(own_queue.redis, {"all": {"events": ["job.deferred"], "accounts": ["a"]}})
    store = JobStore(own_queue.redis)
    own_queue.redis.hset("postroom:job:j2", mapping={"id": "j2", "account": "a", "state": "sending"})
    store.finish("j2", "a", state=JobState.RETRYING, attempt=1, retry_in=5.0)  # a limit's wait: no attempt
    assert outbox.Outbox(own_queue.redis, 3600).events_of_job("j2") == []
    store.finish("j2", "a", state=JobState.RETRYING, attempt=1, retry_in=5.0, counter="retried")
    (event_id,) = outbox.Outbox(own_queue.redis, 3600).events_of_job("j2")
    event = outbox.Outbox(own_queue.redis, 3600).event(event_id)
    assert event is not None and event["type"] == "job.deferred" and event["webhooks"] == ["all"]
    assert json.loads(outbox.event_body(event))["data"]["state"] == "retrying"
    store.finish("j2", "b", state=JobState.SENT, attempt=2)  # the route wants no job.sent
    assert len(outbox.Outbox(own_queue.redis, 3600).events_of_job("j2")) == 1


def test_a_receiver_that_never_answers_costs_one_timeout(own_queue: QueueEnv) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does) and never says a word
    try:
        folder = own_queue.config / "webhooks"
        folder.mkdir()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        (folder / "mute.yaml").write_text(f"url: {url}\nsecret: {new_secret()}\nallow_private: true\n")
        hooks, _ = load_webhooks(own_queue.config)
        outbox.publish_routes(own_queue.redis, {"mute": hooks["mute"].route()})
        own_queue.redis.hset("postroom:job:j3", mapping={"id": "j3", "account": "a", "state": "sending"})
        JobStore(own_queue.redis).finish("j3", "a", state=JobState.SENT, attempt=1)
        (event_id,) = outbox.Outbox(own_queue.redis, 3600).events_of_job("j3")
        settings = replace(Settings(), webhook_timeout=0.5)  # the mechanism, not the default's length
        sender = WebhookSender(f"redis://127.0.0.1:6379/{own_queue.db}", own_queue.config, settings)

        async def deliver() -> float:
            client = sender_client(own_queue)
            started = time.monotonic()
            try:
                await sender._deliver(client, hooks["mute"], event_id)
            finally:
                await sender.aclose_clients()
                await client.aclose()
            return time.monotonic() - started

        assert asyncio.run(deliver()) < 5
        (attempt,) = outbox.Outbox(own_queue.redis, 3600).attempts("mute")
        assert attempt["outcome"] == "retry" and attempt["error"] == "no answer within 0.5s"
    finally:
        silent.close()


def test_an_empty_accounts_list_is_refused_when_the_record_loads(own_queue: QueueEnv) -> None:
    """``accounts: []`` once routed every account's events (an empty list read as "all")."""
    folder = own_queue.config / "webhooks"
    folder.mkdir()
    key = new_secret()
    (folder / "none.yaml").write_text(f"url: https://hooks.example.com/x\nsecret: {key}\naccounts: []\n")
    (folder / "all.yaml").write_text(f"url: https://hooks.example.com/y\nsecret: {key}\n")
    hooks, problems = load_webhooks(own_queue.config)
    assert set(hooks) == {"all"} and hooks["all"].route()["accounts"] is None  # left out: every account
    assert "webhooks/none.yaml:3: accounts: names no account" in str(problems["none"][0])
    done = cli(own_queue, "accounts", "check")
    assert done.returncode == 1 and "none.yaml:3: accounts: names no account" in done.stdout


@pytest.mark.parametrize(
    "url",
    ["http://0177.0.0.1/", "http://0x7f.0.0.1/", "http://2130706433/", "http://127.1/", "http://0x7f000001/"],
)
def test_an_unparseable_or_obfuscated_ip_url_is_refused_when_the_record_loads(
    own_queue: QueueEnv, url: str
) -> None:
    folder = own_queue.config / "webhooks"
    folder.mkdir()
    (folder / "odd.yaml").write_text(f"url: {url}\nsecret: {new_secret()}\nallow_private: true\n")
    hooks, problems = load_webhooks(own_queue.config)
    assert hooks == {} and str(problems["odd"][0]).count("odd.yaml:1: url:") == 1
    done = cli(own_queue, "accounts", "check", "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["webhooks"]["odd"]["ok"] is False
    made = cli(own_queue, "webhooks", "new", "other", "--url", url, "--allow-private")
    assert made.returncode == 2 and not (folder / "other.yaml").exists()


def test_accounts_check_warns_of_a_name_that_resolves_to_a_private_address(own_queue: QueueEnv) -> None:
    dns = DnsServer({"hooks.test": [("inside", "A", "10.1.2.3"), ("outside", "A", "93.184.216.34")]})
    try:
        own_queue.env["POSTROOM_DNS_RESOLVER"] = dns.address
        folder = own_queue.config / "webhooks"
        folder.mkdir()
        for name in ("inside", "outside"):
            (folder / f"{name}.yaml").write_text(
                f"url: https://{name}.hooks.test/h\nsecret: {new_secret()}\n"
            )
        done = cli(own_queue, "accounts", "check", "--json")
    finally:
        dns.stop()
    report = json.loads(done.stdout)["webhooks"]
    (warning,) = report["inside"]["problems"]
    assert warning["severity"] == "warning" and warning["field"] == "url" and warning["line"] == 1
    assert "inside.hooks.test resolves to 10.1.2.3, a private address" in warning["reason"]
    assert report["inside"]["ok"] and report["outside"] == {"ok": True, "problems": []}


def test_webhook_records_live_in_postroom_webhooks_dir_when_set(own_queue: QueueEnv, tmp_path: Path) -> None:
    """docker-compose mounts config/ read-only: POSTROOM_WEBHOOKS_DIR (a volume there) is where
    ``webhooks new`` writes, where every reader looks, and what ``webhooks remove`` deletes."""
    folder = tmp_path / "webhooks-volume"
    own_queue.env["POSTROOM_WEBHOOKS_DIR"] = str(folder)
    made = cli(own_queue, "webhooks", "new", "shop", "--url", "https://shop.example/hooks")
    assert made.returncode == 0, made.stderr
    assert (folder / "shop.yaml").is_file() and not (own_queue.config / "webhooks" / "shop.yaml").exists()
    listed = json.loads(cli(own_queue, "webhooks", "list", "--json").stdout)
    assert "shop" in json.dumps(listed), listed
    assert cli(own_queue, "webhooks", "remove", "shop").returncode == 0
    assert not (folder / "shop.yaml").exists()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/h", "http://localhost:9/h", "https://[::1]/h", "http://10.0.0.8/"]
)
def test_webhooks_new_refuses_a_private_target_unless_allowed(own_queue: QueueEnv, url: str) -> None:
    refused = cli(own_queue, "webhooks", "new", "mine", "--url", url)
    assert refused.returncode == 2 and "--allow-private" in refused.stderr and refused.stdout == ""
    assert not (own_queue.config / "webhooks" / "mine.yaml").exists()
    made = cli(own_queue, "webhooks", "new", "mine", "--url", url, "--allow-private")
    assert made.returncode == 0 and made.stdout.startswith("whsec_")


def test_webhooks_remove_deletes_the_record_and_its_route(own_queue: QueueEnv) -> None:
    new_webhook(own_queue, "gone", "https://hooks.example.com/g")
    new_webhook(own_queue, "kept", "https://hooks.example.com/k")
    assert set(own_queue.redis.hkeys(emit.ROUTES)) == {"gone", "kept"}
    done = cli(own_queue, "webhooks", "remove", "gone", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "gone" and json.loads(done.stdout)["routes_published"] is True
    assert not (own_queue.config / "webhooks" / "gone.yaml").exists()
    assert set(own_queue.redis.hkeys(emit.ROUTES)) == {"kept"}
    again = cli(own_queue, "webhooks", "remove", "gone")
    assert again.returncode == 1 and "no webhook 'gone'" in again.stderr
