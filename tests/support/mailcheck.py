"""Reading a message back the way a strict client does (Python's ``email``, ``policy.default``
with ``raise_on_defect=True``): zero defects, every line at most 998 octets."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

STRICT = email.policy.default.clone(raise_on_defect=True)


def strict_parse(data: bytes, *, utf8_local_parts: bool = False) -> EmailMessage:
    """The message as a strict reader sees it; fails on any defect or an over-long line
    (``utf8_local_parts``: but the note Python's parser makes of an RFC 6532 address)."""
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, line[:80]
    text = data.decode("utf-8")  # RFC 6532: headers may be UTF-8
    message = email.message_from_string(text, policy=STRICT)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        assert part.defects == [], part.defects
        for name, value in part.items():
            defects = [d for d in getattr(value, "defects", ()) if not utf8_local_parts or
                       type(d).__name__ != "NonASCIILocalPartDefect"]  # fmt: skip
            assert defects == [], (name, defects)
    return message
