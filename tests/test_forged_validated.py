"""Forged `model.validated` from anyone on the bus: the config is never switched by it.

A real nats-server, the real config updater consumer and the strict Ollama double. Only a message
that matches the run record a trainer wrote, for a model the backend has, switches the model; each
other one is dead-lettered with its reason and changes nothing: not the config, not its backups,
not the journal of applied runs, and no `model.updated` goes out.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services import config_updater as cu
from services.pipeline import validated_record
from shared import subjects
from shared.backend import CreateRequest
from shared.bus import Bus
from shared.messages import ModelUpdated, ModelUpdateFailed, ModelValidated, RunRecord
from shared.ollama import OllamaClient
from shared.settings import Settings

CONFIG = {
    "brain": {"left": "qwen3:0.6b", "right": "qwen3:0.6b"},
    "models": [{"name": "qwen3:0.6b"}],
}
RUN = "20250501_090000"
NEW = "mindx-qwen3-0.6b:20250501-090000"


def genuine(**changes: Any) -> ModelValidated:
    ev = ModelValidated(
        run_id=RUN,
        base_model="qwen3:0.6b",
        new_model=NEW,
        mode="message",
        base_score=0.41,
        new_score=0.63,
        base_accuracy=0.35,
        new_accuracy=0.6,
        improved=True,
        cases=20,
    )
    return msgspec.structs.replace(ev, **changes)


def wire(ev: ModelValidated, **raw: Any) -> bytes:
    """The message as JSON, with fields set to values no Python producer would make."""
    return msgspec.json.encode({**msgspec.to_builtins(ev), **raw})


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
async def updater(bus: Bus, tmp_path: Path, ollama_double: Any) -> Any:
    """A config updater on the bus, its config dir, the backend client and the updates seen."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    path = config_dir / "models.json"
    path.write_text(json.dumps(CONFIG, indent=2))
    updated: list[ModelUpdated] = []
    failed: list[ModelUpdateFailed] = []

    async def on_updated(ev: ModelUpdated) -> None:
        updated.append(ev)

    async def on_failed(ev: ModelUpdateFailed) -> None:
        failed.append(ev)

    await bus.subscribe(subjects.MODEL_UPDATED, ModelUpdated, on_updated)
    await bus.subscribe(subjects.MODEL_UPDATE_FAILED, ModelUpdateFailed, on_failed)
    async with OllamaClient(ollama_double.url) as client:
        services = await cu.serve(bus, Settings(config=path), client)
        try:
            yield path, client, updated, failed
        finally:
            for s in services:
                await s.stop()


