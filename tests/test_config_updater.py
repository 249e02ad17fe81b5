"""ConfigUpdater: pure update, files (backup, atomic write, prune, rollback), handlers, bus."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from services import config_updater as cu
from services.config_updater import ConfigUpdater
from services.model_config import (
    BackupNotFound,
    ConfigError,
    apply_left_model,
    backup_config,
    list_backups,
    prune_backups,
    render_config,
    rollback,
    write_config,
)
from services.pipeline import validated_record
from shared import subjects
from shared.backend import CreateRequest
from shared.messages import ModelUpdated, ModelUpdateFailed, ModelValidated, RollbackRequested
from shared.ollama import OllamaClient

# A config with keys in an order no sorter would produce, nested values and non-ASCII text.
APP_CONFIG = {
    "version": 3,
    "ui": {"theme": "dark", "语言": "中文"},
    "brain": {"right": "llama3:8b", "left": "qwen3:0.6b", "fallback": None},
    "models": [
        {"name": "llama3:8b", "base_url": "http://127.0.0.1:11434", "temperature": 0.7},
        {
            "name": "qwen3:0.6b",
            "base_url": "http://127.0.0.1:11434",
            "temperature": 0.2,
            "max_tokens": 2048,
            "tags": ["local", "small"],
        },
    ],
    "zeta": [1, 2.5, "x"],
    "alpha": {"nested": {"deep": True}},
}


RUN_1 = "20250401_120001"


def validated(run_id: str = RUN_1, new: str = "mindx-left-1", improved: bool = True):
    return ModelValidated(
        run_id=run_id,
        base_model="qwen3:0.6b",
        new_model=new,
        mode="message",
        base_score=0.4,
        new_score=0.6 if improved else 0.3,
        base_accuracy=0.4,
        new_accuracy=0.6 if improved else 0.3,
        improved=improved,
        cases=20,
    )


def keys_everywhere(node: object, path: str = "$") -> list[tuple[str, list[str]]]:
    """(path, key order) for every object in a JSON value."""
    out: list[tuple[str, list[str]]] = []
    if isinstance(node, dict):
        out.append((path, list(node)))
        for k, v in node.items():
            out += keys_everywhere(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += keys_everywhere(v, f"{path}[{i}]")
    return out


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "models.json"
    path.parent.mkdir()
    path.write_text(render_config(APP_CONFIG), encoding="utf-8")
    return path


class Recorder:
    """The publishing port, recording what goes out."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, msgspec.Struct, str | None]] = []
        self.fail_next: BaseException | None = None

    async def publish(self, subject: str, payload: msgspec.Struct, *, msg_id: str | None = None):
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.sent.append((subject, payload, msg_id))

    def on(self, subject: str) -> list:
        return [p for s, p, _ in self.sent if s == subject]


def text(p: Path | str) -> str:
    return Path(p).read_text(encoding="utf-8")


def raw(p: Path) -> bytes:
    return p.read_bytes()


def put(p: Path, content: str) -> None:
    p.write_text(content, encoding="utf-8")


class Crash(BaseException):
    """Stands for the process dying: nothing in the handler may catch it."""


# --- pure ---------------------------------------------------------------------------------------


def test_apply_sets_left_and_copies_base_entry():
    out, previous = apply_left_model(APP_CONFIG, new_model="mindx-left-1", base_model="qwen3:0.6b")
    assert previous == "qwen3:0.6b"
    assert out["brain"] == {"right": "llama3:8b", "left": "mindx-left-1", "fallback": None}
    assert [m["name"] for m in out["models"]] == ["llama3:8b", "qwen3:0.6b", "mindx-left-1"]
    new_entry = out["models"][2]
    assert list(new_entry) == list(APP_CONFIG["models"][1])  # same fields, same order
    assert new_entry == {**APP_CONFIG["models"][1], "name": "mindx-left-1"}
    assert APP_CONFIG["brain"]["left"] == "qwen3:0.6b"  # input not modified
    assert len(APP_CONFIG["models"]) == 2


