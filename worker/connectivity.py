"""``postroom test-connectivity``: connect, secure, log in (or get a Graph token) — never send."""

from __future__ import annotations

from worker.errors import ConfigurationError
from worker.limits import Limiter
from worker.records import Records
from worker.transports import ConnectivityReport, build_transport
from worker.transports.graph import RESULT_LINE as GRAPH_RESULT_LINE


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
        return await transport.check()
    finally:
        await transport.aclose()
