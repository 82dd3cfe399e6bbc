"""The bounce reader's Graph side (contract §11): a Graph account's mailbox read through the local
Graph (tests/support/cloud.py), over real HTTPS with the test CA, with real tokens from the local
identity platform through the account's auth profile (MSAL, client credentials).
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from support.cloud import CLIENT_ID, CloudServer, Reply
from support.cloud_mailbox import MailStore
from support.pki import Pki
from worker.records.loader import Records
from worker.transports.mailbox import FETCH_LIMIT, MailboxError, MailboxSession
from worker.transports.mailbox_graph import GraphMailbox, graph_mailbox

MAILBOX = "orders@contoso.com"
PREFER = 'IdType="ImmutableId"'
START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class Setup:
    """An auth profile, a Graph account with ``bounces:`` and the CA keystore, loaded the real way."""

    def __init__(self, root: Path, pki: Pki, cloud: CloudServer) -> None:
        self.root, self.cloud = root, cloud
        for folder in ("accounts", "config/auth-profiles", "config/keystores", "secrets"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "config/keystores/test-ca.yaml").write_text(f"type: pem\ncertificates: {pki.ca_cert}\n")
        self.secret = "cs~" + secrets.token_urlsafe(24)
        cloud.client_secret = self.secret
        self.store: MailStore = cloud.mail_store(MAILBOX)
        self.profile("contoso", self.secret)

    def profile(self, name: str, secret: str) -> None:
        (self.root / "secrets" / name).write_text(secret + "\n")
        (self.root / "config/auth-profiles" / f"{name}.yaml").write_text(
            f"type: client_credentials\nauthority: {self.cloud.authority}\nclient_id: {CLIENT_ID}\n"
            f"client_secret: {{file: {self.root / 'secrets' / name}}}\ntruststore: test-ca\n"
        )

    def account(
        self, name: str = "graph", *, bounces: str = "{}", profile: str = "contoso", graph_extra: str = ""
    ) -> str:
        (self.root / "accounts" / f"{name}.yaml").write_text(
            f"provider: office365\nsend_using: graph\ngraph:\n  user_principal_name: {MAILBOX}\n"
            f"  auth_profile: {profile}\n  base_url: {self.cloud.url}\n{graph_extra}"
            f"bounces: {bounces}\n"
        )
        return name

    def records(self) -> Records:
        return Records.load(self.root / "accounts", self.root / "config")

    def mailbox(self, name: str = "graph") -> GraphMailbox:
        records = self.records()
        return graph_mailbox(records, records.account(name))

    def put(self, n: int, at: datetime, *, id: str | None = None, size: int = 0) -> str:
        return self.cloud.put_in_inbox(MAILBOX, report(n, size), at, id=id)


def report(n: int, size: int = 0) -> bytes:
    """A small RFC 5322 message (``size``: a body that long)."""
    body = (b"x" * 76 + b"\r\n") * (size // 78) if size else f"report {n}\r\n".encode()
    return (
        f"From: MAILER-DAEMON@contoso.com\r\nTo: {MAILBOX}\r\nSubject: report {n}\r\n"
        f"Message-ID: <report-{n}@contoso.com>\r\n\r\n"
    ).encode() + body


TRUSTED = "  truststore: test-ca\n"


@pytest.fixture
def setup(tmp_path: Path, pki: Pki, cloud: CloudServer) -> Iterator[Setup]:
    yield Setup(tmp_path, pki, cloud)


def mailbox_calls(cloud: CloudServer) -> list[str]:
    """Each mailbox call as "METHOD path" (folders and messages, not sendMail)."""
    with cloud.lock:
        found = [r for r in cloud.requests if "/mailFolders" in r.path or "/messages/" in r.path]
        return [f"{r.method} {r.path}" for r in found]


def position(when: datetime, ident: str) -> str:
    return f"{when.strftime('%Y-%m-%dT%H:%M:%SZ')}|{ident}"


def read_all(box: MailboxSession, mark: str, limit: int) -> tuple[list[str], str]:
    """Passes like the reader's until nothing is pending: the ids read, in order, and the mark."""
    read: list[str] = []
    while batch := box.pending(mark, limit):
        assert len(batch) <= limit
        for ref, position in batch:
            box.fetch(ref)
            read.append(ref)
            mark = position
    return read, mark


