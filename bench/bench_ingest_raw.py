"""Baseline for the ingest benchmark: bare nats-py JetStream publish + pull consume + ack.

    .venv/bin/python -m bench.bench_ingest_raw [--n 5000] [--rounds 3]

`raw_consume_ack` is what a user would write without our bus: publish each payload and await
its ack, then fetch in batches and ack every message. Run on its own, this module also times
`Bus.publish` + `Bus.serve` with a no-op handler on the same server and payloads, and prints
messages per second with ratios against the raw baseline (rounds interleaved).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType

from shared import subjects
from shared.bus import Bus, Delivery
from shared.messages import MemoryPoint
from shared.nats_server import ensure_nats

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_payloads(limit: int | None = None) -> list[bytes]:
    """Memory points of ../shared/data as their raw JSON lines."""
    lines: list[bytes] = []
    for path in sorted(DATA.glob("*.memory.jsonl")):
        lines += [ln for ln in path.read_bytes().splitlines() if ln.strip()]
    return lines[:limit] if limit else lines


async def raw_consume_ack(
    url: str, n: int, payloads: Sequence[bytes], *, batch: int = 100
) -> float:
    """Seconds to publish `n` payloads (cycled) to a fresh stream, then fetch and ack them all."""
    nc = await nats.connect(url, name="bench-raw")
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"BENCH_RAW_{tag}", f"bench.raw.{tag}"
    await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE)
    try:
        await js.add_consumer(
            stream,
            ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
        )
        sub = await js.pull_subscribe_bind(durable="raw", stream=stream)
        start = time.perf_counter()
        for data in itertools.islice(itertools.cycle(payloads), n):
            await js.publish(subject, data)
        done = 0
        while done < n:
            for msg in await sub.fetch(min(batch, n - done), timeout=5):
                await msg.ack()
                done += 1
        await nc.flush()  # the last acks reached the server
        return time.perf_counter() - start
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def bus_consume_ack(url: str, n: int, payloads: Sequence[bytes], *, batch: int = 1) -> float:
    """The same work through Bus.publish_raw + Bus.serve (decode to MemoryPoint, no-op handler)."""
    bus = await Bus.connect(url, name="bench-bus")
    await bus.js.purge_stream("MEMORY")
    spec = dataclasses.replace(subjects.COLLECTOR, durable=f"bench-{uuid.uuid4().hex[:8]}")
    got = 0
    finished = asyncio.Event()

    async def handler(point: MemoryPoint, delivery: Delivery) -> None:
        nonlocal got
        got += 1
        if got == n:
            finished.set()

    try:
        start = time.perf_counter()
        for data in itertools.islice(itertools.cycle(payloads), n):
            await bus.publish_raw(subjects.MEMORY_POINT_CREATED, data)
        service = await bus.serve(spec, MemoryPoint, handler, batch=batch)
        await asyncio.wait_for(finished.wait(), 300)
        await bus.wait_idle(spec, timeout=60)  # every ack is in
        elapsed = time.perf_counter() - start
        await service.stop()
        await bus.js.delete_consumer(spec.stream, spec.durable)
        return elapsed
    finally:
        await bus.close()


Case = Callable[[str, int, Sequence[bytes]], Awaitable[float]]


async def interleaved_rates(
    cases: dict[str, Case], n: int, rounds: int, payloads: Sequence[bytes]
) -> dict[str, float]:
    """Median messages/s per case on one server; rounds interleave the cases so drift hits
    every case alike. The first case is the baseline."""
    rates: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as store:
        async with ensure_nats(os.environ.get("NATS_URL"), Path(store)) as url:
            for case in cases.values():  # warm-up
                await case(url, min(n, 200), payloads)
            for _ in range(rounds):
                for name, case in cases.items():
                    rates[name].append(n / await case(url, n, payloads))
    return {name: statistics.median(r) for name, r in rates.items()}


def print_rates(rates: dict[str, float], unit: str, header: str) -> None:
    base = next(iter(rates.values()))
    print(f"{platform.machine()} cpus={os.cpu_count()} {header}")
    for name, rate in rates.items():
        print(f"{name:<48}{rate:>10,.0f} {unit} {rate / base:>6.2f}x")


async def main(n: int, rounds: int) -> None:
    payloads = load_payloads()
    cases: dict[str, Case] = {
        "raw nats-py publish+fetch(100)+ack (baseline)": raw_consume_ack,
        "Bus.publish + serve(batch=1)": bus_consume_ack,
        "Bus.publish + serve(batch=64)": lambda u, k, p: bus_consume_ack(u, k, p, batch=64),
    }
    rates = await interleaved_rates(cases, n, rounds, payloads)
    print_rates(rates, "msgs/s", f"n={n} rounds={rounds} payloads={len(payloads)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
