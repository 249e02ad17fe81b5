"""A hung Ollama: a run ends at its deadline as a clear failure, and the client's timeout is a
setting. Real parts: a nats-server, `mindx train --run-once` as its own process, the Ollama
double over HTTP with a fault that holds every chat for an hour.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, SettingsError
from tests.ollama_double import Fault, OllamaDouble

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HANG = Fault.timeout(3600.0)

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout"
)


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    lines = (SHARED_DATA / "multiwoz.memory.jsonl").read_text().splitlines()[:120]
    (ws / "data" / "memory" / "m.jsonl").write_text("\n".join(lines) + "\n")
    (ws / "config").mkdir()
    (ws / "config" / "models.json").write_text(
        json.dumps({"brain": {"left": "qwen3:0.6b"}, "models": [{"name": "qwen3:0.6b"}]})
    )
    return ws


async def train_once(ws: Path, nats_url: str, ollama: OllamaDouble, *flags: str) -> Any:
    cmd = [
        sys.executable, "-m", "services.cli", "train", "--run-once", "--json",
        "--workspace", str(ws), "--watermark", "state/last_training.json",
        "--nats", nats_url, "--ollama", ollama.url, "--min-corpus", "20", "--held-out", "4",
        *flags,
    ]  # fmt: skip
    started = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, cmd, cwd=REPO, env={**os.environ}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return done, time.monotonic() - started


async def test_a_hung_ollama_fails_the_run_at_its_deadline(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path)
    config_before = (ws / "config" / "models.json").read_bytes()
    ollama_double.faults.add("/api/chat", HANG, times=1000)

    done, took = await train_once(ws, nats_server.url, ollama_double, "--run-timeout", "8")

    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "failed"
    assert "deadline of 8 s" in report["error"] and "--run-timeout" in report["error"]
    assert took < 8 + 30, took  # start-up and import, not 600 s x 4 tries
    assert ollama_double.count("/api/chat") >= 1  # it did hang in a chat
    assert (ws / "config" / "models.json").read_bytes() == config_before
    assert not (ws / "state" / "last_training.json").exists()
    # the report on disk says the same
    [saved] = (ws / "data" / "training").glob("report_*.json")
    assert "deadline" in json.loads(saved.read_text())["error"]


async def test_the_ollama_timeout_lets_a_run_get_past_hung_requests(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    # three chat tries hang: with a 1 s timeout each is retried (4 tries a request) and
    # answered, and the run completes (with the 600 s default it would hit its 60 s deadline)
    ws = workspace(tmp_path)
    ollama_double.faults.add("/api/chat", HANG, times=3)

    done, _ = await train_once(
        ws, nats_server.url, ollama_double, "--ollama-timeout", "1", "--run-timeout", "60"
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] in ("success", "completed_no_improvement"), report["error"]
    assert report["errors"] == {"base": 0, "new": 0}
    assert ollama_double.faults.pending("/api/chat") == 0
    assert ollama_double.count("/api/chat") >= 3 + 2 * 4  # the hung tries, then every case


def test_deadlines_by_mode_and_their_checks() -> None:
    assert Settings().run_deadline_s == 2 * 3600
    assert Settings(mode="lora").run_deadline_s == 24 * 3600
    assert Settings(mode="lora", time_budget_s=1800).run_deadline_s == 1800 + 2 * 3600
    assert Settings(mode="lora", run_timeout_s=60).run_deadline_s == 60
    assert Settings.load({"ollama_timeout_s": "2.5"}).ollama_timeout_s == 2.5
    for bad in ({"run_timeout_s": 0.0}, {"ollama_timeout_s": -1.0}):
        with pytest.raises(SettingsError):
            Settings(**bad)
