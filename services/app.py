"""Wiring: the shared resources of a process and the components it serves.

Every component is an independent consumer; one process may serve any subset of them
(`mindx serve collector`, `mindx serve all`, or all of them behind `mindx train --run-once`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.backend import Backend, open_backend
from shared.settings import Settings

log = logging.getLogger(__name__)

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


# --- the components: name → how to start it in a process --------------------------------------

Starter = Callable[[Any, Resources], Awaitable[list[Any]]]


async def _collector(bus: Any, res: Resources) -> list[Any]:
    from services import collector

    return [await collector.serve(bus, res.settings)]


async def _trainer(bus: Any, res: Resources) -> list[Any]:
    from services import trainer

    backend, embedder = await res.backend(), await res.embedder()
    return [await trainer.serve(bus, res.settings, backend, embedder, res.corpus())]


async def _validator(bus: Any, res: Resources) -> list[Any]:
    from services import validator

    return [await validator.serve(bus, await res.backend(), await res.embedder())]


async def _config_updater(bus: Any, res: Resources) -> list[Any]:
    from services import config_updater

    return await config_updater.serve(bus, res.settings)


async def _lora_worker(bus: Any, res: Resources) -> list[Any]:
    from training import worker  # torch: loaded only where a worker runs

    return [await worker.serve(bus, res.settings)]


COMPONENTS: dict[str, Starter] = {
    "collector": _collector,
    "trainer": _trainer,
    "validator": _validator,
    "config-updater": _config_updater,
    "lora-worker": _lora_worker,
}
# `all` is what one machine without a GPU needs; LoRA workers are started on purpose.
ALL = ("collector", "trainer", "validator", "config-updater")


async def start(bus: Any, res: Resources, names: Sequence[str]) -> list[Any]:
    """Start the named components on `bus`; returns their service handles."""
    unknown = set(names) - set(COMPONENTS)
    if unknown:
        raise ValueError(
            f"unknown component(s) {sorted(unknown)}; choose from {', '.join(COMPONENTS)} or all"
        )
    started: list[Any] = []
    for name in names:
        started.extend(await COMPONENTS[name](bus, res))
        log.info("serving %s", name)
    res.services.extend(started)
    return started


async def stop(services: list[Any]) -> None:
    for svc in reversed(services):
        with contextlib.suppress(Exception):
            await svc.stop()