def test_apply_changes_only_the_left_line_and_appends_the_entry():
    before = render_config(APP_CONFIG)
    out, _ = apply_left_model(APP_CONFIG, new_model="mindx-left-1", base_model="qwen3:0.6b")
    after = render_config(out)
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    removed = [d[2:] for d in diff if d.startswith("- ") and d[2:].strip() not in ("}", "},")]
    assert removed == ['    "left": "qwen3:0.6b",']
    assert '    "left": "mindx-left-1",' in after.splitlines()
    # taking the two changes back gives the original text byte for byte
    undone = json.loads(after)
    undone["brain"]["left"] = "qwen3:0.6b"
    assert undone["models"].pop()["name"] == "mindx-left-1"
    assert render_config(undone) == before
    # every object keeps its keys in the same order; the new entry is the only new object
    old_keys = keys_everywhere(APP_CONFIG)
    new_keys = [k for k in keys_everywhere(out) if not k[0].startswith("$.models[2]")]
    assert new_keys == old_keys


def test_apply_replaces_an_existing_entry_in_place():
    cfg = json.loads(json.dumps(APP_CONFIG))
    cfg["models"].insert(1, {"name": "mindx-left-1", "temperature": 9.9, "stale": True})
    out, _ = apply_left_model(cfg, new_model="mindx-left-1", base_model="qwen3:0.6b")
    names = [m["name"] for m in out["models"]]
    assert names == ["llama3:8b", "mindx-left-1", "qwen3:0.6b"]
    assert out["models"][1] == {**APP_CONFIG["models"][1], "name": "mindx-left-1"}


def test_apply_without_base_entry_inherits_from_previous_left():
    cfg = {
        "brain": {"left": "old-left"},
        "models": [
            {"name": "old-left", "base_url": "http://gpu:11434", "max_tokens": 512, "x": 1},
        ],
    }
    out, previous = apply_left_model(cfg, new_model="new", base_model="not-listed")
    assert previous == "old-left"
    assert out["models"][-1] == {"name": "new", "base_url": "http://gpu:11434", "max_tokens": 512}
    out2, _ = apply_left_model({"brain": {}}, new_model="new", base_model="b")
    assert out2 == {"brain": {"left": "new"}, "models": [{"name": "new"}]}


def test_apply_follows_a_configured_key_path():
    cfg = {"app": {"title": "x"}, "models": []}
    out, previous = apply_left_model(
        cfg, new_model="m2", base_model="b", key_path="app.brains.left_model"
    )
    assert previous is None
    assert out["app"] == {"title": "x", "brains": {"left_model": "m2"}}
    assert list(out) == ["app", "models"]


