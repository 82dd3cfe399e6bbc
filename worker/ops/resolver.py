"""The deliverability preflight's one seam to DNS: a question (name, type) → the answers as text.

Everything above it (worker/ops/spf.py, worker/ops/preflight.py) is logic over this seam, so
the checks read the same whether the answers come from the system's resolver, the one an
operator names (``POSTROOM_DNS_RESOLVER=IP:PORT``) or a test's own authoritative server.

A resolver that does not answer must not turn advice into a hang: each question waits at most
``timeout`` seconds, and once one question timed out every later one fails at once with the
same reason (:class:`DnsTrouble`), so a silent resolver costs one timeout, not one per question.
"""

from __future__ import annotations

from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
from dns.rdata import Rdata
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

QUERY_TIMEOUT = 2.0  # seconds per question (dnspython retries inside it)


class DnsTrouble(Exception):
    """The resolver could not say (no answer in time, SERVFAIL, refused): no verdict on a record."""


class Resolver(Protocol):
    name: str  # shown in the report: "127.0.0.1:5353", "the system's resolver (10.0.0.2)"

    async def answers(self, name: str, rdtype: str) -> list[str]:
        """The answers as text: TXT strings joined, MX as ``"10 mx.example.com"`` (``"0 ."`` for a
        null MX), A/AAAA as addresses. ``[]`` when the name or the record does not exist;
        :class:`DnsTrouble` when the resolver cannot tell."""
        ...


def _text(rdata: Rdata) -> str:
    if isinstance(rdata, TXT):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if isinstance(rdata, MX):
        exchange = rdata.exchange.to_text()
        return f"{rdata.preference} {exchange if exchange == '.' else exchange.rstrip('.')}"
    if isinstance(rdata, A | AAAA):
        return str(rdata.address)
    return rdata.to_text()


class DnspythonResolver:
    """:class:`Resolver` on dnspython's asyncio resolver; answers are kept for the object's life
    (one preflight run), so the SPF walk and the checks never ask twice."""

    def __init__(self, address: tuple[str, int] | None = None, *, timeout: float = QUERY_TIMEOUT) -> None:
        self.timeout = timeout
        self._known: dict[tuple[str, str], list[str]] = {}
        self._silent: str | None = None
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=address is None)
        except dns.resolver.NoResolverConfiguration:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._silent = "no resolver configured (/etc/resolv.conf names none; set POSTROOM_DNS_RESOLVER)"
        if address is not None:
            self._resolver.nameservers = [address[0]]
            self._resolver.port = address[1]
            self.name = f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
        else:
            shown = ", ".join(str(n) for n in self._resolver.nameservers) or "none"
            self.name = f"the system's resolver ({shown})"
        self._resolver.timeout = self._resolver.lifetime = timeout

    async def answers(self, name: str, rdtype: str) -> list[str]:
        key = (name.lower().rstrip("."), rdtype)
        if key in self._known:
            return self._known[key]
        if self._silent is not None:
            raise DnsTrouble(self._silent)
        try:
            answer = await self._resolver.resolve(
                key[0] + ".", rdtype, search=False, raise_on_no_answer=False, lifetime=self.timeout
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            found: list[str] = []
        except dns.exception.Timeout:
            self._silent = f"{self.name} did not answer within {self.timeout:g}s"
            raise DnsTrouble(self._silent) from None
        except dns.resolver.NoNameservers:
            raise DnsTrouble(
                f"{self.name} could not answer {key[0]} {rdtype} (SERVFAIL or refused)"
            ) from None
        except dns.exception.DNSException as exc:
            raise DnsTrouble(f"{self.name}: {key[0]} {rdtype}: {type(exc).__name__}") from None
        else:
            found = [_text(rdata) for rdata in (answer.rrset or ())]
        self._known[key] = found
        return found
