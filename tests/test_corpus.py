"""The SQLite corpus: idempotent upserts, watermark queries, private files, two processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import stat
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.collector import pairs_from_point
from shared.corpus import Corpus
from shared.messages import MemoryPoint

CST = timezone(timedelta(hours=8))
T0 = datetime(2025, 3, 3, 7, 0, tzinfo=CST)


def pt(pid: int, content: str, created: datetime = T0, updated: datetime | None = None):
    return MemoryPoint(
        id=pid,
        content=content,
        keywords=["k"],
        created_at=created,
        updated_at=updated or created,
    )


def upsert(corpus: Corpus, p: MemoryPoint) -> str:
    return corpus.upsert_point(p, pairs_from_point(p))


@pytest.fixture
def corpus(tmp_path: Path):
    with Corpus.open(tmp_path / "data" / "corpus.sqlite3") as c:
        yield c


def test_redelivery_changes_nothing_and_newer_version_replaces_pairs(corpus: Corpus) -> None:
    v1 = pt(7, "User: a\nAssistant: b\nUser: c\nAssistant: d")
    assert upsert(corpus, v1) == "added"
    assert upsert(corpus, v1) == "unchanged"
    older = pt(7, "User: x\nAssistant: y", updated=T0 - timedelta(hours=1))
    assert upsert(corpus, older) == "unchanged"
    assert [(p.prompt, p.completion) for p in corpus.pairs()] == [("a", "b"), ("c", "d")]

    v2 = pt(7, "User: new\nAssistant: answer", updated=T0 + timedelta(days=1))
    assert upsert(corpus, v2) == "updated"
    assert [(p.prompt, p.completion, p.turn) for p in corpus.pairs()] == [("new", "answer", 0)]
    assert upsert(corpus, v2) == "unchanged"
    assert corpus.stats() == {
        "points": 1,
        "pairs": 1,
        "pairs_since_watermark": 1,
        "points_without_pairs": 0,
    }
    assert corpus.points()[0].content == v2.content


def test_since_uses_the_later_of_created_and_updated(corpus: Corpus) -> None:
    upsert(corpus, pt(1, "User: old\nAssistant: one"))
    upsert(corpus, pt(2, "User: edited\nAssistant: two", updated=T0 + timedelta(days=3)))
    upsert(corpus, pt(3, "User: new\nAssistant: three", created=T0 + timedelta(days=2)))
    # the watermark is in UTC: same instant as T0 + 1 day in +08:00
    since = (T0 + timedelta(days=1)).astimezone(UTC)
    assert [p.point_id for p in corpus.pairs(since)] == [2, 3]
    assert [p.id for p in corpus.points(since)] == [2, 3]
    assert corpus.stats(since) == {
        "points": 3,
        "pairs": 3,
        "pairs_since_watermark": 2,
        "points_without_pairs": 0,
    }
    # strictly after: a point changed exactly at the watermark was already trained on
    assert [p.point_id for p in corpus.pairs(T0 + timedelta(days=2))] == [2]
    # a naive watermark is UTC
    assert len(corpus.pairs(datetime(2025, 3, 1))) == 3


def test_pairs_come_back_typed_in_point_and_turn_order(corpus: Corpus) -> None:
    upsert(corpus, pt(20, "User: b1\nAssistant: r1\nUser: b2\nAssistant: r2"))
    upsert(corpus, pt(10, "用户：问\n助手：答"))
    pairs = corpus.pairs()
    assert [(p.point_id, p.turn) for p in pairs] == [(10, 0), (20, 0), (20, 1)]
    assert pairs[0].prompt == "问" and pairs[0].keywords == ("k",)
    assert pairs[0].created_at == T0 and pairs[0].created_at.tzinfo is not None
    assert pairs[0].created_at.utcoffset() == timedelta(0)  # stored as UTC


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    with Corpus.open(path) as c:
        upsert(c, pt(1, "User: q\nAssistant: a"))
        files = [p for p in tmp_path.iterdir() if p.name.startswith("corpus.sqlite3")]
        assert any(p.name.endswith("-wal") for p in files)  # WAL mode
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def _write_points(path: str, start: int, n: int) -> None:
    with Corpus.open(Path(path)) as c:
        for i in range(start, start + n):
            c.upsert_point(
                pt(i, f"User: q{i}\nAssistant: a{i}"),
                pairs_from_point(pt(i, f"User: q{i}\nAssistant: a{i}")),
            )


def test_two_processes_write_while_one_reads(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    with Corpus.open(path) as reader:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_write_points, args=(str(path), k * 1000, 100)) for k in (1, 2)]
        for p in procs:
            p.start()
        seen = 0
        while any(p.is_alive() for p in procs):
            seen = max(seen, reader.stats()["pairs"])  # reads never fail during writes
        for p in procs:
            p.join()
            assert p.exitcode == 0
        assert reader.stats() == {
            "points": 200,
            "pairs": 200,
            "pairs_since_watermark": 200,
            "points_without_pairs": 0,
        }
        assert seen <= 200


def test_a_batch_gives_the_outcomes_and_state_of_one_upsert_after_another(tmp_path: Path) -> None:
    v1 = pt(1, "User: a\nAssistant: b")
    v2 = pt(1, "User: newer\nAssistant: answer", updated=T0 + timedelta(days=1))
    v0 = pt(1, "User: older\nAssistant: x", updated=T0 - timedelta(days=1))
    other = pt(2, "User: q\nAssistant: r")
    stored = pt(3, "User: kept\nAssistant: as is")
    stored_newer = pt(3, "User: edited\nAssistant: later", updated=T0 + timedelta(hours=2))
    batch = [v1, other, v1, v2, v0, stored, stored_newer, other, v2]

    with Corpus.open(tmp_path / "batch.sqlite3") as c, Corpus.open(tmp_path / "one.sqlite3") as d:
        assert upsert(c, stored) == upsert(d, stored) == "added"
        outcomes = c.upsert_points([(p, pairs_from_point(p)) for p in batch])
        assert outcomes == [upsert(d, p) for p in batch]
        assert outcomes == [
            *("added", "added", "unchanged", "updated", "unchanged"),
            *("unchanged", "updated", "unchanged", "unchanged"),
        ]
        assert c.pairs() == d.pairs()
        assert [(p.point_id, p.prompt) for p in c.pairs()] == [
            (1, "newer"),
            (2, "q"),
            (3, "edited"),
        ]
        assert [p.content for p in c.points()] == [v2.content, other.content, stored_newer.content]
        assert c.stats() == d.stats()
        assert c.stats() == {
            "points": 3,
            "pairs": 3,
            "pairs_since_watermark": 3,
            "points_without_pairs": 0,
        }
        # the same batch again (a redelivery): nothing changes
        assert c.upsert_points([(p, pairs_from_point(p)) for p in batch]) == ["unchanged"] * 9
        assert c.pairs() == d.pairs()
        assert c.upsert_points([]) == []


def test_a_failing_batch_stores_nothing(corpus: Corpus) -> None:
    good = pt(1, "User: a\nAssistant: b")
    broken = pt(2, "User: c\nAssistant: d")
    twice = pairs_from_point(broken) * 2  # the same (point, turn) twice breaks the primary key
    with pytest.raises(sqlite3.IntegrityError):
        corpus.upsert_points([(good, pairs_from_point(good)), (broken, twice)])
    assert corpus.stats()["points"] == 0
    assert upsert(corpus, good) == "added"  # the corpus is usable afterwards


def test_large_writes_are_checkpointed_into_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    text = "x" * 2000
    with Corpus.open(path) as c:
        for start in range(0, 3000, 100):  # ~12 MB through the WAL
            c.upsert_points(
                [
                    (p, pairs_from_point(p))
                    for p in (
                        pt(i, f"User: {i}\nAssistant: {text}") for i in range(start, start + 100)
                    )
                ]
            )
        # the background checkpointer copies the WAL into the main file while we keep the
        # corpus open (SQLite's own automatic checkpoint is off)
        for _ in range(200):
            if path.stat().st_size > 4_000_000:
                break
            time.sleep(0.05)
        assert path.stat().st_size > 4_000_000
        assert c.stats()["pairs"] == 3000
    with Corpus.open(path) as again:
        assert again.stats()["pairs"] == 3000


def test_one_file_has_one_owner_per_process(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    first = Corpus.open(path)
    second = Corpus.open(tmp_path / "." / "corpus.sqlite3")  # another spelling, the same file
    assert first._store is second._store
    upsert(first, pt(1, "User: q\nAssistant: a"))
    second.close()
    second.close()  # idempotent, and the file stays open for the other user
    assert first.stats()["points"] == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        second.stats()
    first.close()
    with Corpus.open(path) as again:  # a fresh owner once the last user is gone
        assert again._store is not first._store
        assert again.stats()["points"] == 1


def _open_and_close(path: str) -> None:
    with Corpus.open(Path(path)) as c:
        c.stats()


def _count_points(path: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with Corpus.open(Path(path)) as c:
        out.put(c.stats()["points"])


def test_a_second_user_in_a_process_keeps_the_wal_alive_for_other_processes(
    tmp_path: Path,
) -> None:
    """`serve all`: two corpus users in one process; then `corpus stats` opens and closes it.

    Had the second open touched the file outside SQLite, the process would have lost its
    locks, the other process's close would have deleted the live WAL, and every later commit
    would have gone into a deleted file: invisible to others and lost in a crash.
    """
    path = tmp_path / "corpus.sqlite3"
    ctx = multiprocessing.get_context("spawn")
    with Corpus.open(path) as collector, Corpus.open(path) as trainer:
        upsert(collector, pt(1, "User: q1\nAssistant: a1"))
        assert trainer.stats()["points"] == 1
        stats = ctx.Process(target=_open_and_close, args=(str(path),))
        stats.start()
        stats.join()
        assert stats.exitcode == 0
        for i in range(2, 101):
            upsert(collector, pt(i, f"User: q{i}\nAssistant: a{i}"))
        out = ctx.Queue()
        reader = ctx.Process(target=_count_points, args=(str(path), out))
        reader.start()
        assert out.get(timeout=60) == 100  # another process sees every commit
        reader.join()
        assert Path(f"{path}-wal").exists()  # the WAL it writes is the live one


# --- arrival: when the collector stored a point's version -----------------------------------------


def test_arrival_is_when_a_version_was_stored_not_the_points_own_time(corpus: Corpus) -> None:
    upsert(corpus, pt(1, "User: a\nAssistant: b"))
    first = corpus.snapshot()
    # a point from long ago, stored now: it arrived after everything read before
    old = pt(2, "User: c\nAssistant: d", created=datetime(2001, 1, 1, tzinfo=UTC))
    upsert(corpus, old)
    upsert(corpus, old)  # a redelivery arrives nothing
    snap = corpus.snapshot()
    assert first.until is not None and snap.arrived[2] > first.until >= snap.arrived[1]
    assert snap.until == snap.arrived[2]
    assert [p.point_id for p in snap.pairs] == [1, 2]
    assert snap.versions[2] == "2001-01-01T00:00:00.000000+00:00"
    # a newer version of point 1 arrives again, after point 2
    upsert(corpus, pt(1, "User: a2\nAssistant: b2", updated=T0 + timedelta(hours=1)))
    again = corpus.snapshot()
    assert again.arrived[1] > again.arrived[2] == snap.arrived[2]
    assert again.versions[1] > snap.versions[1]


def test_arrivals_never_repeat_or_go_back(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.corpus as module

    frozen = datetime(2030, 1, 1, tzinfo=UTC)

    class Stuck(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return frozen

    monkeypatch.setattr(module, "datetime", Stuck)
    for pid in range(1, 4):  # a clock that stands still: still strictly increasing
        upsert(corpus, pt(pid, f"User: q{pid}\nAssistant: a{pid}"))
    frozen = datetime(2029, 1, 1, tzinfo=UTC)  # set back a year
    upsert(corpus, pt(4, "User: q4\nAssistant: a4"))
    arrived = corpus.snapshot().arrived
    assert arrived[1] < arrived[2] < arrived[3] < arrived[4]


def test_an_older_corpus_gains_arrival_times(tmp_path: Path) -> None:
    path = tmp_path / "corpus.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE points (id INTEGER PRIMARY KEY, created_at TEXT, updated_at TEXT,
            changed_at TEXT NOT NULL, version TEXT NOT NULL, body BLOB NOT NULL);
        CREATE TABLE pairs (point_id INTEGER NOT NULL REFERENCES points (id) ON DELETE CASCADE,
            turn INTEGER NOT NULL, prompt TEXT NOT NULL, completion TEXT NOT NULL,
            kind TEXT NOT NULL, keywords TEXT NOT NULL, created_at TEXT,
            PRIMARY KEY (point_id, turn));
        INSERT INTO points VALUES (7, NULL, NULL, '2025-01-02T00:00:00.000000+00:00',
            '2025-01-02T00:00:00.000000+00:00', '{"id":7,"content":"x"}');
        INSERT INTO pairs VALUES (7, 0, 'q', 'a', 'dialogue', '[]', NULL);
        """
    )
    conn.close()
    with Corpus.open(path) as c:
        snap = c.snapshot()
        assert snap.arrived == {7: datetime(2025, 1, 2, tzinfo=UTC)}
        assert [(p.point_id, p.prompt) for p in snap.pairs] == [(7, "q")]
        upsert(c, pt(8, "User: new\nAssistant: point"))
        assert c.snapshot().arrived[8] > snap.arrived[7]
    with Corpus.open(path) as c:  # opening again migrates nothing twice
        assert len(c.snapshot().arrived) == 2
