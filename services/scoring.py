"""The promotion gate's statistics: held-out split, paired comparison, decision.

Pure: no clock, files or network. The original graded the new model on cases drawn from its own
training data and compared two means with no notion of noise; here the held-out prompts never
appear in training, the comparison is paired (same case, both models), and a model is promoted
only when the lower bound of a bootstrap confidence interval of the mean difference clears the
minimum effect.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from shared.messages import Pair

# Rows of the bootstrap index matrix built at once; bounds memory to ~CHUNK * n ints.
_BOOTSTRAP_CHUNK = 500


def normalize_prompt(text: str) -> str:
    """The form two prompts are compared in: NFKC (full-width → ASCII), whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def topic_of(pair: Pair) -> str:
    """The stratum of a pair: its first keyword, else its kind."""
    for keyword in pair.keywords:
        topic = normalize_prompt(keyword).casefold()
        if topic:
            return topic
    return pair.kind


def held_out_count(distinct_prompts: int, n: int, *, max_fraction: float = 0.2) -> int:
    """How many prompts to hold out: at most n, at most max_fraction of the distinct prompts,
    and never all of them (training must keep at least one prompt)."""
    if distinct_prompts <= 1 or n <= 0:
        return 0
    return max(0, min(n, math.floor(max_fraction * distinct_prompts + 1e-9), distinct_prompts - 1))