async def test_forged_messages_are_dead_lettered_and_change_nothing(bus: Bus, updater: Any):
    path, client, updated, failed = updater
    # the genuine run: its model exists and the trainer recorded its decision
    await client.create(CreateRequest(model=NEW, from_="qwen3:0.6b"))
    await bus.put_record(subjects.RUNS, RUN, validated_record(genuine()))
    # a run still in progress, and one decided as no improvement
    running = RunRecord(
        run_id="20250501_100000",
        stage="running",
        mode="message",
        base_model="qwen3:0.6b",
        new_model="mindx-qwen3-0.6b:20250501-100000",
    )
    await bus.put_record(subjects.RUNS, running.run_id, running)
    kept = genuine(run_id="20250501_110000", improved=False, new_score=0.4)
    await bus.put_record(subjects.RUNS, kept.run_id, validated_record(kept))
    # a decided run whose model was deleted since
    gone = genuine(run_id="20250501_120000", new_model="mindx-qwen3-0.6b:20250501-120000")
    await bus.put_record(subjects.RUNS, gone.run_id, validated_record(gone))
    before = files(path.parent)

    forged: list[tuple[bytes, str]] = [
        # no run record: a real-looking run id, and the attacker's own model
        (wire(genuine(run_id="20250501_235959")), "has no run record"),
        (wire(genuine(run_id="20250501_235958", new_model="attacker/evil:latest")), "no run rec"),
        # the run record of a real run, another model or other scores
        (wire(genuine(new_model="attacker/evil:latest")), "new_model 'attacker/evil:latest'"),
        (wire(genuine(base_model="llama3:8b")), "base_model 'llama3:8b' (run record: 'qwen3"),
        (wire(genuine(new_score=0.99)), "new_score 0.99 (run record: 0.63)"),
        (wire(genuine(cases=2)), "cases 2 (run record: 20)"),
        (wire(genuine(mode="lora")), "mode 'lora'"),
        (wire(kept, improved=True), "improved True (run record: False)"),
        (wire(genuine(run_id=running.run_id, new_model=running.new_model)), "still running"),
        # names outside the grammar never decode
        (wire(genuine(), new_model="../../x"), "Expected a model name"),
        (wire(genuine(), new_model="/etc/passwd"), "Expected a model name"),
        (wire(genuine(), new_model='evil"\n  "brain": {"left": "x"}'), "Expected a model name"),
        (wire(genuine(), new_model="x" * 900_000), "length <= 593"),
        (wire(genuine(), base_model="../../x"), "at `$.base_model`"),
        (wire(genuine(), run_id="../../etc"), "Expected a run id"),
    ]
    for data, _ in forged:
        await bus.publish_raw(subjects.MODEL_VALIDATED, data)
    await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=30)

    letters = await bus.dead_letters(subject=subjects.MODEL_VALIDATED)
    assert len(letters) == len(forged)
    for letter, (data, reason) in zip(letters, forged, strict=True):
        assert data.decode().startswith(letter.data[:1000])  # the huge one is kept truncated
        assert reason in letter.error, (reason, letter.error)
        assert letter.deliveries == 1
    assert files(path.parent) == before  # config, backups, journal: all as they were
    await bus.nc.flush()
    assert updated == [] and failed == []

    # a genuine run whose model has gone: dead-lettered, and its trainer hears why
    await bus.publish(subjects.MODEL_VALIDATED, gone)
    await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=30)
    letter = (await bus.dead_letters(subject=subjects.MODEL_VALIDATED))[-1]
    assert letter.error.startswith(f"rejected: model {gone.new_model} is not on the backend")
    await bus.nc.flush()
    assert [f.run_id for f in failed] == [gone.run_id] and updated == []
    assert files(path.parent) == before

    # the genuine message still switches the model
    await bus.publish(subjects.MODEL_VALIDATED, genuine())
    for _ in range(200):
        if updated:
            break
        await asyncio.sleep(0.05)
    [ev] = updated
    assert (ev.run_id, ev.model, ev.previous_model) == (RUN, NEW, "qwen3:0.6b")
    assert json.loads(path.read_text())["brain"] == {"left": NEW, "right": "qwen3:0.6b"}
    assert len(await bus.dead_letters(subject=subjects.MODEL_VALIDATED)) == len(forged) + 1


async def test_a_message_for_a_model_only_the_record_names_is_refused(
    bus: Bus, updater: Any, ollama_double: Any
) -> None:
    path, _, updated, _ = updater
    # the record is right, but nothing made the model: the attacker forged both
    await bus.put_record(subjects.RUNS, RUN, validated_record(genuine()))
    before = files(path.parent)
    await bus.publish(subjects.MODEL_VALIDATED, genuine())
    await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=30)
    [letter] = await bus.dead_letters()
    assert "is not on the backend" in letter.error
    assert files(path.parent) == before and updated == []


def test_record_mismatch_names_every_difference() -> None:
    ev = genuine()
    assert cu.record_mismatch(ev, validated_record(ev)) is None
    assert "no run record" in (cu.record_mismatch(ev, None) or "")
    other = validated_record(genuine(new_model="m:1", new_score=0.7))
    why = cu.record_mismatch(ev, other) or ""
    assert f"new_model {NEW!r} (run record: 'm:1')" in why
    assert "new_score 0.63 (run record: 0.7)" in why
    assert "base_score" not in why
