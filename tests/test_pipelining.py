"""SMTP PIPELINING (RFC 2920) on aiosmtplib's protocol (worker/transports/smtp/pipelining.py).

The module reads a pipelined group's replies through aiosmtplib's private protocol state. These
tests pin that against a real socket server that answers in the awkward pieces real networks
produce: every reply of a group in one packet, one byte per packet, and a reply split mid-line
across packets. An aiosmtplib upgrade that changes those internals fails here.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
import hypothesis
import pytest

from worker.transports.smtp import pipelining

Chunking = Literal["together", "bytewise", "split"]


@dataclass
class RawServer:
    """A minimal SMTP server on port 0 that records what arrived in each read."""

    chunking: Chunking = "together"
    offer_pipelining: bool = True
    close_after_mail: bool = False
    packets: list[list[str]] = field(default_factory=list)  # command lines per read
    messages: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._writers: list[asyncio.StreamWriter] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 5)

    def _answer(self, line: str) -> str | None:
        verb = line[:4].upper()
        if verb == "EHLO":
            return (
                "250-raw.test\r\n" + ("250-PIPELINING\r\n" if self.offer_pipelining else "") + "250 8BITMIME"
            )
        if verb == "MAIL":
            return "250 2.1.0 sender ok"
        if verb == "RCPT":
            return "550 5.1.1 no such user" if "bad" in line else "250 2.1.5 recipient ok"
        if verb == "DATA":
            return "354 go ahead"  # even with no recipient accepted, as RFC 2920 warns servers may
        if verb == "NOOP":
            return "250 2.0.0 ok"
        if verb == "RSET":
            return "250 2.0.0 reset"
        if verb == "QUIT":
            return "221 2.0.0 bye"
        return "502 5.5.2 what"

    async def _write(self, writer: asyncio.StreamWriter, out: bytes) -> None:
        if self.chunking == "together":
            writer.write(out)
        elif self.chunking == "bytewise":
            for i in range(len(out)):
                writer.write(out[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.0005)
        else:  # split: the first reply and half of the next, then the rest
            cut = out.find(b"\r\n") + 2 + 5
            writer.write(out[:cut])
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(out[cut:])
        await writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(b"220 raw.test ESMTP\r\n")
        pending = b""
        content: list[bytes] | None = None
        try:
            while chunk := await reader.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\r\n")
                commands: list[str] = []
                replies: list[str] = []
                for raw in lines:
                    if content is not None:
                        if raw == b".":
                            if content:
                                self.messages.append(b"\r\n".join(content))
                                replies.append("250 2.0.0 queued")
                            else:
                                replies.append("554 5.5.1 no valid recipients")
                            content = None
                        else:
                            content.append(raw)
                        continue
                    line = raw.decode()
                    commands.append(line)
                    replies.append(self._answer(line) or "")
                    if line.upper() == "DATA":
                        content = []
                    if line.upper().startswith("MAIL") and self.close_after_mail:
                        writer.write((replies[-1] + "\r\n").encode())
                        await writer.drain()
                        writer.close()
                        return
                if commands:
                    self.packets.append(commands)
                if replies:
                    await self._write(writer, "".join(r + "\r\n" for r in replies).encode())
                if any(c.upper() == "QUIT" for c in commands):
                    break
        finally:
            writer.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    started: list[RawServer] = []

    def start(**kwargs: object) -> RawServer:
        server = RawServer(**kwargs)  # type: ignore[arg-type]  # the tests pass RawServer's fields
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def _connected(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
    await client.connect()
    await client.ehlo()
    return client


BODY = b"Subject: hi\r\n\r\n.a line that starts with a dot\r\nbye\r\n"


@pytest.mark.parametrize("chunking", ["together", "bytewise", "split"])
def test_a_pipelined_group_reads_every_reply_in_order(
    raw_server: Callable[..., RawServer], chunking: Chunking
) -> None:
    server = raw_server(chunking=chunking)

    async def go() -> None:
        client = await _connected(server.port)
        assert pipelining.pipelines(client)
        recipients = ["a@example.net", "bad@example.net", "c@example.net"]
        for round_ in range(2):  # the second transaction proves nothing was left behind
            replies = await pipelining.send_envelope(client, "s@example.com", recipients, timeout=5)
            assert replies.mail.code == 250
            assert [r.code for r in replies.rcpts] == [250, 550, 250]
            assert replies.rcpts[1].message == "5.1.1 no such user"
            assert replies.accepted == 2
            assert replies.data is not None and replies.data.code == 354
            done = await pipelining.send_content(client, BODY, timeout=5)
            assert (done.code, done.message) == (250, "2.0.0 queued"), round_
            assert "data_received" not in vars(client.protocol)  # aiosmtplib's own handler is back
        assert (await client.noop()).message == "2.0.0 ok"  # the connection is still in step
        await client.quit()

    asyncio.run(go())
    envelope_packets = [p for p in server.packets if p[0].startswith("MAIL")]
    assert (
        envelope_packets
        == [
            [
                "MAIL FROM:<s@example.com>",
                *(f"RCPT TO:<{r}>" for r in ("a@example.net", "bad@example.net", "c@example.net")),
                "DATA",
            ]
        ]
        * 2
    ), "the envelope goes out in one write"
    assert server.messages == [b"Subject: hi\r\n\r\n..a line that starts with a dot\r\nbye"] * 2


def test_without_pipelining_commands_go_one_at_a_time(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(offer_pipelining=False)

    async def go() -> None:
        client = await _connected(server.port)
        assert not pipelining.pipelines(client)
        replies = await pipelining.send_envelope(
            client, "s@example.com", ["a@example.net", "bad@example.net"]
        )
        assert [r.code for r in replies.rcpts] == [250, 550]
        assert replies.data is not None and replies.data.code == 354
        assert (await pipelining.send_content(client, BODY)).code == 250
        refused = await pipelining.send_envelope(client, "s@example.com", ["bad@example.net"])
        assert refused.accepted == 0 and refused.data is None  # DATA is not sent for nobody
        await client.quit()

    asyncio.run(go())
    assert all(len(p) == 1 for p in server.packets)
    assert [p[0].split(":")[0] for p in server.packets if not p[0].startswith("EHLO")] == [
        "MAIL FROM",
        "RCPT TO",
        "RCPT TO",
        "DATA",
        "MAIL FROM",
        "RCPT TO",
        "QUIT",
    ]


def test_a_354_for_nobody_is_ended_with_a_lone_dot_and_the_connection_stays_usable(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server()

    async def go() -> None:
        client = await _connected(server.port)
        replies = await pipelining.send_envelope(client, "s@example.com", ["bad@example.net"])
        assert replies.accepted == 0 and replies.data is not None and replies.data.code == 354
        assert (await pipelining.abandon_content(client)).code == 554
        again = await pipelining.send_envelope(client, "s@example.com", ["a@example.net"])
        assert again.accepted == 1
        assert (await pipelining.send_content(client, BODY)).code == 250
        await client.quit()

    asyncio.run(go())
    assert len(server.messages) == 1  # only the second transaction delivered anything


def test_a_server_that_hangs_up_mid_group_raises_and_closes_the_client(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(close_after_mail=True)

    async def go() -> None:
        client = await _connected(server.port)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await pipelining.send_envelope(client, "s@example.com", ["a@example.net"], timeout=5)
        assert not client.is_connected

    asyncio.run(go())
    assert server.messages == []


def test_control_characters_in_an_address_are_refused_before_anything_is_written(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server()

    async def go() -> None:
        client = await _connected(server.port)
        with pytest.raises(ValueError):
            await pipelining.send_envelope(client, "s@example.com", ["a@example.net\r\nRSET"])
        await client.quit()

    asyncio.run(go())
    assert not any(p[0].startswith("MAIL") for p in server.packets)


def test_a_reply_that_arrives_before_the_one_ahead_of_it_is_picked_up_is_kept() -> None:
    """aiosmtplib drops data that arrives while a parsed reply waits for its reader. Between a
    reply being parsed and its reader waking there are loop iterations in which the next reply
    of a group can arrive; the order is forced here by feeding the protocol directly."""

    async def go() -> list[str]:
        near, far = socket.socketpair()
        protocol = aiosmtplib.protocol.SMTPProtocol(loop=asyncio.get_running_loop())
        await asyncio.get_running_loop().create_connection(lambda: protocol, sock=near)
        restore = pipelining._keep_data_behind_a_reply(protocol)
        try:
            protocol.data_received(b"250 one\r\n")  # parsed into the waiter
            protocol.data_received(b"250 two\r\n")  # before anyone picked "one" up
            return [(await pipelining._next_reply(protocol, 1.0)).message for _ in range(2)]
        finally:
            restore()
            assert protocol.transport is not None
            protocol.transport.close()
            far.close()

    assert asyncio.run(go()) == ["one", "two"]


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    hypothesis.strategies.lists(
        hypothesis.strategies.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x."])
    )
)
def test_the_wire_form_is_aiosmtplibs_whatever_the_line_endings_and_dots(pieces: list[bytes]) -> None:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    message = b"".join(pieces)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    assert pipelining.on_the_wire(message) == expected
