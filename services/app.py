"""Wiring: the shared resources of a process and the components it serves.

Every component is an independent consumer; one process may serve any subset of them
(`mindx serve collector`, `mindx serve all`, or all of them behind `mindx train --run-once`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import bundled, subjects
from shared.backend import Backend
from shared.bus import Expect
from shared.messages import (
    DeadLetter,
    ModelLineage,
    ModelUpdated,
    ModelUpdateFailed,
    RollbackRequested,
    TrainingFinished,
    TrainingProgress,
    TrainingRequested,
)
from shared.settings import Settings

if TYPE_CHECKING:
    from services.pipeline import ModelChoice
    from services.preflight import Check, Needs, PullProgress
    from shared.bus import Bus
    from shared.nats_auth import AuthDir, Role

log = logging.getLogger(__name__)

BUS_LOG = "mindx.bus"  # the logger that says which bus a command uses (`-v` shows it)
IMPORT_WAIT_S = 600  # until the collector has stored every imported point
ROLLBACK_WAIT_S = 30
LANGUAGE_SAMPLE = 2000  # memory points looked at to tell the memory's language


def choose_models(settings: Settings) -> ModelChoice:
    """The default models for this workspace's memory (`pipeline.local_models`): the points in
    the corpus and those waiting in the memory directory, decided once per process."""
    from services import pipeline  # numpy: not for `mindx --help`

    chinese = None
    if settings.backend == "local" and not settings.embed_model:
        from services.filter import chinese_share

        chinese = chinese_share(_memory_sample(settings, LANGUAGE_SAMPLE))
    multilingual = bundled.multilingual_embed_installed()
    choice = pipeline.local_models(settings, chinese, multilingual=multilingual)
    if choice.reason:
        log.info("models: %s", choice.reason)
    return choice


def _memory_sample(settings: Settings, limit: int) -> list[str]:
    from services.memory_adapter import memory_files, read_memory_file

    texts: list[str] = []
    if settings.corpus_path.exists():
        from shared.corpus import Corpus

        with Corpus.open(settings.corpus_path) as corpus:
            texts += [p.content for p in corpus.points()[-limit:]]
    for path in memory_files(settings.memory_path):
        if len(texts) >= limit:
            break
        points, _ = read_memory_file(path)  # unreadable points are reported by the import
        texts += [p.content for p in points[: limit - len(texts)]]
    return texts


def open_backend(settings: Settings) -> Backend:
    """The backend the settings name; the in-process one (torch) is imported only when chosen."""
    if settings.backend == "local":
        from training.local_backend import LocalBackend

        return LocalBackend(settings.data_path / "models", seed=settings.seed)
    from shared.ollama import OllamaClient

    return OllamaClient(settings.ollama, timeout=settings.ollama_timeout_s)


@dataclass
class Resources:
    """Opened lazily: a collector never loads a model, a validator never opens the corpus."""

    settings: Settings
    stack: contextlib.AsyncExitStack
    model_choice: str = ""  # why these models (`choose_models`), for the run reports
    _backend: Backend | None = None
    _embedder: Any = None
    _corpus: Any = None
    services: list[Any] = field(default_factory=list)

    async def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.settings)
            self.stack.push_async_callback(self._backend.aclose)
        return self._backend

    async def embedder(self) -> Any:
        if self._embedder is None:
            from shared.embeddings import Embedder

            self._embedder = Embedder(await self.backend(), self.settings.embedding_model)
        return self._embedder

    def corpus(self) -> Any:
        """The process's handle on the corpus, shared by its collector and trainer."""
        if self._corpus is None:
            from shared.corpus import Corpus

            self._corpus = Corpus.open(self.settings.corpus_path)
            self.stack.callback(self._corpus.close)
        return self._corpus


@contextlib.asynccontextmanager
async def resources(settings: Settings, model_choice: str = "") -> AsyncIterator[Resources]:
    async with contextlib.AsyncExitStack() as stack:
        yield Resources(settings=settings, stack=stack, model_choice=model_choice)


# --- the components: name → how to start it in a process --------------------------------------

Starter = Callable[[Any, Resources], Awaitable[list[Any]]]


async def _collector(bus: Any, res: Resources) -> list[Any]:
    from services import collector

    return [await collector.serve(bus, res.settings, res.corpus())]


async def _trainer(bus: Any, res: Resources) -> list[Any]:
    from services import trainer

    backend, embedder = await res.backend(), await res.embedder()
    return [
        await trainer.serve(
            bus, res.settings, backend, embedder, res.corpus(), model_choice=res.model_choice
        )
    ]


async def _validator(bus: Any, res: Resources) -> list[Any]:
    from services import validator

    backend, embedder = await res.backend(), await res.embedder()
    s = res.settings
    return [
        await validator.serve(
            bus, backend, embedder, system=s.app_system_prompt, concurrency=s.validator_slots()
        )
    ]


