"""Real nats-server fixtures: a fresh JetStream server per test, its store on tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.nats_auth import AuthDir, Role, init_auth_dir
from shared.nats_client import NatsAuth
from shared.nats_server import EmbeddedNats


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A running EmbeddedNats (`.url`, `.store_dir`, `kill9()`, `restart()`), stopped after."""
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """A Bus connected to `nats_server`, with every stream created; closed after the test."""
    connected = await Bus.connect(nats_server.url, name="test")
    try:
        yield connected
    finally:
        await connected.close()


@dataclass
class Secured:
    """A nats-server that loads the roles' authorization (`mindx auth init`), and its keys."""

    server: EmbeddedNats
    keys: AuthDir
    buses: list[Bus] = field(default_factory=list)

    async def connect(self, role: Role) -> Bus:
        """A bus as `role` (closed after the test); the service's comes first: it sets up the
        streams."""
        bus = await Bus.connect(
            self.server.url,
            name=role,
            attempts=1,
            auth=NatsAuth(nkey=self.keys.seed_file(role)),
            manage_streams=role == "service",
        )
        self.buses.append(bus)
        return bus


@pytest.fixture
async def secured_nats(tmp_path: Path) -> AsyncIterator[Secured]:
    keys = init_auth_dir(tmp_path / "auth")
    server = EmbeddedNats(tmp_path / "secured-nats", config=keys.config)
    await server.start()
    secured = Secured(server, keys)
    try:
        yield secured
    finally:
        for connected in secured.buses:
            await connected.close()
        await server.stop()
