"""Bounded input at enqueue (issue 14, items 4 and 5): reserved headers, control characters,
Message-IDs, numbers and sizes are refused by the payload model with the reason, and the
message builder never writes two copies of a header Postroom sets."""

from __future__ import annotations

import base64
import email
import email.policy
import math
import uuid
from email.message import EmailMessage
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from support.queue import QueueEnv
from worker.mail.message import MessageSpec, build_message, check_message_id, message_id_for
from worker.mail.payload import DEFAULT_MAX_MESSAGE_BYTES, SendPayload, max_message_bytes
from worker.queue.pipeline.delivery import Delivery, Outcome, _spec, stable_message_id
from worker.queue.store.jobs import JobStore
from worker.settings import Settings

BASE: dict[str, Any] = {"account": "orders", "to": ["alice@example.net"], "subject": "Hi", "text": "Body"}
ORIGINAL: dict[str, Any] = {
    "message_id": "<q1@example.net>",
    "from": "bob@example.net",
    "subject": "Question",
    "headers": {"References": "<q0@example.net>"},
}
REPLY: dict[str, Any] = {
    "account": "orders",
    "kind": "auto-reply",
    "text": "We got it.",
    "original": ORIGINAL,
}


def refused(payload: dict[str, Any]) -> str:
    """The reasons pydantic gives, one per line (as ``loc: message``)."""
    with pytest.raises(ValidationError) as caught:
        SendPayload.model_validate(payload)
    return "\n".join(
        ".".join(str(p) for p in e["loc"]) + ": " + e["msg"]
        for e in caught.value.errors(include_input=False, include_url=False)
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# ---- reserved headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "auto-submitted",
        "Auto-Submitted",
        "in-reply-to",
        "REFERENCES",
        "x-auto-response-suppress",
        "List-Unsubscribe",
        "list-unsubscribe-post",
        "List-Unsubscribe-Anything",
        "dkim-signature",
        "Content-Disposition",
        "content-id",
    ],
)
def test_headers_postroom_sets_are_refused_at_enqueue_in_any_case(name: str) -> None:
    for payload in (BASE, REPLY):
        reason = refused({**payload, "headers": {name: "no"}})
        assert f"header {name} is set by Postroom" in reason and reason.startswith("headers")


def test_other_custom_headers_still_pass() -> None:
    payload = SendPayload.model_validate({**BASE, "headers": {"X-Order": "42", "List-Id-Hint": "x"}})
    assert payload.headers == {"X-Order": "42", "List-Id-Hint": "x"}


def test_the_builder_never_writes_two_copies_of_a_header() -> None:
    # two producer keys that differ only in case were both written before
    twice = MessageSpec("a@example.com", to=["b@example.com"], headers={"X-Tag": "1", "x-tag": "2"})
    with pytest.raises(ValueError, match="twice"):
        build_message(twice)
    forged = MessageSpec(
        "a@example.com",
        to=["b@example.com"],
        headers={"auto-submitted": "no"},
        own_headers={"Auto-Submitted": "auto-replied"},
    )
    with pytest.raises(ValueError, match="set by Postroom"):
        build_message(forged)
    own_twice = MessageSpec(
        "a@example.com", to=["b@example.com"], own_headers={"Auto-Submitted": "a", "auto-submitted": "b"}
    )
    with pytest.raises(ValueError, match="twice"):
        build_message(own_twice)


@pytest.fixture
def store(own_queue: QueueEnv) -> JobStore:
    """A real Redis database of this test's own (the auto-reply window is claimed there)."""
    return JobStore(own_queue.redis)


def _reply_message(store: JobStore, payload: SendPayload) -> bytes:
    """The auto-reply exactly as the worker builds it (Delivery's own spec and reply steps)."""
    sender = SimpleNamespace(from_address="support@example.com", display_name=None, reply_to=None)
    job_id = f"intake-{uuid.uuid4().hex}"
    spec = _spec(sender, payload, "<reply-1@example.com>")
    delivery = Delivery(store, None, None, Settings())  # type: ignore[arg-type]
    reply = delivery._auto_reply(job_id, payload, f"intake-{uuid.uuid4().hex}", spec)
    assert not isinstance(reply, Outcome), reply
    return build_message(reply).data


def test_an_auto_reply_carries_one_copy_of_each_threading_header(store: JobStore) -> None:
    payload = SendPayload.model_validate({**REPLY, "headers": {"X-Ticket": "7"}})
    msg = parse(_reply_message(store, payload))
    for name, value in [
        ("Auto-Submitted", "auto-replied"),
        ("X-Auto-Response-Suppress", "All"),
        ("In-Reply-To", "<q1@example.net>"),
        ("References", "<q0@example.net> <q1@example.net>"),
        ("X-Ticket", "7"),
    ]:
        assert msg.get_all(name) == [value], name


