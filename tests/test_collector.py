"""Pair extraction (pure) on hand-made and real memory points, and the collector on a real bus."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.collector import (
    on_memory_point,
    on_memory_points,
    pairs_from_point,
    serve,
    split_turns,
)
from shared.bus import Bus
from shared.corpus import Corpus
from shared.messages import MemoryPoint
from shared.settings import Settings
from shared.subjects import COLLECTOR, MEMORY_POINT_CREATED

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data
T0 = datetime(2025, 3, 3, 7, 22, 52, tzinfo=UTC)


def point(content: str, **kw: Any) -> MemoryPoint:
    kw.setdefault("id", 1)
    kw.setdefault("created_at", T0)
    return MemoryPoint(content=content, **kw)


def load(name: str) -> list[tuple[dict[str, Any], MemoryPoint]]:
    out = []
    for line in (DATA / f"{name}.memory.jsonl").read_text(encoding="utf-8").splitlines():
        out.append((json.loads(line), msgspec.json.decode(line, type=MemoryPoint)))
    return out


# --- hand-made points ---------------------------------------------------------------------------


def test_every_pair_of_a_multi_turn_point_in_order() -> None:
    p = point(
        "User: hi there\nAssistant: hello, how can I help?\nUser: a taxi\nAssistant: where to?"
    )
    pairs = pairs_from_point(p)
    assert [(x.prompt, x.completion, x.turn) for x in pairs] == [
        ("hi there", "hello, how can I help?", 0),
        ("a taxi", "where to?", 1),
    ]
    assert all(x.kind == "dialogue" and x.point_id == 1 for x in pairs)


@pytest.mark.parametrize(
    "content",
    [
        "用户: 你听过吗？\n助手: 听过。",
        "用户：你听过吗？\n助手：听过。",  # full-width colons
        "User: 你听过吗？\nAssistant: 听过。",  # English prefixes on Chinese text
        "user : 你听过吗？\nASSISTANT:听过。",  # case, space before colon, none after
        "   用户 ： 你听过吗？\n\n\n\t助手: 听过。\n",  # indentation, blank lines, trailing newline
        "用户: 你听过吗？\r\n助手: 听过。",  # CRLF
    ],
)
def test_prefix_styles(content: str) -> None:
    pairs = pairs_from_point(point(content))
    assert [(x.prompt, x.completion) for x in pairs] == [("你听过吗？", "听过。")]


def test_chinese_prefixes_on_english_text() -> None:
    pairs = pairs_from_point(point("用户: I need a train .\n助手: Where from ?"))
    assert [(x.prompt, x.completion) for x in pairs] == [("I need a train .", "Where from ?")]


def test_multi_line_reply_and_blank_lines_inside() -> None:
    content = (
        "User: book it please\n"
        "Assistant: Booking was successful .\n"
        " Reference number is : H58I0WC3 .\n"
        "\n"
        "Anything else ?\n"
        "\n"
        "User: no\n"
    )
    pairs = pairs_from_point(point(content))
    assert len(pairs) == 1
    assert pairs[0].completion == (
        "Booking was successful .\n Reference number is : H58I0WC3 .\n\nAnything else ?"
    )


def test_consecutive_turns_merge_and_dangling_user_turn_makes_no_pair() -> None:
    content = "User: first\nUser: second\nAssistant: a\nAssistant: b\nUser: left without reply"
    pairs = pairs_from_point(point(content))
    assert [(x.prompt, x.completion) for x in pairs] == [("first\nsecond", "a\nb")]


def test_reply_without_question_and_text_before_first_turn_are_ignored() -> None:
    content = "some preface\nAssistant: orphan reply\nUser: q\nAssistant: a"
    assert [(x.prompt, x.completion) for x in pairs_from_point(point(content))] == [("q", "a")]


def test_role_word_inside_a_line_is_not_a_turn() -> None:
    turns = split_turns("User: what does the user: field mean?\nAssistant: the user name")
    assert turns == [("user", "what does the user: field mean?"), ("assistant", "the user name")]


def test_note_uses_summary_then_keywords_then_nothing() -> None:
    text = "雍和宫是北京市内最大的藏传佛教寺院。"
    with_summary = pairs_from_point(point(text, summary="旅游话题：雍和宫", keywords=["雍和宫"]))
    assert [(x.prompt, x.completion, x.kind) for x in with_summary] == [
        ("旅游话题：雍和宫", text, "note")
    ]
    by_keywords = pairs_from_point(point(text, summary="", keywords=["雍和宫", "旅游"]))
    assert by_keywords[0].prompt == "雍和宫, 旅游"
    assert pairs_from_point(point(text, summary="", keywords=[])) == []
    assert pairs_from_point(point("   ", summary="s")) == []


def test_keywords_and_created_at_come_from_the_point() -> None:
    later = datetime(2025, 3, 5, tzinfo=UTC)
    p = point("User: q\nAssistant: a", keywords=["k1", "k2"], updated_at=later)
    (pair,) = pairs_from_point(p)
    assert pair.keywords == ("k1", "k2") and pair.created_at == T0
    (pair,) = pairs_from_point(point("User: q\nAssistant: a", created_at=None, updated_at=later))
    assert pair.created_at == later


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kdconv", "multiwoz"])
def test_real_points_yield_every_exchange(name: str) -> None:
    """Each dialogue/exchange window starts on a user turn: turn_span // 2 pairs, every style."""
    per_style: Counter[str] = Counter()
    pairs_per_style: Counter[str] = Counter()
    for raw, p in load(name):
        meta = raw["meta"]
        pairs = pairs_from_point(p)
        if meta["variant"] == "note":
            expected = 1 if (raw["summary"] or raw["keywords"]) else 0
            assert len(pairs) == expected, raw["id"]
            assert all(x.kind == "note" and x.completion == p.content.strip() for x in pairs)
            continue
        lo, hi = meta["turn_span"]
        assert len(pairs) == (hi - lo) // 2, raw["id"]
        assert [x.turn for x in pairs] == list(range(len(pairs)))
        for x in pairs:  # no prefix leaks into the text
            for text in (x.prompt, x.completion):
                assert not text.startswith(("User", "Assistant", "用户", "助手"))
                assert "用户：" not in text and "助手：" not in text
        per_style[meta["prefix_style"]] += 1
        pairs_per_style[meta["prefix_style"]] += len(pairs)
    styles = {"kdconv": {"zh", "zh_fullwidth", "en"}, "multiwoz": {"en", "zh"}}[name]
    assert set(per_style) == styles
    assert all(pairs_per_style[s] >= per_style[s] for s in styles)  # ≥ 1 pair per point


