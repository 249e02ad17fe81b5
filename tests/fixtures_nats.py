"""Real nats-server fixtures: a fresh JetStream server per test, its store on tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.bus import Bus
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
