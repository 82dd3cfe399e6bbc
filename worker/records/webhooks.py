"""Webhook records (contract §10): ``config/webhooks/NAME.yaml``, where delivery events go.

::

    url: https://hooks.example.com/postroom
    secret: whsec_<base64>     # or ${ENV_VAR} or {file: path}; `postroom webhooks new` makes one
    events: [job.sent, job.failed, job.deferred, job.suppressed, job.cancelled]   # default: all
    accounts: [orders]         # default (left out): every account; an empty list is refused
    allow_private: false       # loopback / private / link-local targets refused unless true

The secret is a Standard Webhooks key: ``whsec_`` and the base64 of 24 to 64 random bytes.
A record never shows it: :class:`WebhookSecret` prints as a placeholder, and the key's bytes
are read only by the signer (worker/queue/events/webhook_sender.py).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import PlainSerializer, PlainValidator, ValidationInfo, field_validator

from worker.db.vocabulary import EVENT_TYPES
from worker.errors import ConfigurationError
from worker.records.fields import Loaded, RecordModel
from worker.records.secrets import Secret

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every Standard Webhooks key, no secret
Finding = tuple[tuple[str | int, ...], Literal["error", "warning"], str]  # field, severity, reason


def key_bytes(text: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (ConfigurationError, never the value, when it is bad)."""
    if not text.startswith(SECRET_PREFIX):
        raise ConfigurationError("a webhook secret starts with whsec_ (run `postroom webhooks new`)")
    try:
        key = base64.b64decode(text.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ConfigurationError(f"a webhook secret's key is 24 to 64 bytes (this one: {len(key)})")
    return key


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class WebhookSecret:
    """The record's secret: written in it (``whsec_…``, as ``webhooks new`` writes it) or a
    :class:`Secret` reference. Its repr never holds the value."""

    __slots__ = ("_literal", "reference")

    def __init__(self, *, literal: str | None = None, reference: Secret | None = None) -> None:
        self._literal = literal
        self.reference = reference

    def reveal(self) -> str:
        if self._literal is not None:
            return self._literal
        assert self.reference is not None
        return self.reference.reveal()

    def problem(self) -> str | None:
        """Why the key cannot be used now (unresolvable reference, bad form), or None."""
        if self.reference is not None and (problem := self.reference.problem()):
            return problem
        try:
            key_bytes(self.reveal())
        except ConfigurationError as exc:
            return str(exc)
        return None

    def __repr__(self) -> str:
        return f"WebhookSecret({self.reference.reference if self.reference else 'whsec_…'})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WebhookSecret) and (self._literal, self.reference) == (
            other._literal,
            other.reference,
        )

    def __hash__(self) -> int:
        return hash((self._literal, self.reference))


def _webhook_secret(value: Any, info: ValidationInfo) -> WebhookSecret:
    if isinstance(value, str) and value.strip().startswith(SECRET_PREFIX):
        key_bytes(value.strip())  # a bad literal is refused at load, with its line
        return WebhookSecret(literal=value.strip())
    base_dir = (info.context or {}).get("base_dir")
    return WebhookSecret(reference=Secret.parse(value, base_dir=Path(base_dir) if base_dir else None))


def _secret_value(value: Any, info: ValidationInfo) -> WebhookSecret:
    try:
        return _webhook_secret(value, info)
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None


SecretKey = Annotated[WebhookSecret, PlainValidator(_secret_value), PlainSerializer(repr, return_type=str)]


def private_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address ``ip`` is (loopback, private, …), or None when public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return kind
    return None


# a host spelled only with numbers, dots and 0x: an IPv4 address in some form
_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*\.?$", re.I)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook target (httpx cannot parse it, or its host is an IPv4
    address in an obfuscated form: octal, hex, a bare integer, fewer than four parts), or None.
    Such a URL would be retried for a day with nothing to show; refused when the record loads."""
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError) as exc:
        return f"is not a URL an HTTP client can use ({exc})"
    if _NUMERIC_HOST.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is an IPv4 address in an ambiguous form (write it as four decimal parts)"
    return None


def private_target(url: str, resolved: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """Why ``url``'s host is not a public target, or None: an IP literal or ``localhost`` that is
    loopback/private/…; with ``resolved`` (host name → the addresses DNS gave), a name that
    resolves to one such address instead."""
    host = urlsplit(url).hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if resolved is None:
        kind = private_address(ip) if ip is not None else ("loopback" if host == "localhost" else None)
        return f"{host} is a {kind} address" if kind else None
    for address in resolved.get(host, ()) if ip is None else ():
        if kind := private_address(ipaddress.ip_address(address)):
            return f"{host} resolves to {address}, a {kind} address"
    return None


class WebhookRecord(RecordModel):
    url: str
    secret: SecretKey
    events: tuple[str, ...] = EVENT_TYPES
    accounts: tuple[str, ...] | None = None
    allow_private: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials (the signature authenticates Postroom)")
        if any(c in value for c in "\r\n\t "):
            raise ValueError("must not contain spaces or line breaks")
        if problem := url_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("names no account (leave it out for every account)")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in value if e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r} (events: {', '.join(EVENT_TYPES)})")
        if not value:
            raise ValueError("names no event (leave it out for all of them)")
        return value


@dataclass(frozen=True)
class Webhook(Loaded[WebhookRecord]):
    """A loaded webhook record."""

    @property
    def url(self) -> str:
        return self.record.url

    def wants(self, event_type: str, account: str) -> bool:
        rec = self.record
        return event_type in rec.events and (rec.accounts is None or account in rec.accounts)

    def route(self) -> dict[str, Any]:
        """What the job store needs to know to file events for it (worker/queue/events/outbox.py)."""
        rec = self.record
        return {"events": list(rec.events), "accounts": None if rec.accounts is None else list(rec.accounts)}

    def summary(self) -> dict[str, Any]:
        """What ``webhooks list`` shows: everything but the secret."""
        rec = self.record
        return {
            "name": self.name,
            "url": rec.url,
            "events": list(rec.events),
            "accounts": list(rec.accounts) if rec.accounts is not None else None,
            "allow_private": rec.allow_private,
        }

    def findings(
        self, accounts: Iterable[str], resolved: Mapping[str, Sequence[str]] | None = None
    ) -> list[Finding]:
        """What ``accounts check`` reports beyond loading: (field, severity, reason). ``resolved``:
        the addresses the URL's host name resolved to, when the caller could ask DNS (a name that
        points at a private address is a warning: DNS may say otherwise at send time, where the
        sender's own guard decides)."""
        rec = self.record
        found: list[Finding] = []
        if problem := rec.secret.problem():
            found.append((("secret",), "error", problem))
        known = set(accounts)
        for i, name in enumerate(rec.accounts or ()):
            if name not in known:
                found.append((("accounts", i), "error", f"no account {name!r}"))
        parts = urlsplit(rec.url)
        if not rec.allow_private and (literal := private_target(rec.url)):
            found.append((("url",), "error", f"{literal}: refused unless allow_private: true"))
        elif not rec.allow_private and (named := private_target(rec.url, resolved or {})):
            reason = (
                f"{named}: deliveries are refused unless allow_private: true (if DNS says so at send time)"
            )
            found.append((("url",), "warning", reason))
        if parts.scheme == "http" and not rec.allow_private:
            found.append((("url",), "warning", "plain http: events travel unencrypted (use https)"))
        return found

    def host_name(self) -> str | None:
        """The URL's host when it is a name DNS would be asked about (not an IP literal)."""
        host = urlsplit(self.record.url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host if host != "localhost" else None
        return None
