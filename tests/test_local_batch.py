"""Batched greedy generation in the local backend.

The collector is tested with a stand-in for the model; the answers are tested on the real
SmolLM2-135M-Instruct: chats gathered into one batch must answer exactly as they do alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services import app, pipeline
from services.collector import pairs_from_point
from services.memory_adapter import read_memory_file
from services.trainer import Run, Trainer
from services.validator import validate_cases
from shared import subjects
from shared.backend import ChatMessage, ChatResponse, CreateRequest
from shared.bundled import chat_gguf
from shared.bus import Bus
from shared.embeddings import Embedder
from shared.messages import Pair, RunRecord, RunReport, TrainingRequested
from shared.settings import Settings
from shared.subjects import RunNames
from training import local_batch
from training.local_backend import LocalBackend
from training.local_batch import ChatBatcher, batchable, explain_difference
from training.local_models import Source, generate_ids, load_model, prepare
from training.local_semantics import GenerationOptions, ModelRecord, build_prompt_messages

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memory" / "sample.memory.jsonl"
GREEDY = GenerationOptions(num_predict=8)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


# --- the collector, with a stand-in model ---------------------------------------------------------


class FakeModel:
    """Answers each chat with its last message; records the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()  # a batch is generating
        self.release = threading.Event()  # the batch may finish
        self.release.set()
        self.fail_on: str | None = None  # a batch holding this message fails

    def __call__(
        self,
        loaded: Any,
        chats: Sequence[Sequence[ChatMessage]],
        opts: GenerationOptions,
        *,
        template: str = "",
    ) -> list[tuple[str, str, int, int]]:
        self.batches.append([c[-1].content for c in chats])
        self.started.set()
        self.release.wait(10)
        if any(c[-1].content == self.fail_on for c in chats):
            raise RuntimeError("template error")
        return [(f"{loaded}:{c[-1].content}", "stop", len(c), opts.num_predict) for c in chats]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeModel:
    model = FakeModel()
    monkeypatch.setattr(local_batch, "generate_batch", model)
    return model


async def test_chats_started_together_form_one_batch_and_keep_their_order(
    fake: FakeModel,
) -> None:
    batcher = ChatBatcher()
    answers = await asyncio.gather(
        *(batcher.generate("m", [user(str(i))], GREEDY) for i in range(5))
    )
    assert [a[0] for a in answers] == [f"m:{i}" for i in range(5)]
    assert fake.batches == [["0", "1", "2", "3", "4"]] and batcher.batch_sizes == [5]


async def test_models_templates_and_options_split_batches_but_seeds_do_not(
    fake: FakeModel,
) -> None:
    batcher = ChatBatcher()
    longer = GenerationOptions(num_predict=9)
    calls = [
        batcher.generate("m", [user("a")], GenerationOptions(num_predict=8, seed=1)),
        batcher.generate("m", [user("b")], GenerationOptions(num_predict=8, seed=2)),
        batcher.generate("other", [user("c")], GREEDY),
        batcher.generate("m", [user("d")], longer),
        batcher.generate("m", [user("e")], GREEDY, "{{ messages }}"),
        batcher.generate("m", [user("f")], GenerationOptions(num_predict=8, temperature=-1)),
    ]
    answers = await asyncio.gather(*calls)
    assert [a[0] for a in answers] == ["m:a", "m:b", "other:c", "m:d", "m:e", "m:f"]
    assert sorted(fake.batches) == [["a", "b", "f"], ["c"], ["d"], ["e"]]


async def test_chats_arriving_during_a_batch_wait_and_form_the_next(fake: FakeModel) -> None:
    batcher = ChatBatcher()
    fake.release.clear()
    first = asyncio.ensure_future(batcher.generate("m", [user("1")], GREEDY))
    await asyncio.to_thread(fake.started.wait, 10)
    later = [asyncio.ensure_future(batcher.generate("m", [user(x)], GREEDY)) for x in "234"]
    await asyncio.sleep(0.05)
    fake.release.set()
    await asyncio.gather(first, *later)
    assert fake.batches == [["1"], ["2", "3", "4"]]


async def test_a_chat_that_fails_fails_alone(fake: FakeModel) -> None:
    batcher = ChatBatcher()
    fake.fail_on = "bad"
    results = await asyncio.gather(
        *(batcher.generate("m", [user(x)], GREEDY) for x in ("a", "bad", "b")),
        return_exceptions=True,
    )
    assert results[0][0] == "m:a" and results[2][0] == "m:b"  # type: ignore[index]
    assert isinstance(results[1], RuntimeError)
    assert fake.batches == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # retried one by one
    fake.fail_on = None
    assert (await batcher.generate("m", [user("c")], GREEDY))[0] == "m:c"  # it recovers


