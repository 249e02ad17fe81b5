"""MemoryAdapter: memory files and the watermark."""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.memory_adapter import (
    load_watermark,
    memory_files,
    read_memory_file,
    save_watermark,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")

CST = timezone(timedelta(hours=8))


def point_json(i: int, at: str = "2025-03-03T07:22:52+08:00", **extra: object) -> str:
    rec = {
        "id": i,
        "keywords": ["音乐"],
        "content": f"用户: 问题{i}\n助手: 回答{i}",
        "summary": "",
        "created_at": at,
        "updated_at": at,
        "vector": [0.1, 0.2],  # an extra MindX field: ignored
        **extra,
    }
    return json.dumps(rec, ensure_ascii=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- files --------------------------------------------------------------------------------------


def test_jsonl_reads_points_skips_blank_lines_and_reports_bad_ones(tmp_path: Path):
    f = write(
        tmp_path / "m.jsonl",
        "\n".join(
            [
                point_json(1),  # line 1
                "",  # 2: blank is fine
                '{"id": 2, "content": "x"',  # 3: truncated JSON
                '{"content": "no id"}',  # 4: missing field
                '{"id": "three", "content": "x"}',  # 5: wrong type
                "   ",  # 6: blank
                "[1, 2]",  # 7: not an object
                point_json(8, summary=None),  # 8: null summary is allowed
                "",
            ]
        ),
    )
    points, errors = read_memory_file(f)
    assert [p.id for p in points] == [1, 8]
    assert points[0].content == "用户: 问题1\n助手: 回答1"
    assert points[0].created_at == datetime(2025, 3, 3, 7, 22, 52, tzinfo=CST)
    assert [e.split(": ", 1)[0] for e in errors] == [f"{f}:3", f"{f}:4", f"{f}:5", f"{f}:7"]
    assert "id" in errors[1] and "str" in errors[2]


def test_jsonl_with_bom_crlf_and_invalid_utf8(tmp_path: Path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(
        b"\xef\xbb\xbf"
        + point_json(1).encode()
        + b"\r\n"
        + b'{"id": 2, "content": "\xff\xfe"}\r\n'
        + point_json(3).encode()
    )
    points, errors = read_memory_file(f)
    assert [p.id for p in points] == [1, 3]
    assert len(errors) == 1 and errors[0].startswith(f"{f}:2: ")


def test_json_array_gives_each_bad_element_its_line(tmp_path: Path):
    f = write(
        tmp_path / "export.json",
        "[\n"
        f"  {point_json(1)},\n"  # line 2
        '  {"id": 2},\n'  # line 3: no content
        "  {\n"  # line 4: a multi-line element
        '    "id": 3,\n'
        '    "content": "多行"\n'
        "  },\n"
        '  {"id": "x", "content": "y"}\n'  # line 8
        "]\n",
    )
    points, errors = read_memory_file(f)
    assert [(p.id, p.content) for p in points][1:] == [(3, "多行")]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{f}:3", f"{f}:8"]


def test_json_single_object_empty_array_and_broken_array(tmp_path: Path):
    one, errors = read_memory_file(write(tmp_path / "one.json", point_json(7)))
    assert [p.id for p in one] == [7] and errors == []
    assert read_memory_file(write(tmp_path / "empty.json", " [ ] ")) == ([], [])
    assert read_memory_file(write(tmp_path / "blank.json", "\n")) == ([], [])

    broken = write(tmp_path / "broken.json", f"[\n{point_json(1)},\n{{oops\n")
    points, errors = read_memory_file(broken)
    assert [p.id for p in points] == [1]  # what came before the damage is kept
    assert len(errors) == 1 and errors[0].startswith(f"{broken}:3: invalid JSON")

    unclosed = write(tmp_path / "unclosed.json", f"[{point_json(1)} {point_json(2)}]")
    points, errors = read_memory_file(unclosed)
    assert [p.id for p in points] == [1]
    assert len(errors) == 1 and "expected ',' or ']'" in errors[0]


def test_an_unreadable_file_is_an_error_not_a_crash(tmp_path: Path):
    points, errors = read_memory_file(tmp_path / "missing.jsonl")
    assert points == [] and len(errors) == 1 and "missing.jsonl" in errors[0]


def test_memory_files_are_the_visible_jsonl_and_json_files_in_name_order(tmp_path: Path):
    mem = tmp_path / "memory"
    write(mem / "b.jsonl", point_json(2) + "\nnot json\n")
    write(mem / "a.json", f"[{point_json(1)}]")
    write(mem / "notes.txt", point_json(99))
    write(mem / ".b.jsonl.tmp", point_json(98))
    write(mem / ".hidden.jsonl", point_json(97))
    (mem / "dir.jsonl").mkdir()
    assert memory_files(mem) == [mem / "a.json", mem / "b.jsonl"]
    assert memory_files(tmp_path / "nope") == []


@pytest.mark.parametrize(
    ("name", "count", "first_id"),
    [("kdconv.memory.jsonl", 972, 100001), ("multiwoz.memory.jsonl", 1079, 300001)],
)
def test_the_shared_data_files_load_fully(name: str, count: int, first_id: int):
    points, errors = read_memory_file(DATA / name)
    assert errors == []
    assert len(points) == count
    assert points[0].id == first_id
    assert len({p.id for p in points}) == count
    assert all(p.content and p.created_at and p.created_at.tzinfo for p in points)


# --- watermark ----------------------------------------------------------------------------------


def test_watermark_round_trip_in_the_seed_format(tmp_path: Path):
    path = tmp_path / "home" / ".mindx" / "training" / "last_training.json"
    assert load_watermark(path) is None
    t = datetime(2025, 4, 13, 21, 5, 7, 123456, tzinfo=CST)
    save_watermark(path, t)
    assert json.loads(path.read_text()) == {"last_train_time": "2025-04-13T21:05:07.123456+08:00"}
    assert load_watermark(path) == t
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    later = t + timedelta(days=1)
    save_watermark(path, later)
    assert load_watermark(path) == later
    assert [p.name for p in path.parent.iterdir()] == ["last_training.json"]


def test_watermark_reads_the_seeds_files(tmp_path: Path):
    path = tmp_path / "last_training.json"
    # the original writes Go's RFC3339Nano: nanoseconds and an offset, or Z
    path.write_text('{"last_train_time": "2025-04-13T10:00:00.123456789+08:00"}\n')
    assert load_watermark(path) == datetime(2025, 4, 13, 10, 0, 0, 123457, tzinfo=CST)
    path.write_text('{"last_train_time":"2025-04-13T02:00:00Z","other":1}')
    assert load_watermark(path) == datetime(2025, 4, 13, 2, tzinfo=UTC)


def test_a_naive_watermark_is_saved_as_local_time(tmp_path: Path):
    path = tmp_path / "w.json"
    naive = datetime(2025, 4, 13, 10, 0, 0)
    save_watermark(path, naive)
    loaded = load_watermark(path)
    assert loaded is not None and loaded.tzinfo is not None
    assert loaded == naive.astimezone()


def test_a_corrupt_watermark_counts_as_none(tmp_path: Path, caplog):
    path = tmp_path / "w.json"
    path.write_text('{"last_train_time": "yesterday"}')
    with caplog.at_level(logging.WARNING):
        assert load_watermark(path) is None
    assert "whole corpus" in caplog.text
