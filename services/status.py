"""Every mindx process answers `mindx.status`: who it is, what it serves, and, in a process with
the trainer, the latest progress of each run in progress. `mindx status` and `mindx watch` send
the request and gather the answers (a core request without a queue group: every process
answers, like NATS micro's discovery, and needs no more than to answer what it was asked)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from shared import subjects
from shared.bus import Bus, PermissionDeniedError, Service, worker_name
from shared.messages import (
    ProcessStatus,
    StatusRequest,
    TrainingFinished,
    TrainingProgress,
    TrainingStarted,
    utc_now,
)

log = logging.getLogger(__name__)


def mindx_version() -> str:
    try:
        return importlib.metadata.version("mindx-training")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class RunTracker:
    """The latest progress of each run in progress, followed from the run events.

    A run whose last sign of life is older than `stale_after_s` is dropped: its trainer died
    without announcing the end (its deadline has passed too)."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after = timedelta(seconds=stale_after_s)
        self._runs: dict[str, TrainingProgress] = {}

    async def on_started(self, ev: TrainingStarted) -> None:
        message = f"{ev.mode} run on {ev.base_model}"
        self._runs[ev.run_id] = TrainingProgress(
            run_id=ev.run_id, stage="started", message=message, at=ev.at
        )

    async def on_progress(self, ev: TrainingProgress) -> None:
        self._runs[ev.run_id] = ev

    async def on_finished(self, ev: TrainingFinished) -> None:
        self._runs.pop(ev.run_id, None)

    def runs(self, now: datetime | None = None) -> list[TrainingProgress]:
        oldest = (now or utc_now()) - self.stale_after
        for run_id in [r for r, p in self._runs.items() if p.at < oldest]:
            del self._runs[run_id]
        return sorted(self._runs.values(), key=lambda p: p.at)


async def serve(bus: Bus, components: Sequence[str], *, stale_after_s: float) -> list[Service]:
    """Answer `mindx.status` for this process; follow the runs when it serves the trainer.

    A bus whose permissions predate the status subject (an older `mindx auth init`) only
    costs this process its line in `mindx status`: a warning, not a failed start."""
    started_at = utc_now()
    tracker = RunTracker(stale_after_s) if "trainer" in components else None
    services: list[Service] = []

    async def answer(_: StatusRequest) -> ProcessStatus:
        return ProcessStatus(
            id=worker_name(),
            components=list(components),
            version=mindx_version(),
            started_at=started_at,
            runs=tracker.runs() if tracker is not None else [],
        )

    try:
        if tracker is not None:
            t = tracker
            services += [
                await bus.subscribe(subjects.TRAINING_STARTED, TrainingStarted, t.on_started),
                await bus.subscribe(
                    f"{subjects.TRAINING_PROGRESS}.*", TrainingProgress, t.on_progress
                ),
                await bus.subscribe(subjects.TRAINING_COMPLETED, TrainingFinished, t.on_finished),
                await bus.subscribe(subjects.TRAINING_FAILED, TrainingFinished, t.on_finished),
            ]
        services.append(await bus.reply(subjects.STATUS, StatusRequest, answer))
    except PermissionDeniedError as exc:
        log.warning("this process will not show in `mindx status`: %s", exc)
        for svc in services:
            await svc.stop()
        return []
    return services


def running_runs(processes: Iterable[ProcessStatus]) -> list[TrainingProgress]:
    """The runs in progress that the processes report, each once (its newest progress)."""
    newest: dict[str, TrainingProgress] = {}
    for process in processes:
        for p in process.runs:
            if p.run_id not in newest or p.at > newest[p.run_id].at:
                newest[p.run_id] = p
    return sorted(newest.values(), key=lambda p: p.at)
