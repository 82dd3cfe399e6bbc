"""Table-driven unit tests of the three delivery policies (contract §3, config/settings.yaml).

1. Reply classification: an SMTP reply (code + RFC 3463 enhanced status), an aiosmtplib
   exception, or a Graph HTTP status -> which family of worker.errors it lands in.
2. The retry plan: a failed attempt's error -> its Outcome (retry or dead letter), and a
   a retrying Outcome + attempt number + age -> retry in N seconds, or a dead letter.
3. The backoff: RetryPolicy.delay's schedule (base, doubling, cap, jitter bounds, Retry-After).

Expected values come from contract §3 (the failure table) and the documented intent of the code
(docstrings, config/settings.yaml), not from what the code happens to return. Pure: no Redis,
no servers, no network; the jitter is pinned by replacing the ``random`` the policy modules use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import aiosmtplib
import httpx
import pytest

from worker.db.vocabulary import JobState
from worker.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DeliveryError,
    LimitWait,
    PermanentError,
    RecipientStatus,
    Rejected,
    SecurityPolicyError,
    ServerBusy,
    TransientError,
    classify_smtp_reply,
    parse_enhanced_status,
)
from worker.queue.pipeline import attempts
from worker.queue.pipeline.delivery import Outcome, outcome_for_error, outcome_for_result
from worker.records.account.account import EmailAccount, Limits
from worker.records.account.record import GraphSettings
from worker.settings import RetryPolicy, Settings
from worker.transports.base import SendResult
from worker.transports.graph import MAX_RETRY_AFTER, GraphTransport, parse_retry_after
from worker.transports.oauth import TokenSource
from worker.transports.smtp.errors import translate

Pick = Literal["low", "high"]


class PinnedRandom:
    """Stands in for the ``random`` module of a policy: ``uniform(a, b)`` returns one end of
    the range it is asked for (so a delay is an exact value), and remembers the ranges."""

    def __init__(self, pick: Pick) -> None:
        self.pick = pick
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a if self.pick == "low" else b


# =============================================================================================
# 1. Reply classification
# =============================================================================================

TRANSIENT = "transient"
PERMANENT = "permanent"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    stage: str
    family: type[DeliveryError]  # the exact class expected (not a subclass of it)
    enhanced: str | None


# contract §3: 421/432/450/451/452/454 and enhanced 4.x.x transient (421/432 also close the
# connection: ServerBusy); SMTP 5xx (550, 552, 553, 554, ...) permanent; 535 permanent and
# the account flagged (AuthenticationFailed).
SMTP_REPLIES: list[Any] = [
    pytest.param(
        Reply(421, "4.3.2 Service shutting down", "MAIL FROM", ServerBusy, "4.3.2"), id="421-closing"
    ),
    pytest.param(
        Reply(421, "4.7.0 Try again later, closing connection (EHLO)", "EHLO", ServerBusy, "4.7.0"),
        id="421-4.7.0-gmail-bad-ehlo",
    ),
    pytest.param(Reply(421, "Service not available", "DATA", ServerBusy, None), id="421-no-enhanced"),
    pytest.param(
        Reply(
            432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "MAIL FROM", ServerBusy, "4.3.2"
        ),
        id="432-exchange-connection-limit",
    ),
    pytest.param(Reply(450, "4.2.1 Mailbox busy", "RCPT TO", TransientError, "4.2.1"), id="450-mailbox-busy"),
    pytest.param(
        Reply(450, "Requested mail action not taken", "RCPT TO", TransientError, None), id="450-no-enhanced"
    ),
    pytest.param(
        Reply(451, "4.3.0 Temporary local problem", "DATA", TransientError, "4.3.0"), id="451-local-error"
    ),
    pytest.param(
        Reply(451, "4.7.1 Greylisted, please try again later", "RCPT TO", TransientError, "4.7.1"),
        id="451-4.7.1-greylisted",
    ),
    pytest.param(Reply(452, "4.2.2 Mailbox full", "RCPT TO", TransientError, "4.2.2"), id="452-mailbox-full"),
    pytest.param(
        Reply(452, "4.5.3 Too many recipients", "RCPT TO", TransientError, "4.5.3"),
        id="452-too-many-recipients",
    ),
    pytest.param(
        Reply(454, "4.7.0 TLS not available due to temporary reason", "STARTTLS", TransientError, "4.7.0"),
        id="454-tls-temporarily-unavailable",
    ),
    pytest.param(
        # a temporary AUTH failure is not a credentials failure: no flag on the account
        Reply(454, "4.7.0 Temporary authentication failure", "AUTH PLAIN", TransientError, "4.7.0"),
        id="454-temporary-auth-failure-is-not-auth-failed",
    ),
    pytest.param(
        Reply(441, "4.4.1 No answer from host", "DATA", TransientError, "4.4.1"), id="other-4xx-441-transient"
    ),
    pytest.param(
        # the basic code is 4xx, which the contract names transient: a 5.x.x text does not make it permanent
        Reply(450, "5.1.1 mismatched enhanced code", "RCPT TO", TransientError, "5.1.1"),
        id="450-with-5.x.x-enhanced-stays-transient",
    ),
    pytest.param(
        # the contract: "enhanced 4.x.x" is transient, whatever the basic code says
        Reply(550, "4.7.1 Temporarily rate limited, try later", "RCPT TO", TransientError, "4.7.1"),
        id="550-with-4.x.x-enhanced-is-transient",
    ),
    pytest.param(Reply(500, "5.5.2 Syntax error", "EHLO", Rejected, "5.5.2"), id="500-syntax-error"),
    pytest.param(Reply(501, "5.5.4 Invalid address", "MAIL FROM", Rejected, "5.5.4"), id="501-bad-arguments"),
    pytest.param(
        Reply(503, "5.5.1 Bad sequence of commands", "DATA", Rejected, "5.5.1"), id="503-bad-sequence"
    ),
    pytest.param(
        # permanent (5xx), but not a refusal of our credentials: the account is not flagged
        Reply(530, "5.7.0 Authentication required", "MAIL FROM", Rejected, "5.7.0"),
        id="530-authentication-required",
    ),
    pytest.param(
        Reply(530, "5.7.0 Must issue a STARTTLS command first", "MAIL FROM", Rejected, "5.7.0"),
        id="530-must-issue-starttls",
    ),
    pytest.param(
        # RFC 4954 534: the server refuses this login (e.g. Gmail "log in with your web browser")
        Reply(534, "5.7.9 Please log in with your web browser", "AUTH LOGIN", AuthenticationFailed, "5.7.9"),
        id="534-auth-mechanism-refused",
    ),
    pytest.param(
        Reply(535, "5.7.8 Username and Password not accepted", "AUTH PLAIN", AuthenticationFailed, "5.7.8"),
        id="535-bad-credentials",
    ),
    pytest.param(
        Reply(
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
            "AUTH LOGIN",
            AuthenticationFailed,
            "5.7.139",
        ),
        id="535-5.7.139-exchange-smtp-auth-disabled",
    ),
    pytest.param(
        Reply(
            550,
            "5.1.1 The email account that you tried to reach does not exist",
            "RCPT TO",
            Rejected,
            "5.1.1",
        ),
        id="550-5.1.1-user-unknown",
    ),
    pytest.param(
        Reply(550, "5.7.1 Relaying denied", "RCPT TO", Rejected, "5.7.1"), id="550-5.7.1-relay-denied"
    ),
    pytest.param(
        Reply(550, "5.7.26 Unauthenticated email is not accepted (DMARC)", "DATA", Rejected, "5.7.26"),
        id="550-5.7.26-dmarc",
    ),
    pytest.param(Reply(550, "Mailbox unavailable", "RCPT TO", Rejected, None), id="550-no-enhanced"),
    pytest.param(Reply(551, "5.1.6 User not local", "RCPT TO", Rejected, "5.1.6"), id="551-user-not-local"),
    pytest.param(
        # contract §3 lists 552 as permanent (RFC 5321 4.5.3.1.10 lets a client read a 552 to RCPT as
        # 452; Postroom follows its own contract)
        Reply(552, "5.2.2 Mailbox full", "RCPT TO", Rejected, "5.2.2"),
        id="552-mailbox-full-is-permanent",
    ),
    pytest.param(
        Reply(552, "5.3.4 Message size exceeds fixed limit", "DATA", Rejected, "5.3.4"),
        id="552-message-too-big",
    ),
    pytest.param(
        Reply(553, "5.1.3 Bad recipient address syntax", "RCPT TO", Rejected, "5.1.3"), id="553-bad-address"
    ),
    pytest.param(
        Reply(554, "5.7.1 Message rejected as spam", "DATA", Rejected, "5.7.1"), id="554-5.7.1-spam"
    ),
    pytest.param(Reply(554, "Transaction failed", "DATA", Rejected, None), id="554-no-enhanced"),
]


@pytest.mark.parametrize("reply", SMTP_REPLIES)
def test_smtp_reply_lands_in_the_family_design_assigns(reply: Reply) -> None:
    error = classify_smtp_reply(reply.code, reply.text, stage=reply.stage, account="orders")
    assert type(error) is reply.family, (type(error).__name__, str(error))
    assert error.transient is issubclass(reply.family, TransientError)
    assert isinstance(error, PermanentError) is (not error.transient)
    assert error.code == reply.code
    assert error.server_text == reply.text
    assert error.enhanced_status == reply.enhanced
    assert error.transport == "smtp" and error.account == "orders"
    assert f"{reply.code} {reply.text}" in str(error)


@pytest.mark.parametrize(
    ("code", "text", "stage", "reason"),
    [
        pytest.param(550, "5.1.1 unknown", "RCPT TO", "RCPT TO refused", id="refusal-names-its-stage"),
        pytest.param(535, "5.7.8 bad credentials", "AUTH PLAIN", "AUTH PLAIN refused", id="535-at-auth"),
        pytest.param(
            535, "5.7.3 not authenticated", "MAIL FROM", "authentication failed", id="535-outside-auth"
        ),
        pytest.param(421, "4.3.2 bye", "DATA", "DATA refused", id="421-names-its-stage"),
    ],
)
def test_the_reason_says_which_step_was_refused(code: int, text: str, stage: str, reason: str) -> None:
    assert classify_smtp_reply(code, text, stage=stage).reason == reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("4.7.0 Try again later", "4.7.0", id="transient"),
        pytest.param("5.1.1 User unknown", "5.1.1", id="permanent"),
        pytest.param("2.0.0 OK", "2.0.0", id="success"),
        pytest.param("5.7.26 DMARC", "5.7.26", id="two-digit-detail"),
        pytest.param("5.7.139 SMTP AUTH disabled", "5.7.139", id="three-digit-detail"),
        pytest.param("5.1.1", "5.1.1", id="code-alone"),
        pytest.param("  5.1.1 leading blanks", "5.1.1", id="leading-blanks"),
        pytest.param("5.1.1\ttab", "5.1.1", id="tab-after"),
        pytest.param("5.7.1 line one\n5.7.1 line two", "5.7.1", id="multi-line-reply"),
        pytest.param("Mailbox 5.1.1 unknown", None, id="not-at-start"),
        pytest.param("5.1.1x junk", None, id="glued-to-text"),
        pytest.param("5.1.1.2 four parts", None, id="four-parts"),
        pytest.param("5.1234.1 subject too long", None, id="four-digit-subject"),
        pytest.param("3.1.1 class 3 does not exist", None, id="class-3"),
        pytest.param("5.1 short", None, id="two-parts"),
        pytest.param("", None, id="empty"),
    ],
)
def test_enhanced_status_is_read_from_the_start_of_the_reply(text: str, expected: str | None) -> None:
    assert parse_enhanced_status(text) == expected


@pytest.mark.parametrize(
    ("exc", "stage", "family"),
    [
        pytest.param(
            aiosmtplib.SMTPAuthenticationError(454, "4.7.0 Temporary authentication failure"),
            "AUTH LOGIN",
            TransientError,
            id="auth-454-stays-transient",
        ),
        pytest.param(
            aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Username and Password not accepted"),
            "AUTH PLAIN",
            AuthenticationFailed,
            id="auth-535",
        ),
        pytest.param(
            # any permanent refusal of AUTH is a refusal of the credentials
            aiosmtplib.SMTPAuthenticationError(504, "5.5.4 Unrecognized authentication type"),
            "AUTH PLAIN",
            AuthenticationFailed,
            id="auth-504-permanent-is-auth-failed",
        ),
        pytest.param(
            aiosmtplib.SMTPAuthenticationError(421, "4.7.0 Too many login attempts, closing"),
            "AUTH PLAIN",
            ServerBusy,
            id="auth-421-closes",
        ),
        pytest.param(
            aiosmtplib.SMTPSenderRefused(451, "4.7.1 Try again later", "orders@example.com"),
            "MAIL FROM",
            TransientError,
            id="mail-from-451",
        ),
        pytest.param(
            aiosmtplib.SMTPSenderRefused(553, "5.7.1 Sender address rejected", "orders@example.com"),
            "MAIL FROM",
            Rejected,
            id="mail-from-553",
        ),
        pytest.param(
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(452, "4.5.3 Too many recipients", "a@example.net")]
            ),
            "RCPT TO",
            TransientError,
            id="all-recipients-452",
        ),
        pytest.param(
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 User unknown", "a@example.net")]
            ),
            "RCPT TO",
            Rejected,
            id="all-recipients-550-5.1.1",
        ),
        pytest.param(
            aiosmtplib.SMTPConnectResponseError(554, "5.7.1 Client host rejected"),
            "connect",
            Rejected,
            id="greeting-554",
        ),
        pytest.param(
            aiosmtplib.SMTPConnectResponseError(421, "4.3.2 Too many connections"),
            "connect",
            ServerBusy,
            id="greeting-421",
        ),
        pytest.param(aiosmtplib.SMTPDataError(552, "5.3.4 Message too big"), "DATA", Rejected, id="data-552"),
        pytest.param(
            aiosmtplib.SMTPDataError(451, "4.3.0 Queue full"), "DATA", TransientError, id="data-451"
        ),
        pytest.param(
            aiosmtplib.SMTPConnectTimeoutError("timed out"), "connect", ConnectionFailed, id="timeout"
        ),
        pytest.param(
            ConnectionRefusedError(111, "Connection refused"), "connect", ConnectionFailed, id="refused"
        ),
        pytest.param(
            aiosmtplib.SMTPServerDisconnected("Connection lost"),
            "EHLO",
            ConnectionFailed,
            id="connection-lost",
        ),
        pytest.param(
            aiosmtplib.SMTPNotSupported("STARTTLS extension not supported by server"),
            "STARTTLS",
            SecurityPolicyError,
            id="no-starttls-when-secure",
        ),
    ],
)
def test_aiosmtplib_exception_lands_in_the_family_of_its_reply(
    exc: BaseException, stage: str, family: type[DeliveryError]
) -> None:
    error = translate(exc, stage)
    assert type(error) is family, (type(error).__name__, str(error))


# ---- Graph ----------------------------------------------------------------------------------


def graph_transport() -> GraphTransport:
    """A real GraphTransport for one mailbox; nothing is ever sent (no client is opened)."""
    settings = GraphSettings.model_validate(
        {
            "user_principal_name": "orders@contoso.com",
            "auth_profile": "contoso",
            "base_url": "https://graph.test",
        }
    )
    account = EmailAccount(
        name="graph-orders",
        source=Path("accounts/graph-orders.yaml"),
        description=None,
        provider="office365",
        send_using="graph",
        from_address="orders@contoso.com",
        display_name=None,
        reply_to=None,
        limits=Limits(rate=None, max_connections=4, daily_recipients=None, max_recipients_per_message=None),
        graph=settings,
    )
    return GraphTransport(account, cast(TokenSource, object()))


@dataclass(frozen=True)
class GraphRow:
    status: int
    retry_after_header: str | None
    family: type[DeliveryError]
    retry_after: float | None


# contract §3: 429, 503, 504 and 5xx transient, honouring Retry-After; 401 after one refresh is
# permanent and flags the account. graph.py's docstring: other 4xx are permanent.
GRAPH_STATUSES: list[Any] = [
    pytest.param(GraphRow(429, "30", TransientError, 30.0), id="429-retry-after-seconds"),
    pytest.param(GraphRow(429, None, TransientError, None), id="429-no-retry-after"),
    pytest.param(GraphRow(429, "soon", TransientError, None), id="429-unreadable-retry-after"),
    pytest.param(GraphRow(429, "99999", TransientError, MAX_RETRY_AFTER), id="429-retry-after-capped"),
    pytest.param(GraphRow(500, None, TransientError, None), id="500"),
    pytest.param(GraphRow(502, None, TransientError, None), id="502"),
    pytest.param(GraphRow(503, "120", TransientError, 120.0), id="503-retry-after"),
    pytest.param(GraphRow(504, None, TransientError, None), id="504"),
    pytest.param(GraphRow(507, None, TransientError, None), id="507-other-5xx"),
    pytest.param(GraphRow(401, None, AuthenticationFailed, None), id="401-after-refresh"),
    pytest.param(GraphRow(403, None, AuthenticationFailed, None), id="403-no-mail-send-permission"),
    pytest.param(GraphRow(400, None, Rejected, None), id="400-bad-request"),
    pytest.param(GraphRow(404, None, Rejected, None), id="404-mailbox-not-found"),
    pytest.param(GraphRow(409, "30", Rejected, None), id="409-other-4xx-ignores-retry-after"),
]


@pytest.mark.parametrize("row", GRAPH_STATUSES)
def test_graph_status_lands_in_the_family_design_assigns(row: GraphRow) -> None:
    headers = {"Retry-After": row.retry_after_header} if row.retry_after_header else {}
    body = {"error": {"code": "ErrorCode", "message": "what Graph said"}}
    response = httpx.Response(row.status, headers=headers, json=body)
    error = graph_transport()._refusal(response, "sendMail")
    assert type(error) is row.family, (type(error).__name__, str(error))
    assert error.transient is (row.family is TransientError)
    assert error.code == row.status
    assert error.server_text == "ErrorCode: what Graph said"
    assert error.retry_after == row.retry_after
    assert error.transport == "graph" and error.account == "graph-orders"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("7", 7.0, id="seconds"),
        pytest.param(" 12 ", 12.0, id="blanks-around"),
        pytest.param("1.5", 1.5, id="fraction"),
        pytest.param("-5", 0.0, id="negative-is-now"),
        pytest.param("3600", 3600.0, id="at-cap"),
        pytest.param("86400", MAX_RETRY_AFTER, id="over-cap"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="http-date-in-the-past"),
        pytest.param("Fri, 01 Jan 2100 00:00:00 GMT", MAX_RETRY_AFTER, id="http-date-far-ahead-capped"),
        pytest.param("next tuesday", None, id="garbage"),
    ],
)
def test_retry_after_header_is_read_as_bounded_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


# =============================================================================================
# 2. The retry plan
# =============================================================================================

RCPTS = ("a@example.net", "b@example.net")


@dataclass(frozen=True)
class ErrorRow:
    error: DeliveryError
    state: JobState
    recipient_status: str  # what every recipient not otherwise reported is recorded as
    retry_after: float | None = None
    counts: bool = True
    limit_wait: bool = False
    auth_failure: bool = False


ERRORS: list[Any] = [
    pytest.param(
        ErrorRow(
            ConnectionFailed("cannot connect to smtp.example.com:587: Connection refused"),
            JobState.RETRYING,
            "deferred",
        ),
        id="connection-refused-retries",
    ),
    pytest.param(
        ErrorRow(
            ServerBusy("DATA refused", code=421, server_text="4.3.2 closing"), JobState.RETRYING, "deferred"
        ),
        id="421-retries",
    ),
    pytest.param(
        ErrorRow(
            TransientError("RCPT TO refused", code=451, server_text="4.7.1 greylisted"),
            JobState.RETRYING,
            "deferred",
        ),
        id="451-retries",
    ),
    pytest.param(
        ErrorRow(
            TransientError("sendMail: throttled", code=429, server_text="TooManyRequests", retry_after=30.0),
            JobState.RETRYING,
            "deferred",
            retry_after=30.0,
        ),
        id="graph-429-keeps-retry-after",
    ),
    pytest.param(
        # a provider limit: re-scheduled, no attempt spent
        ErrorRow(
            LimitWait("rate 30/minute reached", retry_after=12.0),
            JobState.RETRYING,
            "deferred",
            12.0,
            False,
            True,
        ),
        id="limit-wait-costs-no-attempt",
    ),
    pytest.param(
        ErrorRow(
            Rejected("RCPT TO refused", code=550, server_text="5.1.1 unknown", retry_after=30.0),
            JobState.DEAD,
            "failed",
        ),
        id="550-dead-letter-ignores-retry-after",
    ),
    pytest.param(
        ErrorRow(
            AuthenticationFailed("AUTH PLAIN refused", code=535, server_text="5.7.8 bad credentials"),
            JobState.DEAD,
            "failed",
            auth_failure=True,
        ),
        id="535-dead-and-flags-the-account",
    ),
    pytest.param(
        ErrorRow(
            AuthenticationFailed("sendMail: token refused after a refresh", code=401),
            JobState.DEAD,
            "failed",
            auth_failure=True,
        ),
        id="graph-401-dead-and-flags-the-account",
    ),
    pytest.param(
        ErrorRow(SecurityPolicyError("STARTTLS not offered; nothing was sent"), JobState.DEAD, "failed"),
        id="no-starttls-dead",
    ),
    pytest.param(
        ErrorRow(
            PermanentError("an address is not ASCII and the server does not support SMTPUTF8"),
            JobState.DEAD,
            "failed",
        ),
        id="no-smtputf8-dead",
    ),
]


@pytest.mark.parametrize("row", ERRORS)
def test_a_failed_attempt_retries_the_transient_family_and_dead_letters_the_permanent_one(
    row: ErrorRow,
) -> None:
    already = {"sent@example.net": {"status": "sent", "code": 250, "message": "OK"}}
    outcome = outcome_for_error(row.error, "smtp", RCPTS, already)
    assert outcome.state == row.state
    assert outcome.retry_after == row.retry_after
    assert outcome.counts is row.counts
    assert outcome.limit_wait is row.limit_wait
    assert outcome.auth_failure is row.auth_failure
    assert outcome.code == row.error.code
    assert outcome.reason == str(row.error)
    assert outcome.recipients["sent@example.net"] == already["sent@example.net"]  # never rewritten
    assert {r: outcome.recipients[r]["status"] for r in RCPTS} == dict.fromkeys(RCPTS, row.recipient_status)


def test_recipients_the_error_reports_keep_their_own_status() -> None:
    error = Rejected(
        "DATA refused",
        code=554,
        server_text="5.7.1 spam",
        recipients={"a@example.net": RecipientStatus("failed", 550, "5.1.1 unknown")},
    )
    outcome = outcome_for_error(error, "smtp", RCPTS, {})
    assert outcome.recipients == {
        "a@example.net": {"status": "failed", "code": 550, "message": "5.1.1 unknown"},
        "b@example.net": {"status": "failed", "code": 554, "message": "5.7.1 spam"},
    }


SENT = RecipientStatus("sent", 250, "2.0.0 OK")
DEFERRED = RecipientStatus("deferred", 452, "4.2.2 Mailbox full")
FAILED = RecipientStatus("failed", 550, "5.1.1 User unknown")


@pytest.mark.parametrize(
    ("recipients", "state", "code", "reason"),
    [
        pytest.param({"a": SENT, "b": SENT}, "sent", 250, None, id="all-accepted"),
        pytest.param(
            {"a": SENT, "b": DEFERRED},
            JobState.RETRYING,
            452,
            "1 recipient(s) deferred: 452 4.2.2 Mailbox full",
            id="one-deferred-retries",
        ),
        pytest.param(
            # a 5xx recipient is final (contract §3): the others were sent, nothing to retry
            {"a": SENT, "b": FAILED},
            "sent",
            550,
            "1 recipient(s) refused: 550 5.1.1 User unknown",
            id="one-refused-is-final",
        ),
        pytest.param(
            {"a": SENT, "b": FAILED, "c": DEFERRED, "d": DEFERRED},
            JobState.RETRYING,
            452,
            "2 recipient(s) deferred: 452 4.2.2 Mailbox full",
            id="deferred-wins-over-refused",
        ),
    ],
)
def test_a_partly_accepted_message_retries_only_while_a_recipient_is_deferred(
    recipients: dict[str, RecipientStatus], state: str, code: int, reason: str | None
) -> None:
    already = {"z": {"status": "sent", "code": 250, "message": "earlier attempt"}}
    outcome = outcome_for_result(SendResult("smtp", "STARTTLS TLSv1.3", recipients), already)
    assert (outcome.state, outcome.code, outcome.reason) == (state, code, reason)
    assert outcome.counts is True and outcome.retry_after is None
    assert outcome.recipients == {"z": already["z"], **{a: r.as_dict() for a, r in recipients.items()}}
    assert (outcome.transport, outcome.security) == ("smtp", "STARTTLS TLSv1.3")


DEFAULT = RetryPolicy()  # what config/settings.yaml ships: 8 attempts, 10 s doubling to 900 s, a day


@dataclass(frozen=True)
class PlanRow:
    attempt: int
    age: float
    state: JobState
    delay: float
    why: str | None = None  # the "retries exhausted (...)" cause, for a dead letter
    pick: Pick = "high"
    retry_after: float | None = None
    counts: bool = True
    limit_wait: bool = False
    policy: RetryPolicy = DEFAULT


PLANS: list[Any] = [
    pytest.param(PlanRow(1, 0.0, JobState.RETRYING, 10.0), id="transient-first-attempt-high-jitter"),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 5.0, pick="low"), id="transient-first-attempt-low-jitter"
    ),
    pytest.param(PlanRow(2, 10.0, JobState.RETRYING, 20.0), id="transient-second-attempt-doubles"),
    pytest.param(PlanRow(7, 1300.0, JobState.RETRYING, 640.0), id="transient-second-to-last-attempt"),
    pytest.param(PlanRow(8, 2000.0, JobState.DEAD, 0.0, "8 attempts"), id="transient-at-the-last-attempt"),
    pytest.param(
        PlanRow(9, 2000.0, JobState.DEAD, 0.0, "9 attempts"), id="transient-beyond-the-last-attempt"
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.DEAD, 0.0, "1 attempts", policy=RetryPolicy(max_attempts=1)),
        id="max-attempts-1-never-retries",
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 120.0, retry_after=120.0), id="retry-after-longer-than-backoff"
    ),
    pytest.param(
        PlanRow(3, 30.0, JobState.RETRYING, 40.0, retry_after=1.0), id="retry-after-shorter-than-backoff"
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 900.0, retry_after=3600.0), id="retry-after-capped-at-max-delay"
    ),
    pytest.param(PlanRow(1, 86390.0, JobState.RETRYING, 10.0), id="max-age-next-try-exactly-at-the-limit"),
    pytest.param(
        PlanRow(1, 86391.0, JobState.DEAD, 0.0, "max_age 86400s"), id="max-age-next-try-past-the-limit"
    ),
    pytest.param(PlanRow(2, 86390.0, JobState.DEAD, 0.0, "max_age 86400s"), id="max-age-before-max-attempts"),
    # claim waits (another attempt holds the Message-ID): no attempt spent, spread over 0.1-1 s
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 6.0, retry_after=5.0, counts=False), id="claim-wait-high-spread"
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 5.1, retry_after=5.0, counts=False, pick="low"),
        id="claim-wait-low-spread",
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 1.0, counts=False), id="claim-wait-without-a-remaining-time"
    ),
    pytest.param(
        PlanRow(8, 100.0, JobState.RETRYING, 6.0, retry_after=5.0, counts=False),
        id="claim-wait-at-last-attempt",
    ),
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, attempts.WAIT_RECHECK, retry_after=600.0, counts=False),
        id="claim-wait-rechecks-within-a-minute",
    ),
    # limit waits: come back exactly when the limit frees (plus 50 ms), at most a minute later
    pytest.param(
        PlanRow(1, 0.0, JobState.RETRYING, 12.05, retry_after=12.0, counts=False, limit_wait=True),
        id="limit-wait-exact",
    ),
    pytest.param(
        PlanRow(8, 100.0, JobState.RETRYING, 12.05, retry_after=12.0, counts=False, limit_wait=True),
        id="limit-wait-at-last-attempt",
    ),
    pytest.param(
        PlanRow(
            1,
            0.0,
            JobState.RETRYING,
            attempts.WAIT_RECHECK,
            retry_after=40000.0,
            counts=False,
            limit_wait=True,
        ),
        id="limit-wait-daily-budget-rechecks-within-a-minute",
    ),
    pytest.param(
        PlanRow(
            3, 86395.0, JobState.DEAD, 0.0, "max_age 86400s", retry_after=12.0, counts=False, limit_wait=True
        ),
        id="limit-wait-past-max-age",
    ),
]


@pytest.mark.parametrize("row", PLANS)
def test_retry_plan(row: PlanRow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempts, "settings", lambda: Settings(retry=row.policy))
    monkeypatch.setattr("worker.settings.random", PinnedRandom(row.pick))
    monkeypatch.setattr(attempts, "random", PinnedRandom(row.pick))
    failed = Outcome(
        JobState.RETRYING,
        reason="[orders] RCPT TO refused (server said: 451 4.7.1 try later)",
        retry_after=row.retry_after,
        counts=row.counts,
        limit_wait=row.limit_wait,
        code=451,
    )
    outcome, delay = attempts._retry_plan(row.attempt, row.age, failed)
    assert outcome.state == row.state
    assert delay == pytest.approx(row.delay)
    if row.state == "dead":
        assert outcome.reason == f"retries exhausted ({row.why}): {failed.reason}"
        assert outcome.code == 451 and outcome.counts is row.counts  # the rest of the outcome is kept
    else:
        assert outcome is failed


# =============================================================================================
# 3. The backoff
# =============================================================================================


@pytest.mark.parametrize(
    ("policy", "attempt", "low", "high"),
    [
        # shipped defaults: base 10 s, doubling, cap 900 s, jitter over the upper half
        pytest.param(DEFAULT, 0, 5.0, 10.0, id="default-attempt-0-like-the-first"),
        pytest.param(DEFAULT, 1, 5.0, 10.0, id="default-attempt-1"),
        pytest.param(DEFAULT, 2, 10.0, 20.0, id="default-attempt-2"),
        pytest.param(DEFAULT, 3, 20.0, 40.0, id="default-attempt-3"),
        pytest.param(DEFAULT, 4, 40.0, 80.0, id="default-attempt-4"),
        pytest.param(DEFAULT, 5, 80.0, 160.0, id="default-attempt-5"),
        pytest.param(DEFAULT, 6, 160.0, 320.0, id="default-attempt-6"),
        pytest.param(DEFAULT, 7, 320.0, 640.0, id="default-attempt-7"),
        pytest.param(DEFAULT, 8, 450.0, 900.0, id="default-attempt-8-capped"),
        pytest.param(DEFAULT, 30, 450.0, 900.0, id="default-attempt-30-capped"),
        pytest.param(DEFAULT, 1000, 450.0, 900.0, id="default-attempt-1000-capped"),
        pytest.param(
            DEFAULT,
            1100,
            450.0,
            900.0,
            id="default-attempt-1100-capped",  # no overflow however many attempts are allowed
        ),
        pytest.param(RetryPolicy(base_delay=1, max_delay=30), 1, 0.5, 1.0, id="base-1-attempt-1"),
        pytest.param(RetryPolicy(base_delay=1, max_delay=30), 5, 8.0, 16.0, id="base-1-attempt-5"),
        pytest.param(RetryPolicy(base_delay=1, max_delay=30), 6, 15.0, 30.0, id="base-1-attempt-6-capped"),
        pytest.param(RetryPolicy(base_delay=60, max_delay=30), 1, 15.0, 30.0, id="cap-below-base"),
        pytest.param(RetryPolicy(base_delay=0, max_delay=30), 3, 0.0, 0.0, id="base-0-no-wait"),
    ],
)
def test_backoff_schedule(
    policy: RetryPolicy, attempt: int, low: float, high: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinned_low, pinned_high = PinnedRandom("low"), PinnedRandom("high")
    monkeypatch.setattr("worker.settings.random", pinned_low)
    assert policy.delay(attempt) == pytest.approx(low)
    monkeypatch.setattr("worker.settings.random", pinned_high)
    assert policy.delay(attempt) == pytest.approx(high)
    # the jitter range itself: the upper half of the capped exponential ceiling
    assert pinned_low.ranges == pinned_high.ranges
    ((start, end),) = pinned_low.ranges
    assert start == pytest.approx(low) and end == pytest.approx(high)


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [
        pytest.param(1, None, 5.0, 10.0, id="no-retry-after"),
        pytest.param(1, 0.0, 5.0, 10.0, id="retry-after-0-backoff-wins"),
        pytest.param(1, 7.0, 7.0, 10.0, id="retry-after-inside-the-jitter-range"),
        pytest.param(1, 120.0, 120.0, 120.0, id="retry-after-longer-wins"),
        pytest.param(4, 60.0, 60.0, 80.0, id="retry-after-raises-the-low-end"),
        pytest.param(4, 30.0, 40.0, 80.0, id="retry-after-shorter-than-backoff"),
        pytest.param(1, 900.0, 900.0, 900.0, id="retry-after-at-max-delay"),
        pytest.param(1, 3600.0, 900.0, 900.0, id="retry-after-capped-at-max-delay"),
        pytest.param(9, 3600.0, 900.0, 900.0, id="retry-after-and-backoff-both-capped"),
    ],
)
def test_backoff_honours_retry_after(
    attempt: int, retry_after: float | None, low: float, high: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.settings.random", PinnedRandom("low"))
    assert DEFAULT.delay(attempt, retry_after) == pytest.approx(low)
    monkeypatch.setattr("worker.settings.random", PinnedRandom("high"))
    assert DEFAULT.delay(attempt, retry_after) == pytest.approx(high)


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        pytest.param(1, 5.0, 10.0, id="attempt-1"),
        pytest.param(4, 40.0, 80.0, id="attempt-4"),
        pytest.param(8, 450.0, 900.0, id="attempt-8"),
    ],
)
def test_backoff_jitter_spreads_within_its_bounds(
    attempt: int, low: float, high: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.settings.random", random.Random(20240601))  # a seeded generator
    delays = [DEFAULT.delay(attempt) for _ in range(500)]
    assert all(low <= d <= high for d in delays), (min(delays), max(delays))
    # jitter is real: spread over (most of) the range, not one value
    assert len(set(delays)) > 450
    assert min(delays) < low + (high - low) * 0.05 and max(delays) > high - (high - low) * 0.05


def test_the_default_schedule_fits_inside_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shipped policy every attempt gets its chance before max_age, even at the longest
    jitter: max_attempts, not max_age, ends a job that keeps failing transiently."""
    monkeypatch.setattr("worker.settings.random", PinnedRandom("high"))
    waits = [DEFAULT.delay(a) for a in range(1, DEFAULT.max_attempts)]
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
    assert sum(waits) < DEFAULT.max_age
