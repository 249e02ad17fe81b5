"""Greedy generation of many chats of one model in a single padded batch.

On a CPU, a step of twenty chats costs a few times a step of one, not twenty times: much of the
time goes into reading the weights. So the chats waiting for the same model run together, left
padded, each row stopping on its own (end token, stop text, token limit). Chats that open with
the same long prefix (a created model's SYSTEM and baked messages) share its KV cache: it is
computed once and every row attends to it in place.

Greedy decoding only: a sampled chat draws from its own seeded random stream, which a batch would
interleave with other rows, so sampled chats are generated one at a time (`local_models.generate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

log = logging.getLogger(__name__)

Generated = tuple[str, str, int, int]  # text, done_reason, prompt tokens, generated tokens

GATHER_S = 0.05  # how long the first chat of a batch waits for the chats started with it

# Finished rows leave the batch once this share of it is finished: dropping them copies the
# cache, keeping them costs a row of compute per step.
COMPACT_SHARE = 0.25
# A batch's cache holds every row's own tokens and answer (the shared prefix once, elsewhere);
# larger groups are split to stay within this.
KV_BUDGET_BYTES = 1 << 30


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
    shared prefix (none, or a created model's); each group is one batch, split only when its
    cache would outgrow `KV_BUDGET_BYTES`."""
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
    per_position = _kv_bytes_per_position(loaded)
    for prefix, group in groups.items():
        positions = max(len(prompts[i].ids) - len(prefix) for i in group) + max(
            prompts[i].max_new for i in group
        )
        size = max(1, KV_BUDGET_BYTES // (positions * per_position))
        for start in range(0, len(group), size):
            rows = group[start : start + size]
            outs = _decode(loaded, list(prefix), [prompts[i] for i in rows], opts)
            for i, out in zip(rows, outs, strict=True):
                results[i] = out
    return [r for r in results if r is not None]


def _kv_shape(loaded: Loaded) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's attention."""
    config = loaded.model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    return int(config.num_hidden_layers), heads, head_dim


def _kv_bytes_per_position(loaded: Loaded) -> int:
    layers, heads, head_dim = _kv_shape(loaded)
    return 2 * layers * heads * head_dim * loaded.model.dtype.itemsize


def _slab_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """Keys and values in buffers sized for the whole generation: a step writes its token
        in place, where the default layer concatenates (copying the whole cache every step).
        `offset` positions before the buffer belong to a prefix kept elsewhere."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, offset: int) -> None:
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self.slab_k, self.slab_v, self.offset, self.length = keys, values, offset, 0
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
            return self.offset + self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.slab_k, self.slab_v = self.slab_k[indices], self.slab_v[indices]
            self._views()

    return SlabLayer


def _new_cache(loaded: Loaded, rows: int, offset: int, size: int) -> Any:
    import torch
    from transformers.cache_utils import Cache

    n_layers, heads, head_dim = _kv_shape(loaded)
    model = loaded.model
    layer_class = _slab_layer_class()
    layers = []
    for _ in range(n_layers):
        k = torch.empty(rows, heads, size, head_dim, dtype=model.dtype, device=model.device)
        layers.append(layer_class(k, torch.empty_like(k), offset))
    return Cache(layers=layers)


# The rows of a batch share a prefix's keys and values: each row's queries meet them in one
# product per key/value head instead of every row carrying a copy of them (which, at 20 rows,
# makes every step read ~2 GB on a model with 6000 characters of examples).
SHARED_PREFIX_ATTENTION = "mindx_shared_prefix"


@dataclass
class SharedPrefix:
    keys: list[Any]  # per layer, [1, heads, prefix, head size]
    values: list[Any]
    mask: Any = None  # additive, [rows, 1, queries, row keys], set before each forward


def _shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Softmax attention over the shared prefix and each row's own keys, joined by their
    log-sum-exps. `key` and `value` hold the rows' own positions only."""
    import torch

    if shared_prefix is None:
        raise RuntimeError("shared-prefix attention called without its prefix")
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    rep = hq // hkv
    scale = scaling if scaling is not None else d**-0.5
    grouped = query.reshape(b, hkv, rep * q, d)  # query head h reads key/value head h // rep

    pk = shared_prefix.keys[module.layer_idx]  # [1, hkv, prefix, d]
    pv = shared_prefix.values[module.layer_idx]
    folded = grouped.transpose(0, 1).reshape(1, hkv, b * rep * q, d)
    o_p, lse_p = _attend(folded, pk, pv, None, scale)
    o_p = o_p.reshape(hkv, b, rep * q, d).transpose(0, 1)
    lse_p = lse_p.reshape(hkv, b, rep * q, 1).transpose(0, 1)

    mask = shared_prefix.mask.repeat(1, 1, rep, 1)  # [b, 1, rep * q, n]
    o_r, lse_r = _attend(grouped, key, value, mask, scale)
    seen = torch.isfinite(mask).any(dim=-1, keepdim=True)  # a padding query sees no key
    lse_r = torch.where(seen, lse_r, float("-inf"))
    o_r = torch.where(seen, o_r, 0.0)

    lse = torch.logaddexp(lse_p, lse_r)
    out = o_p * torch.exp(lse_p - lse) + o_r * torch.exp(lse_r - lse)
    return out.reshape(b, hq, q, d).transpose(1, 2).contiguous(), None


def _fused_cpu_attention() -> Any:
    """torch's CPU flash attention, which also returns the log-sum-exp (None if missing)."""
    import torch

    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp ([..., queries, 1]); `mask` is additive."""
    import torch

    fused = _fused_cpu_attention() if query.device.type == "cpu" else None
    if fused is not None:  # no score matrix in memory, and several times faster
        out, lse = fused(query, key, value, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse[..., None]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0))
    return torch.matmul(weights, value), lse


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
        _registered = True


@contextmanager
def _attention(model: Any, name: str | None) -> Iterator[None]:
    """The model computes attention with `name` meanwhile (call with COMPUTE held)."""
    if name is None:
        yield
        return
    _register_attention()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


@dataclass
class _Row:
    prompt: Prompt
    new: list[int]
    done: bool = False


def _decode(
    loaded: Loaded, prefix: list[int], prompts: list[Prompt], opts: GenerationOptions
) -> list[Generated]:
    """One batch: the rows' own tokens (after the shared prefix) left padded to one width, then
    a token per row per step until every row is done."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = model.device
    eos = eos_ids(loaded)
    p = len(prefix)
    suffixes = [q.ids[p:] for q in prompts]
    width = max(len(s) for s in suffixes)
    steps = max(q.max_new for q in prompts)
    b = len(prompts)

    ids = torch.full((b, width), pad_id(loaded), dtype=torch.long)
    valid = torch.zeros((b, width + steps), dtype=torch.bool)  # real tokens among the rows'
    positions = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, width - len(s) :] = torch.tensor(s)
        valid[i, width - len(s) : width] = True
        positions[i, width - len(s) :] = torch.arange(p, p + len(s))
    ids, valid, positions = ids.to(device), valid.to(device), positions.to(device)

    rows = [_Row(q, []) for q in prompts]
    live = list(range(b))  # rows still in the batch, in batch order
    with COMPUTE, torch.inference_mode():
        extra: dict[str, Any] = {}
        if p:
            shared = prefix_cache(loaded, prefix)
            extra["shared_prefix"] = SharedPrefix(
                keys=[layer.keys for layer in shared.layers],
                values=[layer.values for layer in shared.layers],
            )
        cache = _new_cache(loaded, b, p, width + steps)

        def forward(tokens: torch.Tensor, start: int, pos: torch.Tensor, **kw: Any) -> Any:
            """Logits of the last of `tokens`, written at row column `start` onward."""
            end = start + tokens.shape[1]
            if p:
                causal = (
                    torch.arange(end, device=device)[None, :]
                    <= torch.arange(start, end, device=device)[:, None]
                )
                allowed = valid[:, None, None, :end] & causal[None, None]
                zero = torch.zeros((), dtype=model.dtype, device=device)
                extra["shared_prefix"].mask = torch.where(allowed, zero, float("-inf"))
                mask = None
            else:
                mask = valid[:, :end].long()
            return model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                **extra,
                **kw,
            ).logits[:, -1]

        with _attention(model, SHARED_PREFIX_ATTENTION if p else None):
            logits = forward(ids, 0, positions, logits_to_keep=1)
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
                finished = [slot for slot, i in enumerate(live) if rows[i].done]
                if len(finished) >= max(1, COMPACT_SHARE * len(live)):
                    keep = [slot for slot, i in enumerate(live) if not rows[i].done]
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    valid, last = valid[index], last[index]
                    chosen = [chosen[slot] for slot in keep]
                    live = [live[slot] for slot in keep]
                valid[:, width + step] = True
                last = last + 1
                tokens = torch.tensor(chosen, device=device)[:, None]
                logits = forward(tokens, width + step, last[:, None])
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
        self._current: list[_Job] = []  # the batch being generated
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

    @property
    def queued(self) -> int:
        return sum(len(jobs) for jobs in self._queues.values())

    async def _run(self) -> None:
        try:
            await asyncio.sleep(self.gather_s)
            await self._drain()
        finally:  # cancelled with the loop: nobody may wait forever on a queued chat
            for jobs in [self._current, *self._queues.values()]:
                for job in jobs:
                    if not job.answer.done():
                        job.answer.cancel()
            self._current = []
            self._queues.clear()
            self._models.clear()

    async def _drain(self) -> None:
        while self._queues:
            key = next(iter(self._queues))
            jobs = [j for j in self._queues.pop(key) if not j.answer.done()]  # not cancelled
            self._current = jobs
            loaded, (_, template, opts) = self._models[key[0]], key
            if not any(k[0] == key[0] for k in self._queues):
                del self._models[key[0]]
            if not jobs:
                continue
            self.batch_sizes.append(len(jobs))
            log.debug("generating a batch of %d chats (%d queued)", len(jobs), self.queued)
            try:
                await self._answer(loaded, jobs, opts, template)
            except Exception:  # one bad chat (say, a message its template rejects) fails alone
                for job in jobs:
                    try:
                        await self._answer(loaded, [job], opts, template)
                    except Exception as exc:
                        if not job.answer.done():
                            job.answer.set_exception(exc)

    @staticmethod
    async def _answer(
        loaded: Loaded, jobs: list[_Job], opts: GenerationOptions, template: str
    ) -> None:
        outs = await asyncio.to_thread(
            generate_batch, loaded, [j.messages for j in jobs], opts, template=template
        )
        for job, out in zip(jobs, outs, strict=True):
            if not job.answer.done():
                job.answer.set_result(out)
