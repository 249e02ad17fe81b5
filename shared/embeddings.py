"""Batched, cached text embeddings over any Backend, plus cosine helpers.

Each distinct text is embedded once: duplicates inside a call collapse, and a content-hash cache
(sha256 of model + NUL + text) remembers vectors across calls, optionally on disk as `.npz`.
Rows come back L2-normalized, so a dot product is a cosine.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.files import atomic_write

if TYPE_CHECKING:
    from shared.backend import Backend


def cache_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()


def normalize_rows(m: np.ndarray) -> np.ndarray:
    """L2-normalize each row; an all-zero row stays zero instead of becoming NaN."""
    m = np.asarray(m, dtype=np.float32)
    if m.ndim == 1:
        m = m[None, :]
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities, shape (len(a), len(b)); 1-D inputs count as one row."""
    return normalize_rows(a) @ normalize_rows(b).T


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosine_matrix(a, b)[0, 0])


class Embedder:
    """Embeds texts with `backend.embed(model, batch)`, in batches of `batch_size`.

    Counters: `requests` (backend calls), `texts_embedded` (texts sent), `cache_hits`
    (texts answered from the cache, duplicates within a call included).
    """

    def __init__(
        self,
        backend: Backend,
        model: str,
        *,
        batch_size: int = 64,
        cache: dict[str, np.ndarray] | None = None,
        cache_path: Path | None = None,
    ) -> None:
        self.backend = backend
        self.model = model
        self.batch_size = max(1, batch_size)
        self.cache: dict[str, np.ndarray] = {} if cache is None else cache
        self.cache_path = cache_path
        self.dim: int | None = None
        self.requests = 0
        self.texts_embedded = 0
        self.cache_hits = 0
        if cache_path is not None and cache_path.exists():
            self.load(cache_path)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), rows L2-normalized, in input order."""
        keys = [cache_key(self.model, t) for t in texts]
        missing: dict[str, str] = {}  # key -> text, first occurrence order
        for key, text in zip(keys, texts, strict=True):
            if key not in self.cache and key not in missing:
                missing[key] = text
        self.cache_hits += len(texts) - len(missing)

        pending = list(missing.items())
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            vectors = await self.backend.embed(self.model, [text for _, text in batch])
            self.requests += 1
            self.texts_embedded += len(batch)
            if len(vectors) != len(batch):
                raise ValueError(f"embed: {len(vectors)} vectors for {len(batch)} texts")
            rows = normalize_rows(np.asarray(vectors, dtype=np.float32))
            for (key, _), row in zip(batch, rows, strict=True):
                self.cache[key] = row

        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        out = np.stack([self.cache[k] for k in keys]).astype(np.float32, copy=False)
        self.dim = out.shape[1]
        return out

    # --- optional on-disk cache -------------------------------------------------------------
    def save(self, path: Path | None = None) -> Path:
        """Write the cache as `.npz` (keys and one matrix per dimension), atomically, 0600."""
        target = path or self.cache_path
        if target is None:
            raise ValueError("no cache path")
        by_dim: dict[int, list[str]] = {}
        for key, row in self.cache.items():
            by_dim.setdefault(row.shape[0], []).append(key)
        arrays: dict[str, np.ndarray] = {}
        for dim, keys in by_dim.items():
            arrays[f"keys_{dim}"] = np.array(keys)
            arrays[f"vecs_{dim}"] = np.stack([self.cache[k] for k in keys])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write(target, buf.getvalue())

    def load(self, path: Path) -> int:
        """Merge a saved cache; returns how many vectors it held."""
        n = 0
        with np.load(path, allow_pickle=False) as data:
            for name in data.files:
                if not name.startswith("keys_"):
                    continue
                keys = data[name]
                vecs = data["vecs_" + name.removeprefix("keys_")]
                for key, row in zip(keys, vecs, strict=True):
                    self.cache.setdefault(str(key), row.astype(np.float32))
                n += len(keys)
        return n
