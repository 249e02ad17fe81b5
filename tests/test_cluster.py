"""The bus survives losing a node: three real nats-servers in one JetStream cluster, every
stream and bucket with 3 replicas, and the MEMORY stream's leader killed with SIGKILL while a
shared data set is being imported. The collector ends with every point exactly once, and a
training run requested during the outage completes (Ollama is the strict double)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.errors
import pytest

from services import app, cli
from shared import subjects
from shared.bus import Bus, Expect
from shared.messages import MemoryPoint, TrainingFinished, TrainingRequested, decode
from shared.nats_server import EmbeddedNats
from shared.settings import Settings
from tests.nats_cluster import NatsCluster
from tests.ollama_double import OllamaDouble

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTIWOZ = SHARED_DATA / "multiwoz.memory.jsonl"
LINES = 1500  # about 1100 points (a point may come in several versions): the kill lands
# mid-ingest, and the test stays quick enough for the default suite
BASE = "qwen3:0.6b"

pytestmark = pytest.mark.skipif(not MULTIWOZ.is_file(), reason="../shared/data is not here")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    nodes = NatsCluster.create(tmp_path / "cluster")
    nodes.start_all()
    try:
        await nodes.wait_ready()
        yield nodes
    finally:
        nodes.stop_all()


async def until(what: str, ok: Callable[[], bool], timeout: float) -> float:  # noqa: ASYNC109
    """Wait for `ok()`, checking every 20 ms; returns when it held (loop time). Fails the test
    naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ok():
        if loop.time() >= deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.02)
    return loop.time()


async def new_leader(bus: Bus, stream: str, old: str) -> float:
    """When `stream` has a leader other than `old` (loop time); polled every 50 ms, each ask
    given 0.25 s (so the time measured is not a whole request timeout late)."""
    loop = asyncio.get_running_loop()
    js = bus.nc.jetstream(timeout=0.25)
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader not in (None, old):
                return loop.time()
        except (nats.errors.Error, TimeoutError):
            pass  # no leader to answer yet
        await asyncio.sleep(0.05)


def settings_for(tmp_path: Path, urls: str, double: OllamaDouble) -> Settings:
    s = Settings.load(
        {
            "workspace": str(tmp_path / "ws"),
            "watermark": str(tmp_path / "wm.json"),
            "nats": urls,
            "stream_replicas": 3,
            "ollama": double.url,
            "min_corpus": 50,
            "config_wait_s": 30,
        },
        env={},
    )
    s.config_path.parent.mkdir(parents=True, exist_ok=True)
    s.config_path.write_text(
        json.dumps({"brain": {"left": BASE}, "models": [{"name": BASE, "temperature": 0.7}]})
    )
    return s