# ---- reading, fetching, moving ---------------------------------------------------------------


def test_pending_fetch_and_move_round_trip(setup: Setup, cloud: CloudServer) -> None:
    setup.account(graph_extra=TRUSTED)
    ids = [setup.put(n, START + timedelta(minutes=n)) for n in range(3)]
    with setup.mailbox() as box:
        assert box.validity == setup.store.folder_id("inbox")
        pending = box.pending("", 10)
        assert pending == [(i, position(START + timedelta(minutes=n), i)) for n, i in enumerate(ids)]
        assert [box.fetch(ref) for ref, _ in pending] == [report(n) for n in range(3)]
        box.move(ids[0], "Postroom/Processed")
        box.move(ids[1], "Postroom/Processed")
    # the ids stay what they were (ImmutableId); nothing is deleted
    assert setup.store.ids_in("Postroom/Processed") == ids[:2]
    assert setup.store.ids_in("inbox") == ids[2:]
    assert len(setup.store.messages) == 3
    moves = cloud.calls("POST", "/move")
    assert [m.path.split("/")[-2] for m in moves] == ids[:2]
    processed = setup.store.folder_id("Postroom/Processed")
    assert [json.loads(m.body) for m in moves] == [{"destinationId": processed}] * 2
    with cloud.lock:
        graph = [r for r in cloud.requests if r.path.startswith("/v1.0/users/")]
    assert graph and all(r.headers.get("prefer") == PREFER and r.bearer for r in graph)
    listing = cloud.calls("GET", "/messages?")[0].path
    assert "$orderby=receivedDateTime asc" in listing and "$select=id,receivedDateTime" in listing


def test_fetch_gives_the_first_two_mib_of_a_large_message(setup: Setup) -> None:
    setup.account(graph_extra=TRUSTED)
    big = setup.put(1, START, size=3 * 1024 * 1024)
    with setup.mailbox() as box:
        data = box.fetch(big)
    assert len(data) == FETCH_LIMIT and data == report(1, 3 * 1024 * 1024)[:FETCH_LIMIT]


def test_the_mark_reads_every_message_once_across_pages_and_ties(setup: Setup, cloud: CloudServer) -> None:
    """Pages of 2 (Graph's next links), passes of 3; three messages in one second whose ids sort
    against their arrival, cut by the limit: each read once, in (time, id) order."""
    setup.account(graph_extra=TRUSTED)
    setup.store.page_cap = 2
    tie = START + timedelta(minutes=5)
    expected = [setup.put(n, START + timedelta(minutes=n)) for n in range(2)]
    late, early, middle = "AAMk-tie-c=", "AAMk-tie-a=", "AAMk-tie-b="
    for n, ident in enumerate((late, early, middle)):
        setup.put(10 + n, tie, id=ident)
    expected += [early, middle, late]
    expected += [setup.put(n, START + timedelta(minutes=n)) for n in range(6, 9)]
    with setup.mailbox() as box:
        read, mark = read_all(box, "", 3)
        assert read == expected
        assert mark == position(START + timedelta(minutes=8), expected[-1])
        # a later pass: only what came after the mark; a message older than the mark that turns
        # up in the folder (moved back in by hand) is not read again
        newer = [setup.put(n, START + timedelta(minutes=n)) for n in (20, 21)]
        setup.put(99, START)
        assert read_all(box, mark, 3)[0] == newer
    assert any("$skip=" in call for call in mailbox_calls(cloud))  # next links were followed
    filtered = [c for c in mailbox_calls(cloud) if "$filter=receivedDateTime ge " in c]
    assert filtered and all("ge 2025-03-01T09:" in c for c in filtered)


