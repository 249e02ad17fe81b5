"""Batched, cached text embeddings over any Backend, plus cosine helpers.

Each distinct text is embedded once: duplicates inside a call collapse, and a content-hash cache
(sha256 of model + NUL + text) remembers vectors across calls.
Rows come back L2-normalized, so a dot product is a cosine. `EmbedGatherer` joins the
concurrent calls of one process into one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

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
    ) -> None:
        self.backend = backend
        self.model = model
        self.batch_size = max(1, batch_size)
        self.cache: dict[str, np.ndarray] = {} if cache is None else cache
        self.dim: int | None = None
        self.requests = 0
        self.texts_embedded = 0
        self.cache_hits = 0

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


class EmbedGatherer:
    """Embeds the texts of concurrent `embed` calls in one call of `inner.embed`.

    The first call of a batch waits for the others to join: until every task inside `member()`
    (e.g. each case a validator is scoring) has made its first call, or `window_s` has passed,
    whichever comes first. Then one request carries them all and each caller gets its own
    rows; if it fails, every caller of it gets the error.
    """

    def __init__(self, inner: Embedder, *, window_s: float = 0.05) -> None:
        self.inner = inner
        self.window_s = window_s
        self.model = inner.model
        self.calls = 0  # calls of inner.embed
        self.expecting = 0  # members that have not called embed yet
        self._member: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
            "embed_member", default=None
        )
        self._waiting: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        self._full = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """The task will embed soon: a batch waits for its first call (up to `window_s`)."""
        pending = [True]
        token = self._member.set(pending)
        self.expecting += 1
        try:
            yield
        finally:
            self._member.reset(token)
            self._joined(pending)

    def _joined(self, pending: list[bool] | None) -> None:
        if pending is not None and pending[0]:
            pending[0] = False
            self.expecting -= 1
        if self._waiting and self.expecting <= 0:
            self._full.set()

    async def embed(self, texts: list[str]) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(texts), future))
        if len(self._waiting) == 1:  # the first of a batch sends it
            self._full.clear()
            task = asyncio.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._joined(self._member.get())
        return await future

    async def _send(self) -> None:
        batch: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.window_s)
            batch, self._waiting = self._waiting, []
            self.calls += 1
            rows = await self.inner.embed([t for part, _ in batch for t in part])
        except BaseException as exc:  # every caller of the batch gets the error
            if not batch:
                batch, self._waiting = self._waiting, []
            error = exc if isinstance(exc, Exception) else RuntimeError("embedding cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for part, future in batch:
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(rows[start : start + len(part)])
            start += len(part)