def test_a_forged_lower_case_header_never_goes_out_twice(store: JobStore) -> None:
    """A payload that skipped enqueue validation (model_construct) still cannot put a
    second Auto-Submitted or In-Reply-To on the wire: the builder refuses it."""
    for forged in ({"auto-submitted": "no"}, {"in-reply-to": "<forged@x>"}):
        good = SendPayload.model_validate(REPLY)
        payload = good.model_copy(update={"headers": forged})
        with pytest.raises(ValueError, match="set by Postroom"):
            _reply_message(store, payload)


def test_references_keep_only_message_ids() -> None:
    from worker.mail.autoreply import threading_headers
    from worker.mail.payload import OriginalMessage

    original = OriginalMessage.model_validate(
        {**ORIGINAL, "headers": {"References": "<a@x> junk <b c> <ok@y> Bcc:v@x"}}
    )
    assert threading_headers(original)["References"] == "<a@x> <ok@y> <q1@example.net>"


# ---- control characters -------------------------------------------------------------------

CONTROLS = ["\x00", "\x0b", "\x1b", "\x7f", "\x80", "\x85", "\x9f", "\ud800"]


def _with(payload: dict[str, Any], path: str, bad: str) -> dict[str, Any]:
    out = {**payload, "original": {**ORIGINAL}}
    attachment = {"filename": "a.txt", "content_type": "text/plain", "content_base64": "YQ=="}
    field_values: dict[str, Any] = {
        "subject": {"subject": f"Hi{bad}there"},
        "header value": {"headers": {"X-Tag": f"a{bad}b"}},
        "header name": {"headers": {f"X{bad}Tag": "ab"}},
        "attachment filename": {"attachments": [{**attachment, "filename": f"a{bad}.txt"}]},
        "attachment content_type": {"attachments": [{**attachment, "content_type": f"text/pl{bad}ain"}]},
        "to": {"to": [f"al{bad}ice@example.net"]},
        "cc": {"cc": [f"carol@exa{bad}mple.net"]},
        "idempotency_key": {"idempotency_key": f"key{bad}1"},
        "account": {"account": f"orders{bad}"},
        "message_id": {"message_id": f"<a{bad}b@example.com>"},
    }
    original_values: dict[str, Any] = {
        "original.subject": {"subject": f"Q{bad}"},
        "original.message_id": {"message_id": f"<q{bad}1@example.net>"},
        "original.return_path": {"return_path": f"<bob{bad}@example.net>"},
        "original.from": {"from": f"bob{bad}@example.net"},
        "original.headers value": {"headers": {"References": f"<q0@example.net>{bad}"}},
    }
    if path in field_values:
        out.update(field_values[path])
        if path.startswith("original") or out.get("kind") != "auto-reply":
            out.pop("original")
    else:
        out["original"].update(original_values[path])
    return out


HEADER_BOUND = [
    "subject",
    "header value",
    "header name",
    "attachment filename",
    "attachment content_type",
    "to",
    "cc",
    "idempotency_key",
    "account",
    "message_id",
    "original.subject",
    "original.message_id",
    "original.return_path",
    "original.from",
    "original.headers value",
]


@pytest.mark.parametrize("bad", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
@pytest.mark.parametrize("where", HEADER_BOUND)
def test_control_characters_are_refused_in_every_header_bound_field(where: str, bad: str) -> None:
    payload = REPLY if where.startswith("original") else BASE
    refused(_with(payload, where, bad))


def test_a_tab_is_still_allowed_in_a_header_value_and_the_subject() -> None:
    payload = SendPayload.model_validate({**BASE, "subject": "a\tb", "headers": {"X-Tag": "a\tb"}})
    assert payload.subject == "a\tb"


def test_del_never_reaches_the_wire() -> None:
    with pytest.raises(ValueError, match="U\\+007F"):
        build_message(MessageSpec("a@example.com", to=["b@example.com"], subject="Hi\x7fthere"))
    with pytest.raises(ValueError, match="U\\+0085"):
        build_message(MessageSpec("a@example.com", to=["b@example.com"], headers={"X-Tag": "a\x85b"}))


# ---- Message-IDs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("<abc.def@example.com>", "<abc.def@example.com>"),
        ("abc@example.com", "<abc@example.com>"),
        ("<a+b=c!#$%&'*/?^_`{|}~-x@mail.example.com>", "<a+b=c!#$%&'*/?^_`{|}~-x@mail.example.com>"),
        ("<x@[127.0.0.1]>", "<x@[127.0.0.1]>"),
    ],
)
def test_message_ids_are_kept_or_given_their_brackets(given: str, kept: str) -> None:
    assert check_message_id(given) == kept
    assert SendPayload.model_validate({**BASE, "message_id": given}).message_id == kept
    original = {**ORIGINAL, "message_id": given}
    assert SendPayload.model_validate({**REPLY, "original": original}).original.message_id == kept  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        "no-at-sign",
        "<a b@example.com>",
        "<a@example.com> <b@example.com>",
        "<a<b@example.com>",
        "<a>b@example.com>",
        "<a@b@example.com>",
        "<a@example.com",
        "<.a@example.com>",
        "<a..b@example.com>",
        "<ä@example.com>",
        "<a@example.com>x",
        "",
        "<>",
        "<@example.com>",
        "<" + "a" * 300 + "@example.com>",
    ],
)
def test_anything_else_is_refused_as_a_message_id(bad: str) -> None:
    with pytest.raises(ValueError):
        check_message_id(bad)
    assert "message_id" in refused({**BASE, "message_id": bad})
    assert "original.message_id" in refused({**REPLY, "original": {**ORIGINAL, "message_id": bad}})


