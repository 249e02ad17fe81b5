"""The loop over many runs, on a real nats-server and the strict Ollama double: new data is what
arrived, training is cumulative, the live model is the one to beat, every model has a lineage,
losers are deleted and old winners pruned."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services import collector, config_updater
from services.collector import pairs_from_point
from services.lineage import read_file
from services.model_config import list_backups
from services.scoring import normalize_prompt
from services.trainer import Trainer
from shared import subjects
from shared.bus import Bus, BusError
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import MemoryPoint, ModelLineage, RunReport, TrainingRequested, decode
from shared.ollama import OllamaClient
from shared.settings import Settings
from shared.subjects import RunNames
from tests.ollama_double import OllamaDouble

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MULTIWOZ = SHARED_DATA / "multiwoz.memory.jsonl"
BASE = "qwen3:0.6b"
pytestmark = pytest.mark.skipif(not MULTIWOZ.is_file(), reason="../shared/data is not here")


def points(start: int, stop: int) -> list[MemoryPoint]:
    lines = MULTIWOZ.read_text(encoding="utf-8").splitlines()[start:stop]
    return [decode(line.encode(), MemoryPoint) for line in lines]


def pair_count(ps: Sequence[MemoryPoint]) -> int:
    return sum(len(pairs_from_point(p)) for p in ps)


@dataclass
class Loop:
    """A trainer, a collector and a config updater on one bus, one corpus and one config."""

    settings: Settings
    bus: Bus
    double: OllamaDouble
    client: OllamaClient
    corpus: Corpus

    async def add(self, ps: Sequence[MemoryPoint]) -> None:
        """Deliver points the way the app's memory does, and wait until they are stored."""
        for p in ps:
            await self.bus.publish(
                subjects.MEMORY_POINT_CREATED, p, msg_id=subjects.point_msg_id(p)
            )
        await self.bus.wait_idle(subjects.COLLECTOR, timeout=60)

    async def run(self, **changes: Any) -> RunReport:
        """One run; `changes` are settings of this run only (e.g. an impossible min_effect)."""
        s = self.settings.replace(**changes)
        embedder = Embedder(self.client, s.embedding_model)
        return await Trainer(self.bus, s, self.client, embedder, self.corpus).run(
            TrainingRequested()
        )

    def config(self) -> dict[str, Any]:
        return json.loads(self.settings.config_path.read_text())

    def left(self) -> str:
        return self.config()["brain"]["left"]

    async def lineage(self, report: RunReport) -> ModelLineage:
        record = await self.bus.get_record(subjects.MODELS, report.run_id, ModelLineage)
        assert record is not None, report.run_id
        return record


@contextlib.asynccontextmanager
async def loop(
    tmp_path: Path, bus: Bus, double: OllamaDouble, **settings: Any
) -> AsyncIterator[Loop]:
    s = Settings.load(
        {
            "data_dir": str(tmp_path / "data"),
            "watermark": str(tmp_path / "wm.json"),
            "config": str(tmp_path / "models.json"),
            "config_wait_s": 15,
            "ollama": double.url,
            "min_corpus": 100,
            **settings,
        },
        env={},
    )
    s.config_path.write_text(
        json.dumps({"brain": {"left": BASE}, "models": [{"name": BASE, "temperature": 0.7}]})
    )
    with Corpus.open(s.corpus_path) as corpus:
        async with OllamaClient(double.url) as client:
            services = [
                await collector.serve(bus, s, corpus),
                *await config_updater.serve(bus, s, client),
            ]
            try:
                yield Loop(s, bus, double, client, corpus)
            finally:
                for svc in reversed(services):
                    await svc.stop()


