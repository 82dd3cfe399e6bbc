"""A received message read defensively: the mailbox the bounce reader watches (contract §11)
holds whatever strangers send, so every read here is bounded and none raises on bad input.

The message is parsed once, from at most :data:`MAX_BYTES`, with the compat32 policy (the
default policy re-parses each header and raises on some malformed ones); at most
:data:`MAX_PARTS` parts are walked; a header is read from its raw value (non-UTF-8 bytes
decoded as windows-1252), at most :data:`MAX_FIELD` characters of it. Text bound for a record
or a log line goes through :func:`one_line`: one short line, no control characters.

Pure code: no I/O.
"""

from __future__ import annotations

import re
from collections import deque
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from itertools import islice

from worker.mail.message import check_message_id

MAX_BYTES = 2 * 1024 * 1024  # of a message: a report is small, the message it returns is cut
MAX_PARTS = 200  # walked in one message (a bounce has a handful)
MAX_HEADERS = 500  # fields looked through for one name (Received chains are long, not this long)
MAX_FIELD = 4000  # characters read of one header field
MAX_TEXT = 256 * 1024  # characters of body text searched
MAX_BLOCKS = 200  # field blocks read of one delivery-status part (one per recipient)
MAX_ADDRESS = 320  # RFC 5321: 64 + @ + 255
MAX_LINE = 998  # RFC 5321's line limit: no bounce's line is longer
HEURISTIC_TEXT = 32 * 1024  # characters a line-by-line heuristic reads of one message

# What a returned original (or its header) comes as: RFC 3462's text/rfc822-headers, RFC 6533's
# message/global(-headers), and message/rfc822-headers, which some MTAs send instead.
RETURNED_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers",
                  "message/global-headers")  # fmt: skip

_LINE_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACES = re.compile(r"\s+")
_COMMENT = re.compile(r"\([^()]*\)")
_ANGLED = re.compile(r"<([^<>]*)>")
_NOT_IN_ADDRESS = re.compile(r"[\s<>,;:\"()\[\]\\]")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")  # RFC 6533 embedded-unicode-char
_MSG_ID_TOKEN = re.compile(r"<[^<>\s]+>")
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n")


def parse(raw: bytes) -> Message:
    """``raw`` as a message tree, read from its first :data:`MAX_BYTES` (a cut MIME tree parses)."""
    return BytesParser(policy=compat32).parsebytes(raw[:MAX_BYTES])


def text_of(value: object) -> str:
    """A header value as text: the parser keeps non-ASCII bytes as surrogate escapes; UTF-8 is
    read as such, anything else as windows-1252 (what old European MTAs write)."""
    if not isinstance(value, str):
        return str(value)
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return decode_bytes(data)


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """``data`` as text in ``charset`` (when Python knows it), else UTF-8, else windows-1252."""
    for name in (charset, "utf-8"):
        if name:
            try:
                return data.decode(name)
            except (LookupError, UnicodeError, ValueError):
                pass
    return data.decode("cp1252", "replace")


def headers(msg: Message, name: str, limit: int = 50) -> list[str]:
    """The values of every ``name`` field among the first :data:`MAX_HEADERS` of ``msg`` (at
    most ``limit``), unfolded, each cut at :data:`MAX_FIELD` characters."""
    wanted, found = name.lower(), []
    for key, value in islice(msg.raw_items(), MAX_HEADERS):
        if key.lower() == wanted:
            found.append(_LINE_BREAKS.sub(" ", text_of(value)[:MAX_FIELD]).strip())
            if len(found) >= limit:
                break
    return found


def header(msg: Message | None, name: str) -> str | None:
    """The first ``name`` field of ``msg``, unfolded, or None."""
    if msg is None:
        return None
    found = headers(msg, name, 1)
    return found[0] if found else None


def decoded_header(msg: Message, name: str) -> str:
    """A field with its RFC 2047 encoded words decoded (a Subject), "" when it is missing."""
    value = header(msg, name) or ""
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def one_line(text: str | None, limit: int = 500) -> str | None:
    """``text`` on one line, control characters removed, runs of spaces made one, at most
    ``limit`` characters; None when nothing is left."""
    if not text:
        return None
    text = _SPACES.sub(" ", _CONTROL.sub("", _LINE_BREAKS.sub(" ", text[: limit * 8]))).strip()
    return text[:limit].rstrip() or None


def addr_spec(text: str | None) -> str | None:
    """The lower-cased addr-spec ``text`` names (``Bob <Bob@Example.com>``, a comment around it),
    or None for anything else: a list, spaces, control characters, no domain, over 320 chars."""
    if not text:
        return None
    text = _COMMENT.sub("", text)
    if angled := _ANGLED.search(text):
        text = angled.group(1)
    text = text.strip().lower()
    local, at, domain = text.rpartition("@")
    if not (at and local and domain) or len(text) > MAX_ADDRESS or "@" in local:
        return None
    if _NOT_IN_ADDRESS.search(text) or _CONTROL.search(text) or domain.strip(".") != domain:
        return None
    return text


def typed_address(value: str | None) -> str | None:
    """The address of a DSN recipient field, ``rfc822; bob@example.com`` or RFC 6533's
    ``utf-8; j\\x{F6}rg@example.com``; one without a type is read as an address too (some MTAs
    write ``<bob@example.com>`` alone). Another type (x400, unknown) is None."""
    if not value:
        return None
    kind, typed, address = value.partition(";")
    if not typed:
        return addr_spec(kind)
    kind = kind.strip().lower()
    if kind == "utf-8":
        address = _UNICODE_ESCAPE.sub(_unescape, address)
    return addr_spec(address) if kind in ("rfc822", "utf-8") else None


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if code <= 0x10FFFF else match.group(0)


