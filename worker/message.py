"""Building the RFC 5322 message.

Built with the ``email.mime`` classes and the compat32 policy rather than
``EmailMessage`` + the default policy: the latter re-parses every header on
assignment and costs several times more per message, which matters on the hot
path. Header values are encoded explicitly (RFC 2047 for non-ASCII) and every
value is checked for CR/LF, so a producer can never inject a header.

Bcc recipients go in the envelope only, never in a header.
"""

from __future__ import annotations

import email.quoprimime
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import compat32
from email.utils import formataddr, formatdate
from io import BytesIO

from worker.fields import check_address

_WIRE = compat32.clone(linesep="\r\n", max_line_length=78)
# headers the builder owns; a producer's custom headers may not override them
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "Reply-To",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Sender",
        "Return-Path",
    )
)
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII except ':' (RFC 5322 ftext)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True)
class MessageSpec:
    from_address: str
    to: Sequence[str] = ()
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    display_name: str | None = None
    reply_to: str | None = None
    attachments: Sequence[Attachment] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    date: float | None = None  # epoch seconds; default now


@dataclass(frozen=True)
class BuiltMessage:
    message_id: str
    recipients: tuple[str, ...]  # envelope: to + cc + bcc, de-duplicated, in order
    data: bytes


def make_message_id(from_address: str) -> str:
    """A globally unique Message-ID in the sender's domain."""
    domain = from_address.rsplit("@", 1)[-1] or "postroom.invalid"
    return f"<{uuid.uuid4().hex}@{domain}>"


def check_header_value(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"header {name}: CR/LF is not allowed in a header value")
    if any(ord(c) < 32 and c != "\t" for c in value):
        raise ValueError(f"header {name}: control characters are not allowed")
    return value


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"header name {name!r} is not valid (printable ASCII, no ':' or spaces)")
    if name.lower() in RESERVED_HEADERS:
        raise ValueError(f"header {name} is set by Postroom and cannot be overridden")
    return name


def _encode(name: str, value: str) -> str:
    """An RFC 2047 encoded word when needed, folded for the wire."""
    if value.isascii():
        return value
    return Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _mailbox(address: str, name: str | None = None) -> str:
    check_address(address)
    if name:
        check_header_value("display name", name)
    return formataddr((name or "", address), charset="utf-8")


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype, charset="utf-8")
    normalized = body.replace("\r\n", "\n").replace("\r", "\n")
    if normalized.isascii() and max((len(line) for line in normalized.split("\n")), default=0) <= 998:
        part.replace_header("Content-Type", f'text/{subtype}; charset="us-ascii"')
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(normalized)
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(email.quoprimime.body_encode(normalized.encode("utf-8").decode("latin-1")))
    return part


def _attachment_part(att: Attachment) -> MIMEBase:
    maintype, _, subtype = att.content_type.partition("/")
    if not maintype or not subtype:
        maintype, subtype = "application", "octet-stream"
    part = MIMEApplication(att.content, _subtype=subtype)
    if maintype != "application":
        part.replace_header("Content-Type", f"{maintype}/{subtype}")
    check_header_value("attachment filename", att.filename)
    if att.filename.isascii():
        part.add_header("Content-Disposition", "attachment", filename=att.filename)
    else:
        part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", att.filename))
    return part


def build_message(spec: MessageSpec, *, fast: bool = True) -> BuiltMessage:
    """Render ``spec``; raises ValueError for anything that could corrupt the headers.

    Messages without attachments whose headers are ASCII once encoded (nearly
    all notifications) are written directly, several times faster than the
    ``email`` generator; the rest go through ``email.mime``. Both give the
    same message (tests/test_message.py compares them).
    """
    text, html = spec.text, spec.html
    if text is None and html is None:
        text = ""
    recipients: list[str] = []
    for address in (*spec.to, *spec.cc, *spec.bcc):
        check_address(address)
        if address.lower() not in (r.lower() for r in recipients):
            recipients.append(address)
    if not recipients:
        raise ValueError("a message needs at least one recipient (to, cc or bcc)")

    message_id = spec.message_id or make_message_id(spec.from_address)
    check_header_value("Message-ID", message_id)
    headers: list[tuple[str, str]] = [
        ("From", _mailbox(spec.from_address, spec.display_name)),
    ]
    if spec.to:
        headers.append(("To", ", ".join(_mailbox(a) for a in spec.to)))
    if spec.cc:
        headers.append(("Cc", ", ".join(_mailbox(a) for a in spec.cc)))
    if spec.reply_to:
        headers.append(("Reply-To", _mailbox(spec.reply_to)))
    headers += [
        ("Subject", _encode("Subject", check_header_value("Subject", spec.subject))),
        ("Date", formatdate(spec.date if spec.date is not None else time.time(), localtime=False)),
        ("Message-ID", message_id),
    ]
    for name, value in spec.headers.items():
        headers.append((check_header_name(name), _encode(name, check_header_value(name, value))))

    data = _render_direct(headers, text, html) if fast and not spec.attachments else None
    if data is None:
        data = _render_mime(headers, text, html, spec.attachments)
    return BuiltMessage(message_id=message_id, recipients=tuple(recipients), data=data)


