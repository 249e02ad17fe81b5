"""LoRA mode end to end on the local backend: a real fine-tune of the bundled SmolLM2,
exported to GGUF, served by the in-process runtime, and validated against the base."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from services import cli

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memory" / "sample.memory.jsonl"


@pytest.mark.slow
async def test_lora_run_once_local(tmp_path: Path, nats_server, capsys) -> None:  # type: ignore[no-untyped-def]
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    lines = SAMPLE.read_text().splitlines()[:40]
    (ws / "data" / "memory" / "sample.jsonl").write_text("\n".join(lines) + "\n")
    (ws / "config").mkdir()
    shutil.copy(SAMPLE.parents[1] / "config" / "models.json", ws / "config" / "models.json")

    rc = await asyncio.to_thread(
        cli.main,
        [
            "train", "--run-once", "--json", "--backend", "local", "--mode", "lora",
            "--workspace", str(ws), "--watermark", "wm.json", "--nats", nats_server.url,
            "--min-corpus", "10", "--held-out", "4", "--epochs", "1", "--max-length", "128",
            "--time-budget", "20",
        ],
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report
    assert report["status"] in ("success", "completed_no_improvement"), report
    assert report["mode"] == "lora" and report["held_out_cases"] == 4
    lora = report["lora"]
    assert lora["steps"] > 0 and lora["tokens_per_s"] > 0
    assert len(lora["loss_curve"]) == lora["steps"]
    assert lora["served_from"] == "adapter"  # the local runtime serves GGUF adapters
    # the new model really is a different model: some held-out answer changed
    assert any(c["base_answer"] != c["new_answer"] for c in report["cases"])
    registry = ws / "data" / "models" / "registry"
    created = [p for p in registry.glob("*.json") if "mindx" in p.name]
    if report["status"] == "success":
        assert len(created) == 1 and json.loads(created[0].read_text())["adapters"]
    else:  # a challenger that lost is deleted as soon as the gate decides
        assert created == []
    lineage = json.loads(
        (ws / "data" / "training" / f"lineage_{report['run_id']}.json").read_text()
    )
    assert lineage["mode"] == "lora" and lineage["model"] == report["new_model"]
    assert len(lineage["points"]) > 0  # the LoRA model holds its whole training split
    # the artifacts fetched from the object store are not left behind in the temp dir
    assert temp_dirs(f"mindx-lora-{report['run_id']}-") == []


def temp_dirs(prefix: str) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
