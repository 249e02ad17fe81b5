"""Roles on a real nats-server that loads the generated authorization: each role's component
works under it, and everything else a role might try is refused at once and reaches nobody."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services import app
from services.collector import serve as serve_collector
from services.pipeline import started_record
from services.validator import serve as serve_validator
from services.validator import validate_cases
from shared import subjects
from shared.bus import Bus, BusError, PermissionDeniedError
from shared.corpus import Corpus
from shared.embeddings import Embedder
from shared.messages import (
    DeadLetter,
    LoraJob,
    LoraJobDone,
    MemoryPoint,
    ModelUpdated,
    RunRecord,
    TrainingProgress,
    ValidationCase,
    ValidationResult,
)
from shared.nats_auth import (
    MEMORY_POINT_SUBJECTS,
    ROLE_PERMISSIONS,
    ROLES,
    AuthDir,
    Role,
    auth_config,
    ensure_auth_dir,
    inbox_prefix,
    init_auth_dir,
    permissions,
    public_key,
)
from shared.nats_client import NatsAuth
from shared.nats_server import EmbeddedNats
from shared.ollama import OllamaClient
from shared.settings import Settings
from tests.fixtures_nats import Secured

REPO = Path(__file__).resolve().parents[1]
EMBED = "qllama/bge-small-zh-v1.5:latest"
REFUSED_WITHIN_S = 3.0  # a denied call fails at once, not after its timeout (5 s and more)


def point(n: int) -> MemoryPoint:
    return MemoryPoint(id=n, content=f"User: question {n}?\nAssistant: Answer number {n}, in full.")


# --- the config, without a server --------------------------------------------------------------


def allowed(grants: frozenset[str], subject: str) -> bool:
    """Whether a NATS allow list lets `subject` through (`*` one token, a trailing `>` the rest)."""

    def match(pattern: list[str], tokens: list[str]) -> bool:
        if pattern == [">"]:
            return bool(tokens)
        if not pattern or not tokens:
            return not pattern and not tokens
        return pattern[0] in ("*", tokens[0]) and match(pattern[1:], tokens[1:])

    return any(match(g.split("."), subject.split(".")) for g in grants)


def test_every_consumer_and_stream_is_granted_from_the_subjects_module() -> None:
    service = ROLE_PERMISSIONS["service"].publish
    specs = [v for v in vars(subjects).values() if isinstance(v, subjects.ConsumerSpec)]
    assert len(specs) >= 5
    # CONFIG_ROLLBACK is the pattern of every config's own rollback durable: check a real one
    specs.remove(subjects.CONFIG_ROLLBACK)
    for spec in specs:  # each fixed durable by its name
        assert f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}" in service
        assert f"$JS.ACK.{spec.stream}.{spec.durable}.>" in service
    specs.append(subjects.config_rollback("/home/me/.mindx/models.json"))
    for spec in specs:
        s, d = spec.stream, spec.durable
        assert allowed(service, f"$JS.API.CONSUMER.CREATE.{s}.{d}.{spec.subject}"), spec
        assert allowed(service, f"$JS.API.CONSUMER.MSG.NEXT.{s}.{d}"), spec
        assert allowed(service, f"$JS.ACK.{s}.{d}.1.2.3.4.5.6"), spec
        assert subjects.dead_letter_subject(spec.subject) in service
    # the rollback durables have any name, but only for rollback requests
    assert not allowed(service, f"$JS.API.CONSUMER.CREATE.MODEL.other.{subjects.MODEL_VALIDATED}")
    assert not allowed(service, "$JS.API.CONSUMER.CREATE.MEMORY.other.memory.point.created")
    for stream in subjects.STREAMS:
        assert f"$JS.API.STREAM.CREATE.{stream.name}" in service
    # only the service may set up streams
    for role in ROLES:
        if role != "service":
            assert not any(".STREAM.CREATE." in p and "OBJ_" not in p for p in
                           ROLE_PERMISSIONS[role].publish), role  # fmt: skip


def test_a_deletion_comes_from_memory_or_the_operator_and_only_the_service_erases() -> None:
    deleted = subjects.MEMORY_POINT_DELETED
    for role in ROLES:
        grants = ROLE_PERMISSIONS[role].publish
        assert allowed(grants, deleted) == (role in ("memory", "operator", "service")), role
        erases = {p for p in grants if ".STREAM.MSG.DELETE." in p and ".DLQ" not in p}
        assert not erases or role == "service", role  # the operator removes only dead letters
    service = ROLE_PERMISSIONS["service"].publish
    for stream in ("MEMORY", "TRAINING", "VALIDATION", "DLQ", f"OBJ_{subjects.LORA_OBJECT_BUCKET}"):
        assert f"$JS.API.STREAM.MSG.DELETE.{stream}" in service, stream
        assert f"$JS.API.STREAM.MSG.GET.{stream}" in service, stream


def test_each_user_may_read_only_its_own_inbox_and_the_brain_publishes_nothing() -> None:
    keys = {role: f"U{role.upper().replace('-', '')}KEY" for role in ROLES}
    for role, key in keys.items():
        perms = permissions(role, key)
        inboxes = {s for s in perms.subscribe if s.startswith("_INBOX")}
        assert inboxes == {f"{inbox_prefix(key)}.>"}, role
        assert ">" not in perms.publish | perms.subscribe
    assert permissions("memory", "K").publish == set(MEMORY_POINT_SUBJECTS)
    assert permissions("brain", "K").publish == set()
    assert permissions("validator", "K").subscribe == {
        f"{inbox_prefix('K')}.>",  # cases come only as answers to its pulls
        subjects.STATUS,  # every process answers `mindx status`
    }
    # a validator publishes only what pulling from its durable and reading the run records
    # take, and its results: no record, no stream, no other consumer, no case
    runs, v = f"KV_{subjects.RUNS.name}", subjects.VALIDATOR
    assert permissions("validator", "K").publish == {
        f"$JS.API.STREAM.INFO.{runs}",
        f"$JS.API.STREAM.MSG.GET.{runs}",
        f"$JS.API.CONSUMER.CREATE.VALIDATION.validators.{v.subject}",
        "$JS.API.CONSUMER.INFO.VALIDATION.validators",
        "$JS.API.CONSUMER.MSG.NEXT.VALIDATION.validators",
        "$JS.ACK.VALIDATION.validators.>",
        f"dlq.{v.subject}",
        f"{subjects.VALIDATION_RESULT}.*",
    }
    text = auth_config(keys)
    # an empty allow list would allow everything: the quiet role denies all instead
    assert text.count('publish: { deny: [">"] }') == 1
    assert "allow: []" not in text
    for setting in ("listen", "port", "store_dir", "jetstream"):
        assert setting not in text


def test_ensure_auth_dir_makes_private_keys_once(tmp_path: Path) -> None:
    keys = ensure_auth_dir(tmp_path / "data" / "auth")
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o700
    seeds = {role: keys.seed_file(role).read_bytes() for role in ROLES}
    for role in ROLES:
        assert stat.S_IMODE(keys.seed_file(role).stat().st_mode) == 0o600
        assert public_key(seeds[role]) in keys.config.read_text()
    assert stat.S_IMODE(keys.config.stat().st_mode) == 0o600
    again = ensure_auth_dir(tmp_path / "data" / "auth")
    assert {role: again.seed_file(role).read_bytes() for role in ROLES} == seeds
    with pytest.raises(FileExistsError):
        init_auth_dir(tmp_path / "data" / "auth")


# --- each role runs its component ---------------------------------------------------------------


async def test_memory_publishes_the_service_collects_and_the_operator_reads_dead_letters(
    secured_nats: Secured, tmp_path: Path
) -> None:
    service = await secured_nats.connect("service")
    memory = await secured_nats.connect("memory")
    operator = await secured_nats.connect("operator")
    settings = Settings(data_dir=tmp_path / "data")
    collector = await serve_collector(service, settings)
    try:
        for n in (1, 2, 3):
            await memory.publish(subjects.MEMORY_POINT_CREATED, point(n), msg_id=f"p{n}")
        await memory.publish_raw(subjects.MEMORY_POINT_CREATED, b'{"id": "not a number"}')
        await service.wait_idle(subjects.COLLECTOR, timeout=15)
    finally:
        await collector.stop()
    with Corpus.open(settings.corpus_path) as corpus:
        assert corpus.stats()["points"] == 3
    letters = await operator.dead_letters()
    assert [(d.subject, d.consumer) for d in letters] == [
        (subjects.MEMORY_POINT_CREATED, "collector")
    ]
    assert "not a number" in letters[0].data


async def test_a_validator_serves_cases_under_its_role(
    secured_nats: Secured, ollama_double: Any
) -> None:
    service = await secured_nats.connect("service")
    validator = await secured_nats.connect("validator")
    run = subjects.RunNames("20250101_000000")
    # as the trainer does before it asks: the run's record says it is running
    running = started_record(run, Settings(model="qwen3:0.6b"))
    await service.put_record(subjects.RUNS, run.run_id, running)
    async with OllamaClient(ollama_double.url) as client:
        await serve_validator(validator, client, Embedder(client, EMBED), name="remote-v")
        case = ValidationCase(
            run_id=run.run_id,
            case_id=0,
            model=running.base_model,
            prompt="Where can I find a cheap hotel?",
            expected="The Acorn guest house is cheap.",
        )
        [result] = await validate_cases(service, [case], concurrency=1, timeout_s=30)
    assert result.validator == "remote-v" and result.case_id == 0 and result.score is not None


async def test_a_validator_reads_run_records_but_cannot_write_them(
    secured_nats: Secured,
) -> None:
    service = await secured_nats.connect("service")
    validator = await secured_nats.connect("validator")
    run = subjects.RunNames("20250101_000000")
    finished = RunRecord(
        run_id=run.run_id,
        stage="finished",
        mode="message",
        base_model="qwen3:0.6b",
        new_model=run.model_name("qwen3:0.6b"),
        status="completed_no_improvement",
    )
    forged = msgspec.structs.replace(finished, stage="running", status=None)
    loop = asyncio.get_running_loop()
    # no bucket yet: a validator may not make it
    started = loop.time()
    with pytest.raises(PermissionDeniedError, match="not permitted to"):
        await validator.put_record(subjects.RUNS, run.run_id, forged)
    assert loop.time() - started < REFUSED_WITHIN_S
    # nor write into the trainer's, to open a finished run to its cases again
    await service.put_record(subjects.RUNS, run.run_id, finished)
    started = loop.time()
    with pytest.raises(PermissionDeniedError, match="not permitted to"):
        await validator.put_record(subjects.RUNS, run.run_id, forged)
    assert loop.time() - started < REFUSED_WITHIN_S
    assert await validator.get_record(subjects.RUNS, run.run_id, RunRecord) == finished


async def test_the_brain_hears_model_updates_and_run_events(secured_nats: Secured) -> None:
    service = await secured_nats.connect("service")
    brain = await secured_nats.connect("brain")
    heard: asyncio.Queue[Any] = asyncio.Queue()

    async def on_event(ev: Any) -> None:
        await heard.put(ev)

    await brain.subscribe(subjects.MODEL_UPDATED, ModelUpdated, on_event)
    await brain.subscribe("training.>", TrainingProgress, on_event)
    run = subjects.RunNames("20250101_000002")
    update = ModelUpdated(
        run_id=run.run_id, model=run.model_name("qwen3:0.6b"), config_path="/cfg.json"
    )
    await service.publish(subjects.MODEL_UPDATED, update)
    await service.publish(run.progress_subject, TrainingProgress(run_id=run.run_id, stage="x"))
    got = [await asyncio.wait_for(heard.get(), 5), await asyncio.wait_for(heard.get(), 5)]
    assert {type(ev) for ev in got} == {ModelUpdated, TrainingProgress}


async def test_a_lora_worker_takes_jobs_and_moves_run_files_under_its_role(
    secured_nats: Secured, tmp_path: Path, ollama_double: Any
) -> None:
    from training import worker

    service = await secured_nats.connect("service")
    lora = await secured_nats.connect("lora-worker")
    run_id = "20250101_000001"
    names = subjects.RunNames(run_id)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    await service.put_object(names.dataset_object, dataset)
    done: asyncio.Queue[LoraJobDone] = asyncio.Queue()

    async def on_done(ev: LoraJobDone) -> None:
        await done.put(ev)

    await service.subscribe(f"{subjects.LORA_DONE}.*", LoraJobDone, on_done)
    settings = Settings(data_dir=tmp_path / "worker", ollama=ollama_double.url)
    running = await worker.serve(lora, settings)
    try:
        # a base model the server does not have: the worker fetches the dataset, then reports
        job = LoraJob(run_id=run_id, dataset_object=names.dataset_object, base_model="nope:1b")
        await service.publish(subjects.LORA_JOBS, job, msg_id=names.lora_job_msg_id)
        answer = await asyncio.wait_for(done.get(), 60)
    finally:
        await running.stop()
    assert answer.run_id == run_id and not answer.ok
    assert (tmp_path / "worker" / "lora-worker" / run_id / "train_data.jsonl").is_file()
    # and it uploads artifacts that the service reads back
    artifact = tmp_path / "adapter.gguf"
    artifact.write_bytes(os.urandom(300_000))
    await lora.put_object(names.artifact_object("adapter.gguf"), artifact)
    back = await service.get_object(names.artifact_object("adapter.gguf"), tmp_path / "back")
    assert back.read_bytes() == artifact.read_bytes()


# --- and is refused everything else -----------------------------------------------------------


def _publish(subject: str) -> Callable[[Bus], Awaitable[Any]]:
    return lambda bus: bus.publish_raw(subject, b"{}")


def _subscribe(subject: str, queue: str | None = None) -> Callable[[Bus], Awaitable[Any]]:
    async def sub(bus: Bus) -> Any:
        async def ignore(_: Any) -> None: ...

        if queue is None:
            return await bus.subscribe(subject, DeadLetter, ignore)
        return await bus.reply(subject, DeadLetter, ignore, queue=queue)  # type: ignore[arg-type]

    return sub


def _consume(spec: subjects.ConsumerSpec) -> Callable[[Bus], Awaitable[Any]]:
    async def consume(bus: Bus) -> Any:
        async def ignore(*_: Any) -> None: ...

        return await bus.serve(spec, DeadLetter, ignore)

    return consume


def _read_dead_letters(bus: Bus) -> Awaitable[Any]:
    return bus.dead_letters()


def _ask_validators(bus: Bus) -> Awaitable[Any]:
    case = ValidationCase(run_id="20250101_000000", case_id=0, model="m", prompt="p", expected="e")
    return bus.publish(subjects.RunNames(case.run_id).case_subject, case)


ATTEMPTS: list[tuple[Role, str, Callable[[Bus], Awaitable[Any]]]] = [
    ("memory", "switch the model", _publish(subjects.MODEL_VALIDATED)),
    ("memory", "start a run", _publish(subjects.TRAINING_REQUESTED)),
    ("memory", "roll back", _publish(subjects.MODEL_ROLLBACK_REQUESTED)),
    ("memory", "read other points", _subscribe(subjects.MEMORY_POINT_CREATED)),
    ("memory", "read the memory stream", _consume(subjects.COLLECTOR)),
    ("memory", "read dead letters", _read_dead_letters),
    ("brain", "announce a model", _publish(subjects.MODEL_UPDATED)),
    ("brain", "inject memory", _publish(subjects.MEMORY_POINT_CREATED)),
    ("brain", "start a run", _publish(subjects.TRAINING_REQUESTED)),
    ("brain", "read memory", _subscribe("memory.>")),
    ("brain", "read every inbox", _subscribe("_INBOX.>")),
    ("brain", "use the validators", _ask_validators),
    ("validator", "switch the model", _publish(subjects.MODEL_VALIDATED)),
    ("validator", "queue a LoRA job", _publish(subjects.LORA_JOBS)),
    ("validator", "copy every case outside the queue", _subscribe(f"{subjects.VALIDATION_CASE}.*")),
    ("validator", "queue a case", _ask_validators),
    ("validator", "read the results", _subscribe(f"{subjects.VALIDATION_RESULT}.*")),
    ("validator", "read memory", _subscribe(subjects.MEMORY_POINT_CREATED)),
    ("lora-worker", "switch the model", _publish(subjects.MODEL_VALIDATED)),
    ("lora-worker", "start a run", _publish(subjects.TRAINING_REQUESTED)),
    ("lora-worker", "read the memory stream", _consume(subjects.COLLECTOR)),
    ("lora-worker", "take cases", _consume(subjects.VALIDATOR)),
    ("operator", "switch the model", _publish(subjects.MODEL_VALIDATED)),
    ("operator", "announce a model", _publish(subjects.MODEL_UPDATED)),
    ("operator", "inject memory", _publish(subjects.MEMORY_POINT_CREATED)),
    ("operator", "take over the trainer's consumer", _consume(subjects.TRAINER)),
    ("operator", "read memory", _subscribe("memory.>")),
]


@pytest.mark.parametrize(
    ("role", "attempt"), [(r, a) for r, a, _ in ATTEMPTS], ids=[f"{r}:{a}" for r, a, _ in ATTEMPTS]
)
async def test_a_role_is_refused_at_once(secured_nats: Secured, role: Role, attempt: str) -> None:
    do = next(f for r, a, f in ATTEMPTS if (r, a) == (role, attempt))
    service = await secured_nats.connect("service")
    bus = await secured_nats.connect(role)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PermissionDeniedError, match="not permitted to"):
        await do(bus)
    assert loop.time() - started < REFUSED_WITHIN_S
    # nothing was stored, and the bus still works for what the role may do
    for stream in ("MEMORY", "TRAINING", "MODEL", "LORA_JOBS"):
        assert (await service.js.stream_info(stream)).state.messages == 0
    if role == "memory":
        await bus.publish(subjects.MEMORY_POINT_CREATED, point(1))


async def test_no_role_reads_another_ones_inbox(secured_nats: Secured) -> None:
    service = await secured_nats.connect("service")
    service_inbox = inbox_prefix(public_key(secured_nats.keys.seed_file("service").read_bytes()))
    assert service.nc.new_inbox().startswith(service_inbox + ".")
    for role in ROLES:
        if role == "service":
            continue
        bus = await secured_nats.connect(role)
        with pytest.raises(PermissionDeniedError):
            await _subscribe(f"{service_inbox}.>")(bus)


async def test_only_a_validator_answers_for_the_validators(secured_nats: Secured) -> None:
    service = await secured_nats.connect("service")
    heard: list[ValidationResult] = []

    async def on_result(result: ValidationResult) -> None:
        heard.append(result)

    await service.subscribe(f"{subjects.VALIDATION_RESULT}.*", ValidationResult, on_result)
    run = subjects.RunNames("20250101_000000")
    for role in ("lora-worker", "brain", "memory", "operator", "validator"):
        bus = await secured_nats.connect(role)
        forged = ValidationResult(run_id=run.run_id, case_id=0, model="m", validator=role)
        await bus.nc.publish(run.result_subject, msgspec.json.encode(forged))
        await bus.nc.flush()
    await asyncio.sleep(0.3)
    assert [r.validator for r in heard] == ["validator"]


async def test_a_denied_core_publish_reaches_nobody(secured_nats: Secured) -> None:
    service = await secured_nats.connect("service")
    brain = await secured_nats.connect("brain")
    heard: list[Any] = []

    async def on_progress(ev: Any) -> None:
        heard.append(ev)

    await service.subscribe(f"{subjects.TRAINING_PROGRESS}.*", TrainingProgress, on_progress)
    r1, r2 = subjects.RunNames("20250101_000001"), subjects.RunNames("20250101_000002")
    fake = TrainingProgress(run_id=r1.run_id, stage="lora.done", message="ok")
    await brain.publish(r1.progress_subject, fake)
    await brain.nc.flush()
    await service.publish(r2.progress_subject, TrainingProgress(run_id=r2.run_id, stage="s"))
    await service.nc.flush()
    await asyncio.sleep(0.2)
    assert [ev.run_id for ev in heard] == [r2.run_id]


# --- the embedded server of the CLI -------------------------------------------------------------


async def test_the_embedded_server_requires_a_key_and_commands_connect_as_their_role(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    async with app.endpoint(settings) as where:
        assert where.keys is not None and where.keys.path == tmp_path / "data" / "auth"
        with pytest.raises(BusError, match="authorization failed"):
            await Bus.connect(where.url, attempts=1)
        async with where.connect("service") as service, where.connect("memory") as memory:
            await memory.publish(subjects.MEMORY_POINT_CREATED, point(1))
            with pytest.raises(PermissionDeniedError):
                await memory.publish_raw(subjects.MODEL_VALIDATED, b"{}")
            assert (await service.js.stream_info("MEMORY")).state.messages == 1
    # connection options go with a URL only: the embedded server has its own keys
    with_user = Settings(data_dir=tmp_path / "data", nats_user="me", nats_password="pw")
    with pytest.raises(app.UserFacingError, match="need a NATS URL"):
        async with app.endpoint(with_user):
            pass


def test_auth_init_writes_a_config_a_real_server_loads(tmp_path: Path) -> None:
    target = tmp_path / "keys"
    cmd = [sys.executable, "-m", "services.cli", "auth", "init", str(target)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    files = sorted(p.name for p in target.iterdir())
    assert files == sorted([*(f"{r}.nk" for r in ROLES), "nats-server.conf"])
    assert all(stat.S_IMODE((target / f).stat().st_mode) == 0o600 for f in files)
    seeds = {f: (target / f).read_bytes() for f in files}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("mindx auth init: ")
    assert {f: (target / f).read_bytes() for f in files} == seeds  # never replaced

    async def operator_connects() -> None:
        keys = AuthDir(target)
        async with EmbeddedNats(tmp_path / "store", config=keys.config) as server:
            service = await Bus.connect(server.url, auth=NatsAuth(nkey=keys.seed_file("service")))
            operator = await Bus.connect(
                server.url, auth=NatsAuth(nkey=keys.seed_file("operator")), manage_streams=False
            )
            assert await operator.dead_letters() == []
            await operator.close()
            await service.close()

    asyncio.run(operator_connects())
