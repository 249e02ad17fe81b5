"""Forgetting's pure decisions (services.forgetting) and the corpus's secure delete."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from services import forgetting
from services.collector import pairs_from_point
from shared.backend import ChatMessage
from shared.corpus import Corpus
from shared.messages import (
    CaseResult,
    DeadLetter,
    MemoryPoint,
    ModelLineage,
    PointVersion,
    RunReport,
)
from shared.modelfile import render_modelfile

T0 = datetime(2025, 3, 3, 7, 0, tzinfo=UTC)
SECRET = "My sister Ingrid lives at 12 Quarry Lane, Ély"


def pt(pid: int, content: str, at: datetime = T0, summary: str = "") -> MemoryPoint:
    return MemoryPoint(id=pid, content=content, summary=summary, created_at=at, updated_at=at)


COMPLETION = f'{SECRET} "the old house"'
VICTIM = pt(7, f"User: where does my sister live?\nAssistant: {COMPLETION}")


def found() -> list[bytes]:
    return forgetting.needles(forgetting.point_texts([VICTIM], pairs_from_point(VICTIM)))


# --- needles ------------------------------------------------------------------------------------


def test_the_needles_find_the_text_in_every_encoding_the_project_writes() -> None:
    needles = found()
    completion = pairs_from_point(VICTIM)[0].completion
    assert forgetting.holds(completion.encode(), needles)
    # JSON (a dataset line, a report, a bus payload), ASCII-escaped JSON, a dead letter's data
    payload = msgspec.json.encode(VICTIM)
    assert forgetting.holds(payload, needles)
    assert forgetting.holds(json.dumps({"c": completion}).encode(), needles)
    letter = DeadLetter(subject="memory.point.created", error="x", data=payload.decode())
    assert forgetting.holds(msgspec.json.encode(letter), needles)
    # an HTML page and a Modelfile
    page = "<td>" + html.escape(completion) + "</td>"
    assert forgetting.holds(page.encode(), needles)
    example = ChatMessage(role="assistant", content=completion)
    modelfile = render_modelfile("qwen3:0.6b", None, [example], {})
    assert forgetting.holds(modelfile.encode(), needles)
    # and not what does not hold it
    assert not forgetting.holds(b'{"content": "where does my brother live?"}', needles)


def test_short_texts_are_no_needles() -> None:
    point = pt(1, "User: hi\nAssistant: thanks!")
    assert forgetting.point_texts([point], pairs_from_point(point)) == [point.content]


# --- scrubbing ----------------------------------------------------------------------------------


def test_a_dataset_loses_only_the_records_that_hold_the_point() -> None:
    keep = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(3)]
    gone = json.dumps({"messages": [{"role": "assistant", "content": COMPLETION}]})
    data = "\n".join([keep[0], gone, keep[1], keep[2]]).encode() + b"\n"
    out = forgetting.scrub_jsonl(data, found())
    assert out == ("\n".join(keep) + "\n").encode()


def test_a_report_loses_only_the_cases_that_hold_the_point() -> None:
    cases = [
        CaseResult(case_id=0, prompt="where is the station?", expected="north"),
        CaseResult(case_id=1, prompt="where does my sister live?", expected=COMPLETION),
        CaseResult(case_id=2, prompt="x", expected="y", new_answer=f"I think {COMPLETION}"),
    ]
    report = RunReport(run_id="20261129_000000", cases=cases, held_out_cases=3)
    out = forgetting.scrub_report(report, found())
    assert [c.case_id for c in out.cases] == [0]
    assert out.held_out_cases == 3 and out.run_id == report.run_id


def test_what_happens_to_each_kind_of_file() -> None:
    needles, held, clean = found(), COMPLETION.encode(), b"nothing here"
    assert forgetting.file_action("train_data_1.jsonl", held, needles) == "rewrite_jsonl"
    assert forgetting.file_action("report_1.json", held, needles) == "rewrite_report"
    assert forgetting.file_action("Modelfile_1", held, needles) == "delete"
    assert forgetting.file_action("report_1.html", held, needles) == "delete"
    assert forgetting.file_action("adapter.gguf", held, needles) == "delete"
    assert forgetting.file_action("Modelfile_1", clean, needles) == "keep"


# --- the plan -----------------------------------------------------------------------------------


def lin(run: str, ids: list[int], status: str = "promoted", age: int = 0) -> ModelLineage:
    at = T0 + timedelta(hours=age)
    return ModelLineage(
        run_id=run,
        model=f"mindx-qwen3-0.6b:{run.replace('_', '-')}",
        base_model="qwen3:0.6b",
        mode="message",
        points=[PointVersion(i, "v") for i in ids],
        status=status,  # type: ignore[arg-type]
        created_at=at,
        promoted_at=at if status in ("promoted", "retired") else None,
    )


def test_the_live_model_holding_the_point_gives_way_to_the_newest_promoted_without_it() -> None:
    old = lin("20261101_000000", [1, 2], age=0)
    middle = lin("20261102_000000", [2, 3], age=1)
    newer = lin("20261103_000000", [7, 3], age=2)  # holds it: not a replacement
    live = lin("20261104_000000", [7, 1], age=3)
    rejected = lin("20261105_000000", [7], status="rejected", age=4)
    everything = [old, middle, newer, live, rejected]
    available = [old.model, middle.model, newer.model, live.model]
    plan = forgetting.plan(7, everything, live=live.model, available=available)
    assert [x.run_id for x in plan.retire] == [newer.run_id, live.run_id, rejected.run_id]
    assert plan.live_retired
    assert (plan.switch_to, plan.switch_run) == (middle.model, middle.run_id)
    # a replacement the backend no longer has is skipped; with none left: the base
    plan = forgetting.plan(7, everything, live=live.model, available=[old.model, live.model])
    assert plan.switch_to == old.model
    plan = forgetting.plan(7, everything, live=live.model, available=[live.model])
    assert (plan.switch_to, plan.switch_run) == ("qwen3:0.6b", None)
    assert plan.retrain
    # after a crash between the switch and the end: the base is live, the newest promoted model
    # still says promoted and holds the point: the retrain is still asked for
    again = forgetting.plan(7, everything, live="qwen3:0.6b", available=[live.model])
    assert not again.live_retired and again.retrain
    assert not forgetting.plan(2, everything, live=live.model, available=[]).retrain


def test_a_point_the_live_model_does_not_hold_switches_nothing() -> None:
    live = lin("20261104_000000", [1])
    other = lin("20261103_000000", [7], age=-1)
    plan = forgetting.plan(7, [other, live], live=live.model, available=[live.model])
    assert plan.retire == [other] and not plan.live_retired and plan.switch_to is None
    assert forgetting.plan(8, [other, live], live=live.model, available=[]).retire == []


def test_a_model_counts_as_still_holding_the_point_until_retired_and_gone() -> None:
    record = lin("20261101_000000", [7])
    plan = forgetting.plan(7, [record], live=None, available=[])
    assert forgetting.still_held(plan, [])  # promoted: not retired yet
    gone = msgspec.structs.replace(record, status="retired")
    plan = forgetting.plan(7, [gone], live=None, available=[])
    assert not forgetting.still_held(plan, [])
    assert forgetting.still_held(plan, [gone.model])  # marked, but the backend has it


# --- the corpus ---------------------------------------------------------------------------------


def corpus_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_a_forgotten_point_leaves_no_byte_in_the_corpus_files(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    with Corpus.open(path) as corpus:
        others = [pt(i, f"User: question {i}\nAssistant: answer {i}") for i in range(100, 150)]
        older = pt(7, "User: where does my sister live?\nAssistant: in Lyon, I think", T0)
        for p in [*others, older]:
            corpus.upsert_point(p, pairs_from_point(p))
        assert b"in Lyon, I think" in corpus_bytes(path)  # the scan can fail
        # a newer version replaces the old one: its bytes must not stay in free space either
        newer = msgspec.structs.replace(VICTIM, updated_at=T0 + timedelta(hours=1))
        assert corpus.upsert_point(newer, pairs_from_point(newer)) == "updated"
        # the scan can fail: the text is in the files now (the WAL at least)
        assert SECRET.encode() in corpus_bytes(path)
        assert corpus.forget(7, T0 + timedelta(days=1))
        assert corpus.stats()["points"] == 50
        assert SECRET.encode() not in corpus_bytes(path)
        assert b"in Lyon, I think" not in corpus_bytes(path)
        assert corpus.point_with_pairs(7) == (None, [])
        assert corpus.point_with_pairs(103)[0] == others[3]
        assert not corpus.forget(7, T0 + timedelta(days=1))  # again: nothing held it


def test_a_tombstone_keeps_late_copies_out_and_lets_a_newer_version_in(tmp_path: Path) -> None:
    deleted_at = T0 + timedelta(days=1)
    with Corpus.open(tmp_path / "corpus.sqlite3") as corpus:
        corpus.upsert_point(VICTIM, pairs_from_point(VICTIM))
        corpus.forget(7, deleted_at)
        assert corpus.forgotten(7)
        late = pt(7, "User: a\nAssistant: an edit made before the deletion", deleted_at)
        assert corpus.upsert_points([(VICTIM, pairs_from_point(VICTIM)), (late, [])]) == [
            "forgotten",
            "forgotten",
        ]
        assert corpus.stats()["points"] == 0
        again = pt(7, "User: a new point\nAssistant: with the old id", deleted_at + timedelta(1))
        assert corpus.upsert_point(again, pairs_from_point(again)) == "added"
        assert corpus.point_with_pairs(7)[0] == again and not corpus.forgotten(7)
        assert not corpus.forgotten(8)  # nothing was forgotten there


def test_texts_another_point_holds_too_are_not_the_points_own(tmp_path: Path) -> None:
    common = "Is there anything else I can help you with today?"
    mine = pt(7, f"User: book it\nAssistant: {common}", summary="Cambridge trip planning")
    theirs = pt(8, f"User: thanks\nAssistant: {common}", summary="Cambridge trip planning")
    with Corpus.open(tmp_path / "corpus.sqlite3") as corpus:
        for p in (mine, theirs):
            corpus.upsert_point(p, pairs_from_point(p))
        texts = forgetting.point_texts([mine], pairs_from_point(mine))
        shared = corpus.held_elsewhere(texts, 7)
    assert shared == {common, "Cambridge trip planning"}
