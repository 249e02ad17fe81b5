"""The run's decisions, with no bus, clock, files or network: the trainer's functional core.

A run goes corpus → enough data? → filter → enough left? → split → validation cases → gate →
outcome. Each step here takes values and returns values (or raises `RunSkipped`); the trainer
(`services/trainer.py`) does the I/O between them and publishes what they decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services import generator, scoring
from shared.backend import ChatMessage
from shared.messages import (
    CaseResult,
    FunnelStage,
    ModelValidated,
    Pair,
    RunRecord,
    RunStatus,
    TrainingRequested,
    ValidationCase,
    ValidationResult,
)
from shared.modelfile import sanitize_text
from shared.names import check_model_name
from shared.settings import Settings
from shared.subjects import RunNames

LOCAL_NUM_PREDICT = 96  # CPU generation: answers long enough to compare, short enough to wait for


class RunSkipped(Exception):
    """The run stops early by design (not enough data); not a failure."""


def run_settings(settings: Settings, req: TrainingRequested) -> Settings:
    """The service's settings with the request's overrides; raises SettingsError on bad values
    and InvalidName on a base model outside the name grammar (before it reaches a Modelfile)."""
    changes = {"mode": req.mode, "model": req.base_model, "min_corpus": req.min_corpus}
    s = settings.replace(**{k: v for k, v in changes.items() if v is not None})
    check_model_name(s.base_model)
    return s


def started_record(names: RunNames, s: Settings) -> RunRecord:
    """The run record while the run is in progress: validators serve its two models."""
    return RunRecord(
        run_id=names.run_id,
        stage="running",
        mode=s.mode,
        base_model=s.base_model,
        new_model=names.model_name(s.base_model),
    )


def check_collected(pairs: Sequence[Pair], s: Settings, *, force: bool) -> None:
    if len(pairs) < s.min_corpus and not force:
        raise RunSkipped(
            f"{len(pairs)} pairs since the last run, fewer than min_corpus {s.min_corpus}"
        )


def check_filtered(kept: Sequence[Pair], s: Settings, *, force: bool) -> None:
    if len(kept) < s.min_corpus / 2 and not force:
        raise RunSkipped(
            f"{len(kept)} pairs left after filtering, fewer than half of min_corpus {s.min_corpus}"
        )


@dataclass(frozen=True)
class Split:
    train: list[Pair]
    held_out: list[Pair]
    stage: FunnelStage  # the funnel's `split` step


def split(kept: Sequence[Pair], s: Settings) -> Split:
    """Train / held-out, disjoint by prompt: a held-out prompt never reaches the new model."""
    train, held = scoring.split_held_out(
        kept, s.held_out, seed=s.seed, max_fraction=s.held_out_fraction
    )
    if not held or not train:
        raise RunSkipped(f"too few distinct prompts to hold out cases ({len(kept)} pairs)")
    stage = FunnelStage(
        stage="split",
        count_in=len(kept),
        count_out=len(train),
        dropped={
            "held_out": len(held),
            "same_prompt_as_held_out": len(kept) - len(train) - len(held),
        },
    )
    return Split(train=train, held_out=held, stage=stage)


def few_shot_messages(pairs: Sequence[Pair], n: int, *, max_chars: int) -> list[ChatMessage]:
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


def request_options(s: Settings) -> dict[str, Any]:
    """The chat options validation sends: the app's own over the run's reproducible ones."""
    options: dict[str, Any] = {"temperature": s.temperature, "seed": s.seed, **s.app_options}
    if s.backend == "local":
        options.setdefault("num_predict", LOCAL_NUM_PREDICT)
    return options


def request_shape(s: Settings) -> dict[str, Any]:
    """How validation asked both models, as the report records it. With a system prompt of
    the app's, Ollama drops the model's SYSTEM and puts the baked examples before it."""
    return {
        "system_sent": bool(s.app_system_prompt),
        "system": s.app_system_prompt or None,
        "options": request_options(s),
    }


def validation_cases(
    run_id: str, model: str, held_out: Sequence[Pair], s: Settings
) -> list[ValidationCase]:
    """One case per held-out pair, asked the way the app asks: its system prompt (none unless
    configured: ours would make Ollama drop the model's SYSTEM) and its options."""
    options = request_options(s)
    return [
        ValidationCase(
            run_id=run_id,
            case_id=i,
            model=model,
            prompt=p.prompt,
            expected=p.completion,
            system=s.app_system_prompt or None,
            options=options,
        )
        for i, p in enumerate(held_out)
    ]


@dataclass(frozen=True)
class Verdict:
    """The gate's answer on one run: the numbers, the decision and every case."""

    comparison: scoring.Comparison
    decision: scoring.Decision
    cases: list[CaseResult]

    @property
    def status(self) -> RunStatus:
        """The run's status once the config updater (if asked) has answered."""
        return "success" if self.decision.improved else "completed_no_improvement"


def judge(
    held_out: Sequence[Pair],
    base: Sequence[ValidationResult],
    new: Sequence[ValidationResult],
    s: Settings,
) -> Verdict:
    """Paired comparison of both models on the same held-out cases, and the decision."""
    cmp = scoring.compare(
        [r.score for r in base],
        [r.score for r in new],
        threshold=s.similarity_threshold,
        samples=s.bootstrap_samples,
        seed=s.seed,
    )
    decision = scoring.decide(
        cmp, min_effect=s.min_effect, max_error_rate=s.max_error_rate, cases=len(held_out)
    )
    cases = [
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
        for i, (p, b, n) in enumerate(zip(held_out, base, new, strict=True))
    ]
    return Verdict(comparison=cmp, decision=decision, cases=cases)


def validated_event(
    run_id: str,
    s: Settings,
    new_model: str,
    verdict: Verdict,
    *,
    report_path: str,
    request_id: str | None,
) -> ModelValidated:
    """`model.validated`: what the config updater needs to switch (or keep) the model."""
    cmp = verdict.comparison
    return ModelValidated(
        run_id=run_id,
        base_model=s.base_model,
        new_model=new_model,
        mode=s.mode,
        base_score=cmp.base_mean,
        new_score=cmp.new_mean,
        base_accuracy=cmp.base_accuracy,
        new_accuracy=cmp.new_accuracy,
        improved=verdict.decision.improved,
        cases=len(verdict.cases),
        report_path=report_path,
        reason=verdict.decision.reason,
        request_id=request_id,
    )


def validated_record(ev: ModelValidated) -> RunRecord:
    """The run record once decided: what the config updater checks `model.validated` against."""
    return RunRecord(
        run_id=ev.run_id,
        stage="validated",
        mode=ev.mode,
        base_model=ev.base_model,
        new_model=ev.new_model,
        improved=ev.improved,
        base_score=ev.base_score,
        new_score=ev.new_score,
        base_accuracy=ev.base_accuracy,
        new_accuracy=ev.new_accuracy,
        cases=ev.cases,
    )
