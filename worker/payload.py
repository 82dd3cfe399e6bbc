"""The producer contract: the ``postroom.send`` payload (DESIGN §2).

Validated with pydantic at enqueue (so the producer gets the reason and nothing
is enqueued) and again at execution (a producer in another language may have
called ``send_task`` directly). The payload never carries a secret: only the
account *name*.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.fields import Address
from worker.message import RESERVED_HEADERS, check_header_name, check_header_value

TASK_NAME = "postroom.send"
HEALTH_TASK_NAME = "postroom.health_check"
SWEEP_TASK_NAME = "postroom.sweep"
BATCH_TASK_NAME = "postroom.send_batch"
MAX_BATCH = 1000  # messages per postroom.send_batch job
QUEUE = "postroom"
DEFAULT_MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_RECIPIENTS = 500
_MESSAGE_ID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
# Task and job ids: Redis key parts, log fields and (for raw-published jobs) a Message-ID's left part.
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def max_attachment_bytes() -> int:
    return int(os.environ.get("POSTROOM_MAX_ATTACHMENT_BYTES", DEFAULT_MAX_ATTACHMENT_BYTES))


def _single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("CR/LF is not allowed here (header injection)")
    return value


SingleLine = Annotated[str, Field(max_length=998)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttachmentIn(Strict):
    filename: SingleLine = Field(min_length=1, max_length=255)
    content_type: str = Field(default="application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content_base64: str

    _filename = field_validator("filename")(_single_line)

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

    message_id: str | None = None
    from_: Address = Field(alias="from")
    subject: SingleLine = ""
    headers: dict[str, str] = Field(default_factory=dict)
    return_path: str | None = None  # "" or "<>" means the null sender (a bounce)

    _lines = field_validator("message_id", "subject", "return_path")(
        lambda v: _single_line(v) if isinstance(v, str) else v
    )

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


class SendPayload(Strict):
    """Keyword arguments of the ``postroom.send`` task."""

    account: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["notification", "auto-reply"] = "notification"
    to: list[Address] = Field(default_factory=list)
    cc: list[Address] = Field(default_factory=list)
    bcc: list[Address] = Field(default_factory=list)
    subject: SingleLine = ""
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    original: OriginalMessage | None = None
    idempotency_key: str | None = None
    # assigned at enqueue; a producer may set its own
    message_id: str | None = None
    enqueued_at: float | None = None

    _subject = field_validator("subject")(_single_line)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            check_header_name(name)
            check_header_value(name, text)
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not _KEY.match(value):
            raise ValueError("must be 1-200 printable ASCII characters without spaces")
        return value

    @field_validator("message_id")
    @classmethod
    def _message_id(cls, value: str | None) -> str | None:
        if value is not None and not _MESSAGE_ID.match(value):
            raise ValueError("must look like <unique@domain>")
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
        return self

    def to_task_kwargs(self) -> dict[str, Any]:
        """JSON-safe kwargs for ``send_task`` (aliases used, unset fields omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


__all__ = [
    "HEALTH_TASK_NAME",
    "QUEUE",
    "RESERVED_HEADERS",
    "SWEEP_TASK_NAME",
    "TASK_NAME",
    "AttachmentIn",
    "OriginalMessage",
    "SendPayload",
]
