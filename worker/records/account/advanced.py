"""JavaMail-style ``advanced`` overrides mapped onto real SMTP settings.

Accounts migrated from a JavaMail-based product carry properties such as
``mail.smtp.auth.plain.disable: "true"``. Each documented key maps onto one
field of :class:`AdvancedSettings`; ``mail.smtps.*`` is accepted as an alias of
``mail.smtp.*``. An unknown key is an error that lists the known ones, so a
typo never silently does nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

TlsName = Literal["1.0", "1.1", "1.2", "1.3"]
TLS_VERSIONS: tuple[TlsName, ...] = ("1.0", "1.1", "1.2", "1.3")
_JAVA_TLS: dict[str, TlsName] = {
    "TLSv1": "1.0",
    "TLSv1.0": "1.0",
    "TLSv1.1": "1.1",
    "TLSv1.2": "1.2",
    "TLSv1.3": "1.3",
}
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")


@dataclass(frozen=True)
class AdvancedSettings:
    disabled_mechanisms: frozenset[str] = frozenset()
    mechanisms: tuple[str, ...] | None = None  # allowed, in order of preference
    command_timeout: float | None = None  # seconds
    connect_timeout: float | None = None
    write_timeout: float | None = None
    ehlo_name: str | None = None
    envelope_from: str | None = None
    tls_versions: tuple[TlsName, ...] | None = None  # e.g. ("1.2", "1.3")
    check_server_identity: bool = True
    starttls_required: bool | None = None
    starttls_enable: bool | None = None
    ssl_enable: bool | None = None
    dsn_notify: str | None = None
    dsn_ret: str | None = None
    sources: dict[str, str] = field(default_factory=dict)  # setting → key it came from


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f'expected "true" or "false", got {value!r}')


def _millis(value: Any) -> float:
    try:
        millis = int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a number of milliseconds, got {value!r}") from None
    if millis <= 0:
        raise ValueError("must be a positive number of milliseconds")
    return millis / 1000.0


def _mechanisms(value: Any) -> tuple[str, ...]:
    names = tuple(str(value).upper().replace(",", " ").split())
    unknown = [n for n in names if n not in AUTH_MECHANISMS]
    if unknown or not names:
        raise ValueError(
            f"unknown mechanism(s) {', '.join(unknown) or '(none)'}; known: {' '.join(AUTH_MECHANISMS)}"
        )
    return names


def _tls_versions(value: Any) -> tuple[TlsName, ...]:
    out: list[TlsName] = []
    for word in str(value).replace(",", " ").split():
        if word not in _JAVA_TLS:
            raise ValueError(f"unknown protocol {word!r}; known: {' '.join(sorted(_JAVA_TLS))}")
        out.append(_JAVA_TLS[word])
    if not out:
        raise ValueError("names no protocol")
    return tuple(sorted(set(out)))


def _text(value: Any) -> str:
    text = str(value).strip()
    if not text or any(c in text for c in "\r\n"):
        raise ValueError("must be a non-empty single-line value")
    return text


def _notify(value: Any) -> str:
    words = [w.upper() for w in str(value).replace(",", " ").split()]
    if not words or not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"}:
        raise ValueError("expected NEVER or any of SUCCESS, FAILURE, DELAY")
    if "NEVER" in words and len(words) > 1:
        raise ValueError("NEVER cannot be combined with other values")
    return ",".join(words)


def _ret(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("FULL", "HDRS"):
        raise ValueError("expected FULL or HDRS")
    return text


Apply = Callable[[AdvancedSettings, Any], AdvancedSettings]


def _disable(mechanism: str) -> Apply:
    def apply(s: AdvancedSettings, v: Any) -> AdvancedSettings:
        off = s.disabled_mechanisms | {mechanism} if _bool(v) else s.disabled_mechanisms
        return replace(s, disabled_mechanisms=off)

    return apply


def _set(name: str, parse: Callable[[Any], Any]) -> Apply:
    """Store the parsed value in one field; checked here, so a misspelt field fails on import,
    not on the first account that uses the key."""
    if name not in AdvancedSettings.__dataclass_fields__:
        raise TypeError(f"AdvancedSettings has no field {name!r}")

    def apply(s: AdvancedSettings, v: Any) -> AdvancedSettings:
        return replace(s, **{name: parse(v)})

    return apply


# key suffix (after "mail.smtp.") → (what it does, how to apply it)
KNOWN_KEYS: dict[str, tuple[str, Apply]] = {
    "auth.plain.disable": ("never use AUTH PLAIN", _disable("PLAIN")),
    "auth.login.disable": ("never use AUTH LOGIN", _disable("LOGIN")),
    "auth.cram-md5.disable": ("never use AUTH CRAM-MD5", _disable("CRAM-MD5")),
    "auth.xoauth2.disable": ("never use AUTH XOAUTH2", _disable("XOAUTH2")),
    "auth.mechanisms": ("allowed AUTH mechanisms in order of preference", _set("mechanisms", _mechanisms)),
    "timeout": ("command timeout (ms)", _set("command_timeout", _millis)),
    "connectiontimeout": ("connect timeout (ms)", _set("connect_timeout", _millis)),
    "writetimeout": ("message upload timeout (ms)", _set("write_timeout", _millis)),
    "localhost": ("EHLO name", _set("ehlo_name", _text)),
    "from": ("envelope sender (MAIL FROM)", _set("envelope_from", _text)),
    "ssl.protocols": ("allowed TLS versions, e.g. TLSv1.2 TLSv1.3", _set("tls_versions", _tls_versions)),
    "ssl.checkserveridentity": (
        "check the server certificate's host name (default true)",
        _set("check_server_identity", _bool),
    ),
    "starttls.required": ("fail when STARTTLS is not offered", _set("starttls_required", _bool)),
    "starttls.enable": ("use STARTTLS", _set("starttls_enable", _bool)),
    "ssl.enable": ("use implicit TLS (SMTPS)", _set("ssl_enable", _bool)),
    "dsn.notify": ("DSN NOTIFY for each recipient", _set("dsn_notify", _notify)),
    "dsn.ret": ("DSN RET (FULL or HDRS)", _set("dsn_ret", _ret)),
}


def known_keys() -> list[str]:
    return [f"mail.smtp.{suffix}" for suffix in KNOWN_KEYS]


def _suffix(key: str) -> str | None:
    for prefix in ("mail.smtp.", "mail.smtps."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def unknown_key_reason(key: str) -> str:
    for other in ("mail.imaps.", "mail.imap.", "mail.pop3s.", "mail.pop3."):
        if key.startswith(other):
            suggestion = "mail.smtp." + key[len(other) :]
            hint = f'; did you mean "{suggestion}"?' if key[len(other) :] in KNOWN_KEYS else ""
            return f"{other}* keys configure reading mail, not sending{hint or '; did you mean mail.smtp.…?'}"
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.75)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f"unknown key; {hint}known keys: {', '.join(known_keys())}"


def parse_advanced(values: Mapping[str, Any]) -> tuple[AdvancedSettings, list[tuple[str, str]]]:
    """Apply every key; returns the settings and ``(key, reason)`` for each bad one."""
    settings = AdvancedSettings()
    problems: list[tuple[str, str]] = []
    for key, value in values.items():
        suffix = _suffix(key)
        if suffix is None or suffix not in KNOWN_KEYS:
            problems.append((key, unknown_key_reason(key)))
            continue
        try:
            settings = KNOWN_KEYS[suffix][1](settings, value)
        except ValueError as exc:
            problems.append((key, str(exc)))
            continue
        settings.sources[suffix] = key
    return settings, problems
