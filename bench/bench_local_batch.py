"""The embedded runtime's validate stages: chats generated one at a time vs gathered in batches.

The demo's memory (examples/memory/sample.memory.jsonl) goes through the trainer's own steps
(pairs, filter, split, few-shot examples, validation cases), then both validate stages run: the
base model, and the message-mode model with the baked examples. Each stage runs twice in this
run, with the same cases, scoring and concurrency:
  - baseline: the local backend generating one chat at a time (`LocalBackend(batch=False)`);
  - batched: the local backend gathering concurrent chats into one batch (the default).
Answers are compared; a differing one is explained by the logit margin of the one-at-a-time
path at the first differing token.

Physical reference: llama.cpp (llama-cpp-python) on the same GGUF, one chat at a time with its
prompt-prefix reuse, generating the same number of tokens from the same prompt tokens. Our
tokens/s (generated tokens over the whole stage, scoring included) is printed as a ratio of it.

    python -m bench.bench_local_batch [--cases 20] [--concurrency 0 (all cases)] [--repeat 1]
                                      [--threads N (torch's default)]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import model_builder, pipeline
from services.collector import pairs_from_point
from services.filter import run_filter
from services.memory_adapter import read_memory_file
from services.validator import case_messages, score_case
from shared.backend import ChatMessage, ChatResponse
from shared.bundled import chat_gguf
from shared.embeddings import Embedder
from shared.messages import Pair, ValidationCase, ValidationResult
from shared.settings import Settings
from training.local_backend import LocalBackend
from training.local_batch import explain_difference
from training.local_models import (
    Loaded,
    Source,
    clear_prefix_caches,
    load_model,
    prepare,
)
from training.local_semantics import ModelRecord, build_prompt_messages, resolve_options

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memory" / "sample.memory.jsonl"


class Counting:
    """The backend as the validator sees it, counting the tokens each chat generated."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.eval_counts: dict[str, int] = {}  # by prompt

    async def chat(self, model: str, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        reply = await self.backend.chat(model, messages, **kwargs)
        self.eval_counts[messages[-1].content] = reply.eval_count
        return reply

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        return await self.backend.embed(model, inputs)


@dataclass
class Stage:
    seconds: float
    results: list[ValidationResult]
    tokens: dict[str, int]  # generated tokens by prompt

    @property
    def generated(self) -> int:
        return sum(self.tokens.values())


async def validate(
    backend: LocalBackend, s: Settings, cases: list[ValidationCase], concurrency: int
) -> Stage:
    """One validate stage as the trainer runs it: every case chatted and scored, `concurrency`
    at a time, from a cold prefix cache and an empty embedding cache."""
    clear_prefix_caches()
    counting = Counting(backend)
    embedder = Embedder(counting, s.embedding_model)  # type: ignore[arg-type]
    sem = asyncio.Semaphore(concurrency)

    async def one(case: ValidationCase) -> ValidationResult:
        async with sem:
            return await score_case(case, counting, embedder)  # type: ignore[arg-type]

    started = time.perf_counter()
    results = await asyncio.gather(*(one(c) for c in cases))
    seconds = time.perf_counter() - started
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} cases failed: {errors[0]}")
    return Stage(seconds, list(results), counting.eval_counts)


def demo_pairs() -> list[Pair]:
    points, errors = read_memory_file(SAMPLE)
    if errors:
        raise RuntimeError(errors[0])
    pairs = [p for point in points for p in pairs_from_point(point)]
    return sorted(pairs, key=lambda p: (p.point_id, p.turn))  # the corpus's order


def llama_cpp_seconds(prompts: list[list[int]], tokens: list[int], threads: int) -> float:
    """Seconds llama.cpp takes to generate `tokens[i]` greedy tokens after `prompts[i]`."""
    import llama_cpp

    longest = max(len(p) + n for p, n in zip(prompts, tokens, strict=True))
    llm = llama_cpp.Llama(
        model_path=str(chat_gguf()),
        n_ctx=max(512, longest + 16),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        started = time.perf_counter()
        for prompt, n in zip(prompts, tokens, strict=True):
            if n <= 0:
                continue
            for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1), start=1):
                if i >= n:  # the same count as ours, whatever the tokens
                    break
        return time.perf_counter() - started
    finally:
        llm.close()


def explain(loaded: Loaded, record: ModelRecord, case: ValidationCase, answer: str) -> str:
    opts = resolve_options(record.parameters, case.options)
    messages = build_prompt_messages(record, case_messages(case))
    why = explain_difference(loaded, messages, opts, answer, template=record.template)
    if why is None:
        return "no token: identical when generated again alone"
    return (
        f"token {why.step}: alone {why.alone!r} (lead {why.margin:.2e} over {why.runner_up!r}),"
        f" batched goes on {why.batched!r}"
    )


@dataclass
class Row:
    model: str
    one: Stage
    many: Stage
    llama_s: float  # llama.cpp generating the batched stage's token counts
    prompt_tokens: float  # mean per case
    identical: int
    cases: int
    differ: list[tuple[int, str]]
    batch_sizes: list[int]


