"""One embedded nats-server per data dir: commands on one data dir share the server the first
one started, in this process or in others; a dead owner's record is taken over; a recorded
server that does not answer is refused with a clear error.

nats-server does not lock its store: two servers on one `<data-dir>/nats` lose messages.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.memory_adapter import read_memory_file
from shared import subjects
from shared.bus import Bus
from shared.messages import MemoryPoint
from shared.nats_auth import ensure_auth_dir
from shared.nats_client import NatsAuth
from shared.nats_server import (
    NatsServerError,
    lock_paths,
    nats_server_binary,
    read_record,
    store_server,
)
from tests.test_e2e import DATASETS, SHARED_DATA, workspace

REPO = Path(__file__).resolve().parents[1]


def counting_binary(tmp_path: Path) -> tuple[Path, Path]:
    """A nats-server that first appends its pid to a log: how many servers ran."""
    starts = tmp_path / "server-starts.log"
    wrapper = tmp_path / "nats-server"
    wrapper.write_text(f'#!/bin/sh\necho $$ >> "{starts}"\nexec "{nats_server_binary()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, starts


def starts(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


class Cli:
    """`python -m services.cli` processes on one data dir, with no --nats: the embedded server."""

    def __init__(self, data: Path, binary: Path) -> None:
        self.common = ["--data-dir", str(data)]
        self.env = {**os.environ, "NATS_SERVER_BIN": str(binary)}
        self.env.pop("NATS_URL", None)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, *self.common,
            cwd=REPO, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def run(self, *args: str) -> tuple[str, str]:
        proc = await self.start(*args)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        return out.decode(), err.decode()

    async def serve(self) -> tuple[asyncio.subprocess.Process, str]:
        proc = await self.start("serve", "collector")
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        assert line.startswith("serving collector on nats://"), line
        return proc, line.rsplit(" ", 1)[1].strip()


def points_file(path: Path, ids: range) -> Path:
    path.write_text(
        "".join(
            msgspec.json.encode(
                MemoryPoint(id=i, content=f"User: q{i}\nAssistant: a{i}", keywords=["k"])
            ).decode()
            + "\n"
            for i in ids
        )
    )
    return path


def service_auth(data_dir: Path) -> NatsAuth:
    """The service role's key of the data dir's embedded server, which requires auth."""
    return NatsAuth(nkey=ensure_auth_dir(data_dir / "auth").seed_file("service"))


async def stream_counts(url: str, data_dir: Path) -> dict[str, int]:
    bus = await Bus.connect(url, name="test", auth=service_auth(data_dir))
    try:
        return {s: (await bus.js.stream_info(s)).state.messages for s in ("MEMORY", "DLQ")}
    finally:
        await bus.close()


async def test_commands_on_one_data_dir_share_one_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    binary, log = counting_binary(tmp_path)
    cli = Cli(data, binary)
    lock, _ = lock_paths(data / "nats")

    owner, url = await cli.serve()
    try:
        record = read_record(lock)
        assert record is not None and record["url"] == url and record["pid"] == owner.pid
        assert oct(lock.stat().st_mode & 0o777) == oct(0o600)

        # two imports, a dead-letter listing and a stats read at once, all on the owner's server
        first = points_file(tmp_path / "a.jsonl", range(1, 41))
        second = points_file(tmp_path / "b.jsonl", range(31, 71))  # 31..40 in both
        outs = await asyncio.gather(
            cli.run("memory", "import", str(first)),
            cli.run("memory", "import", str(second)),
            cli.run("dlq", "list", "--json"),
            cli.run("corpus", "stats", "--json"),
        )
        assert "imported 40 memory points (0 skipped)" in outs[0][0]
        assert "imported 40 memory points (0 skipped)" in outs[1][0]
        assert json.loads(outs[2][0]) == []
        assert starts(log) == 1

        bus = await Bus.connect(str(record["url"]), name="test", auth=service_auth(data))
        try:
            await bus.publish_raw(subjects.MEMORY_POINT_CREATED, b'{"id": "seven"}')
            await bus.wait_idle(subjects.COLLECTOR, timeout=30)
        finally:
            await bus.close()
        letters = json.loads((await cli.run("dlq", "list", "--json"))[0])
        assert [d["subject"] for d in letters] == [subjects.MEMORY_POINT_CREATED]
        stats = json.loads((await cli.run("corpus", "stats", "--json"))[0])
        assert (stats["points"], stats["pairs"]) == (70, 70)
        # 70 distinct points (the repeats were dropped by message id) and the bad one
        assert await stream_counts(url, data) == {"MEMORY": 71, "DLQ": 1}
        assert starts(log) == 1
    finally:
        owner.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(owner.wait(), 60) == 0
    assert read_record(lock) is None  # the owner's exit removed the record
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))  # and stopped its server

    # the next command starts the store's server again; the store kept everything
    letters = json.loads((await cli.run("dlq", "list", "--json"))[0])
    assert len(letters) == 1
    assert starts(log) == 2

    # an owner killed outright: its server goes with it and the next command takes over
    owner, url = await cli.serve()
    killed = read_record(lock)
    assert killed is not None and killed["pid"] == owner.pid
    owner.send_signal(signal.SIGKILL)
    await owner.wait()
    letters = json.loads((await cli.run("dlq", "list", "--json"))[0])
    assert len(letters) == 1
    assert starts(log) == 4
    assert read_record(lock) is None


async def test_in_one_process_a_second_user_shares_and_outlives_the_owner(tmp_path: Path) -> None:
    store = tmp_path / "data" / "nats"
    owner_leaving = asyncio.Event()

    async def user(url: str) -> None:
        async with store_server(store) as same:
            assert same == url
            await owner_leaving.wait()
            await asyncio.sleep(0.5)
            bus = await Bus.connect(same, name="user")  # the server is still there for us
            await bus.close()

    async with store_server(store) as url:
        task = asyncio.create_task(user(url))
        await asyncio.sleep(0.5)
        owner_leaving.set()
    # the owner's exit waited for its user before it stopped the server
    assert task.done() and task.exception() is None
    assert read_record(lock_paths(store)[0]) is None


async def test_a_recorded_server_that_does_not_answer_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "data" / "nats"
    store.parent.mkdir(parents=True)
    lock, _ = lock_paths(store)
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, as by a server that outlived its owner
        # a live owner (this process) whose server does not answer
        os.write(fd, json.dumps({"url": "nats://127.0.0.1:1", "pid": os.getpid()}).encode())
        with pytest.raises(
            NatsServerError, match=rf"started by pid {os.getpid()}\) does not answer at nats://"
        ):
            async with store_server(store, wait_s=0.5):
                pass
        # a dead owner whose server still holds the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"url": "nats://127.0.0.1:1", "pid": gone.pid}).encode(), 0)
        with pytest.raises(NatsServerError, match="outlived the command that started it"):
            async with store_server(store, wait_s=0.5):
                pass
    finally:
        os.close(fd)
    # once the lock is free, the stale record is taken over
    async with store_server(store) as url:
        record = read_record(lock)
        assert record is not None and record["url"] == url and record["pid"] == os.getpid()


async def training_events(url: str, data_dir: Path) -> int:
    bus = await Bus.connect(url, name="test", auth=service_auth(data_dir))
    try:
        return (await bus.js.stream_info("TRAINING")).state.messages
    finally:
        await bus.close()


@pytest.mark.skipif(not DATASETS, reason="../shared/data is not beside the checkout")
async def test_two_runs_at_once_on_one_data_dir(tmp_path: Path, ollama_double: Any) -> None:
    """Two `train --run-once` at once on one workspace: one server, every event kept."""
    memory = SHARED_DATA / "multiwoz.memory.jsonl"
    ws = workspace(tmp_path, [memory])
    binary, log = counting_binary(tmp_path)
    cli = Cli(ws / "data", binary)
    cli.common = ["--workspace", str(ws), "--watermark", "state/wm.json"]
    # A validation case the first command's validator took when it stopped is asked again
    # after this timeout (default 120 s).
    cli.env["MINDX_VALIDATION_TIMEOUT_S"] = "20"
    # --since: the second run takes the whole corpus too, even after the first moved the watermark
    train = ("train", "--run-once", "--json", "--since", "2000-01-01T00:00:00+00:00")
    train = (*train, "--ollama", ollama_double.url)

    first = await cli.start(*train)
    # The second command starts once the first one's trainer has taken its request, so each
    # trainer runs its own: a run-once command whose own run ends first stops its components,
    # and a run it had taken for the other command would be cut off and run again.
    record = None
    for _ in range(600):
        record = read_record(lock_paths(ws / "data" / "nats")[0])
        if record is not None and await training_events(str(record["url"]), ws / "data") >= 2:
            break
        await asyncio.sleep(0.1)
    second = await cli.start(*train)
    outs = await asyncio.wait_for(asyncio.gather(first.communicate(), second.communicate()), 300)
    for proc, (_, err) in zip((first, second), outs, strict=True):
        assert proc.returncode == 0, err.decode()
    reports = [json.loads(out) for out, _ in outs]
    assert [r["status"] for r in reports] == ["success", "success"]
    assert reports[0]["run_id"] != reports[1]["run_id"]
    assert starts(log) == 1

    points, errors = read_memory_file(memory)
    assert not errors
    async with store_server(ws / "data" / "nats") as url:
        bus = await Bus.connect(url, name="test")
        try:
            held = {
                s: (await bus.js.stream_info(s)).state.messages
                for s in ("MEMORY", "TRAINING", "MODEL", "DLQ")
            }
        finally:
            await bus.close()
    assert held == {
        "MEMORY": len({subjects.point_msg_id(p) for p in points}),
        "TRAINING": 2 * 3,  # requested, started, completed
        "MODEL": 2 * 2,  # validated, updated
        "DLQ": 0,
    }
    assert not list((ws / "data" / "training").glob(".run_*.claim"))
