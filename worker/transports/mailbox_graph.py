"""Reading a Graph account's mailbox (the bounce reader, contract §11): the twin of
:class:`~worker.transports.mailbox.ImapMailbox` over Microsoft Graph's REST API. It lists the
messages after a position, fetches one's MIME, moves one to a folder (made when missing) and
nothing else: nothing is ever deleted.

Graph has no UID, so a position is ``"{receivedDateTime}|{id}"``: the time a message arrived (to
the second) with its id to order messages that arrived in the same second. Ids are asked for as
ImmutableId (``Prefer: IdType="ImmutableId"``), so a message keeps its id when it is moved. A
message received in the last :data:`SETTLE` seconds (by Graph's clock: the answer's Date) waits
for the next pass, since one arriving later in that same second could sort before it and be
passed over.

httpx's blocking client, as the reader runs in a thread of its own; TLS as for Graph's sending
(the account's truststore, else the system's CAs), the account's auth profile token (a 401 gets a
fresh one, once). Every failure is a :class:`MailboxError` whose text holds no secret.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from worker.errors import ConfigurationError, DeliveryError
from worker.records.account.account import EmailAccount
from worker.records.account.bounces import Mailbox
from worker.records.account.record import GraphSettings
from worker.records.loader import Records
from worker.records.secrets import redact
from worker.transports.graph import graph_error
from worker.transports.mailbox import FETCH_LIMIT, MailboxError
from worker.transports.oauth import token_source
from worker.transports.tls import client_context, failure_reason, ssl_cause

PAGE = 100  # messages asked for per listing request ($top; Graph may send fewer, and a next link)
SETTLE = 10.0  # seconds: a message this new waits for the next pass (see above)
_STAMP = "%Y-%m-%dT%H:%M:%SZ"
_STAMP_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_IMMUTABLE = 'IdType="ImmutableId"'

Token = Callable[[bool], str]  # force a new one? → a bearer token


def graph_mailbox(records: Records, account: EmailAccount) -> GraphMailbox:
    """``account``'s own mailbox through Graph, with its auth profile's token and its truststore."""
    mb, graph = account.bounces, account.graph
    if mb is None or graph is None:
        raise MailboxError(f"{account.name}: reading a mailbox through Graph needs send_using: graph")
    try:
        source = token_source(graph.auth_profile, records)
        cadata = records.keystore(graph.truststore).cadata() if graph.truststore else None
    except ConfigurationError as exc:  # a record changed since it was checked: say so, in a pass report
        raise MailboxError(f"{account.name}: mailbox {graph.user_principal_name} (Graph): {exc}") from None

    def token(force: bool) -> str:
        return asyncio.run(source.access_token(force_refresh=force))

    return GraphMailbox(account.name, mb, graph, token=token, cadata=cadata)


class GraphMailbox:
    """One session with an account's mailbox through Graph, reading ``mailbox.folder``."""

    def __init__(
        self, account: str, mailbox: Mailbox, graph: GraphSettings, *, token: Token, cadata: str | None
    ) -> None:
        self.account, self.mailbox = account, mailbox
        self.upn, self.base_url, self.timeout = graph.user_principal_name, graph.base_url, graph.timeout
        self.user_url = f"{graph.base_url}/v1.0/users/{quote(self.upn, safe='@')}"
        self._token, self._cadata = token, cadata
        self._client: httpx.Client | None = None
        self._bearer = ""
        self._secrets: list[str] = []
        self._folders: dict[str, str] = {}  # path → id, as found (or made) in this session
        self.validity = ""  # the id of the folder read: another folder's positions mean nothing here

    def __repr__(self) -> str:
        return f"GraphMailbox({self.account!r}, {self.upn!r}, {self.mailbox.folder!r})"

    # ---- session ---------------------------------------------------------

    def open(self) -> GraphMailbox:
        """Get a token and find the folder to read (never made: a missing one is an error)."""
        self._client = httpx.Client(
            verify=client_context(cadata=self._cadata), trust_env=False, timeout=httpx.Timeout(self.timeout)
        )
        try:
            self._bearer = self._fresh(force=False)
            self.validity = self._folder(self.mailbox.folder, create=False)
        except MailboxError:
            self.close()
            raise
        return self

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> GraphMailbox:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------

    def pending(self, mark: str, limit: int) -> list[tuple[str, str]]:
        """The messages after ``mark`` (a position :meth:`pending` gave before; "": from the
        start), oldest first, at most ``limit``: (message id, position) each."""
        after = _position(mark)
        query = {
            "$select": "id,receivedDateTime",
            "$orderby": "receivedDateTime asc",
            "$top": str(min(limit, PAGE)),
        }
        if after is not None:
            query["$filter"] = f"receivedDateTime ge {after[0]}"
        url: str | None = f"{self._folder_url(self.validity)}/messages?{_query(query)}"
        found: list[tuple[str, str]] = []  # (receivedDateTime, id), in Graph's order
        while url is not None and limit > 0:
            response = self._send("GET", url, what="list messages")
            body = self._json(response, "list messages")
            settled = (_server_now(response) - timedelta(seconds=SETTLE)).strftime(_STAMP)
            url = self._next_link(body)
            for item in _items(body, self._where("list messages")):
                key = self._key(item)
                if after is not None and key <= after:
                    continue
                # past the limit, read on only through the last message's second: its ties
                # are put in order of their ids below, and the first ones taken
                if key[0] > settled or (len(found) >= limit and key[0] != found[limit - 1][0]):
                    url = None
                    break
                found.append(key)
        return [(ident, f"{when}|{ident}") for when, ident in sorted(found)[: max(limit, 0)]]

    def fetch(self, ref: str) -> bytes:
        """The message's MIME, its first :data:`FETCH_LIMIT` bytes (its read flag stays as it was)."""
        response = self._send("GET", f"{self._message_url(ref)}/$value", what="fetch", stream=True)
        data = bytearray()
        try:
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= FETCH_LIMIT:
                    break
        except httpx.HTTPError as exc:
            raise self._failure("fetch", exc) from None
        finally:
            response.close()
        return bytes(data[:FETCH_LIMIT])

    def move(self, ref: str, folder: str) -> None:
        """Move the message to ``folder`` (made when missing); its id stays (ImmutableId)."""
        target = self._folder(folder, create=True)
        self._send(
            "POST", f"{self._message_url(ref)}/move", what=f"move to {folder}", json={"destinationId": target}
        )

    # ---- folders ---------------------------------------------------------

    def _folder(self, path: str, *, create: bool) -> str:
        """The id of the folder at ``path``: display names from the mailbox's root, split by "/"
        (a first name INBOX is the inbox, whatever it is called in the mailbox's language)."""
        if path in self._folders:
            return self._folders[path]
        names = [n for n in path.split("/") if n]
        if not names:
            raise MailboxError(f"{self._where('find folder')}: {path!r} names no folder")
        parent: str | None = None
        if names[0].upper() == "INBOX":
            parent = self._id(
                self._json(self._send("GET", self._folder_url("inbox"), what="find inbox"), "find inbox")
            )
            names = names[1:]
        for name in names:
            found = self._child(parent, name)
            if found is None and create:
                found = self._make(parent, name)
            if found is None:
                raise MailboxError(f"{self._where('find folder')}: no folder {path!r} (no {name!r})")
            parent = found
        assert parent is not None
        self._folders[path] = parent
        return parent

    def _child(self, parent: str | None, name: str) -> str | None:
        escaped = name.replace("'", "''")
        query = {"$filter": f"displayName eq '{escaped}'", "$select": "id,displayName"}
        url: str | None = f"{self._children_url(parent)}?{_query(query)}"
        while url is not None:
            body = self._json(self._send("GET", url, what=f"find folder {name}"), f"find folder {name}")
            for item in _items(body, self._where(f"find folder {name}")):
                if str(item.get("displayName", "")).casefold() == name.casefold():
                    return self._id(item)
            url = self._next_link(body)
        return None

    def _make(self, parent: str | None, name: str) -> str | None:
        """Create the folder; on a 409 (another reader made it first), find the one there is."""
        what = f"create folder {name}"
        response = self._send(
            "POST", self._children_url(parent), what=what, json={"displayName": name}, allow=409
        )
        if response.status_code == 409:
            return self._child(parent, name)
        return self._id(self._json(response, what))

    # ---- plumbing --------------------------------------------------------

    def _folder_url(self, ref: str) -> str:
        return f"{self.user_url}/mailFolders/{quote(ref, safe='')}"

    def _children_url(self, parent: str | None) -> str:
        return (
            f"{self.user_url}/mailFolders" if parent is None else f"{self._folder_url(parent)}/childFolders"
        )

    def _message_url(self, ref: str) -> str:
        return f"{self.user_url}/messages/{quote(ref, safe='')}"

    def _send(
        self, method: str, url: str, *, what: str, json: Any = None, stream: bool = False, allow: int = 0
    ) -> httpx.Response:
        """One request with the bearer token; a 401 gets a fresh token and one more try. An
        answer other than 2xx (or ``allow``) is an error."""
        if self._client is None:
            raise MailboxError(f"{self._where(what)}: not open")
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self._bearer}", "Prefer": _IMMUTABLE}
            request = self._client.build_request(method, url, json=json, headers=headers)
            try:
                response = self._client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise self._failure(what, exc) from None
            if response.is_success or response.status_code == allow:
                return response
            try:
                response.read()  # the error's body, streamed or not
            except httpx.HTTPError as exc:
                raise self._failure(what, exc) from None
            finally:
                response.close()
            if response.status_code == 401 and attempt == 1:
                self._bearer = self._fresh(force=True)
                continue
            break
        said = redact(graph_error(response), self._secrets)
        raise MailboxError(f"{self._where(what)}: Graph answered {response.status_code}: {said}")

    def _fresh(self, *, force: bool) -> str:
        try:
            value = self._token(force)
        except (DeliveryError, ConfigurationError) as exc:  # their texts hold no secret; still, redact
            raise MailboxError(f"{self._where('token')}: {redact(str(exc), self._secrets)[:300]}") from None
        self._secrets.append(value)
        return value

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise MailboxError(f"{self._where(what)}: Graph's answer is not a JSON object")
        return body

    def _id(self, item: dict[str, Any]) -> str:
        ident = item.get("id")
        if not isinstance(ident, str) or not ident or "|" in ident:
            raise MailboxError(f"{self._where('read answer')}: an item without a usable id")
        return ident

    def _key(self, item: dict[str, Any]) -> tuple[str, str]:
        """(receivedDateTime in UTC to the second, id): what a position is made of."""
        try:
            when = datetime.fromisoformat(str(item.get("receivedDateTime")))
        except ValueError:
            raise MailboxError(
                f"{self._where('list messages')}: a message without receivedDateTime"
            ) from None
        when = when.replace(tzinfo=when.tzinfo or UTC).astimezone(UTC)
        return when.strftime(_STAMP), self._id(item)

    def _next_link(self, body: dict[str, Any]) -> str | None:
        """The next page; only on Graph's own address, where the token may go."""
        link = body.get("@odata.nextLink")
        if link is None:
            return None
        if not isinstance(link, str) or not link.startswith(f"{self.base_url}/"):
            raise MailboxError(
                f"{self._where('next page')}: a next link away from {self.base_url}: not followed"
            )
        return link

    def _failure(self, what: str, exc: httpx.HTTPError) -> MailboxError:
        if ssl_cause(exc) is None and isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self.timeout:g}s"
        else:
            reason, _ = failure_reason(exc)
        return MailboxError(f"{self._where(what)}: {redact(reason, self._secrets)[:300]}")

    def _where(self, what: str) -> str:
        return f"{self.account}: mailbox {self.upn} (Graph): {what}"


def _position(mark: str) -> tuple[str, str] | None:
    """A position as (receivedDateTime, id); None for "" and for what is no position of ours
    (the time goes into a $filter: only a time of the exact shape Graph gave is used)."""
    when, _, ident = mark.partition("|")
    return (when, ident) if _STAMP_TEXT.match(when) and ident else None


def _query(params: dict[str, str]) -> str:
    """OData options with their spaces as %20 (a "+" is no space to every server)."""
    return "&".join(f"{k}={quote(v, safe=',:$')}" for k, v in params.items())


def _items(body: dict[str, Any], where: str) -> list[dict[str, Any]]:
    value = body.get("value")
    if not isinstance(value, list) or not all(isinstance(i, dict) for i in value):
        raise MailboxError(f"{where}: Graph's answer has no list of items")
    return value


def _server_now(response: httpx.Response) -> datetime:
    """Graph's clock (the answer's Date), else ours."""
    try:
        return parsedate_to_datetime(response.headers.get("Date", "")).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)
