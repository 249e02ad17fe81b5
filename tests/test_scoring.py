"""The promotion gate: held-out split by prompt, paired bootstrap comparison, decision."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from services.scoring import (
    compare,
    decide,
    held_out_count,
    normalize_prompt,
    split_held_out,
    topic_of,
)
from shared.messages import Pair

# --- split ----------------------------------------------------------------------------------------


def make_pairs(sizes: dict[str, int]) -> list[Pair]:
    pairs = []
    pid = 0
    for topic, count in sizes.items():
        for i in range(count):
            pid += 1
            pairs.append(
                Pair(
                    prompt=f"question {i} about {topic}",
                    completion=f"answer {i} about {topic}",
                    point_id=pid,
                    keywords=(topic, "other"),
                )
            )
    return pairs


def test_normalize_prompt_collapses_whitespace_and_width() -> None:
    assert normalize_prompt("  hello \n\t world  ") == "hello world"
    assert (
        normalize_prompt("ｈｅｌｌｏ　ｗｏｒｌｄ？") == "hello world?"
    )  # full-width, ideographic space
    assert normalize_prompt("") == ""


def test_topic_is_first_keyword_else_kind() -> None:
    assert topic_of(Pair(prompt="p", completion="c", point_id=1, keywords=(" Hotel ", "x"))) == (
        "hotel"
    )
    assert topic_of(Pair(prompt="p", completion="c", point_id=1, kind="note")) == "note"
    assert topic_of(Pair(prompt="p", completion="c", point_id=1, keywords=("  ",))) == "dialogue"


def test_every_topic_represented_when_n_at_least_topics() -> None:
    sizes = {"hotel": 40, "taxi": 3, "music": 10, "film": 2, "food": 25}
    pairs = make_pairs(sizes)
    for seed in range(20):
        train, held = split_held_out(pairs, 10, seed=seed)
        assert len(held) == 10
        topics = Counter(topic_of(p) for p in held)
        assert set(topics) == set(sizes)
        # proportional-ish: the largest topic gets the most held-out cases
        assert topics["hotel"] == max(topics.values())
        assert len(train) + len(held) == len(pairs)


def test_fewer_cases_than_topics_takes_one_from_each_of_n_topics() -> None:
    pairs = make_pairs({f"t{i}": 10 for i in range(8)})
    _, held = split_held_out(pairs, 5, seed=3)
    assert len({topic_of(p) for p in held}) == 5


def test_held_out_prompt_never_in_train_even_as_a_whitespace_or_width_variant() -> None:
    base = make_pairs({"hotel": 10, "taxi": 10})
    variants = []
    for i, p in enumerate(base):
        # the same prompt again, with different spacing or full-width characters
        variant = f"  {p.prompt.replace(' ', '   ')}\n" if i % 2 else p.prompt.upper()
        variants.append(Pair(prompt=variant, completion="other answer", point_id=1000 + i))
    full_width = [
        Pair(prompt="ｑｕｅｓｔｉｏｎ　０　ａｂｏｕｔ　ｈｏｔｅｌ", completion="x", point_id=2000)
    ]
    pairs = base + variants + full_width
    for seed in range(10):
        train, held = split_held_out(pairs, 4, seed=seed, max_fraction=0.5)
        held_prompts = {normalize_prompt(p.prompt) for p in held}
        assert len(held_prompts) == len(held) == 4
        assert not held_prompts & {normalize_prompt(p.prompt) for p in train}
        # every pair of a held-out prompt left train, not only the held-out pair itself
        removed = [p for p in pairs if normalize_prompt(p.prompt) in held_prompts]
        assert len(train) == len(pairs) - len(removed)
        assert len(removed) > len(held)


def test_full_width_duplicate_of_held_out_prompt_is_removed() -> None:
    pairs = [
        Pair(prompt="question 0 about hotel", completion="a", point_id=1, keywords=("hotel",)),
        Pair(prompt="ｑｕｅｓｔｉｏｎ　０　ａｂｏｕｔ　ｈｏｔｅｌ", completion="b", point_id=2),
        *make_pairs({"taxi": 9}),
    ]
    for seed in range(30):
        train, held = split_held_out(pairs, 2, seed=seed)
        if any(p.completion == "a" for p in held):
            assert all(p.completion not in ("a", "b") for p in train)
            break
    else:
        pytest.fail("prompt 0 was never held out in 30 seeds")


def test_split_is_deterministic_and_seed_dependent_and_order_independent() -> None:
    pairs = make_pairs({"hotel": 30, "taxi": 20, "music": 10})
    a = split_held_out(pairs, 12, seed=7)
    assert split_held_out(pairs, 12, seed=7) == a
    shuffled = [pairs[i] for i in np.random.default_rng(1).permutation(len(pairs))]
    _, held_shuffled = split_held_out(shuffled, 12, seed=7)
    assert {p.prompt for p in held_shuffled} == {p.prompt for p in a[1]}
    others = {tuple(p.prompt for p in split_held_out(pairs, 12, seed=s)[1]) for s in range(5)}
    assert len(others) > 1


def test_held_out_count_is_capped() -> None:
    assert held_out_count(100, 24) == 20  # 20% of the distinct prompts
    assert held_out_count(100, 10) == 10
    assert held_out_count(15, 24) == 3
    assert held_out_count(4, 24) == 0  # too few prompts to spare one
    assert held_out_count(2, 5, max_fraction=1.0) == 1  # never every prompt
    assert held_out_count(0, 5) == 0
    pairs = make_pairs({"hotel": 4})
    train, held = split_held_out(pairs, 24, seed=0)
    assert (train, held) == (pairs, [])
    # duplicates count once: 10 pairs but 5 distinct prompts → 1 held-out case
    dup = make_pairs({"a": 5}) + make_pairs({"a": 5})
    train, held = split_held_out(dup, 24, seed=0)
    assert len(held) == 1 and len(train) == 8


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="max_fraction"):
        split_held_out(make_pairs({"a": 10}), 2, seed=0, max_fraction=0)


# --- compare ------------------------------------------------------------------------------------


def synthetic(
    rng: np.random.Generator, n: int, effect: float, noise: float = 0.2
) -> tuple[list[float], list[float]]:
    """Paired scores: each case has its own difficulty, new = base + effect + noise."""
    difficulty = rng.uniform(0.2, 0.8, n)
    base = difficulty + rng.normal(0, noise, n)
    new = difficulty + effect + rng.normal(0, noise, n)
    return base.tolist(), new.tolist()


def test_bootstrap_ci_covers_the_true_difference_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(42)
    effect, reps, covered = 0.1, 200, 0
    for rep in range(reps):
        base, new = synthetic(rng, 40, effect)
        cmp = compare(base, new, samples=1000, seed=rep)
        covered += cmp.ci_low <= effect <= cmp.ci_high
    # percentile bootstrap of a mean: close to 95%, a bit under for small n
    assert 0.88 <= covered / reps <= 0.99


def test_clear_effect_excludes_zero_and_noise_rarely_does() -> None:
    rng = np.random.default_rng(5)
    base, new = synthetic(rng, 30, 0.15)
    cmp = compare(base, new, seed=1)
    assert cmp.ci_low > 0 and cmp.ci_high > cmp.ci_low
    assert cmp.mean_diff == pytest.approx(np.mean(np.subtract(new, base)))

    false_promotions = 0
    for rep in range(200):
        base, new = synthetic(rng, 30, 0.0)
        cmp = compare(base, new, samples=1000, seed=rep)
        false_promotions += cmp.ci_low > 0
    assert false_promotions / 200 <= 0.06  # one-sided: about 2.5% expected

    base, new = synthetic(np.random.default_rng(11), 30, 0.0)
    cmp = compare(base, new, seed=0)
    assert cmp.ci_low < 0 < cmp.ci_high


def test_errors_are_excluded_from_pairing_and_counted_per_side() -> None:
    base = [0.5, 0.5, None, 0.5, 0.9, None]
    new = [0.6, 0.7, 1.0, None, 0.8, None]
    cmp = compare(base, new, threshold=0.7, seed=0)
    assert (cmp.cases, cmp.n_paired) == (6, 3)
    assert (cmp.base_errors, cmp.new_errors, cmp.either_errors) == (2, 2, 3)
    # only cases 0, 1, 4: the base's error on case 2 is not a 0 that would favour the new model
    assert cmp.base_mean == pytest.approx((0.5 + 0.5 + 0.9) / 3)
    assert cmp.new_mean == pytest.approx((0.6 + 0.7 + 0.8) / 3)
    assert cmp.mean_diff == pytest.approx((0.1 + 0.2 - 0.1) / 3)
    # accuracy is score >= threshold, over the paired cases
    assert cmp.base_accuracy == pytest.approx(1 / 3)
    assert cmp.new_accuracy == pytest.approx(2 / 3)
    assert cmp.error_rate == pytest.approx(3 / 6)


def test_non_finite_scores_count_as_errors() -> None:
    cmp = compare([0.5, math.nan, 0.2], [0.6, 0.9, math.inf])
    assert (cmp.n_paired, cmp.base_errors, cmp.new_errors) == (1, 1, 1)


def test_zero_or_one_paired_cases_give_nan_ci_and_no_promotion() -> None:
    empty = compare([], [])
    assert empty.n_paired == 0 and math.isnan(empty.mean_diff) and math.isnan(empty.ci_low)
    d = decide(empty, cases=0)
    assert d.failed and not d.improved

    one = compare([0.1, None], [0.9, 0.5])
    assert one.n_paired == 1 and one.mean_diff == pytest.approx(0.8)
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high)
    d = decide(one, cases=2, max_error_rate=0.5)
    assert not d.improved and not d.failed and "too few" in d.reason

    all_errors = compare([None, None], [0.5, None])
    d = decide(all_errors, cases=2)
    assert d.failed and not d.improved


def test_compare_is_deterministic_for_a_seed() -> None:
    base, new = synthetic(np.random.default_rng(0), 25, 0.05)
    assert compare(base, new, seed=3) == compare(base, new, seed=3)
    assert compare(base, new, seed=3).ci_low != compare(base, new, seed=4).ci_low


def test_compare_ci_narrows_with_confidence_and_identical_diffs_are_exact() -> None:
    base, new = synthetic(np.random.default_rng(9), 40, 0.05)
    wide, narrow = compare(base, new, confidence=0.99), compare(base, new, confidence=0.8)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high
    same = compare([0.2, 0.4, 0.6], [0.3, 0.5, 0.7])
    assert same.ci_low == pytest.approx(0.1) and same.ci_high == pytest.approx(0.1)


def test_compare_rejects_unpaired_input_and_bad_parameters() -> None:
    with pytest.raises(ValueError, match="paired"):
        compare([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        compare([0.1], [0.2], confidence=1.0)
    with pytest.raises(ValueError, match="samples"):
        compare([0.1], [0.2], samples=0)


# --- decide -------------------------------------------------------------------------------------


def test_clear_gain_is_promoted_with_a_reason_that_has_the_numbers() -> None:
    base, new = synthetic(np.random.default_rng(1), 24, 0.15)
    cmp = compare(base, new, seed=0)
    d = decide(cmp, cases=24)
    assert d.improved and not d.failed
    assert f"{cmp.mean_diff:+.3f}" in d.reason
    assert f"95% CI {cmp.ci_low:+.3f}…{cmp.ci_high:+.3f}" in d.reason
    assert "24 held-out cases" in d.reason and "above the minimum effect 0.000" in d.reason


def test_min_effect_is_respected() -> None:
    base, new = synthetic(np.random.default_rng(2), 40, 0.1, noise=0.05)
    cmp = compare(base, new, seed=0)
    assert 0.0 < cmp.ci_low < 0.2
    assert decide(cmp, cases=40, min_effect=cmp.ci_low - 0.01).improved
    d = decide(cmp, cases=40, min_effect=cmp.ci_low + 0.01)
    assert not d.improved and not d.failed
    assert "not above the minimum effect" in d.reason and "base is kept" in d.reason


def test_no_effect_is_not_promoted() -> None:
    base, new = synthetic(np.random.default_rng(11), 30, 0.0)
    d = decide(compare(base, new, seed=0), cases=30)
    assert not d.improved and not d.failed


def test_too_many_errors_fail_validation() -> None:
    base = [0.5] * 10
    new = [0.9] * 7 + [None] * 3  # 30% errors, and a large gain on the rest
    cmp = compare(base, new)
    d = decide(cmp, cases=10, max_error_rate=0.25)
    assert d.failed and not d.improved
    assert "3 of 10" in d.reason and "new errors 3" in d.reason
    assert not decide(cmp, cases=10, max_error_rate=0.3).failed


def test_cases_that_never_came_back_count_as_errors() -> None:
    cmp = compare([0.2] * 8, [0.9] * 8)
    assert decide(cmp, cases=8).improved
    d = decide(cmp, cases=12)  # 4 of 12 cases missing from the results
    assert d.failed and "4 of 12" in d.reason
