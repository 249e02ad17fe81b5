"""Trainer: one training run per `training.requested`, from corpus to a validated model.

This is the imperative shell of a run: it reads the corpus, calls the filter, writes the run
files, asks the validators, has the model built, publishes the outcome and writes the report.
Every decision on the way (enough data? which split? promote?) is made in `services/pipeline.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from services import generator, model_builder, pipeline
from services.filter import run_filter
from services.memory_adapter import load_watermark, save_watermark
from services.report import apply_comparison, read_report, write_report
from services.validator import score_case, validate_cases
from shared import subjects
from shared.backend import Backend, ChatMessage
from shared.bus import Expect
from shared.files import atomic_write, timestamp
from shared.messages import (
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    Pair,
    RunReport,
    TrainingFinished,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    ValidationCase,
    ValidationResult,
    utc_now,
)
from shared.modelfile import render_modelfile
from shared.settings import Settings
from shared.subjects import RunNames

if TYPE_CHECKING:
    from shared.bus import Bus, Delivery, Service
    from shared.corpus import Corpus
    from shared.embeddings import Embedder

log = logging.getLogger(__name__)


class ChunkedEmbedder:
    """Embeds in chunks and reports after each, so a long dedupe shows progress."""

    def __init__(
        self, inner: Embedder, report: Callable[[int, int], Awaitable[None]], chunk: int = 256
    ) -> None:
        self.inner, self.report, self.chunk = inner, report, chunk

    async def embed(self, texts: list[str]) -> np.ndarray:
        if len(texts) <= self.chunk:
            return await self.inner.embed(texts)
        parts = []
        for start in range(0, len(texts), self.chunk):
            parts.append(await self.inner.embed(texts[start : start + self.chunk]))
            await self.report(min(start + self.chunk, len(texts)), len(texts))
        return np.concatenate(parts)


class RunRegistry:
    """request_id → run_id, so a repeated request starts no second run (survives restarts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._runs: dict[str, str] = {}
        if path.exists():
            self._runs = json.loads(path.read_text() or "{}")

    def get(self, request_id: str) -> str | None:
        return self._runs.get(request_id)

    def add(self, request_id: str, run_id: str) -> None:
        self._runs[request_id] = run_id
        atomic_write(self.path, json.dumps(self._runs, indent=1))


@dataclass
class Run:
    """One run in progress: its names, settings, the report being filled and stage timings."""

    names: RunNames
    request: TrainingRequested
    settings: Settings
    report: RunReport
    bus: Bus
    started: datetime = field(default_factory=utc_now)

    @property
    def run_id(self) -> str:
        return self.names.run_id

    @contextlib.asynccontextmanager
    async def stage(self, name: str) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.report.timings[name] = round(time.perf_counter() - t0, 3)

    async def progress(
        self, stage: str, done: int = 0, total: int | None = None, message: str = ""
    ) -> None:
        await self.bus.publish(
            self.names.progress_subject,
            TrainingProgress(
                run_id=self.run_id, stage=stage, done=done, total=total, message=message
            ),
        )


class Trainer:
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        backend: Backend,
        embedder: Embedder,
        corpus: Corpus,
        *,
        model_choice: str = "",
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.backend = backend
        self.embedder = embedder
        self.corpus = corpus
        self.model_choice = model_choice
        self.registry = RunRegistry(settings.training_path / "runs.json")
        self._lock = asyncio.Lock()

    # --- bus entry point --------------------------------------------------------------------
    async def on_training_requested(self, req: TrainingRequested, delivery: Delivery) -> None:
        ran_as = self.registry.get(req.request_id) if req.request_id else None
        if ran_as:
            log.info("request %s already ran as %s", req.request_id, ran_as)
            await self._announce_again(req, RunNames(ran_as))
            return
        async with self._lock, delivery.keep_alive(every=5.0):
            await self.run(req)

    async def _announce_again(self, req: TrainingRequested, names: RunNames) -> None:
        """A redelivered request whose run finished: repeat its outcome (the first
        announcement may be what failed), never the run."""
        path = self.settings.training_path / names.report_json_file
        if not path.exists():
            return  # still running, or it died before writing a report
        await self._announce(req, read_report(path), path)

    async def _announce(self, req: TrainingRequested, report: RunReport, path: Path | None) -> None:
        """`training.completed` or `training.failed`, once per run (message id = run)."""
        failed = report.status == "failed"
        await self.bus.publish(
            subjects.TRAINING_FAILED if failed else subjects.TRAINING_COMPLETED,
            TrainingFinished(
                run_id=report.run_id,
                request_id=req.request_id,
                status=report.status,
                report=msgspec.to_builtins(report),
                report_path=str(path) if path else None,
            ),
            msg_id=RunNames(report.run_id).finished_msg_id,
        )

    def _new_run_id(self) -> str:
        ts = timestamp()
        taken = (self.settings.training_path / RunNames(ts).report_json_file).exists()
        return f"{ts}_{uuid.uuid4().hex[:4]}" if taken else ts

    # --- the run ----------------------------------------------------------------------------
    async def run(self, req: TrainingRequested) -> RunReport:
        names = RunNames(self._new_run_id())
        if req.request_id:
            self.registry.add(req.request_id, names.run_id)
        s = self.settings
        report = RunReport(training_id=names.run_id, run_id=names.run_id, status="failed")
        run = Run(names=names, request=req, settings=s, report=report, bus=self.bus)
        try:
            run.settings = s = pipeline.run_settings(s, req)
            report.mode, report.backend = s.mode, s.backend
            report.base_model, report.min_effect = s.base_model, s.min_effect
            report.embed_model, report.model_choice = self.embedder.model, self.model_choice
            report.request_id, report.start_time = req.request_id, run.started
            await self.bus.publish(
                subjects.TRAINING_STARTED,
                TrainingStarted(
                    run_id=names.run_id,
                    request_id=req.request_id,
                    mode=s.mode,
                    base_model=s.base_model,
                    backend=s.backend,
                ),
            )
            await self._run(run)
        except pipeline.RunSkipped as exc:
            run.report.status = "skipped"
            run.report.decision_reason = str(exc)
        except Exception as exc:  # a failed run leaves config and watermark untouched
            log.exception("run %s failed", names.run_id)
            run.report.status = "failed"
            run.report.error = f"{type(exc).__name__}: {exc}"
        report = run.report
        report.request_id, report.start_time = req.request_id, run.started
        report.end_time = utc_now()
        report.artifacts.update(
            report_json=str(s.training_path / names.report_json_file),
            report_html=str(s.training_path / names.report_html_file),
        )
        json_path: Path | None = None
        try:
            json_path, _ = write_report(report, s.training_path, names)
        except Exception as exc:  # the outcome is still announced, with the reason
            log.exception("run %s: cannot write the report", names.run_id)
            report.error = (report.error + "; " if report.error else "") + f"report: {exc}"
        await self._announce(req, report, json_path)
        return report

    async def _run(self, run: Run) -> None:
        s, report, req = run.settings, run.report, run.request

        # 1. corpus since the watermark (none yet: the whole corpus)
        async with run.stage("collect"):
            since = req.since or load_watermark(s.watermark_path)
            pairs = await asyncio.to_thread(self.corpus.pairs, since)
        report.total_pairs = len(pairs)
        await run.progress("collect", len(pairs), len(pairs), f"{len(pairs)} pairs since {since}")
        pipeline.check_collected(pairs, s, force=req.force)

        # 2. filter
        async with run.stage("filter"):
            await run.progress("filter", 0, len(pairs), "filtering pairs")

            async def embedded(done: int, total: int) -> None:
                await run.progress("filter", done, total, "embedding pairs")

            result = await run_filter(pairs, s, ChunkedEmbedder(self.embedder, embedded))
        report.funnel = list(result.stages)
        report.filtered_pairs = len(result.kept)
        await run.progress("filter", len(pairs), len(pairs), f"{len(result.kept)} pairs kept")
        pipeline.check_filtered(result.kept, s, force=req.force)

        # 3. split by prompt: held-out prompts never reach the model
        split = pipeline.split(result.kept, s)
        report.training_pairs = len(split.train)
        report.held_out_cases = len(split.held_out)
        report.funnel.append(split.stage)

        # 4. run files
        async with run.stage("generate"):
            new_model = run.names.model_name(s.base_model)
            examples = pipeline.few_shot_messages(
                split.train, s.max_examples, max_chars=s.example_budget_chars
            )
            records = generator.dataset_records(split.train, s.system_prompt)
            modelfile = render_modelfile(s.base_model, s.system_prompt, examples, {})
            files = generator.write_run_files(s.training_path, run.names, records, modelfile)
        report.artifacts.update(dataset=str(files.dataset), modelfile=str(files.modelfile))
        report.new_model = new_model

        # 5. the base model on the held-out cases, 6. the new model, then it on the same cases
        async with run.stage("validate_base"):
            base_results = await self._validate(run, "validate_base", s.base_model, split.held_out)
        t_train = time.perf_counter()
        async with run.stage("create"):
            await self._create(run, new_model, examples, files.dataset)
        report.training_time = round(time.perf_counter() - t_train, 3)
        async with run.stage("validate_new"):
            new_results = await self._validate(run, "validate_new", new_model, split.held_out)

        # 7. decide
        verdict = pipeline.judge(split.held_out, base_results, new_results, s)
        report = run.report = apply_comparison(report, verdict.comparison, verdict.decision)
        report.cases = verdict.cases
        if verdict.decision.failed:
            raise RuntimeError(verdict.decision.reason)

        # the run got this far: the next run starts after this one's data
        save_watermark(s.watermark_path, run.started)
        report.status = verdict.status
        validated = pipeline.validated_event(
            run.run_id,
            s,
            new_model,
            verdict,
            report_path=str(s.training_path / run.names.report_json_file),
            request_id=req.request_id,
        )
        async with run.stage("update_config"):
            if not verdict.decision.improved:
                await self.bus.publish(
                    subjects.MODEL_VALIDATED, validated, msg_id=run.names.validated_msg_id
                )
                return
            outcome = await self._switch_model(run, validated)
            if isinstance(outcome, ModelUpdated):
                report.config = {
                    "path": outcome.config_path,
                    "backup_path": outcome.backup_path,
                    "previous_model": outcome.previous_model,
                }
            else:
                report.status = "success_config_failed"
                report.error = outcome

    async def _create(
        self, run: Run, new_model: str, examples: list[ChatMessage], dataset: Path
    ) -> None:
        async def status(line: str) -> None:
            await run.progress("create", 0, None, line)

        s = run.settings
        if s.mode == "lora":
            run.report.lora = await model_builder.create_lora_model(
                self.bus, self.backend, s, run.names, new_model, dataset, status
            )
        else:
            await model_builder.create_message_model(self.backend, s, new_model, examples, status)

    async def _validate(
        self, run: Run, stage: str, model: str, held_out: list[Pair]
    ) -> list[ValidationResult]:
        cases = pipeline.validation_cases(run.run_id, model, held_out, run.settings)
        done = 0

        async def tick(_: ValidationResult) -> None:
            nonlocal done
            done += 1
            await run.progress(stage, done, len(cases), model)

        async def here(case: ValidationCase) -> ValidationResult:
            return await score_case(case, self.backend, self.embedder)

        results = await validate_cases(
            self.bus,
            cases,
            concurrency=run.settings.validation_concurrency,
            timeout_s=run.settings.validation_timeout_s,
            fallback=here,
            on_result=tick,
        )
        return sorted(results, key=lambda r: r.case_id)

    async def _switch_model(self, run: Run, validated: ModelValidated) -> ModelUpdated | str:
        """Publish `model.validated`; the config updater's `model.updated`, or why not."""
        wait_s = run.settings.config_wait_s
        try:
            answer = await self.bus.publish_and_wait(
                subjects.MODEL_VALIDATED,
                validated,
                msg_id=run.names.validated_msg_id,
                expect=[
                    Expect(subjects.MODEL_UPDATED, ModelUpdated, lambda e: e.run_id == run.run_id),
                    Expect(
                        subjects.MODEL_UPDATE_FAILED,
                        ModelUpdateFailed,
                        lambda e: e.run_id == run.run_id,
                    ),
                ],
                timeout=wait_s,
            )
        except TimeoutError:
            return (
                f"no config updater answered within {wait_s:.0f}s; "
                "model.validated stays on the bus for it"
            )
        if isinstance(answer, ModelUpdateFailed):
            return f"config update failed: {answer.error}"
        return answer


async def serve(
    bus: Bus,
    settings: Settings,
    backend: Backend,
    embedder: Embedder,
    corpus: Corpus,
    *,
    model_choice: str = "",
) -> Service:
    trainer = Trainer(bus, settings, backend, embedder, corpus, model_choice=model_choice)
    return await bus.serve(subjects.TRAINER, TrainingRequested, trainer.on_training_requested)
