"""Time to no trace: how long forgetting a memory point takes, from `memory.point.deleted` to
the moment nothing under the data dir or in the NATS store holds its text.

For each shared data set, all its points arrive through the bus on a real nats-server, one
message-mode run makes a live model (its gate's min_effect at -1, so the model goes live
whatever its score: what is measured is forgetting), and then two points are deleted through
the bus, with the collector, config updater, forgetter and trainer serving as in
`mindx serve all`:

* `baked`: a point the live model holds: the config switches away at once, the model is
  retired, datasets and reports are scrubbed, events erased, a retrain is requested;
* `plain`: a point no model holds (the corpus, the MEMORY stream, perhaps a dataset or a
  report hold it).

The clock runs from the publish of the deletion to the forgetter's ack (polled every 20 ms);
then every file of the data dir and of the NATS store is scanned for the point's text (the
scan is not timed) and what still holds it is printed. The goal is under 60 s; the baseline
is the training run of the same data, measured in the same process.

    python -m bench.bench_forget [--backend double|local] [--data multiwoz]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_loop import backend_url
from services import collector, config_updater, forget, trainer
from services.app import open_backend
from services.model_config import left_model, read_config
from services.trainer import Trainer
from shared import subjects
from shared.bus import Bus
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import MemoryPoint, MemoryPointDeleted, ModelLineage, TrainingRequested, encode
from shared.messages import decode as decode_payload
from shared.nats_server import EmbeddedNats
from shared.settings import Settings
from tests.traces import distinctive, holders

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL_S = 60.0


def load(path: Path) -> list[MemoryPoint]:
    return [decode_payload(x.encode(), MemoryPoint) for x in path.read_text().splitlines()]


def pick(points: list[MemoryPoint], ids: set[int]) -> tuple[MemoryPoint | None, bytes]:
    """The first point of `ids` with a distinctive text, and that text."""
    for p in points:
        line = distinctive(p, points, min_len=20) if p.id in ids else None
        if line:
            return p, line.encode("utf-8")
    return None, b""


async def until_acked(bus: Bus, spec: subjects.ConsumerSpec, seq: int) -> None:
    """Until the consumer has acked the message at stream sequence `seq`."""
    while True:
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        if info.ack_floor.stream_seq >= seq:
            return
        await asyncio.sleep(0.02)


async def bench(dataset: Path, backend_kind: str) -> list[dict[str, Any]]:
    points = load(dataset)
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-forget-") as tmp,
        backend_url(backend_kind) as url,
    ):
        ws = Path(tmp)
        flags: dict[str, Any] = {"workspace": str(ws), "watermark": "wm.json", "config_wait_s": 30}
        flags.update({"ollama": url} if url else {"backend": "local"})
        s = Settings.load(flags, env={})
        s.config_path.parent.mkdir(parents=True, exist_ok=True)
        s.config_path.write_text(json.dumps({"brain": {"left": s.base_model}, "models": []}))
        async with EmbeddedNats(ws / "nats") as server:
            bus = await Bus.connect(server.url, name="bench-forget")
            backend = open_backend(s)
            try:
                with Corpus.open(s.corpus_path) as corpus:
                    embedder = Embedder(backend, s.embedding_model)
                    updater = config_updater.updater_for(bus, s, backend)
                    services = [
                        await collector.serve(bus, s, corpus),
                        *await config_updater.serve(bus, s, backend),
                        await forget.serve(bus, s, corpus, backend, updater),
                        await trainer.serve(bus, s, backend, embedder, corpus),
                    ]
                    try:
                        for p in points:
                            msg_id = subjects.point_msg_id(p)
                            await bus.publish(subjects.MEMORY_POINT_CREATED, p, msg_id=msg_id)
                        await bus.wait_idle(subjects.COLLECTOR, timeout=600)
                        t0 = time.perf_counter()
                        # a live model to forget from, whatever the gate thinks of it
                        promote = s.replace(min_effect=-1.0)
                        report = await Trainer(bus, promote, backend, embedder, corpus).run(
                            TrainingRequested()
                        )
                        run_s = time.perf_counter() - t0
                        live = left_model(read_config(s.config_path), s.left_key)
                        record = await bus.get_record(subjects.MODELS, report.run_id, ModelLineage)
                        baked = {pv.id for pv in record.points} if record else set()
                        held = {p.id for p in points} - baked
                        chosen = {
                            "baked": pick(points, baked if live != s.base_model else set()),
                            "plain": pick(points[::-1], held),
                        }
                        for kind, (victim, needle) in chosen.items():
                            if victim is None:
                                print(f"no {kind} point to delete (the run: {report.status})")
                                continue
                            before = len(holders(needle, s.data_path, ws / "nats"))
                            live = left_model(read_config(s.config_path), s.left_key)
                            t0 = time.perf_counter()
                            ack = await bus.js.publish(
                                subjects.MEMORY_POINT_DELETED,
                                encode(MemoryPointDeleted(id=victim.id)),
                            )
                            await until_acked(bus, subjects.FORGETTER, ack.seq)
                            took = time.perf_counter() - t0
                            found = holders(needle, s.data_path, ws / "nats")
                            left = [h.removeprefix(f"{ws}{os.sep}") for h in found]
                            rows.append(
                                {
                                    "data": dataset.name.split(".")[0],
                                    "points": len(points),
                                    "kind": kind,
                                    "run_s": run_s,
                                    "forget_s": took,
                                    "files_before": before,
                                    "left": left,
                                    "live_after": left_model(
                                        read_config(s.config_path), s.left_key
                                    ),
                                    "live_before": live,
                                }
                            )
                            await bus.wait_idle(subjects.TRAINER, timeout=600)  # its retrain
                    finally:
                        for svc in reversed(services):
                            await svc.stop()
            finally:
                await backend.aclose()
                await bus.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["double", "local"], default="double")
    ap.add_argument("--data", nargs="*", default=["multiwoz", "kdconv"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # points without pairs are no news here
    rows: list[dict[str, Any]] = []
    for name in args.data:
        path = DATA / f"{name}.memory.jsonl"
        if not path.is_file():
            print(f"skipped {name}: {path} is not there")
            continue
        rows += asyncio.run(bench(path, args.backend))
    print(
        f"{'data':<9} {'points':>6} {'point':<6} {'no trace after':>14} {'of goal':>8} "
        f"{'of a run':>8} {'files before':>12}  left  live model"
    )
    worst = 0.0
    for r in rows:
        worst = max(worst, r["forget_s"])
        switched = (
            f"{r['live_before']} -> {r['live_after']}"
            if r["live_after"] != r["live_before"]
            else "kept"
        )
        print(
            f"{r['data']:<9} {r['points']:>6} {r['kind']:<6} {r['forget_s']:>12.2f} s "
            f"{r['forget_s'] / GOAL_S:>8.1%} {r['forget_s'] / r['run_s']:>7.2f}x "
            f"{r['files_before']:>12}  {len(r['left']):>4}  {switched}"
        )
        for f in r["left"]:
            print(f"    still holds it: {f}")
    traces = sum(len(r["left"]) for r in rows)
    print(f"worst time to no trace: {worst:.2f} s (goal {GOAL_S:.0f} s); traces left: {traces}")
    return 0 if rows and worst < GOAL_S and traces == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
