"""The operator dashboard in a real headless browser (Debian's chromium driven by Playwright),
against a real uvicorn (port 0), real Redis, a real worker and aiosmtpd servers."""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, expect, sync_playwright

from support.pki import Pki
from support.queue import QueueEnv, Worker, cli, finished, unique, wait_for
from support.smtpd import PASSWORD, Rule, SmtpServer, unknown_user
from support.web import ApiServer, write_key
from worker.client import Producer
from worker.queue.store.suppressions import Suppressions
from worker.web import http as http_api
from worker.web.dashboard.app import SESSION_COOKIE, DashboardSettings
from worker.web.dashboard.charts import TOP, legend_value, line_chart

ServerFactory = Callable[..., SmtpServer]
CHROMIUM = os.environ.get("POSTROOM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLOW = 20_000  # ms: what the browser may take on a busy 2-core machine
expect.set_options(timeout=SLOW)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium (never a browser Playwright downloads); missing, the tests fail."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no chromium at {CHROMIUM}: the dashboard tests need Debian's chromium "
            "(`make tools` as root installs it: apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) per test."""
    made = browser.new_context()
    made.set_default_timeout(SLOW)
    yield made
    made.close()


@dataclass
class Dashboard:
    url: str  # http://127.0.0.1:PORT
    producer: Producer
    operator: str  # the operator key NAME.SECRET


def start_dashboard(env: QueueEnv, **settings: Any) -> tuple[ApiServer, Producer]:
    producer = Producer(env.broker_url, accounts_dir=env.accounts, config_dir=env.config)
    options = {"refresh": 600, **settings}  # no refresh while a test clicks, unless asked for
    return ApiServer(http_api.create_app(producer, dashboard_settings=DashboardSettings(**options))), producer


@pytest.fixture
def dashboard(queue_env: QueueEnv) -> Iterator[Dashboard]:
    server, producer = start_dashboard(queue_env)
    yield Dashboard(server.url, producer, write_key(queue_env, unique("ops"), [], operator=True))
    server.stop()
    producer.close()


class Ui(NamedTuple):
    """What the browser tests take, as one fixture: the queue, a running worker, the dashboard,
    a browser context and the SMTP server factory."""

    queue_env: QueueEnv
    worker: Worker
    dashboard: Dashboard
    context: BrowserContext
    smtp_server: ServerFactory


@pytest.fixture
def ui(
    queue_env: QueueEnv,
    worker: Worker,
    dashboard: Dashboard,
    context: BrowserContext,
    smtp_server: ServerFactory,
) -> Ui:
    return Ui(queue_env, worker, dashboard, context, smtp_server)


def login(page: Page, base: str, token: str) -> None:
    """Log in through the form, the way an operator does (starting from any dashboard page)."""
    page.goto(f"{base}/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=%2Fdashboard$"))
    page.fill("#key", token)
    page.click("form.login button")
    expect(page.locator("h1")).to_have_text("Overview")


def dead_letter(producer: Producer, account: str, subject: str = "Hi") -> Any:
    job = finished(producer, producer.send_notification(account, ["to@example.net"], subject, "x"))
    assert job.state == "dead", job
    return job


def delivered(server: SmtpServer, message_id: str | None) -> bool:
    return any(r.message["Message-ID"] == message_id for r in server.received)


