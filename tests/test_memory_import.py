"""`mindx memory import` as a separate process: every good record imported, every bad one named.

Real parts: a nats-server (its 1 MB max_payload is the limit a big record hits), the CLI as its
own process, the collector it runs and the SQLite corpus it fills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import subjects
from shared.bus import Bus, PayloadTooLargeError
from shared.corpus import Corpus
from shared.messages import MemoryPoint, decode

REPO = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1


def point(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": i,
        "content": f"User: question number {i}?\nAssistant: The answer to {i} is here.",
        "created_at": "2025-03-03T00:00:00Z",
        **extra,
    }


def jsonl(path: Path, records: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mindx(*args: str, ws: Path, nats_url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "services.cli", *args, "--workspace", str(ws), "--nats", nats_url]
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=120
    )


def stored_ids(ws: Path) -> set[int]:
    with Corpus.open(ws / "data" / "corpus.sqlite3") as corpus:
        return {p.id for p in corpus.points()}


def test_point_ids_are_sqlite_integers() -> None:
    for ok in (0, 1, INT64_MAX, -(2**63)):
        assert decode(json.dumps(point(ok)).encode(), MemoryPoint).id == ok
    for bad in (2**63, 2**70, -(2**63) - 1):
        with pytest.raises(msgspec.ValidationError, match=r"\$\.id"):
            decode(json.dumps(point(bad)).encode(), MemoryPoint)


async def test_import_takes_every_good_record_and_names_every_bad_one(
    tmp_path: Path, nats_server: Any, bus: Bus
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    big = point(3, content="User: a long one?\nAssistant: " + "x" * (1 << 20))
    first = jsonl(
        tmp_path / "a.jsonl",
        [point(1), point(2), big, point(4), "{not json", point(2**70), point(INT64_MAX)],
    )
    missing = tmp_path / "missing.jsonl"
    last = jsonl(tmp_path / "b.jsonl", [point(5), point(6)])

    done = mindx(
        "memory", "import", str(first), str(missing), str(last), ws=ws, nats_url=nats_server.url
    )

    assert done.returncode == 1, done.stderr  # like cp: something was skipped
    assert "Traceback" not in done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4, done.stderr
    assert any(f"{first}:3:" in s and "max_payload" in s for s in skipped), skipped
    assert any(f"{first}:5:" in s and "JSON" in s for s in skipped), skipped
    assert any(f"{first}:6:" in s and "$.id" in s for s in skipped), skipped
    assert any(str(missing) in s and "no such file" in s for s in skipped), skipped
    assert "imported 6 memory points (4 skipped)" in done.stdout
    # what the CLI counted is what the corpus holds, and nothing was dead-lettered later
    assert stored_ids(ws) == {1, 2, 4, 5, 6, INT64_MAX}
    assert await bus.dead_letters() == []


async def test_a_clean_import_exits_0(tmp_path: Path, nats_server: Any) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    f = jsonl(tmp_path / "a.jsonl", [point(1), point(2)])
    done = mindx("memory", "import", str(f), ws=ws, nats_url=nats_server.url)
    assert done.returncode == 0, done.stderr
    assert "skipped" not in done.stderr
    assert "imported 2 memory points (0 skipped)" in done.stdout
    assert stored_ids(ws) == {1, 2}


async def test_an_id_sqlite_cannot_store_is_dead_lettered_on_the_bus(
    tmp_path: Path, nats_server: Any, bus: Bus
) -> None:
    # a producer other than the CLI: the collector refuses it at decoding, with the reason
    await bus.publish_raw(subjects.MEMORY_POINT_CREATED, json.dumps(point(2**70)).encode())
    ws = tmp_path / "ws"
    ws.mkdir()
    f = jsonl(tmp_path / "a.jsonl", [point(1)])
    assert mindx("memory", "import", str(f), ws=ws, nats_url=nats_server.url).returncode == 0
    letters = await bus.dead_letters()
    assert len(letters) == 1 and "$.id" in letters[0].error, letters
    assert stored_ids(ws) == {1}


async def test_the_bus_refuses_exactly_what_the_server_would(bus: Bus) -> None:
    # the header block counts against max_payload: at the limit the server stores the message,
    # one byte over, the bus refuses it before sending (the server would drop the connection)
    msg_id = "point-1-x"
    headers = len(f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\nNats-Expected-Stream: MEMORY\r\n\r\n")
    limit = bus.nc.max_payload
    fits = b'"' + b"x" * (limit - headers - 2) + b'"'
    await bus.publish_raw(subjects.MEMORY_POINT_CREATED, fits, msg_id=msg_id)
    with pytest.raises(PayloadTooLargeError, match="max_payload"):
        await bus.publish_raw(subjects.MEMORY_POINT_CREATED, fits + b" ", msg_id=msg_id + "y")
    info = await bus.js.stream_info("MEMORY")
    assert info.state.messages == 1 and bus.nc.is_connected
