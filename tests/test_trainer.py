"""Trainer on the real bus: one run per request id, the skip gates, progress events."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from pathlib import Path
from typing import Any

import pytest

from services import trainer as trainer_service
from services.collector import pairs_from_point
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import (
    MemoryPoint,
    RunRecord,
    TrainingFinished,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    decode,
)
from shared.ollama import OllamaClient
from shared.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
async def test_a_repeated_request_id_starts_no_second_run(
    tmp_path: Path, bus: Bus, ollama_double: Any
) -> None:
    settings = Settings.load(
        {
            "data_dir": str(tmp_path / "data"),
            "watermark": str(tmp_path / "wm.json"),
            "config": str(tmp_path / "models.json"),
            "config_wait_s": 0.5,
            "ollama": ollama_double.url,
        },
        env={},
    )
    lines = (SHARED_DATA / "multiwoz.memory.jsonl").read_text().splitlines()[:300]
    started: list[TrainingStarted] = []
    finished: asyncio.Queue[TrainingFinished] = asyncio.Queue()
    stages: set[str] = set()

    async def on_started(ev: TrainingStarted) -> None:
        started.append(ev)

    async def on_finished(ev: TrainingFinished) -> None:
        await finished.put(ev)

    async def on_progress(ev: TrainingProgress) -> None:
        stages.add(ev.stage)

    await bus.subscribe(subjects.TRAINING_STARTED, TrainingStarted, on_started)
    await bus.subscribe(subjects.TRAINING_COMPLETED, TrainingFinished, on_finished)
    await bus.subscribe(f"{subjects.TRAINING_PROGRESS}.*", TrainingProgress, on_progress)

    with Corpus.open(settings.data_path / "corpus.sqlite3") as corpus:
        for line in lines:
            point = decode(line.encode(), MemoryPoint)
            corpus.upsert_point(point, pairs_from_point(point))
        async with OllamaClient(ollama_double.url) as client:
            embedder = Embedder(client, settings.embedding_model)
            service = await trainer_service.serve(bus, settings, client, embedder, corpus)
            try:
                request = TrainingRequested(request_id="req-1", min_corpus=50)
                await bus.publish(subjects.TRAINING_REQUESTED, request, msg_id="a")
                first = await asyncio.wait_for(finished.get(), 120)
                # the same request again (a new message, so JetStream does not drop it)
                await bus.publish(subjects.TRAINING_REQUESTED, request, msg_id="b")
                await bus.wait_idle(subjects.TRAINER, timeout=30)
            finally:
                await service.stop()

    assert first.request_id == "req-1"
    assert first.status not in ("failed", "skipped"), first.report.get("error")
    assert len(started) == 1
    reports = list(settings.training_path.glob("report_*.json"))
    assert len(reports) == 1
    assert json.loads(reports[0].read_text())["run_id"] == first.run_id
    # progress was announced for every stage a person waits on
    assert {"collect", "filter", "validate_base", "create", "validate_new"} <= stages
    # the run record says what the run decided, for the config updater to check against
    record = await bus.get_record(subjects.RUNS, first.run_id, RunRecord)
    assert record is not None and record.stage == "finished"
    report = first.report
    assert (record.status, record.improved) == (first.status, report["improved"])
    assert (record.base_model, record.new_model) == (report["base_model"], report["new_model"])
    assert (record.base_score, record.new_score) == (
        report["base_score"],
        report["validation_score"],
    )
    assert record.cases == report["held_out_cases"]


async def test_too_small_a_corpus_is_skipped_and_moves_nothing(
    tmp_path: Path, bus: Bus, ollama_double: Any
) -> None:
    settings = Settings.load(
        {
            "data_dir": str(tmp_path / "data"),
            "watermark": str(tmp_path / "wm.json"),
            "ollama": ollama_double.url,
        },
        env={},
    )
    with Corpus.open(settings.data_path / "corpus.sqlite3") as corpus:
        point = MemoryPoint(
            id=1, content="User: hello there friend\nAssistant: Hello! How are you?"
        )
        corpus.upsert_point(point, pairs_from_point(point))
        async with OllamaClient(ollama_double.url) as client:
            t = trainer_service.Trainer(
                bus, settings, client, Embedder(client, settings.embedding_model), corpus
            )
            report = await t.run(TrainingRequested(min_corpus=50))
    assert report.status == "skipped" and "fewer than min_corpus 50" in report.decision_reason
    assert not (tmp_path / "wm.json").exists()
    assert not ollama_double.count("/api/create")


async def test_a_request_with_an_impossible_value_fails_the_run_and_creates_nothing(
    tmp_path: Path, bus: Bus, ollama_double: Any
) -> None:
    settings = Settings.load(
        {
            "data_dir": str(tmp_path / "data"),
            "watermark": str(tmp_path / "wm.json"),
            "ollama": ollama_double.url,
        },
        env={},
    )
    failed: asyncio.Queue[TrainingFinished] = asyncio.Queue()

    async def on_failed(ev: TrainingFinished) -> None:
        await failed.put(ev)

    await bus.subscribe(subjects.TRAINING_FAILED, TrainingFinished, on_failed)
    with Corpus.open(settings.corpus_path) as corpus:
        async with OllamaClient(ollama_double.url) as client:
            t = trainer_service.Trainer(
                bus, settings, client, Embedder(client, settings.embedding_model), corpus
            )
            report = await t.run(TrainingRequested(request_id="bad", min_corpus=-5))
    assert report.status == "failed"
    assert "min_corpus must be >= 1, got -5" in report.error
    announced = await asyncio.wait_for(failed.get(), 5)
    assert announced.request_id == "bad" and announced.run_id == report.run_id
    assert not ollama_double.count("/api/create") and not ollama_double.count("/api/chat")
    assert not (tmp_path / "wm.json").exists()


def _claim_ids(training: str, start: Any, n: int, out: Any) -> None:
    start.wait()
    out.put([trainer_service.claim_run_id(Path(training)) for _ in range(n)])


def test_trainers_in_several_processes_never_share_a_run_id(tmp_path: Path) -> None:
    training = tmp_path / "training"
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_ids, args=(str(training), start, 5, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()  # all at once: most ids fall in one second
    ids = [run_id for _ in procs for run_id in out.get(timeout=60)]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"[0-9]{8}_[0-9]{6}(_[0-9a-f]{4})?", run_id) for run_id in ids)
    # each id is held by its claim file until its run writes the report
    claims = {p.name for p in training.iterdir()}
    assert claims == {subjects.RunNames(run_id).claim_file for run_id in ids}
