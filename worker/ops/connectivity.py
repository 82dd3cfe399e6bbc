"""``postroom test-connectivity``: connect, secure, log in (or get a Graph token) — never send.

The report also shows the account's signing material (S/MIME certificate subject
and days to expiry, DKIM domain/selector) under ``detail.signing`` / ``detail.dkim``, and,
given a :class:`~worker.ops.preflight.Preflight`, the sender domain's DNS under
``detail.deliverability`` (advice: it never changes ``ok``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.errors import ConfigurationError
from worker.mail.signing import describe_signing
from worker.ops.preflight import Preflight
from worker.records.account.account import EmailAccount
from worker.records.account.providers import basic_auth_warning
from worker.records.loader import Records
from worker.transports.base import ConnectivityReport
from worker.transports.factory import build_transport
from worker.transports.graph import RESULT_LINE as GRAPH_RESULT_LINE
from worker.transports.limits import Limiter


async def check_connectivity(
    records: Records,
    name: str,
    *,
    limiter: Limiter | None = None,
    preflight: Preflight | None = None,
) -> ConnectivityReport:
    """Check one account; configuration problems are reported, not raised. With ``preflight``
    the DNS checks run beside the connection (so they add no time unless DNS is the slower)."""
    try:
        account = records.account(name)
    except ConfigurationError as exc:
        return ConnectivityReport(name, ok=False, result="configuration", error=str(exc))
    label = account.smtp.security_label if account.smtp else GRAPH_RESULT_LINE
    dns = asyncio.ensure_future(preflight.report(account, records)) if preflight else None
    try:
        report = await _reachability(account, records, label, limiter)
        if dns is not None:
            report.detail["deliverability"] = await _settled(dns)
    finally:
        if dns is not None and not dns.done():
            dns.cancel()  # the check itself was cancelled (the health check's timeout)
    return report


async def _reachability(
    account: EmailAccount, records: Records, label: str, limiter: Limiter | None
) -> ConnectivityReport:
    """Connect, secure, log in (or get a token); the account's signing material beside it."""
    try:
        transport = build_transport(account, records, limiter=limiter)
    except ConfigurationError as exc:
        return ConnectivityReport(account.name, ok=False, result=label, error=str(exc))
    try:
        report = await transport.check()
    finally:
        await transport.aclose()
    auth = account.smtp.auth if account.smtp else None
    if warning := basic_auth_warning(account.provider, account.send_using, auth):
        report.detail.setdefault("warnings", []).append(warning)  # a warning: the account still works
    return with_signing(report, account, records)


async def _settled(dns: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    """The preflight's report; should it break (a bug, not DNS: DNS trouble is a warn line), the
    reason instead: advice never fails a check."""
    try:
        return await dns
    except Exception as exc:
        return {"error": f"the preflight failed: {type(exc).__name__}: {exc}"}


def with_signing(report: ConnectivityReport, account: EmailAccount, records: Records) -> ConnectivityReport:
    """Add the signing certificate (subject, expiry, days left) and DKIM key to the report's
    detail; signing material that cannot be used fails the check (the account cannot send)."""
    signing = describe_signing(account, records)
    report.detail.update(signing)
    broken = [f"{part}: {info['error']}" for part, info in signing.items() if "error" in info]
    if broken and report.ok:
        report.ok = False
        report.error = "; ".join(broken)
    return report
