"""One SMTP mail transaction on an open aiosmtplib connection, pipelined when the server allows.

With PIPELINING (RFC 2920, offered by Postfix, Exchange, Gmail and most servers) the envelope
(MAIL FROM, every RCPT TO and DATA) goes out in one write and its replies are read back in
order; the content follows the 354 in a second write. That is two writes and two waits per
message instead of three plus one per recipient, which is most of a sender's CPU on a fast link
(every write to a socket is a system call, every reply a loop wake-up).

aiosmtplib reads one reply per command it wrote and has no pipelined reader, so this is the one
module that knows its protocol's private state: ``_command_lock``, ``_buffer``,
``_response_waiter``, ``_response_pending`` and ``_read_response_from_buffer``.
``tests/test_pipelining.py`` pins that knowledge against a server that answers in awkward
pieces (every reply in one packet, byte by byte, split mid-line), so an aiosmtplib upgrade that
changes it fails there, not in production.

Replies are returned, never raised: the caller classifies codes. What is raised is the loss of
the connection (``SMTPServerDisconnected``, ``SMTPTimeoutError``, ``OSError``; the client is
closed first, since a half-read group cannot be paired with later commands) and, for a reply
that is not SMTP, ``SMTPResponseException``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPServerDisconnected, SMTPTimeoutError
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, PERIOD_REGEX, normalize_message_line_endings

from worker.mail.reports import xtext_encode

# an address that needs no parsing to be quoted (aiosmtplib's quote_address runs email.utils'
# parseaddr, a few percent of a batch's CPU); anything else goes through it
_BARE = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+")
START_INPUT = 354
COMPLETED = 250
RCPT_ACCEPTED = (250, 251)  # 251: "not local, will forward"


@dataclass(frozen=True)
class EnvelopeReplies:
    """The server's answers to one envelope, in the order the commands went out."""

    mail: SMTPResponse
    rcpts: tuple[SMTPResponse, ...]  # one per recipient the server was asked about
    data: SMTPResponse | None  # the reply to DATA; None when DATA was not sent

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.rcpts if r.code in RCPT_ACCEPTED)


def pipelines(client: aiosmtplib.SMTP) -> bool:
    """True when the server offered PIPELINING in its last EHLO."""
    return client.supports_extension("pipelining")


