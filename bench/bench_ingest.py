"""Collector ingest: memory points/s through JetStream into the corpus.

Baseline, measured in the same run on the same server, stream and payloads: a bare nats-py pull
consume + ack loop (what a user would write without the project). The collector case does the
real work: decode, extract every pair, upsert into the sqlite corpus, ack. Publishing is done
before the clock starts in both cases (the publisher is the Memory module). Rounds are
interleaved so drift hits every case.

    python -m bench.bench_ingest [--n 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Sequence

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from bench.bench_ingest_raw import Case, interleaved_rates, load_payloads, print_rates
from services import collector
from shared import subjects
from shared.bus import Bus, Delivery
from shared.corpus import Corpus
from shared.messages import MemoryPoint
from shared.settings import Settings


def unique_points(payloads: Sequence[bytes], n: int) -> list[bytes]:
    """n points with distinct ids (payloads cycled), so every one is real work for the corpus."""
    out: list[bytes] = []
    for i in range(n):
        raw = json.loads(payloads[i % len(payloads)])
        raw["id"] = 10_000_000 + i
        out.append(json.dumps(raw, ensure_ascii=False).encode())
    return out


async def fresh_memory_stream(bus: Bus, points: list[bytes]) -> None:
    """Empty MEMORY and the collector's durable, then publish the points (not timed: the
    publisher is the Memory module, not what this measures)."""
    await bus.js.purge_stream("MEMORY")
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await bus.js.delete_consumer("MEMORY", subjects.COLLECTOR.durable)
    for data in points:
        await bus.js.publish(subjects.MEMORY_POINT_CREATED, data)


async def raw_consume_ack(url: str, n: int, payloads: Sequence[bytes]) -> float:
    """Baseline: a bare nats-py pull consumer that fetches in batches and acks every message."""
    bus = await Bus.connect(url, name="bench-raw")
    try:
        await fresh_memory_stream(bus, unique_points(payloads, n))
        js = bus.js
        await js.add_consumer(
            "MEMORY",
            ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
        )
        sub = await js.pull_subscribe_bind(durable="raw", stream="MEMORY")
        start = time.perf_counter()
        done = 0
        while done < n:
            for msg in await sub.fetch(min(64, n - done), timeout=5):
                await msg.ack()
                done += 1
        await bus.nc.flush()  # the last acks reached the server
        elapsed = time.perf_counter() - start
        await sub.unsubscribe()
        await js.delete_consumer("MEMORY", "raw")
        return elapsed
    finally:
        await bus.close()


async def collector_ingest(url: str, n: int, payloads: Sequence[bytes]) -> float:
    """The collector's consumer: decode, extract pairs, upsert into sqlite, ack."""
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as data:
        bus = await Bus.connect(url, name="bench-collector")
        try:
            await fresh_memory_stream(bus, unique_points(payloads, n))
            settings = Settings.load({"data_dir": data}, env={})
            with Corpus.open(settings.corpus_path) as corpus:
                stored = 0
                finished = asyncio.Event()

                async def counted(batch: list[tuple[MemoryPoint, Delivery]]) -> None:
                    nonlocal stored
                    await collector.on_memory_points(batch, corpus)
                    stored += len(batch)
                    if stored == n:
                        finished.set()

                start = time.perf_counter()
                service = await bus.serve_batch(
                    subjects.COLLECTOR, MemoryPoint, counted, batch=collector.FETCH_BATCH
                )
                await asyncio.wait_for(finished.wait(), 600)
                await bus.nc.flush()  # the last acks reached the server
                elapsed = time.perf_counter() - start
                await service.stop()
                if corpus.stats()["points"] != n:
                    raise RuntimeError(f"collector stored {corpus.stats()['points']} of {n}")
            return elapsed
        finally:
            await bus.close()


async def main(n: int, rounds: int) -> None:
    payloads = load_payloads()
    cases: dict[str, Case] = {
        "raw nats-py fetch+ack (baseline)": raw_consume_ack,
        "collector (decode, pairs, sqlite, ack)": collector_ingest,
    }
    rates = await interleaved_rates(cases, n, rounds, payloads)
    print_rates(rates, "points/s", f"n={n} rounds={rounds}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
