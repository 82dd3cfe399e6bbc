"""``postroom test-connectivity``: connect, secure, log in (or get a Graph token) — never send.

The report also shows the account's signing material (S/MIME certificate subject
and days to expiry, DKIM domain/selector) under ``detail.signing`` / ``detail.dkim``.
"""

from __future__ import annotations

from worker.errors import ConfigurationError
from worker.mail.signing import describe_signing
from worker.records.account.account import EmailAccount
from worker.records.account.providers import basic_auth_warning
from worker.records.loader import Records
from worker.transports.base import ConnectivityReport
from worker.transports.factory import build_transport
from worker.transports.graph import RESULT_LINE as GRAPH_RESULT_LINE
from worker.transports.limits import Limiter


async def check_connectivity(
    records: Records, name: str, *, limiter: Limiter | None = None
) -> ConnectivityReport:
    """Check one account; configuration problems are reported, not raised."""
    try:
        account = records.account(name)
    except ConfigurationError as exc:
        return ConnectivityReport(name, ok=False, result="configuration", error=str(exc))
    label = account.smtp.security_label if account.smtp else GRAPH_RESULT_LINE
    try:
        transport = build_transport(account, records, limiter=limiter)
    except ConfigurationError as exc:
        return ConnectivityReport(name, ok=False, result=label, error=str(exc))
    try:
        report = await transport.check()
    finally:
        await transport.aclose()
    auth = account.smtp.auth if account.smtp else None
    if warning := basic_auth_warning(account.provider, account.send_using, auth):
        report.detail.setdefault("warnings", []).append(warning)  # a warning: the account still works
    return with_signing(report, account, records)


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
