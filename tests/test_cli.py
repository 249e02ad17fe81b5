"""The CLI's promises: one line for an expected error, a traceback with --debug or for a bug,
--log-level that works. Cheap commands only: no bus, no model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from services import cli
from shared.settings import Settings


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINDX_DEBUG", raising=False)
    monkeypatch.delenv("MINDX_LOG_LEVEL", raising=False)


def test_an_expected_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["report", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"mindx report: no run reports in {tmp_path / 'data' / 'training'}\n"


def test_a_bad_setting_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["train", "--run-once", "--min-corpus", "0", "--workspace", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err == "mindx train: min_corpus must be >= 1, got 0\n"


def test_a_bad_setting_from_the_environment_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINDX_KEEP_BACKUPS", "0")
    assert cli.main(["backups", "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "mindx backups: keep_backups must be >= 1, got 0\n"


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["report", "--workspace", str(tmp_path), "--debug"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "ReportNotFound" in err
    assert last_line(err) == f"mindx report: no run reports in {tmp_path / 'data' / 'training'}"


@pytest.mark.parametrize(("value", "shown"), [("1", True), ("0", False), ("", False)])
def test_mindx_debug_still_works(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    shown: bool,
) -> None:
    monkeypatch.setenv("MINDX_DEBUG", value)
    assert cli.main(["report", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("Traceback" in err) is shown
    assert last_line(err).startswith("mindx report: no run reports in")


def test_nested_commands_are_named_as_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["corpus", "stats", "--workspace", str(tmp_path), "--log-level", "nope"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("mindx corpus stats: log_level must be one of")


def test_a_bad_log_level_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["backups", "--workspace", str(tmp_path), "--log-level", "LOUD"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "mindx backups: log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
        "got 'LOUD'\n"
    )


def test_a_bug_prints_a_hint_and_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(settings: Settings, args: argparse.Namespace) -> int:
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_backups", broken)
    rc = cli.main(["backups", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    first, second = err.splitlines()[:2]
    assert first == "mindx backups: unexpected KeyError: 'oops' (a bug; traceback follows)"
    assert second == "Traceback (most recent call last):"
    assert last_line(err) == "KeyError: 'oops'"


def levels_seen_by(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Replace `mindx backups` with a command that logs at DEBUG from module loggers and
    records which of them would emit a DEBUG/INFO record."""
    seen: dict[str, bool] = {}

    async def probe(settings: Settings, args: argparse.Namespace) -> int:
        for name in ("services.trainer", "shared.bus", "training.lora"):
            logger = logging.getLogger(name)
            seen[f"{name}:debug"] = logger.isEnabledFor(logging.DEBUG)
            seen[f"{name}:info"] = logger.isEnabledFor(logging.INFO)
            logger.debug("probe from %s", name)
        seen["httpx:info"] = logging.getLogger("httpx").isEnabledFor(logging.INFO)
        return 0

    monkeypatch.setattr(cli, "cmd_backups", probe)
    return seen


def test_log_level_debug_enables_debug_logging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = levels_seen_by(monkeypatch)
    before = logging.getLogger("services").level
    assert cli.main(["backups", "--workspace", str(tmp_path), "--log-level", "DEBUG"]) == 0
    assert all(seen[f"{n}:debug"] for n in ("services.trainer", "shared.bus", "training.lora"))
    assert not seen["httpx:info"]  # other libraries stay at warnings
    debug = {(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.DEBUG}
    assert ("services.trainer", "probe from services.trainer") in debug
    assert ("training.lora", "probe from training.lora") in debug
    assert any(name == "mindx" and "backups with Settings(" in m for name, m in debug)
    assert logging.getLogger("services").level == before  # restored: main() ran in-process


def test_the_default_log_level_keeps_output_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = levels_seen_by(monkeypatch)
    assert cli.main(["backups", "--workspace", str(tmp_path)]) == 0
    assert not seen["services.trainer:info"] and not seen["shared.bus:debug"]
    assert capsys.readouterr().err == ""


def test_log_level_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = levels_seen_by(monkeypatch)
    monkeypatch.setenv("MINDX_LOG_LEVEL", "info")
    assert cli.main(["backups", "--workspace", str(tmp_path)]) == 0
    assert seen["services.trainer:info"] and not seen["services.trainer:debug"]


def test_bad_app_options_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--run-once", "--app-options", "{temperature: 0.7}"]
    assert cli.main([*argv, "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "mindx train: app_options: cannot read '{temperature: 0.7}' as a JSON object\n"
    )