def test_login_and_the_account_table_renders_and_refreshes(
    queue_env: QueueEnv, context: BrowserContext, smtp_server: ServerFactory
) -> None:
    server, producer = start_dashboard(queue_env, refresh=1)
    try:
        token = write_key(queue_env, unique("ops"), [], operator=True)
        up = queue_env.account(unique("up"), smtp_server(mode="plain"))
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        down = queue_env.account(unique("down"), smtp_server(mode="plain"), port=closed)
        for name in (up, down):  # real checks, stored like the scheduled ones
            cli(queue_env, "test-connectivity", name)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        login(page, server.url, token)
        row = page.locator(f'tr[data-account="{up}"]')
        expect(row.locator("td.name")).to_have_text(up)
        expect(row.locator("td.state")).to_have_text("ok")
        expect(row.locator("td.health")).to_contain_text("ok")
        expect(row.locator("td.health")).to_contain_text("SMTP (Connect using default)")
        failing = page.locator(f'tr[data-account="{down}"]')
        expect(failing.locator("td.state")).to_have_text("degraded")
        expect(failing.locator("td.health")).to_contain_text("FAILED")
        expect(failing.locator("td.health")).to_contain_text(f"cannot connect to 127.0.0.1:{closed}")
        expect(page.locator('td[data-queue="postroom"]')).to_have_text(re.compile(r"^\d+$"))
        for stat in ("in_flight", "retrying", "scheduled", "held", "dead_letters"):
            expect(page.locator(f'td[data-stat="{stat}"]')).to_have_text(re.compile(r"^\d+$"))
        # the page refreshes itself (refresh=1 here): a new account shows up without a click
        late = queue_env.account(unique("late"), smtp_server(mode="plain"))
        expect(page.locator(f'tr[data-account="{late}"] td.state')).to_have_text("ok")
        # a record that does not load is an error at once, not "ok, no check yet"
        broken = unique("broken")
        (queue_env.accounts / f"{broken}.yaml").write_text("provider: other\nsmtp:\n  address: [oops\n")
        state = page.locator(f'tr[data-account="{broken}"] td.state')
        expect(state).to_contain_text("invalid")
        expect(state.locator(".reason")).to_contain_text(f"{broken}.yaml:4: invalid YAML")
        expect(state).to_have_class(re.compile(r"state-invalid"))
        page.click(f'tr[data-account="{broken}"] td.name a')
        expect(page.locator(".account-state .state")).to_have_text("invalid")
        expect(page.locator("#problems li").first).to_contain_text(f"{broken}.yaml:4: invalid YAML")
        assert not [text for text in console if "Content Security Policy" in text], console
    finally:
        for stray in queue_env.accounts.glob("broken*.yaml"):
            stray.unlink()
        server.stop()
        producer.close()


def test_a_dead_letter_retried_by_clicking_its_button_arrives(ui: Ui) -> None:
    queue_env, worker, dashboard, context, smtp_server = ui
    server = smtp_server(mode="plain", rules=[unknown_user()])
    account = queue_env.account(unique("dash"), server)
    job = dead_letter(dashboard.producer, account, "Dead, then delivered")
    server.rules.clear()  # the mailbox exists now
    page = context.new_page()
    login(page, dashboard.url, dashboard.operator)
    page.click("nav >> text=Dead letters")
    row = page.locator(f'tr[data-job="{job.id}"]')
    expect(row.locator("td.account")).to_have_text(account)
    expect(row.locator("td.error")).to_contain_text("550")
    expect(row.locator("td.attempts")).to_have_text("1")
    expect(row.locator("td.failed-at")).to_contain_text("UTC")
    assert not delivered(server, job.message_id)
    row.locator("button.retry").click()
    expect(page.locator(".done")).to_contain_text("1 re-enqueued")
    wait_for(lambda: delivered(server, job.message_id), 30, "the retried dead letter at the server", worker)
    again = finished(dashboard.producer, job.id)
    assert again.state == "sent" and again.message_id == job.message_id
    assert not dashboard.producer.store.is_dead(job.id)
    page.reload()
    expect(page.locator(f'tr[data-job="{job.id}"]')).to_have_count(0)
    assert [delivered(server, job.message_id)] == [True] and len(server.received) == 1


