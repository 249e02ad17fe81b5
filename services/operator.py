"""What the operator's commands do: `mindx status`, `mindx watch`, `mindx dlq replay|purge`.

Each is one library call the CLI renders. They talk to the bus as the `operator` role, except a
replay, which re-sends what the service's components consume and so connects as `service`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from services import app
from services.app import UserFacingError
from services.status import running_runs
from shared import subjects
from shared.bus import Letter, subject_matches
from shared.messages import (
    ProcessStatus,
    RunReport,
    StatusRequest,
    TrainingFinished,
    TrainingProgress,
)
from shared.settings import Settings

STATUS_WAIT_S = 1.0  # how long `mindx status` collects answers
WATCH_RECHECK_S = 15.0  # how often `mindx watch` checks that its run is still alive
LAST_RUNS = 5

# The subjects whose consumers dead-letter: a replay re-sends only to these.
REPLAYABLE = tuple(
    spec.subject
    for spec in (
        subjects.COLLECTOR,
        subjects.FORGETTER,  # a deletion that kept failing (a backend down) is done again
        subjects.TRAINER,
        subjects.CONFIG_UPDATER,
        subjects.CONFIG_ROLLBACK,
        subjects.LORA_WORKER,
    )
)
_TRUNCATED = re.compile(r"…\[truncated, \d+ bytes\]$")


# --- status ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """`mindx status`: the bus, who serves it, the live left model, the runs, the corpus and the
    dead letters."""

    bus: str
    services: list[dict[str, Any]]
    config: str
    left_model: str | None
    config_error: str | None
    running: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    corpus: dict[str, int] | None  # None: no corpus yet
    dead_letters: dict[str, int]  # original subject → count
    training_dir: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def left_model(settings: Settings) -> tuple[str | None, str | None]:
    """The config's left model, or the reason it cannot be read."""
    from services.model_config import ConfigError, missing_config, read_config
    from services.model_config import left_model as left_of

    path = settings.config_path
    if not path.exists():
        return None, missing_config(path)
    try:
        return left_of(read_config(path), settings.left_key), None
    except (OSError, ConfigError) as exc:
        return None, str(exc)


def last_runs(settings: Settings, n: int = LAST_RUNS) -> list[dict[str, Any]]:
    """The newest `n` run reports of the training dir: what each run ended with."""
    from services.report import read_report

    paths = sorted(settings.training_path.glob(subjects.REPORT_GLOB), reverse=True)
    out: list[dict[str, Any]] = []
    for path in paths:
        if len(out) == n:
            break
        try:
            r = read_report(path)
        except (ValueError, OSError):
            continue  # a foreign or broken file
        out.append(run_summary(r) | {"report": str(path)})
    return out


def run_summary(r: RunReport) -> dict[str, Any]:
    return {
        "run_id": r.run_id or r.training_id,
        "status": r.status,
        "mode": r.mode,
        "base_model": r.base_model,
        "new_model": r.new_model,
        "improved": r.improved,
        "score_diff": r.score_diff,
        "error": r.error,
    }


def corpus_counts(settings: Settings) -> dict[str, int] | None:
    """`mindx corpus stats`'s counts; None when there is no corpus yet (none is created)."""
    if not settings.corpus_path.is_file():
        return None
    from services.memory_adapter import load_watermark
    from shared.corpus import Corpus

    with Corpus.open(settings.corpus_path) as corpus:
        stats = corpus.stats(load_watermark(settings.watermark_path))
        stats["withheld"] = sum(corpus.withheld().values())
    return stats


def process_summary(p: ProcessStatus) -> dict[str, Any]:
    return {
        "id": p.id,
        "components": p.components,
        "version": p.version,
        "started_at": p.started_at.isoformat(),
    }


def progress_summary(p: TrainingProgress) -> dict[str, Any]:
    return msgspec.to_builtins(p)


async def status(settings: Settings, *, wait: float = STATUS_WAIT_S) -> Status:
    async with app.connect(settings, "operator") as bus:
        processes = await bus.gather(subjects.STATUS, StatusRequest(), ProcessStatus, wait=wait)
        dead = await bus.dead_letter_counts()
        url = bus.url
    model, problem = left_model(settings)
    return Status(
        bus=url,
        services=[process_summary(p) for p in sorted(processes, key=lambda p: p.id)],
        config=str(settings.config_path),
        left_model=model,
        config_error=problem,
        running=[progress_summary(p) for p in running_runs(processes)],
        runs=last_runs(settings),
        corpus=corpus_counts(settings),
        dead_letters=dead,
        training_dir=str(settings.training_path),
    )


def backup_entry(path: Path, key_path: str) -> dict[str, Any]:
    """A config backup for `backups --json`: its path, name and the left model it holds."""
    from services.model_config import ConfigError, read_config
    from services.model_config import left_model as left_of

    try:
        left = left_of(read_config(path), key_path)
    except (OSError, ConfigError):
        left = None
    return {"path": str(path), "name": path.name, "left_model": left}


# --- watch ----------------------------------------------------------------------------------------


