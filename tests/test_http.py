"""The HTTP submission API through a real uvicorn server (port 0), real Redis and a real worker."""

from __future__ import annotations

import hmac
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.queue import QueueEnv, Worker, unique, wait_for
from support.smtpd import PASSWORD, SmtpServer
from support.web import ApiServer, postroom_http, write_key
from worker.client import Producer
from worker.web import apikeys
from worker.web import http as http_api

ServerFactory = Callable[..., SmtpServer]
POSTROOM = str(Path(sys.executable).with_name("postroom"))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def message(account: str, **fields: Any) -> dict[str, Any]:
    return {"account": account, "to": ["to@example.net"], "subject": "Hi", "text": "Hello\n", **fields}


def sent_job(base: str, token: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(token)).json()
        if body.get("state") in ("sent", "dead", "suppressed") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_end_to_end_submission_is_delivered_and_followed_to_sent(
    queue_env: QueueEnv,
    worker: Worker,
    api: tuple[str, Producer],
    smtp_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    base, _ = api
    server = smtp_server(mode="plain")
    account = queue_env.account(unique("http"), server)
    token = write_key(queue_env, unique("shop"), [account])
    reply = httpx.post(f"{base}/v1/messages", headers=auth(token), json=message(account, subject="Via HTTP"))
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["job_id"]
    job = sent_job(base, token, job_id)
    assert job["state"] == "sent", job
    assert job["recipients"]["to@example.net"]["status"] == "sent"
    assert job["account"] == account and job["id"] == job_id
    assert set(job) >= {"id", "state", "attempts", "account", "transport", "security", "message_id"}
    wait_for(lambda: any(r.message["Subject"] == "Via HTTP" for r in server.received), 10, "the message")
    batch = httpx.post(
        f"{base}/v1/batches",
        headers=auth(token),
        json={"messages": [message(account, subject="B1"), message(account, subject="B2")]},
    )
    assert batch.status_code == 202, batch.text
    ids = batch.json()["job_ids"]
    assert len(ids) == 2 and all(sent_job(base, token, i)["state"] == "sent" for i in ids)
    # the key appears in no response and no log line
    assert token not in caplog.text and token.rpartition(".")[2] not in caplog.text
    assert token not in reply.text + batch.text + json.dumps(job)


def test_without_a_valid_key_401(queue_env: QueueEnv, api: tuple[str, Producer]) -> None:
    base, _ = api
    token = write_key(queue_env, unique("k401"), ["*"])
    name, _, secret = token.rpartition(".")
    for headers in ({}, auth("nonsense"), auth(f"{name}.{secret[:-2]}xx"), auth(f"nobody.{secret}")):
        for method, path in (("POST", "/v1/messages"), ("GET", "/v1/accounts"), ("GET", "/v1/jobs/x")):
            reply = httpx.request(method, base + path, headers=headers, json=message("a"))
            assert reply.status_code == 401, (headers, path, reply.text)
            assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{base}/v1/accounts", headers=auth(token)).status_code == 200


def test_key_limited_to_one_account_403_and_accounts_list(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    base, _ = api
    server = smtp_server(mode="plain")
    mine = queue_env.account(unique("mine"), server)
    other = queue_env.account(unique("other"), server, password="${QUEUE_TEST_PASSWORD}")
    token = write_key(queue_env, unique("one"), [mine])
    before = queue_env.queue_length()
    refused = httpx.post(f"{base}/v1/messages", headers=auth(token), json=message(other))
    assert refused.status_code == 403, refused.text
    unknown = httpx.post(f"{base}/v1/messages", headers=auth(token), json=message("no-such-account"))
    assert unknown.status_code == 403 and mine not in unknown.text  # no list of known accounts
    mixed = httpx.post(
        f"{base}/v1/batches", headers=auth(token), json={"messages": [message(mine), message(other)]}
    )
    assert mixed.status_code == 403 and mixed.json()["problems"][0]["field"] == "messages[1].account"
    assert queue_env.queue_length() == before
    listed = httpx.get(f"{base}/v1/accounts", headers=auth(token))
    assert listed.status_code == 200
    assert list(listed.json()["accounts"]) == [mine]
    assert listed.json()["accounts"][mine]["state"] in ("ok", "degraded", "paused")
    everything = write_key(queue_env, unique("all"), ["*"])
    shown = httpx.get(f"{base}/v1/accounts", headers=auth(everything)).text
    assert mine in shown and other in shown and PASSWORD not in shown


def test_validation_errors_have_field_paths_and_match_the_producer(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    base, producer = api
    account = queue_env.account(unique("valid"), smtp_server(mode="plain"))
    token = write_key(queue_env, unique("v"), [account])
    bad = message(account, to=["not an address"], subject="two\r\nlines", headers={"X-A": "b\nc"})
    reply = httpx.post(f"{base}/v1/messages", headers=auth(token), json=bad)
    assert reply.status_code == 422, reply.text
    fields = {p["field"] for p in reply.json()["problems"]}
    assert {"to[0]", "subject", "headers"} <= fields
    with pytest.raises(Exception) as raised:
        producer.validate(bad)
    expected = [p.partition(": ") for p in raised.value.problems]  # type: ignore[attr-defined]
    assert [(p["field"], p["message"]) for p in reply.json()["problems"]] == [(f, m) for f, _, m in expected]
    batch = httpx.post(
        f"{base}/v1/batches", headers=auth(token), json={"messages": [message(account), {"account": account}]}
    )
    assert batch.status_code == 422 and batch.json()["problems"][0]["field"].startswith("messages[1]")
    not_json = httpx.post(f"{base}/v1/messages", headers=auth(token), content=b"{nope")
    assert not_json.status_code == 400
    assert httpx.post(f"{base}/v1/messages", headers=auth(token), json=[1]).status_code == 422
    assert httpx.post(f"{base}/v1/batches", headers=auth(token), json={"messages": []}).status_code == 422


def test_every_4xx_has_the_one_error_format_and_never_echoes_the_input(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    """FastAPI's own 422s (field lengths, query bounds) and Starlette's 404/405 answer as
    ``{"error", "problems": [{field, message}]}`` like every other error, naming the rule only."""
    base, _ = api
    account = queue_env.account(unique("fmt"), smtp_server(mode="plain"))
    token = write_key(queue_env, unique("f"), [account])
    url = f"{base}/v1/accounts/{account}/suppressions"
    long = "Z" * 10_000
    answers = [
        httpx.post(url, headers=auth(token), json={"address": "a@example.net", "reason": long}),
        httpx.post(url, headers=auth(token), json={"address": long + "@example.net"}),
        httpx.delete(url, headers=auth(token), params={"address": long}),
        httpx.get(url, headers=auth(token), params={"limit": "0"}),
    ]
    for reply in answers:
        assert reply.status_code == 422, reply.text
        body = reply.json()
        assert set(body) == {"error", "problems"} and body["problems"], body
        assert "ZZZZ" not in reply.text and len(reply.content) < 1000
    fields = [answers[0].json()["problems"][0]["field"], answers[3].json()["problems"][0]["field"]]
    assert fields == ["reason", "limit"]
    assert "300" in answers[0].json()["problems"][0]["message"]
    missing = httpx.get(f"{base}/v1/no-such-thing", headers=auth(token))
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found", "problems": []}
    wrong = httpx.put(f"{base}/v1/messages", headers=auth(token))
    assert (
        wrong.status_code == 405 and set(wrong.json()) == {"error", "problems"} and "allow" in wrong.headers
    )


def test_body_over_the_cap_413(queue_env: QueueEnv, api: tuple[str, Producer]) -> None:
    base, _ = api
    token = write_key(queue_env, unique("big"), ["*"])
    big = message("x", text="a" * 70 * 1024)
    assert httpx.post(f"{base}/v1/messages", headers=auth(token), json=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"account": "x", "text": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    reply = httpx.post(f"{base}/v1/messages", headers=auth(token), content=chunks())
    assert reply.status_code == 413


def test_another_keys_job_is_404(
    queue_env: QueueEnv, api: tuple[str, Producer], smtp_server: ServerFactory
) -> None:
    base, producer = api
    account = queue_env.account(unique("shared"), smtp_server(mode="plain"))
    first = write_key(queue_env, unique("first"), [account])
    second = write_key(queue_env, unique("second"), [account])
    job_id = httpx.post(f"{base}/v1/messages", headers=auth(first), json=message(account)).json()["job_id"]
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(first)).status_code == 200
    hidden = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(second))
    assert hidden.status_code == 404 and account not in hidden.text
    # a job enqueued without the API (no key recorded) is nobody's over HTTP
    direct = producer.enqueue(message(account))
    assert httpx.get(f"{base}/v1/jobs/{direct}", headers=auth(first)).status_code == 404
    assert httpx.get(f"{base}/v1/jobs/{uuid.uuid4()}", headers=auth(first)).status_code == 404
    # an idempotency key reused by the same key gives its job back; by another key, a 409
    once = message(account, idempotency_key=unique("idem-"))
    owner_id = httpx.post(f"{base}/v1/messages", headers=auth(first), json=once).json()["job_id"]
    again = httpx.post(f"{base}/v1/messages", headers=auth(first), json=once)
    assert again.status_code == 202 and again.json()["job_id"] == owner_id
    taken = httpx.post(f"{base}/v1/messages", headers=auth(second), json=once)
    assert taken.status_code == 409 and owner_id not in taken.text
    batch = httpx.post(
        f"{base}/v1/batches", headers=auth(second), json={"messages": [message(account), once]}
    )
    assert batch.status_code == 409 and batch.json()["problems"][0]["field"] == "messages[1].idempotency_key"


def test_rate_limit_per_key_429_with_retry_after(queue_env: QueueEnv, api: tuple[str, Producer]) -> None:
    base, _ = api
    limited = write_key(queue_env, unique("slow"), ["*"], rate="3/hour")
    other = write_key(queue_env, unique("fast"), ["*"])
    codes = [httpx.get(f"{base}/v1/accounts", headers=auth(limited)).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    over = httpx.get(f"{base}/v1/accounts", headers=auth(limited))
    assert over.status_code == 429
    assert 1 <= int(over.headers["retry-after"]) <= 3600
    assert httpx.get(f"{base}/v1/accounts", headers=auth(other)).status_code == 200


def test_an_address_that_keeps_failing_to_authenticate_gets_429(queue_env: QueueEnv) -> None:
    producer = Producer(queue_env.broker_url, accounts_dir=queue_env.accounts, config_dir=queue_env.config)
    server = ApiServer(http_api.create_app(producer, failures="3/hour"))
    try:
        token = write_key(queue_env, unique("ok"), ["*"])
        while time.time() % 3600 > 3590:  # the requests below must share one window
            time.sleep(0.5)
        me = {"X-Forwarded-For": f"10.7.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
        url = f"{server.url}/v1/accounts"
        codes = [httpx.get(url, headers={**me, **auth(f"nobody.x{i}")}).status_code for i in range(3)]
        assert codes == [401, 401, 401]
        blocked = httpx.get(url, headers={**me, **auth(token)})  # a right key from there waits too
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 3600
        assert "without a valid API key" in blocked.json()["error"]
        assert httpx.get(url, headers={"X-Forwarded-For": "10.6.0.1", **auth(token)}).status_code == 200
    finally:
        server.stop()
        producer.close()


def test_keys_are_compared_in_constant_time(
    queue_env: QueueEnv, api: tuple[str, Producer], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = api
    token = write_key(queue_env, unique("ct"), ["*"])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # worker/web/apikeys.py looks it up at each call
    assert httpx.get(f"{base}/v1/accounts", headers=auth(token)).status_code == 200
    assert httpx.get(f"{base}/v1/accounts", headers=auth(token + "x")).status_code == 401
    assert httpx.get(f"{base}/v1/accounts", headers=auth("unknown.secret")).status_code == 401
    ours = [(a, b) for a, b in calls if isinstance(b, bytes) and b.startswith(b"sha256:")]
    assert len(ours) == 3  # one per request: an unknown name still costs one comparison


def test_pbkdf2_hashes_are_accepted(tmp_path: Path) -> None:
    token = apikeys.new_token("legacy")
    folder = tmp_path / "api-keys"
    folder.mkdir()
    (folder / "legacy.yaml").write_text(
        f"hash: {apikeys.hash_token(token, pbkdf2_iterations=1000)}\naccounts: [orders]\n"
    )
    (folder / "broken.yaml").write_text("hash: md5:abc\naccounts: []\nrate: lots\n")
    keys, problems = apikeys.load_api_keys(tmp_path)
    assert apikeys.verify(keys, token) is keys["legacy"]
    assert apikeys.verify(keys, token[:-1]) is None
    text = "\n".join(str(p) for p in problems["broken"])
    assert "broken.yaml:1: hash:" in text and "broken.yaml:2: accounts:" in text and ":3: rate:" in text


def test_health_endpoints(api: tuple[str, Producer]) -> None:
    base, _ = api
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    unreachable = Producer("redis://127.0.0.1:1/0")
    server = ApiServer(http_api.create_app(unreachable, keys={}))
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/readyz").status_code == 503
    finally:
        server.stop()
        unreachable.close()


def test_checked_in_openapi_document_is_the_served_one(api: tuple[str, Producer]) -> None:
    base, _ = api
    served = httpx.get(f"{base}/openapi.json").json()
    assert served == json.loads(http_api.OPENAPI_PATH.read_text()), (
        "worker/web/openapi.json is stale: postroom http --openapi > worker/web/openapi.json"
    )
    assert {"/v1/messages", "/v1/batches", "/v1/jobs/{job_id}", "/v1/accounts", "/healthz", "/readyz"} <= set(
        served["paths"]
    )


def test_postroom_http_and_api_keys_new_commands(queue_env: QueueEnv, tmp_path: Path) -> None:
    """The commands an operator types: a key made by ``postroom api-keys new`` works on ``postroom http``."""
    env = {**os.environ, **queue_env.env, "POSTROOM_HTTP_AUTH_FAILURES": "3/minute"}
    env.pop("FORWARDED_ALLOW_IPS", None)
    for counted in queue_env.redis.scan_iter("postroom:failures:*"):  # earlier tests' bad keys
        queue_env.redis.delete(counted)
    name = unique("cli")
    made = subprocess.run(
        [POSTROOM, "api-keys", "new", name, "--account", "*", "--rate", "10/second"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    record = (queue_env.config / "api-keys" / f"{name}.yaml").read_text()
    assert token.startswith(f"{name}.") and token not in record and "sha256:" in record
    log = tmp_path / "http.log"
    with postroom_http(env, log) as base:
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.get(f"{base}/v1/accounts", headers=auth(token)).status_code == 200
        assert httpx.get(f"{base}/v1/accounts", headers=auth(token + "x")).status_code == 401
        login = httpx.get(f"{base}/dashboard/login")  # the operator dashboard is served there too
        assert login.status_code == 200 and "Operator login" in login.text
        # X-Forwarded-For is not trusted unless FORWARDED_ALLOW_IPS names the proxies: a client
        # cannot claim a fresh address for each guess and escape the limit on failed keys
        for n in range(3):
            spoofed = {**auth(token + "x"), "X-Forwarded-For": f"203.0.113.{n}"}
            assert httpx.get(f"{base}/v1/accounts", headers=spoofed).status_code in (401, 429)
        again = {**auth(token), "X-Forwarded-For": "198.51.100.7"}
        assert httpx.get(f"{base}/v1/accounts", headers=again).status_code == 429
    assert token not in log.read_text() and token.rpartition(".")[2] not in log.read_text()


def test_keys_live_in_postroom_api_keys_dir_when_set(queue_env: QueueEnv, tmp_path: Path) -> None:
    """docker-compose mounts config/ read-only: POSTROOM_API_KEYS_DIR (a volume there) is where
    ``api-keys new`` writes and where ``postroom http`` reads; config/api-keys is left alone."""
    keys_dir = tmp_path / "keys-volume"
    env = {**os.environ, **queue_env.env, "POSTROOM_API_KEYS_DIR": str(keys_dir)}
    name = unique("volume")
    made = subprocess.run(
        [POSTROOM, "api-keys", "new", name, "--account", "*"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert (keys_dir / f"{name}.yaml").is_file() and str(keys_dir) in made.stderr
    assert not (queue_env.config / "api-keys" / f"{name}.yaml").exists()
    with postroom_http(env, tmp_path / "http.log") as base:
        assert httpx.get(f"{base}/v1/accounts", headers=auth(token)).status_code == 200
    elsewhere = {k: v for k, v in env.items() if k != "POSTROOM_API_KEYS_DIR"}
    with postroom_http(elsewhere, tmp_path / "http-2.log") as base:  # not in config/api-keys
        assert httpx.get(f"{base}/v1/accounts", headers=auth(token)).status_code == 401


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_from_the_openapi_document_finds_no_5xx(
    queue_env: QueueEnv, api: tuple[str, Producer], mode: str
) -> None:
    """schemathesis generates requests from worker/web/openapi.json (valid ones, then invalid ones)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.core.result import Ok

    base, _ = api
    token = write_key(queue_env, unique("fuzz"), ["*"], rate="100000/hour")
    schema = schemathesis.openapi.from_path(str(http_api.OPENAPI_PATH))
    generation = schemathesis.GenerationMode(mode)
    strategies = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is sound
        operation = result.ok()
        try:
            strategies.append(operation.as_strategy(generation))
        except Exception:  # an operation without anything to make invalid (GET /healthz)
            assert mode == "negative"
    failures: list[str] = []
    seen: set[int] = set()

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    @given(st.one_of(strategies), st.booleans())
    def check(case: Any, with_key: bool) -> None:
        response = case.call(base_url=base, headers=auth(token) if with_key else {})
        seen.add(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}")

    check()
    assert not failures, "\n".join(failures[:5])
    assert {200, 401, 404, 422} <= seen, seen  # it got past the key and into validation
