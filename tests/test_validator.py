"""Validator: scoring, queue-group sharing, and a validator that dies mid-run."""

from __future__ import annotations

import asyncio
from typing import Any

from services.validator import case_messages, clean_answer, score_case, validate_cases
from services.validator import serve as serve_validator
from shared import subjects
from shared.bus import Bus
from shared.embeddings import Embedder
from shared.messages import ValidationCase, ValidationResult
from shared.ollama import OllamaClient
from tests.ollama_double import Fault

EMBED = "qllama/bge-small-zh-v1.5:latest"


def cases(n: int, model: str = "qwen3:0.6b") -> list[ValidationCase]:
    return [
        ValidationCase(
            run_id="r1",
            case_id=i,
            model=model,
            prompt=f"Where can I find a cheap hotel, case {i}?",
            expected=f"The Acorn guest house is cheap, case {i}.",
        )
        for i in range(n)
    ]


def test_no_system_message_of_its_own() -> None:
    case = cases(1)[0]
    assert [m.role for m in case_messages(case)] == ["user"]
    sys_case = ValidationCase(
        run_id="r1", case_id=0, model="m", prompt="p", expected="e", system="Be brief."
    )
    assert [m.role for m in case_messages(sys_case)] == ["system", "user"]


def test_clean_answer_drops_inline_reasoning() -> None:
    assert clean_answer("<think>plan\nmore</think>\n  The answer. ") == "The answer."


async def test_score_case_errors_are_reported_not_scored(ollama_double: Any) -> None:
    async with OllamaClient(ollama_double.url, attempts=1) as client:
        emb = Embedder(client, EMBED)
        ok = await score_case(cases(1)[0], client, emb)
        assert ok.error is None and ok.score is not None and -1.0 <= ok.score <= 1.0
        missing = await score_case(cases(1, model="nope:1b")[0], client, emb)
        assert missing.score is None and "not found" in (missing.error or "")
        # the model answers nothing: an error, never a silent 0
        ollama_double.faults.add("/api/chat", Fault.error(500, "llama runner crashed"))
        crashed = await score_case(cases(1)[0], client, emb)
        assert crashed.score is None and "llama runner crashed" in (crashed.error or "")


async def test_validators_share_a_run_and_a_dead_one_costs_a_retry(
    nats_server: Any, bus: Bus, ollama_double: Any
) -> None:
    async with OllamaClient(ollama_double.url) as client:
        emb = Embedder(client, EMBED)
        # two healthy validators on their own connections, as separate processes would be
        buses = [await Bus.connect(nats_server.url, name=f"v{i}") for i in range(2)]
        for i, b in enumerate(buses):
            await serve_validator(b, client, emb, name=f"validator-{i}")
        # and one that dies while it holds a case: it never answers, and its connection goes
        stuck_bus = await Bus.connect(nats_server.url, name="stuck")
        taken: list[int] = []

        async def dies(case: ValidationCase) -> Any:
            taken.append(case.case_id)
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, stuck_bus.nc.close())
            await asyncio.Event().wait()

        await stuck_bus.reply(
            subjects.VALIDATION_CASE, ValidationCase, dies, queue=subjects.VALIDATOR_QUEUE
        )
        try:
            results = await validate_cases(bus, cases(30), concurrency=6, timeout_s=2.0)
        finally:
            for b in [*buses, stuck_bus]:
                await b.close()
    assert [r.case_id for r in sorted(results, key=lambda r: r.case_id)] == list(range(30))
    assert all(r.error is None and r.score is not None for r in results)
    served_by = {r.validator for r in results}
    assert served_by == {"validator-0", "validator-1"}
    assert taken, "the stuck validator took no case; the retry path was not exercised"


async def test_no_validator_running_scores_in_process(bus: Bus, ollama_double: Any) -> None:
    async with OllamaClient(ollama_double.url) as client:
        emb = Embedder(client, EMBED)

        async def here(case: ValidationCase) -> Any:
            return await score_case(case, client, emb, name="trainer")

        results = await validate_cases(bus, cases(5), concurrency=2, timeout_s=5, fallback=here)
    assert {r.validator for r in results} == {"trainer"}
    assert all(r.score is not None for r in results)


async def test_a_validator_stopped_mid_case_still_answers_it(nats_server: Any, bus: Bus) -> None:
    """A command that ends (and stops its validator) while it scores another's cases."""
    other = await Bus.connect(nats_server.url, name="ending")
    started = asyncio.Event()

    async def slow(case: ValidationCase) -> ValidationResult:
        started.set()
        await asyncio.sleep(1.0)
        return ValidationResult(
            run_id=case.run_id,
            case_id=case.case_id,
            model=case.model,
            score=0.5,
            validator="ending",
        )

    service = await other.reply(
        subjects.VALIDATION_CASE, ValidationCase, slow, queue=subjects.VALIDATOR_QUEUE
    )
    try:
        asking = asyncio.create_task(
            validate_cases(bus, cases(1), concurrency=1, timeout_s=30, attempts=1)
        )
        await asyncio.wait_for(started.wait(), 10)
        await service.stop()
        results = await asyncio.wait_for(asking, 10)  # answered, not the 30 s timeout
    finally:
        await other.close()
    assert [(r.validator, r.score, r.error) for r in results] == [("ending", 0.5, None)]
