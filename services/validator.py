"""Validator: scores a model's answers on held-out cases against the expected replies.

Each case is one core-NATS request on `validation.case`, served by a queue group, so any number
of `mindx serve validator` processes share a run's cases; a validator that dies mid-case costs the
trainer one retry of that case, not the run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from shared import subjects
from shared.backend import Backend, ChatMessage
from shared.bus import Bus, BusError, NoRespondersError, Service, worker_name
from shared.messages import ValidationCase, ValidationResult

if TYPE_CHECKING:
    from shared.embeddings import Embedder

log = logging.getLogger(__name__)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def clean_answer(text: str) -> str:
    """Drop a reasoning block some models put inline, and surrounding whitespace."""
    return _THINK_BLOCK.sub("", text).strip()


def case_messages(case: ValidationCase) -> list[ChatMessage]:
    # No system message of our own unless configured: it would make Ollama drop the model's SYSTEM.
    msgs = [ChatMessage(role="system", content=case.system)] if case.system else []
    msgs.append(ChatMessage(role="user", content=case.prompt))
    return msgs


async def score_case(
    case: ValidationCase, backend: Backend, embedder: Embedder, *, name: str | None = None
) -> ValidationResult:
    """Chat once, embed answer and expected reply, score by cosine. Failures become `error`."""
    started = time.perf_counter()
    name = name or worker_name()
    try:
        reply = await backend.chat(case.model, case_messages(case), options=case.options or None)
        answer = clean_answer(reply.message.content)
        if not answer:
            raise ValueError("empty answer")
        vecs = await embedder.embed([answer, case.expected])
        score = float(vecs[0] @ vecs[1])
    except Exception as exc:  # scored as an error, never as a silent 0
        log.warning("case %s/%d on %s failed: %s", case.run_id, case.case_id, case.model, exc)
        return ValidationResult(
            run_id=case.run_id,
            case_id=case.case_id,
            model=case.model,
            error=f"{type(exc).__name__}: {exc}",
            validator=name,
            latency_s=time.perf_counter() - started,
        )
    return ValidationResult(
        run_id=case.run_id,
        case_id=case.case_id,
        model=case.model,
        answer=answer,
        score=score,
        validator=name,
        latency_s=time.perf_counter() - started,
    )


async def validate_cases(
    bus: Bus,
    cases: Sequence[ValidationCase],
    *,
    concurrency: int,
    timeout_s: float,
    attempts: int = 3,
    fallback: Callable[[ValidationCase], Awaitable[ValidationResult]] | None = None,
    on_result: Callable[[ValidationResult], Awaitable[None]] | None = None,
) -> list[ValidationResult]:
    """Send every case to the validator queue group with bounded concurrency.

    A case whose validator times out is sent again (another worker picks it up). With no
    validator listening at all, `fallback` scores the case in this process.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one(case: ValidationCase) -> ValidationResult:
        async with sem:
            last = "no attempt"
            for attempt in range(1, attempts + 1):
                try:
                    result = await bus.request(
                        subjects.VALIDATION_CASE, case, ValidationResult, timeout=timeout_s
                    )
                    break
                except NoRespondersError:
                    if fallback is None:
                        raise
                    result = await fallback(case)
                    break
                except (TimeoutError, BusError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    log.warning("case %d try %d: %s", case.case_id, attempt, last)
            else:
                result = ValidationResult(
                    run_id=case.run_id,
                    case_id=case.case_id,
                    model=case.model,
                    error=f"no validator answered after {attempts} tries ({last})",
                )
            if on_result is not None:
                await on_result(result)
            return result

    return list(await asyncio.gather(*(one(c) for c in cases)))


async def serve(
    bus: Bus, backend: Backend, embedder: Embedder, *, name: str | None = None
) -> Service:
    """Join the validator queue group; returns the bus service handle."""
    name = name or worker_name()

    async def handle(case: ValidationCase) -> ValidationResult:
        return await score_case(case, backend, embedder, name=name)

    return await bus.reply(
        subjects.VALIDATION_CASE, ValidationCase, handle, queue=subjects.VALIDATOR_QUEUE
    )
