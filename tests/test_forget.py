"""The right to be forgotten, on a real nats-server and the strict Ollama double: a point baked
into the live model is deleted, and afterwards no byte of its text is left under the data dir,
in the NATS store or in any model of the backend; forged deletions change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services import config_updater, forget, trainer
from services.collector import pairs_from_point
from services.forget import Forgetter
from services.trainer import Trainer
from shared import subjects
from shared.bus import Bus
from shared.bus_errors import ObjectNotFoundError
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import (
    MemoryPoint,
    MemoryPointDeleted,
    ModelLineage,
    ModelUpdated,
    RunReport,
    TrainingRequested,
    ValidationCase,
    encode,
)
from shared.nats_server import EmbeddedNats
from shared.subjects import RunNames
from tests import traces
from tests.ollama_double import Fault, OllamaDouble
from tests.test_loop import BASE, MULTIWOZ, Loop, loop, mindx, points
from tests.traces import holders

pytestmark = pytest.mark.skipif(
    not Path(__file__).resolve().parents[2].joinpath("shared", "data").is_dir(),
    reason="../shared/data is not here",
)


def models_holding(double: OllamaDouble, text: str) -> list[str]:
    with double.lock:
        return [
            m.name
            for m in double.models.values()
            if any(text in str(msg.get("content", "")) for msg in m.messages) or text in m.system
        ]


def distinctive(point: MemoryPoint, others: list[MemoryPoint]) -> str:
    line = traces.distinctive(point, others, min_len=30)
    assert line is not None, f"point {point.id} has no distinctive text"
    return line


def distinctive_of(text: str, point: MemoryPoint, others: list[MemoryPoint]) -> str | None:
    """The longest line of `text` (at least 30 characters) that no other point holds."""
    for line in sorted((x.strip() for x in text.splitlines()), key=len, reverse=True):
        if len(line) >= 30 and not any(line in o.content for o in others if o.id != point.id):
            return line
    return None


@dataclass
class World:
    lp: Loop
    forgetter: Forgetter
    server: EmbeddedNats


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path, bus: Bus, double: OllamaDouble, server: EmbeddedNats
) -> AsyncIterator[World]:
    async with loop(tmp_path, bus, double) as lp:
        s = lp.settings
        updater = config_updater.updater_for(bus, s, lp.client)
        forgetter = Forgetter(bus, s, lp.corpus, lp.client, updater)
        services = [
            await forget.serve(bus, s, lp.corpus, lp.client, updater),
            await trainer.serve(
                bus, s, lp.client, Embedder(lp.client, s.embedding_model), lp.corpus
            ),
        ]
        try:
            yield World(lp, forgetter, server)
        finally:
            for svc in reversed(services):
                await svc.stop()


async def promote_and_pick(
    lp: Loop, batch: list[MemoryPoint]
) -> tuple[RunReport, ModelLineage, MemoryPoint]:
    """Memory `batch`, one run that must be promoted, its model's lineage, and the first point
    that model holds."""
    await lp.add(batch)
    report = await lp.run()
    assert report.status == "success", report.decision_reason or report.error
    baked = await lp.lineage(report)
    return report, baked, next(p for p in batch if p.id == baked.points[0].id)


async def test_a_baked_point_leaves_no_trace(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    batch = points(0, 150)
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        lp = w.lp
        report, baked, victim = await promote_and_pick(lp, batch)
        live = report.new_model
        assert lp.left() == live
        by_id = {p.id: p for p in batch}
        text = distinctive(victim, batch)
        needle = text.encode("utf-8")
        data_dir, store = lp.settings.data_path, nats_server.store_dir
        # the scan can fail: before the deletion the text is everywhere
        before = holders(needle, data_dir, store)
        assert any("train_data_" in h for h in before), before
        assert any(h.endswith(".blk") for h in before), before
        assert models_holding(ollama_double, text) == [live]
        points_before = lp.corpus.stats()["points"]

        updates: list[ModelUpdated] = []

        async def seen(ev: ModelUpdated) -> None:
            updates.append(ev)

        watcher = await bus.subscribe(subjects.MODEL_UPDATED, ModelUpdated, seen)
        try:
            await delete(bus, encode(_deleted(victim.id)))
            await bus.wait_idle(subjects.TRAINER, timeout=120)  # the retrain without the point
        finally:
            await watcher.stop()

        # switched away at once, announced, and the retired model is gone
        assert lp.corpus.stats()["points"] == points_before - 1
        assert lp.corpus.point_with_pairs(victim.id) == (None, [])
        switch = next(u for u in updates if u.reason)
        assert switch.previous_model == live and switch.model == BASE
        assert f"memory point {victim.id}" in switch.reason
        assert lp.left() != live and ollama_double.find(live) is None
        assert live not in json.dumps(lp.config()["models"])
        record = await bus.get_record(subjects.MODELS, report.run_id, ModelLineage)
        assert record is not None and record.status == "retired"
        assert f"memory point {victim.id}" in record.retired_reason
        # the retrain ran without the point
        retrains = [
            x
            for x in await _lineages(bus)
            if x.run_id != report.run_id and x.created_at > record.created_at
        ]
        assert retrains and all(victim.id not in {pv.id for pv in x.points} for x in retrains)

        # no trace: files of the data dir and of the NATS store, models of the backend
        assert holders(needle, data_dir, store) == []
        assert models_holding(ollama_double, text) == []
        # the rest of memory is still there
        other = by_id[baked.points[1].id] if len(baked.points) > 1 else batch[-1]
        assert lp.corpus.point_with_pairs(other.id)[0] is not None

        # a late copy of the deleted version stays out; a version after the deletion is new
        await bus.publish(subjects.MEMORY_POINT_CREATED, victim)  # no message id: not deduplicated
        await bus.wait_idle(subjects.COLLECTOR, timeout=60)
        assert lp.corpus.point_with_pairs(victim.id)[0] is None
        assert holders(needle, data_dir, store) == []  # erased from the stream too
        again = await w.forgetter.forget(victim.id)  # forgotten already: nothing holds it
        assert not again.found

        # a held-out case: in the run's report, its HTML page and its training.completed
        case = next(
            (c, p)
            for c in report.cases
            for p in batch
            if p.id != victim.id
            and any((q.prompt, q.completion) == (c.prompt, c.expected) for q in pairs_from_point(p))
            and distinctive_of(c.expected, p, batch)
        )
        held_out, line = case[1], distinctive_of(case[0].expected, case[1], batch)
        assert line is not None
        needle = line.encode("utf-8")
        before = holders(needle, data_dir, store)
        assert any(h.endswith(f"report_{report.run_id}.json") for h in before), before
        assert any("TRAINING" in h for h in before), before
        forgotten = await w.forgetter.forget(held_out.id)
        assert forgotten.events_erased >= 1
        assert holders(needle, data_dir, store) == []
        rewritten = json.loads(
            (lp.settings.training_path / f"report_{report.run_id}.json").read_text()
        )
        assert 0 < len(rewritten["cases"]) < len(report.cases)  # only that case went


async def test_forged_deletions_are_dead_lettered_or_change_nothing(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    batch = points(0, 60)
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        lp = w.lp
        await lp.add(batch)
        stats, config = lp.corpus.stats(), lp.config()
        forged = [
            b'{"id": "12"}',  # not an integer
            b'{"id": 1e400}',
            b'{"id": 99999999999999999999999}',  # beyond SQLite's range
            b'{"id": [1, 2]}',
            b"not json",
            b"{}",  # no id
            json.dumps({"id": None, "pad": "x" * 500_000}).encode(),  # large
        ]
        for data in forged:
            await bus.publish_raw(subjects.MEMORY_POINT_DELETED, data)
        await delete(bus, encode(_deleted(10**15)))  # nobody's id

        letters = await bus.dead_letters(subject=subjects.MEMORY_POINT_DELETED)
        assert len(letters) == len(forged), [x.error for x in letters]
        assert all(x.error for x in letters)
        assert lp.corpus.stats() == stats and lp.config() == config
        assert not lp.corpus.forgotten(10**15)  # an unknown id leaves no tombstone
        assert all(lp.corpus.point_with_pairs(p.id)[0] is not None for p in batch)


async def delete(bus: Bus, data: bytes) -> None:
    """Publish a deletion and wait until the forgetter has acked it (and all before it)."""
    ack = await bus.js.publish(subjects.MEMORY_POINT_DELETED, data)
    async with asyncio.timeout(60):
        while True:
            info = await bus.js.consumer_info(subjects.FORGETTER.stream, subjects.FORGETTER.durable)
            if info.ack_floor.stream_seq >= ack.seq:
                return
            await asyncio.sleep(0.02)


def _deleted(point_id: int) -> MemoryPointDeleted:
    return MemoryPointDeleted(id=point_id)


async def _lineages(bus: Bus) -> list[ModelLineage]:
    return list((await bus.list_records(subjects.MODELS, ModelLineage)).values())


def test_mindx_forget_on_the_embedded_server(tmp_path: Path, ollama_double: OllamaDouble) -> None:
    """The operator's command: as the operator role it publishes, as the service it forgets."""
    ws = tmp_path / "ws"
    memory = ws / "data" / "memory"
    memory.mkdir(parents=True)
    batch = points(0, 150)
    (memory / "m.jsonl").write_text(
        "\n".join(MULTIWOZ.read_text(encoding="utf-8").splitlines()[:150]) + "\n",
        encoding="utf-8",
    )
    where = ["--workspace", str(ws), "--watermark", "wm.json", "--ollama", ollama_double.url]
    run = mindx("train", "--run-once", "--json", "--init-config", *where)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    lineage = json.loads(mindx("models", "--json", *where).stdout)[0]
    victim = next(p for p in batch if p.id == lineage["points"][0][0])
    needle = distinctive(victim, batch).encode("utf-8")
    mine = [ws / "data" / "training", ws / "data" / "nats", ws / "data" / "corpus.sqlite3"]
    assert holders(needle, *[p.parent if p.is_file() else p for p in mine])

    bad = mindx("forget", "12x", *where)
    assert bad.returncode == 2 and "not an integer id" in bad.stderr
    done = mindx("forget", str(victim.id), *where)
    assert done.returncode == 0, done.stderr
    assert f"forgot memory point(s) {victim.id} in " in done.stdout
    config = json.loads((ws / "config" / "models.json").read_text())
    assert config["brain"]["left"] == BASE != report["new_model"]
    assert ollama_double.find(report["new_model"]) is None
    stats = json.loads(mindx("corpus", "stats", "--json", *where).stdout)
    assert stats["points"] == 149
    # Memory's own export under data/memory is the app's input, not mindx's: left as it is
    scanned = [p for p in (ws / "data").iterdir() if p.name != "memory"]
    assert holders(needle, *[p for p in scanned if p.is_dir()]) == []
    assert all(needle not in p.read_bytes() for p in scanned if p.is_file())


