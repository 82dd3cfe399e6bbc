"""The producer contract: the ``postroom.send`` payload (contract §2).

Validated with pydantic at enqueue (so the producer gets the reason and nothing
is enqueued) and again at execution (a producer in another language may have
called ``send_task`` directly). The payload never carries a secret: only the
account *name*.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.mail.message import (
    CONTENT_TYPE_PATTERN,
    RESERVED_HEADERS,
    check_header_name,
    check_header_value,
    check_message_id,
    check_text,
)
from worker.records.addresses import bare_address, check_address
from worker.records.fields import MailboxText

TASK_NAME = "postroom.send"
HEALTH_TASK_NAME = "postroom.health_check"
SWEEP_TASK_NAME = "postroom.sweep"
BATCH_TASK_NAME = "postroom.send_batch"
MAX_BATCH = 1000  # messages per postroom.send_batch job
QUEUE = "postroom"  # the jobs: read by Postroom's own inbox (worker/queue/broker/inbox.py)
CONTROL_QUEUE = "postroom.control"  # health checks and sweeps: what Celery's consumer reads
# A postroom.send message's header naming its account (set by every Postroom producer, not
# required of others): a carrying task picks jobs of accounts with room without decoding bodies.
ACCOUNT_HEADER = "postroom_account"
DEFAULT_MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
# text + html (UTF-8) + attachments (decoded): the whole message a producer may send
DEFAULT_MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 500
MAX_HEADERS = 100  # producer headers per message
MAX_HEADER_VALUE = 998  # characters of one producer header value (before folding)
MAX_ORIGINAL_HEADERS = 200  # headers of the original message an auto-reply answers
MAX_ORIGINAL_HEADER_VALUE = 8192
MAX_ATTACHMENTS = 100
MAX_ENQUEUED_AT = 2.0**40  # seconds since the epoch (year ~36812): anything above is not a time
_KEY = re.compile(r"[\x21-\x7e]{1,200}")
# Task and job ids: Redis key parts, log fields and (for raw-published jobs) a Message-ID\'s left part.
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:  # a ValueError: the payload is refused with this reason, validation never crashes
        raise ValueError(f"setting {name} must be a number of bytes (got {raw!r})")
    return value


def job_headers(kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The message headers a ``postroom.send`` job is published with (see ACCOUNT_HEADER)."""
    account = kwargs.get("account")
    return {ACCOUNT_HEADER: account} if isinstance(account, str) else {}


def max_attachment_bytes() -> int:
    return _env_bytes("POSTROOM_MAX_ATTACHMENT_BYTES", DEFAULT_MAX_ATTACHMENT_BYTES)