def test_multi_line_replies_in_real_data_stay_whole() -> None:
    by_id = {raw["id"]: p for raw, p in load("multiwoz")}
    pairs = pairs_from_point(by_id[300008])
    assert pairs[-1].completion.endswith("Contact number \t : \t 07702911912")
    assert "\n" in pairs[-1].completion


def test_reformatted_duplicates_give_the_same_pairs() -> None:
    points = load("kdconv") + load("multiwoz")
    by_id = {raw["id"]: p for raw, p in points}
    checked = 0
    for raw, p in points:
        if raw["meta"]["duplicate_kind"] == "reformatted":
            original = by_id[raw["meta"]["duplicate_of"]]
            got = [(x.prompt, x.completion) for x in pairs_from_point(p)]
            assert got == [(x.prompt, x.completion) for x in pairs_from_point(original)]
            checked += 1
    assert checked >= 30


# --- handler and bus ----------------------------------------------------------------------------


async def test_handler_is_idempotent(tmp_path: Path) -> None:
    (_, p), *_ = load("kdconv")
    with Corpus.open(tmp_path / "corpus.sqlite3") as corpus:
        assert await on_memory_point(p, None, corpus) == "added"
        assert await on_memory_point(p, None, corpus) == "unchanged"
        assert corpus.stats()["pairs"] == len(pairs_from_point(p))


