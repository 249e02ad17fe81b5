"""`model.updated` carries what a Brain needs to reload on its own, and the config is rewritten
in its own layout (a minimal diff)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import msgspec
import pytest

from services.model_config import json_style, render_config, write_config
from shared import subjects
from shared.messages import RollbackRequested
from tests.test_config_updater import APP_CONFIG, RUN_1, Recorder, text, updater, validated

BASE_ENTRY = APP_CONFIG["models"][1]  # qwen3:0.6b, the left model
RUN_2 = "20250401_120002"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "models.json"
    path.parent.mkdir()
    path.write_text(render_config(APP_CONFIG), encoding="utf-8")
    return path


async def test_the_event_carries_the_entry_request_mode_and_scores(config_file: Path) -> None:
    pub = Recorder()
    ev_in = msgspec.structs.replace(validated(), request_id="req-7")
    await updater(config_file, pub).on_model_validated(ev_in, None)
    [ev] = pub.on(subjects.MODEL_UPDATED)
    wire = json.loads(msgspec.json.encode(ev))  # what a Brain reads
    assert wire["model"] == "mindx-left-1" and wire["previous_model"] == "qwen3:0.6b"
    assert wire["model_entry"] == {**BASE_ENTRY, "name": "mindx-left-1"}
    assert list(wire["model_entry"]) == list(BASE_ENTRY)  # the config's own key order
    assert (wire["run_id"], wire["request_id"], wire["mode"]) == (RUN_1, "req-7", "message")
    assert (wire["base_score"], wire["new_score"]) == (0.4, 0.6)
    assert wire["rolled_back"] is False and wire["restored_run_id"] is None
    # the entry is the one the config now holds
    config = json.loads(text(config_file))
    assert wire["model_entry"] in config["models"]


async def test_a_redelivery_after_a_crash_announces_the_same_fields(config_file: Path) -> None:
    from tests.test_config_updater import Crash

    pub = Recorder()
    pub.fail_next = Crash()  # applied, then died before announcing it
    with pytest.raises(Crash):
        await updater(config_file, pub).on_model_validated(validated(), None)
    await updater(config_file, pub).on_model_validated(validated(), None)
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert ev.model_entry == {**BASE_ENTRY, "name": "mindx-left-1"}
    assert (ev.mode, ev.base_score, ev.new_score) == ("message", 0.4, 0.6)


async def test_a_rollback_names_the_run_of_the_model_it_restores(config_file: Path) -> None:
    pub = Recorder()
    up = updater(config_file, pub)
    await up.on_model_validated(validated(RUN_1, "mindx-left-1"), None)
    await up.on_model_validated(validated(RUN_2, "mindx-left-2"), None)

    await up.on_rollback(RollbackRequested(config_path=str(config_file), request_id="undo-1"), None)
    ev = pub.on(subjects.MODEL_UPDATED)[-1]
    assert ev.rolled_back and ev.model == "mindx-left-1" and ev.previous_model == "mindx-left-2"
    assert ev.restored_run_id == RUN_1
    assert ev.model_entry == {**BASE_ENTRY, "name": "mindx-left-1"}
    assert (ev.mode, ev.base_score, ev.new_score) == (None, None, None)

    # the oldest backup holds the base: no run built it
    oldest = sorted(config_file.parent.glob("models.json.backup.*"))[0]
    undo = RollbackRequested(config_path=str(config_file), request_id="undo-2", backup=oldest.name)
    await up.on_rollback(undo, None)
    ev = pub.on(subjects.MODEL_UPDATED)[-1]
    assert ev.model == "qwen3:0.6b" and ev.restored_run_id is None
    assert ev.model_entry == BASE_ENTRY


GO_CONFIG = (  # as Go's json.MarshalIndent(v, "", "\t") writes it: tabs, \u0026, raw UTF-8
    "{\n"
    '\t"brain": {\n'
    '\t\t"left": "qwen3:0.6b",\n'
    '\t\t"right": "qwen3:0.6b"\n'
    "\t},\n"
    '\t"ui": {\n'
    '\t\t"theme": "dark",\n'
    '\t\t"语言": "中文"\n'
    "\t},\n"
    '\t"models": [\n'
    "\t\t{\n"
    '\t\t\t"name": "qwen3:0.6b",\n'
    '\t\t\t"base_url": "http://127.0.0.1:11434/?a=1\\u0026b=\\u003cc\\u003e",\n'
    '\t\t\t"temperature": 0.7,\n'
    '\t\t\t"max_tokens": 2048,\n'
    '\t\t\t"stop": []\n'
    "\t\t}\n"
    "\t]\n"
    "}"
)


@pytest.mark.parametrize(
    "original",
    [
        GO_CONFIG,
        GO_CONFIG.replace("\t", "    ") + "\n",  # four spaces, final newline
        GO_CONFIG.replace("\n", "\r\n"),  # written on Windows
    ],
    ids=["go-tabs", "four-spaces", "crlf"],
)
async def test_the_config_keeps_its_layout_only_the_changes_differ(
    tmp_path: Path, original: str
) -> None:
    path = tmp_path / "models.json"
    path.write_bytes(original.encode())
    pub = Recorder()
    ev_in = msgspec.structs.replace(validated(new="mindx-new"), request_id=None)
    await updater(path, pub).on_model_validated(ev_in, None)
    after = path.read_bytes().decode()

    nl = "\r\n" if "\r\n" in original else "\n"
    unit = "\t" if "\t" in original else "    "
    # the only removed line is the left model's; everything else is added
    diff = list(difflib.unified_diff(original.split(nl), after.split(nl), lineterm="", n=0))
    removed = [line for line in diff[2:] if line.startswith("-")]
    assert removed == [f'-{2 * unit}"left": "qwen3:0.6b",']
    # byte for byte: the left value replaced, the new entry appended to `models` in the
    # file's own indentation, escapes and line ends
    entry = json.loads(original)["models"][0]
    block = json.dumps({**entry, "name": "mindx-new"}, indent=unit, ensure_ascii=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        block = block.replace(char, escape)
    block = nl.join(2 * unit + line for line in block.split("\n"))
    end_of_models = original.index(f"{nl}{unit}]")
    expected = (original[:end_of_models] + "," + nl + block + original[end_of_models:]).replace(
        '"left": "qwen3:0.6b"', '"left": "mindx-new"'
    )
    assert after == expected
    [ev] = pub.on(subjects.MODEL_UPDATED)
    assert ev.model_entry["base_url"] == "http://127.0.0.1:11434/?a=1&b=<c>"


def test_layouts_are_detected_and_round_trip() -> None:
    for original in (
        GO_CONFIG,
        render_config(APP_CONFIG),
        '{"a":1,"b":[1,2],"c":{"d":"é"}}',
        '{"a": 1, "b": "\\u00e9"}\n',
    ):
        style = json_style(original)
        assert render_config(json.loads(original), style) == original, style


def test_a_new_config_gets_two_spaces(tmp_path: Path) -> None:
    path = write_config(tmp_path / "models.json", {"brain": {"left": "m"}})
    assert path.read_text() == '{\n  "brain": {\n    "left": "m"\n  }\n}\n'
