"""Checks before any work, each one line with its fix: the config, the memory, the backend and
the two models a run needs. `mindx doctor` runs them alone; `train --run-once` and `serve` run
the ones their components need and refuse to start on a failure.

* config: the file the config updater switches must exist; a missing one is usually a typo in
  `--config`, so it is refused unless `--init-config` allows creating it.
* memory: nothing to train on (no memory files and an empty corpus) is a warning here, because
  points may still arrive over the bus; `train --run-once` refuses only once it has imported the
  memory dir and collected what the bus held (`nothing_to_train_on`).
* backend: reachable, with its version.
* base model and embedding model: on the backend; a missing one is pulled with progress (as
  `ollama run` does), or refused with `pull=False` (`--no-pull`). The local backend downloads
  nothing: it has its bundled models only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from shared.backend import Backend, BackendError, CreateProgress, ModelNotFound
from shared.settings import Settings

log = logging.getLogger(__name__)

Level = Literal["ok", "warn", "fail"]
PullProgress = Callable[[str, CreateProgress], Awaitable[None] | None]


class PreflightError(Exception):
    """One or more checks failed: the message has one line per failure, each with its fix."""

    def __init__(self, failed: Sequence[Check]) -> None:
        self.failed = list(failed)
        super().__init__("\n".join(c.message for c in self.failed))


@dataclass(frozen=True)
class Check:
    name: str  # config, memory, backend, base model, embedding model
    level: Level
    message: str  # one line; the fix when it is not ok

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Needs:
    """Which checks a command runs."""

    config: bool = False
    memory: bool = False  # a warning when there is nothing to train on
    backend: bool = False
    base_model: bool = False
    embed_model: bool = False


ALL = Needs(config=True, memory=True, backend=True, base_model=True, embed_model=True)
# `train --run-once` checks the memory itself, once it has imported and collected what there is
RUN_ONCE = Needs(config=True, backend=True, base_model=True, embed_model=True)


def needs_of(components: Sequence[str]) -> Needs:
    """What the named components need before they start (a LoRA worker and a collector need
    none of it: the worker resolves its base per job, the collector only stores points)."""
    names = set(components)
    return Needs(
        config=bool(names & {"config-updater", "forgetter"}),
        memory="trainer" in names,
        # a config updater asks the backend only whether a validated model exists, and rolls
        # back without it: it starts without one
        backend=bool(names & {"trainer", "validator"}),
        base_model="trainer" in names,
        embed_model=bool(names & {"trainer", "validator"}),
    )


# --- the checks ---------------------------------------------------------------------------------


def check_config(settings: Settings) -> Check:
    from services.model_config import ConfigError, left_model, missing_config, read_config

    path = settings.config_path
    if not path.exists():
        if settings.init_config:
            return Check("config", "ok", f"{path} will be created on the first switch")
        return Check("config", "fail", missing_config(path))
    try:
        left = left_model(read_config(path), settings.left_key)
    except (OSError, ConfigError) as exc:
        fix = "fix the file, or restore a backup with `mindx rollback`"
        return Check("config", "fail", f"config {exc}; {fix}")
    return Check("config", "ok", f"{path} (left model: {left or 'none yet'})")


def corpus_points(settings: Settings) -> int:
    """Points in the corpus; 0 when there is no corpus yet (it is not created here)."""
    if not settings.corpus_path.is_file():
        return 0
    from shared.corpus import Corpus

    with Corpus.open(settings.corpus_path) as corpus:
        return corpus.stats()["points"]


def nothing_to_train_on(settings: Settings) -> str:
    return (
        f"nothing to train on: {settings.memory_path} holds no .jsonl/.json memory files and "
        "the corpus is empty; copy Memory's exports there, import them with "
        "`mindx memory import FILE`, or have Memory publish memory.point.created "
        "(after `mindx init`)"
    )


def check_memory(settings: Settings) -> Check:
    from services.memory_adapter import memory_files

    files = memory_files(settings.memory_path)
    points = corpus_points(settings)
    if not files and not points:
        return Check("memory", "warn", nothing_to_train_on(settings))
    where = settings.memory_path
    return Check("memory", "ok", f"{len(files)} memory file(s) in {where}; {points} points stored")


def where_backend(settings: Settings) -> str:
    if settings.backend == "local":
        return "the local backend"
    return f"the ollama backend at {settings.ollama}"


async def check_backend(settings: Settings, backend: Backend) -> Check:
    try:
        version = await backend.version()
    except BackendError as exc:
        fix = (
            "start Ollama (`ollama serve`), give its URL with --ollama or OLLAMA_HOST, "
            "or use --backend local"
        )
        return Check("backend", "fail", f"cannot reach {where_backend(settings)}: {exc}; {fix}")
    return Check("backend", "ok", f"{where_backend(settings)}: version {version}")


async def check_model(
    settings: Settings,
    backend: Backend,
    kind: Literal["base model", "embedding model"],
    *,
    pull: bool,
    on_pull: PullProgress | None = None,
    pull_hint: str = "or run without --no-pull",
) -> Check:
    model = settings.base_model if kind == "base model" else settings.embedding_model
    flag = "--model" if kind == "base model" else "--embed-model"
    where = where_backend(settings)
    try:
        await backend.show(model)
        return Check(kind, "ok", f"{model} is on {where}")
    except ModelNotFound:
        pass
    except BackendError as exc:
        return Check(kind, "fail", f"cannot look up {kind} {model} on {where}: {exc}")
    if settings.backend == "local":
        return Check(
            kind,
            "fail",
            f"{kind} {model} is not on {where}, which downloads nothing; give a bundled model, "
            f"a GGUF file or a model directory with {flag}, or use --backend ollama",
        )
    if not pull:
        return Check(
            kind,
            "fail",
            f"{kind} {model} is not on {where}; pull it with `ollama pull {model}` "
            f"({pull_hint}), or name another with {flag}",
        )

    async def progress(p: CreateProgress) -> None:
        if on_pull is not None:
            result = on_pull(model, p)
            if result is not None:
                await result

    log.info("pulling %s %s", kind, model)
    try:
        await backend.pull(model, on_progress=progress)
    except BackendError as exc:
        return Check(
            kind,
            "fail",
            f"{kind} {model} is not on {where} and pulling it failed: {exc}; check the name "
            f"({flag}) and that the server can reach its registry",
        )
    return Check(kind, "ok", f"{model} pulled to {where}")


async def run_checks(
    settings: Settings,
    backend: Backend | None,
    needs: Needs,
    *,
    pull: bool = True,
    on_pull: PullProgress | None = None,
    pull_hint: str = "or run without --no-pull",
) -> list[Check]:
    """The checks `needs` asks for, local files first; models only on a reachable backend.
    `pull_hint`: how to let this command pull, said when a missing model is refused."""
    checks: list[Check] = []
    if needs.config:
        checks.append(check_config(settings))
    if needs.memory:
        checks.append(check_memory(settings))
    if backend is None or not (needs.backend or needs.base_model or needs.embed_model):
        return checks
    reached = await check_backend(settings, backend)
    checks.append(reached)
    if reached.level != "ok":
        return checks
    kinds: list[Literal["base model", "embedding model"]] = []
    if needs.base_model:
        kinds.append("base model")
    if needs.embed_model:
        kinds.append("embedding model")
    for kind in kinds:
        checks.append(
            await check_model(
                settings, backend, kind, pull=pull, on_pull=on_pull, pull_hint=pull_hint
            )
        )
    return checks


async def require(
    settings: Settings,
    backend: Backend | None,
    needs: Needs,
    *,
    pull: bool = True,
    on_pull: PullProgress | None = None,
    on_warning: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Run the checks; PreflightError (one line per failure) when any fails."""
    checks = await run_checks(settings, backend, needs, pull=pull, on_pull=on_pull)
    for check in checks:
        if check.level == "warn":
            if on_warning is not None:
                on_warning(check)
            else:
                log.warning("%s", check.message)
    failed = [c for c in checks if c.level == "fail"]
    if failed:
        raise PreflightError(failed)
    return checks
