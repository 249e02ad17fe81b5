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
from datetime import datetime, timedelta, timezone
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


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTIWOZ = SHARED_DATA / "multiwoz.memory.jsonl"
CST = timezone(timedelta(hours=8))
BASE_ENTRY = {
    "name": "qwen3:0.6b",
    "base_url": "http://127.0.0.1:11434",
    "temperature": 0.7,
    "max_tokens": 2048,
    "stop": [],
}


def go_shaped(line: str, n: int) -> bytes:
    """A real memory point re-marshalled the way Go writes it: RFC 3339 with nanoseconds in
    the writer's zone (+08:00), every other nil keyword slice as null."""
    rec = json.loads(line)
    for key in ("created_at", "updated_at"):
        if rec.get(key):
            at = datetime.fromisoformat(rec[key]).astimezone(CST)
            rec[key] = f"{at:%Y-%m-%dT%H:%M:%S}.{n * 123456789 % 10**9:09d}+08:00"
    if n % 2 == 0 or not rec.get("keywords"):
        rec["keywords"] = None
    return json.dumps(rec, ensure_ascii=False).encode()


def go_config(path: Path) -> None:
    """The app's config as Go's json.MarshalIndent(cfg, "", "\t") writes it."""
    cfg = {"brain": {"left": "qwen3:0.6b", "right": "qwen3:0.6b"}, "models": [BASE_ENTRY]}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(cfg, indent="\t", ensure_ascii=False))


class Inbox:
    """A plain core subscription that keeps every message as decoded JSON."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def on_msg(self, msg: Any) -> None:
        await self.got.put((msg.subject, json.loads(msg.data)))

    async def next(self, timeout: float = 120) -> tuple[str, Any]:  # noqa: ASYNC109
        return await asyncio.wait_for(self.got.get(), timeout)


@pytest.mark.skipif(not MULTIWOZ.exists(), reason="../shared/data is not beside the checkout")
async def test_a_go_client_publishes_points_requests_a_run_and_reads_model_updated(
    tmp_path: Path, nats_server: Any, go_client: Any, ollama_double: Any, service: Any
) -> None:
    ws = tmp_path / "ws"
    config = ws / "config" / "models.json"
    go_config(config)
    where = ["--workspace", str(ws), "--nats", nats_server.url]
    assert mindx("init", *where).returncode == 0
    js = go_client.jetstream()

    # Memory: points as Go marshals them, each acked by the stream
    lines = MULTIWOZ.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        ack = await js.publish(
            "memory.point.created", go_shaped(line, n), headers={"Nats-Msg-Id": f"m-{n}"}
        )
        assert ack.stream == "MEMORY"

    served = service(
        "all",
        *where,
        "--ollama", ollama_double.url,
        "--watermark", "state/last_training.json",
        "--app-system", "You are MindX, the user's assistant.",
        "--app-options", '{"temperature": 0.7, "num_ctx": 4096}',
    )  # fmt: skip

    async def collected() -> bool:
        info = await js.consumer_info("MEMORY", "collector")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await until(collected, 60, "the collector to store every point")
    out = mindx("corpus", "stats", "--json", *where, "--watermark", "state/last_training.json")
    stats = json.loads(out.stdout)
    assert stats["points"] == len(lines), served.log  # nothing dead-lettered: null keywords ok

    # Brain: subscribe first, then ask for a run with an empty body (Go's Publish(subj, nil))
    inbox = Inbox()
    await go_client.subscribe("model.updated", cb=inbox.on_msg)
    await go_client.subscribe("training.completed", cb=inbox.on_msg)
    await go_client.subscribe("training.failed", cb=inbox.on_msg)
    ack = await js.publish("training.requested", b"")
    assert ack.stream == "TRAINING"

    got: dict[str, Any] = {}
    while len(got) < 2:
        subject, body = await inbox.next()
        got[subject] = body
    assert "training.failed" not in got, got
    done, updated = got["training.completed"], got["model.updated"]
    assert done["status"] == "success", served.log

    # model.updated alone tells the Brain what to load and how
    model = updated["model"]
    assert model == done["report"]["new_model"] and model.startswith("mindx-qwen3-0.6b:")
    assert updated["previous_model"] == "qwen3:0.6b"
    assert updated["model_entry"] == {**BASE_ENTRY, "name": model}
    assert updated["run_id"] == done["run_id"] and updated["request_id"] is None
    assert updated["mode"] == "message" and updated["rolled_back"] is False
    assert updated["new_score"] > updated["base_score"]
    assert updated["restored_run_id"] is None
    assert updated["config_path"] == str(config)
    assert updated["at"].endswith("Z") or "+" in updated["at"]

    # the config the Brain reads: switched, still in Go's layout
    text = config.read_text()
    assert json.loads(text)["brain"]["left"] == model
    assert text.startswith('{\n\t"brain": {\n\t\t"left": ') and not text.endswith("\n")

    # validation asked the way the app asks, and the report says so
    asked = done["report"]["validation_request"]
    assert asked == {
        "system_sent": True,
        "system": "You are MindX, the user's assistant.",
        "options": {"temperature": 0.7, "seed": 42, "num_ctx": 4096},
    }
    chats = [c.body for c in ollama_double.requests if c.path == "/api/chat"]
    assert chats and all(c["messages"][0]["role"] == "system" for c in chats)
    assert all(c["options"]["num_ctx"] == 4096 for c in chats)

    # a rollback requested from Go: it must name the config (model.updated says which);
    # one that does not is dead-lettered, and the config stays as it is
    letters = Inbox()
    await go_client.subscribe("dlq.model.rollback.requested", cb=letters.on_msg)
    await js.publish("model.rollback.requested", b'{"request_id":"go-undo-0"}')
    _, letter = await letters.next(30)
    assert "config_path" in letter["error"] and "go-undo-0" in letter["data"]
    assert json.loads(config.read_text())["brain"]["left"] == model
    undo = {"config_path": updated["config_path"], "request_id": "go-undo-1"}
    await js.publish("model.rollback.requested", json.dumps(undo).encode())
    subject, back = await inbox.next(30)
    assert subject == "model.updated" and back["rolled_back"] is True
    assert (back["run_id"], back["model"], back["previous_model"]) == (
        "go-undo-1",
        "qwen3:0.6b",
        model,
    )
    assert back["model_entry"] == BASE_ENTRY and back["restored_run_id"] is None
    assert json.loads(config.read_text())["brain"]["left"] == "qwen3:0.6b"
