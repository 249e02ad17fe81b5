"""Help an operator can use without reading code: every flag says what it does and its default,
`serve --help` lists the components, `--version`, one line for a mistyped command line, JSON
for `backups` and `rollback`, and `-v` says which bus a command uses."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services import app, cli
from services.status import mindx_version
from shared.backend import CreateRequest
from shared.ollama import OllamaClient


def parsers(
    parser: argparse.ArgumentParser, name: str = "mindx"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def test_every_flag_has_a_help_line_with_its_default() -> None:
    seen = 0
    for name, parser in parsers(cli.build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {flag}: no help"
            if action.option_strings:
                text = formatter._get_help_string(action)  # what --help prints for it
                assert "default" in text, f"{name} {flag}: {text!r} names no default"
                assert "(default: None)" not in text, f"{name} {flag}"
                seen += 1
    assert seen > 200  # every command's flags, not an empty walk


def test_defaults_shown_are_the_settings_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "passes over the dataset (default: 3)" in text
    assert "--held-out HELD_OUT validation cases (default: 20)" in text
    assert "--debug show the traceback of an error (also MINDX_DEBUG=1) (default: off)" in text
    assert "embedding model (default: qllama/bge-small-zh-v1.5:latest;" in text


def test_serve_help_lists_every_component(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(cli.COMPONENT_HELP) == set(app.COMPONENTS)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for name, what in cli.COMPONENT_HELP.items():
        assert f"  {name}" in out and what in out
    assert "collector trainer validator config-updater" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"mindx {mindx_version()}\n"
    assert mindx_version()[0].isdigit()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["serve", "colector"],
            "mindx serve: argument COMPONENT: invalid choice: 'colector' (choose from "
            "'collector', 'trainer', 'validator', 'config-updater', 'forgetter', 'lora-worker', "
            "'all') "
            "(see mindx serve --help)",
        ),
        (
            ["train", "--epochs", "three"],
            "mindx train: argument --epochs: invalid int value: 'three' (see mindx train --help)",
        ),
        (["stauts"], "mindx: argument command: invalid choice: 'stauts'"),
    ],
)
def test_a_mistyped_command_line_is_one_line(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line)


def test_backups_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config" / "models.json"
    config.parent.mkdir()
    config.write_text('{"brain": {"left": "now"}}')
    (config.parent / "models.json.backup.20250101_000000").write_text('{"brain": {"left": "a"}}')
    (config.parent / "models.json.backup.20250102_000000").write_text("{broken")
    assert cli.main(["backups", "--json", "--workspace", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "path": str(config.parent / "models.json.backup.20250102_000000"),
            "name": "models.json.backup.20250102_000000",
            "left_model": None,
        },
        {
            "path": str(config.parent / "models.json.backup.20250101_000000"),
            "name": "models.json.backup.20250101_000000",
            "left_model": "a",
        },
    ]
    assert cli.main(["backups", "--json", "--workspace", str(tmp_path / "none")]) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_rollback_as_json_and_the_bus_it_uses(
    tmp_path: Path,
    nats_server: Any,
    ollama_double: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config" / "models.json"
    config.parent.mkdir()
    config.write_text('{"brain": {"left": "mindx-x:1"}}')
    shutil.copy(config, config.parent / "models.json.backup.20250101_000000")
    config.write_text('{"brain": {"left": "mindx-y:2"}}')
    async with OllamaClient(ollama_double.url) as client:  # rollback restores an existing model
        await client.create(CreateRequest(model="mindx-x:1", from_="qwen3:0.6b"))
    argv = ["rollback", "--json", "-v", "--workspace", str(tmp_path)]
    argv += ["--nats", nats_server.url, "--ollama", ollama_double.url]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out, err = capsys.readouterr()
    event = json.loads(out)
    assert (event["rolled_back"], event["model"], event["previous_model"]) == (
        True,
        "mindx-x:1",
        "mindx-y:2",
    )
    assert event["config_path"] == str(config)
    assert err == f"mindx rollback: bus {nats_server.url} (--nats or NATS_URL)\n"
