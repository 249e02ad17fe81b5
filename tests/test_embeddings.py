"""Embedder over the real client and the double: batching, dedupe, cache; cosine helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from shared.embeddings import Embedder, cache_key, cosine_matrix, normalize_rows
from shared.ollama import OllamaClient
from tests.ollama_double import OllamaDouble, hashed_embedding

MODEL = "qllama/bge-small-zh-v1.5:latest"


@pytest.fixture
async def client(ollama_double: OllamaDouble) -> AsyncIterator[OllamaClient]:
    async with OllamaClient(ollama_double.url, backoff_s=0.01) as c:
        yield c


async def test_150_texts_take_three_requests_then_come_from_cache(
    client: OllamaClient, ollama_double: OllamaDouble
) -> None:
    texts = [f"conversation about topic {i}" for i in range(150)]
    emb = Embedder(client, MODEL, batch_size=64)
    first = await emb.embed(texts)
    assert first.shape == (150, 256) and first.dtype == np.float32
    assert ollama_double.count("/api/embed") == 3
    assert (emb.requests, emb.texts_embedded, emb.cache_hits) == (3, 150, 0)
    np.testing.assert_allclose(first[42], hashed_embedding(texts[42]), atol=1e-6)

    again = await emb.embed(texts[::-1])
    np.testing.assert_array_equal(again, first[::-1])
    assert ollama_double.count("/api/embed") == 3
    assert (emb.requests, emb.cache_hits) == (3, 150)


async def test_duplicates_embedded_once_and_only_missing_sent(
    client: OllamaClient, ollama_double: OllamaDouble
) -> None:
    emb = Embedder(client, MODEL)
    out = await emb.embed(["a cat", "a dog", "a cat", "a cat"])
    assert emb.texts_embedded == 2 and emb.cache_hits == 2
    np.testing.assert_array_equal(out[0], out[2])
    await emb.embed(["a dog", "a bird"])
    sent = [r.body["input"] for r in ollama_double.requests if r.path == "/api/embed"]
    assert sent == [["a cat", "a dog"], ["a bird"]]


async def test_cache_is_keyed_by_model(client: OllamaClient) -> None:
    shared: dict[str, np.ndarray] = {}
    await Embedder(client, MODEL, cache=shared).embed(["hello"])
    other = Embedder(client, "qwen3:0.6b", cache=shared)
    await other.embed(["hello"])
    assert other.requests == 1  # same text, other model: not a hit
    assert set(shared) == {cache_key(MODEL, "hello"), cache_key("qwen3:0.6b", "hello")}


async def test_empty_input_sends_nothing(client: OllamaClient, ollama_double: OllamaDouble) -> None:
    emb = Embedder(client, MODEL)
    assert (await emb.embed([])).shape[0] == 0
    assert ollama_double.count("/api/embed") == 0


class _RawVectors:
    """A backend whose vectors are not normalized (Ollama's legacy /api/embeddings can be)."""

    name = "raw"

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        return [[3.0, 4.0] if t else [0.0, 0.0] for t in inputs]


async def test_rows_are_normalized_and_zero_rows_stay_finite() -> None:
    emb = Embedder(_RawVectors(), "m")  # type: ignore[arg-type]
    out = await emb.embed(["x", ""])
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_cosine_helpers() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    m = cosine_matrix(a, b)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[0], [1.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(m[1], [2**-0.5, 2**-0.5, -(2**-0.5)], atol=1e-6)
    assert cosine_matrix(np.zeros(3), np.ones(3))[0, 0] == 0.0
    assert np.allclose(np.linalg.norm(normalize_rows(np.ones((4, 5))), axis=1), 1.0)


async def test_similar_texts_score_higher(client: OllamaClient) -> None:
    emb = Embedder(client, MODEL)
    v = await emb.embed(["where do I work", "where do i work?", "explain quantum tunnelling"])
    sims = cosine_matrix(v, v)
    assert sims[0, 1] > 0.8 and sims[0, 2] < 0.3
