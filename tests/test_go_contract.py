"""The contract as another language's client meets it.

The client side of these tests is a plain nats-py client that imports nothing of the project:
it publishes JSON shaped the way Go's encoding/json marshals it and reads the answers as plain
JSON, using only docs/events.md and `mindx schema`. The service runs as its own process
(`python -m services.cli ...`) on a real nats-server; Ollama is the strict test double.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

ROOT = Path(__file__).resolve().parents[1]


def mindx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Served:
    """A `mindx serve ...` process; its stderr is drained into `lines` (a full pipe would
    block it)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MINDX_LOG_LEVEL": "INFO"},
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(60):
            raise AssertionError(f"mindx serve {args} did not start:\n{self.log}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("serving "):
                self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def service() -> Iterator[Any]:
    """Start `mindx serve ...` processes; each is stopped (SIGTERM) after the test."""
    started: list[Served] = []

    def start(*args: str) -> Served:
        started.append(Served(*args))
        return started[-1]

    yield start
    for served in started:
        served.stop()


@pytest.fixture
async def go_client(nats_server: Any) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def until(check: Any, timeout: float, what: str) -> None:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def go_point(i: int) -> bytes:
    """A memory point as Go marshals it: a nil slice is null, times carry nanoseconds and
    the writer's offset, fields come in struct order."""
    return json.dumps(
        {
            "id": i,
            "content": f"User: what is on the list today, item {i}?\nAssistant: Item {i} is done.",
            "keywords": None,
            "summary": "",
            "created_at": f"2025-03-03T08:12:{i % 60:02d}.123456789+08:00",
            "updated_at": f"2025-03-03T08:12:{i % 60:02d}.123456789+08:00",
            "vector": None,
        }
    ).encode()


async def test_init_declares_the_streams_so_points_before_any_service_are_kept(
    tmp_path: Path, nats_server: Any, go_client: Any, service: Any
) -> None:
    js = go_client.jetstream()
    # a fresh server: no stream takes the subject, so a JetStream publish says so (no ack)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish("memory.point.created", go_point(0), timeout=2)

    data = str(tmp_path / "data")
    done = mindx("init", "--nats", nats_server.url, "--data-dir", data)
    assert done.returncode == 0, done.stderr
    assert "MEMORY" in done.stdout and nats_server.url in done.stdout

    # Memory publishes before any service ran: every point is acked by the stream
    for i in range(1, 6):
        ack = await js.publish(
            "memory.point.created", go_point(i), headers={"Nats-Msg-Id": f"p{i}"}
        )
        assert ack.stream == "MEMORY" and not ack.duplicate

    service("collector", "--nats", nats_server.url, "--data-dir", data)

    async def collected() -> bool:
        out = mindx("corpus", "stats", "--json", "--data-dir", data, "--watermark", data + "/wm")
        return json.loads(out.stdout)["points"] == 5

    await until(collected, 30, "the collector to store the 5 early points")
    out = mindx("corpus", "stats", "--json", "--data-dir", data, "--watermark", data + "/wm")
    stats = json.loads(out.stdout)
    assert stats["pairs"] == 5 and stats["points_without_pairs"] == 0
