"""Session fixtures: the throwaway PKI and a factory of real SMTP servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.pki import Pki
from support.smtpd import SmtpServer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def smtp_server(pki: Pki) -> Iterator[Callable[..., SmtpServer]]:
    """``smtp_server(mode=..., **behaviour)`` starts a server; all stop at teardown."""
    servers: list[SmtpServer] = []

    def start(**kwargs: Any) -> SmtpServer:
        kwargs.setdefault("cert", pki.server_cert)
        kwargs.setdefault("key", pki.server_key)
        server = SmtpServer(**kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
