"""The model-backend port: what the services need from an LLM server.

Two implementations share it: `shared.ollama.OllamaClient` (a real Ollama server over HTTP) and
`training.local_backend.LocalBackend` (in-process, same semantics for created models). The request
and response shapes are Ollama's own JSON (reference: ../shared/reference/ollama-api.md), and both
report failures with the `BackendError` family below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

Role = Literal["system", "user", "assistant"]


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str
    thinking: str | None = None


class ChatResponse(msgspec.Struct, kw_only=True):
    model: str = ""
    message: ChatMessage = msgspec.field(
        default_factory=lambda: ChatMessage(role="assistant", content="")
    )
    done: bool = True
    done_reason: str | None = None
    eval_count: int = 0  # metric fields are omitted by the server when zero
    prompt_eval_count: int = 0
    total_duration: int = 0


class CreateRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`POST /api/create` body (current structured API; never the removed `modelfile`)."""

    model: str
    from_: str | None = msgspec.field(default=None, name="from")
    files: dict[str, str] | None = None  # relname → "sha256:<hex>"
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[ChatMessage] | None = None
    license: str | list[str] | None = None
    quantize: str | None = None
    stream: bool = True


class CreateProgress(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A progress line of `/api/create` or `/api/pull` (both stream this shape)."""

    status: str = ""
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    error: str | None = None


class ModelDetails(msgspec.Struct, kw_only=True):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ShowResponse(msgspec.Struct, kw_only=True):
    modelfile: str = ""
    template: str = ""
    system: str = ""
    parameters: str = ""  # one string, a line per value (Ollama's format)
    license: str = ""
    messages: list[ChatMessage] | None = None
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)
    model_info: dict[str, Any] = {}
    capabilities: list[str] = []
    modified_at: str = ""


class ModelTag(msgspec.Struct, kw_only=True):
    name: str
    model: str = ""
    modified_at: str = ""
    size: int = 0
    digest: str = ""
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)


ProgressCallback = Callable[[CreateProgress], Awaitable[None] | None]


class BackendError(Exception):
    """A call to the model backend failed. `status` is the HTTP status (None: no response); the
    in-process backend uses the status Ollama would have answered."""

    def __init__(
        self, path: str, message: str, *, status: int | None = None, backend: str = ""
    ) -> None:
        self.path = path
        self.status = status
        self.message = message  # the server's own `error` text where there was one
        where = f"{backend} {path}" if backend else path
        super().__init__(f"{where}: " + (f"{status} " if status is not None else "") + message)


class BackendUnavailable(BackendError):
    """Transient: refused, dropped, timed out, 5xx (incl. 503 busy). Retrying may help."""


class BackendRejected(BackendError):
    """Permanent: the request was refused (4xx). Retrying cannot help."""


class ModelNotFound(BackendRejected):
    """404: unknown model or blob."""


@runtime_checkable
class Backend(Protocol):
    """What a model server offers. Errors: `BackendError` and its subclasses."""

    name: str  # "ollama" | "local"

    async def version(self) -> str: ...

    async def tags(self) -> list[ModelTag]: ...

    async def show(self, model: str) -> ShowResponse: ...

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        *,
        options: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> ChatResponse: ...

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]: ...

    async def create(
        self, request: CreateRequest, *, on_progress: ProgressCallback | None = None
    ) -> None: ...

    async def pull(self, model: str, *, on_progress: ProgressCallback | None = None) -> None:
        """Download `model` from the registry (`ollama pull`); returns after `success`."""
        ...

    async def push_blob(self, path: Path) -> str:
        """Upload a file if the server lacks it; returns its `sha256:<hex>` digest."""
        ...

    async def copy(self, source: str, destination: str) -> None: ...

    async def delete(self, model: str) -> None: ...

    async def aclose(self) -> None: ...


def parse_parameters(text: str) -> dict[str, Any]:
    """Read `/api/show`'s `parameters` string (name padded, value Go-quoted) into a dict."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        name, _, raw = line.strip().partition(" ")
        if not name:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].encode().decode("unicode_escape").encode("latin-1").decode("utf-8")
            value: Any = raw
        else:
            value = _number(raw)
        if name == "stop":
            out.setdefault("stop", []).append(value)
        else:
            out[name] = value
    return out


def _number(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if raw in ("true", "false"):
        return raw == "true"
    return raw
