"""What arrives in a sender's mailbox after a send, read as a :class:`Report`: an RFC 3464
delivery status notification, a non-standard bounce, an RFC 5965 complaint (ARF) or an
RFC 3834 auto-reply. The bounce reader (contract §11) matches a report to its job by
``envelope_id`` (the ENVID Postroom sends: the job id, xtext-encoded) or ``message_id``.

Pure: bytes in, a Report (or None for ordinary mail) out; no I/O. The mailbox holds what
strangers send, so :func:`parse_report` never raises and bounds its work
(:mod:`worker.mail.received` reads the message). A real DSN is read by this module, field by
field; flufl.bounce only recognises the formats that are not one (qmail, Exim, old Exchange…),
since it gives neither a status nor a diagnostic per recipient.

A report's words are RFC 3464's (``failed``, ``delayed``…), not Postroom's: the caller decides
what each does to a job (``failed`` with a 5.x.x status is a hard bounce; a ``failed`` 4.x.x is
a delivery that timed out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from flufl.bounce import all_failures

from worker.mail.received import (
    MAX_PARTS,
    addr_spec,
    children,
    cut_for_heuristics,
    decoded_header,
    field_blocks,
    header,
    headers,
    message_id,
    message_ids,
    one_line,
    paragraph_after,
    parse,
    plain_text,
    returned_headers,
    typed_address,
    walk,
)

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded", "complained"]
Kind = Literal["dsn", "bounce", "complaint", "auto-reply"]


@dataclass(frozen=True)
class RecipientReport:
    """What a report says about one recipient."""

    address: str  # lower-cased addr-spec: Original-Recipient, else Final-Recipient (no "rfc822;")
    action: Action
    status: str | None  # RFC 3463 "5.1.1": Status, or the diagnostic's when Status is missing/X.0.0
    diagnostic: str | None  # Diagnostic-Code's text (a complaint's feedback type): one line, ≤ 500


@dataclass(frozen=True)
class Report:
    """What one received message reports about mail Postroom sent."""

    kind: Kind
    envelope_id: str | None  # Original-Envelope-Id, xtext-decoded: the job id Postroom sent
    message_id: str | None  # the original's Message-ID (returned part; an auto-reply's In-Reply-To)
    recipients: tuple[RecipientReport, ...]
    report_id: str | None  # the report's own Message-ID


_STATUS_FIELD = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_STATUS_IN_TEXT = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_REPLY_CODE = re.compile(r"\s*([245])\d\d(?![\d.])")
_DIAGNOSTIC_TYPE = re.compile(r"\s*[A-Za-z][A-Za-z0-9-]*\s*;")
_ACTIONS: dict[str, Action] = {"failed": "failed", "delayed": "delayed", "delivered": "delivered",
                               "relayed": "relayed", "expanded": "expanded", "error": "failed"}  # fmt: skip
_BY_CLASS: dict[str, Action] = {"5": "failed", "4": "delayed", "2": "delivered"}
_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
# Feedback types that are no complaint: a DMARC failure report (RFC 6591), a "not spam" click.
_NOT_COMPLAINTS = ("auth-failure", "not-spam")
_DAEMONS = ("mailer-daemon", "mailer_daemon", "mail-daemon", "postmaster")
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|returned to sender|delivery (status|failure|failed|has failed|problem|"
    r"notification|report)|failure notice|mail delivery failed|could not be delivered|non-?delivery|"
    r"unzustellbar|nicht zustellbar|non remis|no se pudo entregar",
    re.IGNORECASE,
)
# Out-of-office subjects: Outlook's "Automatic reply:" in a few languages, Notes' "Auto:", and
# the usual English ones. Anchored at the start: a human's "Re: our vacation plans" is no reply.
_AUTO_SUBJECT = re.compile(
    r"\s*(?:auto(?:matic)?[ -]?(?:reply|response|answer)|auto|abwesenheitsnotiz|automatische antwort|"
    r"r[ée]ponse automatique|respuesta autom[áa]tica|risposta automatica|automatisch antwoord|"
    r"autosvar|automaattinen vastaus|resposta autom[áa]tica|odpowied[źz] automatyczna|"
    r"vacation (?:auto-?)?reply)\s*:|\s*out of (?:the )?office\b",
    re.IGNORECASE,
)


def parse_report(raw: bytes) -> Report | None:
    """What the message reports about mail we sent, or None when it is not a report (ordinary
    mail) or cannot be made sense of. Never raises: the mailbox is anyone's to write to."""
    try:
        return _read(parse(raw))
    except Exception:  # hostile input: whatever the email package or flufl.bounce raise
        return None


