"""`mindx status`, `watch` and `dlq replay|purge` against a real nats-server that loads the roles
of `mindx auth init`, with the service running as its own process (`mindx serve all`, as the
`service` role) and every command run as its own process with its role's seed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.operator import REPLAYABLE, replay_problem
from shared import subjects
from shared.bus import Letter
from shared.messages import DeadLetter, TrainingRequested, encode
from shared.nats_auth import Role
from shared.subjects import PAYLOADS
from tests.fixtures_nats import Secured
from tests.ollama_double import OllamaDouble

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POINT = {"id": 7, "content": "User: is the museum open on sunday?\nAssistant: Yes, from 10 to 5."}


def workspace(tmp_path: Path, *, memory: bool = False) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "memory").mkdir(parents=True)
    if memory:
        shutil.copy(SHARED_DATA / "multiwoz.memory.jsonl", ws / "data" / "memory")
    (ws / "config").mkdir()
    (ws / "config" / "models.json").write_text(
        json.dumps({"brain": {"left": "qwen3:0.6b"}, "models": [{"name": "qwen3:0.6b"}]})
    )
    return ws


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MINDX_", "NATS_"))}


def as_role(secured: Secured, role: Role) -> list[str]:
    return ["--nats", secured.server.url, "--nats-nkey", str(secured.keys.seed_file(role))]


async def mindx(
    ws: Path, secured: Secured, role: Role, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "services.cli", *args, "--workspace", str(ws),
        "--watermark", "state/wm.json", *as_role(secured, role),
    ]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )


@contextlib.asynccontextmanager
async def service(ws: Path, secured: Secured, ollama: OllamaDouble) -> AsyncIterator[None]:
    """`mindx serve all` as its own process, until the test is done with it."""
    cmd = [
        sys.executable, "-m", "services.cli", "serve", "all", "--workspace", str(ws),
        "--watermark", "state/wm.json", "--ollama", ollama.url, *as_role(secured, "service"),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO, env=env(), stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        while not any(line.startswith("serving ") for line in seen):
            raw = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert raw, "\n".join(seen)
            seen.append(raw.decode().strip())
        yield
    finally:
        proc.terminate()
        await proc.wait()


async def dead_letter(secured: Secured, letter: DeadLetter, filed_under: str | None = None) -> None:
    """A dead letter as the collector files it (the service may dead-letter its subjects)."""
    bus = await secured.connect("service")
    subject = filed_under or subjects.dead_letter_subject(letter.subject)
    await bus.publish_raw(subject, encode(letter))


# --- status ---------------------------------------------------------------------------------------


async def test_status_shows_the_running_service_its_model_corpus_and_dead_letters(
    tmp_path: Path, secured_nats: Secured, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path)
    before = await mindx(ws, secured_nats, "operator", "status", "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["services"] == []  # nothing runs yet, and it says so

    async with service(ws, secured_nats, ollama_double):
        memory = await secured_nats.connect("memory")
        await memory.publish_raw(subjects.MEMORY_POINT_CREATED, json.dumps(POINT).encode())
        await memory.publish_raw(subjects.MEMORY_POINT_CREATED, b'{"id": "seven", "content": 1}')
        bus = await secured_nats.connect("service")
        await bus.wait_idle(subjects.COLLECTOR, timeout=30)
        done = await mindx(ws, secured_nats, "operator", "status", "--json")
        text = await mindx(ws, secured_nats, "operator", "status")
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    assert st["bus"] == secured_nats.server.url
    [proc] = st["services"]
    assert proc["components"] == [
        "collector",
        "trainer",
        "validator",
        "config-updater",
        "forgetter",
    ]
    assert proc["version"]
    assert (st["left_model"], st["config_error"]) == ("qwen3:0.6b", None)
    assert st["corpus"]["points"] == 1 and st["corpus"]["pairs"] == 1
    assert st["dead_letters"] == {subjects.MEMORY_POINT_CREATED: 1}
    assert st["running"] == [] and st["runs"] == []
    lines = text.stdout.splitlines()
    assert lines[0] == f"bus           {secured_nats.server.url}"
    assert any(
        line.startswith("services      ") and "collector, trainer, validator" in line
        for line in lines
    )
    assert "dead letters  1 (memory.point.created 1); see `mindx dlq list`" in lines


async def test_a_role_that_may_not_ask_gets_one_line(tmp_path: Path, secured_nats: Secured) -> None:
    done = await mindx(workspace(tmp_path), secured_nats, "brain", "status")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mindx status: ")
    assert "not permitted" in done.stderr and "Traceback" not in done.stderr


# --- watch ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")
async def test_watch_follows_the_running_run_until_it_ends(
    tmp_path: Path, secured_nats: Secured
) -> None:
    ws = workspace(tmp_path, memory=True)
    # every model call takes a while, so the run is still going when watch looks for it
    with OllamaDouble(latency_s=0.05) as slow:
        async with service(ws, secured_nats, slow):
            points = str(ws / "data" / "memory" / "multiwoz.memory.jsonl")
            imported = await mindx(ws, secured_nats, "service", "memory", "import", points)
            assert imported.returncode == 0, imported.stderr
            nothing = await mindx(ws, secured_nats, "operator", "watch")
            assert nothing.returncode == 2
            assert nothing.stderr.startswith("mindx watch: no run in progress on ")

            operator = await secured_nats.connect("operator")
            await operator.publish(subjects.TRAINING_REQUESTED, TrainingRequested())
            st: dict[str, Any] = {}
            for _ in range(100):
                done = await mindx(ws, secured_nats, "operator", "status", "--json")
                st = json.loads(done.stdout)
                if st["running"]:
                    break
            [run] = st["running"]
            watched = await mindx(ws, secured_nats, "operator", "watch")
            again = await mindx(ws, secured_nats, "operator", "watch", run["run_id"], "--json")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.startswith(f"run {run['run_id']}: success")
    assert "[validate_new]" in watched.stderr  # the stages as they came
    # a run that has ended: its outcome from the report
    assert again.returncode == 0, again.stderr
    ended = json.loads(again.stdout)
    assert (ended["run_id"], ended["status"]) == (run["run_id"], "success")
    assert ended["report_path"].endswith(f"report_{run['run_id']}.json")


async def test_watch_of_an_unknown_run_is_one_line(tmp_path: Path, secured_nats: Secured) -> None:
    done = await mindx(workspace(tmp_path), secured_nats, "operator", "watch", "20250101_000000")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mindx watch: run 20250101_000000 is not in progress on {secured_nats.server.url} and "
        f"has no report in {tmp_path / 'ws' / 'data' / 'training'}; `mindx status` lists the runs"
    )


# --- dead letters ---------------------------------------------------------------------------------


def test_only_what_the_services_consume_is_replayed() -> None:
    assert set(REPLAYABLE) <= set(PAYLOADS)
    ok = DeadLetter(subject="memory.point.created", error="x", data="{}")
    assert replay_problem(Letter(1, "dlq.memory.point.created", ok)) is None
    forged = DeadLetter(subject="model.validated", error="x", data="{}")
    assert "filed under dlq.lora.jobs" in (replay_problem(Letter(2, "dlq.lora.jobs", forged)) or "")
    cut = DeadLetter(subject="lora.jobs", error="x", data='{"a": "…[truncated, 9000 bytes]')
    assert "truncated" in (replay_problem(Letter(3, "dlq.lora.jobs", cut)) or "")
    event = DeadLetter(subject="model.updated", error="x", data="{}")
    assert "not a subject the services consume" in (
        replay_problem(Letter(4, "dlq.model.updated", event)) or ""
    )


async def test_replay_resends_dead_letters_to_their_subject_and_removes_them(
    tmp_path: Path, secured_nats: Secured, ollama_double: OllamaDouble
) -> None:
    ws = workspace(tmp_path)
    point = json.dumps(POINT)
    # what the collector files when the corpus could not be written (a full disk, now freed)
    await dead_letter(
        secured_nats, DeadLetter(subject=subjects.MEMORY_POINT_CREATED, error="disk", data=point)
    )
    # a letter filed under one subject that names another: not re-sent anywhere
    forged = DeadLetter(subject=subjects.MODEL_VALIDATED, error="x", data="{}")
    await dead_letter(secured_nats, forged, filed_under="dlq.memory.point.created")
    # another subject's letter stays when the replay is for one subject
    request = DeadLetter(subject=subjects.TRAINING_REQUESTED, error="x", data="{}")
    await dead_letter(secured_nats, request)

    async with service(ws, secured_nats, ollama_double):
        done = await mindx(ws, secured_nats, "service", "dlq", "replay", "--subject", "memory.>")
        assert done.returncode == 1, done.stderr  # like cp: 1 when something was left
        assert done.stdout.strip() == "replayed 1 dead letter(s); 1 kept"
        assert "filed under dlq.memory.point.created, not under its subject model.validated" in (
            done.stderr
        )
        bus = await secured_nats.connect("service")
        await bus.wait_idle(subjects.COLLECTOR, timeout=30)
        stats = await mindx(ws, secured_nats, "operator", "corpus", "stats", "--json")
        left = await bus.dead_letters()
    assert json.loads(stats.stdout)["points"] == 1  # the point reached the corpus
    assert sorted(d.subject for d in left) == [
        subjects.MODEL_VALIDATED,
        subjects.TRAINING_REQUESTED,
    ]


async def test_purge_asks_for_yes_then_removes_one_subjects_letters(
    tmp_path: Path, secured_nats: Secured
) -> None:
    ws = workspace(tmp_path)
    for i in range(3):
        await dead_letter(
            secured_nats,
            DeadLetter(subject=subjects.MEMORY_POINT_CREATED, error="decode", data=f"{i}"),
        )
    await dead_letter(
        secured_nats, DeadLetter(subject=subjects.TRAINING_REQUESTED, error="x", data="{}")
    )
    refused = await mindx(ws, secured_nats, "operator", "dlq", "purge", "--subject",
                          subjects.MEMORY_POINT_CREATED)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "mindx dlq purge: this removes 3 dead letter(s) of memory.point.created for good; "
        "see them with `mindx dlq list`, then add --yes"
    )
    bus = await secured_nats.connect("operator")
    assert len(await bus.dead_letters()) == 4  # nothing removed without --yes
    done = await mindx(ws, secured_nats, "operator", "dlq", "purge", "--subject",
                       subjects.MEMORY_POINT_CREATED, "--yes")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "removed 3 dead letter(s) of memory.point.created"
    assert [d.subject for d in await bus.dead_letters()] == [subjects.TRAINING_REQUESTED]
    done = await mindx(ws, secured_nats, "operator", "dlq", "purge", "--yes")
    assert done.stdout.strip() == "removed 1 dead letter(s)"
    assert await bus.dead_letters() == []
    # the memory role may not purge: refused by the server, one line
    done = await mindx(ws, secured_nats, "memory", "dlq", "purge", "--yes")
    assert done.returncode == 2 and "not permitted" in done.stderr
