"""Config updaters side by side: several processes on one config, or one config each.

Real parts: a nats-server, `mindx serve config-updater` processes, `mindx rollback` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from services.model_config import (
    applied_path,
    backup_config,
    config_key,
    list_backups,
    prune_backups,
    render_config,
)
from services.pipeline import validated_record
from shared import subjects
from shared.backend import CreateRequest
from shared.bus import Bus
from shared.messages import ModelUpdated, ModelValidated, RollbackRequested
from shared.ollama import OllamaClient

REPO = Path(__file__).resolve().parents[1]
BASE = "qwen3:0.6b"


def config(left: str = BASE) -> str:
    return render_config({"brain": {"left": left}, "models": [{"name": BASE, "temperature": 0.2}]})


def validated(i: int) -> ModelValidated:
    return ModelValidated(
        run_id=f"20250101_0000{i:02d}",
        base_model=BASE,
        new_model=f"mindx-qwen3-0.6b:run-{i}",
        mode="message",
        base_score=0.4,
        new_score=0.6,
        base_accuracy=0.4,
        new_accuracy=0.6,
        improved=True,
        cases=20,
    )


def mindx(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def serve_updater(
    procs: list[subprocess.Popen[str]],
    nats_url: str,
    config_path: Path,
    ollama_url: str | None = None,
) -> subprocess.Popen[str]:
    cmd = mindx("serve", "config-updater", "--nats", nats_url, "--config", str(config_path))
    if ollama_url is not None:
        cmd += ["--ollama", ollama_url]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ}, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    return proc


def wait_serving(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    line = proc.stderr.readline()  # `serving config-updater on ...` once its consumers exist
    assert line.startswith("serving"), line


async def collect(bus: Bus, subject: str, typ: type) -> asyncio.Queue[Any]:
    q: asyncio.Queue[Any] = asyncio.Queue()

    async def put(ev: Any) -> None:
        await q.put(ev)

    await bus.subscribe(subject, typ, put)
    return q


async def test_two_updaters_on_one_config_lose_no_journal_entry(
    tmp_path: Path,
    nats_server: Any,
    bus: Bus,
    processes: list[subprocess.Popen[str]],
    ollama_double: Any,
) -> None:
    path = tmp_path / "config" / "models.json"
    path.parent.mkdir()
    path.write_text(config())
    runs = 60
    async with OllamaClient(ollama_double.url) as client:
        for i in range(runs):  # each run as its trainer leaves it: its model and its record
            await client.create(CreateRequest(model=validated(i).new_model, from_=BASE))
            await bus.put_record(subjects.RUNS, validated(i).run_id, validated_record(validated(i)))
    for i in range(runs):  # all waiting in the stream before either updater starts
        await bus.publish(subjects.MODEL_VALIDATED, validated(i), msg_id=f"v-{i}")
    updated = await collect(bus, subjects.MODEL_UPDATED, ModelUpdated)
    first = serve_updater(processes, nats_server.url, path, ollama_double.url)
    second = serve_updater(processes, nats_server.url, path, ollama_double.url)

    events = [await asyncio.wait_for(updated.get(), 60) for _ in range(runs)]
    await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=30)
    assert first.poll() is None and second.poll() is None

    journal = json.loads(applied_path(path).read_text())
    assert sorted(journal) == sorted(validated(i).run_id for i in range(runs))
    assert all(rec["published"] for rec in journal.values())
    # applied one after the other: the previous models form one chain from the base
    previous = {ev.previous_model: ev.model for ev in events}
    assert len(previous) == runs, "two updates started from the same config"
    chain, left = [], BASE
    while left in previous:
        left = previous[left]
        chain.append(left)
    assert len(chain) == runs
    assert json.loads(path.read_text())["brain"]["left"] == chain[-1]
    # each update made its own backup (pruned to the newest 10), none overwritten
    backups = list_backups(path)
    assert len(backups) == 10
    assert {json.loads(b.read_text())["brain"]["left"] for b in backups} == set(chain[-11:-1])


async def test_a_rollback_is_done_only_by_the_updater_of_its_config(
    tmp_path: Path, nats_server: Any, bus: Bus, processes: list[subprocess.Popen[str]]
) -> None:
    configs = {}
    for name in ("a", "b"):
        path = tmp_path / name / "models.json"
        path.parent.mkdir()
        path.write_text(config(f"{name}-current"))
        path.with_name("models.json.backup.20250101_000000").write_text(config(f"{name}-old"))
        configs[name] = path
    b_before = configs["b"].read_bytes()
    updated = await collect(bus, subjects.MODEL_UPDATED, ModelUpdated)
    await asyncio.to_thread(wait_serving, serve_updater(processes, nats_server.url, configs["b"]))

    # a request for config a reaches b's updater first: b ignores it and acks it
    await bus.publish(
        subjects.MODEL_ROLLBACK_REQUESTED,
        RollbackRequested(request_id="for-a", config_path=str(configs["a"])),
    )
    await asyncio.sleep(0.5)
    assert configs["b"].read_bytes() == b_before
    assert updated.empty()

    # the CLI for config a, with b's updater still serving: only a is rolled back
    await asyncio.to_thread(wait_serving, serve_updater(processes, nats_server.url, configs["a"]))
    done = await asyncio.to_thread(
        subprocess.run,
        mindx("rollback", "--nats", nats_server.url, "--config", str(configs["a"])),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert str(configs["a"]) in done.stdout and "a-current -> a-old" in done.stdout
    assert json.loads(configs["a"].read_text())["brain"]["left"] == "a-old"
    assert configs["b"].read_bytes() == b_before
    assert len(list_backups(configs["b"])) == 1
    ev = await asyncio.wait_for(updated.get(), 10)
    assert ev.config_path == str(configs["a"]) and ev.model == "a-old"
    # the stray request of before stays undone: a's updater started after it was published
    await asyncio.sleep(0.5)
    assert updated.empty()


async def test_a_rollback_that_names_no_config_is_dead_lettered(
    tmp_path: Path, nats_server: Any, bus: Bus, processes: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "models.json"
    path.write_text(config("current"))
    path.with_name("models.json.backup.20250101_000000").write_text(config("old"))
    before = path.read_bytes()
    await asyncio.to_thread(wait_serving, serve_updater(processes, nats_server.url, path))
    # a path that names no file is no config of this updater: acked and left alone
    await bus.publish_raw(
        subjects.MODEL_ROLLBACK_REQUESTED, b'{"config_path": "/x\\u0000y", "request_id": "nul"}'
    )
    await bus.publish_raw(subjects.MODEL_ROLLBACK_REQUESTED, b'{"request_id": "anyone"}')
    await bus.wait_idle(subjects.config_rollback(config_key(path)), timeout=30)
    letters = await bus.dead_letters()
    assert len(letters) == 1 and "config_path" in letters[0].error, letters
    assert path.read_bytes() == before


def test_a_backup_name_freed_by_pruning_is_not_reused(tmp_path: Path) -> None:
    # many updates within one second: the newest backup must stay the newest after pruning
    path = tmp_path / "models.json"
    at = datetime(2025, 1, 1, 12, 0, 0)
    for i in range(6):
        path.write_text(config(f"m{i}"))
        backup_config(path, at=at)
        prune_backups(path, keep=3)
    assert [json.loads(b.read_text())["brain"]["left"] for b in list_backups(path)] == [
        "m5",
        "m4",
        "m3",
    ]
