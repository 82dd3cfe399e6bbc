"""The one table that turns aiosmtplib's exceptions into Postroom's (worker/transports/smtp/errors.py).

Pure unit tests: every class aiosmtplib exports has its own row and becomes a delivery error
of the family its meaning says; the session tests (tests/test_smtp.py) drive the same table
against real servers.
"""

from __future__ import annotations

import inspect
import ssl

import aiosmtplib
import pytest

from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    Rejected,
    SecurityPolicyError,
    ServerBusy,
    TransientError,
)
from worker.transports.smtp.errors import TABLE, translate

EXPORTED = sorted(
    (cls for cls in vars(aiosmtplib).values() if inspect.isclass(cls) and issubclass(cls, BaseException)),
    key=lambda cls: cls.__name__,
)


def example(cls: type[BaseException]) -> BaseException:
    """An instance of one of aiosmtplib's exception classes, built the way aiosmtplib builds it."""
    if cls is aiosmtplib.SMTPRecipientsRefused:
        return cls([aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no such user", "a@example.net")])
    if cls in (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPSenderRefused):
        return cls(550, "5.7.1 refused", "a@example.net")
    if issubclass(cls, aiosmtplib.SMTPResponseException):
        return cls(535 if cls is aiosmtplib.SMTPAuthenticationError else 550, "5.7.1 refused")
    return cls("something went wrong")


def test_every_exception_class_aiosmtplib_exports_has_a_row_of_its_own() -> None:
    rows = {cls for cls, _ in TABLE}
    missing = [cls.__name__ for cls in EXPORTED if cls not in rows]
    assert len(EXPORTED) >= 15, [cls.__name__ for cls in EXPORTED]
    assert not missing, f"aiosmtplib exceptions without a row in the table: {missing}"


def test_a_subclass_row_comes_before_its_bases_so_each_row_can_win() -> None:
    order = [cls for cls, _ in TABLE]
    for i, cls in enumerate(order):
        assert not any(issubclass(cls, earlier) for earlier in order[:i]), f"{cls.__name__} is shadowed"


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda cls: cls.__name__)
def test_every_exported_exception_becomes_a_delivery_error(cls: type[BaseException]) -> None:
    error = translate(example(cls), "EHLO")
    assert isinstance(error, DeliveryError)


@pytest.mark.parametrize(
    ("exc", "family", "words"),
    [
        (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"), AuthenticationFailed, "535"),
        (aiosmtplib.SMTPAuthenticationError(554, "5.7.0 no"), AuthenticationFailed, "AUTH PLAIN refused"),
        (aiosmtplib.SMTPResponseException(421, "4.3.2 closing"), ServerBusy, "421"),
        (aiosmtplib.SMTPResponseException(451, "4.3.0 try later"), TransientError, "451"),
        (aiosmtplib.SMTPResponseException(550, "5.7.1 no relay"), Rejected, "550"),
        (aiosmtplib.SMTPReadTimeoutError("read timed out"), ConnectionFailed, "timed out during AUTH PLAIN"),
        (TimeoutError(), ConnectionFailed, "timed out during AUTH PLAIN"),
        (
            aiosmtplib.SMTPServerDisconnected("gone"),
            ConnectionFailed,
            "connection lost during AUTH PLAIN: gone",
        ),
        (ConnectionResetError(104, "Connection reset by peer"), ConnectionFailed, "Connection reset by peer"),
        (
            aiosmtplib.SMTPNotSupported("SMTP AUTH extension not supported"),
            SecurityPolicyError,
            "not supported",
        ),
    ],
)
def test_each_kind_of_failure_lands_in_its_family(
    exc: BaseException, family: type[DeliveryError], words: str
) -> None:
    error = translate(exc, "AUTH PLAIN")
    assert isinstance(error, family), (type(error).__name__, str(error))
    assert words in str(error)


def test_a_tls_policy_failure_under_a_lost_connection_is_permanent() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate"
    lost = aiosmtplib.SMTPConnectError("handshake failed")
    lost.__cause__ = verify
    error = translate(lost, "connect", lost="cannot connect to smtp.example.net:465")
    assert isinstance(error, SecurityPolicyError) and "not trusted" in str(error)


def test_what_is_not_an_smtp_or_socket_error_is_not_swallowed() -> None:
    with pytest.raises(TypeError):
        translate(ValueError("a bug"), "EHLO")