@pytest.mark.parametrize(
    "job_id",
    ["has space", "a>b", "a<b", "a@b", "x\r\nBcc: v@example.net", "ünï", "a" * 65, "", ".dot", "a..b"],
)
def test_a_job_id_that_is_not_a_safe_token_never_becomes_a_message_id(job_id: str) -> None:
    made = message_id_for(job_id, "example.com")
    assert check_message_id(made) == made and made.endswith("@example.com>")
    assert job_id not in made or not job_id
    assert made == message_id_for(job_id, "example.com")  # stable: every attempt, the same id
    assert stable_message_id(job_id, "orders@example.com") == made
    assert message_id_for(job_id + "x", "example.com") != made


def test_a_safe_job_id_is_its_message_id_and_the_domain_goes_out_as_punycode() -> None:
    job = str(uuid.uuid4())
    assert message_id_for(job, "example.com") == f"<{job}@example.com>"
    assert message_id_for(f"{job}-3", "bücher.example") == f"<{job}-3@xn--bcher-kva.example>"
    assert message_id_for("j1", "bad domain") == "<j1@postroom.invalid>"


# ---- numbers and sizes --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e300, -1.0, 2.0**41, "x", "1.5", True])
def test_enqueued_at_must_be_a_sane_finite_time(bad: Any) -> None:
    assert "enqueued_at" in refused({**BASE, "enqueued_at": bad})


def test_enqueued_at_accepts_a_real_time() -> None:
    assert SendPayload.model_validate({**BASE, "enqueued_at": 1_700_000_000.5}).enqueued_at == 1_700_000_000.5
    assert SendPayload.model_validate({**BASE, "enqueued_at": 1_700_000_000}).enqueued_at == 1_700_000_000


def test_the_whole_message_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert max_message_bytes() == DEFAULT_MAX_MESSAGE_BYTES == 25 * 1024 * 1024
    monkeypatch.setenv("POSTROOM_MAX_MESSAGE_BYTES", "1000")
    SendPayload.model_validate({**BASE, "text": "x" * 500, "html": "y" * 500})
    reason = refused({**BASE, "text": "x" * 500, "html": "y" * 501})
    assert "1001 bytes" in reason and "1000 byte limit" in reason and "POSTROOM_MAX_MESSAGE_BYTES" in reason
    assert "1002 bytes" in refused({**BASE, "text": "é" * 501})  # UTF-8 bytes, not characters
    blob = base64.b64encode(b"z" * 600).decode()
    attachment = {"filename": "z.bin", "content_base64": blob}
    assert "over the 1000 byte limit" in refused({**BASE, "text": "x" * 401, "attachments": [attachment]})
    monkeypatch.setenv("POSTROOM_MAX_MESSAGE_BYTES", "lots")
    assert "POSTROOM_MAX_MESSAGE_BYTES must be a number of bytes" in refused(BASE)


def test_the_default_size_bound_refuses_a_huge_body() -> None:
    assert "byte limit" in refused({**BASE, "text": "x" * (DEFAULT_MAX_MESSAGE_BYTES + 1)})


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"headers": {f"X-H{i}": "v" for i in range(101)}}, "headers"),
        ({"headers": {"X-Long": "v" * 999}}, "headers"),
        ({"headers": {"X-" + "n" * 80: "v"}}, "headers"),
        (
            {"attachments": [{"filename": f"{i}.txt", "content_base64": "YQ=="} for i in range(101)]},
            "attachments",
        ),
        ({"to": [f"u{i}@example.net" for i in range(501)]}, "to"),
        ({"subject": "s" * 999}, "subject"),
        (
            {"attachments": [{"filename": "a", "content_type": "t" * 200 + "/x", "content_base64": ""}]},
            "content_type",
        ),
    ],
)
def test_counts_and_lengths_are_bounded(change: dict[str, Any], where: str) -> None:
    assert where in refused({**BASE, **change})


def test_original_headers_are_bounded() -> None:
    many = {f"Received-{i}": "v" for i in range(201)}
    assert "original.headers" in refused({**REPLY, "original": {**ORIGINAL, "headers": many}})
    long = {"References": "<a@x> " * 2000}
    assert "original.headers" in refused({**REPLY, "original": {**ORIGINAL, "headers": long}})
    # a received message's own headers may have any valid name, Auto-Submitted included
    fine = {"Auto-Submitted": "no", "Received": "from x by y", "List-Unsubscribe": "<mailto:u@x>"}
    SendPayload.model_validate({**REPLY, "original": {**ORIGINAL, "headers": fine}})
