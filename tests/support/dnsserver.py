"""A small authoritative DNS server on dnslib: UDP and TCP on one 127.0.0.1 port, zones as data.

The deliverability preflight's tests (tests/test_preflight.py) point ``POSTROOM_DNS_RESOLVER``
at it, so every answer the checks see went over the wire as a real resolver would get it.
Zones are ``{"example.com": [("@", "MX", "10 mx.example.com"), ("_dmarc", "TXT", "v=DMARC1; …")]}``:
names relative to the zone (``@`` is its apex, a trailing dot makes a name absolute); types A,
AAAA, MX, TXT, CNAME. A TXT value longer than 255 bytes goes out as several strings (as zone
files split them), and a UDP answer over 512 bytes is truncated so the client asks again over
TCP. A name under no zone is REFUSED, like any authoritative server answers a stranger.
:func:`silent_resolver` is an address that never answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import DNSHandler, DNSServer

Record = tuple[str, str, str]  # (name, type, value)
Zones = dict[str, list[Record]]
UDP_LIMIT = 512  # what a client without EDNS may be sent over UDP


class _Quiet:
    """dnslib's logger, silenced: every log_* call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class _Handler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, truncating as resolvers expect: an answer too long for UDP goes out with
    its question and the TC bit (dnslib's own truncate drops the question, which clients ignore)."""

    def get_reply(self, data: bytes) -> bytes:
        packed: bytes = super().get_reply(data)
        if self.protocol == "udp" and len(packed) > UDP_LIMIT:
            reply = DNSRecord.parse(packed)
            short = DNSRecord(header=reply.header, q=reply.q)
            short.header.tc = 1
            return bytes(short.pack())
        return packed


def _absolute(name: str, zone: str) -> str:
    if name == "@":
        return zone
    if name.endswith("."):
        return name.rstrip(".").lower()
    return f"{name}.{zone}".lower()


def _rdata(rtype: str, value: str) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        preference, exchange = value.split(None, 1)
        return MX(exchange, int(preference))
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "TXT":
        raw = value.encode()
        return TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])
    raise ValueError(f"the test DNS server serves no {rtype} records")


class ZoneResolver:
    """dnslib's resolver over the zones: answers, CNAME chains inside them, NXDOMAIN, REFUSED."""

    def __init__(self) -> None:
        self.zones: dict[str, dict[str, list[tuple[str, Any]]]] = {}
        self.queries: list[tuple[str, str]] = []  # (name, type) of every question, in order
        self._lock = threading.Lock()

    def serve(self, zones: Zones) -> None:
        """Serve ``zones`` from now on (the zones served before are gone)."""
        built: dict[str, dict[str, list[tuple[str, Any]]]] = {}
        for zone, records in zones.items():
            apex = zone.rstrip(".").lower()
            names = built.setdefault(apex, {apex: []})
            for name, rtype, value in records:
                names.setdefault(_absolute(name, apex), []).append((rtype, _rdata(rtype, value)))
        with self._lock:
            self.zones = built
            self.queries.clear()

    def _zone_of(self, name: str) -> dict[str, list[tuple[str, Any]]] | None:
        apexes = [z for z in self.zones if name == z or name.endswith("." + z)]
        return self.zones[max(apexes, key=len)] if apexes else None

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((name, qtype))
            zone = self._zone_of(name)
        if zone is None:
            reply.header.rcode = RCODE.REFUSED
            reply.header.aa = 0
            return reply
        for _ in range(8):  # a CNAME chain inside the zones, at most 8 long
            records = zone.get(name)
            if records is None:
                if not any(n.endswith("." + name) for n in zone):  # an empty non-terminal exists
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            cnames = [rd for rtype, rd in records if rtype == "CNAME"]
            if cnames and qtype != "CNAME":
                reply.add_answer(RR(name, QTYPE.CNAME, rdata=cnames[0], ttl=300))
                name = str(cnames[0].label).rstrip(".").lower()
                zone = self._zone_of(name) or {}
                continue
            for rtype, rd in records:
                if rtype == qtype:
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rd, ttl=300))
            return reply
        return reply


class DnsServer:
    """The server: :attr:`address` is ``127.0.0.1:PORT`` for ``POSTROOM_DNS_RESOLVER``."""

    def __init__(self, zones: Zones | None = None) -> None:
        self.resolver = ZoneResolver()
        self.resolver.serve(zones or {})
        self._servers = self._bind()
        for server in self._servers:
            server.start_thread()
        self.port: int = self._servers[0].server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"

    def _bind(self) -> list[DNSServer]:
        """UDP on a free port, then TCP on the same one (tried again should TCP find it taken)."""
        for _ in range(20):
            udp = DNSServer(self.resolver, address="127.0.0.1", port=0, logger=_Quiet(), handler=_Handler)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self.resolver, address="127.0.0.1", port=port, tcp=True, logger=_Quiet(), handler=_Handler
                )
            except OSError:
                udp.server.server_close()
                continue
            return [udp, tcp]
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    def serve(self, zones: Zones) -> None:
        self.resolver.serve(zones)

    @property
    def queries(self) -> list[tuple[str, str]]:
        return list(self.resolver.queries)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()


@contextlib.contextmanager
def silent_resolver() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a UDP socket that takes every question and answers none."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
