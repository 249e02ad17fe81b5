"""What a strict fake Ollama holds and does: models, blobs, chats, and each endpoint's answer.

It follows ../shared/reference/ollama-api.md where a client can notice: error statuses and texts,
`stream` omitted meaning true, the structured `/api/create` (the removed `modelfile` field gets
400), `/api/pull` from a registry of pullable models, blobs by digest, baked `messages` and SYSTEM
prepended to every chat, metrics omitted when zero. The HTTP side (routing, NDJSON framing,
faults) is tests.ollama_double.

Chat is deterministic and honest about personalization: a base model answers a fixed generic
reply built from the prompt; a created model with baked messages answers with the assistant reply
of the baked user turn most similar to the last user message (hashed character-3-gram cosine, the
same vectors `/api/embed` returns), and falls back to the generic reply when nothing is similar.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EMBED_DIM = 256
DEFAULT_CHAT_MODELS = {"qwen3:0.6b": "qwen3", "smollm2:135m": "llama"}
DEFAULT_EMBED_MODELS = ("qllama/bge-small-zh-v1.5:latest",)
THINKING_FAMILIES = {"qwen3"}

DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_TOKEN = re.compile(_CJK.pattern + r"|[^\W_]+|\S")
# Typed options (api/types.go): a wrong type only surfaces at inference, as a 500.
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(
        ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
         "num_gpu", "main_gpu", "num_thread"),
        (int,),
    ),
    **dict.fromkeys(
        ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
         "frequency_penalty"),
        (int, float),
    ),
    "use_mmap": (bool,),
    "stop": (list,),
}  # fmt: skip


# --- deterministic "model" behaviour ----------------------------------------------------------
def hashed_embedding(text: str, dim: int = EMBED_DIM) -> list[float]:
    """Bag of hashed character 3-grams, L2-normalized: similar texts get similar vectors.

    CJK characters also count as unigrams and bigrams: one carries about a word's meaning, so
    3-grams alone would make related Chinese questions look unrelated.
    """
    padded = f" {text.lower()} "
    grams = [padded[i : i + 3] for i in range(len(padded) - 2)] or [padded]
    cjk = {i for i, ch in enumerate(text) if _CJK.match(ch)}
    grams += [text[i] for i in sorted(cjk)] + [text[i : i + 2] for i in sorted(cjk) if i + 1 in cjk]
    vec = [0.0] * dim
    for gram in grams:
        h = zlib.crc32(gram.encode("utf-8"))
        vec[h % dim] += 1.0 if (h >> 16) & 1 else -1.0  # signed hashing keeps collisions unbiased
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def similarity(a: str, b: str) -> float:
    return sum(x * y for x, y in zip(hashed_embedding(a), hashed_embedding(b), strict=True))


def tokens(text: str) -> list[str]:
    """A rough tokenizer: one token per CJK character, word or punctuation mark."""
    return _TOKEN.findall(text)


def generic_reply(prompt: str) -> str:
    words = prompt.split()
    head = " ".join(words[:6]) if len(words) > 1 else prompt[:24]
    return f"I am not sure. Could you tell me more about {head.strip()}?"


# --- registry ---------------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    family: str = "llama"
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    system: str = ""
    template: str = "{{ .Prompt }}"
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    parent: str = ""
    files: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    quantization: str = "Q4_K_M"
    size: int = 500_000_000
    modified_at: str = field(default_factory=lambda: _now())

    @property
    def digest(self) -> str:
        blob = json.dumps(
            [self.system, self.template, self.parameters, self.messages, self.files, self.adapters],
            sort_keys=True,
        )
        return hashlib.sha256(f"{self.parent}|{blob}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": self.parent,
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": "1B",
            "quantization_level": self.quantization,
        }


def normalize_name(name: str) -> str | None:
    """`[host/][ns/]model[:tag]` with `latest` as the default tag; None when invalid."""
    if not isinstance(name, str) or not name or name != name.strip():
        return None
    base, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    if not tag or not _NAME_PART.match(tag):
        return None
    parts = base.split("/")
    if len(parts) > 3 or not all(_NAME_PART.match(p) for p in parts):
        return None
    return f"{base}:{tag}"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def go_quote(value: str) -> str:
    """Go's strconv.Quote for the characters we meet (printable non-ASCII stays as is)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_value(v: Any) -> str:
    if isinstance(v, str):
        return go_quote(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def parameters_text(params: dict[str, Any]) -> str:
    """`/api/show`'s `parameters`: one line per value, name padded to 30, value Go-formatted."""
    lines = []
    for k in sorted(params):
        values = params[k] if isinstance(params[k], list) else [params[k]]
        lines.extend(f"{k:<30} {_go_value(v)}" for v in values)
    return "\n".join(lines)


# --- the store --------------------------------------------------------------------------------
class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OllamaStore:
    """The models, blobs and chats of a fake Ollama, and what each endpoint does with them.

    Thread-safe: every call may come from its own thread.
    """

    def __init__(
        self,
        *,
        chat_models: dict[str, str] | None = None,
        embed_models: Iterable[str] = DEFAULT_EMBED_MODELS,
        version: str = "0.13.0",
        recall_threshold: float = 0.25,
    ) -> None:
        self.version = version
        self.recall_threshold = recall_threshold
        self.chats: list[list[dict[str, Any]]] = []  # effective message lists, as the model saw
        self.models: dict[str, Model] = {}
        self.blob_dir = Path(tempfile.mkdtemp(prefix="ollama-double-"))
        self.blobs: dict[str, Path] = {}
        self.lock = threading.RLock()
        for name, family in (chat_models or DEFAULT_CHAT_MODELS).items():
            self.add_model(_chat_model(name, family))
        for name in embed_models:
            self.add_model(_embed_model(name))
        # what `/api/pull` finds in the registry: the default models, installed or not
        self.registry: dict[str, Model] = {}
        for name, family in DEFAULT_CHAT_MODELS.items():
            self.add_to_registry(_chat_model(name, family))
        for name in DEFAULT_EMBED_MODELS:
            self.add_to_registry(_embed_model(name))

    # registry helpers
    def add_model(self, model: Model) -> Model:
        name = normalize_name(model.name)
        if name is None:
            raise ValueError(f"invalid model name {model.name!r}")
        model.name = name
        with self.lock:
            self.models[name] = model
        return model

    def add_to_registry(self, model: Model) -> Model:
        """Make `model` pullable (`/api/pull` installs a copy)."""
        name = normalize_name(model.name)
        if name is None:
            raise ValueError(f"invalid model name {model.name!r}")
        model.name = name
        with self.lock:
            self.registry[name] = model
        return model

    def find(self, name: Any) -> Model | None:
        norm = normalize_name(name) if isinstance(name, str) else None
        if norm is None:
            return None
        with self.lock:
            for key, model in self.models.items():
                if key.lower() == norm.lower():  # matching ignores case
                    return model
        return None

    # --- endpoints (each returns a JSON object, None for an empty 200, or an iterator of
    #     NDJSON objects for streams; raises HttpError) ---------------------------------------
    def version_(self, body: Any) -> Any:
        return {"version": self.version}

    def tags(self, body: Any) -> Any:
        with self.lock:
            models = list(self.models.values())
        return {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": m.modified_at,
                    "size": int(m.size),
                    "digest": m.digest,
                    "details": m.details(),
                    "capabilities": m.capabilities,
                }
                for m in models
            ]
        }

    def show(self, body: Any) -> Any:
        name = _field(body, "model") or _field(body, "name")
        if not name:
            raise HttpError(400, "model is required")
        m = self.find(name)
        if m is None:
            raise HttpError(404, f"model '{name}' not found")
        out: dict[str, Any] = {
            "modelfile": self._modelfile(m),
            "template": m.template,
            "details": m.details(),
            "model_info": {"general.architecture": m.family, "general.parameter_count": 6e8},
            "capabilities": m.capabilities,
            "modified_at": m.modified_at,
        }
        if m.parameters:
            out["parameters"] = parameters_text(m.parameters)
        if m.system:
            out["system"] = m.system
        if m.license:
            out["license"] = "\n".join(m.license)
        if m.messages:
            out["messages"] = m.messages
        return out

    def _modelfile(self, m: Model) -> str:
        lines = ['# Modelfile generated by "ollama show"', f"FROM {m.parent or m.name}"]
        lines.append(f'TEMPLATE """{m.template}"""')
        if m.system:
            lines.append(f'SYSTEM """{m.system}"""')
        for k in sorted(m.parameters):
            values = m.parameters[k] if isinstance(m.parameters[k], list) else [m.parameters[k]]
            lines.extend(f"PARAMETER {k} {v}" for v in values)
        lines.extend(f"ADAPTER {d}" for d in m.adapters.values())
        for msg in m.messages:
            lines.append(f"MESSAGE {msg.get('role')} {msg.get('content')}")
        return "\n".join(lines) + "\n"

    def chat(self, body: Any) -> Any:
        if not isinstance(body, dict):
            raise HttpError(400, "missing request body")
        name = body.get("model")
        if not isinstance(name, str) or normalize_name(name) is None:
            raise HttpError(400, f"invalid model name {name!r}" if name else "model is required")
        m = self.find(name)
        if m is None:
            raise HttpError(404, f"model '{name}' not found")
        if "completion" not in m.capabilities:
            raise HttpError(400, f'"{name}" does not support chat')
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(x, dict) and isinstance(x.get("content", ""), str) for x in messages
        ):
            raise HttpError(400, "invalid messages")
        think = _think(body.get("think"), m, name)
        stream = body.get("stream", True) is not False
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise HttpError(400, "invalid options")
        merged = {**m.parameters, **options}  # request options override PARAMETERs
        for key, value in merged.items():
            types = _OPTION_TYPES.get(key)
            # bool is an int in Python, not in Go: only `use_mmap` takes one
            if types and (
                not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
            ):
                kind = "array" if list in types else types[0].__name__
                raise HttpError(500, f'option "{key}" must be of type {kind}')
        if not messages:  # an empty chat only loads the model
            return self._chat_object(m.name, "", None, "load", {})

        msgs = [
            {"role": str(x.get("role", "")).lower(), "content": x.get("content", "")}
            for x in messages
        ]
        effective = [dict(x) for x in m.messages] + msgs  # baked turns go first
        if msgs[0]["role"] != "system" and m.system:
            effective.insert(0, {"role": "system", "content": m.system})
        with self.lock:
            self.chats.append(effective)

        content = self._answer(m, msgs)
        limit = merged.get("num_predict")
        toks = tokens(content)
        reason = "stop"
        if isinstance(limit, int) and 0 < limit < len(toks):
            content, reason = _cut(content, toks[:limit]), "length"
        last_user = next((x["content"] for x in reversed(msgs) if x["role"] == "user"), "")
        thinking = f"The user asks: {last_user[:60]}" if think else None
        metrics = {
            "total_duration": 1_000_000 + 1000 * len(toks),
            "prompt_eval_count": sum(len(tokens(x["content"])) for x in effective),
            "eval_count": len(tokens(content)),
        }
        if not stream:
            return self._chat_object(m.name, content, thinking, reason, metrics)
        return self._chat_stream(m.name, content, thinking, reason, metrics)

    def _answer(self, m: Model, msgs: list[dict[str, Any]]) -> str:
        last_user = next((x["content"] for x in reversed(msgs) if x["role"] == "user"), "")
        best, best_sim = None, self.recall_threshold
        baked = m.messages
        for i, turn in enumerate(baked[:-1]):
            if turn.get("role") != "user" or baked[i + 1].get("role") != "assistant":
                continue
            sim = similarity(str(turn.get("content", "")), last_user)
            if sim >= best_sim:
                best, best_sim = str(baked[i + 1].get("content", "")), sim
        return best if best is not None else generic_reply(last_user)

    @staticmethod
    def _chat_object(
        model: str, content: str, thinking: str | None, reason: str, metrics: dict[str, int]
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        out = {"model": model, "created_at": _now(), "message": message, "done": True}
        out["done_reason"] = reason
        out.update({k: v for k, v in metrics.items() if v})  # omitempty: zero is left out
        return out

    def _chat_stream(
        self, model: str, content: str, thinking: str | None, reason: str, metrics: dict[str, int]
    ) -> Iterator[dict[str, Any]]:
        if thinking:
            yield {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": "", "thinking": thinking},
                "done": False,
            }
        for piece in re.findall(r"\S+\s*|\s+", content):
            yield {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
        yield self._chat_object(model, "", None, reason, metrics)

    def embed(self, body: Any) -> Any:
        if not isinstance(body, dict):
            raise HttpError(400, "missing request body")
        name = body.get("model")
        m = self.find(name) if isinstance(name, str) else None
        if m is None:
            raise HttpError(404, f'model "{name}" not found, try pulling it first')
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw] if raw else []  # "" only loads the model
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            raise HttpError(400, "invalid input type")
        dims = body.get("dimensions")
        vectors = [hashed_embedding(t) for t in inputs]
        if isinstance(dims, int) and 0 < dims < EMBED_DIM:
            vectors = [_unit(v[:dims]) for v in vectors]
        out: dict[str, Any] = {"model": m.name, "embeddings": vectors}
        n = sum(len(tokens(t)) for t in inputs)
        if n:
            out.update(total_duration=100_000 * len(inputs), prompt_eval_count=n)
        return out

    def create(self, body: Any) -> Any:
        if body is None:
            raise HttpError(400, "missing request body")
        if not isinstance(body, dict):
            raise HttpError(400, "json: cannot unmarshal into Go value of type api.CreateRequest")
        name = body.get("model") or body.get("name")  # `name` is deprecated but read
        target = normalize_name(name) if isinstance(name, str) else None
        if target is None:
            raise HttpError(400, "invalid model name")
        stream = body.get("stream", True) is not False
        src, files, adapters = body.get("from"), body.get("files"), body.get("adapters")
        if not src and not files:
            raise HttpError(400, "neither 'from' or 'files' was specified")
        for group in (files, adapters):
            if group is None:
                continue
            if not isinstance(group, dict):
                raise HttpError(400, "invalid files")
            for rel, digest in group.items():
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise HttpError(400, "file path must be relative")
                if not isinstance(digest, str) or not DIGEST.match(digest):
                    raise HttpError(400, "invalid digest format")
        if adapters and sum(1 for k in adapters if k.endswith(".gguf")) > 1:
            raise HttpError(400, "only one adapter is currently supported")
        if src is not None and (not isinstance(src, str) or normalize_name(src) is None):
            raise HttpError(400, "invalid model name")

        base = self.find(src) if src else None
        progress: list[dict[str, Any]] = []
        if src and base is None:
            # An unknown base is pulled; the registry lacks it, after output has started.
            if not stream:
                raise HttpError(500, "pull model manifest: file does not exist")
            return iter(
                [
                    {"status": "pulling manifest"},
                    {"error": "pull model manifest: file does not exist"},
                ]
            )
        new = Model(name=target, family=base.family if base else "llama")
        if base is not None:
            progress.append({"status": f"using existing layer sha256:{base.digest}"})
            new.capabilities = list(base.capabilities)
            new.system, new.template = base.system, base.template
            new.parameters = dict(base.parameters)
            new.messages = [dict(x) for x in base.messages]
            new.license = list(base.license)
            new.parent = base.name
            new.files, new.adapters = dict(base.files), dict(base.adapters)
            new.quantization = base.quantization
        if files:
            for rel, digest in files.items():
                self._check_blob(rel, digest, adapter=False)
                progress.append({"status": "parsing GGUF"})
            new.files = dict(files)
            new.quantization = "F16"
        if adapters:
            for rel, digest in adapters.items():
                self._check_blob(rel, digest, adapter=True)
            if not any(k.endswith(".gguf") for k in adapters) and new.family not in (
                "llama",
                "gemma2",
            ):
                raise HttpError(400, "unsupported architecture")
            progress.append({"status": "parsing GGUF"})
            new.adapters = dict(adapters)
        quantize = body.get("quantize") or body.get("quantization")
        if quantize:
            if quantize not in ("q4_K_M", "q4_K_S", "q8_0"):
                raise HttpError(400, f"unsupported quantization type {quantize}")
            if new.quantization not in ("F16", "BF16", "F32"):
                raise HttpError(400, "quantization is only supported for F16 and F32 models")
            progress.append({"status": f"quantizing F16 model to {quantize}"})
            new.quantization = quantize.upper()
        for key in ("system", "template"):
            value = body.get(key)
            if isinstance(value, str) and value:  # empty keeps the base's value
                setattr(new, key, value)
                progress.append({"status": f"creating new layer sha256:{_sha(value)}"})
        params = body.get("parameters")
        if isinstance(params, dict) and params:
            new.parameters = {**new.parameters, **params}  # merged, new keys win
            progress.append({"status": f"creating new layer sha256:{_sha(json.dumps(params))}"})
        messages = body.get("messages")
        if isinstance(messages, list) and messages:  # no role validation, as the server
            new.messages = [
                {"role": str(x.get("role", "")), "content": str(x.get("content", ""))}
                for x in messages
                if isinstance(x, dict)
            ]
            progress.append({"status": f"creating new layer sha256:{_sha(json.dumps(messages))}"})
        lic = body.get("license")
        if lic:
            new.license += [lic] if isinstance(lic, str) else [str(x) for x in lic]
        progress.append({"status": "writing manifest"})
        if not stream:
            self.add_model(new)
            return {"status": "success"}
        return self._create_stream(progress, new)

    def _create_stream(
        self, progress: list[dict[str, Any]], new: Model
    ) -> Iterator[dict[str, Any]]:
        yield from progress
        # The manifest is written only if the stream got this far (a failure mid-stream
        # leaves no model behind).
        self.add_model(new)
        yield {"status": "success"}

    def _check_blob(self, rel: str, digest: str, *, adapter: bool) -> None:
        path = self.blobs.get(digest)
        if path is None:
            if adapter:
                raise HttpError(400, f"open {self.blob_dir / digest}: no such file or directory")
            if rel.endswith(".gguf"):
                raise HttpError(500, f"open {self.blob_dir / digest}: no such file or directory")
            raise HttpError(400, "unknown type")
        if rel.endswith(".gguf"):
            with path.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise HttpError(400, "supplied file was not in GGUF format")
        elif not rel.endswith((".safetensors", ".json")) and not rel.endswith("tokenizer.model"):
            raise HttpError(400, "unknown type")

    def pull(self, body: Any) -> Any:
        if not isinstance(body, dict):
            raise HttpError(400, "missing request body")
        name = body.get("model") or body.get("name")  # `name` is deprecated but read
        target = normalize_name(name) if isinstance(name, str) else None
        if target is None:
            raise HttpError(400, "invalid model name")
        stream = body.get("stream", True) is not False
        with self.lock:
            found = [m for key, m in self.registry.items() if key.lower() == target.lower()]
        if not found:
            # the registry answers after the manifest request: a later line, status 200
            if not stream:
                raise HttpError(500, "pull model manifest: file does not exist")
            return iter(
                [
                    {"status": "pulling manifest"},
                    {"error": "pull model manifest: file does not exist"},
                ]
            )
        if not stream:
            self.add_model(copy.deepcopy(found[0]))
            return {"status": "success"}
        return self._pull_stream(found[0])

    def _pull_stream(self, model: Model) -> Iterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        total = int(model.size)
        layer = {"digest": f"sha256:{model.digest}", "total": total}
        yield {"status": f"pulling {model.digest[:12]}", **layer}  # `completed` 0: omitted
        yield {"status": f"pulling {model.digest[:12]}", **layer, "completed": total // 2}
        yield {"status": f"pulling {model.digest[:12]}", **layer, "completed": total}
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        # installed only once the stream got this far: a failed pull leaves nothing behind
        self.add_model(copy.deepcopy(model))
        yield {"status": "success"}

    def copy(self, body: Any) -> Any:
        src, dst = _field(body, "source"), _field(body, "destination")
        if not src or not dst:
            raise HttpError(400, "source and destination are required")
        m = self.find(src)
        if m is None:
            raise HttpError(404, f'model "{src}" not found')
        target = normalize_name(dst)
        if target is None:
            raise HttpError(400, f"invalid destination name: {dst}")
        clone = copy.deepcopy(m)
        clone.name, clone.modified_at = target, _now()
        self.add_model(clone)
        return None

    def delete(self, body: Any) -> Any:
        name = _field(body, "model") or _field(body, "name")
        if not name or normalize_name(name) is None:
            raise HttpError(400, "invalid model name")
        m = self.find(name)
        if m is None:
            raise HttpError(404, f"model '{name}' not found")
        with self.lock:
            del self.models[m.name]
        return None


def _chat_model(name: str, family: str) -> Model:
    caps = ["completion", "tools"] + (["thinking"] if family in THINKING_FAMILIES else [])
    return Model(name=name, family=family, capabilities=caps)


def _embed_model(name: str) -> Model:
    return Model(name=name, family="bert", capabilities=["embedding"], size=100_000_000)


def _field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _think(value: Any, m: Model, name: str) -> bool:
    if value is None:  # a thinking-capable model thinks when `think` is omitted
        return "thinking" in m.capabilities
    if value not in (True, False, "low", "medium", "high", "max"):
        raise HttpError(400, f"invalid think value: {value!r}")
    if value is not False and "thinking" not in m.capabilities:
        raise HttpError(400, f'"{name}" does not support thinking')
    return value is not False


def _cut(content: str, kept: list[str]) -> str:
    pos = 0
    for tok in kept:
        pos = content.index(tok, pos) + len(tok)
    return content[:pos]


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
