"""Ollama's semantics for *created* models, as pure functions (no torch, no files).

The local backend follows them (reference: ../shared/reference/ollama-api.md §1, §3, §5): baked
`messages` are prepended to every chat, the model's SYSTEM is inserted first unless the caller
sends its own leading system message, PARAMETERs are defaults that request options override, and
`create` replaces system/messages only when the new value is non-empty. Errors carry the status
Ollama would answer with, so callers treat both backends alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from shared.backend import BackendError, BackendRejected, ChatMessage, ModelNotFound
from shared.modelfile import render_commands
from shared.names import InvalidName, normalize_model_name

log = logging.getLogger(__name__)

DEFAULT_NUM_PREDICT = 128  # keeps CPU runs short; Ollama's own default is unlimited
DEFAULT_NUM_CTX = 4096  # Ollama's default on small machines

ERROR_PATH = "local"  # BackendError.path for errors raised in-process

_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def rejected(message: str) -> BackendRejected:
    return BackendRejected(ERROR_PATH, message, status=400)


def not_found(message: str) -> ModelNotFound:
    return ModelNotFound(ERROR_PATH, message, status=404)


def failed(message: str) -> BackendError:
    # Neither "unavailable" (retrying a broken adapter cannot help) nor the caller's fault.
    return BackendError(ERROR_PATH, message, status=500)


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
                raise rejected(f'option "{key}" must be of type number')
            values[key] = float(value)
        elif key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise rejected(f'option "{key}" must be of type integer')
            if isinstance(value, float) and not value.is_integer():
                raise rejected(f'option "{key}" must be of type integer')
            values[key] = int(value)
        elif key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise rejected('option "stop" must be of type array')
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


def show_modelfile(record: ModelRecord, template: str) -> str:
    """A Modelfile for humans (`show`) with the record's values as stored; never parsed back."""
    return render_commands(
        record.base,
        adapters=record.adapters,
        template=template,
        system=record.system,
        parameters=format_parameters(record.parameters).splitlines(),
        messages=record.messages,
        license=record.license,
        comment=f"Modelfile of {record.name} (mindx local backend)",
    )


def normalize_name(name: str) -> str:
    """`[host/][namespace/]model[:tag]` with `latest` as the default tag; 400 when malformed."""
    try:
        return normalize_model_name(name.strip())
    except InvalidName:
        raise rejected(f"invalid model name {name!r}") from None


def parse_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` → lower-case hex; 400 `invalid digest format` else."""
    match = _DIGEST.match(digest or "")
    if not match:
        raise rejected("invalid digest format")
    return match.group(1).lower()


def check_relname(relname: str) -> None:
    """A file name in a create request: relative, without `..`."""
    parts = Path(relname).parts
    if not relname or os.path.isabs(relname) or ".." in parts:
        raise rejected("file path must be relative")


def check_template(template: str) -> None:
    """A chat template must at least parse as Jinja."""
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise rejected(f"template: {exc}") from exc


def human_number(n: int) -> str:
    """Parameter counts the way Ollama prints them (135M, 1.5B)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            digits = 0 if value >= 100 or value.is_integer() else 1 if value >= 10 else 2
            return f"{value:.{digits}f}{unit}"
    return str(n)


def now() -> str:
    return datetime.now(UTC).isoformat()
