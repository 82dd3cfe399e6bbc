"""Building the RFC 5322 message.

Built with the ``email.mime`` classes and the compat32 policy rather than
``EmailMessage`` + the default policy: the latter re-parses every header on
assignment and costs several times more per message, which matters on the hot
path. Header values are encoded explicitly (RFC 2047 for non-ASCII) and every
value is checked for CR/LF, so a producer can never inject a header.

Bcc recipients go in the envelope only, never in a header.
"""

from __future__ import annotations

import binascii
import email.quoprimime
import hashlib
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import compat32
from email.utils import format_datetime
from io import BytesIO

from worker.records.addresses import check_visible_text, parse_mailbox

_WIRE = compat32.clone(linesep="\r\n", max_line_length=78)
# Headers Postroom sets itself, compared case-insensitively: the builder's own, the
# auto-reply threading ones (worker/mail/autoreply.py), List-Unsubscribe (RFC 8058) and the
# signatures (worker/mail/signing.py adds DKIM-Signature and turns the Content-* fields into
# the signed entity). A producer's custom headers may not add any of them: a second copy
# of, say, Auto-Submitted or In-Reply-To is what a remote responder may read first.
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
        "Auto-Submitted",
        "In-Reply-To",
        "References",
        "X-Auto-Response-Suppress",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "DKIM-Signature",
    )
)
# whole families: every Content-* field (S/MIME signs them as the entity) and List-Unsubscribe*
RESERVED_PREFIXES = ("content-", "list-unsubscribe")
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
CONTENT_TYPE_PATTERN = rf"^{_RESTRICTED_NAME}/{_RESTRICTED_NAME}$"
CONTENT_TYPE = re.compile(CONTENT_TYPE_PATTERN, re.ASCII)
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}", re.ASCII)  # printable ASCII except ':' (RFC 5322 ftext)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    charset: str | None = None  # text/*: the producer's, else detected (us-ascii, utf-8)


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
    headers: Mapping[str, str] = field(default_factory=dict)  # the producer's: no reserved names
    message_id: str | None = None
    date: float | None = None  # epoch seconds; default now
    # headers Postroom itself adds (auto-reply threading, …): reserved names allowed, but
    # like every other header each name appears once
    own_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltMessage:
    message_id: str
    recipients: tuple[str, ...]  # envelope: to + cc + bcc, de-duplicated, in order
    data: bytes


def make_message_id(from_address: str) -> str:
    """A globally unique Message-ID in the sender's domain."""
    return message_id_for(uuid.uuid4().hex, from_address.rsplit("@", 1)[-1])


def check_text(value: str, what: str) -> str:
    """``value`` if it has no control character (C0 but TAB, DEL, C1, lone surrogates) and no
    bidi/invisible format character (records/addresses.check_visible_text: an operator reads it
    on the dashboard): the check of every header-bound field (subject, header values, filenames,
    display names)."""
    prefix = f"{what}: " if what else ""
    if "\r" in value or "\n" in value:
        raise ValueError(f"{prefix}CR/LF is not allowed (header injection)")
    return check_visible_text(value, what, tab=True)


# RFC 5322 §3.6.4 msg-id: "<" id-left "@" id-right ">", both dot-atom-text (printable ASCII
# atext in dot-separated runs) or, on the right, a no-fold-literal; no spaces, no "<>" inside.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_MSG_ID = re.compile(rf"<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[!-Z^-~]*\])>", re.ASCII)
_TOKEN = re.compile(rf"{_DOT_ATOM}", re.ASCII)
MAX_MESSAGE_ID = 250  # characters, brackets included


def check_message_id(value: str) -> str:
    """The RFC 5322 Message-ID ``value`` names, as ``<left@right>``.

    A bare ``left@right`` gets its angle brackets; anything else (spaces, control
    characters, ``<>`` inside, no ``@``, non-ASCII, over 250 characters) is a ValueError."""
    if not isinstance(value, str):
        raise ValueError("a Message-ID must be a string")
    text = value if value.startswith("<") else f"<{value}>"
    if len(text) > MAX_MESSAGE_ID:
        raise ValueError(f"a Message-ID is at most {MAX_MESSAGE_ID} characters")
    if not _MSG_ID.fullmatch(text):
        raise ValueError("must be a Message-ID <unique@domain> (printable ASCII, no spaces or <> inside)")
    return text


