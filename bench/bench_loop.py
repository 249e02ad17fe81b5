"""The loop over growing memory: does the live model only get better?

For each shared data set, every 10th memory point is set aside as a fixed evaluation set that
never reaches memory; the others arrive in four snapshots (25/50/75/100%). After each snapshot
one run goes through the whole loop on a real nats-server (collector, trainer with its gate
against the base and the live model, config updater with retention), and the model the config
then names is scored on the fixed evaluation set, the way validation scores a case. The score
must never go down: the exit status is 1 when it does. A challenger the gate rejects is scored
too, before it is deleted: what the live model would have become with a gate against the base
only (the `base-only gate` column: its decision, and the evaluation score that would follow).

    python -m bench.bench_loop [--backend double|local] [--eval 60] [--held-out 20]

`double`: the strict Ollama double (deterministic; its recall of baked examples is the
"personalization"). `local`: the in-process backend (smollm2 on CPU: slow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import collector, config_updater, pipeline
from services.app import open_backend
from services.collector import pairs_from_point
from services.filter import FilterConfig, filter_sync
from services.model_config import left_model, read_config
from services.trainer import Trainer
from services.validator import score_case
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import MemoryPoint, Pair, RunReport, TrainingRequested, ValidationCase, decode
from shared.nats_server import EmbeddedNats
from shared.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SNAPSHOTS = (0.25, 0.50, 0.75, 1.00)
EVAL_EVERY = 10  # every 10th point is evaluation only
EVAL_RUN_ID = "20000101_000000"  # scoring here goes to the backend directly, not to validators


@dataclass
class Row:
    share: float
    points: int
    report: RunReport
    live: str
    score: float
    challenger: float | None  # the new model's eval score (scored before a rejection deletes it)
    wall_s: float


class Scoring:
    """A backend that scores a model on the evaluation cases before deleting it."""

    def __init__(self, inner: Any, score: Any) -> None:
        self.inner, self.score, self.scores = inner, score, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete(self, model: str) -> None:
        self.scores[model] = await self.score(model)
        await self.inner.delete(model)


def split_points(path: Path) -> tuple[list[MemoryPoint], list[MemoryPoint]]:
    points = [decode(line.encode(), MemoryPoint) for line in path.read_text().splitlines()]
    held = [p for i, p in enumerate(points) if i % EVAL_EVERY == EVAL_EVERY - 1]
    memory = [p for i, p in enumerate(points) if i % EVAL_EVERY != EVAL_EVERY - 1]
    return memory, held


def eval_pairs(points: list[MemoryPoint], limit: int, s: Settings) -> list[Pair]:
    """One pair per point the filter would keep (no filler, no secret), at most `limit`."""
    cfg = FilterConfig.from_settings(s)
    out: list[Pair] = []
    for p in points:
        kept, _ = filter_sync(pairs_from_point(p), cfg)
        if kept:
            out.append(kept[0])
        if len(out) == limit:
            break
    return out


@contextlib.contextmanager
def backend_url(kind: str) -> Iterator[str | None]:
    if kind != "double":
        yield None
        return
    from tests.ollama_double import OllamaDouble

    with OllamaDouble() as double:
        yield double.url


@contextlib.asynccontextmanager
async def the_loop(ws: Path, s: Settings) -> AsyncIterator[tuple[Bus, Corpus, Any, Embedder]]:
    async with EmbeddedNats(ws / "nats") as server:
        bus = await Bus.connect(server.url, name="bench-loop")
        backend = Scoring(open_backend(s), None)
        try:
            with Corpus.open(s.corpus_path) as corpus:
                services = [
                    await collector.serve(bus, s, corpus),
                    *await config_updater.serve(bus, s, backend),
                ]
                try:
                    yield bus, corpus, backend, Embedder(backend, s.embedding_model)
                finally:
                    for svc in reversed(services):
                        await svc.stop()
        finally:
            await backend.aclose()
            await bus.close()


async def score(model: str, cases: list[Pair], s: Settings, backend: Any, embedder: Any) -> float:
    options = pipeline.request_options(s)
    scored = [
        await score_case(
            ValidationCase(
                run_id=EVAL_RUN_ID,
                case_id=i,
                model=model,
                prompt=p.prompt,
                expected=p.completion,
                options=options,
            ),
            backend,
            embedder,
        )
        for i, p in enumerate(cases)
    ]
    values = [r.score for r in scored if r.score is not None]
    return sum(values) / len(values) if values else float("nan")


async def bench(dataset: Path, args: argparse.Namespace) -> tuple[float, list[Row]]:
    memory, held = split_points(dataset)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp, backend_url(args.backend) as url:
        ws = Path(tmp)
        flags: dict[str, Any] = {
            "workspace": str(ws),
            "watermark": "wm.json",
            "held_out": args.held_out,
            "config_wait_s": 30,
        }
        if url:
            flags["ollama"] = url
        else:
            flags["backend"] = "local"
        s = Settings.load(flags, env={})
        s.config_path.parent.mkdir(parents=True, exist_ok=True)
        s.config_path.write_text(json.dumps({"brain": {"left": s.base_model}, "models": []}))
        cases = eval_pairs(held, args.eval, s)
        rows: list[Row] = []
        async with the_loop(ws, s) as (bus, corpus, backend, embedder):

            async def on_eval(model: str) -> float:
                return await score(model, cases, s, backend.inner, embedder)

            backend.score = on_eval
            base_score = await on_eval(s.base_model)
            sent = 0
            for share in SNAPSHOTS:
                upto = round(share * len(memory))
                for p in memory[sent:upto]:
                    msg_id = subjects.point_msg_id(p)
                    await bus.publish(subjects.MEMORY_POINT_CREATED, p, msg_id=msg_id)
                sent = upto
                await bus.wait_idle(subjects.COLLECTOR, timeout=600)
                t0 = time.perf_counter()
                report = await Trainer(bus, s, backend, embedder, corpus).run(TrainingRequested())
                wall = time.perf_counter() - t0
                live = left_model(read_config(s.config_path), s.left_key) or s.base_model
                live_score = await on_eval(live)
                new = backend.scores.get(report.new_model)
                if live == report.new_model:
                    new = live_score
                rows.append(Row(share, upto, report, live, live_score, new, wall))
    return base_score, rows


def f(x: float | None, sign: bool = False) -> str:
    if x is None or x != x:
        return "—"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["double", "local"], default="double")
    ap.add_argument("--eval", type=int, default=60, help="fixed evaluation cases per data set")
    ap.add_argument("--held-out", type=int, default=20, help="the gate's held-out cases per run")
    args = ap.parse_args()
    backend = "the Ollama double" if args.backend == "double" else "the local backend (CPU)"
    print(f"{backend}, message mode; eval: fixed cases from every {EVAL_EVERY}th point")
    print(
        "gate: the run's held-out cases (rival: the live model, else the base); eval: the fixed "
        "cases"
    )
    print(
        f"{'data set':<9}{'memory':>7}{'points':>7}{'new':>6}  {'run':<25}{'rival':>6}{'new':>6}"
        f"{'CI low':>8}  {'live after the run':<34}{'eval':>6}{'change':>7}"
        f"  {'base-only gate':<16}{'s':>4}"
    )
    went_down = False
    for dataset in sorted(DATA.glob("*.memory.jsonl")):
        name = dataset.name.split(".")[0]
        base_score, rows = asyncio.run(bench(dataset, args))
        print(f"{name:<9}{'0%':>7}{0:>7}{'':>6}  {'':<25}{'':>6}{'':>6}{'':>8}  ", end="")
        print(f"{'base':<34}{f(base_score):>6}")
        previous = naive = base_score
        for row in rows:
            r = row.report
            rival = r.incumbent_score if r.incumbent_model else r.base_score
            low = r.incumbent_ci_low if r.incumbent_model else r.ci_low
            change = row.score - previous
            went_down |= change < -1e-9
            previous = row.score
            live = row.live if len(row.live) <= 33 else "…" + row.live[-32:]
            # a gate against the base only would have promoted whatever beat the base
            if r.ci_low is not None and r.ci_low > 0 and row.challenger is not None:
                naive, naive_text = row.challenger, f"promote {f(row.challenger)}"
            else:
                naive_text = f"keep {f(naive)}"
            print(
                f"{name:<9}{row.share:>7.0%}{row.points:>7}{r.new_pairs:>6}  {r.status:<25}"
                f"{f(rival):>6}{f(r.validation_score):>6}{f(low, True):>8}  {live:<34}"
                f"{f(row.score):>6}{f(change, True):>7}  {naive_text:<16}{row.wall_s:>4.0f}"
            )
    print("the live model's eval score " + ("went DOWN" if went_down else "never went down"))
    return 1 if went_down else 0


if __name__ == "__main__":
    sys.exit(main())
