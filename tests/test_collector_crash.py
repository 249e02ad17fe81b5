"""A collector process killed mid-stream and restarted loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.collector import pairs_from_point
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.messages import MemoryPoint, decode

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def collector_process(nats_url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "services.cli", "serve", "collector"]
    cmd += ["--nats", nats_url, "--data-dir", str(data_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ}, stderr=subprocess.DEVNULL)


def stored_points(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with Corpus.open(db) as corpus:
            return corpus.stats()["points"]
    except Exception:  # the collector may be creating the file right now
        return 0


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
async def test_killed_collector_loses_and_duplicates_nothing(
    tmp_path: Path, nats_server: Any, bus: Bus
) -> None:
    lines = [
        line
        for f in sorted(SHARED_DATA.glob("*.memory.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    originals = [decode(line.encode(), MemoryPoint) for line in lines]
    # every point is published twice: as created, then updated a day later with a new keyword
    updated_lines = []
    for line in lines:
        raw = json.loads(line)
        raw["updated_at"] = (
            datetime.fromisoformat(raw["updated_at"]) + timedelta(days=1)
        ).isoformat()
        raw["keywords"] = [*raw["keywords"], "updated"]
        updated_lines.append(json.dumps(raw, ensure_ascii=False))
    for line in [*lines, *updated_lines]:
        await bus.publish_raw(subjects.MEMORY_POINT_CREATED, line.encode())

    data = tmp_path / "data"
    db = data / "corpus.sqlite3"
    proc = collector_process(nats_server.url, data)
    try:
        # kill -9 once part of the stream is stored, with no chance to ack what it holds
        for _ in range(3000):
            if stored_points(db) >= 300:
                break
            await asyncio.sleep(0.01)
        at_kill = stored_points(db)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert 0 < at_kill < len(lines), "the kill did not land mid-stream"

        proc = collector_process(nats_server.url, data)
        await bus.wait_idle(subjects.COLLECTOR, timeout=180)
    finally:
        proc.terminate()
        proc.wait(10)

    newest = [decode(line.encode(), MemoryPoint) for line in updated_lines]
    expected = {
        (p.id, pair.turn, pair.prompt, pair.completion)
        for p in newest
        for pair in pairs_from_point(p)
    }
    with Corpus.open(db) as corpus:
        stats = corpus.stats()
        pairs = corpus.pairs()
    got = [(p.point_id, p.turn, p.prompt, p.completion) for p in pairs]
    assert stats["points"] == len({p.id for p in originals})
    assert len(got) == len(set(got)), "a pair was stored twice"
    assert set(got) == expected
    # every point ended at its newest version
    assert all("updated" in p.keywords for p in pairs)
    assert not await bus.dead_letters()
