"""Validator: scores a model's answers on held-out cases against the expected replies.

Each case is one core-NATS request on `validation.case`, served by a queue group, so any number
of `mindx serve validator` processes share a run's cases; a validator that dies mid-case costs the
trainer one retry of that case, not the run.

A validator is no open proxy to the backend: it serves a case only while the trainer's run record
says the run is in progress, only on that run's base, new or live model (the incumbent), with no
system prompt but the configured one, and with only the options in OPTION_RULES within their
caps. Anything else is refused with an error reply before the backend sees it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from shared import subjects
from shared.backend import Backend, ChatMessage
from shared.bus import (
    Bus,
    BusError,
    NoRespondersError,
    Rejected,
    RemoteError,
    Service,
    worker_name,
)
from shared.messages import RunRecord, ValidationCase, ValidationResult
from shared.names import same_model

if TYPE_CHECKING:
    from shared.embeddings import Embedder

log = logging.getLogger(__name__)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)

MAX_NUM_PREDICT = 2048  # tokens of one answer
MAX_NUM_CTX = 8192  # tokens of context
# option → (integer only, lowest, highest): the only options a case may pass to the backend
OPTION_RULES: dict[str, tuple[bool, float, float]] = {
    "temperature": (False, 0.0, 2.0),
    "top_p": (False, 0.0, 1.0),
    "top_k": (True, 1, 1000),
    "seed": (True, -(2**63), 2**63 - 1),
    "num_predict": (True, 1, MAX_NUM_PREDICT),
    "num_ctx": (True, 1, MAX_NUM_CTX),
}


def _option_refusal(key: str, value: Any) -> str | None:
    rule = OPTION_RULES.get(key)
    if rule is None:
        return f"option {key[:40]!r} is not allowed (allowed: {', '.join(OPTION_RULES)})"
    integer, low, high = rule
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"option {key} must be {'an integer' if integer else 'a number'}"
    if not low <= value <= high:
        return f"option {key} must be in [{low:g}, {high:g}], got {value:g}"
    return None


def refusal(case: ValidationCase, record: RunRecord | None, system: str | None) -> str | None:
    """Why a validator configured with `system` must not serve `case`, or None (pure)."""
    if record is None:
        return f"run {case.run_id} is unknown"
    if record.stage != "running":
        return f"run {case.run_id} is not in progress ({record.stage})"
    models = (record.base_model, record.new_model, record.incumbent_model)
    if not any(m and same_model(case.model, m) for m in models):
        return f"model {case.model[:100]!r} is not a model of run {case.run_id}"
    if case.system and case.system != system:
        return "the system prompt is not the configured one"
    for key, value in case.options.items():
        if (why := _option_refusal(key, value)) is not None:
            return why
    return None


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
                    if isinstance(exc, RemoteError) and exc.code == "403":
                        # refused: every validator would refuse it, so no retry
                        result = ValidationResult(
                            run_id=case.run_id,
                            case_id=case.case_id,
                            model=case.model,
                            error=str(exc),
                        )
                        break
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
    bus: Bus,
    backend: Backend,
    embedder: Embedder,
    *,
    system: str | None = None,
    name: str | None = None,
    concurrency: int = 1,
) -> Service:
    """Join the validator queue group; returns the bus service handle. `system` is the one
    system prompt a case may carry (the configured `app_system_prompt`); up to `concurrency`
    cases are scored at once."""
    name = name or worker_name()

    async def handle(case: ValidationCase) -> ValidationResult:
        record = await bus.get_record(subjects.RUNS, case.run_id, RunRecord)
        why = refusal(case, record, system)
        if why is not None:
            raise Rejected(why)
        return await score_case(case, backend, embedder, name=name)

    return await bus.reply(
        subjects.VALIDATION_CASE,
        ValidationCase,
        handle,
        queue=subjects.VALIDATOR_QUEUE,
        concurrency=concurrency,
    )