async def test_a_cancelled_chat_leaves_the_queue(fake: FakeModel) -> None:
    batcher = ChatBatcher()
    fake.release.clear()
    first = asyncio.ensure_future(batcher.generate("m", [user("1")], GREEDY))
    await asyncio.to_thread(fake.started.wait, 10)
    gone = asyncio.ensure_future(batcher.generate("m", [user("gone")], GREEDY))
    kept = asyncio.ensure_future(batcher.generate("m", [user("kept")], GREEDY))
    await asyncio.sleep(0.01)
    gone.cancel()
    fake.release.set()
    await asyncio.gather(first, kept)
    assert fake.batches == [["1"], ["kept"]]


def test_only_greedy_chats_without_repeat_penalty_are_batched() -> None:
    assert batchable(GenerationOptions(temperature=0.0, seed=7))
    assert not batchable(GenerationOptions(temperature=0.7))  # a seeded draw per chat
    assert not batchable(GenerationOptions(repeat_penalty=1.1))


def test_batched_generation_refuses_sampling() -> None:
    with pytest.raises(ValueError, match="greedy"):
        local_batch.generate_batch(None, [], GenerationOptions(temperature=0.5))  # type: ignore[arg-type]


# --- the pipeline's validate stages, with a stand-in for batched generation -------------------


