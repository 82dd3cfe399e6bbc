"""One user principal's mailbox in the local Graph (tests/support/cloud.py routes to it): folders
(the well-known ones, and those a client creates) holding raw MIME messages, with the calls the
bounce reader makes, answered as Graph answers them:

- ``GET mailFolders``, ``GET mailFolders/{id}/childFolders`` (``$filter=displayName eq '…'``,
  ``$select``, ``$top``, ``@odata.nextLink``), ``POST`` to either creates a folder (409
  ``ErrorFolderExists`` for a name its siblings have, in any case), ``GET mailFolders/{id}``;
  a well-known name (``inbox``, ``msgfolderroot``, …) stands for its folder's id.
- ``GET mailFolders/{id}/messages`` with ``$filter=receivedDateTime ge|gt|le|lt|eq …``,
  ``$orderby=receivedDateTime asc|desc`` (messages received in the same second come in the order
  they arrived, as Graph's ties come in no order of their ids), ``$top`` (at most
  :attr:`MailStore.page_cap` a page) and ``$skip`` in the ``@odata.nextLink``.
- ``GET messages/{id}``, ``GET messages/{id}/$value`` (the MIME), ``POST messages/{id}/move``:
  without ``Prefer: IdType="ImmutableId"`` a moved message gets a new id, as in Exchange.

Anything else in a query is refused (400) rather than ignored, so a client cannot rely on what
the stand-in does not do.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import quote, urlencode

WELL_KNOWN = {
    "msgfolderroot": "Top of Information Store",
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
}
STAMP = "%Y-%m-%dT%H:%M:%SZ"
_RECEIVED = re.compile(r"^receivedDateTime (ge|gt|le|lt|eq) (\S+)$")
_NAMED = re.compile(r"^displayName eq '((?:[^']|'')*)'$")
_COMPARE = {
    "ge": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "le": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
    "eq": lambda a, b: a == b,
}
_QUERY_KEYS = {"$filter", "$orderby", "$select", "$top", "$skip"}


class Fault(Exception):
    """A Graph error answer: status, error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Folder:
    id: str
    name: str
    parent: str | None
    well_known: str | None = None


@dataclass
class Stored:
    id: str
    received: datetime
    mime: bytes
    folder: str
    arrival: int  # the order messages arrived in: how Graph's same-second ties come

    def as_json(self, select: list[str] | None) -> dict[str, Any]:
        headers = BytesHeaderParser().parsebytes(self.mime)
        full = {
            "id": self.id,
            "receivedDateTime": self.received.strftime(STAMP),
            "subject": str(headers.get("Subject") or ""),
            "internetMessageId": str(headers.get("Message-ID") or ""),
            "parentFolderId": self.folder,
        }
        return full if select is None else {k: v for k, v in full.items() if k == "id" or k in select}


def new_id() -> str:
    """An id shaped like Graph's: URL-safe base64 with its padding."""
    return "AAMkAD" + secrets.token_urlsafe(24) + "="


def stamp(when: datetime | str) -> datetime:
    """A receivedDateTime: an aware datetime or an ISO 8601 text, in UTC, to the second."""
    value = datetime.fromisoformat(when) if isinstance(when, str) else when
    if value.tzinfo is None:
        raise ValueError(f"{when!r}: give a time zone")
    return value.astimezone(UTC).replace(microsecond=0)


