"""Trainer: one training run per `training.requested`, from corpus to a validated model.

corpus since the watermark → filter → split (train / held-out, disjoint by prompt) → run files
→ validate the base → create the new model (message mode: baked few-shot messages; lora mode: a
job for a LoRA worker) → validate the new model → decide → `model.validated` → report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from services import generator, scoring
from services.filter import run_filter
from services.memory_adapter import load_watermark, save_watermark
from services.report import (
    CaseResult,
    FunnelStage,
    RunReport,
    apply_comparison,
    read_report,
    write_report,
)
from services.validator import score_case, validate_cases
from shared import subjects
from shared.backend import Backend, ChatMessage, CreateProgress, CreateRequest
from shared.files import atomic_write, timestamp
from shared.messages import (
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    Pair,
    TrainingFinished,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    ValidationCase,
    ValidationResult,
    utc_now,
)
from shared.modelfile import render_modelfile, sanitize_text
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.bus import Bus, Delivery, Service
    from shared.corpus import Corpus
    from shared.embeddings import Embedder

log = logging.getLogger(__name__)


class RunSkipped(Exception):
    """The run stops early by design (not enough data); not a failure."""


@dataclass
class RunState:
    run_id: str
    ts: str
    request: TrainingRequested
    settings: Settings
    started: datetime = field(default_factory=utc_now)
    clock: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    funnel: list[FunnelStage] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    report: RunReport = field(default_factory=RunReport)

    @contextlib.asynccontextmanager
    async def stage(self, name: str):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)


def new_model_name(base: str, ts: str) -> str:
    """`qwen3:0.6b` → `mindx-qwen3-0.6b:20261126-120501` (a valid Ollama name)."""
    stem = base.rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"
    return f"mindx-{stem}:{ts.replace('_', '-')}"


def few_shot_messages(pairs: list[Pair], n: int, *, max_chars: int) -> list[ChatMessage]:
    """At most n examples spread evenly over the training split, within a character budget."""
    msgs: list[ChatMessage] = []
    used = 0
    for p in generator.select_examples(pairs, n):
        user, assistant = sanitize_text(p.prompt), sanitize_text(p.completion)
        if used + len(user) + len(assistant) > max_chars and msgs:
            break
        used += len(user) + len(assistant)
        msgs += [
            ChatMessage(role="user", content=user),
            ChatMessage(role="assistant", content=assistant),
        ]
    return msgs


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


ProgressSink = Callable[[TrainingProgress], Awaitable[None]]


class Trainer:
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        backend: Backend,
        embedder: Embedder,
        corpus: Corpus,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.backend = backend
        self.embedder = embedder
        self.corpus = corpus
        self.registry = RunRegistry(settings.training_path / "runs.json")
        self._lock = asyncio.Lock()

    # --- bus entry point --------------------------------------------------------------------
    async def on_training_requested(self, req: TrainingRequested, delivery: Delivery) -> None:
        ran_as = self.registry.get(req.request_id) if req.request_id else None
        if ran_as:
            log.info("request %s already ran as %s", req.request_id, ran_as)
            await self._announce_again(req, ran_as)
            return
        async with self._lock, delivery.keep_alive(every=5.0):
            await self.run(req)

    async def _announce_again(self, req: TrainingRequested, run_id: str) -> None:
        """A redelivered request whose run finished: repeat its outcome (the first
        announcement may be what failed), never the run."""
        path = self.settings.training_path / f"report_{run_id}.json"
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
            msg_id=f"finished-{report.run_id}",
        )

    # --- the run ----------------------------------------------------------------------------
    async def run(self, req: TrainingRequested) -> RunReport:
        s = self.settings.replace(
            **{
                k: v
                for k, v in {
                    "mode": req.mode,
                    "model": req.base_model,
                    "min_corpus": req.min_corpus,
                }.items()
                if v is not None
            }
        )
        ts = timestamp()
        run_id = (
            ts
            if not (s.training_path / f"report_{ts}.json").exists()
            else f"{ts}_{uuid.uuid4().hex[:4]}"
        )
        if req.request_id:
            self.registry.add(req.request_id, run_id)
        await self.bus.publish(
            subjects.TRAINING_STARTED,
            TrainingStarted(
                run_id=run_id,
                request_id=req.request_id,
                mode=s.mode,
                base_model=s.base_model,
                backend=s.backend,
            ),
        )
        state = RunState(run_id=run_id, ts=run_id, request=req, settings=s)
        report = state.report = RunReport(
            training_id=run_id,
            run_id=run_id,
            request_id=req.request_id,
            start_time=state.started,
            base_model=s.base_model,
            mode=s.mode,
            backend=s.backend,
            status="failed",
            min_effect=s.min_effect,
        )
        try:
            await self._run(state)
            report = state.report
        except RunSkipped as exc:
            report = state.report
            report.status = "skipped"
            report.decision_reason = str(exc)
        except Exception as exc:  # a failed run leaves config and watermark untouched
            log.exception("run %s failed", run_id)
            report = state.report
            report.status = "failed"
            report.error = f"{type(exc).__name__}: {exc}"
        report.end_time = utc_now()
        report.timings = state.timings
        report.funnel = state.funnel
        report.artifacts = {
            **state.artifacts,
            "report_json": str(s.training_path / f"report_{run_id}.json"),
            "report_html": str(s.training_path / f"report_{run_id}.html"),
        }
        json_path: Path | None = None
        try:
            json_path, _ = write_report(report, s.training_path, run_id)
        except Exception as exc:  # the outcome is still announced, with the reason
            log.exception("run %s: cannot write the report", run_id)
            report.error = (report.error + "; " if report.error else "") + f"report: {exc}"
        await self._announce(req, report, json_path)
        return report

    async def _progress(
        self,
        state: RunState,
        stage: str,
        done: int = 0,
        total: int | None = None,
        message: str = "",
    ) -> None:
        await self.bus.publish(
            subjects.progress_subject(state.run_id),
            TrainingProgress(
                run_id=state.run_id, stage=stage, done=done, total=total, message=message
            ),
        )

    async def _run(self, state: RunState) -> None:
        s = state.settings
        report = state.report
        req = state.request
        # 1. corpus since the watermark (none yet: the whole corpus)
        async with state.stage("collect"):
            since = req.since or load_watermark(s.watermark_path)
            pairs = await asyncio.to_thread(self.corpus.pairs, since)
        report.total_pairs = len(pairs)
        await self._progress(
            state, "collect", len(pairs), len(pairs), f"{len(pairs)} pairs since {since}"
        )
        if len(pairs) < s.min_corpus and not req.force:
            raise RunSkipped(
                f"{len(pairs)} pairs since the last run, fewer than min_corpus {s.min_corpus}"
            )

        # 2. filter
        async with state.stage("filter"):
            await self._progress(state, "filter", 0, len(pairs), "filtering pairs")

            async def embedded(done: int, total: int) -> None:
                await self._progress(state, "filter", done, total, "embedding pairs")

            result = await run_filter(pairs, s, ChunkedEmbedder(self.embedder, embedded))
        state.funnel += [
            FunnelStage(
                stage=st.stage,
                count_in=st.count_in,
                count_out=st.count_out,
                dropped=dict(st.dropped),
            )
            for st in result.stages
        ]
        kept = result.kept
        report.filtered_pairs = len(kept)
        await self._progress(state, "filter", len(pairs), len(pairs), f"{len(kept)} pairs kept")
        if len(kept) < s.min_corpus / 2 and not req.force:
            raise RunSkipped(
                f"{len(kept)} pairs left after filtering, "
                f"fewer than half of min_corpus {s.min_corpus}"
            )

        # 3. split by prompt: held-out prompts never reach the model
        train, held = scoring.split_held_out(
            kept, s.held_out, seed=s.seed, max_fraction=s.held_out_fraction
        )
        if not held or not train:
            raise RunSkipped(f"too few distinct prompts to hold out cases ({len(kept)} pairs)")
        report.training_pairs = len(train)
        report.held_out_cases = len(held)
        state.funnel.append(
            FunnelStage(
                stage="split",
                count_in=len(kept),
                count_out=len(train),
                dropped={
                    "held_out": len(held),
                    "same_prompt_as_held_out": len(kept) - len(train) - len(held),
                },
            )
        )

        # 4. run files
        async with state.stage("generate"):
            new_model = new_model_name(s.base_model, state.ts)
            examples = few_shot_messages(train, s.max_examples, max_chars=s.example_budget_chars)
            records = generator.dataset_records(train, s.system_prompt)
            modelfile = render_modelfile(s.base_model, s.system_prompt, examples, {})
            files = generator.write_run_files(s.training_path, state.ts, records, modelfile)
        state.artifacts.update(dataset=str(files.dataset), modelfile=str(files.modelfile))
        report.new_model = new_model

        # 5. base model on the held-out cases
        async with state.stage("validate_base"):
            base_results = await self._validate(state, "validate_base", s.base_model, held)

        # 6. the new model
        t_train = time.perf_counter()
        async with state.stage("create"):
            if s.mode == "lora":
                lora = await self._create_lora(state, new_model, files.dataset)
                report.lora = lora
            else:
                await self._create_message_model(state, new_model, examples)
        report.training_time = round(time.perf_counter() - t_train, 3)

        async with state.stage("validate_new"):
            new_results = await self._validate(state, "validate_new", new_model, held)

        # 7. decide
        cmp = scoring.compare(
            [r.score for r in base_results],
            [r.score for r in new_results],
            threshold=s.similarity_threshold,
            samples=s.bootstrap_samples,
            seed=s.seed,
        )
        decision = scoring.decide(
            cmp, min_effect=s.min_effect, max_error_rate=s.max_error_rate, cases=len(held)
        )
        report = state.report = apply_comparison(report, cmp, decision)
        report.cases = [
            CaseResult(
                case_id=i,
                prompt=p.prompt,
                expected=p.completion,
                base_answer=b.answer,
                new_answer=n.answer,
                base_score=b.score,
                new_score=n.score,
                base_error=b.error,
                new_error=n.error,
                topic=scoring.topic_of(p),
            )
            for i, (p, b, n) in enumerate(zip(held, base_results, new_results, strict=True))
        ]
        if decision.failed:
            raise RuntimeError(decision.reason)

        # the run got this far: the next run starts after this one's data
        save_watermark(s.watermark_path, state.started)
        report.status = "success" if decision.improved else "completed_no_improvement"

        json_path = s.training_path / f"report_{state.ts}.json"
        validated = ModelValidated(
            run_id=state.run_id,
            base_model=s.base_model,
            new_model=new_model,
            mode=s.mode,
            base_score=cmp.base_mean,
            new_score=cmp.new_mean,
            base_accuracy=cmp.base_accuracy,
            new_accuracy=cmp.new_accuracy,
            improved=decision.improved,
            cases=len(held),
            report_path=str(json_path),
            reason=decision.reason,
            request_id=req.request_id,
        )
        async with state.stage("update_config"):
            if decision.improved:
                outcome = await self._publish_and_wait_config(state, validated)
                if isinstance(outcome, ModelUpdated):
                    report.config = {
                        "path": outcome.config_path,
                        "backup_path": outcome.backup_path,
                        "previous_model": outcome.previous_model,
                    }
                else:
                    report.status = "success_config_failed"
                    report.error = outcome
            else:
                await self.bus.publish(
                    subjects.MODEL_VALIDATED, validated, msg_id=f"validated-{state.run_id}"
                )

    async def _validate(
        self, state: RunState, stage: str, model: str, held: list[Pair]
    ) -> list[ValidationResult]:
        s = state.settings
        options: dict[str, Any] = {"temperature": s.temperature, "seed": s.seed}
        if s.backend == "local":
            options["num_predict"] = 96  # CPU generation: answers long enough to compare
        cases = [
            ValidationCase(
                run_id=state.run_id,
                case_id=i,
                model=model,
                prompt=p.prompt,
                expected=p.completion,
                system=s.validation_system,
                options=options,
            )
            for i, p in enumerate(held)
        ]
        done = 0

        async def tick(_: ValidationResult) -> None:
            nonlocal done
            done += 1
            await self._progress(state, stage, done, len(cases), model)

        async def here(case: ValidationCase) -> ValidationResult:
            return await score_case(case, self.backend, self.embedder)

        results = await validate_cases(
            self.bus,
            cases,
            concurrency=s.validation_concurrency,
            timeout_s=s.validation_timeout_s,
            fallback=here,
            on_result=tick,
        )
        return sorted(results, key=lambda r: r.case_id)

    async def _create_message_model(
        self, state: RunState, new_model: str, examples: list[ChatMessage]
    ) -> None:
        s = state.settings

        async def on_line(p: CreateProgress) -> None:
            await self._progress(state, "create", 0, None, p.status)

        await self.backend.create(
            CreateRequest(
                model=new_model,
                from_=s.base_model,
                system=sanitize_text(s.system_prompt),
                messages=examples,
            ),
            on_progress=on_line,
        )

    async def _create_lora(self, state: RunState, new_model: str, dataset: Path) -> dict[str, Any]:
        from services.lora_client import create_lora_model  # heavy path, loaded on demand

        return await create_lora_model(self, state, new_model, dataset)

    async def _publish_and_wait_config(
        self, state: RunState, validated: ModelValidated
    ) -> ModelUpdated | str:
        """Publish `model.validated`; wait for the config updater's `model.updated` or failure."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[ModelUpdated | str] = loop.create_future()

        async def on_updated(ev: ModelUpdated) -> None:
            if ev.run_id == state.run_id and not answer.done():
                answer.set_result(ev)

        async def on_failed(ev: ModelUpdateFailed) -> None:
            if ev.run_id == state.run_id and not answer.done():
                answer.set_result(f"config update failed: {ev.error}")

        subs = [
            await self.bus.subscribe(subjects.MODEL_UPDATED, ModelUpdated, on_updated),
            await self.bus.subscribe(subjects.MODEL_UPDATE_FAILED, ModelUpdateFailed, on_failed),
        ]
        try:
            await self.bus.publish(
                subjects.MODEL_VALIDATED, validated, msg_id=f"validated-{state.run_id}"
            )
            try:
                return await asyncio.wait_for(answer, state.settings.config_wait_s)
            except TimeoutError:
                return (
                    f"no config updater answered within {state.settings.config_wait_s:.0f}s; "
                    "model.validated stays on the bus for it"
                )
        finally:
            for sub in subs:
                await sub.stop()


async def serve(
    bus: Bus, settings: Settings, backend: Backend, embedder: Embedder, corpus: Corpus
) -> Service:
    trainer = Trainer(bus, settings, backend, embedder, corpus)
    return await bus.serve(subjects.TRAINER, TrainingRequested, trainer.on_training_requested)
