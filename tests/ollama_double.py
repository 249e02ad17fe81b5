"""A strict fake Ollama server over real HTTP, for tests, benchmarks and demos.

It follows ../shared/reference/ollama-api.md where a client can notice: status codes and error
texts, NDJSON streaming (`stream` omitted means true), 405 for wrong methods, the structured
`/api/create` (the removed `modelfile` field gets 400), blobs by digest, baked `messages` and SYSTEM
prepended to every chat, metrics omitted when zero.

Chat is deterministic and honest about personalization: a base model answers a fixed generic
reply built from the prompt; a created model with baked messages answers with the assistant reply
of the baked user turn most similar to the last user message (hashed character-3-gram cosine, the
same vectors `/api/embed` returns), and falls back to the generic reply when nothing is similar.

In tests:   with OllamaDouble() as d: ... d.url, d.faults, d.models, d.requests
Standalone: python -m tests.ollama_double --port 11435 --latency 0.2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import shutil
import socket
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

EMBED_DIM = 256
DEFAULT_CHAT_MODELS = {"qwen3:0.6b": "qwen3", "smollm2:135m": "llama"}
DEFAULT_EMBED_MODELS = ("qllama/bge-small-zh-v1.5:latest",)
THINKING_FAMILIES = {"qwen3"}
BUSY = "server busy, please try again.  maximum pending requests exceeded"

_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
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


# --- faults -----------------------------------------------------------------------------------
@dataclass
class Fault:
    status: int | None = None  # answer this status with {"error": message}
    message: str = "injected failure"
    delay_s: float = 0.0  # sleep first (longer than the client's timeout = a timeout)
    drop: bool = False  # close the socket without any response
    stream_error: str | None = None  # 200, some output, then {"error": ...} (create/chat)
    stream_cut: bool = False  # 200, one line, then the stream ends cleanly (no success/done)

    @classmethod
    def error(cls, status: int = 500, message: str | None = None) -> Fault:
        return cls(status=status, message=message or (BUSY if status == 503 else "injected"))

    @classmethod
    def timeout(cls, delay_s: float) -> Fault:
        return cls(delay_s=delay_s)

    @classmethod
    def dropped(cls) -> Fault:
        return cls(drop=True)

    @classmethod
    def midstream(cls, message: str) -> Fault:
        return cls(stream_error=message)

    @classmethod
    def cut(cls) -> Fault:
        return cls(stream_cut=True)


class Faults:
    """Per-path queues: each request to `path` consumes the next fault, if any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}

    def add(self, path: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._queues.setdefault(path, deque()).extend([fault] * times)

    def take(self, path: str) -> Fault | None:
        with self._lock:
            q = self._queues.get(path)
            return q.popleft() if q else None

    def pending(self, path: str | None = None) -> int:
        with self._lock:
            if path is not None:
                return len(self._queues.get(path, ()))
            return sum(len(q) for q in self._queues.values())

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()


class Call(NamedTuple):
    method: str
    path: str
    body: Any  # decoded JSON, or None (no body, not JSON, or a blob upload)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the server -------------------------------------------------------------------------------
class OllamaDouble:
    """The fake server. Thread-safe; every handler runs in its own thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        chat_models: dict[str, str] | None = None,
        embed_models: Iterable[str] = DEFAULT_EMBED_MODELS,
        version: str = "0.13.0",
        latency_s: float = 0.0,
        recall_threshold: float = 0.25,
    ) -> None:
        self.version = version
        self.latency_s = latency_s
        self.recall_threshold = recall_threshold
        self.faults = Faults()
        self.requests: list[Call] = []
        self.chats: list[list[dict[str, Any]]] = []  # effective message lists, as the model saw
        self.models: dict[str, Model] = {}
        self.blob_dir = Path(tempfile.mkdtemp(prefix="ollama-double-"))
        self.blobs: dict[str, Path] = {}
        self.lock = threading.RLock()
        self._stopping = threading.Event()
        for name, family in (chat_models or DEFAULT_CHAT_MODELS).items():
            caps = ["completion", "tools"] + (["thinking"] if family in THINKING_FAMILIES else [])
            self.add_model(Model(name=name, family=family, capabilities=caps))
        for name in embed_models:
            self.add_model(
                Model(name=name, family="bert", capabilities=["embedding"], size=100_000_000)
            )
        self._server = _Server((host, port), _Handler)
        self._server.double = self
        self._thread: threading.Thread | None = None

    # registry helpers
    def add_model(self, model: Model) -> Model:
        name = normalize_name(model.name)
        if name is None:
            raise ValueError(f"invalid model name {model.name!r}")
        model.name = name
        with self.lock:
            self.models[name] = model
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

    def count(self, path: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for c in self.requests if c.path == path and method in (None, c.method))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # lifecycle
    def start(self) -> OllamaDouble:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.blob_dir, ignore_errors=True)

    def __enter__(self) -> OllamaDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

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
                if not isinstance(digest, str) or not _DIGEST.match(digest):
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


# --- HTTP plumbing ----------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once
    allow_reuse_address = True
    double: OllamaDouble

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or disconnect are part of the tests


_ROUTES: dict[str, dict[str, str]] = {
    "/api/version": {"GET": "version_", "HEAD": "version_"},
    "/api/tags": {"GET": "tags", "HEAD": "tags"},
    "/api/show": {"POST": "show"},
    "/api/chat": {"POST": "chat"},
    "/api/embed": {"POST": "embed"},
    "/api/create": {"POST": "create"},
    "/api/copy": {"POST": "copy"},
    "/api/delete": {"DELETE": "delete"},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the real server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # request/response helpers
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
        self.send_response(status)
        if body or status != 200:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _stream(self, items: Iterator[dict[str, Any]], fault: Fault | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        for item in items:
            if fault and fault.stream_cut and sent >= 1:
                break
            if fault and fault.stream_error and sent >= 1:
                item = {"error": fault.stream_error}
            self._chunk(json.dumps(item, ensure_ascii=False).encode() + b"\n")
            sent += 1
            if "error" in item:
                break
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        d = self.server.double
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        is_blob = path.startswith("/api/blobs/")
        body: Any = None
        bad_json: str | None = None
        if raw and not is_blob:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                bad_json = f"invalid character in JSON: {exc.msg}"
        with d.lock:
            d.requests.append(Call(method, path, body))
        if d.latency_s:
            d.sleep(d.latency_s)
        fault = d.faults.take(path)
        if fault is not None:
            if fault.delay_s:
                d.sleep(fault.delay_s)
            if fault.drop:
                return self._drop()
            if fault.status is not None:
                return self._send_error(fault.status, fault.message)
        try:
            if path in ("/", ""):
                if method not in ("GET", "HEAD"):
                    raise HttpError(405, "405 method not allowed")
                return self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
            if is_blob:
                return self._blob(method, path.removeprefix("/api/blobs/"), raw)
            route = _ROUTES.get(path)
            if route is None:
                return self._send(404, b"404 page not found", "text/plain")
            if method not in route:
                return self._send(405, b"405 method not allowed", "text/plain")
            if bad_json:
                raise HttpError(400, bad_json)
            result = getattr(d, route[method])(body)
            if fault and fault.stream_error and not isinstance(result, Iterator):
                if path == "/api/chat" or path == "/api/create":  # stream:false: real status
                    raise HttpError(500, fault.stream_error)
            if result is None:
                return self._send(200)
            if isinstance(result, Iterator):
                return self._stream(result, fault)
            return self._send(200, json.dumps(result, ensure_ascii=False).encode())
        except HttpError as exc:
            return self._send_error(exc.status, exc.message)

    def _blob(self, method: str, digest: str, raw: bytes) -> None:
        d = self.server.double
        if method not in ("HEAD", "POST"):
            return self._send(405, b"405 method not allowed", "text/plain")
        if not _DIGEST.match(digest):
            raise HttpError(400, "invalid digest format")
        key = "sha256:" + digest[7:]
        if method == "HEAD":
            if key in d.blobs:
                return self._send(200)
            return self._send_error(404, f'blob "{digest}" not found')
        if key in d.blobs:
            return self._send(200)
        got = "sha256:" + hashlib.sha256(raw).hexdigest()
        if got != digest:  # compared as strings: upper-case hex or `sha256-` is a mismatch
            raise HttpError(400, f'digest mismatch, expected "{digest}", got "{got}"')
        path = d.blob_dir / ("sha256-" + got[7:])
        path.write_bytes(raw)
        with d.lock:
            d.blobs[got] = path
        return self._send(201)


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the fake Ollama server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11435)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    p.add_argument("--version", default="0.13.0")
    args = p.parse_args(argv)
    double = OllamaDouble(
        host=args.host, port=args.port, latency_s=args.latency, version=args.version
    )
    double.start()
    print(f"fake ollama on {double.url} (latency {args.latency}s); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        double.stop()


if __name__ == "__main__":
    main()