async def test_a_runs_objects_are_erased_byte_for_byte(
    tmp_path: Path, bus: Bus, nats_server: EmbeddedNats
) -> None:
    """A LoRA run's dataset and artifacts travel through the object store: erased, the text is
    gone from the store's files; another run's objects stay."""
    secret = "Ingrid's flat is at 12 Quarry Lane, third floor"
    dataset = tmp_path / "train_data.jsonl"
    dataset.write_text(json.dumps({"c": secret}) * 2000)  # several chunks
    other = tmp_path / "other.jsonl"
    other.write_text("nothing personal")
    await bus.put_object("20261129_000001/train_data.jsonl", dataset)
    await bus.put_object("20261129_000001/adapter.gguf", other)
    await bus.put_object("20261129_000002/train_data.jsonl", other)
    assert holders(secret.encode(), nats_server.store_dir)  # the scan can fail
    erased = await bus.erase_objects("20261129_000001/")
    assert erased == ["20261129_000001/adapter.gguf", "20261129_000001/train_data.jsonl"]
    assert holders(secret.encode(), nats_server.store_dir) == []
    with pytest.raises(ObjectNotFoundError):
        await bus.get_object("20261129_000001/train_data.jsonl", tmp_path / "back")
    kept = await bus.get_object("20261129_000002/train_data.jsonl", tmp_path / "kept")
    assert kept.read_text() == "nothing personal"