async def _config_updater(bus: Any, res: Resources) -> list[Any]:
    from services import config_updater

    # the backend only answers whether a validated model exists
    return await config_updater.serve(bus, res.settings, await res.backend())


async def _forgetter(bus: Any, res: Resources) -> list[Any]:
    from services import config_updater, forget

    backend = await res.backend()
    updater = config_updater.updater_for(bus, res.settings, backend)
    return [await forget.serve(bus, res.settings, res.corpus(), backend, updater)]


async def _lora_worker(bus: Any, res: Resources) -> list[Any]:
    from training import worker  # torch: loaded only where a worker runs

    return [await worker.serve(bus, res.settings)]


COMPONENTS: dict[str, Starter] = {
    "collector": _collector,
    "trainer": _trainer,
    "validator": _validator,
    "config-updater": _config_updater,
    "forgetter": _forgetter,
    "lora-worker": _lora_worker,
}
# `all` is what one machine without a GPU needs; LoRA workers are started on purpose.
ALL = ("collector", "trainer", "validator", "config-updater", "forgetter")


async def start(bus: Any, res: Resources, names: Sequence[str]) -> list[Any]:
    """Start the named components on `bus`; returns their service handles."""
    unknown = set(names) - set(COMPONENTS)
    if unknown:
        raise ValueError(
            f"unknown component(s) {sorted(unknown)}; choose from {', '.join(COMPONENTS)} or all"
        )
    from services import status

    started: list[Any] = []
    for name in names:
        started.extend(await COMPONENTS[name](bus, res))
        log.info("serving %s", name)
    # every process answers `mindx status`
    started += await status.serve(bus, names, stale_after_s=res.settings.run_deadline_s)
    res.services.extend(started)
    return started


async def stop(services: list[Any]) -> None:
    for svc in reversed(services):
        with contextlib.suppress(Exception):
            await svc.stop()


# --- what the commands do: each a library call the CLI renders ---------------------------------


class UserFacingError(Exception):
    """An expected failure the user can fix (a missing file, an unreachable server): one line."""


@dataclass(frozen=True)
class Endpoint:
    """Where the bus is, and as whom this process connects to it."""

    url: str
    settings: Settings
    keys: AuthDir | None  # the embedded server's own keys; None: the configured options

    @contextlib.asynccontextmanager
    async def connect(self, role: Role) -> AsyncIterator[Bus]:
        """A bus connection as `role` (on the embedded server; elsewhere as the configured
        user, whose permissions the server decides). Only the service sets up streams."""
        from shared.bus import Bus
        from shared.nats_client import NatsAuth

        auth = NatsAuth(nkey=self.keys.seed_file(role)) if self.keys else self.settings.nats_auth()
        bus = await Bus.connect(
            self.url,
            name=f"mindx-{role}",
            auth=auth,
            manage_streams=role == "service",
            streams=subjects.streams(
                self.settings.memory_retention_days, self.settings.stream_replicas
            ),
        )
        try:
            yield bus
        finally:
            await bus.close()


@contextlib.asynccontextmanager
async def endpoint(settings: Settings) -> AsyncIterator[Endpoint]:
    """The configured NATS, else the data dir's one embedded server (started here, or by another
    command on the same data dir), which requires auth: its keys (one per role, see
    shared.nats_auth) are made once under `<data-dir>/auth`."""
    from shared.nats_auth import ensure_auth_dir
    from shared.nats_client import redact_url
    from shared.nats_server import ensure_nats

    if settings.nats:
        logging.getLogger(BUS_LOG).info("bus %s (--nats or NATS_URL)", redact_url(settings.nats))
        yield Endpoint(settings.nats, settings, None)
        return
    if settings.nats_auth().any:
        raise UserFacingError(
            "NATS connection options need a NATS URL (--nats or NATS_URL); the embedded "
            f"server uses its own keys under {settings.data_path / 'auth'}"
        )
    keys = ensure_auth_dir(settings.data_path / "auth")
    async with ensure_nats(None, settings.data_path / "nats", config=keys.config) as url:
        logging.getLogger(BUS_LOG).info("bus %s (embedded, of %s)", url, settings.data_path)
        yield Endpoint(url, settings, keys)


@contextlib.asynccontextmanager
async def connect(settings: Settings, role: Role = "service") -> AsyncIterator[Bus]:
    """The bus as `role`: the configured NATS, else an embedded server under the data dir."""
    async with endpoint(settings) as where, where.connect(role) as bus:
        yield bus


@dataclass(frozen=True)
class Checks:
    """How a command runs its preflight (services.preflight): pull a missing model or refuse,
    and where pull progress and warnings go."""

    pull: bool = True
    on_pull: PullProgress | None = None
    on_warning: Callable[[Check], None] | None = None