def test_a_message_of_the_last_seconds_waits_for_the_next_pass(setup: Setup) -> None:
    """One arriving later in the same second could sort before it: it is read when it has settled."""
    setup.account(graph_extra=TRUSTED)
    settled = setup.put(1, datetime.now(UTC) - timedelta(minutes=1))
    setup.put(2, datetime.now(UTC))
    with setup.mailbox() as box:
        assert [ref for ref, _ in box.pending("", 10)] == [settled]


def test_the_destination_folder_is_created_once_and_reused(setup: Setup, cloud: CloudServer) -> None:
    setup.account(graph_extra=TRUSTED, bounces="{move_to: INBOX/Bounces/Done}")
    ids = [setup.put(n, START + timedelta(minutes=n)) for n in range(3)]
    with setup.mailbox() as box:
        box.move(ids[0], "INBOX/Bounces/Done")
        box.move(ids[1], "INBOX/Bounces/Done")
    with setup.mailbox() as box:  # the next pass finds it
        box.move(ids[2], "INBOX/Bounces/Done")
    assert setup.store.paths() == ["Inbox/Bounces", "Inbox/Bounces/Done"]
    assert setup.store.ids_in("Inbox/Bounces/Done") == ids
    created = cloud.calls("POST", "/childFolders")
    assert [json.loads(r.body) for r in created] == [{"displayName": "Bounces"}, {"displayName": "Done"}]
    assert cloud.calls("POST", "/v1.0/users/orders@contoso.com/mailFolders") == created  # none at the top


def test_a_folder_made_by_someone_else_meanwhile_is_used(setup: Setup, cloud: CloudServer) -> None:
    """Another reader made it between our look and our create: the 409 sends us to look again."""
    setup.account(graph_extra=TRUSTED)
    ident = setup.put(1, START)
    processed = setup.store.make_folder("Postroom/Processed")
    with setup.mailbox() as box:
        original = box._child

        def blind(parent: str | None, name: str) -> str | None:
            return (
                None
                if name == "Processed" and not cloud.calls("POST", "/childFolders")
                else original(parent, name)
            )

        box._child = blind  # type: ignore[method-assign]
        box.move(ident, "Postroom/Processed")
    assert setup.store.ids_in("Postroom/Processed") == [ident]
    assert setup.store.folder_id("Postroom/Processed") == processed
    assert setup.store.paths() == ["Postroom", "Postroom/Processed"]


def test_another_folder_is_read_by_its_path_and_never_made(setup: Setup, cloud: CloudServer) -> None:
    setup.account(graph_extra=TRUSTED, bounces="{folder: Reports/DSN}")
    with pytest.raises(MailboxError, match="no folder 'Reports/DSN'"):
        setup.mailbox().open()
    assert setup.store.paths() == [] and cloud.calls("POST", "/mailFolders") == []
    folder = setup.store.make_folder("Reports/DSN")
    ident = setup.store.put(report(1), START, folder="Reports/DSN")
    setup.put(2, START)  # in the inbox: not this folder's
    with setup.mailbox() as box:
        assert box.validity == folder
        assert [ref for ref, _ in box.pending("", 10)] == [ident]


# ---- tokens and failures ---------------------------------------------------------------------


def test_a_refused_token_is_refreshed_once(setup: Setup, cloud: CloudServer) -> None:
    setup.account(graph_extra=TRUSTED)
    ident = setup.put(1, START)
    with setup.mailbox() as box:
        assert len(cloud.ms_token_requests) == 1
        cloud.expire_tokens()
        assert [ref for ref, _ in box.pending("", 10)] == [ident]
        assert len(cloud.ms_token_requests) == 2
        assert len(cloud.calls("GET", "/messages?")) == 2  # 401, then the same request again
        # refused again after the refresh: one refresh per request, then an error
        refused = Reply(401, {"error": {"code": "InvalidAuthenticationToken", "message": "expired"}})
        cloud.mail_script = [refused, refused]
        with pytest.raises(MailboxError, match="Graph answered 401: InvalidAuthenticationToken"):
            box.fetch(ident)
        assert len(cloud.ms_token_requests) == 3 and cloud.mail_script == []


