"""End to end: real memory data → real nats-server → the whole pipeline → config switched.

Ollama is the strict test double over real HTTP (it cannot run here); everything else is real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from services import cli
from shared import subjects
from shared.messages import ModelUpdated
from tests.ollama_double import Fault

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = sorted(SHARED_DATA.glob("*.memory.jsonl"))


def workspace(tmp_path: Path, files: list[Path]) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    for f in files:
        shutil.copy(f, ws / "data" / "memory" / f.name)
    (ws / "config").mkdir()
    (ws / "config" / "models.json").write_text(
        json.dumps(
            {
                "brain": {"left": "qwen3:0.6b", "right": "qwen3:0.6b"},
                "ui": {"theme": "dark"},
                "models": [
                    {
                        "name": "qwen3:0.6b",
                        "base_url": "http://127.0.0.1:11434",
                        "temperature": 0.7,
                        "max_tokens": 2048,
                    }
                ],
            },
            indent=2,
        )
    )
    return ws


def argv(ws: Path, nats_url: str, ollama_url: str, *extra: str) -> list[str]:
    return [
        "--workspace", str(ws),
        "--watermark", "state/last_training.json",
        "--nats", nats_url,
        "--ollama", ollama_url,
        *extra,
    ]  # fmt: skip


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(cli.main, list(args))


@pytest.mark.skipif(not DATASETS, reason="../shared/data is not beside the checkout")
async def test_run_once_switches_the_left_brain(
    tmp_path: Path,
    nats_server: Any,
    ollama_double: Any,
    bus: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # English task dialogues: the double's few-shot recall can show a real gain on them
    ws = workspace(tmp_path, [SHARED_DATA / "multiwoz.memory.jsonl"])
    updated: asyncio.Queue[ModelUpdated] = asyncio.Queue()

    async def on_updated(ev: ModelUpdated) -> None:
        await updated.put(ev)

    await bus.subscribe(subjects.MODEL_UPDATED, ModelUpdated, on_updated)
    rc = await run_cli(
        "train", "--run-once", "--json", *argv(ws, nats_server.url, ollama_double.url)
    )
    out = capsys.readouterr().out
    report = json.loads(out)
    assert rc == 0, report
    assert report["status"] == "success", report
    assert report["improved"] is True
    assert report["ci_low"] > 0
    assert report["held_out_cases"] >= 20
    assert report["total_pairs"] > report["filtered_pairs"] > report["training_pairs"] > 0
    funnel = report["funnel"]
    assert funnel[0]["count_in"] == report["total_pairs"] and funnel[-1]["stage"] == "split"
    assert funnel[-1]["count_out"] == report["training_pairs"]
    assert sum(f["count_in"] - f["count_out"] for f in funnel[:-1]) == (
        report["total_pairs"] - report["filtered_pairs"]
    )

    # the event the Brain listens to
    ev = await asyncio.wait_for(updated.get(), 10)
    assert ev.model == report["new_model"] and ev.previous_model == "qwen3:0.6b"
    assert not ev.rolled_back

    # config: left switched, other keys and their order kept, the new entry copied from the base
    config_path = ws / "config" / "models.json"
    config = json.loads(config_path.read_text())
    assert list(config) == ["brain", "ui", "models"]
    assert config["brain"] == {"left": report["new_model"], "right": "qwen3:0.6b"}
    new_entry = next(m for m in config["models"] if m["name"] == report["new_model"])
    assert new_entry["max_tokens"] == 2048 and new_entry["temperature"] == 0.7
    backups = sorted(config_path.parent.glob("models.json.backup.*"))
    assert len(backups) == 1 and json.loads(backups[0].read_text())["brain"]["left"] == "qwen3:0.6b"
    assert ev.backup_path == str(backups[0])

    # artifacts, private
    training = ws / "data" / "training"
    ts = report["run_id"]
    for name in (
        f"train_data_{ts}.jsonl",
        f"Modelfile_{ts}",
        f"report_{ts}.json",
        f"report_{ts}.html",
    ):
        path = training / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    records = [
        json.loads(x) for x in (training / f"train_data_{ts}.jsonl").read_text().splitlines()
    ]
    assert len(records) == report["training_pairs"]
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)

    # held-out prompts never reached the model: not in the dataset, not in the baked messages
    created = ollama_double.find(report["new_model"])
    baked_users = {" ".join(m["content"].split()) for m in created.messages if m["role"] == "user"}
    data_users = {
        " ".join(m["content"].split())
        for r in records
        for m in r["messages"]
        if m["role"] == "user"
    }
    for case in report["cases"]:
        prompt = " ".join(case["prompt"].split())
        assert prompt not in baked_users and prompt not in data_users
    assert 0 < len(created.messages) <= 100
    # the create used the structured API, never the removed `modelfile` field
    creates = [c for c in ollama_double.requests if c.path == "/api/create"]
    assert creates and all("modelfile" not in (c.body or {}) for c in creates)

    # watermark moved; a second run finds nothing new and is skipped without touching the config
    watermark = json.loads((ws / "state" / "last_training.json").read_text())
    assert "last_train_time" in watermark
    before = config_path.read_bytes()
    rc = await run_cli(
        "train", "--run-once", "--json", *argv(ws, nats_server.url, ollama_double.url)
    )
    second = json.loads(capsys.readouterr().out)
    assert rc == 0 and second["status"] == "skipped"
    assert config_path.read_bytes() == before

    # rollback restores the previous left brain and announces it
    rc = await run_cli("rollback", *argv(ws, nats_server.url, ollama_double.url))
    assert rc == 0
    assert json.loads(config_path.read_text())["brain"]["left"] == "qwen3:0.6b"
    while True:
        ev = await asyncio.wait_for(updated.get(), 10)
        if ev.rolled_back:
            break
    assert ev.model == "qwen3:0.6b"


@pytest.mark.skipif(not DATASETS, reason="../shared/data is not beside the checkout")
async def test_no_improvement_keeps_config(
    tmp_path: Path, nats_server: Any, ollama_double: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = workspace(tmp_path, DATASETS)  # every shared data set, Chinese and English
    config_path = ws / "config" / "models.json"
    before = config_path.read_bytes()
    # a gate the new model cannot pass: it must beat the base by more than the scale allows
    rc = await run_cli(
        "train", "--run-once", "--json", "--min-effect", "2",
        *argv(ws, nats_server.url, ollama_double.url),
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["status"] == "completed_no_improvement"
    assert report["improved"] is False and "minimum effect" in report["decision_reason"]
    assert config_path.read_bytes() == before
    assert not list(config_path.parent.glob("models.json.backup.*"))


async def test_failed_run_leaves_config_and_watermark(
    tmp_path: Path, nats_server: Any, ollama_double: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = workspace(tmp_path, DATASETS[:1])
    config_path = ws / "config" / "models.json"
    before = config_path.read_bytes()
    # the server refuses every chat: validation of the base fails
    ollama_double.faults.add("/api/chat", Fault.error(400, "model runner crashed"), times=10_000)
    rc = await run_cli(
        "train", "--run-once", "--json", *argv(ws, nats_server.url, ollama_double.url)
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert report["status"] == "failed" and report["error"]
    assert config_path.read_bytes() == before
    assert not (ws / "state" / "last_training.json").exists()


async def test_cli_errors_are_one_line(
    tmp_path: Path, nats_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = workspace(tmp_path, [])
    # nothing listens on this port: a clear line, no traceback
    rc = await run_cli("train", "--run-once", *argv(ws, nats_server.url, "http://127.0.0.1:9"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mindx train: cannot reach the ollama backend")


async def test_import_stats_and_dead_letters(
    tmp_path: Path, nats_server: Any, bus: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = workspace(tmp_path, [])
    points = tmp_path / "points.jsonl"
    lines = [
        {
            "id": 1,
            "content": "User: hi there, how are you?\nAssistant: Fine, thanks for asking!\n"
            "User: and the weather?\nAssistant: Sunny all day.",
            "keywords": ["chat"],
            "created_at": "2025-03-03T00:00:00Z",
        },
        {
            "id": 2,
            "content": "用户：今天北京天气怎么样？\n助手：晴，最高气温二十度。",
            "created_at": "2025-03-04T00:00:00+08:00",
        },
    ]
    points.write_text("\n".join([*(json.dumps(x, ensure_ascii=False) for x in lines), "{not json"]))
    common = ["--workspace", str(ws), "--nats", nats_server.url]
    # the malformed last line is skipped and named; like cp, that makes the exit status 1
    assert await run_cli("memory", "import", str(points), *common) == 1
    assert f"skipped: {points}:3:" in capsys.readouterr().err
    assert await run_cli("corpus", "stats", "--json", *common, "--watermark", "wm.json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == {
        "points": 2,
        "pairs": 3,
        "pairs_since_watermark": 3,
        "points_without_pairs": 0,
        "withheld": 0,
    }

    # a malformed message on the bus is dead-lettered with its reason; the collector goes on
    await bus.publish_raw(subjects.MEMORY_POINT_CREATED, b'{"id": "seven", "content": "x"}')
    await bus.publish_raw(
        subjects.MEMORY_POINT_CREATED,
        json.dumps({"id": 3, "content": "User: one more?\nAssistant: Yes, one more."}).encode(),
    )
    assert await run_cli("memory", "import", str(points), *common) == 1  # runs the collector
    capsys.readouterr()
    assert await run_cli("dlq", "list", "--json", *common) == 0
    letters = json.loads(capsys.readouterr().out)
    assert {"subject", "error", "data", "at"} <= set(letters[0])
    assert any(
        d["subject"] == subjects.MEMORY_POINT_CREATED
        and "$.id" in d["error"]
        and "seven" in d["data"]
        for d in letters
    )
    assert await run_cli("corpus", "stats", "--json", *common, "--watermark", "wm.json") == 0
    assert json.loads(capsys.readouterr().out)["points"] == 3