async def preflight(res: Resources, needs: Needs, checks: Checks | None) -> None:
    """The checks `needs` asks for; PreflightError (a line per failure) before any work."""
    from services.preflight import require

    c = checks or Checks()
    backend = await res.backend() if needs.backend else None
    await require(
        res.settings, backend, needs, pull=c.pull, on_pull=c.on_pull, on_warning=c.on_warning
    )


async def doctor(
    settings: Settings, *, pull: bool = False, on_pull: PullProgress | None = None
) -> list[Check]:
    """Every preflight check alone (`mindx doctor`); a missing model is pulled only with `pull`."""
    from services.preflight import ALL, run_checks

    async with resources(settings) as res:
        return await run_checks(
            settings,
            await res.backend(),
            ALL,
            pull=pull,
            on_pull=on_pull,
            pull_hint="or `mindx doctor --pull`",
        )


@dataclass(frozen=True)
class Imported:
    published: int
    errors: list[str]  # `file:line: reason` of each skipped record
    files: int


async def publish_memory(bus: Bus, files: Sequence[Path]) -> Imported:
    """Publish every readable point of `files` on `memory.point.created`.

    A bad record (malformed, an id SQLite cannot store, over the server's max_payload) or an
    unreadable file is skipped and named in `errors`; the rest is still published. The message
    id is the point's id and version, so JetStream drops a repeated import.
    """
    from services.memory_adapter import read_memory_records
    from shared.bus import PayloadTooLargeError

    published, errors = 0, []
    for f in files:
        records, errs = read_memory_records(f)
        errors += errs
        for line, p in records:
            try:
                await bus.publish(subjects.MEMORY_POINT_CREATED, p, msg_id=subjects.point_msg_id(p))
            except PayloadTooLargeError as exc:
                errors.append(f"{f}:{line}: point {p.id}: {exc}")
                continue
            published += 1
    return Imported(published=published, errors=errors, files=len(files))


async def import_memory(settings: Settings, files: Sequence[Path]) -> Imported:
    """Publish the files' points and wait until the collector has stored them."""
    async with (
        endpoint(settings) as where,
        where.connect("service") as bus,
        where.connect("memory") as memory,  # the points come in as the app's memory would
        resources(settings) as res,
    ):
        services = await start(bus, res, ["collector"])
        try:
            imported = await publish_memory(memory, files)
            await bus.wait_idle(subjects.COLLECTOR, timeout=IMPORT_WAIT_S)
        finally:
            await stop(services)
    return imported


FORGET_WAIT_S = 600  # until the forgetter has erased every point asked for


@dataclass(frozen=True)
class ForgetRequest:
    ids: list[int]
    done: bool  # True: forgotten here (the embedded bus); False: published for the services
    seconds: float


async def forget(settings: Settings, ids: Sequence[int]) -> ForgetRequest:
    """Publish `memory.point.deleted` for each id (as the operator). On the embedded bus (no
    `--nats`), the forgetter runs here, and this returns once every point is forgotten."""
    from shared.messages import MemoryPointDeleted

    started = time.perf_counter()
    async with endpoint(settings) as where, where.connect("operator") as operator:
        if where.keys is None:  # a bus of running services: their forgetter does it
            for i in ids:
                await operator.publish(subjects.MEMORY_POINT_DELETED, MemoryPointDeleted(id=i))
            return ForgetRequest(list(ids), False, time.perf_counter() - started)
        async with where.connect("service") as bus, resources(settings) as res:
            services = await start(bus, res, ["forgetter"])
            try:
                for i in ids:
                    await operator.publish(subjects.MEMORY_POINT_DELETED, MemoryPointDeleted(id=i))
                await bus.wait_idle(subjects.FORGETTER, timeout=FORGET_WAIT_S)
            finally:
                await stop(services)
    return ForgetRequest(list(ids), True, time.perf_counter() - started)


async def serve_until(
    settings: Settings,
    names: Sequence[str],
    stopped: asyncio.Event,
    *,
    ready: Callable[[str], None],
    checks: Checks | None = None,
) -> None:
    """Serve the named components (or `all`) until `stopped` is set, once their preflight
    checks pass."""
    from services.preflight import needs_of

    names = list(ALL) if list(names) == ["all"] else list(names)
    choice = choose_models(settings)
    settings = choice.settings
    async with connect(settings) as bus, resources(settings, choice.reason) as res:
        await preflight(res, needs_of(names), checks)
        services = await start(bus, res, names)
        ready(f"serving {', '.join(names)} on {bus.url}")
        try:
            await stopped.wait()
        finally:
            await stop(services)