def _read(msg: Message) -> Report | None:
    """The report ``msg`` is: a DSN or a complaint by its parts, else a bounce flufl.bounce
    recognises in a message from a mailer daemon, else an auto-reply by its header."""
    # The multipart/report outside any returned message (a forwarded report is not ours), else
    # the top level: some MTAs send their delivery-status in a multipart/mixed.
    report = next((p for p in walk(msg) if p.get_content_type() == "multipart/report"), None)
    parts = children(msg if report is None else report)
    for part in parts:
        if part.get_content_type() in _STATUS_TYPES:
            return _dsn(msg, parts, part)
    for part in parts:
        if part.get_content_type() == "message/feedback-report":
            return _complaint(msg, parts, part)
    if report is not None and str(report.get_param("report-type", "")).lower() != "delivery-status":
        return None  # a read receipt (RFC 8098), a TLS report: no word on a delivery
    auto = _is_auto_reply(msg)  # a DSN cut before its status part may still be a bounce below
    daemon = _from_daemon(msg)
    if (daemon or _may_be_bounce(msg, auto)) and (bounce := _bounce(msg)) is not None:
        return bounce
    if auto and not daemon:  # a mailer daemon's auto-replied is a bounce flufl.bounce did not read
        return _auto_reply(msg)
    return None


def _dsn(msg: Message, parts: list[Message], status_part: Message) -> Report:
    """An RFC 3464 DSN: a per-message block (Original-Envelope-Id) and one per recipient."""
    envelope_id = original_id = None
    recipients = []
    for block in field_blocks(status_part):
        envelope_id = envelope_id or header(block, "original-envelope-id")
        original_id = original_id or header(block, "x-original-message-id")  # Gmail's
        if (found := _recipient(block)) is not None:
            recipients.append(found)
    return Report(
        kind="dsn",
        envelope_id=_envelope_id(envelope_id),
        message_id=message_id(header(returned_headers(parts), "message-id"))
        or message_id(original_id)
        or message_id(header(msg, "in-reply-to")),
        recipients=tuple(recipients),
        report_id=message_id(header(msg, "message-id")),
    )


def _recipient(block: Message) -> RecipientReport | None:
    """One per-recipient block of a DSN, or None when it names no address or no action. The
    original recipient first: the address the job sent to (ORCPT), where a relay forwarded it
    (an alias, a forwarding rule) and the final one is another the job never named."""
    address = typed_address(header(block, "original-recipient")) or typed_address(
        header(block, "final-recipient")
    )
    if address is None:
        return None
    diagnostic = header(block, "diagnostic-code") or ""
    if typed := _DIAGNOSTIC_TYPE.match(diagnostic):  # "smtp; 550 …", "X-Postfix; …"
        diagnostic = diagnostic[typed.end() :]
    status = _status(header(block, "status"), diagnostic)
    action = _action(header(block, "action"), status)
    if action is None:
        return None
    return RecipientReport(address=address, action=action, status=status, diagnostic=one_line(diagnostic))


def _status(field: str | None, diagnostic: str) -> str | None:
    """The RFC 3463 code: the Status field's, unless it is missing or generic (X.0.0, as Exim
    writes) and the diagnostic has one of the same class; a bare reply code (550) as X.0.0."""
    status = _code(_STATUS_FIELD.match(field or ""))
    if status is None or status.endswith(".0.0"):
        found = _STATUS_IN_TEXT.search(diagnostic)
        if found and (status is None or found.group(1) == status[0]):
            return _code(found)
        if status is None and (reply := _REPLY_CODE.match(diagnostic)):
            return f"{reply.group(1)}.0.0"
    return status


def _code(match: re.Match[str] | None) -> str | None:
    return ".".join(str(int(g)) for g in match.groups()) if match else None


def _action(field: str | None, status: str | None) -> Action | None:
    """RFC 3464's action word (opensmtpd's "error" is "failed"; a comment after it is dropped),
    else the one the status's class implies, else None."""
    word = re.split(r"[\s(;]", (field or "").strip().lower(), maxsplit=1)[0]
    if word in _ACTIONS:
        return _ACTIONS[word]
    return _BY_CLASS.get(status[0]) if status else None


def _envelope_id(value: str | None) -> str | None:
    return one_line(xtext_decode(value.strip()), 500) if value else None


def _complaint(msg: Message, parts: list[Message], feedback: Message) -> Report | None:
    """An RFC 5965 feedback report: each Original-Rcpt-To "complained"; Microsoft's JMRP names the
    recipient in the returned original instead (X-HmXmrOriginalRecipient), Yahoo names none."""
    blocks = field_blocks(feedback)
    kind = next((value for b in blocks for value in headers(b, "feedback-type")), "").lower()
    kind = kind.split(";")[0].strip()
    if kind in _NOT_COMPLAINTS:
        return None
    original = returned_headers(parts)
    named = [
        v for b in blocks for name in ("original-rcpt-to", "removal-recipient") for v in headers(b, name)
    ]
    addresses = [a for a in map(typed_address, named) if a]
    if not addresses and original is not None:
        addresses = [a for a in map(addr_spec, headers(original, "x-hmxmroriginalrecipient")) if a]
    diagnostic = one_line(kind)
    return Report(
        kind="complaint",
        envelope_id=_envelope_id(next((h for b in blocks for h in headers(b, "original-envelope-id")), None)),
        message_id=message_id(header(original, "message-id")),
        recipients=tuple(
            RecipientReport(a, "complained", None, diagnostic) for a in dict.fromkeys(addresses)
        ),
        report_id=message_id(header(msg, "message-id")),
    )


