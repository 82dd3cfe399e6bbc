"""Fallback SMTP sink (aiosmtpd) for machines without Postfix's ``smtp-sink``.

Run as a subprocess by ``bench/run.py``: it accepts every message, optionally
waits ``--delay`` seconds before answering DATA (the slow-server scenario), and
appends ``<time_ns> <Message-ID>`` per message to ``--log`` so the bench counts
deliveries at the sink rather than trusting Postroom's own counters.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import threading
import time
from typing import IO, Any

from aiosmtpd.controller import Controller

MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)


class Handler:
    """Counts by Message-ID; keeps nothing but one log line per message."""

    def __init__(self, out: IO[str], delay: float) -> None:
        self.out = out
        self.delay = delay
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        data: bytes = envelope.original_content or b""
        head = data.split(b"\r\n\r\n", 1)[0]
        found = MESSAGE_ID.search(head)
        message_id = found.group(1).decode("ascii", "replace") if found else "-"
        with self.lock:
            self.out.write(f"{time.time_ns()} {message_id}\n")
            self.out.flush()
        return "250 2.0.0 Ok: queued"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering DATA")
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop by itself after this long")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open(args.log, "a", encoding="ascii") as out:
        controller = Controller(Handler(out, args.delay), hostname="127.0.0.1", port=args.port)
        controller.start()
        try:
            stop.wait(args.max_seconds)
        finally:
            controller.stop()


if __name__ == "__main__":
    main()