def _render_mime(
    headers: list[tuple[str, str]], text: str | None, html: str | None, attachments: Sequence[Attachment]
) -> bytes:
    body: MIMEBase
    if text is not None and html is not None:
        body = MIMEMultipart("alternative")
        body.attach(_text_part(text, "plain"))
        body.attach(_text_part(html, "html"))
    elif html is not None:
        body = _text_part(html, "html")
    else:
        body = _text_part(text or "", "plain")
    root: MIMEBase = body
    if attachments:
        root = MIMEMultipart("mixed")
        root.attach(body)
        for att in attachments:
            root.attach(_attachment_part(att))
    for part in root.walk():
        if part is not root:
            del part["MIME-Version"]
    # headers go on top, before the MIME headers the body part already carries
    mime_headers = list(root.items())
    for name in {n for n, _ in mime_headers}:
        del root[name]
    for name, value in [*headers, *mime_headers]:
        root[name] = value
    if "MIME-Version" not in root:
        root["MIME-Version"] = "1.0"
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_WIRE).flatten(root)
    return out.getvalue()


def _fold(name: str, value: str) -> str | None:
    """``Name: value`` folded at 78 columns where it can be (RFC 5322 §2.2.3); None when
    a line would still exceed 998 characters (the generator's slower path handles it)."""
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line
    if "\r\n" in value:  # already folded (an RFC 2047 encoded header)
        return line if all(len(part) <= 998 for part in line.split("\r\n")) else None
    sep = ", " if name in ("To", "Cc", "Reply-To") else " "
    words = value.split(sep)
    lines: list[str] = []
    current = f"{name}:"
    for i, word in enumerate(words):
        piece = word + (sep.rstrip() if i < len(words) - 1 else "")
        if len(current) + 1 + len(piece) > 78 and current != f"{name}:":
            lines.append(current)
            current = " " + piece
        else:
            current += " " + piece
    lines.append(current)
    return "\r\n".join(lines) if all(len(part) <= 998 for part in lines) else None


def _direct_part(body: str, subtype: str) -> tuple[str, str]:
    """(MIME headers, CRLF body) of one text part, encoded as _text_part does."""
    normalized = body.replace("\r\n", "\n").replace("\r", "\n")
    if normalized.isascii() and max((len(line) for line in normalized.split("\n")), default=0) <= 998:
        head = f'Content-Type: text/{subtype}; charset="us-ascii"\r\nContent-Transfer-Encoding: 7bit'
        payload = normalized
    else:
        head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable'
        payload = email.quoprimime.body_encode(normalized.encode("utf-8").decode("latin-1"))
    return head, payload.replace("\n", "\r\n")


def _render_direct(headers: list[tuple[str, str]], text: str | None, html: str | None) -> bytes | None:
    """The message written directly, or None when it needs the generator."""
    lines = []
    for name, value in headers:
        folded = _fold(name, value)
        if folded is None or not folded.isascii():
            return None
        lines.append(folded)
    if text is not None and html is not None:
        parts = [_direct_part(text, "plain"), _direct_part(html, "html")]
        boundary = f"=_{uuid.uuid4().hex}"
        if any(boundary in payload for _, payload in parts):  # pragma: no cover - 128 random bits
            return None
        lines += [
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"',
            "MIME-Version: 1.0",
            "",
        ]
        for head, payload in parts:
            lines += [f"--{boundary}", head, "", payload]
        lines += [f"--{boundary}--", ""]
    else:
        head, payload = _direct_part(
            html if html is not None else text or "", "html" if html is not None else "plain"
        )
        content_type, encoding = head.split("\r\n")
        lines += [content_type, "MIME-Version: 1.0", encoding, "", payload]
    return "\r\n".join(lines).encode("ascii")
