"""aiosmtplib's exceptions as Postroom's delivery errors, in one table.

Like httpx's ``map_httpcore_exceptions``: the SMTP session hands every aiosmtplib exception
(and the socket errors under it) to :func:`translate` with the step it was at, so no
aiosmtplib class leaves the transports and each is translated the same way everywhere::

    aiosmtplib                                  worker.errors
    SMTPAuthenticationError                     AuthenticationFailed (or what its code says)
    SMTPResponseException and the ones with a   classify_smtp_reply(code, text, stage):
      reply code (greeting, HELO, MAIL, RCPT,     ServerBusy, TransientError, Rejected, ...
      DATA refusals)
    SMTPRecipientsRefused                       the first refusal's code, classified
    SMTPTimeoutError (connect, read), and       ConnectionFailed ("timed out ...")
      TimeoutError
    SMTPNotSupported                            SecurityPolicyError (what the account needs
                                                  is not offered: nothing was sent)
    SMTPServerDisconnected, SMTPConnectError,   ConnectionFailed, or SecurityPolicyError when
      SMTPException, OSError                      a TLS policy failure is the cause

``tests/test_smtp_errors.py`` checks that every exception class aiosmtplib exports has its
own row, so an aiosmtplib upgrade that adds one fails there rather than in production.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPNotSupported,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    PermanentError,
    SecurityPolicyError,
    classify_smtp_reply,
)
from worker.transports.tls import failure_reason


def io_failure(exc: BaseException, what: str) -> DeliveryError:
    """A broken connection: ``what`` went wrong, with the socket's or TLS's own reason (a TLS
    policy failure, e.g. an untrusted certificate, is permanent: nothing was sent)."""
    reason, policy = failure_reason(exc)
    if policy:
        return SecurityPolicyError(f"{reason}; nothing was sent")
    return ConnectionFailed(f"{what}: {reason}")


def _reply(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    return classify_smtp_reply(exc.code, exc.message, stage=stage)


def _auth_refused(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    error = classify_smtp_reply(exc.code, exc.message, stage=stage)
    if isinstance(error, PermanentError) and not isinstance(error, AuthenticationFailed):
        error = AuthenticationFailed(f"{stage} refused", code=exc.code, server_text=exc.message)
    return error


def _first_refusal(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    refusals = list(exc.recipients)
    if not refusals:
        return ConnectionFailed(f"{lost}: every recipient refused, no reply given")
    return classify_smtp_reply(refusals[0].code, refusals[0].message, stage=stage)


def _timeout(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    return ConnectionFailed(timed_out)


def _not_offered(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    return SecurityPolicyError(f"{stage}: {exc.message or 'not supported by the server'}; nothing was sent")


def _lost(exc: Any, stage: str, lost: str, timed_out: str) -> DeliveryError:
    return io_failure(exc, lost)


Translator = Callable[[Any, str, str, str], DeliveryError]

# the first row whose class the exception is an instance of wins: subclasses before their bases
TABLE: tuple[tuple[type[BaseException], Translator], ...] = (
    (SMTPAuthenticationError, _auth_refused),
    (SMTPConnectResponseError, _reply),
    (SMTPHeloError, _reply),
    (SMTPSenderRefused, _reply),
    (SMTPRecipientRefused, _reply),
    (SMTPDataError, _reply),
    (SMTPResponseException, _reply),
    (SMTPRecipientsRefused, _first_refusal),
    (SMTPConnectTimeoutError, _timeout),
    (SMTPReadTimeoutError, _timeout),
    (SMTPTimeoutError, _timeout),
    (TimeoutError, _timeout),
    (SMTPNotSupported, _not_offered),
    (SMTPServerDisconnected, _lost),
    (SMTPConnectError, _lost),
    (SMTPException, _lost),
    (OSError, _lost),
)

# what a session catches around a step: everything the table translates
CAUGHT: tuple[type[BaseException], ...] = (SMTPException, OSError, TimeoutError)


def translate(exc: BaseException, stage: str, *, lost: str = "", timed_out: str = "") -> DeliveryError:
    """``exc`` (one of :data:`CAUGHT`), raised at ``stage`` (``EHLO``, ``STARTTLS``, ...), as
    a delivery error. ``lost`` and ``timed_out`` say what failed in the words of that step
    (default: "connection lost during <stage>", "timed out during <stage>")."""
    lost = lost or f"connection lost during {stage}"
    timed_out = timed_out or f"timed out during {stage}"
    for cls, make in TABLE:
        if isinstance(exc, cls):
            return make(exc, stage, lost, timed_out)
    raise TypeError(f"not an SMTP or socket error: {type(exc).__name__}") from exc


_HANDSHAKE_BREAKS = (
    ssl.SSLError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    SMTPServerDisconnected,
)


def broke_in_handshake(exc: BaseException) -> bool:
    """The connection was up and broke in the TLS handshake (an alert, a reset, an EOF), not
    refused or unreachable: only then can the server's TLS version be the cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _HANDSHAKE_BREAKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
