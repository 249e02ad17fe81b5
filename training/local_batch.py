"""Greedy generation of many chats of one model in a single padded batch.

On a CPU, generating one token costs about the same for one chat as for twenty: the time goes
into reading the weights. So the chats that are waiting for the same model run together, left
padded, each row stopping on its own (end token, stop text, token limit). Chats that open with
the same long prefix (a created model's SYSTEM and baked messages) share its KV cache: it is
computed once and copied into every row.

Greedy decoding only: a sampled chat draws from its own seeded random stream, which a batch would
interleave with other rows, so sampled chats are generated one at a time (`local_models.generate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.backend import ChatMessage
from training.local_models import (
    COMPUTE,
    Loaded,
    Prompt,
    eos_ids,
    finish,
    generate_ids,
    pad_id,
    prefix_cache,
    prepare,
)
from training.local_semantics import GenerationOptions

if TYPE_CHECKING:
    import torch

Generated = tuple[str, str, int, int]  # text, done_reason, prompt tokens, generated tokens

GATHER_S = 0.005  # how long the first chat of a batch waits for the others of an asyncio.gather

# Finished rows leave the batch once this share of it is finished: dropping them copies the
# cache, keeping them costs a row of compute per step.
COMPACT_SHARE = 0.25


def batchable(opts: GenerationOptions) -> bool:
    """Whether chats with these options may share a batch and answer as they would alone."""
    return opts.greedy and opts.repeat_penalty == 1.0


def generate_batch(
    loaded: Loaded,
    chats: Sequence[Sequence[ChatMessage]],
    opts: GenerationOptions,
    *,
    template: str = "",
) -> list[Generated]:
    """Blocking greedy generation of every chat, in their order. Chats are grouped by their
    shared prefix (none, or a created model's); each group is one batch."""
    if not batchable(opts):
        raise ValueError("batched generation is greedy and without repeat penalty")
    prompts = [prepare(loaded, messages, opts, template) for messages in chats]
    results: list[Generated | None] = [None] * len(prompts)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.max_new <= 0:
            results[i] = ("", "length", len(p.ids), 0)
        else:
            groups[tuple(p.ids[: p.prefix])].append(i)
    for prefix, rows in groups.items():
        outs = _decode(loaded, list(prefix), [prompts[i] for i in rows], opts)
        for i, out in zip(rows, outs, strict=True):
            results[i] = out
    return [r for r in results if r is not None]


def _slab_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """Keys and values in buffers sized for the whole generation: a step writes its token
        in place, where the default layer concatenates (copying the whole cache every step)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self.slab_k, self.slab_v, self.length = keys, values, length
            self._views()

        def _views(self) -> None:
            self.keys = self.slab_k[:, :, : self.length]
            self.values = self.slab_v[:, :, : self.length]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            n, q = self.length, key_states.shape[-2]
            self.slab_k[:, :, n : n + q] = key_states
            self.slab_v[:, :, n : n + q] = value_states
            self.length = n + q
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.slab_k, self.slab_v = self.slab_k[indices], self.slab_v[indices]
            self._views()

    return SlabLayer


def _new_cache(loaded: Loaded, prefix: Any, rows: int, prefix_len: int, total: int) -> Any:
    """A cache of `rows` rows with room for `total` positions, the prefix's keys in every row."""
    import torch
    from transformers.cache_utils import Cache

    config = loaded.model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    dtype, device = loaded.model.dtype, loaded.model.device
    layer_class = _slab_layer_class()
    layers = []
    for i in range(config.num_hidden_layers):
        k = torch.empty(rows, heads, total, head_dim, dtype=dtype, device=device)
        v = torch.empty_like(k)
        if prefix_len:
            k[:, :, :prefix_len] = prefix.layers[i].keys
            v[:, :, :prefix_len] = prefix.layers[i].values
        layers.append(layer_class(k, v, prefix_len))
    return Cache(layers=layers)


@dataclass
class _Row:
    prompt: Prompt
    new: list[int]
    done: bool = False


def _decode(
    loaded: Loaded, prefix: list[int], prompts: list[Prompt], opts: GenerationOptions
) -> list[Generated]:
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = model.device
    eos = eos_ids(loaded)
    p = len(prefix)
    suffixes = [q.ids[p:] for q in prompts]
    width = max(len(s) for s in suffixes)
    steps = max(q.max_new for q in prompts)
    total = p + width + steps
    b = len(prompts)

    ids = torch.full((b, width), pad_id(loaded), dtype=torch.long)
    mask = torch.zeros((b, total), dtype=torch.long)
    mask[:, :p] = 1
    positions = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, p + width - len(s) : p + width] = 1
        positions[i, width - len(s) :] = torch.arange(p, p + len(s))
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)

    rows = [_Row(q, []) for q in prompts]
    live = list(range(b))  # rows still in the batch, in batch order
    with COMPUTE, torch.inference_mode():
        shared = prefix_cache(loaded, prefix) if p else None
        cache = _new_cache(loaded, shared, b, p, total)
        logits = model(
            input_ids=ids,
            attention_mask=mask[:, : p + width],
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        last = positions[:, -1]
        for step in range(steps):
            chosen = logits.argmax(dim=-1).tolist()
            for slot, i in enumerate(live):
                row = rows[i]
                if row.done:
                    continue
                row.new.append(chosen[slot])
                row.done = (
                    chosen[slot] in eos
                    or len(row.new) >= row.prompt.max_new
                    or _stopped(tok, row.new, opts.stop)
                )
            if all(rows[i].done for i in live):
                break
            col = p + width + step
            finished = [slot for slot, i in enumerate(live) if rows[i].done]
            if len(finished) >= max(1, COMPACT_SHARE * len(live)):
                keep = [slot for slot, i in enumerate(live) if not rows[i].done]
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, last = mask[index], last[index]
                chosen = [chosen[slot] for slot in keep]
                live = [live[slot] for slot in keep]
            mask[:, col] = 1
            last = last + 1
            logits = model(
                input_ids=torch.tensor(chosen, device=device)[:, None],
                attention_mask=mask[:, : col + 1],
                position_ids=last[:, None],
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
    out: list[Generated] = []
    for row in rows:
        text, reason, n_eval = finish(loaded, row.new, opts)
        out.append((text, reason, len(row.prompt.ids), n_eval))
    return out


def _stopped(tok: Any, new: list[int], stops: Sequence[str]) -> bool:
    if not stops:
        return False
    text = tok.decode(new, skip_special_tokens=True)
    return any(s in text for s in stops)


@dataclass(frozen=True)
class Divergence:
    """Where a batched answer leaves the one-at-a-time answer, seen from the latter."""

    step: int  # the first generated token that differs
    alone: str  # the token generated alone ("" for the end of the answer)
    runner_up: str  # the second most likely token there
    margin: float  # the logit lead of `alone` over `runner_up`
    batched: str  # how the batched answer goes on from there


def explain_difference(
    loaded: Loaded,
    messages: Sequence[ChatMessage],
    opts: GenerationOptions,
    batched_text: str,
    *,
    template: str = "",
) -> Divergence | None:
    """Generate the chat alone, greedily, and find the step where `batched_text` departs from
    it; None when the batched text is the answer generated alone."""
    tok = loaded.tokenizer
    prompt = prepare(loaded, messages, opts, template)
    new, logits = generate_ids(loaded, prompt, opts, scores=True)
    if finish(loaded, new, opts)[0] == batched_text:
        return None
    eos = eos_ids(loaded)
    for k, token in enumerate(new):
        head = tok.decode(new[:k], skip_special_tokens=True)
        text = tok.decode(new[: k + 1], skip_special_tokens=True)
        if batched_text.startswith(text) and token not in eos and k + 1 < len(new):
            continue
        top = logits[k].float().topk(2)
        first, second = (int(i) for i in top.indices)
        return Divergence(
            step=k,
            alone="" if token in eos else tok.decode([first]),
            runner_up="" if second in eos else tok.decode([second]),
            margin=float(top.values[0] - top.values[1]),
            batched=batched_text[len(head) :][:40],
        )
    return None


@dataclass
class _Job:
    messages: Sequence[ChatMessage]
    answer: asyncio.Future[Generated]


class ChatBatcher:
    """Gathers concurrent greedy chats into batches, per model, template and options.

    The first chat waits `GATHER_S` for the others started with it; while a batch generates,
    new chats queue, and the next batch takes every queued chat of one kind. Batches run one at
    a time (the process computes one thing at a time anyway), oldest kind first.
    """

    def __init__(self, gather_s: float = GATHER_S) -> None:
        self.gather_s = gather_s
        self._queues: dict[tuple[int, str, GenerationOptions], list[_Job]] = {}
        self._models: dict[int, Loaded] = {}
        self._runner: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # of every batch run, for tests and benchmarks

    async def generate(
        self,
        loaded: Loaded,
        messages: Sequence[ChatMessage],
        opts: GenerationOptions,
        template: str = "",
    ) -> Generated:
        # Options that cannot change a greedy answer do not split batches.
        opts = dataclasses.replace(opts, seed=None, temperature=0.0, top_p=0.0, top_k=0)
        key = (id(loaded), template, opts)
        job = _Job(messages, asyncio.get_running_loop().create_future())
        self._models[id(loaded)] = loaded  # kept alive while queued, so the id stays unique
        self._queues.setdefault(key, []).append(job)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await job.answer

    async def _run(self) -> None:
        try:
            await asyncio.sleep(self.gather_s)
            await self._drain()
        finally:  # cancelled with the loop: nobody may wait forever on a queued chat
            for jobs in self._queues.values():
                for job in jobs:
                    if not job.answer.done():
                        job.answer.cancel()
            self._queues.clear()
            self._models.clear()

    async def _drain(self) -> None:
        while self._queues:
            key = next(iter(self._queues))
            jobs = [j for j in self._queues.pop(key) if not j.answer.done()]  # not cancelled
            loaded, (_, template, opts) = self._models[key[0]], key
            if not any(k[0] == key[0] for k in self._queues):
                del self._models[key[0]]
            if not jobs:
                continue
            self.batch_sizes.append(len(jobs))
            try:
                outs = await asyncio.to_thread(
                    generate_batch, loaded, [j.messages for j in jobs], opts, template=template
                )
            except Exception as exc:
                for job in jobs:
                    if not job.answer.done():
                        job.answer.set_exception(exc)
                continue
            for job, out in zip(jobs, outs, strict=True):
                if not job.answer.done():
                    job.answer.set_result(out)