def test_purge_from_the_browser_empties_the_dead_letters(ui: Ui) -> None:
    queue_env, _, dashboard, context, smtp_server = ui
    server = smtp_server(mode="plain", rules=[Rule("DATA", 554, "5.7.1 Spam")])
    account = queue_env.account(unique("purge"), server)
    first, second, third = (dead_letter(dashboard.producer, account, f"D{i}") for i in range(3))
    page = context.new_page()
    dialogs: list[str] = []
    login(page, dashboard.url, dashboard.operator)
    page.goto(f"{dashboard.url}/dashboard/dead-letters")

    # a purge asks first (dashboard.js, allowed by the page's CSP): "cancel" changes nothing
    def cancel(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", cancel)
    page.locator(f'tr[data-job="{first.id}"] button.purge').click()
    wait_for(lambda: bool(dialogs), 10, "the confirmation dialog")
    expect(page.locator(f'tr[data-job="{first.id}"]')).to_have_count(1)
    assert dashboard.producer.store.is_dead(first.id)
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator(f'tr[data-job="{first.id}"] button.purge').click()
    expect(page.locator(".done")).to_contain_text("1 purged")
    expect(page.locator(f'tr[data-job="{first.id}"]')).to_have_count(0)
    expect(page.locator(f'tr[data-job="{second.id}"]')).to_have_count(1)
    assert dashboard.producer.job(first.id) is None
    page.click("#purge-all")
    expect(page.locator("p.empty")).to_have_text("No dead letters.")
    assert dashboard.producer.store.dead_count() == 0
    assert dashboard.producer.job(second.id) is None and dashboard.producer.job(third.id) is None
    assert len(dialogs) == 1 and "for good" in dialogs[0]


class Attacker:
    """Another web site: a second local server (another port, so another origin) whose page
    auto-submits a form at the dashboard."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path, "not found").encode()
                self.send_response(200 if self.path in pages else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forge(self, path: str, action: str, fields: dict[str, str]) -> str:
        inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
        self.pages[path] = (
            f'<!doctype html><form id="f" method="post" action="{action}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script>'
        )
        return self.url + path

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_forged_cross_site_post_is_refused_and_changes_nothing(ui: Ui) -> None:
    queue_env, _, dashboard, context, smtp_server = ui
    server = smtp_server(mode="plain", rules=[unknown_user()])
    account = queue_env.account(unique("csrf"), server)
    job = dead_letter(dashboard.producer, account)
    server.rules.clear()  # a retry would now be delivered: nothing may arrive
    page = context.new_page()
    login(page, dashboard.url, dashboard.operator)
    page.goto(f"{dashboard.url}/dashboard/dead-letters")
    csrf = page.locator(f'tr[data-job="{job.id}"] input[name=csrf]').first.get_attribute("value")
    assert csrf
    attacker = Attacker()
    try:
        base = f"{dashboard.url}/dashboard/dead-letters"
        forged = {
            "/retry": (f"{base}/{job.id}/retry", {"csrf": "guessed"}),
            "/purge-all": (f"{base}/purge-all", {"csrf": "guessed", "upto": "1e12"}),
            # even a stolen token does not help a page of another origin
            "/with-token": (f"{base}/{job.id}/purge", {"csrf": csrf}),
        }
        for path, (action, fields) in forged.items():
            with page.expect_response(lambda r, a=action: r.url == a) as caught:  # type: ignore[misc]
                page.goto(attacker.forge(path, action, fields))
            response = caught.value
            assert response.status == 403, (path, response.status)
            # the browser did send the session (same site, other origin): the refusal is CSRF protection
            sent = response.request.all_headers()
            assert f"{SESSION_COOKIE}=" in sent.get("cookie", ""), sent
            assert sent.get("origin") == attacker.url
            expect(page.locator("p.error")).to_contain_text("Cross-site request refused")
    finally:
        attacker.stop()
    assert dashboard.producer.store.is_dead(job.id)

    # the same checks without a browser: every layer on its own
    cookie = next(c["value"] for c in context.cookies() if c["name"] == SESSION_COOKIE)
    session = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    purge = f"{base}/{job.id}/purge"
    refused = {
        "no token": httpx.post(purge, headers=session),
        "wrong token": httpx.post(purge, headers=session, data={"csrf": csrf[:-2] + "xx"}),
        "foreign Origin": httpx.post(
            purge, headers={**session, "Origin": "http://evil.example"}, data={"csrf": csrf}
        ),
        "Sec-Fetch-Site cross-site": httpx.post(
            purge, headers={**session, "Sec-Fetch-Site": "cross-site"}, data={"csrf": csrf}
        ),
        "no session": httpx.post(purge, data={"csrf": csrf}),
        "logout without token": httpx.post(f"{dashboard.url}/dashboard/logout", headers=session),
    }
    for why, reply in refused.items():
        assert reply.status_code == 403, (why, reply.status_code)
    assert dashboard.producer.store.is_dead(job.id)
    time.sleep(0.5)  # nothing was re-enqueued: no delivery shows up meanwhile either
    assert not delivered(server, job.message_id)
    # … while the dashboard's own form (token, own origin) works
    origin = {"Origin": dashboard.url, "Sec-Fetch-Site": "same-origin"}
    done = httpx.post(purge, headers={**session, **origin}, data={"csrf": csrf})
    assert done.status_code == 303, done.text
    assert not dashboard.producer.store.is_dead(job.id)


def test_a_producer_key_cannot_log_in_and_no_page_shows_a_secret(ui: Ui, pki: Pki) -> None:
    queue_env, _, dashboard, context, smtp_server = ui
    producer_key = write_key(queue_env, unique("shop"), ["*"])
    page = context.new_page()
    for wrong in (producer_key, dashboard.operator + "x", "nonsense"):
        page.goto(f"{dashboard.url}/dashboard")
        page.fill("#key", wrong)
        with page.expect_response(lambda r: r.url.endswith("/dashboard/login")) as caught:
            page.click("form.login button")
        assert caught.value.status == 403
        expect(page.locator("p.error")).to_have_text("That is not an operator key.")
        assert not [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
        page.goto(f"{dashboard.url}/dashboard/dead-letters")
        expect(page).to_have_url(re.compile(r"/dashboard/login\?next=%2Fdashboard%2Fdead-letters$"))

    # an account with a password, and a dead letter of it (a 535 for the wrong one)
    server = smtp_server(mode="starttls", auth_required=True)
    _, wrong = queue_env.password_accounts(server, pki.ca_cert)
    job = dead_letter(dashboard.producer, wrong)
    assert "535" in (job.last_error or "")

    # an operator key made the way an operator makes one
    made = cli(queue_env, "api-keys", "new", unique("cliops"), "--operator")
    assert made.returncode == 0, made.stderr
    operator = made.stdout.strip()
    page.goto(f"{dashboard.url}/dashboard/dead-letters")
    page.fill("#key", operator)
    page.click("form.login button")
    expect(page.locator("h1")).to_contain_text("Dead letters")  # back where it was going
    html = [page.content()]
    for path in ("/dashboard", f"/dashboard/jobs/{job.id}"):
        page.goto(dashboard.url + path)
        expect(page.locator("main")).to_be_visible()
        html.append(page.content())
    cookie = next(c for c in context.cookies() if c["name"] == SESSION_COOKIE)
    secrets = {
        "operator key": operator,
        "operator secret": operator.rpartition(".")[2],
        "producer key secret": producer_key.rpartition(".")[2],
        "account password": PASSWORD,
        "wrong password": queue_env.env["QUEUE_TEST_WRONG_PASSWORD"],
        "session id": cookie["value"],
    }
    for text in html:
        for what, secret in secrets.items():
            assert secret not in text, what

    # logging out ends the session server-side too: the old cookie opens nothing
    page.click("header .logout button")
    expect(page).to_have_url(re.compile(r"/dashboard/login$"))
    old = httpx.get(f"{dashboard.url}/dashboard", headers={"Cookie": f"{SESSION_COOKIE}={cookie['value']}"})
    assert old.status_code == 303 and "/dashboard/login" in old.headers["location"]


def test_the_job_page_shows_per_recipient_results_and_never_the_payload(ui: Ui) -> None:
    queue_env, _, dashboard, context, smtp_server = ui
    server = smtp_server(mode="plain", rules=[unknown_user("bad")])
    account = queue_env.account(unique("rcpt"), server)
    marker = uuid.uuid4().hex
    job_id = dashboard.producer.enqueue(
        {
            "account": account,
            "to": ["good@example.net", "bad@example.net"],
            "subject": "Per recipient",
            "text": f"body-{marker}",
            "headers": {"X-Private": f"header-{marker}"},
            "attachments": [{"filename": "a.txt", "content_base64": "YXR0YWNobWVudA=="}],
        }
    )
    job = finished(dashboard.producer, job_id)
    assert job.state == "sent"
    page = context.new_page()
    login(page, dashboard.url, dashboard.operator)
    page.goto(f"{dashboard.url}/dashboard/jobs/{job_id}")
    expect(page.locator('[data-field="state"]')).to_have_text("sent")
    expect(page.locator('[data-field="account"]')).to_have_text(account)
    good = page.locator('tr[data-recipient="good@example.net"]')
    expect(good.locator("td.status")).to_have_text("sent")
    expect(good.locator("td.code")).to_have_text("250")
    bad = page.locator('tr[data-recipient="bad@example.net"]')
    expect(bad.locator("td.status")).to_have_text("failed")
    expect(bad.locator("td.code")).to_have_text("550")
    expect(bad.locator("td.message")).to_contain_text("No such user")
    expect(page.locator("table.history td.outcome")).to_have_text(["sent"])
    expect(page.locator("main")).to_contain_text("Per recipient")
    html = page.content()
    assert marker not in html and "YXR0YWNobWVudA" not in html  # bodies, headers, attachments stay out
    page.goto(f"{dashboard.url}/dashboard/jobs/{uuid.uuid4()}")
    expect(page.locator("p.error")).to_contain_text("No such job")


def test_security_headers_and_session_cookie_flags(
    queue_env: QueueEnv, dashboard: Dashboard, context: BrowserContext
) -> None:
    page = context.new_page()
    first = page.goto(f"{dashboard.url}/dashboard/login")
    assert first is not None
    login(page, dashboard.url, dashboard.operator)
    for path in ("/dashboard/login", "/dashboard", "/dashboard/dead-letters", "/dashboard/jobs/x"):
        reply = httpx.get(dashboard.url + path)
        csp = reply.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["referrer-policy"] == "same-origin"
        assert reply.headers["x-content-type-options"] == "nosniff"
    assert re.search(r"<script(?![^>]*\bsrc=)", page.content()) is None  # no inline script to allow
    (cookie,) = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert not cookie["secure"]  # plain http here; over https (or POSTROOM_DASHBOARD_ORIGIN=https://…) it is
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it
    # served over https (as a proxy says with X-Forwarded-Proto), the cookie is Secure
    reply = httpx.post(
        f"{dashboard.url}/dashboard/login",
        data={"key": dashboard.operator},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert reply.status_code == 303 and "; secure" in reply.headers["set-cookie"].lower()
    # the API's OpenAPI document leaves the dashboard out
    assert not [p for p in httpx.get(f"{dashboard.url}/openapi.json").json()["paths"] if "dashboard" in p]


def test_failed_logins_are_limited_per_address(queue_env: QueueEnv) -> None:
    server, producer = start_dashboard(queue_env, login_failures="3/hour")
    try:
        operator = write_key(queue_env, unique("ops"), [], operator=True)
        login_url = f"{server.url}/dashboard/login"
        while time.time() % 3600 > 3590:  # the four tries below must share one window
            time.sleep(0.5)
        me = {"X-Forwarded-For": f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
        codes = [httpx.post(login_url, headers=me, data={"key": f"x{i}"}).status_code for i in range(3)]
        assert codes == [403, 403, 403]
        blocked = httpx.post(login_url, headers=me, data={"key": operator})  # even the right key
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 3600
        assert SESSION_COOKIE not in blocked.headers.get("set-cookie", "")
        other = {"X-Forwarded-For": "10.8.0.1"}
        assert httpx.post(login_url, headers=other, data={"key": operator}).status_code == 303
    finally:
        server.stop()
        producer.close()


def test_operator_key_records(queue_env: QueueEnv, tmp_path: Path) -> None:
    from worker.web import apikeys

    folder = tmp_path / "api-keys"
    folder.mkdir()
    ops = apikeys.new_token("ops")
    (folder / "ops.yaml").write_text(f"hash: {apikeys.hash_token(ops)}\noperator: true\n")
    (folder / "noaccounts.yaml").write_text(f"hash: {apikeys.hash_token(ops)}\n")
    keys, problems = apikeys.load_api_keys(tmp_path)
    assert keys["ops"].operator and not keys["ops"].accounts
    assert "a producer key needs at least one account" in str(problems["noaccounts"][0])
    refused = cli(queue_env, "api-keys", "new", unique("neither"))
    assert refused.returncode != 0 and "--operator" in refused.stderr
    made = cli(queue_env, "api-keys", "new", unique("both"), "--operator", "--account", "orders")
    name = made.stdout.strip().rpartition(".")[0]
    text = (queue_env.config / "api-keys" / f"{name}.yaml").read_text()
    assert "operator: true" in text and '["orders"]' in text


def test_retrying_the_same_dead_letter_twice_re_enqueues_it_once(
    queue_env: QueueEnv, worker: Worker, dashboard: Dashboard, smtp_server: ServerFactory
) -> None:
    """What a double click on Retry (or two operators at once) does: one job on the queue."""
    server = smtp_server(mode="plain", rules=[unknown_user(times=1)])
    job = dead_letter(dashboard.producer, queue_env.account(unique("twice"), server))
    retried, missing = dashboard.producer.retry_dead_letters([job.id, job.id])
    assert (retried, missing) == ([job.id], [job.id])
    assert finished(dashboard.producer, job.id).state == "sent"
    assert len(server.received) == 1


def green(rgb: tuple[int, int, int]) -> bool:
    """The sent line's colour (#1b7f3b in dashboard.css), give or take anti-aliasing."""
    r, g, b = rgb
    return g > 100 and g > r + 50 and g > b + 40


def blue_or_purple(rgb: tuple[int, int, int]) -> bool:
    """The p50 (#1d4ed8) or p95 (#7c3aed) colour, give or take anti-aliasing."""
    r, g, b = rgb
    return b > 150 and b > g + 60 and b > r + 40


def test_a_depth_legend_shows_the_latest_sample_and_a_counter_legend_the_sum() -> None:
    depth = line_chart("d", "depth", [("scheduled", [2.0, 2.0, None, 2.0])], first="", last="", levels=True)
    assert ">scheduled 2</text>" in depth  # not 6: the same two jobs, sampled three times
    sent = line_chart("s", "sent", [("sent", [1.0, None, 2.0])], first="", last="")
    assert ">sent 3</text>" in sent
    assert legend_value([0.2, 0.4], "s", latest=False) == ""  # latencies do not add up


def test_charts_the_account_page_and_cancelling_a_scheduled_job(ui: Ui, tmp_path: Path) -> None:
    queue_env, _, dashboard, context, smtp_server = ui
    from support.png import pixels

    server = smtp_server(mode="plain", rules=[unknown_user("gone@")])
    account = queue_env.account(unique("chart"), server)
    producer = dashboard.producer
    for to in ("a@example.net", "b@example.net", "gone@example.net"):
        finished(producer, producer.send_notification(account, [to], "Chart", "x"))
    later = producer.send_notification(
        account, ["c@example.net"], "Later on", "x", send_at=time.time() + 3600
    )
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    login(page, dashboard.url, dashboard.operator)

    for chart_id in (
        "activity-hour-all",
        "activity-day-all",
        "latency-hour-all",
        "latency-day-all",
        "depth-day",
    ):
        expect(page.locator(f'svg[data-chart="{chart_id}"]')).to_be_visible()
    chart = page.locator('svg[data-chart="activity-hour-all"]')
    expect(chart.locator('[data-series="sent"]').first).to_be_attached()
    shot = tmp_path / "activity.png"
    chart.screenshot(path=str(shot))
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)  # kept for a look when it fails
    width, height, rgb = pixels(shot.read_bytes())
    assert 600 <= width <= 606 and 190 <= height <= 196  # the chart's size (and its border)
    assert sum(map(green, rgb)) > 20  # the sent line is drawn, in its colour
    expect(page.locator('svg[data-chart="latency-hour-all"] [data-series="p95"]').first).to_be_attached()
    expect(page.locator('svg[data-chart="depth-day"] [data-series="ready"]').first).to_be_attached()

    bulk = [(f"bulk{i}@example.net", "550 5.1.1 gone", 550, None) for i in range(150)]
    Suppressions(queue_env.redis).add_many(account, bulk)  # after gone@: the page shows the oldest 100
    page.click(f'tr[data-account="{account}"] td.name a')
    expect(page.locator("h1")).to_have_text(f"Account {account}")
    expect(page.locator("#suppressions tbody tr")).to_have_count(100)
    expect(page.locator("#suppressions h2 .count")).to_have_text("(151)")
    expect(page.locator("#suppressions p.more")).to_contain_text("The oldest 100 of 151")
    expect(
        page.locator(f'svg[data-chart="activity-hour-{account}"] [data-series="sent"]').first
    ).to_be_attached()
    expect(page.locator(f'svg[data-chart="activity-hour-{account}"] text.legend.s-sent')).to_have_text(
        "sent 2"
    )
    # each legend in its series' colour (dashboard.css), not the axis grey
    legend = f'svg[data-chart="activity-hour-{account}"] text.legend'
    fill = "element => getComputedStyle(element).fill"
    assert page.locator(f"{legend}.s-sent").evaluate(fill) == "rgb(27, 127, 59)"
    assert page.locator(f"{legend}.s-failed").evaluate(fill) == "rgb(180, 35, 24)"
    latency = page.locator(f'svg[data-chart="latency-hour-{account}"]')
    assert latency.locator("text.legend.s-p95").evaluate(fill) == "rgb(124, 58, 237)"
    # one minute of deliveries: a single point, drawn as a dot that can be seen
    shot = tmp_path / "latency.png"
    latency.screenshot(path=str(shot))
    width, _, rgb = pixels(shot.read_bytes())
    plot = rgb[width * (TOP + 1) :]  # below the title and the legends
    assert sum(map(blue_or_purple, plot)) >= 60  # a 2px dot was 32 pixels: lost in the box
    gone = page.locator('#suppressions tr[data-address="gone@example.net"]')
    expect(gone).to_contain_text("5.1.1")
    expect(gone.locator("td").nth(3)).not_to_have_text("-")  # since when (the entry's time)
    expect(page.locator("#reports")).to_contain_text("0 bounced")
    expect(page.locator("#reports .hint")).to_contain_text("The mailbox is not read")
    expect(page.locator("#health")).to_be_visible()
    expect(page.locator("#certificates")).to_contain_text("No signing or client certificate")

    page.click("header nav a:text('Scheduled')")
    row = page.locator(f'tr[data-job="{later}"]')
    expect(row.locator("td.subject")).to_have_text("Later on")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.cancel").click()
    expect(page.locator("p.done")).to_have_text("Cancelled.")
    expect(page.locator(f'tr[data-job="{later}"]')).to_have_count(0)
    job = producer.job(later)
    assert job is not None and job.state == "cancelled"
    assert not [text for text in console if "Content Security Policy" in text], console