def finished_report(settings: Settings, run_id: str) -> TrainingFinished | None:
    """A run that already ended, from its report; None when it has none."""
    from services.report import ReportNotFound, find_report, read_report

    try:
        path = find_report(settings.training_path, run_id)
    except ReportNotFound:
        return None
    r = read_report(path)
    return TrainingFinished(
        run_id=run_id, status=r.status, report=msgspec.to_builtins(r), report_path=str(path)
    )


async def watch(
    settings: Settings,
    run_id: str | None,
    on_progress: Callable[[TrainingProgress], Awaitable[None] | None],
    *,
    recheck_s: float = WATCH_RECHECK_S,
    wait: float = STATUS_WAIT_S,
) -> TrainingFinished:
    """Follow a run's progress (the newest running run by default) until it ends; returns its
    `training.completed` / `training.failed` (or, for a run that had ended, its report)."""
    events: asyncio.Queue[TrainingProgress | TrainingFinished] = asyncio.Queue()

    async def put(ev: Any) -> None:
        await events.put(ev)

    async with app.connect(settings, "operator") as bus:
        # subscribe first: nothing between the look-up and the first event is missed
        subs = [
            await bus.subscribe(f"{subjects.TRAINING_PROGRESS}.*", TrainingProgress, put),
            await bus.subscribe(subjects.TRAINING_COMPLETED, TrainingFinished, put),
            await bus.subscribe(subjects.TRAINING_FAILED, TrainingFinished, put),
        ]

        async def running() -> list[TrainingProgress]:
            answers = await bus.gather(subjects.STATUS, StatusRequest(), ProcessStatus, wait=wait)
            return running_runs(answers)

        try:
            now = await running()
            if run_id is None:
                if not now:
                    raise UserFacingError(
                        f"no run in progress on {bus.url}; start one with "
                        "`mindx train --run-once`, or see the last one with `mindx report`"
                    )
                run_id = now[-1].run_id
            elif not any(p.run_id == run_id for p in now):
                done = finished_report(settings, run_id)
                if done is not None:
                    return done
                raise UserFacingError(
                    f"run {run_id} is not in progress on {bus.url} and has no report in "
                    f"{settings.training_path}; `mindx status` lists the runs"
                )
            for p in now:
                if p.run_id == run_id:
                    await _call(on_progress, p)
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), recheck_s)
                except TimeoutError:
                    if not any(p.run_id == run_id for p in await running()):
                        done = finished_report(settings, run_id)
                        if done is not None:
                            return done
                        raise UserFacingError(
                            f"run {run_id} is no longer in progress and left no report "
                            "(its trainer stopped?); see `mindx status`"
                        ) from None
                    continue
                if ev.run_id != run_id:
                    continue
                if isinstance(ev, TrainingFinished):
                    return ev
                await _call(on_progress, ev)
        finally:
            for sub in subs:
                await sub.stop()


async def _call(cb: Callable[[Any], Awaitable[None] | None], value: Any) -> None:
    result = cb(value)
    if result is not None:
        await result


# --- dead letters ---------------------------------------------------------------------------------


@dataclass
class Replayed:
    replayed: list[Letter] = field(default_factory=list)
    kept: list[tuple[Letter, str]] = field(default_factory=list)  # and why


def replay_problem(entry: Letter) -> str | None:
    """Why a dead letter is not re-sent (it stays in the DLQ), or None."""
    letter = entry.letter
    if entry.subject != subjects.dead_letter_subject(letter.subject):
        # only the consumer of a subject may dead-letter it: a letter naming another is forged
        return f"filed under {entry.subject}, not under its subject {letter.subject}"
    if letter.subject not in REPLAYABLE:
        return f"{letter.subject} is not a subject the services consume"
    if _TRUNCATED.search(letter.data):
        return "its payload was truncated when it was dead-lettered"
    return None


async def dlq_replay(settings: Settings, subject: str | None = None) -> Replayed:
    """Re-publish each dead letter (of `subject`, NATS wildcards allowed) to its original
    subject, then remove it from the DLQ. A message that fails again is dead-lettered again."""
    out = Replayed()
    # as the service: what it re-sends is what the service's components consume (REPLAYABLE)
    async with app.connect(settings, "service") as service:
        for entry in await service.dead_letter_entries(subject=subject):
            problem = replay_problem(entry)
            if problem is not None:
                out.kept.append((entry, problem))
                continue
            # the id makes a second replay of the same letter (a crash before the delete) a no-op
            await service.publish_raw(
                entry.letter.subject, entry.letter.data.encode(), msg_id=f"replay-dlq-{entry.seq}"
            )
            await service.delete_dead_letter(entry.seq)
            out.replayed.append(entry)
    return out


async def dlq_purge(settings: Settings, subject: str | None = None, *, yes: bool) -> int:
    """Remove every dead letter (of `subject`); without `yes`, say how many and refuse."""
    async with app.connect(settings, "operator") as bus:
        counts = await bus.dead_letter_counts()
        n = sum(c for s, c in counts.items() if subject is None or subject_matches(subject, s))
        if n and not yes:
            of = f" of {subject}" if subject else ""
            raise UserFacingError(
                f"this removes {n} dead letter(s){of} for good; see them with `mindx dlq list`, "
                "then add --yes"
            )
        return await bus.purge_dead_letters(subject) if n else 0