async def test_a_local_lora_workers_run_dirs_of_affected_runs_go(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        work = w.lp.settings.lora_work_path
        for name in ("20261129_000001", "20261129_000002", "notarun"):
            (work / name).mkdir(parents=True)
            (work / name / "train_data.jsonl").write_text("{}")
        gone = w.forgetter._drop_worker_runs({"20261129_000001", "../data", "notarun"})
        assert gone == [str((work / "20261129_000001").resolve())]
        assert sorted(p.name for p in work.iterdir()) == ["20261129_000002", "notarun"]


class ForgetsOnCreate:
    """A backend that has a point forgotten while the run creates its model."""

    def __init__(self, inner: Any, corpus: Corpus, point_id: int) -> None:
        self.inner, self.corpus, self.point_id = inner, corpus, point_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        done = await self.inner.create(*args, **kwargs)
        self.corpus.forget(self.point_id, datetime.now(UTC))
        return done


async def test_a_point_forgotten_during_a_run_fails_it_and_leaves_nothing(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    batch = points(0, 150)
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        lp = w.lp
        await lp.add(batch)
        s = lp.settings
        backend = ForgetsOnCreate(lp.client, lp.corpus, batch[1].id)
        embedder = Embedder(lp.client, s.embedding_model)
        report = await Trainer(bus, s, backend, embedder, lp.corpus).run(TrainingRequested())
        assert report.status == "failed"
        assert f"memory point(s) {batch[1].id} were forgotten during the run" in report.error
        names = RunNames(report.run_id)
        assert not (s.training_path / names.dataset_file).exists()
        assert not (s.training_path / names.modelfile_file).exists()
        assert ollama_double.find(report.new_model) is None and lp.left() == BASE
        record = await bus.get_record(subjects.MODELS, report.run_id, ModelLineage)
        assert record is not None and record.status == "rejected"


async def test_a_deletion_that_fails_halfway_is_finished_by_its_redelivery(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    batch = points(0, 150)
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        lp = w.lp
        report, _, victim = await promote_and_pick(lp, batch)
        needle = distinctive(victim, batch).encode("utf-8")
        # the config is switched, then the backend refuses the delete: the handler fails after
        # the switch, before the files, the streams and the corpus
        ollama_double.faults.add("/api/delete", Fault.error(400, "refused"), times=1)
        await delete(bus, encode(_deleted(victim.id)))
        assert ollama_double.faults.pending("/api/delete") == 0  # the first try did fail
        assert lp.left() == BASE and ollama_double.find(report.new_model) is None
        assert holders(needle, lp.settings.data_path, nats_server.store_dir) == []
        assert lp.corpus.point_with_pairs(victim.id) == (None, [])
        assert await bus.dead_letters(subject=subjects.MEMORY_POINT_DELETED) == []
        # the redelivery, which found the base live already, still asked for the retrain
        requested = await bus.find_messages(
            "TRAINING", subjects.TRAINING_REQUESTED, lambda _s, d: b"forget-" in d
        )
        assert len(requested) == 1


async def test_the_cases_of_a_run_in_progress_that_hold_the_point_are_erased(
    tmp_path: Path, bus: Bus, ollama_double: OllamaDouble, nats_server: EmbeddedNats
) -> None:
    batch = points(0, 40)
    async with world(tmp_path, bus, ollama_double, nats_server) as w:
        await w.lp.add(batch)
        victim = next(p for p in batch if pairs_from_point(p))
        line = distinctive(victim, batch)
        pair = next(q for q in pairs_from_point(victim) if line in q.prompt + q.completion)
        names = RunNames("20261129_000009")
        for i, (prompt, expected) in enumerate(
            [(pair.prompt, pair.completion), ("where is the station?", "north of here")]
        ):
            case = ValidationCase(
                run_id=names.run_id, case_id=i, model=BASE, prompt=prompt, expected=expected
            )
            await bus.publish(names.case_subject, case)
        needle = line.encode("utf-8")
        assert holders(needle, nats_server.store_dir)  # the scan can fail
        done = await w.forgetter.forget(victim.id)
        assert done.events_erased == 1
        left = await bus.find_messages(subjects.VALIDATOR.stream, ">", lambda _s, _d: True)
        assert [b"north of here" in data for _, data in left] == [True]
        assert holders(needle, nats_server.store_dir, w.lp.settings.data_path) == []