async def test_collector_consumes_real_points_over_nats(bus: Any, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    lines = (DATA / "kdconv.memory.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    counts = [len(pairs_from_point(msgspec.json.decode(x, type=MemoryPoint))) for x in lines]
    expected = sum(counts)
    service = await serve(bus, settings)
    try:
        for line in lines:  # raw producer JSON, extra MindX fields (`meta`) included
            await bus.publish_raw(MEMORY_POINT_CREATED, line.encode())
        for line in lines[:5]:  # redelivered by the producer under new message ids
            await bus.publish_raw(MEMORY_POINT_CREATED, line.encode())
        await bus.wait_idle(COLLECTOR, timeout=30)
    finally:
        await service.stop()
    path = settings.data_path / "corpus.sqlite3"
    assert path.stat().st_mode & 0o777 == 0o600
    with Corpus.open(path) as corpus:
        assert corpus.stats() == {
            "points": 40,
            "pairs": expected,
            "pairs_since_watermark": expected,
            "points_without_pairs": counts.count(0),
        }


def test_role_word_look_alikes_do_not_crash() -> None:
    # case-insensitive matching admits "ſ" (long s) for "s"; such a point used to raise
    assert split_turns("uſer: hi\nassistant: hello") == [("user", "hi"), ("assistant", "hello")]


async def test_batch_handler_reports_each_point_in_order(tmp_path: Path) -> None:
    points = [p for _, p in load("kdconv")[:3]]
    with Corpus.open(tmp_path / "corpus.sqlite3") as corpus:
        batch = [(points[0], None), (points[1], None), (points[0], None)]
        assert await on_memory_points(batch, corpus) == ["added", "added", "unchanged"]
        assert await on_memory_points([(p, None) for p in points], corpus) == [
            "unchanged",
            "unchanged",
            "added",
        ]
        assert corpus.stats()["pairs"] == sum(len(pairs_from_point(p)) for p in points)


async def test_a_stored_batch_delivered_again_changes_nothing(
    nats_server: Any, bus: Any, tmp_path: Path
) -> None:
    """The collector dies after storing a batch but before its acks reach the server."""
    lines = (DATA / "kdconv.memory.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    spec = dataclasses.replace(COLLECTOR, ack_wait_s=1.0)
    first: list[tuple[int, str]] = []
    stored = asyncio.Event()
    with Corpus.open(tmp_path / "corpus.sqlite3") as corpus:

        async def store_then_die(batch: list[tuple[MemoryPoint, Any]]) -> None:
            outcomes = await on_memory_points(batch, corpus)
            first.extend((p.id, r) for (p, _), r in zip(batch, outcomes, strict=True))
            stored.set()
            await asyncio.Event().wait()  # never returns: no ack

        for line in lines:
            await bus.publish_raw(MEMORY_POINT_CREATED, line.encode())
        doomed = await Bus.connect(nats_server.url, name="doomed")
        await doomed.serve_batch(spec, MemoryPoint, store_then_die, grace=0.1)
        await asyncio.wait_for(stored.wait(), 10)
        await doomed.nc.close()  # a crash: the stored batch was never acked
        assert first and all(r == "added" for _, r in first)
        before = (corpus.stats()["points"], corpus.pairs())
        assert before[0] == len(first)

        again: dict[int, tuple[str, int]] = {}

        async def handler(batch: list[tuple[MemoryPoint, Any]]) -> None:
            results = await on_memory_points(batch, corpus)
            for (p, d), r in zip(batch, results, strict=True):
                again[p.id] = (r, d.num_delivered)

        await bus.serve_batch(spec, MemoryPoint, handler)
        await bus.wait_idle(spec, timeout=15)
        assert len(again) == len(lines)  # the rest of the stream is stored now
        assert [again[pid] for pid, _ in first] == [("unchanged", 2)] * len(first)
        stored_first = {pid for pid, _ in first}
        assert [p for p in corpus.pairs() if p.point_id in stored_first] == before[1]
        await doomed.close()


async def test_points_without_pairs_are_counted_and_logged_once(
    bus: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    points = [
        point("User: hi\nAssistant: hello", id=1),
        point("a note with nothing to ask it by", id=2),  # no summary, no keywords
        point("User: a question nobody answered", id=3),
        point("Assistant: a reply to nothing", id=4),
        point("a note", id=5, keywords=["topic"]),
    ]
    service = await serve(bus, settings)
    try:
        with caplog.at_level("WARNING", logger="services.collector"):
            for _ in range(3):  # the producer sends each point three times, new message ids
                for p in points:
                    await bus.publish(MEMORY_POINT_CREATED, p)
                await bus.wait_idle(COLLECTOR, timeout=30)
    finally:
        await service.stop()
    with Corpus.open(settings.corpus_path) as corpus:
        stats = corpus.stats()
    assert stats["points"] == 5 and stats["pairs"] == 2
    assert stats["points_without_pairs"] == 3
    logged = [r.getMessage() for r in caplog.records if "yields no pair" in r.getMessage()]
    assert sorted(m.split(" yields")[0] for m in logged) == ["point 2", "point 3", "point 4"]
    assert "summary or keywords" in next(m for m in logged if m.startswith("point 2"))
    assert "'Assistant:'" in next(m for m in logged if m.startswith("point 3"))