class MailStore:
    """One user principal's folders and messages."""

    def __init__(self, upn: str) -> None:
        self.upn = upn
        self.lock = threading.Lock()
        self.page_cap = 1000  # Graph's own cap on $top for messages; tests lower it to page
        self.folders: dict[str, Folder] = {}
        self.messages: dict[str, Stored] = {}
        self._arrivals = 0
        root = self._add_folder(WELL_KNOWN["msgfolderroot"], None, "msgfolderroot")
        for key, name in WELL_KNOWN.items():
            if key != "msgfolderroot":
                self._add_folder(name, root.id, key)

    # ---- test controls -------------------------------------------------------------------

    def put(
        self, raw: bytes, received: datetime | str, *, folder: str = "inbox", id: str | None = None
    ) -> str:
        """Deliver ``raw`` into ``folder`` (a well-known name or a path) as received at ``received``."""
        with self.lock:
            target = self._resolve(folder) if folder.lower() in WELL_KNOWN else self._path(folder)
            if target is None:
                raise KeyError(folder)
            self._arrivals += 1
            message = Stored(id or new_id(), stamp(received), raw, target.id, self._arrivals)
            self.messages[message.id] = message
            return message.id

    def make_folder(self, path: str) -> str:
        """Create the folders of ``path`` under the root (as a user would); the last one's id."""
        with self.lock:
            parent = self.folders[self._well_known("msgfolderroot")]
            for name in path.split("/"):
                child = self._child(parent.id, name)
                parent = child if child is not None else self._add_folder(name, parent.id)
            return parent.id

    def folder_id(self, path: str) -> str | None:
        """The id of a well-known folder or of a path of display names under the root."""
        with self.lock:
            found = self._resolve(path) if path.lower() in WELL_KNOWN else self._path(path)
            return found.id if found else None

    def ids_in(self, path: str) -> list[str]:
        """The ids of the messages in the folder at ``path``, in the order they arrived."""
        folder = self.folder_id(path)
        with self.lock:
            held = [m for m in self.messages.values() if m.folder == folder]
            return [m.id for m in sorted(held, key=lambda m: m.arrival)]

    def paths(self) -> list[str]:
        """Every folder that is not well-known, as a path under the root."""
        with self.lock:
            return sorted(self._path_of(f) for f in self.folders.values() if f.well_known is None)

    # ---- routes --------------------------------------------------------------------------

    def route(self, method: str, action: str, query: dict[str, str], body: bytes, *, immutable: bool,
              link: str) -> Answer:  # fmt: skip
        """Answer ``method`` on ``action`` (the path after ``/users/{upn}/``); ``link``: the
        user's URL, for next links."""
        try:
            with self.lock:
                return self._route(method, action.split("/"), query, body, immutable, link)
        except Fault as fault:
            return Answer(fault.status, {"error": {"code": fault.code, "message": fault.message}})

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes, immutable: bool,
               link: str) -> Answer:  # fmt: skip
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            raise Fault(400, "BadRequest", f"query option not supported here: {sorted(unknown)}")
        if parts[0] == "mailFolders":
            parent = (
                self._folder(parts[1]) if len(parts) > 1 else self.folders[self._well_known("msgfolderroot")]
            )
            tail = parts[2:]
            if len(parts) == 1 or tail == ["childFolders"]:
                if method == "POST":
                    return Answer(201, self._folder_json(self._create(parent, body)))
                if method == "GET":
                    children = [f for f in self.folders.values() if f.parent == parent.id]
                    return self._list([self._folder_json(f) for f in children], query, link, "/".join(parts))
            if method == "GET" and not tail:
                return Answer(200, self._folder_json(parent))
            if method == "GET" and tail == ["messages"]:
                return self._list(self._messages(parent, query), query, link, "/".join(parts), select_ok=True)
        if parts[0] == "messages" and len(parts) in (2, 3):
            message = self.messages.get(parts[1])
            if message is None:
                raise Fault(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            tail = parts[2:]
            if method == "GET" and not tail:
                return Answer(200, message.as_json(_select(query)))
            if method == "GET" and tail == ["$value"]:
                return Answer(200, message.mime, {"Content-Type": "message/rfc822"})
            if method == "POST" and tail == ["move"]:
                return Answer(201, self._move(message, body, immutable).as_json(None))
        raise Fault(400, "BadRequest", f"unsupported: {method} {'/'.join(parts)}")

    # ---- folders -------------------------------------------------------------------------

    def _add_folder(self, name: str, parent: str | None, well_known: str | None = None) -> Folder:
        folder = Folder(new_id(), name, parent, well_known)
        self.folders[folder.id] = folder
        return folder

    def _well_known(self, key: str) -> str:
        return next(f.id for f in self.folders.values() if f.well_known == key)

    def _resolve(self, ref: str) -> Folder | None:
        if ref.lower() in WELL_KNOWN:
            return self.folders[self._well_known(ref.lower())]
        return self.folders.get(ref)

    def _folder(self, ref: str) -> Folder:
        found = self._resolve(ref)
        if found is None:
            raise Fault(404, "ErrorItemNotFound", "The specified folder could not be found in the store.")
        return found

    def _child(self, parent: str, name: str) -> Folder | None:
        return next(
            (f for f in self.folders.values() if f.parent == parent and f.name.casefold() == name.casefold()),
            None,
        )

    def _path(self, path: str) -> Folder | None:
        folder: Folder | None = self.folders[self._well_known("msgfolderroot")]
        for name in path.split("/"):
            folder = self._child(folder.id, name) if folder is not None else None
        return folder

    def _path_of(self, folder: Folder) -> str:
        names = []
        current: Folder | None = folder
        while current is not None and current.well_known != "msgfolderroot":
            names.append(current.name)
            current = self.folders.get(current.parent or "")
        return "/".join(reversed(names))

    def _create(self, parent: Folder, body: bytes) -> Folder:
        try:
            name = json.loads(body).get("displayName")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or not name.strip():
            raise Fault(400, "ErrorInvalidRequest", "displayName is required.")
        if self._child(parent.id, name) is not None:
            raise Fault(409, "ErrorFolderExists", "A folder with the specified name already exists.")
        return self._add_folder(name, parent.id)

    def _folder_json(self, folder: Folder) -> dict[str, Any]:
        held = [m for m in self.messages.values() if m.folder == folder.id]
        return {
            "id": folder.id,
            "displayName": folder.name,
            "parentFolderId": folder.parent,
            "childFolderCount": sum(1 for f in self.folders.values() if f.parent == folder.id),
            "totalItemCount": len(held),
        }

    # ---- messages ------------------------------------------------------------------------

    def _messages(self, folder: Folder, query: dict[str, str]) -> list[dict[str, Any]]:
        held = [m for m in self.messages.values() if m.folder == folder.id]
        order = query.get("$orderby", "receivedDateTime desc")
        if order not in ("receivedDateTime asc", "receivedDateTime desc"):
            raise Fault(400, "ErrorInvalidUrlQuery", f"$orderby not supported here: {order}")
        held.sort(key=lambda m: m.arrival)
        held.sort(key=lambda m: m.received, reverse=order.endswith("desc"))
        return [m.as_json(_select(query)) for m in held]

    def _move(self, message: Stored, body: bytes, immutable: bool) -> Stored:
        try:
            destination = json.loads(body).get("destinationId")
        except (ValueError, AttributeError):
            destination = None
        if not isinstance(destination, str):
            raise Fault(400, "ErrorInvalidRequest", "destinationId is required.")
        message.folder = self._folder(destination).id
        if not immutable:  # Exchange's default ids name the item in its folder
            del self.messages[message.id]
            message.id = new_id()
            self.messages[message.id] = message
        return message

    # ---- listing -------------------------------------------------------------------------

    def _list(self, items: list[dict[str, Any]], query: dict[str, str], link: str, path: str, *,
              select_ok: bool = False) -> Answer:  # fmt: skip
        items = [i for i in items if _matches(i, query.get("$filter"))]
        if not select_ok and "$select" in query:
            select = _select(query) or []
            items = [{k: v for k, v in i.items() if k == "id" or k in select} for i in items]
        skip, top = int(query.get("$skip", "0")), int(query.get("$top", "10"))
        size = max(1, min(top, self.page_cap))
        page = items[skip : skip + size]
        body: dict[str, Any] = {"@odata.context": f"{link}/{path}", "value": page}
        if skip + size < len(items):
            rest = {**query, "$skip": str(skip + size)}
            body["@odata.nextLink"] = f"{link}/{path}?" + urlencode(rest, quote_via=quote, safe="$,:'")
        return Answer(200, body)


def _select(query: dict[str, str]) -> list[str] | None:
    value = query.get("$select")
    return [s.strip() for s in value.split(",")] if value else None


def _matches(item: dict[str, Any], condition: str | None) -> bool:
    if condition is None:
        return True
    received = _RECEIVED.match(condition)
    if received is not None:
        if "receivedDateTime" not in item:
            raise Fault(400, "ErrorInvalidUrlQueryFilter", "receivedDateTime is not a property here.")
        try:
            when = stamp(received.group(2))
        except ValueError:
            raise Fault(400, "ErrorInvalidUrlQueryFilter", f"bad date: {received.group(2)}") from None
        return bool(_COMPARE[received.group(1)](stamp(item["receivedDateTime"]), when))
    named = _NAMED.match(condition)
    if named is not None:
        return str(item.get("displayName", "")).casefold() == named.group(1).replace("''", "'").casefold()
    raise Fault(400, "ErrorInvalidUrlQueryFilter", f"The query filter is not supported: {condition}")
