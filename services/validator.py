"""Validator: scores a model's answers on held-out cases against the expected replies.

The trainer puts a run's cases on the `VALIDATION` work queue (`validation.case.<run_id>`) and
listens on `validation.result.<run_id>`. Any number of `mindx serve validator` processes pull
from the one durable `validators`, each only as many cases as it has room for
(`--validator-concurrency`), so a busy validator leaves the rest to idle ones; a validator
batches the embeddings of the cases it holds into one call. A validator that dies mid-case
hands it back after the durable's ack_wait: it costs the case one more delivery, not the run.
With no validator pulling, the trainer scores the cases itself.

A validator is no open proxy to the backend: it serves a case only while the trainer's run record
says the run is in progress, only on that run's base, new or live model (the incumbent), with no
system prompt but the configured one, and with only the options in OPTION_RULES within their
caps. Anything else is refused (an error result the trainer does not retry, and a dead letter)
before the backend sees it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from shared import subjects
from shared.backend import Backend, ChatMessage
from shared.bus import Bus, BusError, Delivery, NoRespondersError, Rejected, Service, worker_name
from shared.embeddings import EmbedGatherer
from shared.messages import RunRecord, ValidationCase, ValidationResult
from shared.names import same_model
from shared.subjects import RunNames

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
    case: ValidationCase,
    backend: Backend,
    embedder: Embedder | EmbedGatherer,
    *,
    name: str | None = None,
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


async def validators_pulling(bus: Bus, wait_s: float = 2.5) -> bool:
    """Whether a validator has room for cases: it has a pull request open on the durable. An
    idle validator renews its request every 2 s, so this looks for up to `wait_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            load = await bus.queue_load(subjects.VALIDATOR)
        except BusError as exc:
            log.warning("cannot see the validators' queue (%s); scoring here", exc)
            return False
        if load is not None and load.waiting > 0:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def validate_cases(
    bus: Bus,
    cases: Sequence[ValidationCase],
    *,
    concurrency: int,
    timeout_s: float,
    attempts: int = 3,
    fallback: Callable[[ValidationCase], Awaitable[ValidationResult]] | None = None,
    on_result: Callable[[ValidationResult], Awaitable[None]] | None = None,
    probe_s: float = 2.5,
) -> list[ValidationResult]:
    """Score one run's cases for one model on the validators' work queue; results in case order.

    Every case is queued at once and validators take them as they have room. The first result
    of a case counts (a case scored twice, after a redelivery or a re-queue, counts once). When
    no result comes for `timeout_s`, the cases still missing are queued again, up to `attempts`
    times in all; a refused case comes back as an error result and is not retried. With no
    validator pulling (at the start, or after such a wait), `fallback` scores the rest in this
    process, `concurrency` at a time (without one: NoRespondersError). The run's cases left on
    the queue are dropped at the end.
    """
    if not cases:
        return []
    run = RunNames(cases[0].run_id)
    if any(c.run_id != run.run_id or c.model != cases[0].model for c in cases):
        raise ValueError("validate_cases takes the cases of one run and one model")
    wanted = {c.case_id: c for c in cases}
    call = f"case-{run.run_id}-{uuid.uuid4().hex[:12]}"  # message ids: a retry is a new message
    done: dict[int, ValidationResult] = {}
    arrived = asyncio.Event()

    async def record(result: ValidationResult) -> None:
        done[result.case_id] = result
        arrived.set()
        if on_result is not None:
            await on_result(result)

    async def take(result: ValidationResult) -> None:
        case = wanted.get(result.case_id)
        if case is None or result.case_id in done or result.model != case.model:
            return  # another model's case, or a second answer
        await record(result)

    listening = await bus.subscribe(run.result_subject, ValidationResult, take)
    try:
        last = "no validator took them"
        for attempt in range(1, attempts + 1):
            if not await validators_pulling(bus, probe_s):
                break
            # all at once: a validator with room takes a burst of them in one pull
            await asyncio.gather(
                *(
                    bus.publish(run.case_subject, c, msg_id=f"{call}-{c.case_id}-{attempt}")
                    for c in cases
                    if c.case_id not in done
                )
            )
            while len(done) < len(cases):
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), timeout_s)
                except TimeoutError:
                    last = f"no result within {timeout_s:g}s"
                    log.warning("%d cases: %s (try %d)", len(cases) - len(done), last, attempt)
                    break
            else:
                return [done[c.case_id] for c in cases]
        else:  # every try ran out: the rest are errors
            for case in cases:
                if case.case_id not in done:
                    error = f"no validator answered after {attempts} tries ({last})"
                    await record(_error(case, error))
            return [done[c.case_id] for c in cases]
        await _drop_cases(bus, run)
        rest = [c for c in cases if c.case_id not in done]
        if fallback is None:
            raise NoRespondersError(f"no validator takes cases on {run.case_subject}")
        log.info("no validator is pulling: scoring %d cases in this process", len(rest))
        sem = asyncio.Semaphore(concurrency)

        async def here(case: ValidationCase) -> None:
            async with sem:
                result = await fallback(case)
            if case.case_id not in done:
                await record(result)

        await asyncio.gather(*(here(c) for c in rest))
        return [done[c.case_id] for c in cases]
    finally:
        await listening.stop()
        await _drop_cases(bus, run)


def _error(case: ValidationCase, error: str, validator: str = "") -> ValidationResult:
    return ValidationResult(
        run_id=case.run_id, case_id=case.case_id, model=case.model, error=error, validator=validator
    )


async def _drop_cases(bus: Bus, run: RunNames) -> None:
    """Purge what is left of the run's cases (re-queued copies, cases of a dead validator)."""
    try:
        await bus.purge(subjects.VALIDATOR.stream, run.case_subject)
    except Exception as exc:  # max_age drops them later
        log.warning("could not drop the leftover cases of %s: %r", run.run_id, exc)


async def serve(
    bus: Bus,
    backend: Backend,
    embedder: Embedder,
    *,
    system: str | None = None,
    name: str | None = None,
    concurrency: int = 5,
) -> Service:
    """Pull cases from the validators' work queue, up to `concurrency` at once; returns the bus
    service handle. `system` is the one system prompt a case may carry (the configured
    `app_system_prompt`)."""
    name = name or worker_name()
    gathered = EmbedGatherer(embedder)

    async def handle(case: ValidationCase, delivery: Delivery) -> None:
        run = RunNames(case.run_id)  # a RunId: safe as a subject token
        if delivery.subject != run.case_subject:
            raise Rejected(f"a case of run {case.run_id} on {delivery.subject}")
        record = await bus.get_record(subjects.RUNS, case.run_id, RunRecord)
        why = refusal(case, record, system)
        if why is not None:
            if record is not None:  # its trainer may be waiting: an answer it does not retry
                refused = _error(case, f"refused: {why}", name)
                await bus.publish(run.result_subject, refused)
            raise Rejected(why)
        with gathered.member():  # its embedding waits for those of the cases beside it
            result = await score_case(case, backend, gathered, name=name)
        await bus.publish(run.result_subject, result)

    return await bus.serve_concurrent(subjects.VALIDATOR, ValidationCase, handle, limit=concurrency)