def _from_daemon(msg: Message) -> bool:
    """Whether ``msg`` comes from a mailer daemon (its From, or Exim's X-Failed-Recipients)."""
    sender = addr_spec(header(msg, "from")) or ""
    return sender.partition("@")[0] in _DAEMONS or header(msg, "x-failed-recipients") is not None


def _may_be_bounce(msg: Message, auto_reply: bool) -> bool:
    """Whether flufl.bounce's heuristics may look at mail not from a mailer daemon: one with a
    bounce's subject, or (an auto-reply aside) an empty return path. Its heuristics read text;
    ordinary mail never goes near them."""
    if _BOUNCE_SUBJECT.search(decoded_header(msg, "subject")):
        return True
    return not auto_reply and (header(msg, "return-path") or "").strip() == "<>"


def _bounce(msg: Message) -> Report | None:
    """A bounce in one of the formats flufl.bounce knows (qmail, Exim, Yahoo, old Exchange…): its
    permanent failures "failed", its warnings "delayed"; a status and a diagnostic where the
    text says something about the address. None when it finds no recipient."""
    if len(walk(msg, into_returned=True)) >= MAX_PARTS:
        return None  # flufl.bounce walks every part: not a message this big
    text = plain_text(msg)
    inline = re.search(r"^Message-ID:[ \t]*(<[^<>\s]+>)", text, re.IGNORECASE | re.MULTILINE)
    original = (
        message_id(header(returned_headers(walk(msg)), "message-id"))
        or message_id(inline.group(1) if inline else None)
        or message_id(header(msg, "in-reply-to"))
    )
    temporary, permanent = all_failures(cut_for_heuristics(msg))
    found: dict[str, Action] = {}
    for raw in temporary:
        if address := addr_spec(raw.decode("ascii", "replace")):
            found[address] = "delayed"
    for raw in permanent:  # a permanent failure outweighs a warning for the same address
        if address := addr_spec(raw.decode("ascii", "replace")):
            found[address] = "failed"
    recipients = []
    for address in sorted(found):
        said = one_line(paragraph_after(text, address))
        recipients.append(
            RecipientReport(address, found[address], _code(_STATUS_IN_TEXT.search(said or "")), said)
        )
    if not recipients:
        return None
    return Report("bounce", None, original, tuple(recipients), message_id(header(msg, "message-id")))


def _is_auto_reply(msg: Message) -> bool:
    """RFC 3834's Auto-Submitted: auto-replied, the vacation programs' X-Autoreply, X-Autorespond
    and Precedence: auto_reply, or an out-of-office subject."""
    submitted = re.split(r"[\s(;]", (header(msg, "auto-submitted") or "").strip().lower(), maxsplit=1)[0]
    if submitted == "auto-replied" or (header(msg, "precedence") or "").strip().lower() == "auto_reply":
        return True
    if (header(msg, "x-autoreply") or "no").strip().lower() not in ("no", "false", "0", ""):
        return True
    return bool(header(msg, "x-autorespond")) or bool(_AUTO_SUBJECT.match(decoded_header(msg, "subject")))


def _auto_reply(msg: Message) -> Report:
    """An auto-reply names its original in In-Reply-To, else last in References."""
    replied = message_ids(header(msg, "in-reply-to"))[:1] or message_ids(header(msg, "references"))[-1:]
    return Report(
        kind="auto-reply",
        envelope_id=None,
        message_id=replied[0] if replied else None,
        recipients=(),
        report_id=message_id(header(msg, "message-id")),
    )


def xtext_encode(value: str) -> str:
    """``value`` as RFC 3461 xtext (§4), as an ENVID is sent: each byte of its UTF-8 outside
    33..126, and "+" and "=", as "+" and two upper-case hex digits."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8", "surrogatepass")
    )


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext back to text, as a DSN's Original-Envelope-Id comes; lenient, as a reader
    should be: lower-case hex is read too, a "+" without two hex digits is kept as it is."""
    data = re.sub(
        rb"\+([0-9A-Fa-f]{2})",
        lambda m: bytes([int(m.group(1), 16)]),
        value.encode("utf-8", "surrogatepass"),
    )
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")
