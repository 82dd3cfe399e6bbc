"""A development mail catcher: a local SMTP server that keeps what it receives.

``postroom up`` starts it when an account points at it (the shipped ``dev``
account does), so a newcomer sees delivered mail without a real server.
Messages are saved as ``var/mail/*.eml`` and summarised on the console;
``postroom dev-smtp --list`` shows them.

It takes every recipient but one kind: an address in the reserved ``.invalid`` top-level
domain (RFC 2606; ``nobody@example.invalid``) is refused at RCPT with ``550 5.1.1``, as a
real server refuses a mailbox that does not exist. A catcher that took everything would
never let a newcomer see a dead letter (or a suppression) on the embedded default; no real
address is in ``.invalid``, so nothing that could be delivered is refused.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1025
REFUSED_DOMAIN = "invalid"  # RFC 2606: reserved, never a real domain
REFUSAL = "550 5.1.1 No such user: the .invalid domain never exists (postroom dev-smtp)"


def refuses(address: str) -> bool:
    """Whether the catcher refuses this recipient: its domain is in ``.invalid`` (any case)."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    return domain == REFUSED_DOMAIN or domain.endswith("." + REFUSED_DOMAIN)


class CatcherHandler:
    def __init__(self, directory: Path, *, echo: bool = True) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._lock = threading.Lock()
        self._seq = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if refuses(address):
            return REFUSAL
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        with self._lock:
            self._seq += 1
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self._seq:05d}"
        path = self.directory / f"{name}.eml"
        path.write_bytes(data)
        meta = {
            "file": path.name,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "received_at": time.time(),
        }
        (self.directory / f"{name}.json").write_text(json.dumps(meta))
        if self.echo:
            message = email.message_from_bytes(data, policy=email.policy.default)
            print(
                f"dev-smtp: {message.get('Subject', '')!r} from {envelope.mail_from} to "
                f"{', '.join(envelope.rcpt_tos)} {message.get('Message-ID', '')} -> {path}",
                flush=True,
            )
        return "250 2.0.0 OK: caught by postroom dev-smtp"


def start_catcher(directory: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Controller:
    controller = Controller(
        CatcherHandler(directory), hostname=host, port=port, data_size_limit=50 * 1024 * 1024
    )
    controller.start()
    return controller


def caught(directory: Path) -> list[dict[str, Any]]:
    """Summaries of the caught messages, oldest first."""
    out = []
    for meta_path in sorted(directory.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        eml = directory / meta["file"]
        if not eml.is_file():
            continue
        message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        meta.update(
            subject=str(message.get("Subject", "")),
            message_id=str(message.get("Message-ID", "")),
            path=str(eml),
        )
        out.append(meta)
    return out
