"""Terminal rendering for the command line: exit codes, help that names every default, the `-v`
bus line, progress bars, and the text of the operator's commands (doctor, status, watch).
Nothing here touches the bus or the backend."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from services.app import BUS_LOG
from services.preflight import Check
from shared.backend import CreateProgress
from shared.settings import Settings

EXIT_OK, EXIT_RUN_FAILED, EXIT_ERROR = 0, 1, 2


# --- help and lines -----------------------------------------------------------------------------


class DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: the one the help names, else the parser's,
    else the Settings default the flag sets (a switch is off unless given)."""

    _settings = Settings()

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a switch
            return f"{text} (default: off)"
        value = action.default
        if value is None:
            value = getattr(self._settings, action.dest, None)
        shown = "none" if value is None else value
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Use DefaultsHelp in `parser` and every subcommand's parser."""
    parser.formatter_class = DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)


@contextlib.contextmanager
def bus_lines(command: str, verbose: bool) -> Iterator[None]:
    """With -v: which NATS server the command uses, one line `mindx <command>: bus ...`."""
    if not verbose:
        yield
        return
    logger = logging.getLogger(BUS_LOG)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"mindx {command}: %(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


# --- progress -----------------------------------------------------------------------------------


class ProgressBars:
    """One bar per stage of a run in a terminal; plain lines otherwise."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._bar: Any = None
        self._stage = ""

    def update(self, ev: Any) -> None:
        if not self.enabled:
            return
        if ev.stage != self._stage:
            self.close()
            self._stage = ev.stage
            if self.tty and ev.total:
                from tqdm import tqdm

                self._bar = tqdm(total=ev.total, desc=ev.stage, unit="step", leave=True)
            else:
                print(f"[{ev.stage}] {ev.message}", file=sys.stderr)
        if self._bar is not None:
            self._bar.n = ev.done
            post = {}
            if ev.loss is not None:
                post["loss"] = f"{ev.loss:.3f}"
            if ev.tokens_per_s:
                post["tok/s"] = f"{ev.tokens_per_s:.0f}"
            if post:
                self._bar.set_postfix(post)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PullBars:
    """A model pull as `ollama pull` shows it: a byte bar per layer in a terminal; otherwise
    each new status once (`pulling manifest`, `pulling 4a2d…`, `verifying sha256 digest`...)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._bars: dict[str, Any] = {}
        self._last = ""

    def update(self, model: str, p: CreateProgress) -> None:
        if not self.enabled:
            return
        if self.tty and p.digest and p.total:
            bar = self._bars.get(p.digest)
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=p.total, desc=p.status, unit="B", unit_scale=True, leave=True)
                self._bars[p.digest] = bar
            bar.n = p.completed or 0
            bar.refresh()
            return
        line = f"{model}: {p.status}"
        if line != self._last:
            self._last = line
            print(f"pulling {line}" if p.status == "success" else line, file=sys.stderr)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def warn(command: str, check: Check) -> None:
    """A preflight warning, as the CLI prints every message: one line."""
    print(f"mindx {command}: warning: {check.message}", file=sys.stderr)


_LEVEL = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


def checks_text(checks: Sequence[Check]) -> str:
    """`mindx doctor`: a line per check, its level, its name and what to do."""
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{_LEVEL[c.level]:<4}  {c.name:<{width}}  {c.message}" for c in checks)


def duration(seconds: float) -> str:
    """`3h02m`, `4m05s`, `12s`."""
    s = int(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_text(p: dict[str, Any]) -> str:
    """A run in progress in one line: stage, steps, loss, ETA."""
    parts = [p["run_id"], p["stage"]]
    if p.get("total"):
        parts.append(f"{p['done']}/{p['total']} ({100 * p['done'] // max(1, p['total'])}%)")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {duration(p['eta_s'])}")
    if p.get("message"):
        parts.append(p["message"])
    return "  ".join(parts)


def _run_text(r: dict[str, Any]) -> str:
    line = f"{r['run_id']}  {r['status']}  {r['mode']}"
    if r.get("new_model"):
        line += f"  {r['new_model']}"
    if r.get("score_diff") is not None:
        line += f"  ({r['score_diff']:+.3f} vs {r['base_model']})"
    if r.get("error"):
        line += f"  {r['error'][:120]}"
    return line


def status_text(st: dict[str, Any], now: datetime | None = None) -> str:
    """`mindx status`: one block per topic, the label in the first column."""
    rows: list[tuple[str, str]] = [("bus", st["bus"])]
    services = st["services"]
    if not services:
        rows.append(("services", "none answered (start them with `mindx serve all`)"))
    for i, p in enumerate(services):
        up = ""
        if now is not None:
            up = f"  up {duration((now - datetime.fromisoformat(p['started_at'])).total_seconds())}"
        text = f"{p['id']}  {', '.join(p['components'])}  (v{p['version']}{up})"
        rows.append(("services" if i == 0 else "", text))
    left = st["left_model"] or "none"
    config = f"{left}  in {st['config']}"
    if st["config_error"]:
        config = f"unknown: {st['config_error']}"
    rows.append(("left model", config))
    if not st["running"]:
        rows.append(("running", "no run in progress"))
    for i, p in enumerate(st["running"]):
        rows.append(("running" if i == 0 else "", progress_text(p)))
    if not st["runs"]:
        rows.append(("last runs", f"none in {st['training_dir']}"))
    for i, r in enumerate(st["runs"]):
        rows.append(("last runs" if i == 0 else "", _run_text(r)))
    c = st["corpus"]
    rows.append(
        (
            "corpus",
            "empty (no corpus yet)"
            if c is None
            else f"{c['points']} points, {c['pairs']} pairs ({c['pairs_since_watermark']} since "
            f"the last run), {c['points_without_pairs']} points without pairs, "
            f"{c['withheld']} withheld as sensitive",
        )
    )
    dead = st["dead_letters"]
    total = sum(dead.values())
    by = ", ".join(f"{s} {n}" for s, n in dead.items())
    rows.append(("dead letters", f"{total} ({by}); see `mindx dlq list`" if total else "none"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