def max_message_bytes() -> int:
    """Bound on text + html + decoded attachments (``POSTROOM_MAX_MESSAGE_BYTES``, 25 MiB)."""
    return _env_bytes("POSTROOM_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)


def _header_text(value: str) -> str:
    return check_text(value, "")


def _message_id(value: str | None) -> str | None:
    return None if value is None else check_message_id(value)


# one line of a header: no CR/LF, no control character (TAB allowed), at most 998 characters
SingleLine = Annotated[str, Field(max_length=998), AfterValidator(_header_text)]
MessageId = Annotated[str | None, AfterValidator(_message_id)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttachmentIn(Strict):
    filename: SingleLine = Field(min_length=1, max_length=255)
    content_type: str = Field(
        default="application/octet-stream", max_length=255, pattern=CONTENT_TYPE_PATTERN
    )  # type/subtype, RFC 6838 names: ASCII letters, digits and !#$&-^_.+
    content_base64: str
    # a text/* attachment's charset; without it Postroom says us-ascii or utf-8 when the
    # content is that, and nothing when it is neither (the reader guesses, as before)
    charset: str | None = Field(default=None, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")

    @field_validator("content_base64")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        return value

    def content(self) -> bytes:
        return base64.b64decode(self.content_base64)

    @property
    def size(self) -> int:
        return len(self.content_base64) * 3 // 4 - self.content_base64[-2:].count("=")


class OriginalMessage(Strict):
    """The received message an auto-reply answers."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    message_id: MessageId = None
    from_: MailboxText = Field(alias="from")  # "Name <a@b>", as a received From header has it
    subject: SingleLine = ""
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_ORIGINAL_HEADERS)
    return_path: SingleLine | None = None  # "" or "<>" means the null sender (a bounce)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            check_header_name(name, own=True)  # the received message's: any valid name
            check_header_value(name, text)
            if len(text) > MAX_ORIGINAL_HEADER_VALUE:
                raise ValueError(f"header {name}: at most {MAX_ORIGINAL_HEADER_VALUE} characters")
        return value

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


_UNSUBSCRIBE_URL = re.compile(r"https://[!-~]+", re.ASCII)  # printable ASCII, no spaces


class ListUnsubscribe(Strict):
    """``List-Unsubscribe`` (RFC 2369) and, with a url, ``List-Unsubscribe-Post:
    List-Unsubscribe=One-Click`` (RFC 8058): what Gmail and Yahoo ask of bulk senders."""

    url: str | None = Field(default=None, max_length=900)
    mailto: str | None = Field(default=None, max_length=254)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and (not _UNSUBSCRIBE_URL.fullmatch(value) or any(c in value for c in "<>,")):
            raise ValueError("must be an https:// URL of printable ASCII without spaces, <, > or commas")
        return value

    @field_validator("mailto")
    @classmethod
    def _mailto(cls, value: str | None) -> str | None:
        if value is None:
            return None
        address = bare_address(check_address(value.removeprefix("mailto:")))
        if not address.isascii():
            raise ValueError("a mailto address must be ASCII (a header URI)")
        return address

    @model_validator(mode="after")
    def _some(self) -> ListUnsubscribe:
        if self.url is None and self.mailto is None:
            raise ValueError("list_unsubscribe needs url, mailto or both")
        return self

    def headers(self) -> dict[str, str]:
        targets = [f"<{self.url}>"] if self.url else []
        if self.mailto:
            targets.append(f"<mailto:{self.mailto}>")
        out = {"List-Unsubscribe": ", ".join(targets)}
        if self.url:
            out["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return out


class SendPayload(Strict):
    """Keyword arguments of the ``postroom.send`` task."""

    account: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["notification", "auto-reply"] = "notification"
    to: list[MailboxText] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    cc: list[MailboxText] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[MailboxText] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    subject: SingleLine = ""
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_HEADERS)
    original: OriginalMessage | None = None
    idempotency_key: str | None = None
    list_unsubscribe: ListUnsubscribe | None = None  # RFC 8058 one-click unsubscribe (bulk mail)
    # a scheduled send: not before this time (UNIX seconds; ISO 8601 with an offset is read too)
    send_at: float | None = None
    # assigned at enqueue; a producer may set its own (a bare id gets its angle brackets)
    message_id: MessageId = None
    enqueued_at: float | None = Field(
        default=None, ge=0, le=MAX_ENQUEUED_AT, allow_inf_nan=False, strict=True
    )

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            check_header_name(name)
            check_header_value(name, text)
            if len(text) > MAX_HEADER_VALUE:
                raise ValueError(f"header {name}: at most {MAX_HEADER_VALUE} characters")
        return value

    @field_validator("send_at", mode="before")
    @classmethod
    def _send_at(cls, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError("must be ISO 8601 (2026-12-24T09:00:00+01:00) or UNIX seconds") from None
            if when.tzinfo is None:
                raise ValueError("needs a UTC offset (2026-12-24T09:00:00+01:00 or …Z)")
            value = when.timestamp()
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("must be ISO 8601 with an offset or UNIX seconds")
        if not 0 <= value <= MAX_ENQUEUED_AT:
            raise ValueError("is not a time")
        return float(value)

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not _KEY.fullmatch(value):
            raise ValueError("must be 1-200 printable ASCII characters without spaces")
        return value

    @model_validator(mode="after")
    def _whole(self) -> SendPayload:
        if self.kind == "auto-reply":
            if self.original is None:
                raise ValueError("an auto-reply needs original (the message it answers)")
        elif self.original is not None:
            raise ValueError("original is only for kind auto-reply")
        if self.kind == "notification" and not (self.to or self.cc or self.bcc):
            raise ValueError("a notification needs at least one recipient (to, cc or bcc)")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise ValueError(f"at most {MAX_RECIPIENTS} recipients per message")
        total = sum(a.size for a in self.attachments)
        if total > max_attachment_bytes():
            raise ValueError(f"attachments total {total} bytes, over the {max_attachment_bytes()} byte limit")
        size = self.size
        if size > max_message_bytes():
            raise ValueError(
                f"the message is {size} bytes (text, html and attachments), over the "
                f"{max_message_bytes()} byte limit (POSTROOM_MAX_MESSAGE_BYTES)"
            )
        return self

    @property
    def size(self) -> int:
        """Bytes of body content: text and html as UTF-8, attachments decoded."""
        bodies = sum(len(b.encode("utf-8", "surrogatepass")) for b in (self.text, self.html) if b)
        return bodies + sum(a.size for a in self.attachments)

    def to_task_kwargs(self) -> dict[str, Any]:
        """JSON-safe kwargs for ``send_task`` (aliases used, unset fields omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_TASK_NAME",
    "QUEUE",
    "RESERVED_HEADERS",
    "SWEEP_TASK_NAME",
    "TASK_NAME",
    "AttachmentIn",
    "OriginalMessage",
    "SendPayload",
]
