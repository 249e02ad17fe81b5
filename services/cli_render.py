"""Terminal rendering for the command line: exit codes, progress bars, and the text of the
operator's commands (doctor, status, watch). Nothing here touches the bus or the backend."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from services.preflight import Check
from shared.backend import CreateProgress

EXIT_OK, EXIT_RUN_FAILED, EXIT_ERROR = 0, 1, 2


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