def test_a_failing_webhook_is_one_summary_per_error_below_the_account(
    own_queue: QueueEnv, context: BrowserContext, smtp_server: ServerFactory, tmp_path: Path
) -> None:
    """Issue 32: a receiver that is down filled the account page with a row per attempt, all
    alike. Real attempts (the webhook sender against a receiver answering 500, then against no
    receiver at all) now show as one row per distinct error, with its count, first and last
    time, below the account's own sections, and the command that lists every attempt."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import redis.asyncio

    from support.hookrecv import refusing_webhook
    from worker.db.vocabulary import JobState
    from worker.queue.events import outbox
    from worker.queue.events.webhook_sender import WebhookSender
    from worker.queue.store.jobs import JobStore
    from worker.settings import Settings

    account = own_queue.account(unique("hooked"), smtp_server(mode="plain"))
    receiver, secret, down = refusing_webhook(own_queue, tmp_path / "down.jsonl")
    store = JobStore(own_queue.redis)
    sender = WebhookSender(f"redis://127.0.0.1:6379/{own_queue.db}", own_queue.config, Settings())

    def attempt_events(count: int) -> None:
        """``count`` jobs of the account sent, each one's event offered to the webhook once."""
        events = []
        for _ in range(count):
            job_id = unique("job")
            own_queue.redis.hset(
                f"postroom:job:{job_id}", mapping={"id": job_id, "account": account, "state": "sending"}
            )
            store.finish(job_id, account, state=JobState.SENT, attempt=1)
            events += outbox.Outbox(own_queue.redis, 3600).events_of_job(job_id)

        async def deliver() -> None:
            client = redis.asyncio.Redis(host="127.0.0.1", port=6379, db=own_queue.db, decode_responses=True)
            try:
                for event_id in events:
                    await sender._deliver(client, down, event_id)
            finally:
                await sender.aclose_clients()
                await client.aclose()

        with ThreadPoolExecutor(1) as thread:  # Playwright's loop runs in this one
            thread.submit(asyncio.run, deliver()).result(timeout=120)

    server, producer = start_dashboard(own_queue)
    try:
        attempt_events(10)  # ten answers of 500
        receiver.stop()
        attempt_events(2)  # then nobody listens
        assert len(receiver.requests()) == 10
        token = write_key(own_queue, unique("ops"), [], operator=True)
        page = context.new_page()
        login(page, server.url, token)
        page.goto(f"{server.url}/dashboard/accounts/{account}")
        hook = page.locator('#webhooks [data-webhook="down"]')
        expect(hook.locator("h3")).to_contain_text("down")
        rows = hook.locator("table.webhook-errors tbody tr")
        expect(rows).to_have_count(2)  # not twelve
        refused, answered = rows.nth(0), rows.nth(1)  # the newest error first
        expect(answered.locator("td").nth(1)).to_have_text("500")
        expect(answered.locator("td.count")).to_have_text("10")
        expect(refused.locator("td.count")).to_have_text("2")
        expect(refused.locator("td").nth(1)).to_have_text("-")  # no HTTP answer at all
        for row in (answered, refused):
            expect(row.locator("td.first")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"))
            expect(row.locator("td.last")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"))
            expect(row.locator("td.given-up")).to_have_text("0")  # each will be retried
        expect(answered.locator("td.error")).not_to_have_text("")
        assert answered.locator("td.error").inner_text() != refused.locator("td.error").inner_text()
        assert answered.locator("td.first").inner_text() <= answered.locator("td.last").inner_text()
        expect(hook.locator("p.more code").first).to_have_text("postroom webhooks attempts down")
        expect(page.locator("table.webhook-attempts")).to_have_count(0)
        # below the account's own sections, the last one on the page
        sections = page.locator("main section").evaluate_all("all => all.map(s => s.id)")
        assert sections[-1] == "webhooks" and sections.index("health") < sections.index("webhooks"), sections
        assert secret not in page.content()
        # the last job a failure ended is one click away
        last_job = refused.locator("td a")
        expect(last_job).to_have_attribute("href", re.compile(r"/dashboard/jobs/"))
    finally:
        receiver.stop()
        server.stop()
        producer.close()
