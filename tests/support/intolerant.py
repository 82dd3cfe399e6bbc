"""A relay in front of a test SMTP server that behaves like an old, version-intolerant TLS stack:
a ClientHello offering any version above ``max_version`` is answered with a TCP reset (no alert),
which clients see as ``ConnectionResetError``; any other is passed through untouched."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

TLS1_1 = 0x0302


def highest_offered(hello: bytes) -> int:
    """The highest version a TLS ClientHello record offers (supported_versions, else
    client_version); 0 when it is not one."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return 0
        at = 9
        (client_version,) = struct.unpack_from("!H", hello, at)
        at += 2 + 32
        at += 1 + hello[at]  # session id
        at += 2 + struct.unpack_from("!H", hello, at)[0]  # cipher suites
        at += 1 + hello[at]  # compression methods
        end = at + 2 + struct.unpack_from("!H", hello, at)[0]
        at += 2
        while at + 4 <= end:
            kind, length = struct.unpack_from("!HH", hello, at)
            if kind == 43:  # supported_versions
                listed = hello[at + 5 : at + 5 + hello[at + 4]]
                return max(int(struct.unpack_from("!H", listed, i)[0]) for i in range(0, len(listed), 2))
            at += 4 + length
        return int(client_version)
    except (IndexError, struct.error, ValueError):
        return 0


class IntolerantRelay:
    """Listens on 127.0.0.1 (``port``) and relays to ``upstream_port``."""

    def __init__(self, upstream_port: int, *, starttls: bool, max_version: int = TLS1_1) -> None:
        self.upstream_port = upstream_port
        self.starttls = starttls
        self.max_version = max_version
        self.resets = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._from_client, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _from_client(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b""
        try:
            if self.starttls:  # plain SMTP until the client's STARTTLS
                while True:
                    line, found, rest = buffer.partition(b"\r\n")
                    if found:
                        upstream.sendall(line + found)
                        buffer = rest
                        if line.strip().upper() == b"STARTTLS":
                            break
                        continue
                    data = client.recv(65536)
                    if not data:
                        return
                    buffer += data
            while len(buffer) < 5 or len(buffer) < 5 + struct.unpack_from("!H", buffer, 3)[0]:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
            if highest_offered(buffer) > self.max_version:
                self.resets += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # a reset, no TLS alert
                upstream.close()
                return
            upstream.sendall(buffer)
        except OSError:
            return
        self._pump(client, upstream)