def every_secret(setup: Setup, cloud: CloudServer) -> list[str]:
    with cloud.lock:
        bearers = [r.bearer for r in cloud.requests if r.bearer]
    return [setup.secret, "cs~wrong", *bearers]


@pytest.mark.parametrize(
    "case",
    ["throttled", "not_json", "no_list", "timeout", "untrusted", "wrong_secret", "next_link_away", "gone"],
)
def test_failures_are_mailbox_errors_without_secrets(setup: Setup, cloud: CloudServer, case: str) -> None:
    setup.account(graph_extra=TRUSTED)
    setup.put(1, START)
    expected = {
        "throttled": "list messages: Graph answered 429: ApplicationThrottled: Too many requests",
        "not_json": "list messages: Graph's answer is not a JSON object",
        "no_list": "list messages: Graph's answer has no list of items",
        "timeout": "list messages: no answer within 0.5s",
        "untrusted": "find inbox: server certificate not trusted",
        "wrong_secret": "token: token request to",
        "next_link_away": "next page: a next link away from",
        "gone": "fetch: Graph answered 404: ErrorItemNotFound",
    }[case]
    if case == "untrusted":
        setup.account()  # no truststore: the system's CAs, which do not know the test CA
    if case == "wrong_secret":
        setup.profile("contoso", "cs~wrong-" + secrets.token_urlsafe(12))
    if case == "timeout":
        setup.account(graph_extra=TRUSTED + "  timeout: 0.5\n")
    with pytest.raises(MailboxError) as caught, setup.mailbox() as box:
        scripted = {
            "throttled": Reply(
                429, {"error": {"code": "ApplicationThrottled", "message": "Too many requests"}}
            ),
            "not_json": Reply(200, b"<html>not json</html>", {"Content-Type": "text/html"}),
            "no_list": Reply(200, {"value": "nothing"}),
            "next_link_away": Reply(
                200, {"value": [], "@odata.nextLink": "https://elsewhere.example/v1.0/x"}
            ),
        }
        if case in scripted:
            cloud.mail_script = [scripted[case]]
        if case == "timeout":
            cloud.graph_delay = 1.0
        if case == "gone":
            box.fetch("AAMk-no-such-message=")
        box.pending("", 10)
    text = str(caught.value)
    assert text.startswith(f"graph: mailbox {MAILBOX} (Graph): ") and expected in text, text
    for secret in every_secret(setup, cloud):
        assert secret not in text and secret not in repr(caught.value)


def test_the_stand_in_refuses_a_mailbox_call_without_a_valid_token(
    setup: Setup, pki: Pki, cloud: CloudServer
) -> None:
    setup.put(1, START)
    with httpx.Client(verify=ssl.create_default_context(cafile=pki.ca_cert), trust_env=False) as client:
        url = f"{cloud.url}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer tok-made-up"}).status_code == 401
        ok = client.get(url, headers={"Authorization": f"Bearer {cloud.issue()}"})
    assert ok.status_code == 200 and len(ok.json()["value"]) == 1


# ---- the reader's door -----------------------------------------------------------------------


def test_open_mailbox_gives_a_graph_account_its_graph_mailbox(setup: Setup) -> None:
    pytest.importorskip("worker.mail.reports", reason="worker/mail/reports.py comes with another branch")
    from worker.queue.events.reports_reader import open_mailbox

    setup.account(graph_extra=TRUSTED)
    ident = setup.put(1, START)
    records = setup.records()
    account = records.account("graph")
    assert account.bounces is not None and account.bounces.via == "graph"
    session = open_mailbox(records, account)
    assert isinstance(session, GraphMailbox)
    with session as box:
        assert box.pending("", 10) == [(ident, position(START, ident))]
        assert box.fetch(ident) == report(1)