def comparable_message_id(value: str | None) -> str | None:
    """``value`` in the one form two Message-IDs are compared by: ``<left@right>`` with the right
    side lower-cased, or None when it names no Message-ID.

    A report may quote the original's Message-ID without its angle brackets, or with the domain
    in another case (the right side is a domain, RFC 5322 §3.6.4, and domains compare without
    case, RFC 4343); the left side is compared as written (it is the sender's own token)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    left, at, right = text.rpartition("@")
    if not at or not left or not right or any(c in text for c in "<> \t\r\n"):
        return None
    return f"<{left}@{right.lower()}>"


def message_id_for(job_id: str, domain: str) -> str:
    """The stable Message-ID of job ``job_id`` sent from ``domain``: ``<job_id@domain>``.

    Pure and deterministic (every attempt of a job gets the same one). A job id that is
    not a safe dot-atom token (spaces, ``<>``, ``@``, control or non-ASCII characters,
    over 64 characters) never reaches the header: its SHA-256 does instead. The domain
    is sent as punycode; one that cannot be a msg-id right side becomes
    ``postroom.invalid``."""
    left = job_id
    if len(job_id) > 64 or not _TOKEN.fullmatch(job_id):
        left = "h." + hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    try:
        right = domain.encode("idna").decode("ascii")
    except UnicodeError:
        right = ""
    if not right or len(right) > 180 or not _TOKEN.fullmatch(right):
        right = "postroom.invalid"
    return f"<{left}@{right}>"


def check_header_value(name: str, value: str) -> str:
    return check_text(value, f"header {name}")


def check_header_name(name: str, *, own: bool = False) -> str:
    """``name`` if it is a valid field name a producer may add (``own``: one Postroom adds)."""
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"header name {name!r} is not valid (printable ASCII, no ':' or spaces)")
    lowered = name.lower()
    if not own and (lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIXES)):
        raise ValueError(f"header {name} is set by Postroom and cannot be added or overridden")
    return name


def _encode(name: str, value: str) -> str:
    """An RFC 2047 encoded word when needed, folded for the wire."""
    if value.isascii():
        return value
    return Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _mailbox(address: str, name: str | None = None) -> str:
    """``address`` (``a@b`` or ``Name <a@b>``; ``name`` when it has none) as a header writes it:
    the name RFC 2047 encoded when not ASCII, the domain in punycode."""
    mailbox = parse_mailbox(address)
    if name and mailbox.name is None:
        check_header_value("display name", name)
        mailbox = replace(mailbox, name=name)
    return mailbox.header()


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


def check_content_type(value: str) -> str:
    """``type/subtype`` of RFC 6838 restricted names (ASCII letters, digits, ``!#$&-^_.+``)."""
    if not CONTENT_TYPE.fullmatch(value):
        raise ValueError(
            f"content type {value[:100]!r} is not type/subtype (ASCII letters, digits, !#$&-^_.+)"
        )
    return value


def text_charset(content: bytes) -> str | None:
    """``us-ascii`` or ``utf-8`` when ``content`` is that, else None (an unknown 8-bit charset)."""
    if content.isascii():
        return "us-ascii"
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "utf-8"


def _attachment_part(att: Attachment) -> MIMEBase:
    maintype, _, subtype = check_content_type(att.content_type).partition("/")
    part = MIMEApplication(att.content, _subtype=subtype)
    if maintype != "application":
        part.replace_header("Content-Type", f"{maintype}/{subtype}")
    charset = (att.charset or text_charset(att.content)) if maintype == "text" else None
    if charset:  # a text attachment read in the wrong charset is mojibake (Zoë → ZoÃ«)
        part.set_param("charset", check_text(charset, "attachment charset"))
    check_header_value("attachment filename", att.filename)
    if att.filename.isascii():
        part.add_header("Content-Disposition", "attachment", filename=att.filename)
    else:
        part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", att.filename))
    return part


def build_message(spec: MessageSpec, *, fast: bool = True) -> BuiltMessage:
    """Render ``spec``; raises ValueError for anything that could corrupt the headers.

    Messages whose headers are ASCII once encoded (nearly all notifications),
    with binary attachments of plain filenames or none, are written directly,
    several times faster than the ``email`` generator (a 1 MB attachment: about
    20 times); the rest go through ``email.mime``. Both give the
    same message (tests/test_message.py compares them).
    """
    text, html = spec.text, spec.html
    if text is None and html is None:
        text = ""
    recipients: list[str] = []  # the envelope: bare addresses, IDN domains in punycode
    for written in (*spec.to, *spec.cc, *spec.bcc):
        address = parse_mailbox(written).address
        if address.lower() not in (r.lower() for r in recipients):
            recipients.append(address)
    if not recipients:
        raise ValueError("a message needs at least one recipient (to, cc or bcc)")

    message_id = check_message_id(spec.message_id or make_message_id(spec.from_address))
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
        ("Date", rfc5322_date(spec.date if spec.date is not None else time.time())),
        ("Message-ID", message_id),
    ]
    extra = [(check_header_name(n), v) for n, v in spec.headers.items()]
    extra += [(check_header_name(n, own=True), v) for n, v in spec.own_headers.items()]
    for name, value in extra:
        headers.append((name, _encode(name, check_header_value(name, value))))
    seen: set[str] = set()
    for name in [n for n, _ in headers] + ["MIME-Version", "Content-Type", "Content-Transfer-Encoding"]:
        if name.lower() in seen:  # one copy of every field, whoever asked for it
            raise ValueError(f"header {name} would appear twice")
        seen.add(name.lower())

    data: bytes | None
    if not all(value.isascii() for _, value in headers):  # a UTF-8 local part: RFC 6532 headers
        data = _render_utf8(headers, text, html, spec.attachments)
    else:
        data = _render_direct(headers, text, html, spec.attachments) if fast else None
        if data is None:
            data = _render_mime(headers, text, html, spec.attachments)
    return BuiltMessage(message_id=message_id, recipients=tuple(recipients), data=data)