def _command(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    if any(COMMAND_INJECTION_REGEX.search(part.encode(encoding)) for part in (address, *options)):
        raise ValueError("an address or option contains a control character")  # never cut, never sent
    quoted = f"<{address}>" if _BARE.fullmatch(address) else quote_address(address)
    return b" ".join([verb + quoted.encode(encoding), *(o.encode("ascii") for o in options)])


def _rcpt_options(recipient: str, options: Sequence[str], original_recipient: bool) -> Sequence[str]:
    if not original_recipient or not recipient.isascii():
        return options  # a UTF-8 ORCPT (RFC 6533) is a type some servers refuse: none at all
    return [*options, f"ORCPT=rfc822;{xtext_encode(recipient)}"]


async def send_envelope(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    *,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    original_recipient: bool = False,
    encoding: str = "ascii",
    timeout: float | None = None,
) -> EnvelopeReplies:
    """MAIL FROM, RCPT TO for each recipient, then DATA when the server may take the content.

    Pipelined: all of it in one write (DATA last, as RFC 2920 requires), every reply read.
    Otherwise one command at a time, stopping at a refused MAIL and leaving DATA out when no
    recipient was accepted. After a 354 the caller sends the content (:func:`send_content`)
    or, when it will not, ends the input with :func:`abandon_content`. ``original_recipient``
    adds each ASCII recipient's ORCPT (RFC 3461): a report about mail a relay forwarded then
    names the address that was sent to, not only the one it ended at.
    """
    mail = _command(b"MAIL FROM:", sender, mail_options, encoding)
    rcpts = [
        _command(b"RCPT TO:", r, _rcpt_options(r, rcpt_options, original_recipient), encoding)
        for r in recipients
    ]
    if pipelines(client):
        replies = await _commands(client, [mail, *rcpts, b"DATA"], timeout)
        return EnvelopeReplies(replies[0], tuple(replies[1:-1]), replies[-1])
    (mail_reply,) = await _commands(client, [mail], timeout)
    if mail_reply.code != COMPLETED:
        return EnvelopeReplies(mail_reply, (), None)
    rcpt_replies: list[SMTPResponse] = []
    for line in rcpts:
        (reply,) = await _commands(client, [line], timeout)
        rcpt_replies.append(reply)
        if reply.code in (421, 432) or not client.is_connected:
            break  # the server is going away: no point asking about the rest
    if not any(r.code in RCPT_ACCEPTED for r in rcpt_replies):
        return EnvelopeReplies(mail_reply, tuple(rcpt_replies), None)
    (data_reply,) = await _commands(client, [b"DATA"], timeout)
    return EnvelopeReplies(mail_reply, tuple(rcpt_replies), data_reply)


async def send_content(client: aiosmtplib.SMTP, message: bytes, timeout: float | None = None) -> SMTPResponse:
    """The message after a 354 (line endings made CRLF, leading dots doubled), then its reply."""
    (reply,) = await _exchange(client, on_the_wire(message), 1, timeout)
    return reply


def on_the_wire(message: bytes) -> bytes:
    """``message`` as DATA carries it: CRLF line endings, leading dots doubled (RFC 5321 §4.5.2),
    the final dot. aiosmtplib's regexes cost ~45 ms on a 1 MB attachment; a few C-speed scans
    (~6 ms) find that a message Postroom built needs neither, and the regexes run only when it
    does."""
    clean = message.endswith(b"\r\n") and (
        message.count(b"\n") == message.count(b"\r") == message.count(b"\r\n")
    )
    if not clean:
        message = normalize_message_line_endings(message)
    if message.startswith(b".") or b"\n." in message:
        message = PERIOD_REGEX.sub(b"..", message)
    return message + b".\r\n"


async def abandon_content(client: aiosmtplib.SMTP, timeout: float | None = None) -> SMTPResponse:
    """End a 354's input with nothing in it (RFC 2920 §3.1: a lone dot); the server refuses it."""
    (reply,) = await _exchange(client, b".\r\n", 1, timeout)
    return reply


async def _commands(client: aiosmtplib.SMTP, lines: list[bytes], timeout: float | None) -> list[SMTPResponse]:
    return await _exchange(client, b"".join(line + b"\r\n" for line in lines), len(lines), timeout)


async def _exchange(
    client: aiosmtplib.SMTP, data: bytes, count: int, timeout: float | None
) -> list[SMTPResponse]:
    """Write ``data`` in one write and read ``count`` replies, under the protocol's command lock."""
    protocol: Any = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise SMTPServerDisconnected("Server not connected")
    try:
        async with protocol._command_lock:
            restore = _keep_data_behind_a_reply(protocol)
            try:
                protocol._response_pending = True
                protocol.write(data)
                return [await _next_reply(protocol, timeout) for _ in range(count)]
            finally:
                restore()
    except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
        client.close()
        raise


async def _next_reply(protocol: Any, timeout: float | None) -> SMTPResponse:
    """The next reply in order: one already parsed and waiting, else one already in the buffer
    (it came in the same packet as the one before), else the next to arrive."""
    protocol._response_pending = True  # aiosmtplib drops data that arrives while this is False
    waiter = protocol._response_waiter
    if waiter is None:
        raise SMTPServerDisconnected("Connection lost")
    if not waiter.done():
        buffered: SMTPResponse | None = protocol._read_response_from_buffer()
        if buffered is not None:
            return buffered
    reply: SMTPResponse = await protocol.read_response(timeout=timeout)
    return reply


def _keep_data_behind_a_reply(protocol: Any) -> Callable[[], None]:
    """aiosmtplib discards data that arrives while a parsed reply waits to be picked up; in a
    pipelined group that data is the next reply. Keep it in the buffer instead, while the group
    is read; returns what puts aiosmtplib's own handler back."""
    original = protocol.data_received

    def data_received(data: bytes) -> None:
        waiter = protocol._response_waiter
        if waiter is not None and waiter.done() and protocol.transport is not None:
            protocol._buffer.extend(data)
        else:
            original(data)

    protocol.data_received = data_received

    def restore() -> None:
        del protocol.data_received

    return restore
