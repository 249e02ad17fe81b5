"""The bus against a real nats-server: subjects and streams, publishing, request/reply,
publish-and-wait, objects."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js.api import StorageType

from shared import subjects
from shared.bus import (
    Bus,
    BusError,
    Expect,
    NoRespondersError,
    ObjectNotFoundError,
    Rejected,
    RemoteError,
    RequestTimeoutError,
    stream_for,
    subject_matches,
)
from shared.messages import MemoryPoint, ValidationCase, ValidationResult
from shared.nats_server import EmbeddedNats
from tests.bus_helpers import point

# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("memory.>", "memory.point.created", True),
        ("memory.>", "memory", False),
        ("lora.done.>", "lora.done.run1", True),
        ("training.*", "training.requested", True),
        ("training.*", "training.progress.r1", False),
        ("model.validated", "model.validated", True),
        ("model.validated", "model.validated.x", False),
        ("dlq.>", "dlq.memory.point.created", True),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


def test_every_subject_routes_to_its_stream_or_to_core() -> None:
    assert stream_for(subjects.MEMORY_POINT_CREATED) == "MEMORY"
    assert stream_for(subjects.TRAINING_REQUESTED) == "TRAINING"
    assert stream_for(subjects.MODEL_VALIDATED) == "MODEL"
    assert stream_for(f"{subjects.LORA_DONE}.r1") == "LORA_DONE"
    assert stream_for(subjects.dead_letter_subject(subjects.MODEL_VALIDATED)) == "DLQ"
    assert stream_for(subjects.RunNames("r1").progress_subject) is None  # live only
    assert stream_for(subjects.VALIDATION_CASE) is None


# --- connecting and publishing ------------------------------------------------------------------


async def test_connect_to_nothing_is_a_clear_bus_error() -> None:
    with pytest.raises(BusError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:1"):
        await Bus.connect("nats://127.0.0.1:1", attempts=1, connect_timeout=1)


async def test_connect_creates_streams_and_is_idempotent(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    names = {s.name for s in subjects.STREAMS}
    # Drift a stream's config; the next connect puts it back.
    info = await bus.js.stream_info("TRAINING")
    info.config.max_age = 3600.0
    await bus.js.update_stream(info.config)
    again = await Bus.connect(nats_server.url)
    try:
        for name in names:
            got = await again.js.stream_info(name)
            assert got.config.storage == StorageType.FILE
        restored = await again.js.stream_info("TRAINING")
        assert restored.config.max_age == pytest.approx(30 * 24 * 3600)
    finally:
        await again.close()


async def test_publish_stores_captured_subjects_and_sends_the_rest_live(bus: Bus) -> None:
    live: asyncio.Queue[MemoryPoint] = asyncio.Queue()

    async def on_live(p: MemoryPoint) -> None:
        await live.put(p)

    await bus.subscribe("some.live.subject", MemoryPoint, on_live)
    await bus.publish("some.live.subject", point(7))
    assert (await asyncio.wait_for(live.get(), 5)).id == 7

    await bus.publish(subjects.MEMORY_POINT_CREATED, point(1), msg_id="p-1")
    await bus.publish(subjects.MEMORY_POINT_CREATED, point(1), msg_id="p-1")  # deduped
    await bus.publish(subjects.MEMORY_POINT_CREATED, point(2))
    info = await bus.js.stream_info("MEMORY")
    assert info.state.messages == 2


# --- request / reply ----------------------------------------------------------------------------


RUN_ID = "20250101_120000"


def case(i: int) -> ValidationCase:
    return ValidationCase(run_id=RUN_ID, case_id=i, model="m", prompt="p", expected="e")


async def test_a_queue_group_shares_requests(nats_server: EmbeddedNats, bus: Bus) -> None:
    served: dict[str, list[int]] = {"a": [], "b": []}

    def responder(name: str) -> Callable[[ValidationCase], Awaitable[ValidationResult]]:
        async def handle(c: ValidationCase) -> ValidationResult:
            served[name].append(c.case_id)
            return ValidationResult(
                run_id=c.run_id, case_id=c.case_id, model=c.model, score=1.0, validator=name
            )

        return handle

    other = await Bus.connect(nats_server.url, name="validator-b")
    try:
        q = "validators"
        await bus.reply(subjects.VALIDATION_CASE, ValidationCase, responder("a"), queue=q)
        await other.reply(subjects.VALIDATION_CASE, ValidationCase, responder("b"), queue=q)
        await other.nc.flush()
        results = await asyncio.gather(
            *(
                bus.request(subjects.VALIDATION_CASE, case(i), ValidationResult, timeout=5)
                for i in range(40)
            )
        )
    finally:
        await other.close()
    assert [r.case_id for r in results] == list(range(40))
    assert sorted(served["a"] + served["b"]) == list(range(40))  # each case answered once
    assert served["a"] and served["b"]
    assert {r.validator for r in results} == {"a", "b"}


async def test_request_without_responders_fails_at_once(bus: Bus) -> None:
    with pytest.raises(NoRespondersError, match=subjects.VALIDATION_CASE):
        await bus.request(subjects.VALIDATION_CASE, case(1), ValidationResult, timeout=30)


async def test_request_errors_are_distinct(bus: Bus) -> None:
    async def broken(c: ValidationCase) -> ValidationResult:
        if c.case_id == 1:
            raise RuntimeError("model not loaded")
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    await bus.reply(subjects.VALIDATION_CASE, ValidationCase, broken)
    with pytest.raises(RemoteError, match="model not loaded"):
        await bus.request(subjects.VALIDATION_CASE, case(1), ValidationResult, timeout=5)
    with pytest.raises(RemoteError, match=r"decode: .*`run_id`") as info:
        await bus.request(subjects.VALIDATION_CASE, point(1), ValidationResult, timeout=5)
    assert info.value.code == "400"
    with pytest.raises(RequestTimeoutError):
        await bus.request(subjects.VALIDATION_CASE, case(2), ValidationResult, timeout=0.3)


async def test_a_refusing_responder_answers_403_with_its_reason(bus: Bus) -> None:
    async def refuse(c: ValidationCase) -> ValidationResult:
        raise Rejected(f"run {c.run_id} is not in progress")

    await bus.reply(subjects.VALIDATION_CASE, ValidationCase, refuse)
    with pytest.raises(RemoteError, match=f"refused: run {RUN_ID} is not in progress") as info:
        await bus.request(subjects.VALIDATION_CASE, case(1), ValidationResult, timeout=5)
    assert info.value.code == "403"


# --- key-value records --------------------------------------------------------------------------

BUCKET = subjects.BucketSpec("test-records", max_age_s=3600)


async def test_records_are_stored_replaced_and_read_back(nats_server: EmbeddedNats, bus: Bus):
    assert await bus.get_record(BUCKET, "k1", Done) is None  # no bucket yet: nothing there
    first = await bus.put_record(BUCKET, "k1", Done(run_id="k1", value=1))
    second = await bus.put_record(BUCKET, "k1", Done(run_id="k1", value=2))
    assert second > first
    assert await bus.get_record(BUCKET, "k1", Done) == Done(run_id="k1", value=2)
    assert await bus.get_record(BUCKET, "k2", Done) is None
    other = await Bus.connect(nats_server.url, name="reader")  # another process sees it
    try:
        assert await other.get_record(BUCKET, "k1", Done) == Done(run_id="k1", value=2)
        with pytest.raises(BusError, match="cannot read 'k1'"):
            await other.get_record(BUCKET, "k1", Failed)  # not that type
        with pytest.raises(BusError):
            await other.get_record(BUCKET, "../k1", Done)  # not a key
    finally:
        await other.close()
    info = await bus.js.stream_info(f"KV_{BUCKET.name}")
    assert info.config.max_age == 3600 and info.config.storage == StorageType.FILE


async def test_a_bucket_lists_every_record_once_in_write_order(bus: Bus) -> None:
    assert await bus.list_records(BUCKET, Done) == {}  # no bucket yet
    await bus.put_record(BUCKET, "k1", Done(run_id="k1", value=1))
    await bus.put_record(BUCKET, "k2", Done(run_id="k2", value=2))
    await bus.put_record(BUCKET, "bad", Ask(run_id="no value"))  # not a Done: left out
    await bus.put_record(BUCKET, "k1", Done(run_id="k1", value=3))  # rewritten: moves last
    listed = await bus.list_records(BUCKET, Done)
    assert listed == {"k2": Done(run_id="k2", value=2), "k1": Done(run_id="k1", value=3)}
    assert list(listed) == ["k2", "k1"]
    kv = await bus.js.key_value(BUCKET.name)
    await kv.delete("k2")
    assert list(await bus.list_records(BUCKET, Done)) == ["k1"]


# --- publish and wait ---------------------------------------------------------------------------

ASK, DONE, FAILED = "test.ask", "test.answer.done", "test.answer.failed"


class Ask(msgspec.Struct, frozen=True):
    run_id: str


class Done(msgspec.Struct, frozen=True):
    run_id: str
    value: int


class Failed(msgspec.Struct, frozen=True):
    run_id: str
    error: str


def answers_for(run_id: str) -> list[Expect[Any]]:
    return [
        Expect(DONE, Done, lambda d: d.run_id == run_id),
        Expect(FAILED, Failed, lambda f: f.run_id == run_id),
    ]


def open_subscriptions(bus: Bus) -> int:
    return len(bus.nc._subs)


async def assert_nobody_listens(bus: Bus, *subjects_: str) -> None:
    """The server knows no interest left in any of `subjects_` (a core request there has no
    responders at once)."""
    await bus.nc.flush()
    for subject in subjects_:
        with pytest.raises(NoRespondersError):
            await bus.request(subject, Ask(run_id="probe"), Done, timeout=5)


@contextlib.asynccontextmanager
async def responder(
    url: str, subject: str, answer: Callable[[Bus, Ask], Awaitable[None]]
) -> AsyncIterator[None]:
    """Another process's bus that answers every `Ask` on `subject` the moment it arrives."""
    other = await Bus.connect(url, name="responder")
    try:

        async def on_ask(ask: Ask) -> None:
            await answer(other, ask)

        await other.subscribe(subject, Ask, on_ask)
        await other.nc.flush()
        yield
    finally:
        await other.close()


