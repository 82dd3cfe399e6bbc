"""TLS client contexts built from an account's security settings.

Verification is always on. The truststore record, when named, replaces the
system CAs (so a private relay's CA does not widen trust for everything);
otherwise the system store is used, honouring ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Callable

from worker.records.account.advanced import TlsName

TLS_VERSION: dict[TlsName, ssl.TLSVersion] = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
_ORDER: dict[str, int] = {"TLSv1": 0, "TLSv1.1": 1, "TLSv1.2": 2, "TLSv1.3": 3}


def client_context(
    *,
    cadata: str | None,
    min_version: TlsName = "1.2",
    max_version: TlsName | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A verifying client context; ``cadata`` (PEM) replaces the system CAs when given."""
    if cadata is not None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = TLS_VERSION[min_version]
    if max_version is not None:
        context.maximum_version = TLS_VERSION[max_version]
    if min_version in ("1.0", "1.1"):
        # OpenSSL 3 refuses TLS < 1.2 at its default security level; the record asked for it
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def version_below(minimum: TlsName) -> TlsName | None:
    """The highest version under ``minimum`` (None under 1.0)."""
    names: list[TlsName] = ["1.0", "1.1", "1.2", "1.3"]
    index = names.index(minimum)
    return names[index - 1] if index else None


def probe_context(max_version: TlsName | None) -> ssl.SSLContext:
    """A context for learning which version a server negotiates, never for sending: every
    version up to ``max_version`` (OpenSSL's lowest security level, so TLS 1.0/1.1 can be
    offered at all), and no certificate check (nothing is sent over it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: offering them is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        if max_version is not None:
            context.maximum_version = TLS_VERSION[max_version]
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def below_minimum(negotiated: str, minimum: TlsName) -> str:
    """The reason of a server that negotiates only ``negotiated``, below ``minimum``."""
    return f"server offers only {negotiated}, a TLS version below the minimum (min_tls_version {minimum})"


def version_at_least(negotiated: str | None, minimum: TlsName) -> bool:
    """``negotiated`` is what ``SSLObject.version()`` reports, e.g. ``"TLSv1.3"``."""
    if negotiated is None:
        return False
    wanted = {"1.0": 0, "1.1": 1, "1.2": 2, "1.3": 3}[minimum]
    return _ORDER.get(negotiated, -1) >= wanted


def describe_handshake_error(exc: ssl.SSLError) -> tuple[str, bool]:
    """(reason, is_policy): policy failures are permanent, others are I/O trouble."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"server certificate not trusted: {exc.verify_message or exc.reason}", True
    reason = (exc.reason or "").upper()
    policy_markers: tuple[tuple[str, Callable[[], str]], ...] = (
        ("UNSUPPORTED_PROTOCOL", lambda: "server only offers a TLS version below the minimum"),
        ("PROTOCOL_VERSION", lambda: "server only offers a TLS version below the minimum"),
        ("NO_PROTOCOLS_AVAILABLE", lambda: "no TLS version allowed by both sides"),
        ("WRONG_VERSION_NUMBER", lambda: "server did not answer with TLS (wrong port or protocol?)"),
        ("NO_SHARED_CIPHER", lambda: "no cipher suite in common with the server"),
        ("HANDSHAKE_FAILURE", lambda: "TLS handshake refused by the server"),
    )
    for marker, text in policy_markers:
        if marker in reason:
            return text(), True
    return f"TLS error: {exc.reason or exc}", False


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (its cause or context, however deep), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def failure_reason(exc: BaseException) -> tuple[str, bool]:
    """Why a connection broke, and whether that is a TLS policy failure (permanent: e.g. an
    untrusted certificate) rather than I/O trouble: the TLS error's reason when one is behind
    ``exc``, else the socket's own words."""
    ssl_error = ssl_cause(exc)
    if ssl_error is not None:
        return describe_handshake_error(ssl_error)
    cause = exc.__cause__ or exc
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__, False