def message_ids(value: str | None) -> list[str]:
    """The Message-IDs in a field (one for Message-ID, several for References), each checked as
    Postroom writes them (``<left@right>``); anything that is not one is left out."""
    if not value:
        return []
    tokens = _MSG_ID_TOKEN.findall(value) or value.split()[:1]
    found = []
    for token in tokens[:100]:
        try:
            found.append(check_message_id(token))
        except ValueError:
            continue
    return found


def message_id(value: str | None) -> str | None:
    """The first Message-ID of a field, or None."""
    found = message_ids(value)
    return found[0] if found else None


def walk(msg: Message, *, into_returned: bool = False) -> list[Message]:
    """``msg`` and its parts, breadth first, at most :data:`MAX_PARTS`: a hostile message may
    nest thousands. A returned message (a ``message/*`` part) is entered only when asked:
    its parts are the original's, not the report's."""
    found: list[Message] = []
    waiting: deque[Message] = deque([msg])
    while waiting and len(found) < MAX_PARTS:
        part = waiting.popleft()
        found.append(part)
        if into_returned or part.get_content_maintype() != "message":
            payload = part.get_payload()
            if isinstance(payload, list):
                waiting.extend(p for p in payload[:MAX_PARTS] if isinstance(p, Message))
    return found


def children(msg: Message) -> list[Message]:
    """The direct parts of a multipart (at most :data:`MAX_PARTS`), none for anything else."""
    if msg.get_content_maintype() != "multipart":
        return []
    payload = msg.get_payload()
    return [p for p in payload[:MAX_PARTS] if isinstance(p, Message)] if isinstance(payload, list) else []


def body_text(part: Message) -> str:
    """A leaf part's body as text (its transfer encoding undone, its charset read), at most
    :data:`MAX_TEXT` characters; "" for a multipart or a returned message."""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    return decode_bytes(_cut(data, MAX_TEXT * 4), part.get_content_charset())[:MAX_TEXT]


def _cut(data: bytes, limit: int) -> bytes:
    """``data``'s first ``limit`` bytes, cut at a line end (not inside a UTF-8 character)."""
    if len(data) <= limit:
        return data
    data = data[:limit]
    return data[: data.rfind(b"\n") + 1] or data


def plain_text(msg: Message) -> str:
    """The text/plain of ``msg`` outside any returned message, parts joined, at most
    :data:`MAX_TEXT` characters, with LF line ends: what a human reads of a bounce."""
    texts = [body_text(p) for p in walk(msg) if p.get_content_type() == "text/plain"]
    return "\n\n".join(texts)[:MAX_TEXT].replace("\r\n", "\n")


def field_blocks(part: Message) -> list[Message]:
    """The field blocks of a delivery-status (or feedback-report) part, each a Message of
    headers. The parser splits message/delivery-status into blocks itself; any other
    message/* type it reads as one message whose body holds the blocks after the first."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return _blocks_in(body_text(part))
    found: list[Message] = []
    for block in payload[:MAX_BLOCKS]:
        if not isinstance(block, Message):
            continue
        found.append(block)
        rest = block.get_payload(decode=True)  # bytes: the text form would lose UTF-8 (RFC 6533)
        if isinstance(rest, bytes) and rest.strip():
            found.extend(_blocks_in(decode_bytes(_cut(rest, MAX_TEXT))))
    return found[:MAX_BLOCKS]


def _blocks_in(text: str) -> list[Message]:
    chunks = _PARAGRAPH_END.split(text.replace("\r\n", "\n").lstrip("\n"), MAX_BLOCKS)
    parser = HeaderParser(policy=compat32)
    return [parser.parsestr(chunk) for chunk in chunks[:MAX_BLOCKS] if chunk.strip()]


def returned_headers(parts: list[Message]) -> Message | None:
    """The header of the original a report returns (the first of :data:`RETURNED_TYPES` among
    ``parts``), or None."""
    for part in parts:
        if part.get_content_type() not in RETURNED_TYPES:
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            return payload[0] if payload and isinstance(payload[0], Message) else None
        return HeaderParser(policy=compat32).parsestr(body_text(part).lstrip("\r\n"))
    return None


def paragraph_after(text: str, needle: str, limit: int = 1000) -> str | None:
    """The rest of the paragraph in which ``needle`` first appears in ``text`` (what a
    bounce says about one address), at most ``limit`` characters, or None."""
    found = re.search(re.escape(needle), text, re.IGNORECASE)
    if found is None:
        return None
    rest = text[found.end() : found.end() + limit]
    end = _PARAGRAPH_END.search(rest)
    return (rest[: end.start()] if end else rest).lstrip(">:;, \t\n") or None


def cut_for_heuristics(msg: Message) -> Message:
    """``msg`` with each leaf's text decoded, its lines cut at :data:`MAX_LINE` characters and
    all of them together at :data:`HEURISTIC_TEXT`: some regular expressions of flufl.bounce
    backtrack, quadratic in a line's length (two seconds a 20 kB line), and a stranger picks the
    lines. Changes ``msg`` in place: read what else is needed of it first."""
    budget = HEURISTIC_TEXT
    for part in walk(msg, into_returned=True):
        if not isinstance(part.get_payload(), str):
            continue
        text = "\n".join(line[:MAX_LINE] for line in body_text(part).splitlines())[:budget]
        budget -= len(text)
        del part["content-transfer-encoding"]
        part.set_payload(text.encode("utf-8", "replace").decode("ascii", "surrogateescape"))
    return msg