async def test_killing_the_memory_leader_loses_no_point_and_no_run(
    tmp_path: Path,
    cluster: NatsCluster,
    ollama_double: OllamaDouble,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shared.bus_storage")  # its retries
    lines = MULTIWOZ.read_text(encoding="utf-8").splitlines()[:LINES]
    ids = {decode(line.encode(), MemoryPoint).id for line in lines}
    data = tmp_path / "memory.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = settings_for(tmp_path, cluster.urls, ollama_double)
    loop = asyncio.get_running_loop()

    async with (
        app.endpoint(settings) as where,
        where.connect("service") as bus,
        where.connect("memory") as memory,
        app.resources(settings) as res,
    ):
        # the streams, and the buckets the run records live in, on all three nodes
        for name in ("MEMORY", "TRAINING", "MODEL", f"KV_{subjects.RUNS.name}"):
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == 3, name
        services = await app.start(bus, res, list(app.ALL))
        corpus = res.corpus()
        try:
            started = loop.time()
            ingest = asyncio.create_task(app.publish_memory(memory, [data]))
            # mid-ingest: a fifth of the points are published, most are still to come
            while (info := await bus.js.stream_info("MEMORY")).state.messages < len(ids) // 5:
                assert not ingest.done(), ingest
                await asyncio.sleep(0.01)
            assert info.cluster is not None and info.cluster.leader
            leader, at_kill = info.cluster.leader, info.state.messages
            cluster.kill9(leader)
            killed = loop.time()
            elected = asyncio.create_task(new_leader(bus, "MEMORY", leader))
            log.warning("killed %s, MEMORY's leader: %d of %d in", leader, at_kill, len(ids))
            assert not ingest.done(), "the ingest ended before the kill: raise LINES"

            # a run requested during the outage (the request itself rides out the election)
            request_id = uuid.uuid4().hex

            def ours(ev: TrainingFinished) -> bool:
                return ev.request_id == request_id

            run = asyncio.create_task(
                bus.publish_and_wait(
                    subjects.TRAINING_REQUESTED,
                    TrainingRequested(
                        request_id=request_id, mode="message", base_model=BASE, min_corpus=50
                    ),
                    msg_id=request_id,
                    expect=[
                        Expect(subjects.TRAINING_COMPLETED, TrainingFinished, ours),
                        Expect(subjects.TRAINING_FAILED, TrainingFinished, ours),
                    ],
                    timeout=120,
                )
            )
            recovered = await asyncio.wait_for(elected, 60)
            imported = await asyncio.wait_for(ingest, 120)
            assert imported.errors == [] and imported.published == len(ids)
            collected = await until(
                "every point collected", lambda: corpus.stats()["points"] >= len(ids), 90
            )
            finished = await asyncio.wait_for(run, 150)
            done = loop.time()

            # every point exactly once: in the corpus, and in the stream (dedup kept the retries)
            stored = [p.id for p in corpus.points()]
            assert len(stored) == len(set(stored)) == len(ids)
            assert set(stored) == ids
            after = await bus.js.stream_info("MEMORY")
            assert after.state.messages == len(ids), "a retried publish was stored twice"
            assert after.cluster is not None and after.cluster.leader not in (None, leader)
            # the run completed on the two nodes left
            assert finished.status in ("success", "completed_no_improvement"), finished
            await bus.wait_idle(subjects.COLLECTOR, timeout=60)  # nothing left to redeliver
            # the kill did land on publishes: they were made again
            retries = [r for r in caplog.records if "trying again" in r.getMessage()]
            assert retries, "no call met the election: the kill missed the ingest"
        finally:
            await app.stop(services)
    print(
        f"\ncluster: killed {leader} (MEMORY leader) with {at_kill}/{len(ids)} points published, "
        f"{killed - started:.1f}s into the ingest; new leader after "
        f"{recovered - killed:.2f}s; {len(retries)} bus calls retried; all {len(ids)} points "
        f"once after {collected - killed:.1f}s "
        f"(stream: {after.state.messages} messages, leader now {after.cluster.leader}); "
        f"run {finished.run_id}: {finished.status} {done - killed:.1f}s after the kill"
    )


async def test_raising_replicas_on_a_running_cluster_updates_streams_and_buckets(
    cluster: NatsCluster,
) -> None:
    one = await Bus.connect(cluster.urls, name="r1", streams=subjects.streams(replicas=1))
    try:
        record = TrainingRequested(request_id="kept")
        await one.put_record(subjects.RUNS, "run-1", record)
    finally:
        await one.close()
    three = await Bus.connect(cluster.urls, name="r3", streams=subjects.streams(replicas=3))
    try:
        for spec in subjects.STREAMS:
            assert (await three.js.stream_info(spec.name)).config.num_replicas == 3, spec.name
        kv = [f"KV_{b.name}" for b in subjects.BUCKETS]
        for stream in [*kv, f"OBJ_{subjects.LORA_OBJECT_BUCKET}"]:
            assert (await three.js.stream_info(stream)).config.num_replicas == 3, stream
        assert await three.get_record(subjects.RUNS, "run-1", TrainingRequested) == record
    finally:
        await three.close()


async def test_replicas_on_a_single_server_fail_with_one_line(
    tmp_path: Path, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["init", "--workspace", str(tmp_path), "--nats", nats_server.url]
    # a refusal, not a hang: the server answers at once that it is not in a cluster
    rc = await asyncio.wait_for(asyncio.to_thread(cli.main, [*argv, "--stream-replicas", "3"]), 60)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [
        f"mindx init: --stream-replicas 3 needs a NATS cluster with JetStream, and "
        f"{nats_server.url} is a single server: use --stream-replicas 1, or list the cluster's "
        "nodes in --nats"
    ]
    assert await asyncio.to_thread(cli.main, argv) == 0  # 1, the default, works
