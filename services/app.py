"""Wiring: the shared resources of a process and the components it serves.

Every component is an independent consumer; one process may serve any subset of them
(`mindx serve collector`, `mindx serve all`, or all of them behind `mindx train --run-once`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shared.backend import Backend
from shared.settings import Settings

log = logging.getLogger(__name__)

COMPONENTS = ("collector", "trainer", "validator", "config-updater", "lora-worker")
# `all` is what one machine without a GPU needs; LoRA workers are started on purpose.
ALL = ("collector", "trainer", "validator", "config-updater")


def open_backend(settings: Settings) -> Backend:
    """The backend the settings name; the in-process one (torch) is imported only when chosen."""
    if settings.backend == "local":
        from training.local_backend import LocalBackend

        return LocalBackend(settings.data_path / "models", seed=settings.seed)
    from shared.ollama import OllamaClient

    return OllamaClient(settings.ollama)


@dataclass
class Resources:
    """Opened lazily: a collector never loads a model, a validator never opens the corpus."""

    settings: Settings
    stack: contextlib.AsyncExitStack
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
        if self._corpus is None:
            from shared.corpus import Corpus

            self._corpus = Corpus.open(self.settings.data_path / "corpus.sqlite3")
            self.stack.callback(self._corpus.close)
        return self._corpus


@contextlib.asynccontextmanager
async def resources(settings: Settings) -> AsyncIterator[Resources]:
    async with contextlib.AsyncExitStack() as stack:
        yield Resources(settings=settings, stack=stack)


async def start(bus: Any, res: Resources, names: tuple[str, ...] | list[str]) -> list[Any]:
    """Start the named components on `bus`; returns their service handles."""
    unknown = set(names) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {COMPONENTS} or all")
    s = res.settings
    started: list[Any] = []
    for name in names:
        if name == "collector":
            from services import collector

            started.append(await collector.serve(bus, s))
        elif name == "validator":
            from services import validator

            started.append(await validator.serve(bus, await res.backend(), await res.embedder()))
        elif name == "trainer":
            from services import trainer

            started.append(
                await trainer.serve(bus, s, await res.backend(), await res.embedder(), res.corpus())
            )
        elif name == "config-updater":
            from services import config_updater

            started.extend(await config_updater.serve(bus, s))
        elif name == "lora-worker":
            from training import worker

            started.append(await worker.serve(bus, s))
        log.info("serving %s", name)
    res.services.extend(started)
    return started


async def stop(services: list[Any]) -> None:
    for svc in reversed(services):
        with contextlib.suppress(Exception):
            await svc.stop()
