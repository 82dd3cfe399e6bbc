"""Email addresses as producers write them: ``a@b`` or ``Display Name <a@b>`` (contract §2).

- An internationalised domain (``bücher.example``) is checked and converted by IDNA 2008
  (the ``idna`` package, with UTS #46 mapping: ``BÜCHER.example`` works too) and goes out
  as punycode (``xn--bcher-kva.example``) in the envelope and the headers: no SMTPUTF8
  needed.
- A UTF-8 local part (``josé@example.test``) is allowed; such a message needs a server
  that offers SMTPUTF8 (RFC 6531) and is written with UTF-8 headers (RFC 6532). The SMTP
  transport refuses it, naming SMTPUTF8, before anything is sent when the server does not.
- A display name may be any text without control characters; headers carry it RFC 2047
  encoded when it is not ASCII, quoted when it has specials. The envelope and the
  per-recipient results use the bare address only.

Deliberately stricter than RFC 5322: no comments, no groups, no quoted local parts, no
domain literals — nothing a mail queue should accept from a producer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from email.header import Header
from typing import Any

import idna

# a bare address: no whitespace, angle brackets, quotes, parentheses or list separators
_BARE = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[^\s@<>()\[\],;:\"\\]+$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# C0 but TAB, DEL, C1 and lone surrogates: never in a value that ends up in a header
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
# ``Name <addr>`` / ``"Quoted, Name" <addr>`` / ``<addr>``
_NAMED = re.compile(
    r'^\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<plain>[^<>"]*?))\s*<(?P<addr>[^<>]*)>\s*$', re.S
)
# ZERO WIDTH NON-JOINER / JOINER: format characters that scripts (Persian, Indic) and emoji
# sequences need and that neither hide nor reorder text; every other format character is refused
JOINERS = frozenset("\u200c\u200d")
_PLAIN_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ .-]+$")  # atoms, spaces and dots
MAX_NAME = 200


@dataclass(frozen=True)
class Mailbox:
    """One parsed address: its display name (or None), local part and domain as written."""

    name: str | None
    local: str
    domain: str

    @property
    def ascii_domain(self) -> str:
        """The domain as it goes out: punycode for an IDN, lower-cased."""
        return to_ascii_domain(self.domain)

    @property
    def address(self) -> str:
        """The bare address for the envelope, the headers and the results: ``local@ascii-domain``."""
        return f"{self.local}@{self.ascii_domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()

    def header(self) -> str:
        """The mailbox as a header writes it (``=?utf-8?…?= <a@b>`` for a non-ASCII name)."""
        if not self.name:
            return self.address
        if not self.name.isascii():
            phrase = Header(self.name, "utf-8").encode(linesep="\r\n")
        elif _PLAIN_PHRASE.fullmatch(self.name) and not self.name.startswith((".", " ")):
            phrase = self.name
        else:
            phrase = '"' + self.name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{phrase} <{self.address}>"


def hidden(char: str) -> bool:
    """Whether ``char`` would not show as itself on an operator's screen: a control character
    (C0, DEL, C1: CR/LF, NUL, ESC), a lone surrogate, a line/paragraph separator, or a format
    character (bidi overrides such as U+202E, invisible ones such as U+200B, U+FEFF)."""
    category = unicodedata.category(char)
    return category in ("Cc", "Cs", "Zl", "Zp") or (category == "Cf" and char not in JOINERS)


def hidden_character(value: str, *, tab: bool = False) -> str | None:
    """The first :func:`hidden` character of ``value`` (TAB allowed when ``tab``), or None."""
    return next((c for c in value if hidden(c) and not (tab and c == "\t")), None)


def check_visible_text(value: Any, what: str = "", *, tab: bool = False) -> str:
    """``value`` when it is text an operator may be shown as written (a suppression reason, a
    subject, a header, a display name); ValueError naming the character (never the text)."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: must be text" if what else "must be text")
    if (found := hidden_character(value, tab=tab)) is not None:
        control = unicodedata.category(found) in ("Cc", "Cs")
        kind = "control character" if control else "bidi or invisible format character"
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}{kind} U+{ord(found):04X} is not allowed")
    return value


def escaped(text: str) -> str:
    """``text`` for a terminal: every :func:`hidden` character as ``\\uXXXX`` (text that came from
    elsewhere, a server's reply or an older record, is shown, never obeyed)."""
    if not any(hidden(c) for c in text):
        return text
    return "".join(f"\\u{ord(c):04x}" if hidden(c) else c for c in text)


def to_ascii_domain(domain: str) -> str:
    """``domain`` in ASCII: punycode by IDNA 2008 (UTS #46 mapped) when it is not ASCII."""
    if domain.isascii():
        ascii_domain = domain
    else:
        try:
            ascii_domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"{domain!r} is not a valid internationalised domain ({exc})") from None
    if len(ascii_domain) > 253 or not all(_DOMAIN_LABEL.match(label) for label in ascii_domain.split(".")):
        raise ValueError(f"{domain!r} is not a valid domain")
    return ascii_domain


def _bare(text: str, original: str) -> tuple[str, str]:
    if not _BARE.match(text) or len(text) > 254:
        raise ValueError(f"{original!r} is not a valid email address")
    local, domain = text.rsplit("@", 1)
    if len(local.encode("utf-8")) > 64 or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError(f"{original!r} is not a valid email address")
    try:
        to_ascii_domain(domain)
    except ValueError:
        raise ValueError(f"{original!r} has an invalid domain") from None
    return local, domain


def parse_mailbox(value: Any) -> Mailbox:
    """``value`` (``a@b`` or ``Name <a@b>``) as a :class:`Mailbox`; ValueError says why not."""
    if not isinstance(value, str):
        raise ValueError("must be an email address")
    if (found := hidden_character(value)) is not None:
        raise ValueError(
            f"an email address cannot contain control, bidi or invisible characters (U+{ord(found):04X})"
        )
    text = value.strip()
    named = _NAMED.match(text) if "<" in text else None
    if named is None:
        local, domain = _bare(text, text)
        return Mailbox(None, local, domain)
    quoted = named.group("quoted")
    name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else (named.group("plain") or "").strip()
    if len(name) > MAX_NAME:
        raise ValueError(f"a display name is at most {MAX_NAME} characters")
    local, domain = _bare(named.group("addr").strip(), text)
    return Mailbox(name or None, local, domain)


def check_mailbox(value: Any) -> str:
    """Validate ``a@b`` or ``Name <a@b>``; returns it stripped (the form the producer wrote)."""
    parse_mailbox(value)
    return str(value).strip()


def check_address(value: Any) -> str:
    """Validate one bare email address (``user@example.com``); returns it stripped."""
    mailbox = parse_mailbox(value)
    if mailbox.name is not None or "<" in str(value):
        raise ValueError(f"{str(value).strip()!r}: a bare address is needed here (no display name)")
    return str(value).strip()


def bare_address(value: str) -> str:
    """The envelope form of ``value`` (display name dropped, IDN domain in punycode)."""
    return parse_mailbox(value).address
