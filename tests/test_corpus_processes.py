"""Acked points survive other processes: a service, `corpus stats` and `memory import` at once on
one data dir and one nats-server, then SIGKILL and a restart, with exact counts at every step.

`serve all` holds two corpus users in one process (collector and trainer), the case in which a
stray descriptor of the database file once let another process delete the live WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from services.collector import pairs_from_point
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.messages import MemoryPoint

REPO = Path(__file__).resolve().parents[1]
PAIRS_PER_POINT = 2


def point(i: int) -> MemoryPoint:
    return msgspec.json.decode(
        json.dumps(
            {
                "id": i,
                "content": f"User: question {i}?\nAssistant: answer {i}.\n"
                f"User: and then {i}?\nAssistant: then {i}.",
                "keywords": ["k"],
                "created_at": "2025-03-03T00:00:00Z",
            }
        ),
        type=MemoryPoint,
    )


async def mindx(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class StatsLoop:
    """`mindx corpus stats` run again and again while something else happens."""

    common: list[str]
    seen: list[int] = field(default_factory=list)
    _ran: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rc, out, err = await mindx("corpus", "stats", "--json", *self.common)
            assert rc == 0, err
            self.seen.append(json.loads(out)["points"])
            self._ran.set()

    async def another_round(self) -> None:
        """Until one more stats process has opened and closed the corpus."""
        self._ran.clear()
        await asyncio.wait_for(self._ran.wait(), 60)


@contextlib.asynccontextmanager
async def stats_running(common: list[str]) -> AsyncIterator[StatsLoop]:
    loop, stop = StatsLoop(common), asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield loop
    finally:
        stop.set()
        await task
    assert loop.seen, "no stats ran meanwhile"
    assert loop.seen == sorted(loop.seen), "a stored point disappeared"


async def service(common: list[str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serve", "all", *common,
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 60)
    while b"warning" in line:  # the preflight's (e.g. nothing to train on yet)
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
    assert b"serving collector, trainer" in line, line
    return proc


async def stats(common: list[str]) -> dict[str, int]:
    rc, out, err = await mindx("corpus", "stats", "--json", *common)
    assert rc == 0, err
    got = json.loads(out)
    return {"points": got["points"], "pairs": got["pairs"]}


async def publish(bus: Bus, ids: range, reads: StatsLoop) -> None:
    """Publish the points ten at a time, a stats process between batches; wait for the acks."""
    for start in range(ids.start, ids.stop, 10):
        for i in range(start, min(start + 10, ids.stop)):
            p = point(i)
            await bus.publish(subjects.MEMORY_POINT_CREATED, p, msg_id=subjects.point_msg_id(p))
        await reads.another_round()
    await bus.wait_idle(subjects.COLLECTOR, timeout=60)


def counts(n: int) -> dict[str, int]:
    return {"points": n, "pairs": n * PAIRS_PER_POINT}


async def test_acked_points_survive_stats_imports_and_a_killed_service(
    tmp_path: Path, nats_server: Any, bus: Bus, ollama_double: Any
) -> None:
    data = tmp_path / "data"
    common = ["--nats", nats_server.url, "--data-dir", str(data)]
    # the config updater of `serve all` may create its config here (none exists yet)
    serve_flags = [*common, "--ollama", ollama_double.url]
    serve_flags += ["--config", str(tmp_path / "models.json"), "--init-config"]
    imported = tmp_path / "import.jsonl"
    imported.write_text(
        "\n".join(msgspec.json.encode(point(i)).decode() for i in range(101, 161)) + "\n"
    )

    first = await service(serve_flags)
    try:
        assert await stats(common) == counts(0)
        # 100 points acked by the service while other processes open and close the corpus
        async with stats_running(common) as reads:
            await publish(bus, range(1, 101), reads)
        assert await stats(common) == counts(100)

        # an import (a second collector process) while the service runs and stats are read
        async with stats_running(common):
            rc, out, err = await mindx("memory", "import", str(imported), *common)
        assert rc == 0, err
        assert "imported 60 memory points (0 skipped)" in out
        assert await stats(common) == counts(160)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    # the crash lost nothing that was acked
    assert await stats(common) == counts(160)

    second = await service(serve_flags)
    try:
        assert await stats(common) == counts(160)
        async with stats_running(common) as reads:
            await publish(bus, range(161, 201), reads)
        assert await stats(common) == counts(200)
        # the same file again: JetStream drops the repeated messages, nothing changes
        rc, out, err = await mindx("memory", "import", str(imported), *common)
        assert rc == 0, err
        assert await stats(common) == counts(200)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 60) == 0

    expected = {
        (pair.point_id, pair.turn) for i in range(1, 201) for pair in pairs_from_point(point(i))
    }
    with Corpus.open(data / "corpus.sqlite3") as corpus:
        got = [(pair.point_id, pair.turn) for pair in corpus.pairs()]
    assert sorted(got) == sorted(expected)
    assert not await bus.dead_letters()