async def train_once(
    settings: Settings,
    *,
    force: bool = False,
    since: datetime | None = None,
    on_import: Callable[[Imported], None] | None = None,
    on_progress: Callable[[TrainingProgress], Awaitable[None]] | None = None,
    checks: Checks | None = None,
) -> TrainingFinished:
    """One run through the bus, with every component in this process: import the memory dir,
    request a run, and return its `training.completed` / `training.failed`."""
    from services.memory_adapter import memory_files
    from services.preflight import (
        RUN_ONCE,
        Check,
        PreflightError,
        corpus_points,
        nothing_to_train_on,
    )

    choice = choose_models(settings)
    settings = choice.settings
    async with connect(settings) as bus, resources(settings, choice.reason) as res:
        await preflight(res, RUN_ONCE, checks)
        names = [*ALL, *(["lora-worker"] if settings.mode == "lora" else [])]
        services = await start(bus, res, names)
        try:
            files = memory_files(settings.memory_path)
            imported = await publish_memory(bus, files) if files else None
            # what the memory dir and the bus held is in the corpus now
            await bus.wait_idle(subjects.COLLECTOR, timeout=IMPORT_WAIT_S)
            if imported is not None and on_import is not None:
                on_import(imported)
            if not corpus_points(settings):
                raise PreflightError([Check("memory", "fail", nothing_to_train_on(settings))])
            progress = None
            if on_progress is not None:
                progress = await bus.subscribe(
                    f"{subjects.TRAINING_PROGRESS}.*", TrainingProgress, on_progress
                )
            request_id = uuid.uuid4().hex

            def ours(ev: TrainingFinished) -> bool:
                return ev.request_id == request_id

            try:
                finished: TrainingFinished = await bus.publish_and_wait(
                    subjects.TRAINING_REQUESTED,
                    TrainingRequested(
                        request_id=request_id,
                        mode=settings.mode,
                        base_model=settings.base_model,
                        min_corpus=settings.min_corpus,
                        force=force,
                        since=since,
                    ),
                    msg_id=request_id,
                    expect=[
                        Expect(subjects.TRAINING_COMPLETED, TrainingFinished, ours),
                        Expect(subjects.TRAINING_FAILED, TrainingFinished, ours),
                    ],
                    timeout=None,
                )
            finally:
                if progress is not None:
                    await progress.stop()
        finally:
            await stop(services)
    return finished


async def rollback(settings: Settings, backup: str | None) -> ModelUpdated:
    """Ask the updater of this config to restore `backup` (default: the newest) and wait for it."""
    from services.model_config import config_key, same_config

    config = config_key(settings.config_path)
    async with (
        endpoint(settings) as where,
        where.connect("service") as bus,
        where.connect("operator") as operator,  # the request comes as an operator's would
        resources(settings) as res,
    ):
        services = await start(bus, res, ["config-updater"])
        try:
            request_id = uuid.uuid4().hex
            try:
                outcome = await operator.publish_and_wait(
                    subjects.MODEL_ROLLBACK_REQUESTED,
                    RollbackRequested(config_path=config, request_id=request_id, backup=backup),
                    msg_id=request_id,
                    expect=[
                        Expect(
                            subjects.MODEL_UPDATED,
                            ModelUpdated,
                            lambda ev: (
                                ev.rolled_back
                                and ev.run_id == request_id
                                and same_config(ev.config_path, config)
                            ),
                        ),
                        Expect(
                            subjects.MODEL_UPDATE_FAILED,
                            ModelUpdateFailed,
                            lambda ev: ev.run_id == request_id,
                        ),
                    ],
                    timeout=ROLLBACK_WAIT_S,
                )
            except TimeoutError as exc:
                raise UserFacingError("rollback: no answer from the config updater") from exc
        finally:
            await stop(services)
    if isinstance(outcome, ModelUpdateFailed):
        raise UserFacingError(f"rollback failed: {outcome.error}")
    return outcome


async def init(settings: Settings) -> tuple[str, list[str]]:
    """Declare every stream on the configured bus, so what producers publish before any
    service starts is kept; returns the bus URL and the stream names."""
    async with connect(settings) as bus:  # declares the streams (and says what it could not)
        return bus.url, [spec.name for spec in bus.streams]


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    async with connect(settings, "operator") as bus:
        return await bus.dead_letters()


async def models(settings: Settings) -> tuple[list[ModelLineage], str | None]:
    """Every model a run created, by creation (their lineage), and the config's live model."""
    from services import lineage
    from services.model_config import ConfigError, left_model, read_config

    async with connect(settings, "operator") as bus:
        records = await lineage.load_all(bus)
    try:
        live = left_model(read_config(settings.config_path), settings.left_key)
    except FileNotFoundError:
        live = None
    except ConfigError as exc:
        raise UserFacingError(str(exc)) from exc
    return sorted(records, key=lambda r: (r.created_at, r.run_id)), live
