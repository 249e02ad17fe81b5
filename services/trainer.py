"""Trainer: one training run per `training.requested`, from corpus to a validated model.

This is the imperative shell of a run: it reads the corpus, calls the filter, writes the run
files, asks the validators, has the model built, publishes the outcome and writes the report.
Every decision on the way (enough new data? which split? promote?) is made in
`services/pipeline.py`. Every model it creates gets a lineage record first (`services/lineage`);
a challenger that loses, or a run that fails after creating one, deletes it from the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
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

from services import generator, lineage, model_builder, pipeline
from services.filter import embedding_text, run_filter
from services.memory_adapter import save_watermark
from services.model_config import ConfigError, left_model, read_config
from services.report import apply_comparison, read_report, write_report
from services.validator import score_case, validate_cases
from shared import subjects
from shared.backend import Backend, BackendError, ChatMessage, ModelNotFound
from shared.bus import Expect
from shared.files import atomic_write, create_new, ensure_private_dir, timestamp
from shared.messages import (
    ModelLineage,
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    Pair,
    RunRecord,
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
from shared.names import same_model
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


class PointsForgotten(Exception):
    """Memory points the run read were forgotten while it ran: it stops, and keeps no file or
    model that holds them."""


class RunDeadlineExceeded(Exception):
    """The run took longer than its deadline (`--run-timeout`): a hung model server, say."""


def claim_run_id(training_dir: Path) -> str:
    """A run id no other run of `training_dir` has, even one another trainer process starts in
    the same second (one id twice would mix their files, and JetStream would drop the second
    run's events as repeats): claimed by creating its claim file, which the run's report
    replaces as the mark once written."""
    training = ensure_private_dir(training_dir)
    ts = timestamp()
    for run_id in itertools.chain([ts], (f"{ts}_{uuid.uuid4().hex[:4]}" for _ in range(64))):
        names = RunNames(run_id)
        if (training / names.report_json_file).exists():
            continue
        if create_new(training / names.claim_file, b""):
            return run_id
    raise RuntimeError(f"no free run id for {ts} in {training}")


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
    record: RunRecord | None = None  # the run's entry in the RUNS bucket, once written
    lineage: ModelLineage | None = None  # the new model's, once it is being created
    deadline: asyncio.Timeout | None = None  # disarmed once the run's outcome is decided

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

    # --- the run ----------------------------------------------------------------------------
    async def run(self, req: TrainingRequested) -> RunReport:
        names = RunNames(claim_run_id(self.settings.training_path))
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
            await self._record(run, pipeline.started_record(names, s))
            try:
                async with asyncio.timeout(s.run_deadline_s) as run.deadline:
                    await self._run(run)
            except TimeoutError as exc:
                if run.deadline is None or not run.deadline.expired():
                    raise
                raise RunDeadlineExceeded(
                    f"the run did not finish within its deadline of {s.run_deadline_s:g} s "
                    "(--run-timeout); config and watermark are unchanged"
                ) from exc
        except pipeline.RunSkipped as exc:
            run.report.status = "skipped"
            run.report.decision_reason = str(exc)
        except Exception as exc:  # a failed run leaves config and watermark untouched
            log.exception("run %s failed", names.run_id)
            run.report.status = "failed"
            run.report.error = f"{type(exc).__name__}: {exc}"
            if run.lineage is not None and run.lineage.status == "candidate":
                await self._discard(run, f"the run failed: {run.report.error}")
            if isinstance(exc, PointsForgotten):
                for name in (names.dataset_file, names.modelfile_file):
                    (s.training_path / name).unlink(missing_ok=True)
                run.report.artifacts.clear()
        report = run.report
        if run.record is not None:  # validators stop serving it; a late model.validated matches
            try:
                finished = msgspec.structs.replace(
                    run.record, stage="finished", status=report.status, at=utc_now()
                )
                await self._record(run, finished)
            except Exception:
                log.warning("run %s: the run record still says %s", names.run_id, run.record.stage)
        report.request_id, report.start_time = req.request_id, run.started
        report.end_time = utc_now()
        report.artifacts.update(
            report_json=str(s.training_path / names.report_json_file),
            report_html=str(s.training_path / names.report_html_file),
        )
        json_path: Path | None = None
        try:
            json_path, _ = write_report(report, s.training_path, names)
            (s.training_path / names.claim_file).unlink(missing_ok=True)
        except Exception as exc:  # the outcome is still announced, with the reason
            log.exception("run %s: cannot write the report", names.run_id)
            report.error = (report.error + "; " if report.error else "") + f"report: {exc}"
        await self._announce(req, report, json_path)
        return report

    async def _run(self, run: Run) -> None:
        s, report, req = run.settings, run.report, run.request

        # 1. the whole corpus; new is what arrived since the last promoted model's corpus
        async with run.stage("collect"):
            snapshot = await asyncio.to_thread(self.corpus.snapshot)
            models = await lineage.load_all(self.bus)
            cutoff = pipeline.arrival_cutoff(models, req.since)
            new = pipeline.arrived_since(snapshot, cutoff)
            incumbent = await self._incumbent(s)
        since = (
            f"--since {req.since.isoformat()}"
            if req.since
            else "the last promoted model"
            if cutoff
            else "the start (nothing promoted yet)"
        )
        report.total_pairs, report.new_pairs = len(snapshot.pairs), len(new)
        await run.progress(
            "collect", len(new), len(new), f"{len(new)} of {len(snapshot.pairs)} pairs new"
        )
        pipeline.check_collected(new, s, force=req.force, since=since)

        # 2. filter the whole corpus, latest arrivals first (they win ties)
        pairs = pipeline.newest_first(snapshot)
        async with run.stage("filter"):
            await run.progress("filter", 0, len(pairs), "filtering pairs")

            async def embedded(done: int, total: int) -> None:
                await run.progress("filter", done, total, "embedding pairs")

            result = await run_filter(pairs, s, ChunkedEmbedder(self.embedder, embedded))
        report.funnel = list(result.stages)
        report.filtered_pairs = len(result.kept)
        await run.progress("filter", len(pairs), len(pairs), f"{len(result.kept)} pairs kept")
        pipeline.check_filtered(result.kept, s, force=req.force)

        # 3. split by prompt: held-out prompts never reach the new model, nor did the live one
        live_lineage = pipeline.lineage_of(models, incumbent) if incumbent else None
        seen = pipeline.seen_prompts(snapshot.pairs, live_lineage)
        split = pipeline.split(result.kept, s, exclude=seen)
        report.training_pairs = len(split.train)
        report.held_out_cases = len(split.held_out)
        report.validation_request = pipeline.request_shape(s)
        report.funnel.append(split.stage)
        if incumbent is not None and run.record is not None:  # validators serve it too
            report.incumbent_model = incumbent
            await self._record(run, msgspec.structs.replace(run.record, incumbent_model=incumbent))

        # 4. run files (none for a point forgotten meanwhile)
        read = {p.point_id for p in snapshot.pairs}
        await self._check_forgotten(read)
        async with run.stage("generate"):
            new_model = run.names.model_name(s.base_model)
            vectors = await self.embedder.embed([embedding_text(p) for p in split.train])
            chosen = pipeline.few_shot_examples(
                split.train, s.max_examples, max_chars=s.example_budget_chars, vectors=vectors
            )
            examples = generator.chat_messages(chosen)
            records = generator.dataset_records(split.train, s.system_prompt)
            modelfile = render_modelfile(s.base_model, s.system_prompt, examples, {})
            files = generator.write_run_files(s.training_path, run.names, records, modelfile)
        report.artifacts.update(dataset=str(files.dataset), modelfile=str(files.modelfile))
        report.new_model = new_model
        report.selection = pipeline.selection_text(
            s,
            total=len(snapshot.pairs),
            new=len(new),
            since=since,
            incumbent=incumbent,
            excluded=len(seen) if live_lineage else None,
            examples=len(chosen),
        )

        # 5. the base (and the live model) on the held-out cases, 6. the new model on them
        async with run.stage("validate_base"):
            base_results = await self._validate(run, "validate_base", s.base_model, split.held_out)
        live_results = None
        if incumbent is not None:
            async with run.stage("validate_incumbent"):
                live_results = await self._validate(
                    run, "validate_incumbent", incumbent, split.held_out
                )
        run.lineage = pipeline.lineage(
            run.names,
            new_model,
            s,
            holds=chosen if s.mode == "message" else split.train,
            snapshot=snapshot,
            base_digest=await self._digest(s.base_model),
            dataset_sha256=hashlib.sha256(files.dataset.read_bytes()).hexdigest(),
        )
        # before the model exists, so no model is ever without its lineage
        await lineage.save(self.bus, run.lineage, s.training_path, new_file=True)
        t_train = time.perf_counter()
        async with run.stage("create"):
            await self._create(run, new_model, examples, files.dataset)
        report.training_time = round(time.perf_counter() - t_train, 3)
        async with run.stage("validate_new"):
            new_results = await self._validate(run, "validate_new", new_model, split.held_out)
        await self._check_forgotten(read)  # before anything decides on the model

        # 7. decide
        verdict = pipeline.judge(split.held_out, base_results, new_results, s, live_results)
        report = run.report = apply_comparison(
            report, verdict.comparison, verdict.decision, verdict.incumbent
        )
        report.cases = verdict.cases
        if verdict.decision.failed:
            raise RuntimeError(verdict.decision.reason)

        # the run got this far: the rest (the config switch) is bounded by config_wait_s, not by
        # the deadline
        if run.deadline is not None:
            run.deadline.reschedule(None)
        report.status = verdict.status
        validated = pipeline.validated_event(
            run.run_id,
            s,
            new_model,
            verdict,
            report_path=str(s.training_path / run.names.report_json_file),
            request_id=req.request_id,
        )
        await self._record(run, pipeline.validated_record(validated, incumbent))
        run.lineage = msgspec.structs.replace(run.lineage, decision=verdict.decision.reason)
        async with run.stage("update_config"):
            if not verdict.decision.improved:
                await self.bus.publish(
                    subjects.MODEL_VALIDATED, validated, msg_id=run.names.validated_msg_id
                )
                await self._discard(run, verdict.decision.reason)  # nothing moves
                return
            outcome = await self._switch_model(run, validated)
            if isinstance(outcome, ModelUpdated):
                # the seed's tools read the watermark: the time of the last promotion
                save_watermark(s.watermark_path, run.started)
                report.config = {
                    "path": outcome.config_path,
                    "backup_path": outcome.backup_path,
                    "previous_model": outcome.previous_model,
                }
            else:
                report.status = "success_config_failed"
                report.error = outcome
                if outcome.startswith("config update failed"):  # no updater will apply it
                    await self._discard(run, outcome)
                else:  # model.validated waits on the bus: the model must still be there
                    run.lineage = msgspec.structs.replace(run.lineage, status="unconfirmed")
                    await lineage.save(self.bus, run.lineage, s.training_path)

    async def _check_forgotten(self, read: set[int]) -> None:
        gone = sorted(read & await asyncio.to_thread(self.corpus.forgotten_ids))
        if gone:
            ids = ", ".join(str(i) for i in gone[:10]) + (" ..." if len(gone) > 10 else "")
            raise PointsForgotten(f"memory point(s) {ids} were forgotten during the run")

    async def _incumbent(self, s: Settings) -> str | None:
        """The config's live model when it is not the base and the backend still has it."""
        try:
            live = left_model(read_config(s.config_path), s.left_key)
        except FileNotFoundError:
            return None
        except (OSError, ConfigError) as exc:
            log.warning("no live model from %s (%s); gating on the base", s.config_path, exc)
            return None
        live = pipeline.incumbent_of(live, s.base_model)
        if live is None:
            return None
        try:
            await self.backend.show(live)
        except ModelNotFound:
            log.warning("the live model %s is not on the backend; gating on the base", live)
            return None
        return live

    async def _digest(self, model: str) -> str:
        """The backend's digest of `model` ("" when it has none to tell)."""
        try:
            tags = await self.backend.tags()
        except BackendError as exc:
            log.warning("no digest of %s: %s", model, exc)
            return ""
        return next((t.digest for t in tags if same_model(t.name, model)), "")

    async def _discard(self, run: Run, why: str) -> None:
        """Delete the run's model from the backend and mark its lineage rejected: a challenger
        that lost, or one a failed run left behind."""
        record = run.lineage
        if record is None:
            return
        try:
            await self.backend.delete(record.model)
        except ModelNotFound:
            pass  # never created
        except BackendError as exc:  # stays a candidate, so it is plain what is left over
            log.warning("run %s: cannot delete %s: %s", run.run_id, record.model, exc)
            return
        run.lineage = msgspec.structs.replace(
            record, status="rejected", decision=why, retired_at=utc_now()
        )
        try:
            await lineage.save(self.bus, run.lineage, run.settings.training_path)
        except Exception as exc:
            log.warning("run %s: the lineage still says candidate: %s", run.run_id, exc)

    async def _record(self, run: Run, record: RunRecord) -> None:
        """Write the run record: what validators and the config updater trust about the run."""
        await self.bus.put_record(subjects.RUNS, run.run_id, record)
        run.record = record

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
            concurrency=run.settings.cases_in_flight(len(cases)),
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