def text_of(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def dataset_prompts(report: RunReport) -> set[str]:
    lines = text_of(report.artifacts["dataset"]).splitlines()
    return {
        normalize_prompt(m["content"])
        for line in lines
        for m in json.loads(line)["messages"]
        if m["role"] == "user"
    }


async def test_three_runs_rejected_retried_grown(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble
) -> None:
    first_batch, second_batch = points(0, 150), points(150, 300)
    async with loop(tmp_path, bus, ollama_double) as lp:
        await lp.add(first_batch)

        # 1. rejected: the gate cannot open (an effect beyond the score scale)
        rejected = await lp.run(min_effect=2.0)
        assert rejected.status == "completed_no_improvement", rejected.error
        assert rejected.new_pairs == rejected.total_pairs == pair_count(first_batch)
        assert ollama_double.find(rejected.new_model) is None  # deleted as soon as decided
        record = await lp.lineage(rejected)
        assert record.status == "rejected" and record.decision == rejected.decision_reason
        assert record.model == rejected.new_model and record.points and record.dataset_sha256
        assert record.collected_until is not None
        assert lp.left() == BASE and not lp.settings.watermark_path.exists()
        path = lp.settings.training_path / RunNames(rejected.run_id).lineage_file
        assert read_file(path) == record and stat.S_IMODE(path.stat().st_mode) == 0o600

        # 2. retried: the same pairs count as new again, nothing was lost to the rejection
        retried = await lp.run()
        assert retried.new_pairs == rejected.new_pairs, retried.decision_reason
        assert retried.status == "success", retried.decision_reason or retried.error
        assert retried.incumbent_model is None  # the base is live: it is the only rival
        assert lp.left() == retried.new_model and ollama_double.find(retried.new_model)
        promoted = await lp.lineage(retried)
        assert promoted.status == "promoted" and promoted.promoted_at is not None
        assert lp.settings.watermark_path.exists()  # written for the seed's tools
        assert "newer pair is kept" in retried.selection
        assert "chosen for coverage" in retried.selection

        # nothing new since the promoted model: skipped
        idle = await lp.run()
        assert idle.status == "skipped"
        assert "0 pairs arrived since the last promoted model" in idle.decision_reason

        # 3. grown: the whole corpus trains, the live model is the one to beat
        await lp.add(second_batch)
        grown = await lp.run()
        assert grown.status in ("success", "completed_no_improvement"), grown.error
        assert grown.new_pairs == pair_count(second_batch)
        assert grown.total_pairs == pair_count(first_batch) + pair_count(second_batch)
        old_prompts = {normalize_prompt(p.prompt) for q in first_batch for p in pairs_from_point(q)}
        assert dataset_prompts(grown) & old_prompts  # what the first model learned stays
        assert grown.incumbent_model == retried.new_model
        assert grown.incumbent_score is not None and grown.incumbent_ci_low is not None
        assert all(c.incumbent_answer or c.incumbent_error for c in grown.cases)
        # no held-out case is a prompt the live model has baked in
        baked = {pv.id for pv in promoted.points}
        seen = {
            normalize_prompt(p.prompt)
            for q in first_batch
            if q.id in baked
            for p in pairs_from_point(q)
        }
        assert seen and not {normalize_prompt(c.prompt) for c in grown.cases} & seen
        html = text_of(grown.artifacts["report_html"])
        for model in (BASE, retried.new_model, grown.new_model):
            assert model in html
        if grown.status == "success":
            assert lp.left() == grown.new_model
        else:
            assert lp.left() == retried.new_model and ollama_double.find(grown.new_model) is None


async def test_a_live_model_that_beats_its_challenger_stays(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble
) -> None:
    async with loop(tmp_path, bus, ollama_double) as lp:
        await lp.add(points(0, 150))
        live = await lp.run()  # 50 examples baked in
        assert live.status == "success", live.decision_reason
        await lp.add(points(150, 300))
        before = lp.settings.config_path.read_bytes()
        # a challenger with 2 examples: better than the base, not than the live model
        weak = await lp.run(max_examples=2)
        assert weak.incumbent_model == live.new_model
        assert weak.incumbent_score is not None and weak.validation_score is not None
        assert weak.incumbent_score > weak.validation_score
        assert weak.ci_low is not None and weak.ci_low > 0  # alone against the base it would win
        assert weak.incumbent_ci_low is not None and weak.incumbent_ci_low <= 0
        assert weak.status == "completed_no_improvement" and not weak.improved
        assert "the live model stays" in weak.decision_reason
        assert lp.settings.config_path.read_bytes() == before  # no switch, no backup
        assert len(list_backups(lp.settings.config_path)) == 1
        assert ollama_double.find(weak.new_model) is None
        assert ollama_double.find(live.new_model) is not None
        assert (await lp.lineage(weak)).status == "rejected"


async def test_a_late_arriving_old_point_counts_as_new(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble
) -> None:
    async with loop(tmp_path, bus, ollama_double, min_corpus=60) as lp:
        await lp.add(points(0, 100))
        first = await lp.run()
        assert first.status == "success", first.decision_reason
        # written long ago (a history imported late, a device that synced late), stored now
        long_ago = datetime(2001, 1, 1, tzinfo=UTC)
        late = [
            msgspec.structs.replace(p, created_at=long_ago, updated_at=long_ago)
            for p in points(100, 130)
        ]
        assert first.start_time is not None and all(p.created_at < first.start_time for p in late)
        await lp.add(late)
        second = await lp.run()
        assert second.new_pairs == pair_count(late) >= 60
        assert second.status != "skipped", second.decision_reason


async def test_losers_are_deleted_and_only_the_newest_winners_kept(
    tmp_path: Path, bus: Bus, nats_server: Any, ollama_double: OllamaDouble
) -> None:
    # a gate that lets every challenger no worse than the base through: four promotions
    async with loop(tmp_path, bus, ollama_double, keep_models=2, min_effect=-2.0) as lp:
        await lp.add(points(0, 120))
        promoted: list[RunReport] = []
        for _ in range(4):  # nothing new arrives after the first: the others are forced
            report = await (forced(lp) if promoted else lp.run())
            assert report.status == "success", report.decision_reason
            promoted.append(report)
            await asyncio.sleep(1.1)  # one run id per second
        kept, pruned = promoted[-2:], promoted[:-2]
        for r in kept:
            assert ollama_double.find(r.new_model) is not None
            assert (await lp.lineage(r)).status == "promoted"
        entries = [m["name"] for m in lp.config()["models"]]
        for r in pruned:
            assert ollama_double.find(r.new_model) is None
            assert r.new_model not in entries
            record = await lp.lineage(r)
            assert record.status == "retired" and "newest 2 promoted" in record.retired_reason
        assert entries == [BASE, *(r.new_model for r in kept)]
        assert lp.left() == kept[-1].new_model

        # `mindx models` lists every model with its lineage and marks the live one
        where = ["--nats", nats_server.url, "--config", str(lp.settings.config_path)]
        where += ["--data-dir", str(lp.settings.data_path), "--ollama", ollama_double.url]
        out = await asyncio.to_thread(mindx, "models", "--json", *where)
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert [m["model"] for m in listed] == [r.new_model for r in promoted]
        assert [m["live"] for m in listed] == [False, False, False, True]
        assert [m["status"] for m in listed] == ["retired", "retired", "promoted", "promoted"]
        assert all(m["points"] for m in listed)
        text = await asyncio.to_thread(mindx, "models", *where)
        assert text.returncode == 0 and f"* {kept[-1].new_model}" in text.stdout

        # rollback: to the previous winner, which still exists; not to a pruned one
        backups = list_backups(lp.settings.config_path)  # newest first
        gone = backups[1]  # the config before the third promotion: left = the second model
        assert json.loads(gone.read_text())["brain"]["left"] == pruned[-1].new_model
        refused = await asyncio.to_thread(mindx, "rollback", "--to", gone.name, *where)
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("mindx rollback: ")
        assert "no longer on the backend" in refused.stderr
        assert lp.left() == kept[-1].new_model
        done = await asyncio.to_thread(mindx, "rollback", *where)
        assert done.returncode == 0, done.stderr
        assert lp.left() == kept[0].new_model
        # the backup still had the entries of models pruned since: they do not come back
        entries = {m["name"] for m in lp.config()["models"]}
        assert kept[0].new_model in entries and not entries & {r.new_model for r in pruned}


async def forced(lp: Loop) -> RunReport:
    s = lp.settings
    embedder = Embedder(lp.client, s.embedding_model)
    return await Trainer(lp.bus, s, lp.client, embedder, lp.corpus).run(
        TrainingRequested(force=True)
    )


def mindx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_lineage_is_written_by_the_service_only_and_read_by_an_operator(
    secured_nats: Any,
) -> None:
    service = await secured_nats.connect("service")
    record = ModelLineage(
        run_id="20260101_000000",
        model="mindx-qwen3-0.6b:20260101-000000",
        base_model=BASE,
        mode="message",
        points=[],
    )
    await service.put_record(subjects.MODELS, record.run_id, record)
    operator = await secured_nats.connect("operator")
    assert await operator.list_records(subjects.MODELS, ModelLineage) == {record.run_id: record}
    forged = msgspec.structs.replace(record, status="promoted")
    for role in ("operator", "validator", "memory", "brain", "lora-worker"):
        bus = await secured_nats.connect(role)
        with pytest.raises(BusError):
            await bus.put_record(subjects.MODELS, record.run_id, forged)
    assert await service.get_record(subjects.MODELS, record.run_id, ModelLineage) == record


def test_mindx_models_on_the_embedded_server_marks_the_live_model(
    tmp_path: Path, ollama_double: OllamaDouble
) -> None:
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    lines = MULTIWOZ.read_text(encoding="utf-8").splitlines()[:150]
    (ws / "data" / "memory" / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    where = ["--workspace", str(ws), "--watermark", "wm.json", "--ollama", ollama_double.url]
    assert mindx("models", "--json", *where).stdout.strip() == "[]"  # none yet, no bucket
    run = mindx("train", "--run-once", "--json", "--init-config", *where)
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["status"] == "success", run.stderr
    listed = json.loads(mindx("models", "--json", *where).stdout)
    assert [(m["model"], m["live"], m["status"]) for m in listed] == [
        (report["new_model"], True, "promoted")
    ]
    lineage = read_file(ws / "data" / "training" / RunNames(report["run_id"]).lineage_file)
    assert lineage.status == "promoted" and lineage.model == report["new_model"]


async def test_a_winner_no_updater_confirmed_says_so_until_one_applies_it(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble
) -> None:
    s = Settings.load(
        {
            "data_dir": str(tmp_path / "data"),
            "watermark": str(tmp_path / "wm.json"),
            "config": str(tmp_path / "models.json"),
            "config_wait_s": 1,
            "ollama": ollama_double.url,
            "min_corpus": 100,
        },
        env={},
    )
    s.config_path.write_text(json.dumps({"brain": {"left": BASE}, "models": []}))
    with Corpus.open(s.corpus_path) as corpus:
        async with OllamaClient(ollama_double.url) as client:
            stored = await collector.serve(bus, s, corpus)
            lp = Loop(s, bus, ollama_double, client, corpus)
            try:
                await lp.add(points(0, 150))
                report = await lp.run()  # no config updater is running
            finally:
                await stored.stop()
            assert report.status == "success_config_failed", report.error
            assert "no config updater answered" in report.error
            record = await lp.lineage(report)
            assert record.status == "unconfirmed" and ollama_double.find(report.new_model)
            assert read_file(s.training_path / RunNames(report.run_id).lineage_file) == record
            # an updater comes up: it applies the waiting model.validated, and says promoted
            updaters = await config_updater.serve(bus, s, client)
            try:
                await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=30)
            finally:
                for svc in updaters:
                    await svc.stop()
            assert lp.left() == report.new_model
            assert (await lp.lineage(report)).status == "promoted"