async def test_publish_and_wait_returns_the_matching_answer_and_ignores_the_rest(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    async def answer(other: Bus, ask: Ask) -> None:
        await other.publish(DONE, Done(run_id="another-run", value=1))  # match rejects it
        await other.publish(DONE, Failed(run_id=ask.run_id, error="x"))  # not a Done
        await other.publish(DONE, Done(run_id=ask.run_id, value=3))

    before = open_subscriptions(bus)
    async with responder(nats_server.url, ASK, answer):
        got = await bus.publish_and_wait(
            ASK, Ask(run_id="r1"), expect=answers_for("r1"), timeout=10
        )
    assert got == Done(run_id="r1", value=3)
    assert open_subscriptions(bus) == before
    await assert_nobody_listens(bus, DONE, FAILED)


@pytest.mark.parametrize("first", [DONE, FAILED])
async def test_the_first_of_two_expected_answers_wins(
    nats_server: EmbeddedNats, bus: Bus, first: str
) -> None:
    async def answer(other: Bus, ask: Ask) -> None:
        done, failed = Done(run_id=ask.run_id, value=1), Failed(run_id=ask.run_id, error="no")
        order = [(DONE, done), (FAILED, failed)]
        if first == FAILED:
            order.reverse()
        for subject, payload in order:
            await other.publish(subject, payload)
            await other.nc.flush()
            await asyncio.sleep(0.05)

    async with responder(nats_server.url, ASK, answer):
        got = await bus.publish_and_wait(
            ASK, Ask(run_id="r1"), expect=answers_for("r1"), timeout=10
        )
    assert isinstance(got, Done if first == DONE else Failed)


async def test_an_answer_sent_on_receipt_of_a_stored_publish_is_not_missed(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    # The request is a JetStream publish: the answer may come back before its PubAck does.
    stored_ask = subjects.MODEL_ROLLBACK_REQUESTED
    assert stream_for(stored_ask) is not None

    async def answer(other: Bus, ask: Ask) -> None:
        await other.publish(DONE, Done(run_id=ask.run_id, value=7))

    async with responder(nats_server.url, stored_ask, answer):
        for i in range(20):
            run_id = f"r{i}"
            got = await bus.publish_and_wait(
                stored_ask, Ask(run_id=run_id), expect=answers_for(run_id), timeout=5
            )
            assert got == Done(run_id=run_id, value=7)


async def test_publish_and_wait_times_out_and_unsubscribes(bus: Bus) -> None:
    before = open_subscriptions(bus)
    with pytest.raises(TimeoutError, match=r"test\.answer\.done, test\.answer\.failed"):
        await bus.publish_and_wait(ASK, Ask(run_id="r1"), expect=answers_for("r1"), timeout=0.3)
    assert open_subscriptions(bus) == before
    await assert_nobody_listens(bus, DONE, FAILED)


async def test_a_cancelled_publish_and_wait_unsubscribes(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    asked = asyncio.Event()

    async def answer(other: Bus, ask: Ask) -> None:
        asked.set()  # and never answers

    before = open_subscriptions(bus)
    async with responder(nats_server.url, ASK, answer):
        waiting = asyncio.create_task(
            bus.publish_and_wait(ASK, Ask(run_id="r1"), expect=answers_for("r1"), timeout=None)
        )
        await asyncio.wait_for(asked.wait(), 10)  # published: now waiting for an answer
        assert open_subscriptions(bus) == before + 2
        await asyncio.sleep(0.2)
        assert not waiting.done()  # no timeout: it would wait forever
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert open_subscriptions(bus) == before
    await assert_nobody_listens(bus, DONE, FAILED)


# --- object store -------------------------------------------------------------------------------


async def test_object_store_round_trip(bus: Bus, tmp_path: Path) -> None:
    src = tmp_path / "adapter.gguf"
    data = os.urandom(300 * 1024 + 17)  # several chunks, the last one partial
    src.write_bytes(data)
    await bus.put_object("runs/r1/adapter.gguf", src)

    dest = await bus.get_object("runs/r1/adapter.gguf", tmp_path / "out" / "adapter.gguf")
    assert dest.read_bytes() == data

    src.write_bytes(b"second version")  # the same key is replaced
    await bus.put_object("runs/r1/adapter.gguf", src)
    await bus.get_object("runs/r1/adapter.gguf", dest)
    assert dest.read_bytes() == b"second version"

    with pytest.raises(ObjectNotFoundError, match=r"missing\.bin"):
        await bus.get_object("missing.bin", tmp_path / "missing.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter.gguf"]
    assert not (tmp_path / "missing.bin").exists()
