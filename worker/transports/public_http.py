"""An httpx transport that connects only to public addresses (webhooks' SSRF guard).

A webhook URL is the operator's, but the host name in it resolves wherever DNS says, and
a name that resolves to 127.0.0.1, 10.x, 169.254.169.254 (a cloud's metadata service) or
another private address would let a webhook reach what only the worker should. The check
must be made on the address actually connected to, not on a lookup made before (a second
lookup may answer differently: DNS rebinding), so it sits in the network backend: httpcore
asks it to connect to ``host:port``; it resolves the name itself, refuses when any address is
not public (unless ``allow_private``), and connects to the address it checked. TLS still
verifies the certificate against the host name (httpcore passes it as the server name).

httpx's own transport takes no network backend: this module builds its connection pool
with one (httpx keeps the pool in ``AsyncHTTPTransport._pool``), the one place Postroom
knows that. Proxies from the environment are not used (they would be the address checked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from worker.records.webhooks import private_address

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class PrivateTarget(httpcore.ConnectError):
    """The host resolves to an address webhooks may not reach (httpx raises it as ConnectError)."""


class PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port, timeout)
        if not self.allow_private:
            for ip in addresses:
                if kind := private_address(ip):
                    raise PrivateTarget(
                        f"{host} resolves to {ip}, a {kind} address: refused (allow_private: true permits it)"
                    )
        failure: Exception = httpcore.ConnectError(f"{host}: no address to connect to")
        for ip in addresses:
            try:
                return await self.inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are sent over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def _resolve(host: str, port: int, timeout: float | None) -> list[IP]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
        )
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"{host}: no DNS answer within {timeout}s") from None
    except OSError as exc:
        raise httpcore.ConnectError(f"{host}: cannot resolve ({exc.strerror or exc})") from None
    found: list[IP] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in found:
            found.append(ip)
    return found


def public_transport(*, allow_private: bool = False, max_connections: int = 8) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go only where :class:`PublicOnlyBackend` lets them."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
        network_backend=PublicOnlyBackend(allow_private=allow_private),
    )
    return transport
