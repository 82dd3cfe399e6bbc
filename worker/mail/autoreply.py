"""RFC 3834 auto-replies: when not to answer, and how to thread the answer.

Suppression is not an error: the job ends in state ``suppressed`` with the
reason. The per-sender window (one auto-reply per sender per account per
window) is claimed in Redis by the job layer.
"""

from __future__ import annotations

import re

from worker.mail.message import check_message_id
from worker.mail.payload import OriginalMessage, SendPayload
from worker.records.addresses import check_address, parse_mailbox

_RE_PREFIX = re.compile(r"^\s*(re|aw|sv|antw|vs)\s*:", re.IGNORECASE)
_DAEMONS = ("mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply", "donotreply")


def suppression_reason(original: OriginalMessage) -> str | None:
    """Why answering ``original`` would be wrong (a loop or a reply to a machine), or None."""
    auto = original.header("Auto-Submitted")
    if auto is not None and auto.split(";", 1)[0].strip().lower() != "no":
        return f"original is automatic (Auto-Submitted: {auto.strip()})"
    precedence = original.header("Precedence")
    if precedence is not None and precedence.strip().lower() in ("bulk", "list", "junk"):
        return f"original is bulk mail (Precedence: {precedence.strip()})"
    if original.header("List-Id") is not None:
        return "original came from a mailing list (List-Id)"
    suppress = original.header("X-Auto-Response-Suppress")
    if suppress is not None and {w.strip().lower() for w in suppress.split(",")} & {
        "all",
        "autoreply",
        "oof",
    }:
        return f"original asks for no auto-replies (X-Auto-Response-Suppress: {suppress.strip()})"
    return_path = original.return_path
    if return_path is None:
        return_path = original.header("Return-Path")
    if return_path is not None:
        bare = return_path.strip().strip("<>").strip()
        if not bare:
            return "original has an empty return path (a bounce or notification)"
        if bare.split("@", 1)[0].lower() in _DAEMONS[:2]:
            return f"original's return path is {bare}"
    if parse_mailbox(original.from_).local.lower() in _DAEMONS:
        return f"original is from {parse_mailbox(original.from_).address}"
    return None


def reply_recipient(payload: SendPayload) -> str:
    """Who the auto-reply goes to: explicit ``to``, else the return path, else From."""
    assert payload.original is not None
    if payload.to:
        return payload.to[0]
    return_path = (payload.original.return_path or "").strip().strip("<>").strip()
    if return_path:
        try:
            return check_address(return_path)
        except ValueError:
            pass
    return payload.original.from_


def reply_subject(payload: SendPayload) -> str:
    assert payload.original is not None
    subject = payload.subject or payload.original.subject
    return subject if _RE_PREFIX.match(subject) else f"Re: {subject}".rstrip()


def _reference(token: str) -> str | None:
    """One id of a References field, or None for anything that is not a Message-ID."""
    try:
        return check_message_id(token) if token.startswith("<") else None
    except ValueError:
        return None


def threading_headers(original: OriginalMessage) -> dict[str, str]:
    headers = {"Auto-Submitted": "auto-replied", "X-Auto-Response-Suppress": "All"}
    if original.message_id:  # validated: one <id@domain>
        references = [r for r in map(_reference, (original.header("References") or "").split()) if r]
        references = [r for r in references if r != original.message_id][-20:]
        headers["In-Reply-To"] = original.message_id
        headers["References"] = " ".join([*references, original.message_id])
    return headers
