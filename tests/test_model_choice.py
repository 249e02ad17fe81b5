"""The local backend's default models follow the language of the workspace's memory."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from services import app
from services.collector import pairs_from_point
from shared import bundled
from shared.corpus import Corpus
from shared.messages import MemoryPoint
from shared.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memory" / "sample.memory.jsonl"


def workspace(tmp_path: Path, memory: Path | None, **flags: object) -> Settings:
    if memory is not None:
        (tmp_path / "data" / "memory").mkdir(parents=True)
        lines = memory.read_text(encoding="utf-8").splitlines()[:60]
        (tmp_path / "data" / "memory" / memory.name).write_text("\n".join(lines) + "\n")
    return Settings.load({"workspace": str(tmp_path), "backend": "local", **flags}, env={})


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "multilingual_embed_installed", lambda: True)


@pytest.mark.usefixtures("installed")
def test_chinese_memory_files_pick_the_multilingual_embedder(tmp_path: Path) -> None:
    choice = app.choose_models(workspace(tmp_path, DATA / "kdconv.memory.jsonl"))
    assert choice.settings.embedding_model == bundled.MULTILINGUAL_EMBED_NAMES[0]
    assert "100% of the memory points are Chinese" in choice.reason


@pytest.mark.usefixtures("installed")
def test_english_memory_keeps_the_bundled_english_pair(tmp_path: Path) -> None:
    choice = app.choose_models(workspace(tmp_path, SAMPLE))
    assert choice.settings.embedding_model == bundled.EMBED_NAMES[0]
    assert choice.settings.base_model == bundled.CHAT_NAMES[0]
    assert "0% of the memory points are Chinese" in choice.reason


@pytest.mark.usefixtures("installed")
def test_the_corpus_counts_as_memory_too(tmp_path: Path) -> None:
    settings = workspace(tmp_path, None)
    assert "no memory" in app.choose_models(settings).reason
    rows = (DATA / "kdconv.memory.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    with Corpus.open(settings.corpus_path) as corpus:
        for row in rows:
            point = msgspec.json.decode(row, type=MemoryPoint)
            corpus.upsert_point(point, pairs_from_point(point))
    choice = app.choose_models(settings)
    assert choice.settings.embedding_model == bundled.MULTILINGUAL_EMBED_NAMES[0]


def test_a_named_embedder_is_kept_without_reading_the_memory(tmp_path: Path) -> None:
    settings = workspace(tmp_path, DATA / "kdconv.memory.jsonl", embed_model="all-minilm")
    choice = app.choose_models(settings)
    assert choice.settings is settings and "named by the user" in choice.reason
