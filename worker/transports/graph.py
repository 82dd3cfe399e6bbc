"""Microsoft Graph delivery: ``sendMail`` in MIME mode, with a draft + upload session for big messages.

The message we built is posted as it is (base64, ``Content-Type: text/plain``),
so Message-ID, Auto-Submitted, In-Reply-To, Reply-To and signed bodies go
through intact. Envelope recipients that no To/Cc header names (Bcc) are given
to Graph in a ``Bcc:`` header prepended to that copy; Graph does not pass Bcc
on to the other recipients.

Requests beyond about 4 MB are refused by Graph, so a message over
:data:`LARGE_MESSAGE_BYTES` is sent as: a draft created from the MIME without
its attachments, each attachment added (a plain POST under
:data:`SMALL_ATTACHMENT_BYTES`, an upload session in chunks above), then
``send`` on the draft.

One ``httpx.AsyncClient`` per account (keep-alive, bounded connections), at
most :data:`MAILBOX_CONCURRENCY` requests in flight per mailbox in the process
(contract §5). Failures follow contract §3: 429/503/504/5xx are transient with
Retry-After; 401 refreshes the token once, then fails as an authentication
error; other 4xx are permanent. Tokens never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import logging
import time
import weakref
from collections.abc import AsyncIterator
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from io import BytesIO
from typing import Any
from urllib.parse import quote

import httpx

from worker.db.vocabulary import RecipientState
from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    RecipientStatus,
    Rejected,
    TransientError,
)
from worker.records.account.account import EmailAccount
from worker.transports.base import ConnectivityReport, OutgoingMessage, SendResult
from worker.transports.limits import Limiter
from worker.transports.oauth import AccessToken, TokenSource, http_error
from worker.transports.tls import client_context

log = logging.getLogger("postroom.graph")

# Graph refuses requests over about 4 MB; base64 grows a message by 4/3.
LARGE_MESSAGE_BYTES = 3 * 1024 * 1024
# Attachments from this size go through an upload session (Graph: 3 MB to 150 MB).
SMALL_ATTACHMENT_BYTES = 3 * 1024 * 1024
# Upload session chunks: at most 4 MB each, a multiple of 320 KiB as Graph recommends.
UPLOAD_CHUNK_BYTES = 10 * 320 * 1024
MAILBOX_CONCURRENCY = 4  # concurrent requests per mailbox (contract §5)
MAX_RETRY_AFTER = 3600.0
RESULT_LINE = "Microsoft Graph (HTTPS)"

_WIRE = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
_mailbox_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def mailbox_semaphore(mailbox: str) -> asyncio.Semaphore:
    """The process-wide (per loop) request cap for one mailbox."""
    loop = asyncio.get_running_loop()
    per_loop = _mailbox_limits.setdefault(loop, {})
    key = mailbox.lower()
    if key not in per_loop:
        per_loop[key] = asyncio.Semaphore(MAILBOX_CONCURRENCY)
    return per_loop[key]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def graph_error(response: httpx.Response) -> str:
    """``code: message`` from a Graph error body (or the status line)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code, message = str(err.get("code") or ""), str(err.get("message") or "")
        text = f"{code}: {message}" if code and message else code or message
    else:
        text = response.reason_phrase
    return " ".join(text.split())[:300]


def with_bcc(message: OutgoingMessage) -> bytes:
    """The message for Graph: envelope recipients no To/Cc header names go in a Bcc header."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(message.data)
    named = {
        addr.lower()
        for _, addr in getaddresses([str(v) for k in ("To", "Cc") for v in headers.get_all(k, [])])
        if addr
    }
    hidden = [r for r in message.recipients if r.lower() not in named]
    if not hidden:
        return message.data
    return b"Bcc: " + ", ".join(hidden).encode("utf-8") + b"\r\n" + message.data


def _render(msg: Message) -> bytes:
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_WIRE).flatten(msg)
    return out.getvalue()


def split_attachments(data: bytes) -> tuple[bytes, list[tuple[str, str, bytes]]]:
    """(the MIME without its top-level attachments, [(filename, content type, bytes)])."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/mixed" or not msg.is_multipart():
        return data, []
    kept: list[Message | str] = []
    detached: list[tuple[str, str, bytes]] = []
    parts = msg.get_payload()
    assert isinstance(parts, list)
    for part in parts:
        if not isinstance(part, Message):  # pragma: no cover - the parser gives Messages
            kept.append(part)
            continue
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        if disposition == "attachment" and not part.is_multipart():
            payload = part.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else b""
            detached.append((part.get_filename() or "attachment", part.get_content_type(), content))
        else:
            kept.append(part)
    if not detached:
        return data, []
    msg.set_payload(kept)
    return _render(msg), detached