class Batches:
    """Answers every chat of a batch; records each batch's size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(
        self, loaded: Any, chats: Sequence[Sequence[ChatMessage]], opts: Any, *, template: str = ""
    ) -> list[tuple[str, str, int, int]]:
        self.sizes.append(len(chats))
        return [(f"About {c[-1].content}", "stop", 10, 3) for c in chats]


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Batches:
    stand_in = Batches()
    monkeypatch.setattr(local_batch, "generate_batch", stand_in)
    return stand_in


RUN_ID = "20260101_000000"


def local_settings(tmp_path: Path) -> Settings:
    return Settings(backend="local", data_dir=tmp_path / "data", held_out=12)


async def test_the_trainer_scoring_in_process_batches_every_case_of_a_model(
    tmp_path: Path, bus: Bus, batches: Batches
) -> None:
    settings = local_settings(tmp_path)
    backend = LocalBackend(settings.data_path / "models")
    embedder = Embedder(backend, settings.embedding_model)
    trainer = Trainer(bus, settings, backend, embedder, None)  # type: ignore[arg-type]  # no corpus
    run = Run(RunNames(RUN_ID), TrainingRequested(request_id="q"), settings, RunReport(), bus)
    held_out = sample_pairs()[: settings.held_out]
    # no validator listening: the trainer scores the cases itself, all of them at once
    results = await trainer._validate(run, "validate_base", settings.base_model, held_out)
    assert [r.case_id for r in results] == list(range(12)) and not any(r.error for r in results)
    assert batches.sizes == [12]


async def test_a_local_validator_takes_all_of_a_models_cases_and_batches_them(
    tmp_path: Path, bus: Bus, batches: Batches
) -> None:
    settings = local_settings(tmp_path)
    record = RunRecord(
        run_id=RUN_ID, stage="running", mode="message", base_model="smollm2:135m", new_model="new"
    )
    await bus.put_record(subjects.RUNS, RUN_ID, record)
    cases = pipeline.validation_cases(RUN_ID, "smollm2:135m", sample_pairs()[:12], settings)
    async with app.resources(settings) as res:
        await app.start(bus, res, ["validator"])
        results = await validate_cases(
            bus, cases, concurrency=settings.cases_in_flight(len(cases)), timeout_s=60
        )
    assert all(r.validator and not r.error for r in results), results
    assert batches.sizes == [12]


# --- attention over a shared prefix --------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prefix_attention_equals_attention_over_the_whole_sequence(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 6 and 4 tokens (the second left padded) after a 7-token prefix they share; 4 query
    heads on 2 key/value heads. Each real query must get what plain attention over prefix + row
    gives; a padding query must stay finite (its keys and values are masked for everyone)."""
    import torch

    if not fused:
        monkeypatch.setattr(local_batch, "_fused_cpu_attention", lambda: None)
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, prefix, width, d = 2, 4, 2, 7, 6, 8
    query = torch.randn(b, hq, width, d, generator=gen)
    key, value = (torch.randn(b, hkv, width, d, generator=gen) for _ in range(2))
    pk, pv = (torch.randn(1, hkv, prefix, d, generator=gen) for _ in range(2))
    valid = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    causal = torch.ones(width, width).tril().bool()
    allowed = valid[:, None, None, :] & causal[None, None]
    mask = torch.where(allowed, 0.0, float("-inf"))
    shared = local_batch.SharedPrefix(keys=[pk], values=[pv], mask=mask)
    module = type("Attention", (), {"layer_idx": 0})()

    out, _ = local_batch._shared_prefix_attention(
        module, query, key, value, None, scaling=0.3, shared_prefix=shared
    )

    assert out.shape == (b, width, hq, d) and torch.isfinite(out).all()
    for row in range(b):
        keys = torch.cat([pk[0], key[row]], dim=1).repeat_interleave(hq // hkv, dim=0)
        values = torch.cat([pv[0], value[row]], dim=1).repeat_interleave(hq // hkv, dim=0)
        full = torch.cat([torch.ones(width, prefix, dtype=torch.bool), allowed[row, 0]], dim=1)
        want = torch.nn.functional.scaled_dot_product_attention(
            query[row], keys, values, attn_mask=full, scale=0.3
        )
        real = valid[row]
        assert torch.allclose(out[row].transpose(0, 1)[:, real], want[:, real], atol=1e-5)


# --- the real model ------------------------------------------------------------------------------


def sample_pairs() -> list[Pair]:
    points, errors = read_memory_file(SAMPLE)
    assert not errors
    pairs = [p for point in points for p in pairs_from_point(point)]
    return sorted(pairs, key=lambda p: (p.point_id, p.turn))


async def answers(
    backend: LocalBackend, model: str, prompts: list[str], options: dict[str, Any]
) -> list[ChatResponse]:
    calls = [backend.chat(model, [user(p)], options=options) for p in prompts]
    if backend.batcher is not None:
        return list(await asyncio.gather(*calls))
    return [await call for call in calls]


@pytest.mark.slow
async def test_batched_answers_are_the_one_at_a_time_answers(tmp_path: Path) -> None:
    """Real prompts from the demo's memory, on the base model and on a message-mode model with
    baked examples (its long prefix's KV cache is shared by the batch's rows). Per-row stops: the
    second run cuts answers at the first full stop, so rows finish at different steps."""
    pairs = sample_pairs()
    prompts = [p.prompt for p in pairs[1::97][:8]]
    examples = pipeline.few_shot_messages(pairs[::50], 10, max_chars=1500)
    alone = LocalBackend(tmp_path / "models", batch=False)
    batched = LocalBackend(tmp_path / "models", batch=True)
    system = "You are the user's personal assistant. Answer the way the examples do."
    await alone.create(
        CreateRequest(model="personal", from_="smollm2:135m", system=system, messages=examples)
    )
    runs = [
        ("smollm2:135m", {"temperature": 0, "seed": 42, "num_predict": 32}),
        ("personal", {"temperature": 0, "seed": 42, "num_predict": 32, "stop": ["."]}),
    ]
    records = {
        "smollm2:135m": ModelRecord(name="smollm2:135m", base="smollm2:135m"),
        "personal": ModelRecord(
            name="personal", base="smollm2:135m", system=system, messages=examples
        ),
    }
    loaded = load_model(Source("gguf", chat_gguf()), [], alone.device, None)
    baked = build_prompt_messages(records["personal"], [user(prompts[0])])
    assert prepare(loaded, baked, GREEDY, "").prefix > 0  # the batch shares the prefix cache
    for model, options in runs:
        one = await answers(alone, model, prompts, options)
        many = await answers(batched, model, prompts, options)
        assert batched.batcher is not None and batched.batcher.batch_sizes[-1] == len(prompts)
        differ = []
        for prompt, a, b in zip(prompts, one, many, strict=True):
            got = (b.message.content, b.done_reason, b.prompt_eval_count, b.eval_count)
            if got == (a.message.content, a.done_reason, a.prompt_eval_count, a.eval_count):
                continue
            opts = GenerationOptions(num_predict=32, stop=tuple(options.get("stop", ())))
            messages = build_prompt_messages(records[model], [user(prompt)])
            why = explain_difference(loaded, messages, opts, b.message.content)
            differ.append((prompt, why))
        # fp32 sums may round differently in a padded batch; only a near tie may flip a token
        assert all(why is not None and why.margin < 1e-3 for _, why in differ), differ
        assert len(differ) <= len(prompts) // 4, differ
    # the stop run: rows finished at different steps, some on the stop text
    assert len({a.eval_count for a in one}) > 1
    assert any(r.done_reason == "stop" for r in many)


@pytest.mark.slow
def test_a_differing_answer_is_explained_at_its_first_differing_token() -> None:
    loaded = load_model(Source("gguf", chat_gguf()), [], "cpu", None)
    messages = [user("What is the capital of France?")]
    opts = GenerationOptions(num_predict=12)
    prompt = prepare(loaded, messages, opts, "")
    new, _ = generate_ids(loaded, prompt, opts)
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    head = loaded.tokenizer.decode(new[:3], skip_special_tokens=True)

    assert explain_difference(loaded, messages, opts, text) is None
    why = explain_difference(loaded, messages, opts, head + " Zorblax")
    assert why is not None and why.step == 3 and why.margin > 0
    assert why.alone == loaded.tokenizer.decode(new[3:4]) and why.batched == " Zorblax"
