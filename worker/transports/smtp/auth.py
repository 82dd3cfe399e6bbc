"""Logging in on an SMTP session: the account's AUTH mechanism, password or XOAUTH2.

Apart from the session (worker/transports/smtp/session.py) because it is the one place that
handles a secret: the password is revealed only for the AUTH command, a token only
for XOAUTH2, and neither ever reaches an error, a log line or a reply text.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable

import aiosmtplib
from aiosmtplib import SMTPAuthenticationError
from aiosmtplib.auth import auth_xoauth2_encode

from worker.errors import DeliveryError, SecurityPolicyError
from worker.records.account.account import SmtpEndpoint
from worker.transports.smtp.errors import CAUGHT, translate

log = logging.getLogger("postroom.smtp")

TokenProvider = Callable[[bool], Awaitable[str]]  # (force_refresh) -> access token
Contextualise = Callable[[DeliveryError], DeliveryError]  # adds the account and transport


async def authenticate(
    client: aiosmtplib.SMTP,
    ep: SmtpEndpoint,
    offered: tuple[str, ...],
    token_provider: TokenProvider | None,
    *,
    account: str,
    fail: Contextualise,
) -> str | None:
    """Log in as the account says (``auth: none``: not at all); returns the mechanism used.

    Raises a DeliveryError (through ``fail``): a server with no usable mechanism is a
    security-policy failure, a refused login an authentication failure."""
    if ep.auth == "none":
        return None
    if not client.supports_extension("auth"):
        raise fail(
            SecurityPolicyError(
                "server offers no AUTH but the account is configured to log in"
                + ("" if ep.protocol != "none" else " (some servers only offer AUTH over TLS)")
            )
        )
    usable = [m for m in ep.mechanisms if m in offered]
    if not usable:
        raise fail(
            SecurityPolicyError(
                f"no usable AUTH mechanism: server offers {' '.join(offered) or 'none'}, "
                f"account allows {' '.join(ep.mechanisms) or 'none'}"
            )
        )
    mechanism = usable[0]
    assert ep.username is not None
    try:
        if mechanism == "XOAUTH2":
            if token_provider is None:
                raise fail(SecurityPolicyError("XOAUTH2 needs an OAuth token provider"))
            await _log_in_xoauth2(client, ep.username, token_provider, account=account, fail=fail)
        else:
            if ep.password is None:
                raise fail(SecurityPolicyError("no password configured"))
            method = {
                "PLAIN": client.auth_plain,
                "LOGIN": client.auth_login,
                "CRAM-MD5": client.auth_crammd5,
            }[mechanism]
            await method(ep.username, ep.password.reveal())
    except CAUGHT as exc:
        raise fail(translate(exc, f"AUTH {mechanism}", lost="connection lost during AUTH")) from None
    return mechanism


async def _log_in_xoauth2(
    client: aiosmtplib.SMTP,
    username: str,
    tokens: TokenProvider,
    *,
    account: str,
    fail: Contextualise,
) -> None:
    async def token(force: bool) -> str:
        try:
            return await tokens(force)
        except DeliveryError as exc:
            raise fail(exc) from None

    code, text = await xoauth2(client, username, await token(False))
    if code >= 500:
        # the token may have been revoked or expired early: refresh once, then give up
        log.info("account %s: XOAUTH2 refused (%s); refreshing the token", account, code)
        code, text = await xoauth2(client, username, await token(True))
    if code != 235:
        raise SMTPAuthenticationError(code, text)


async def xoauth2(client: aiosmtplib.SMTP, username: str, token: str) -> tuple[int, str]:
    """One AUTH XOAUTH2 (RFC 7628 style): (final code, text).

    A server that refuses the token answers 334 with a base64 JSON error
    challenge; the client sends an empty line and gets the final 5xx.
    The challenge's status and scope are kept in the text (never the token).
    """
    response = await client.execute_command(b"AUTH", b"XOAUTH2", auth_xoauth2_encode(username, token))
    challenge = None
    if response.code == 334:
        challenge = xoauth2_challenge(response.message)
        response = await client.execute_command(b"")
    text = response.message
    if challenge and response.code != 235:
        text = f"{text} ({challenge})"
    return response.code, text


def xoauth2_challenge(message: str) -> str | None:
    """``status 401, scope https://mail.google.com/`` from a base64 JSON error challenge."""
    try:
        data = json.loads(base64.b64decode(message.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    parts = [f"{k} {data[k]}" for k in ("status", "scope", "schemes") if isinstance(data.get(k), str)]
    return ", ".join(parts)[:200] or None