class GraphTransport:
    """Delivery through one mailbox's Graph ``sendMail`` (one per account per worker process)."""

    name = "graph"

    def __init__(
        self,
        account: EmailAccount,
        tokens: TokenSource,
        *,
        cadata: str | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        if account.graph is None:
            raise ValueError(f"account {account.name} has no Graph settings")
        self.account = account
        self.settings = account.graph
        self.tokens = tokens
        self._cadata = cadata
        self.limiter = limiter  # the mailbox's request cap across every worker (None: this process only)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        upn = quote(self.settings.user_principal_name, safe="@")
        self.user_url = f"{self.settings.base_url}/v1.0/users/{upn}"
        self.requests = 0

    def __repr__(self) -> str:
        return (
            f"GraphTransport(account={self.account.name!r}, base_url={self.settings.base_url!r}, "
            f"mailbox={self.settings.user_principal_name!r})"
        )

    # ---- plumbing ------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._closed:
            raise ConnectionFailed("transport is closed", account=self.account.name, transport="graph")
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                verify=client_context(cadata=self._cadata),
                trust_env=False,
                timeout=httpx.Timeout(self.settings.timeout),
                limits=httpx.Limits(
                    max_connections=MAILBOX_CONCURRENCY,
                    max_keepalive_connections=MAILBOX_CONCURRENCY,
                    keepalive_expiry=60.0,
                ),
            )
            self._client_loop = loop
        return self._client

    def _error(self, error: DeliveryError) -> DeliveryError:
        return error.with_context(account=self.account.name, transport="graph")

    async def _token(self, *, force: bool = False, stale: AccessToken | None = None) -> AccessToken:
        try:
            return await self.tokens.token(force=force, stale=stale.value if stale else None)
        except DeliveryError as exc:
            raise self._error(exc) from None

    async def _post_mime(
        self,
        path: str,
        data: bytes,
        *,
        what: str | None = None,
        sent: bool = False,
        fence: OutgoingMessage | None = None,
    ) -> httpx.Response:
        """POST a MIME message to the mailbox's ``path`` as Graph takes one: base64 text."""
        return await self._request(
            "POST",
            f"{self.user_url}/{path}",
            what=what or path,
            content=base64.b64encode(data),
            headers={"Content-Type": "text/plain"},
            sent=sent,
            fence=fence,
        )

    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        content: bytes | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        bearer: bool = True,
        sent: bool = False,
        fence: OutgoingMessage | None = None,
    ) -> httpx.Response:
        """One Graph request under the mailbox cap; a 401 refreshes the token and retries once.

        ``sent``: once the request is written, a lost connection may mean Graph
        accepted it (the error says so). ``fence``: the message whose attempt must still hold
        its job when the request goes out (asked after the mailbox slot is taken).
        """
        client = self._http()
        token = await self._token() if bearer else None
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            if token is not None:
                request_headers["Authorization"] = f"Bearer {token.value}"
            try:
                async with mailbox_semaphore(self.settings.user_principal_name), self._slot():
                    if fence is not None:
                        await fence.still_ours()  # after every wait, right before the send
                    self.requests += 1
                    response = await client.request(
                        method, url, content=content, json=json, headers=request_headers
                    )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise self._error(http_error(exc, f"{what}: cannot connect to Graph")) from None
            except httpx.HTTPError as exc:
                error = http_error(exc, f"{what}: connection to Graph lost")
                if sent and isinstance(error, ConnectionFailed):
                    error.reason += "; Graph may have accepted the message"
                raise self._error(error) from None
            if response.status_code == 401 and token is not None and attempt == 1:
                log.info("account %s: Graph refused the token (401); refreshing it once", self.account.name)
                token = await self._token(force=True, stale=token)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the mailbox's concurrent-request slots, shared with every worker."""
        if self.limiter is None:
            yield
            return
        token, key = self.limiter.new_token(), f"graph:{self.settings.user_principal_name.lower()}"
        await self.limiter.acquire_slot(key, MAILBOX_CONCURRENCY, token)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a lost release lapses with its lease
                await asyncio.shield(self.limiter.release_slot(key, token))

    def _refusal(self, response: httpx.Response, what: str) -> DeliveryError:
        status, text = response.status_code, graph_error(response)
        error: DeliveryError
        if status == 429 or status >= 500:
            error = TransientError(
                f"{what}: Graph is throttling or unavailable",
                code=status,
                server_text=text,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        elif status == 401:
            error = AuthenticationFailed(
                f"{what}: Graph refused the access token after a refresh", code=status, server_text=text
            )
        elif status == 403:
            error = AuthenticationFailed(
                f"{what}: access denied (does the app have Mail.Send for this mailbox?)",
                code=status,
                server_text=text,
            )
        else:
            error = Rejected(f"{what}: refused by Graph", code=status, server_text=text)
        return self._error(error)

    def _security(self, response: httpx.Response) -> str:
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        version = ssl_object.version() if ssl_object is not None else None
        return f"HTTPS {version}" if version else "HTTPS"

    def _result(self, message: OutgoingMessage, response: httpx.Response) -> SendResult:
        status = RecipientStatus(RecipientState.SENT, response.status_code, "Accepted by Graph")
        return SendResult(
            transport="graph",
            security=self._security(response),
            recipients=dict.fromkeys(message.recipients, status),
        )

    # ---- sending ---------------------------------------------------------------------

    async def send(self, message: OutgoingMessage) -> SendResult:
        if not "".join(message.recipients).isascii():  # IDN domains are punycode: only local parts
            raise self._error(
                Rejected(
                    "a recipient's local part is not ASCII: Microsoft Graph's sendMail takes no "
                    "SMTPUTF8 addresses (send it over SMTP to a server that offers SMTPUTF8)"
                )
            )
        data = with_bcc(message)
        if len(data) > LARGE_MESSAGE_BYTES:
            return await self._send_large(message, data)
        response = await self._post_mime("sendMail", data, sent=True, fence=message)
        if response.status_code == 202:
            return self._result(message, response)
        if response.status_code == 413:  # over the limit after all: take the large-message route
            log.info("account %s: sendMail answered 413; using an upload session", self.account.name)
            return await self._send_large(message, data)
        raise self._refusal(response, "sendMail")

    async def _send_large(self, message: OutgoingMessage, data: bytes) -> SendResult:
        """Draft from MIME without attachments, attachments added, then send the draft."""
        body, attachments = split_attachments(data)
        if not attachments or len(body) > LARGE_MESSAGE_BYTES:
            raise self._error(
                Rejected(
                    f"message is {len(data)} bytes, over Graph's request limit, and its body "
                    "cannot be split off from attachments (a signed message, or a large body)"
                )
            )
        response = await self._post_mime("messages", body, what="create draft")
        if response.status_code not in (200, 201):
            raise self._refusal(response, "create draft")
        draft_id = str(response.json().get("id") or "")
        if not draft_id:
            raise self._error(TransientError("create draft: Graph returned no message id"))
        draft_url = f"{self.user_url}/messages/{quote(draft_id, safe='')}"
        try:
            for filename, content_type, content in attachments:
                await self._attach(draft_url, filename, content_type, content)
            response = await self._request(
                "POST", f"{draft_url}/send", what="send draft", sent=True, fence=message
            )
        except BaseException:
            await self._delete_draft(draft_url)
            raise
        if response.status_code == 202:
            return self._result(message, response)
        await self._delete_draft(draft_url)
        raise self._refusal(response, "send draft")

    async def _attach(self, draft_url: str, filename: str, content_type: str, content: bytes) -> None:
        if len(content) < SMALL_ATTACHMENT_BYTES:
            response = await self._request(
                "POST",
                f"{draft_url}/attachments",
                what="add attachment",
                json={
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": filename,
                    "contentType": content_type,
                    "contentBytes": base64.b64encode(content).decode("ascii"),
                },
            )
            if response.status_code not in (200, 201):
                raise self._refusal(response, "add attachment")
            return
        response = await self._request(
            "POST",
            f"{draft_url}/attachments/createUploadSession",
            what="create upload session",
            json={
                "AttachmentItem": {
                    "attachmentType": "file",
                    "name": filename,
                    "size": len(content),
                    "contentType": content_type,
                }
            },
        )
        if response.status_code not in (200, 201):
            raise self._refusal(response, "create upload session")
        upload_url = response.json().get("uploadUrl")
        if not isinstance(upload_url, str) or not upload_url.startswith("https://"):
            raise self._error(TransientError("create upload session: Graph returned no upload URL"))
        total = len(content)
        for start in range(0, total, UPLOAD_CHUNK_BYTES):
            chunk = content[start : start + UPLOAD_CHUNK_BYTES]
            end = start + len(chunk) - 1
            # the upload URL carries its own authorization: no bearer token goes to it
            response = await self._request(
                "PUT",
                upload_url,
                what="upload attachment",
                content=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{end}/{total}",
                },
                bearer=False,
            )
            if response.status_code not in (200, 201, 202):
                raise self._refusal(response, "upload attachment")

    async def _delete_draft(self, draft_url: str) -> None:
        with contextlib.suppress(DeliveryError, httpx.HTTPError):
            await asyncio.shield(self._request("DELETE", draft_url, what="delete draft"))

    # ---- connectivity ------------------------------------------------------------------

    async def check(self) -> ConnectivityReport:
        """Token acquisition, then whether the send endpoint answers (nothing is sent)."""
        report = ConnectivityReport(self.account.name, ok=False, result=RESULT_LINE)
        started = time.monotonic()
        report.detail = {
            "base_url": self.settings.base_url,
            "mailbox": self.settings.user_principal_name,
            **self.tokens.describe(),
        }
        try:
            token = await self._token()
            report.detail["token"] = "acquired"  # noqa: S105 - a status word
            report.detail["token_expires"] = token.expires_iso
            # an empty JSON body: Graph authenticates the call, then refuses the missing
            # message with 400; no message can be sent by it
            response = await self._request(
                "POST", f"{self.user_url}/sendMail", what="sendMail check", json={}
            )
        except DeliveryError as exc:
            report.error = str(exc)
            report.detail.setdefault("token", "not acquired")
            report.detail["error_class"] = type(exc).__name__
        else:
            status = response.status_code
            report.detail["send_endpoint"] = f"answered {status}"
            report.detail["security"] = self._security(response)
            if status in (200, 202, 400):
                report.ok = True
            else:
                report.error = str(self._refusal(response, "sendMail check"))
        report.detail["duration_ms"] = round((time.monotonic() - started) * 1000)
        return report

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
