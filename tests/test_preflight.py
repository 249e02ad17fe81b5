"""The operator's mistakes, each refused before any work with one line that says the fix, and
each recovered by doing what that line says. Real parts: a nats-server, `mindx` as its own
process, the strict Ollama double (which serves `/api/pull` from its registry)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.preflight import ALL, Needs, needs_of, run_checks
from shared.ollama import OllamaClient
from shared.settings import DEFAULT_OLLAMA_EMBED_MODEL, Settings
from tests.ollama_double import OllamaDouble

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMBEDDER = DEFAULT_OLLAMA_EMBED_MODEL

needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout"
)


def workspace(tmp_path: Path, *, memory: bool = True) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    if memory:
        # English task dialogues: the double's few-shot recall shows a real gain on them
        shutil.copy(SHARED_DATA / "multiwoz.memory.jsonl", ws / "data" / "memory")
    (ws / "config").mkdir()
    (ws / "config" / "models.json").write_text(
        json.dumps({"brain": {"left": "qwen3:0.6b"}, "models": [{"name": "qwen3:0.6b"}]})
    )
    return ws


async def mindx(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "services.cli", *args,
        "--workspace", str(ws), "--watermark", "state/last_training.json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINDX_", "NATS_"))}
    return await asyncio.to_thread(
        subprocess.run, cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def train(nats: str, ollama: str, *flags: str) -> list[str]:
    return [
        "train", "--run-once", "--json", "--nats", nats, "--ollama", ollama,
        *flags,
    ]  # fmt: skip


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exit 2, no traceback, one `mindx train:` line per problem."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mindx ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- pure: which command checks what --------------------------------------------------------------


def test_each_component_is_checked_for_what_it_uses() -> None:
    assert needs_of(["collector"]) == Needs()
    assert needs_of(["lora-worker"]) == Needs()
    assert needs_of(["validator"]) == Needs(backend=True, embed_model=True)
    assert needs_of(["config-updater"]) == Needs(config=True)  # rollbacks need no backend
    assert needs_of(["collector", "trainer", "validator", "config-updater"]) == ALL


async def test_a_missing_model_on_the_local_backend_is_refused_not_pulled(tmp_path: Path) -> None:
    settings = Settings(workspace=tmp_path, backend="local", embed_model="qllama/bge-small-zh-v1.5")
    from training.local_backend import LocalBackend

    backend = LocalBackend(tmp_path / "models")
    checks = await run_checks(settings, backend, Needs(backend=True, embed_model=True))
    assert [c.level for c in checks] == ["ok", "fail"]
    assert "downloads nothing" in checks[1].message and "--embed-model" in checks[1].message


# --- the operator's mistakes, end to end ----------------------------------------------------------


@needs_data
async def test_a_typo_in_config_is_refused_then_the_right_path_runs(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path)
    base = train(nats_server.url, ollama_double.url)
    done = await mindx(ws, *base, "--config", "config/model.json")
    line = one_line(done)
    typo = ws / "config" / "model.json"
    assert line == (
        f"mindx train: config {typo} does not exist; check --config (or MINDX_CONFIG), "
        "or pass --init-config to create it"
    )
    assert not typo.exists() and not (ws / "data" / "training").exists()  # refused before work
    assert ollama_double.count("/api/chat") == 0

    # the fix the line names: the right --config (here: the default), and the run switches it
    done = await mindx(ws, *base)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    config = json.loads((ws / "config" / "models.json").read_text())
    assert config["brain"]["left"] == report["new_model"]
    assert not typo.exists()


@needs_data
async def test_init_config_creates_a_config_that_does_not_exist(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path)
    fresh = ws / "fresh" / "models.json"
    flags = train(nats_server.url, ollama_double.url, "--config", str(fresh), "--init-config")
    done = await mindx(ws, *flags)
    assert done.returncode == 0, done.stderr
    assert json.loads(fresh.read_text())["brain"]["left"] == json.loads(done.stdout)["new_model"]


@needs_data
async def test_a_missing_embedding_model_is_pulled_with_progress(
    tmp_path: Path, nats_server: Any
) -> None:
    ws = workspace(tmp_path)
    with OllamaDouble(embed_models=()) as stock:  # a stock Ollama: no embedding model yet
        done = await mindx(ws, *train(nats_server.url, stock.url))
        assert done.returncode == 0, done.stderr
        assert stock.find(EMBEDDER) is not None
        assert [c.body for c in stock.requests if c.path == "/api/pull"] == [{"model": EMBEDDER}]
    assert f"{EMBEDDER}: pulling manifest" in done.stderr
    assert f"{EMBEDDER}: verifying sha256 digest" in done.stderr
    assert f"pulling {EMBEDDER}: success" in done.stderr
    assert json.loads(done.stdout)["status"] == "success"


@needs_data
async def test_no_pull_refuses_a_missing_model_and_says_how_to_pull_it(
    tmp_path: Path, nats_server: Any
) -> None:
    ws = workspace(tmp_path)
    with OllamaDouble(embed_models=()) as stock:
        done = await mindx(ws, *train(nats_server.url, stock.url, "--no-pull"))
        line = one_line(done)
        assert line == (
            f"mindx train: embedding model {EMBEDDER} is not on the ollama backend at "
            f"{stock.url}; pull it with `ollama pull {EMBEDDER}` (or run without --no-pull), "
            "or name another with --embed-model"
        )
        assert stock.count("/api/pull") == 0 and stock.count("/api/chat") == 0
        # the fix: pull it (what `ollama pull` does), then the same command runs
        async with OllamaClient(stock.url) as client:
            await client.pull(EMBEDDER)
        done = await mindx(ws, *train(nats_server.url, stock.url, "--no-pull"))
        assert done.returncode == 0, done.stderr


async def test_a_model_the_registry_lacks_is_refused_with_the_registry_answer(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path, memory=False)
    done = await mindx(ws, *train(nats_server.url, ollama_double.url, "--model", "qwen3:06b"))
    assert one_line(done) == (
        f"mindx train: base model qwen3:06b is not on the ollama backend at {ollama_double.url} "
        "and pulling it failed: ollama /api/pull: pull model manifest: file does not exist; "
        "check the name (--model) and that the server can reach its registry"
    )


async def test_an_unreachable_backend_is_one_line_with_the_fix(
    tmp_path: Path, nats_server: Any
) -> None:
    ws = workspace(tmp_path)
    done = await mindx(ws, *train(nats_server.url, "http://127.0.0.1:9"))
    line = one_line(done)
    assert line.startswith("mindx train: cannot reach the ollama backend at http://127.0.0.1:9: ")
    assert line.endswith(
        "start Ollama (`ollama serve`), give its URL with --ollama or OLLAMA_HOST, "
        "or use --backend local"
    )


async def test_nothing_to_train_on_is_refused_after_collecting_what_there_is(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path, memory=False)
    done = await mindx(ws, *train(nats_server.url, ollama_double.url))
    assert one_line(done) == (
        f"mindx train: nothing to train on: {ws / 'data' / 'memory'} holds no .jsonl/.json "
        "memory files and the corpus is empty; copy Memory's exports there, import them with "
        "`mindx memory import FILE`, or have Memory publish memory.point.created "
        "(after `mindx init`)"
    )
    assert ollama_double.count("/api/chat") == 0


@needs_data
async def test_points_memory_published_before_the_run_are_enough(
    tmp_path: Path, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    # an empty memory dir is fine when Memory published on the bus (after `mindx init`)
    ws = workspace(tmp_path, memory=False)
    assert (await mindx(ws, "init", "--nats", nats_server.url)).returncode == 0
    from shared.bus import Bus

    async with await Bus.connect(nats_server.url, manage_streams=False) as bus:
        for line in (SHARED_DATA / "multiwoz.memory.jsonl").read_text().splitlines()[:120]:
            await bus.publish_raw("memory.point.created", line.encode())
    done = await mindx(ws, *train(nats_server.url, ollama_double.url, "--min-corpus", "20"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] in ("success", "completed_no_improvement"), report
    assert report["training_pairs"] > 0


async def test_doctor_reports_every_check_and_exits_2_on_a_failure(
    tmp_path: Path, nats_server: Any
) -> None:
    ws = workspace(tmp_path, memory=False)
    with OllamaDouble(embed_models=()) as stock:
        done = await mindx(ws, "doctor", "--json", "--ollama", stock.url)
        assert done.returncode == 2, done.stderr
        checks = {c["name"]: c for c in json.loads(done.stdout)}
        assert {n: c["level"] for n, c in checks.items()} == {
            "config": "ok",
            "memory": "warn",
            "backend": "ok",
            "base model": "ok",
            "embedding model": "fail",
        }
        assert "`mindx doctor --pull`" in checks["embedding model"]["message"]
        assert stock.count("/api/pull") == 0  # doctor only looks, unless told
        done = await mindx(ws, "doctor", "--pull", "--ollama", stock.url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert stock.find(EMBEDDER) is not None
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "WARN", "ok", "ok", "ok"]
    assert lines[-1].split(None, 2)[1:] == ["embedding", f"model  {EMBEDDER} pulled to the "
                                           f"ollama backend at {stock.url}"]  # fmt: skip


async def test_serve_pulls_before_it_starts_and_warns_of_an_empty_corpus(
    tmp_path: Path, nats_server: Any
) -> None:
    ws = workspace(tmp_path, memory=False)
    with OllamaDouble(embed_models=()) as stock:
        cmd = [
            sys.executable, "-m", "services.cli", "serve", "trainer", "--workspace", str(ws),
            "--nats", nats_server.url, "--ollama", stock.url,
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        try:
            seen: list[str] = []
            assert proc.stderr is not None
            while not any(line.startswith("serving trainer") for line in seen):
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert raw, "\n".join(seen)
                seen.append(raw.decode().strip())
        finally:
            proc.terminate()
            await proc.wait()
        assert stock.find(EMBEDDER) is not None
    assert f"pulling {EMBEDDER}: success" in seen
    assert any(line.startswith("mindx serve: warning: nothing to train on: ") for line in seen), (
        seen
    )