async def measure(
    model: str,
    s: Settings,
    held_out: list[Pair],
    alone: LocalBackend,
    batched: LocalBackend,
    concurrency: int,
    loaded: Loaded,
    repeat: int,
) -> Row:
    cases = pipeline.validation_cases("bench", model, held_out, s)
    concurrency = concurrency or len(cases)
    ones, manys = [], []
    for _ in range(repeat):  # alternating, so a burst of other work hits both alike
        ones.append(await validate(alone, s, cases, concurrency))
        manys.append(await validate(batched, s, cases, concurrency))
    one = min(ones, key=lambda st: st.seconds)
    many = min(manys, key=lambda st: st.seconds)
    record = alone.record(model)
    opts = resolve_options(record.parameters, cases[0].options)
    prompts = [
        prepare(loaded, build_prompt_messages(record, case_messages(c)), opts, record.template).ids
        for c in cases
    ]
    counts = [many.tokens[c.prompt] for c in cases]
    llama_s = llama_cpp_seconds(prompts, counts, threads())
    same = [a.answer == b.answer for a, b in zip(one.results, many.results, strict=True)]
    differ = [
        (c.case_id, explain(loaded, record, c, b.answer))
        for c, b, ok in zip(cases, many.results, same, strict=True)
        if not ok
    ]
    sizes: list[int] = []
    if batched.batcher is not None:
        sizes = list(batched.batcher.batch_sizes)
        batched.batcher.batch_sizes.clear()
    mean_prompt = sum(len(p) for p in prompts) / len(prompts)
    return Row(model, one, many, llama_s, mean_prompt, sum(same), len(same), differ, sizes)


def threads() -> int:
    import torch

    return torch.get_num_threads()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20, help="held-out cases (the demo's: 20)")
    ap.add_argument(
        "--concurrency", type=int, default=0, help="chats in flight per stage (0: all cases)"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of each stage and path; the fastest counts"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s = Settings(backend="local", held_out=args.cases)
    with tempfile.TemporaryDirectory(prefix="bench-local-batch-") as ws:
        models = Path(ws) / "models"
        alone = LocalBackend(models, batch=False)
        batched = LocalBackend(models, batch=True)

        # the trainer's steps up to the validation cases
        t0 = time.perf_counter()
        kept = (await run_filter(demo_pairs(), s, Embedder(alone, s.embedding_model))).kept
        split = pipeline.split(kept, s)
        examples = pipeline.few_shot_messages(
            split.train, s.max_examples, max_chars=s.example_budget_chars
        )
        new_model = "bench-personal:latest"

        async def status(_: str) -> None:
            return None

        await model_builder.create_message_model(alone, s, new_model, examples, status)
        await alone.preload(s.base_model)
        prep_s = time.perf_counter() - t0
        loaded = load_model(Source("gguf", chat_gguf()), [], alone.device, None)
        rows = [
            await measure(
                model, s, split.held_out, alone, batched, args.concurrency, loaded, args.repeat
            )
            for model in (s.base_model, new_model)
        ]

    print(
        f"{platform.machine()} cpus={os.cpu_count()} torch threads={threads()} "
        f"cases={len(split.held_out)} num_predict={pipeline.LOCAL_NUM_PREDICT} "
        f"concurrency={args.concurrency or 'all'} repeat={args.repeat} "
        f"(data, filter, model: {prep_s:.0f} s)"
    )
    print(
        f"{'validate stage':<24}{'prompt':>7}{'one (s)':>9}{'batched (s)':>12}"
        f"{'speed-up':>10}{'identical':>11}{'tok/s':>8}{'vs llama.cpp':>14}"
    )
    for r in rows:
        ours = r.many.generated / r.many.seconds
        ref = r.many.generated / r.llama_s
        print(
            f"{r.model:<24}{r.prompt_tokens:>7.0f}{r.one.seconds:>9.1f}{r.many.seconds:>12.1f}"
            f"{r.one.seconds / r.many.seconds:>9.2f}x{r.identical:>8}/{r.cases:<2}"
            f"{ours:>8.1f}{ours / ref:>13.2f}x"
        )
        print(
            f"{'':<4}one at a time {r.one.generated / r.one.seconds:.1f} tok/s, llama.cpp "
            f"{ref:.1f} tok/s ({r.many.generated} tokens in {r.llama_s:.1f} s), "
            f"batches {r.batch_sizes}"
        )
        for case_id, why in r.differ:
            print(f"{'':<4}case {case_id} differs at {why}")
    one_s = sum(r.one.seconds for r in rows)
    many_s = sum(r.many.seconds for r in rows)
    print(
        f"{'both stages':<24}{'':>7}{one_s:>9.1f}{many_s:>12.1f}{one_s / many_s:>9.2f}x"
        "  (goal >= 4x)"
    )


if __name__ == "__main__":
    asyncio.run(main())