@pytest.mark.parametrize(
    ("cfg", "key", "needle"),
    [
        ({"brain": "flat"}, "brain.left", "'brain'"),
        ({"brain": {"left": 3}}, "brain.left", "'brain.left'"),
        ({"brain": {}, "models": {"a": 1}}, "brain.left", "'models'"),
        ({}, "brain..left", "key path"),
    ],
)
def test_apply_rejects_configs_of_the_wrong_shape(cfg, key, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_left_model(cfg, new_model="m", base_model="b", key_path=key)


# --- files --------------------------------------------------------------------------------------


def test_backup_holds_the_previous_bytes_and_is_never_overwritten(config_file: Path):
    at = datetime(2025, 4, 1, 12, 30, 5)
    original = config_file.read_bytes()
    first = backup_config(config_file, at=at)
    assert first.name == "models.json.backup.20250401_123005"
    assert first.read_bytes() == original
    config_file.write_text('{"brain": {"left": "second"}}')
    second = backup_config(config_file, at=at)  # same second
    third = backup_config(config_file, at=at)
    assert (second.name, third.name) == (f"{first.name}.2", f"{first.name}.3")
    assert first.read_bytes() == original
    assert second.read_bytes() == b'{"brain": {"left": "second"}}'
    assert list_backups(config_file) == [third, second, first]
    assert not [p for p in config_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_list_backups_ignores_other_files(config_file: Path):
    b = backup_config(config_file, at=datetime(2025, 1, 1))
    for name in ("models.json.backup.junk", "other.json.backup.20250101_000000", "models.json.bak"):
        (config_file.parent / name).write_text("{}")
    assert list_backups(config_file) == [b]


def test_write_config_is_utf8_indented_and_keeps_the_mode(config_file: Path):
    config_file.chmod(0o640)
    write_config(config_file, {"b": "语言", "a": 1})
    assert config_file.read_text(encoding="utf-8") == '{\n  "b": "语言",\n  "a": 1\n}\n'
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o640
    fresh = config_file.parent / "new" / "models.json"
    write_config(fresh, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert sorted(p.name for p in config_file.parent.iterdir()) == ["models.json", "new"]


def test_write_config_through_a_symlink_keeps_the_link(config_file: Path, tmp_path: Path):
    link = tmp_path / "link.json"
    link.symlink_to(config_file)
    write_config(link, {"x": 1})
    assert link.is_symlink()
    assert json.loads(config_file.read_text()) == {"x": 1}


def test_a_crash_during_the_rename_leaves_the_old_config(config_file: Path, monkeypatch):
    original = config_file.read_bytes()

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_config(config_file, {"brain": {"left": "x"}})
    assert config_file.read_bytes() == original
    assert [p.name for p in config_file.parent.iterdir()] == ["models.json"]


def test_prune_keeps_the_ten_newest(config_file: Path):
    start = datetime(2025, 4, 1, 8, 0, 0)
    made = [backup_config(config_file, at=start + timedelta(minutes=i)) for i in range(13)]
    made.append(backup_config(config_file, at=start + timedelta(minutes=12)))  # ".2", newest
    removed = prune_backups(config_file, keep=10)
    assert sorted(removed) == sorted(made[:4])
    assert list_backups(config_file) == [made[13], *reversed(made[4:13])]
    with pytest.raises(ValueError, match="keep"):
        prune_backups(config_file, keep=0)


def test_rollback_latest_restores_it_and_can_itself_be_undone(config_file: Path):
    old = config_file.read_bytes()
    backup_config(config_file, at=datetime(2025, 4, 1))
    write_config(config_file, apply_left_model(APP_CONFIG, new_model="m1", base_model="x")[0])
    updated = config_file.read_bytes()

    restored_from, model, previous = rollback(config_file)
    assert restored_from.name == "models.json.backup.20250401_000000"
    assert (model, previous) == ("qwen3:0.6b", "m1")
    assert config_file.read_bytes() == old
    assert list_backups(config_file)[0].read_bytes() == updated  # the replaced config was saved

    _, model, previous = rollback(config_file)  # the newest backup is now the undo
    assert (model, previous) == ("m1", "qwen3:0.6b")
    assert config_file.read_bytes() == updated


def test_rollback_to_a_named_backup_by_name_or_path(config_file: Path):
    first = backup_config(config_file, at=datetime(2025, 4, 1))
    config_file.write_text('{"brain": {"left": "two"}}')
    backup_config(config_file, at=datetime(2025, 4, 2))
    config_file.write_text('{"brain": {"left": "three"}}')

    assert rollback(config_file, first.name)[1:] == ("qwen3:0.6b", "three")
    config_file.write_text('{"brain": {"left": "four"}}')
    assert rollback(config_file, str(first))[0] == first
    assert json.loads(config_file.read_text())["brain"]["left"] == "qwen3:0.6b"


def test_rollback_rejects_unknown_and_foreign_backups(config_file: Path, tmp_path: Path):
    with pytest.raises(BackupNotFound, match="no backups"):
        rollback(config_file)
    b = backup_config(config_file, at=datetime(2025, 4, 1))
    before = config_file.read_bytes()
    with pytest.raises(BackupNotFound, match=r"'nope' is not a backup of .*models\.json\.backup"):
        rollback(config_file, "nope")
    foreign = tmp_path / b.name  # same name, another directory
    foreign.write_text("{}")
    with pytest.raises(BackupNotFound):
        rollback(config_file, str(foreign))
    assert config_file.read_bytes() == before
    assert list_backups(config_file) == [b]


def test_rollback_repairs_a_broken_config(config_file: Path):
    good = config_file.read_bytes()
    backup_config(config_file, at=datetime(2025, 4, 1))
    config_file.write_text("{ broken")
    _, model, previous = rollback(config_file)
    assert (model, previous) == ("qwen3:0.6b", None)
    assert config_file.read_bytes() == good
    assert list_backups(config_file)[0].read_text() == "{ broken"


# --- handlers (recording publisher) -------------------------------------------------------------


class Trusting:
    """A verifier that accepts every run: these tests are about the files."""

    async def verify(self, ev: ModelValidated) -> None:
        return None


def updater(path: Path, pub: Recorder, keep: int = 10, *, init: bool = False) -> ConfigUpdater:
    return ConfigUpdater(
        pub,
        verifier=Trusting(),
        config_path=path,
        key_path="brain.left",
        keep_backups=keep,
        init_config=init,
    )


async def test_improved_model_is_applied_with_a_backup_and_announced(config_file: Path):
    pub = Recorder()
    old = raw(config_file)
    await updater(config_file, pub).on_model_validated(validated(), None)

    cfg = json.loads(text(config_file))
    assert cfg["brain"]["left"] == "mindx-left-1"
    assert cfg["models"][-1]["name"] == "mindx-left-1"
    [backup] = list_backups(config_file)
    assert raw(backup) == old
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert (ev.run_id, ev.role, ev.model, ev.previous_model) == (
        RUN_1,
        "left",
        "mindx-left-1",
        "qwen3:0.6b",
    )
    assert (ev.config_path, ev.backup_path, ev.rolled_back) == (
        str(config_file),
        str(backup),
        False,
    )
    assert pub.sent[0][2] == f"model.updated.{RUN_1}"  # JetStream dedupes a republish


async def test_redelivery_makes_no_second_backup_or_event(config_file: Path):
    pub = Recorder()
    up = updater(config_file, pub)
    await up.on_model_validated(validated(), None)
    after_first = raw(config_file)
    await up.on_model_validated(validated(), None)
    await updater(config_file, pub).on_model_validated(validated(), None)  # a restarted service
    assert len(pub.sent) == 1
    assert len(list_backups(config_file)) == 1
    assert raw(config_file) == after_first


async def test_crash_before_publish_is_finished_by_the_redelivery(config_file: Path):
    pub = Recorder()
    pub.fail_next = Crash()
    with pytest.raises(Crash):
        await updater(config_file, pub).on_model_validated(validated(), None)
    written = raw(config_file)
    assert json.loads(written)["brain"]["left"] == "mindx-left-1"
    [backup] = list_backups(config_file)

    await updater(config_file, pub).on_model_validated(validated(), None)
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert (ev.previous_model, ev.backup_path) == ("qwen3:0.6b", str(backup))
    assert list_backups(config_file) == [backup]
    assert raw(config_file) == written


async def test_crash_before_the_config_write_reuses_the_first_backup(config_file: Path):
    old = raw(config_file)
    backup = backup_config(config_file, at=datetime(2025, 4, 1))
    runs = {
        RUN_1: cu.AppliedRun(
            model="mindx-left-1", previous_model="qwen3:0.6b", backup_path=str(backup)
        )
    }
    cu.save_applied(config_file, runs)  # the journal as a crash right after it would leave it
    pub = Recorder()
    await updater(config_file, pub).on_model_validated(validated(), None)
    assert json.loads(text(config_file))["brain"]["left"] == "mindx-left-1"
    assert list_backups(config_file) == [backup]
    assert raw(backup) == old
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert ev.backup_path == str(backup)


async def test_not_improved_leaves_everything_alone(config_file: Path):
    pub = Recorder()
    before = raw(config_file)
    await updater(config_file, pub).on_model_validated(validated(improved=False), None)
    assert raw(config_file) == before
    assert pub.sent == []
    assert sorted(p.name for p in config_file.parent.iterdir()) == ["models.json"]


async def test_invalid_json_publishes_update_failed_and_returns(config_file: Path):
    put(config_file, '{"brain": {"left": ')
    pub = Recorder()
    await updater(config_file, pub).on_model_validated(validated(), None)  # no raise: ack
    [failed] = pub.on(subjects.MODEL_UPDATE_FAILED)
    assert failed.run_id == RUN_1
    assert "invalid JSON" in failed.error and "models.json" in failed.error
    assert text(config_file) == '{"brain": {"left": '
    assert pub.on(subjects.MODEL_UPDATED) == []
    assert list_backups(config_file) == []


async def test_a_failed_write_publishes_update_failed_and_leaves_no_trace(
    config_file: Path, monkeypatch
):
    before = raw(config_file)

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cu, "write_config", full_disk)
    pub = Recorder()
    await updater(config_file, pub).on_model_validated(validated(), None)
    [failed] = pub.on(subjects.MODEL_UPDATE_FAILED)
    assert "No space left" in failed.error
    assert raw(config_file) == before
    assert list_backups(config_file) == []
    assert RUN_1 not in cu.load_applied(config_file)
    monkeypatch.undo()  # disk freed: a new delivery of the same run applies it
    await updater(config_file, pub).on_model_validated(validated(), None)
    assert len(pub.on(subjects.MODEL_UPDATED)) == 1


async def test_an_unwritable_location_publishes_update_failed(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    put(blocker, "")
    pub = Recorder()
    await updater(blocker / "models.json", pub, init=True).on_model_validated(validated(), None)
    [failed] = pub.on(subjects.MODEL_UPDATE_FAILED)
    assert failed.error.startswith(("NotADirectoryError", "FileExistsError"))
    assert text(blocker) == ""


async def test_a_missing_config_is_refused_with_the_fix(tmp_path: Path):
    path = tmp_path / "config" / "modles.json"  # a typo in --config
    pub = Recorder()
    await updater(path, pub).on_model_validated(validated(), None)
    assert not path.exists() and not path.parent.exists()
    assert pub.on(subjects.MODEL_UPDATED) == []
    [failed] = pub.on(subjects.MODEL_UPDATE_FAILED)
    assert failed.error == (
        f"ConfigError: config {path} does not exist; check --config (or MINDX_CONFIG), "
        "or pass --init-config to create it"
    )


async def test_a_missing_config_is_created_from_the_base_when_asked(tmp_path: Path):
    path = tmp_path / "config" / "models.json"
    pub = Recorder()
    await updater(path, pub, init=True).on_model_validated(validated(), None)
    assert json.loads(text(path)) == {
        "brain": {"left": "mindx-left-1"},
        "models": [{"name": "mindx-left-1"}],
    }
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert (ev.previous_model, ev.backup_path) == ("qwen3:0.6b", None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


async def test_successive_runs_prune_old_backups(config_file: Path, monkeypatch):
    clock = iter(datetime(2025, 4, 1) + timedelta(seconds=i) for i in range(100))
    monkeypatch.setattr(
        cu, "timestamp", lambda at=None: (at or next(clock)).strftime("%Y%m%d_%H%M%S")
    )
    pub = Recorder()
    up = updater(config_file, pub, keep=3)
    for i in range(5):
        await up.on_model_validated(validated(run_id=f"20250401_13000{i}", new=f"m{i}"), None)
    backups = list_backups(config_file)
    assert len(backups) == 3
    assert [json.loads(text(b))["brain"]["left"] for b in backups] == ["m3", "m2", "m1"]
    assert [e.backup_path for e in pub.on(subjects.MODEL_UPDATED)][-3:] == [
        str(b) for b in reversed(backups)
    ]


async def test_rollback_request_restores_and_announces(config_file: Path):
    pub = Recorder()
    up = updater(config_file, pub)
    await up.on_model_validated(validated(), None)
    [applied] = pub.on(subjects.MODEL_UPDATED)

    req = RollbackRequested(config_path=str(config_file), request_id="undo-1")
    await up.on_rollback(req, None)
    await up.on_rollback(req, None)  # redelivered: must not roll back the rollback
    assert json.loads(text(config_file))["brain"]["left"] == "qwen3:0.6b"
    events = pub.on(subjects.MODEL_UPDATED)
    assert len(events) == 2
    ev = events[1]
    assert (ev.run_id, ev.model, ev.previous_model, ev.rolled_back) == (
        "undo-1",
        "qwen3:0.6b",
        "mindx-left-1",
        True,
    )
    assert ev.restored_from == applied.backup_path
    assert json.loads(text(Path(ev.backup_path)))["brain"]["left"] == "mindx-left-1"


async def test_rollback_redelivered_after_a_crash_is_not_undone(config_file: Path):
    pub = Recorder()
    up = updater(config_file, pub)
    await up.on_model_validated(validated(), None)
    pub.fail_next = Crash()  # restored, then died before announcing it
    with pytest.raises(Crash):
        await up.on_rollback(
            RollbackRequested(config_path=str(config_file), request_id="undo-1"), None
        )
    await updater(config_file, pub).on_rollback(
        RollbackRequested(config_path=str(config_file), request_id="undo-1"), None
    )
    assert json.loads(text(config_file))["brain"]["left"] == "qwen3:0.6b"
    [_, ev] = pub.on(subjects.MODEL_UPDATED)
    assert (ev.run_id, ev.model, ev.rolled_back) == ("undo-1", "qwen3:0.6b", True)
    assert ev.previous_model == "mindx-left-1"


async def test_rollback_to_an_unknown_backup_publishes_update_failed(config_file: Path):
    pub = Recorder()
    before = raw(config_file)
    await updater(config_file, pub).on_rollback(
        RollbackRequested(config_path=str(config_file), backup="nope"), None
    )
    [failed] = pub.on(subjects.MODEL_UPDATE_FAILED)
    assert "no backups" in failed.error
    assert raw(config_file) == before


# --- over a real NATS server ---------------------------------------------------------------------


async def _collect(bus, subject: str, typ: type) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()

    async def enqueue(ev) -> None:
        await q.put(ev)

    await bus.subscribe(subject, typ, enqueue)
    return q


async def _drain_until_sentinel(bus, q: asyncio.Queue) -> list[ModelUpdated]:
    """Events received before a sentinel published now: the bus keeps one connection's order."""
    await bus.publish(
        subjects.MODEL_UPDATED, ModelUpdated(run_id="sentinel", model="-", config_path="-")
    )
    out = []
    while (ev := await asyncio.wait_for(q.get(), 10)).run_id != "sentinel":
        out.append(ev)
    return out


async def decided(bus, client, ev: ModelValidated) -> None:
    """What a trainer's run leaves before its model.validated: the model, and its run record."""
    await client.create(CreateRequest(model=ev.new_model, from_=ev.base_model))
    await bus.put_record(subjects.RUNS, ev.run_id, validated_record(ev))


async def test_service_applies_once_and_announces_over_nats(bus, tmp_path: Path, ollama_double):
    from shared.settings import Settings

    path = tmp_path / "models.json"
    put(path, render_config(APP_CONFIG))
    settings = Settings(config=path, keep_backups=10)
    updated = await _collect(bus, subjects.MODEL_UPDATED, ModelUpdated)
    client = OllamaClient(ollama_double.url)
    services = await cu.serve(bus, settings, client)
    await decided(bus, client, validated())
    try:
        await bus.publish(subjects.MODEL_VALIDATED, validated())
        ev = await asyncio.wait_for(updated.get(), 10)
        assert (ev.run_id, ev.model, ev.previous_model, ev.rolled_back) == (
            RUN_1,
            "mindx-left-1",
            "qwen3:0.6b",
            False,
        )
        assert json.loads(text(path))["brain"]["left"] == "mindx-left-1"

        await bus.publish(subjects.MODEL_VALIDATED, validated())  # a duplicate delivery
        await bus.publish(subjects.MODEL_VALIDATED, validated("20250401_120002", improved=False))
        await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=10)
        assert await _drain_until_sentinel(bus, updated) == []
        assert len(list_backups(path)) == 1

        await bus.publish(
            subjects.MODEL_ROLLBACK_REQUESTED,
            RollbackRequested(config_path=str(path), request_id="r1"),
        )
        ev = await asyncio.wait_for(updated.get(), 10)
        assert (ev.run_id, ev.model, ev.rolled_back) == ("r1", "qwen3:0.6b", True)
        assert json.loads(text(path))["brain"]["left"] == "qwen3:0.6b"
    finally:
        for s in services:
            await s.stop()
        await client.aclose()


async def test_service_reports_a_broken_config_and_moves_on(bus, tmp_path: Path, ollama_double):
    from shared.settings import Settings

    path = tmp_path / "models.json"
    put(path, "not json")
    failed = await _collect(bus, subjects.MODEL_UPDATE_FAILED, ModelUpdateFailed)
    client = OllamaClient(ollama_double.url)
    services = await cu.serve(bus, Settings(config=path), client)
    await decided(bus, client, validated())
    try:
        await bus.publish(subjects.MODEL_VALIDATED, validated())
        ev = await asyncio.wait_for(failed.get(), 10)
        assert ev.run_id == RUN_1 and "invalid JSON" in ev.error
        await bus.wait_idle(subjects.CONFIG_UPDATER, timeout=10)  # acked, not redelivered
        assert await bus.dead_letters() == []
        assert text(path) == "not json"
    finally:
        for s in services:
            await s.stop()
        await client.aclose()