def rfc5322_date(timestamp: float) -> str:
    """``Date`` in UTC with a real offset, ``+0000`` (formatdate's ``-0000`` means "zone
    unknown", and strict parsers then return a naive datetime)."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _render_utf8(
    headers: list[tuple[str, str]], text: str | None, html: str | None, attachments: Sequence[Attachment]
) -> bytes:
    """A message whose headers carry UTF-8 (RFC 6532, sent with SMTPUTF8): the headers written
    here (the compat32 generator would RFC 2047-encode an address), the MIME body by
    :func:`_render_mime`."""
    lines = []
    for name, value in headers:
        folded = _fold(name, value)
        if folded is None or any(len(line.encode("utf-8")) > 998 for line in folded.split("\r\n")):
            raise ValueError(f"header {name} is too long")
        lines.append(folded)
    return "\r\n".join(lines).encode("utf-8") + b"\r\n" + _render_mime([], text, html, attachments)


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


# An attachment filename written as it is: no quoting, no RFC 2231, and the Content-Disposition
# line stays under 78 columns. Anything else goes through the email package.
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._()+-]{0,29}")


def _direct_attachment(att: Attachment) -> tuple[str, str] | None:
    """(MIME headers, base64 body) of one attachment as _attachment_part writes it; None for a
    text attachment (its charset) or a filename that needs encoding."""
    maintype, _, subtype = check_content_type(att.content_type).partition("/")
    check_header_value("attachment filename", att.filename)
    if maintype == "text" or not _PLAIN_FILENAME.fullmatch(att.filename):
        return None
    encoded = binascii.b2a_base64(att.content, newline=False).decode("ascii")
    body = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    head = (
        f"Content-Type: {maintype}/{subtype}\r\nContent-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{att.filename}"'
    )
    return head, body


def _direct_body(text: str | None, html: str | None) -> tuple[list[str], list[str]] | None:
    """(MIME header lines, body lines) of the message's text: one part or multipart/alternative."""
    if text is not None and html is not None:
        parts = [_direct_part(text, "plain"), _direct_part(html, "html")]
        boundary = f"=_{uuid.uuid4().hex}"
        if any(boundary in payload for _, payload in parts):  # pragma: no cover - 128 random bits
            return None
        body: list[str] = []
        for head, payload in parts:
            body += [f"--{boundary}", head, "", payload]
        body += [f"--{boundary}--", ""]
        return [f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"'], body
    head, payload = _direct_part(
        html if html is not None else text or "", "html" if html is not None else "plain"
    )
    return head.split("\r\n"), [payload]


def _render_direct(
    headers: list[tuple[str, str]], text: str | None, html: str | None, attachments: Sequence[Attachment] = ()
) -> bytes | None:
    """The message written directly, or None when it needs the generator. Size costs only
    C-speed work here (a 1 MB attachment: base64 in one call), where the email package walks
    every line in Python."""
    lines = []
    for name, value in headers:
        folded = _fold(name, value)
        if folded is None or not folded.isascii():
            return None
        lines.append(folded)
    attached = [_direct_attachment(att) for att in attachments]
    body = _direct_body(text, html)
    if body is None or any(part is None for part in attached):
        return None
    head, payload = body
    if not attached:
        lines += [head[0], "MIME-Version: 1.0", *head[1:], "", *payload]
        return "\r\n".join(lines).encode("ascii")
    boundary = f"=_{uuid.uuid4().hex}"  # base64 has no "_": no attachment can hold it
    if any(boundary in part for part in payload):  # pragma: no cover - 128 random bits
        return None
    lines += [f'Content-Type: multipart/mixed;\r\n boundary="{boundary}"', "MIME-Version: 1.0", ""]
    lines += [f"--{boundary}", *head, "", *payload]
    for part in attached:
        assert part is not None
        lines += [f"--{boundary}", part[0], "", part[1]]
    lines += [f"--{boundary}--", ""]
    return "\r\n".join(lines).encode("ascii")