def split_held_out(
    pairs: Sequence[Pair],
    n: int,
    *,
    seed: int,
    max_fraction: float = 0.2,
    exclude: Collection[str] = frozenset(),
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, held_out), by prompt and stratified by topic.

    `exclude`: normalized prompts never held out (the live model saw them, so a case on one
    would not be fair to the new model); they stay in train. The count is taken over all
    distinct prompts, so it does not shrink as the live model's share grows, only when fewer
    prompts are left to hold out.

    One held-out case per chosen prompt (the first pair with that prompt, in input order). Every
    pair whose normalized prompt equals a held-out prompt is left out of train, so the new model is
    never graded on a prompt it was trained on. Topics are visited in a seeded order and each
    pick goes to the topic with the smallest share already taken (taken / size): every topic gets
    one case before any gets a second, then picks follow topic sizes. Deterministic for a seed and
    independent of the input order of the pairs' prompts.
    """
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    first: dict[str, Pair] = {}  # normalized prompt → its first pair
    for pair in pairs:
        first.setdefault(normalize_prompt(pair.prompt), pair)
    candidates = {p: pair for p, pair in first.items() if p not in exclude}
    count = min(held_out_count(len(first), n, max_fraction=max_fraction), len(candidates))
    if count == 0:
        return list(pairs), []

    by_topic: dict[str, list[str]] = {}
    for prompt, pair in candidates.items():
        by_topic.setdefault(topic_of(pair), []).append(prompt)
    rng = np.random.default_rng(seed)
    topics = sorted(by_topic)
    order = [topics[i] for i in rng.permutation(len(topics))]
    queues: dict[str, list[str]] = {}
    for topic in order:
        prompts = sorted(by_topic[topic])
        queues[topic] = [prompts[i] for i in rng.permutation(len(prompts))]

    sizes = {topic: len(queues[topic]) for topic in order}
    taken = dict.fromkeys(order, 0)
    chosen: list[str] = []
    while len(chosen) < count:
        # min() keeps the first of equal shares, so ties follow the seeded topic order.
        topic = min((t for t in order if taken[t] < sizes[t]), key=lambda t: taken[t] / sizes[t])
        chosen.append(queues[topic][taken[topic]])
        taken[topic] += 1

    held_prompts = set(chosen)
    held_out = [first[p] for p in chosen]
    train = [p for p in pairs if normalize_prompt(p.prompt) not in held_prompts]
    return train, held_out


@dataclass(frozen=True, slots=True)
class Comparison:
    """Paired comparison of base and new scores on the same held-out cases.

    Means, accuracies and the difference are over the paired cases only (both sides scored):
    an error on one side is never counted as a 0 for that side. NaN where undefined.
    """

    cases: int  # all cases given
    n_paired: int  # cases scored on both sides
    base_errors: int  # cases where the base could not be scored
    new_errors: int  # cases where the new model could not be scored
    either_errors: int  # cases with an error on at least one side
    base_mean: float
    new_mean: float
    base_accuracy: float  # share of paired cases with score >= threshold
    new_accuracy: float
    mean_diff: float  # mean of (new - base) over paired cases
    ci_low: float  # paired bootstrap percentile CI of mean_diff
    ci_high: float
    confidence: float
    threshold: float
    samples: int

    @property
    def error_rate(self) -> float:
        return self.either_errors / self.cases if self.cases else math.nan


def _as_array(scores: Sequence[float | None]) -> np.ndarray:
    """Scores as floats with NaN for an error (None, or a non-finite score)."""
    return np.array([math.nan if s is None else float(s) for s in scores], dtype=float)


def bootstrap_mean_ci(
    diffs: np.ndarray, *, samples: int, seed: int, confidence: float
) -> tuple[float, float]:
    """Percentile CI of the mean of `diffs`, resampling cases with replacement."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=float)
    for start in range(0, samples, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, samples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def compare(
    base_scores: Sequence[float | None],
    new_scores: Sequence[float | None],
    *,
    threshold: float = 0.7,
    samples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Compare per-case scores of base and new model (same order; None = scoring error)."""
    if len(base_scores) != len(new_scores):
        raise ValueError(
            f"base and new scores must be paired: {len(base_scores)} != {len(new_scores)}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    base, new = _as_array(base_scores), _as_array(new_scores)
    base_ok, new_ok = np.isfinite(base), np.isfinite(new)
    both = base_ok & new_ok
    b, m = base[both], new[both]
    n = int(both.sum())
    diffs = m - b
    ci_low, ci_high = bootstrap_mean_ci(diffs, samples=samples, seed=seed, confidence=confidence)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else math.nan

    return Comparison(
        cases=len(base),
        n_paired=n,
        base_errors=int((~base_ok).sum()),
        new_errors=int((~new_ok).sum()),
        either_errors=int((~both).sum()),
        base_mean=mean(b),
        new_mean=mean(m),
        base_accuracy=mean((b >= threshold).astype(float)),
        new_accuracy=mean((m >= threshold).astype(float)),
        mean_diff=mean(diffs),
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        threshold=threshold,
        samples=samples,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    improved: bool  # promote the new model
    failed: bool  # validation itself failed (too many errors, no cases)
    reason: str  # one sentence, with the numbers, for a person
    error_rate: float
    min_effect: float
    max_error_rate: float


def num(x: float | None, fmt: str = ".3f") -> str:
    """A number for people; "—" where it was not measured (None, NaN, inf)."""
    return "—" if x is None or not math.isfinite(x) else format(x, fmt)


def signed(x: float | None) -> str:
    """A score difference: always with its sign, three decimals."""
    return num(x, "+.3f")


def decide(
    cmp: Comparison,
    *,
    min_effect: float = 0.0,
    max_error_rate: float = 0.25,
    cases: int,
    incumbent: Comparison | None = None,
    failures: int | None = None,
) -> Decision:
    """Promote only when the CI's lower bound is above min_effect; fail on too many errors.

    With an `incumbent` (new − live model on the same cases): promote only when the lower
    bound of that CI is above min_effect and the new model is no worse than the base, i.e. its
    CI over the base is not entirely below 0. `failures`: cases with an error on any side
    (default: those of `cmp`).
    """

    def result(improved: bool, failed: bool, reason: str, rate: float) -> Decision:
        return Decision(improved, failed, reason, rate, min_effect, max_error_rate)

    if cases <= 0:
        return result(False, True, "no held-out cases to validate on", math.nan)
    # Cases that never came back (not in cmp) are errors too.
    if failures is None:
        failures = cmp.either_errors
    failures += max(0, cases - cmp.cases)
    rate = failures / cases
    if rate > max_error_rate:
        return result(
            False,
            True,
            f"validation failed: {failures} of {cases} held-out cases could not be "
            f"scored (base errors {cmp.base_errors}, new errors {cmp.new_errors}"
            + (f", live model errors {incumbent.base_errors}" if incumbent else "")
            + f"; {rate:.0%} > allowed {max_error_rate:.0%})",
            rate,
        )
    pct = f"{cmp.confidence:.0%}"
    errors = (
        f" ({failures} case{'s' if failures != 1 else ''} with a scoring error left out)"
        if failures
        else ""
    )
    paired = min(cmp.n_paired, incumbent.n_paired) if incumbent else cmp.n_paired
    if paired < 2 or math.isnan(cmp.ci_low) or (incumbent and math.isnan(incumbent.ci_low)):
        kept = "the live model stays" if incumbent else "the base is kept"
        return result(
            False,
            False,
            f"only {paired} held-out case{'s' if paired != 1 else ''} scored on "
            f"{'all three models' if incumbent else 'both sides'}{errors}: too few to estimate "
            f"a confidence interval, so {kept}",
            rate,
        )
    if incumbent is not None:
        head = (
            f"new model scores {signed(incumbent.mean_diff)} ({pct} CI "
            f"{signed(incumbent.ci_low)}…{signed(incumbent.ci_high)}) over the live model and "
            f"{signed(cmp.mean_diff)} ({pct} CI {signed(cmp.ci_low)}…{signed(cmp.ci_high)}) "
            f"over base on {paired} held-out cases{errors}; "
        )
        if incumbent.ci_low <= min_effect:
            why = f"lower bound over the live model not above the minimum effect {min_effect:.3f}"
            return result(False, False, head + why + ", so the live model stays", rate)
        if cmp.ci_high < 0:
            why = "worse than the base (the whole interval over it is below 0)"
            return result(False, False, head + why + ", so the live model stays", rate)
        why = f"lower bound above the minimum effect {min_effect:.3f}, and no worse than the base"
        return result(True, False, head + why, rate)
    head = (
        f"new model scores {signed(cmp.mean_diff)} ({pct} CI {signed(cmp.ci_low)}…"
        f"{signed(cmp.ci_high)}) over base on {cmp.n_paired} held-out cases{errors}; "
    )
    if cmp.ci_low > min_effect:
        return result(
            True, False, head + f"lower bound above the minimum effect {min_effect:.3f}", rate
        )
    return result(
        False,
        False,
        head + f"lower bound not above the minimum effect {min_effect:.3f}, so the base is kept",
        rate,
    )
