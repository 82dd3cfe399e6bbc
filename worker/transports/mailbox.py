"""Reading an account's mailbox over IMAP (the bounce reader, contract §11): list the messages
after a UID, fetch one, move it to a folder, nothing else. Never deletes a message: a handled
report is moved (UID MOVE, or COPY then the original's removal where the server has no MOVE).

Python's own imaplib, blocking: the reader runs in a thread of its own. IMAPS (993) or STARTTLS
(143) with the account's TLS rules, LOGIN with a password or XOAUTH2 with the account's token
(a refused token is replaced once, as Graph's 401 is: worker/transports/mailbox_graph.py).
Every failure is a :class:`MailboxError` whose text holds no secret.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from worker.records.account.bounces import Mailbox
from worker.records.secrets import redact
from worker.transports.tls import client_context, failure_reason

FETCH_LIMIT = 2 * 1024 * 1024  # a report's first 2 MiB hold everything it reports
_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")


class MailboxError(Exception):
    """The mailbox could not be read (connection, TLS, login, a command refused)."""


class MailboxSession(Protocol):
    """What the bounce reader asks of a mailbox, IMAP or Graph: open on the folder to read."""

    validity: str  # changes when the folder's positions mean other messages (IMAP UIDVALIDITY)

    def __enter__(self) -> MailboxSession: ...

    def __exit__(self, *_: object) -> None: ...

    def pending(self, mark: str, limit: int) -> list[tuple[str, str]]: ...

    def fetch(self, ref: str) -> bytes: ...

    def move(self, ref: str, folder: str) -> None: ...


class ImapMailbox:
    """One IMAP session to an account's mailbox, with ``folder`` selected."""

    def __init__(
        self,
        account: str,
        mailbox: Mailbox,
        *,
        cadata: str | None,
        password: Callable[[], str] | None = None,
        token: Callable[[bool], str] | None = None,  # force a new one? → a bearer token
        timeout: float = 30.0,
    ) -> None:
        self.account, self.mailbox = account, mailbox
        self._cadata, self._password, self._token, self._timeout = cadata, password, token, timeout
        self._imap: imaplib.IMAP4 | None = None
        self.validity = ""
        self.delimiter = "/"  # the server's hierarchy delimiter (LIST "" "")
        self._secrets: list[str] = []

    def __repr__(self) -> str:
        return (
            f"ImapMailbox({self.account!r}, {self.mailbox.host}:{self.mailbox.port}, {self.mailbox.folder!r})"
        )

    # ---- session ---------------------------------------------------------

    def open(self) -> ImapMailbox:
        """Connect, secure, log in and select the folder."""
        mb = self.mailbox
        assert mb.host is not None
        context = None
        if mb.protocol != "none":
            context = client_context(cadata=self._cadata, min_version=mb.min_tls_version)
        try:
            if mb.protocol == "imaps":
                imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    mb.host, mb.port, ssl_context=context, timeout=self._timeout
                )
            else:
                imap = imaplib.IMAP4(mb.host, mb.port, timeout=self._timeout)
                if mb.protocol == "starttls":
                    imap.starttls(context)
            self._imap = imap
            self._login(imap)
            self.delimiter = self._delimiter(imap)
            status, selected = imap.select(self._name(mb.folder))
            self._ok(status, list(selected), f"SELECT {mb.folder}")
            found = _UIDVALIDITY.search(b" ".join(_bytes(d) for d in imap.untagged_responses.get("OK", [])))
            validity = imap.untagged_responses.get("UIDVALIDITY", [b""])[0]
            self.validity = (
                _bytes(validity).decode() if validity else (found.group(1).decode() if found else "")
            )
        except (OSError, ssl.SSLError, imaplib.IMAP4.error) as exc:
            self.close()
            raise self._error("open", exc) from None
        except BaseException:  # MailboxError, or no token to be had (DeliveryError): no socket left open
            self.close()
            raise
        return self

    @staticmethod
    def _delimiter(imap: imaplib.IMAP4) -> str:
        """The server's hierarchy delimiter: a record writes folder paths with "/" (as
        ``Postroom/Processed``); Dovecot's Maildir++ and Exchange, say, use "." and "/"."""
        status, data = imap.list('""', '""')
        found = re.search(rb'\) "(.)"', _bytes(data[0] or b"")) if status == "OK" and data else None
        return found.group(1).decode() if found else "/"

    def _name(self, path: str) -> str:
        """A folder path of the record as the server names it, quoted."""
        return _quote(path.replace("/", self.delimiter) if self.delimiter not in ("/", "") else path)

    def _login(self, imap: imaplib.IMAP4) -> None:
        user = self.mailbox.user or ""
        try:
            if self._token is not None:
                answer: tuple[Any, Any] = self._xoauth2(imap, user)
            else:
                assert self._password is not None
                password = self._password()
                self._secrets.append(password)
                answer = imap.login(user, password)
        except imaplib.IMAP4.error as exc:  # imaplib raises a NO as an error whose text is bytes' repr
            text = str(exc.args[0] if exc.args else exc)
            text = text[2:-1] if text[:2] in ("b'", 'b"') else text
            where = f"{self.mailbox.host}:{self.mailbox.port}"
            raise MailboxError(
                f"{self.account}: mailbox {where}: login refused: {redact(text, self._secrets)[:300]}"
            ) from None
        self._ok(str(answer[0]), list(answer[1]), "login")

    def _xoauth2(self, imap: imaplib.IMAP4, user: str) -> tuple[Any, Any]:
        """AUTHENTICATE XOAUTH2; a refused token is replaced once and tried again on the same
        connection: the cached token may be revoked or expired early while it still looks good
        for up to an hour."""
        assert self._token is not None
        for fresh in (False, True):
            token = self._token(fresh)
            self._secrets.append(token)
            try:
                return imap.authenticate("XOAUTH2", _xoauth2_answer(user, token))
            except imaplib.IMAP4.abort:  # the connection is gone: nothing to try again on
                raise
            except imaplib.IMAP4.error:
                if fresh:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            with contextlib.suppress(OSError):
                imap.shutdown()

    def __enter__(self) -> ImapMailbox:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------

    def pending(self, mark: str, limit: int) -> list[tuple[str, str]]:
        """The messages after ``mark`` (a position :meth:`pending` gave before; "": from the
        start), oldest first, at most ``limit``: (reference, position) each. Here both are the UID."""
        after = int(mark) if mark.isdigit() else 0
        status, data = self._call("uid", "SEARCH", f"UID {after + 1}:*")
        self._ok(status, data, "UID SEARCH")
        found = sorted(int(u) for u in _bytes(data[0] or b"").split() if u.isdigit())
        # "n:*" includes the last UID when none is above it
        return [(str(u), str(u)) for u in found if u > after][:limit]

    def fetch(self, uid: str) -> bytes:
        """The message's first :data:`FETCH_LIMIT` bytes (BODY.PEEK: its \\Seen flag stays as it was)."""
        status, data = self._call("uid", "FETCH", uid, f"(BODY.PEEK[]<0.{FETCH_LIMIT}>)")
        self._ok(status, data, "UID FETCH")
        for part in data:
            if isinstance(part, tuple) and len(part) == 2:
                return bytes(part[1])
        raise MailboxError(f"{self.account}: mailbox: UID FETCH {uid}: no message in the answer")

    def move(self, uid: str, folder: str) -> None:
        """Move the message to ``folder`` (made when missing)."""
        self._ensure(folder)
        assert self._imap is not None
        if b"MOVE" in _capabilities(self._imap):
            status, data = self._call("uid", "MOVE", uid, self._name(folder))
            self._ok(status, data, f"UID MOVE {folder}")
            return
        status, data = self._call("uid", "COPY", uid, self._name(folder))
        self._ok(status, data, f"UID COPY {folder}")
        status, data = self._call("uid", "STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
        self._ok(status, data, "UID STORE")
        if b"UIDPLUS" in _capabilities(self._imap):
            self._call("uid", "EXPUNGE", uid)
        else:
            self._call("expunge")

    def _ensure(self, folder: str) -> None:
        status, data = self._call("list", '""', self._name(folder))
        if status == "OK" and any(part for part in data if part):
            return
        status, data = self._call("create", self._name(folder))
        if status != "OK" and b"ALREADYEXISTS" not in b" ".join(_bytes(d) for d in data if d):
            self._ok(status, data, f"CREATE {folder}")

    # ---- plumbing --------------------------------------------------------

    def _call(self, command: str, *args: str) -> tuple[str, list[object]]:
        if self._imap is None:
            raise MailboxError(f"{self.account}: mailbox: not open")
        try:
            status, data = getattr(self._imap, command)(*args)
        except (OSError, ssl.SSLError, imaplib.IMAP4.error) as exc:
            raise self._error(command, exc) from None
        return str(status), list(data)

    def _ok(self, status: str, data: Sequence[object], what: str) -> None:
        if status != "OK":
            text = " ".join(_bytes(d).decode(errors="replace") for d in data if d)[:300]
            raise MailboxError(f"{self.account}: mailbox: {what} refused: {redact(text, self._secrets)}")

    def _error(self, what: str, exc: BaseException) -> MailboxError:
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            reason, _ = failure_reason(exc)
        elif isinstance(exc, socket.timeout | TimeoutError):
            reason = f"no answer within {self._timeout:g}s"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        where = f"{self.mailbox.host}:{self.mailbox.port}"
        return MailboxError(f"{self.account}: mailbox {where}: {what}: {redact(reason, self._secrets)[:300]}")


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, tuple):
        return b" ".join(_bytes(v) for v in value)
    return str(value).encode()


def _xoauth2_answer(user: str, token: str) -> Callable[[bytes], bytes]:
    """imaplib's authobject for XOAUTH2 (no SASL-IR: it answers the server's first, empty
    challenge). A later challenge is the server's refusal (base64 JSON, RFC 7628 §3.2.2): that
    gets the empty response that ends the exchange, not the token a second time."""
    blob = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return lambda challenge: b"" if challenge else blob


def _quote(folder: str) -> str:
    """A mailbox name as an IMAP quoted string (RFC 3501 modified UTF-7 is left to the server)."""
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _capabilities(imap: imaplib.IMAP4) -> set[bytes]:
    return {c.encode() if isinstance(c, str) else c for c in imap.capabilities}
