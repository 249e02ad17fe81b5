"""The embedded nats-server: start, failure reporting, crash and restart with its store."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import nats
import pytest

from shared import subjects
from shared.bus import Bus, Delivery
from shared.messages import MemoryPoint
from shared.nats_server import EmbeddedNats, NatsServerError, ensure_nats, nats_server_binary


def test_binary_comes_from_the_package() -> None:
    path = Path(nats_server_binary())
    assert path.name == "nats-server"
    assert path.is_file()


async def test_start_gives_a_working_url_and_stop_ends_it(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store")
    async with server:
        assert server.running and server.port > 0
        nc = await nats.connect(server.url)
        assert nc.is_connected
        await nc.close()
        pid = server.pid
    assert not server.running
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone (reaped)
    assert (tmp_path / "store" / "jetstream").is_dir()


async def test_a_server_that_cannot_start_reports_the_fatal_line(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    clash = EmbeddedNats(tmp_path / "other", port=nats_server.port)
    with pytest.raises(NatsServerError, match=r"\[FTL\].*address already in use"):
        await clash.start()
    assert not clash.running


async def test_ensure_nats_starts_one_only_without_a_url(tmp_path: Path) -> None:
    async with ensure_nats("nats://127.0.0.1:1", tmp_path / "a") as url:
        assert url == "nats://127.0.0.1:1"
    assert not (tmp_path / "a").exists()

    async with ensure_nats(None, tmp_path / "b") as url:
        nc = await nats.connect(url)
        await nc.close()
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # the server is gone
        await asyncio.open_connection(host, int(port))


async def test_kill9_and_restart_keep_jetstream_data(nats_server: EmbeddedNats) -> None:
    port = nats_server.port
    bus = await Bus.connect(nats_server.url)
    try:
        for i in range(3):
            await bus.publish(
                subjects.MEMORY_POINT_CREATED, MemoryPoint(id=i, content=f"point {i}")
            )
    finally:
        await bus.close()

    await nats_server.kill9()
    assert not nats_server.running
    await nats_server.restart()
    assert nats_server.port == port

    bus = await Bus.connect(nats_server.url)
    try:
        info = await bus.js.stream_info("MEMORY")
        assert info.state.messages == 3
    finally:
        await bus.close()


async def test_a_connected_consumer_survives_a_server_crash(nats_server: EmbeddedNats) -> None:
    spec = dataclasses.replace(subjects.COLLECTOR, durable="crash-test", ack_wait_s=2.0)
    got: asyncio.Queue[int] = asyncio.Queue()

    async def handler(point: MemoryPoint, delivery: Delivery) -> None:
        await got.put(point.id)

    bus = await Bus.connect(nats_server.url)
    try:
        await bus.serve(spec, MemoryPoint, handler)
        await bus.publish(subjects.MEMORY_POINT_CREATED, MemoryPoint(id=1, content="before"))
        assert await asyncio.wait_for(got.get(), 10) == 1

        await nats_server.kill9()
        await nats_server.restart()

        # The same Bus reconnects on its own; its consumer picks up where it was. Point 1 may
        # come again (its ack can die with the server): at least once, never lost.
        await bus.publish(subjects.MEMORY_POINT_CREATED, MemoryPoint(id=2, content="after"))
        seen = {1}
        while 2 not in seen:
            seen.add(await asyncio.wait_for(got.get(), 15))
        assert seen == {1, 2}
        await bus.wait_idle(spec, timeout=10)
    finally:
        await bus.close()
