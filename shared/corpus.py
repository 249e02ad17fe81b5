"""The corpus: memory points and their pairs, in one SQLite file (`<data-dir>/corpus.sqlite3`).

Why SQLite: the collector writes and the trainer reads, possibly from different processes; WAL
mode lets readers run during a write, and every point's replacement is one transaction, so a
crash never leaves a point with half its pairs. The file holds personal conversations: it (and
its `-wal`/`-shm` companions, which SQLite creates with the database file's mode) is 0600.

Times are stored as UTC ISO-8601 text of fixed width, so text order is time order.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from shared.files import PRIVATE_DIR, PRIVATE_FILE
from shared.messages import MemoryPoint, Pair

Upsert = Literal["added", "updated", "unchanged"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id          INTEGER PRIMARY KEY,
    created_at  TEXT,
    updated_at  TEXT,
    changed_at  TEXT NOT NULL,   -- max(created_at, updated_at): what `since` compares
    version     TEXT NOT NULL,   -- updated_at, else created_at: what decides a replacement
    body        BLOB NOT NULL    -- the point as JSON
);
CREATE INDEX IF NOT EXISTS points_changed_at ON points (changed_at);
CREATE TABLE IF NOT EXISTS pairs (
    point_id    INTEGER NOT NULL REFERENCES points (id) ON DELETE CASCADE,
    turn        INTEGER NOT NULL,
    prompt      TEXT NOT NULL,
    completion  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    keywords    TEXT NOT NULL,   -- JSON list
    created_at  TEXT,
    PRIMARY KEY (point_id, turn)
);
"""

_NEVER = "0000-00-00T00:00:00.000000+00:00"  # sorts before every real time


def to_utc(at: datetime) -> datetime:
    """Timezone-aware UTC; a naive time is taken to be UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return to_utc(at).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class Corpus:
    """Thread-safe handle on the corpus file; use as a context manager or call `close()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()
        self._point_decoder = msgspec.json.Decoder(MemoryPoint)

    @classmethod
    def open(cls, path: Path) -> Corpus:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        # Create the file ourselves so it is 0600 from its first byte (SQLite would honour umask).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        os.close(fd)
        os.chmod(path, PRIVATE_FILE)
        conn = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )  # autocommit; transactions are explicit
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed point survives a crash of this process (the case that
            # matters for ack-after-store); only an OS crash can lose the last commits, and
            # FULL would cost an fsync per point (4x slower ingest).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writes ---------------------------------------------------------------------------------
    def upsert_point(self, point: MemoryPoint, pairs: list[Pair]) -> Upsert:
        """Store `point` and its pairs, idempotently.

        Unknown id: added. Known id with a newer `updated_at` (else `created_at`): its pairs are
        replaced, in one transaction. Same or older version (a redelivery): nothing changes.
        """
        created = _iso(point.created_at)
        updated = _iso(point.updated_at)
        version = updated or created or _NEVER
        changed = max(created or _NEVER, updated or _NEVER)
        body = msgspec.json.encode(point)
        rows = [
            (
                point.id,
                p.turn,
                p.prompt,
                p.completion,
                p.kind,
                msgspec.json.encode(list(p.keywords)).decode(),
                _iso(p.created_at),
            )
            for p in pairs
        ]
        with self._lock:
            conn = self._conn
            # IMMEDIATE takes the write lock before the read, so two collectors cannot both
            # decide "added" for the same point.
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT version FROM points WHERE id = ?", (point.id,)
                ).fetchone()
                if row is not None and version <= row[0]:
                    conn.execute("ROLLBACK")
                    return "unchanged"
                if row is not None:
                    conn.execute("DELETE FROM pairs WHERE point_id = ?", (point.id,))
                conn.execute(
                    "INSERT OR REPLACE INTO points"
                    " (id, created_at, updated_at, changed_at, version, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (point.id, created, updated, changed, version, body),
                )
                conn.executemany(
                    "INSERT INTO pairs"
                    " (point_id, turn, prompt, completion, kind, keywords, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return "added" if row is None else "updated"

    # --- reads ----------------------------------------------------------------------------------
    def _since_clause(self, since: datetime | None) -> tuple[str, tuple[Any, ...]]:
        if since is None:
            return "", ()
        return " WHERE p.changed_at > ?", (_iso(since),)

    def pairs(self, since: datetime | None = None) -> list[Pair]:
        """Pairs of the points changed after `since` (all when None), by point id and turn."""
        where, args = self._since_clause(since)
        sql = (
            "SELECT q.point_id, q.turn, q.prompt, q.completion, q.kind, q.keywords, q.created_at"
            " FROM pairs q JOIN points p ON p.id = q.point_id"
            + where
            + " ORDER BY q.point_id, q.turn"
        )
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [
            Pair(
                prompt=prompt,
                completion=completion,
                point_id=point_id,
                turn=turn,
                kind=kind,
                keywords=tuple(msgspec.json.decode(keywords)),
                created_at=_parse(created_at),
            )
            for point_id, turn, prompt, completion, kind, keywords, created_at in rows
        ]

    def points(self, since: datetime | None = None) -> list[MemoryPoint]:
        """The stored points changed after `since` (all when None), by id."""
        where, args = self._since_clause(since)
        with self._lock:
            rows = self._conn.execute(
                "SELECT p.body FROM points p" + where + " ORDER BY p.id", args
            ).fetchall()
        return [self._point_decoder.decode(body) for (body,) in rows]

    def stats(self, since: datetime | None = None) -> dict[str, int]:
        """Totals `points`, `pairs`; `pairs_since_watermark`: pairs of points after `since`."""
        where, args = self._since_clause(since)
        with self._lock:
            n_points = self._conn.execute("SELECT count(*) FROM points").fetchone()[0]
            n_pairs = self._conn.execute("SELECT count(*) FROM pairs").fetchone()[0]
            n_since = self._conn.execute(
                "SELECT count(*) FROM pairs q JOIN points p ON p.id = q.point_id" + where, args
            ).fetchone()[0]
        return {"points": n_points, "pairs": n_pairs, "pairs_since_watermark": n_since}
