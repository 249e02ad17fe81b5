"""Validation throughput: 1, 2, 4 and 8 validator processes against a backend with fixed latency.

The backend is the Ollama test double with a fixed delay per call (default 1 s, chats and
embeddings alike; it serves calls concurrently), so the numbers measure the dispatch, not a
model. The k validators are `mindx serve validator` processes on one bus (each with its default
`--validator-concurrency`), and the run is dispatched as the trainer does it
(`services.validator.validate_cases`). Baselines, measured in the same run:
  - the original's loop: one case at a time (chat, embed), plus its 100 ms sleep per case;
  - one validator process (the speed-up ratios for 2, 4 and 8 are against it).

    python -m bench.bench_validation [--cases 40] [--latency 1.0] [--validators 1,2,4,8]
                                     [--validator-concurrency 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from services.validator import validate_cases
from shared import subjects
from shared.backend import ChatMessage
from shared.bus import Bus
from shared.embeddings import Embedder
from shared.messages import RunRecord, ValidationCase
from shared.nats_server import EmbeddedNats
from shared.ollama import OllamaClient
from shared.settings import Settings
from tests.ollama_double import OllamaDouble

EMBED_MODEL = "qllama/bge-small-zh-v1.5:latest"
CHAT_MODEL = "qwen3:0.6b"


def run_id(label: str) -> str:
    """A run id per round (validators serve only runs the trainer registered)."""
    return f"20250101_000000_{zlib.crc32(label.encode()) & 0xFFFF:04x}"


async def register(bus: Bus, label: str) -> None:
    record = RunRecord(
        run_id=run_id(label),
        stage="running",
        mode="message",
        base_model=CHAT_MODEL,
        new_model=CHAT_MODEL,
    )
    await bus.put_record(subjects.RUNS, record.run_id, record)


def make_cases(run: str, n: int) -> list[ValidationCase]:
    # distinct texts per round so no embedding cache helps a later round
    return [
        ValidationCase(
            run_id=run_id(run),
            case_id=i,
            model=CHAT_MODEL,
            prompt=f"[{run}] Is there a cheap hotel in the north of town, number {i}?",
            expected=f"[{run}] Yes, the Acorn guest house is cheap and in the north ({i}).",
        )
        for i in range(n)
    ]


async def original_loop(url: str, cases: list[ValidationCase]) -> float:
    """One case at a time, then the original's 100 ms sleep."""
    async with OllamaClient(url) as client:
        embedder = Embedder(client, EMBED_MODEL)
        t0 = time.perf_counter()
        for case in cases:
            reply = await client.chat(case.model, [ChatMessage(role="user", content=case.prompt)])
            await embedder.embed([reply.message.content, case.expected])
            await asyncio.sleep(0.1)
        return time.perf_counter() - t0


def start_validators(
    k: int, nats_url: str, ollama_url: str, workdir: Path, per: int
) -> list[subprocess.Popen]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "services.cli", "serve", "validator",
        "--nats", nats_url, "--ollama", ollama_url, "--embed-model", EMBED_MODEL,
        "--data-dir", str(workdir), "--validator-concurrency", str(per),
    ]  # fmt: skip
    return [subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL) for _ in range(k)]


async def wait_for_validators(bus: Bus, k: int) -> None:
    """Every process pulls (an idle validator keeps a pull request open on the durable)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        load = await bus.queue_load(subjects.VALIDATOR)
        if load is not None and load.waiting >= k:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not all of {k} validators are pulling")


async def with_processes(
    bus: Bus, k: int, nats_url: str, ollama_url: str, n: int, per: int
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        procs = start_validators(k, nats_url, ollama_url, Path(tmp), per)
        try:
            await wait_for_validators(bus, k)
            await register(bus, f"k{k}")
            cases = make_cases(f"k{k}", n)
            t0 = time.perf_counter()
            results = await validate_cases(bus, cases, concurrency=1, timeout_s=60)
            elapsed = time.perf_counter() - t0
            errors = [r.error for r in results if r.error]
            if errors:
                raise RuntimeError(f"{len(errors)} cases failed: {errors[0]}")
            served = len({r.validator for r in results})
            if served != k:
                print(f"  note: {served} of {k} validators scored cases", file=sys.stderr)
            return elapsed
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
            await asyncio.sleep(2.5)  # their last pull requests expire before the next round


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per backend call")
    ap.add_argument("--validators", default="1,2,4,8", help="validator counts, comma-separated")
    ap.add_argument(
        "--validator-concurrency",
        type=int,
        default=Settings().validator_concurrency,
        help="cases each validator scores at once (default: the validators' own default)",
    )
    args = ap.parse_args()
    per = args.validator_concurrency
    n = args.cases
    counts = [int(k) for k in args.validators.split(",")]
    if counts[0] != 1:
        counts.insert(0, 1)
    with tempfile.TemporaryDirectory() as store, OllamaDouble(latency_s=args.latency) as double:
        server = EmbeddedNats(Path(store))
        await server.start()
        try:
            bus = await Bus.connect(server.url)
            rows: list[tuple[str, float]] = [
                (
                    "original sequential loop (+100 ms sleep)",
                    await original_loop(double.url, make_cases("orig", n)),
                )
            ]
            for k in counts:
                secs = await with_processes(bus, k, server.url, double.url, n, per)
                rows.append((f"{k} validator process(es)", secs))
            await bus.close()
        finally:
            await server.stop()
    orig = rows[0][1]
    one = rows[1][1]
    print(
        f"{platform.machine()} cpus={os.cpu_count()} cases={n} "
        f"latency={args.latency * 1000:.0f} ms/call validator-concurrency={per}"
    )
    print(f"{'case':<42}{'seconds':>9}{'cases/s':>9}{'vs 1 proc':>11}{'vs original':>13}")
    for name, secs in rows:
        print(f"{name:<42}{secs:>9.2f}{n / secs:>9.2f}{one / secs:>10.2f}x{orig / secs:>12.2f}x")
    # a case holds a slot for a chat and an embedding: waves of k x concurrency cases
    waves = [math.ceil(n / (k * per)) for k in counts]
    print("waves of cases (the floor at this latency): " + ", ".join(
        f"k={k}: {w} x {2 * args.latency:g} s" for k, w in zip(counts, waves, strict=True)
    ))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
