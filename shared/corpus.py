"""The corpus: memory points and their pairs, in one SQLite file (`<data-dir>/corpus.sqlite3`).

Why SQLite: the collector writes and the trainer reads, possibly from different processes; WAL
mode lets readers run during a write, and every point's replacement is one transaction, so a
crash never leaves a point with half its pairs. The file holds personal conversations: it (and
its `-wal`/`-shm` companions, which SQLite creates with the database file's mode) is 0600.

Nothing but SQLite ever opens the database file: on Linux, closing any descriptor of a file drops
every POSIX lock the process holds on it, SQLite's WAL locks included, and another process could
then delete the live WAL under a writer that goes on acking points. For the same reason a process
has one owner per corpus file (`Corpus.open` of a path already open shares it).

Times are stored as UTC ISO-8601 text of fixed width, so text order is time order. A point's
`arrived_at` is when the collector stored that version of it (not the point's own times): what
"new since the last model" means, so memory imported, delivered or synced late still counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from shared.files import PRIVATE_FILE, ensure_private_dir
from shared.messages import MemoryPoint, Pair

log = logging.getLogger(__name__)

# forgotten: a version up to a deletion of the point (`Corpus.forget`): never stored again
Upsert = Literal["added", "updated", "unchanged", "forgotten"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id          INTEGER PRIMARY KEY,
    created_at  TEXT,
    updated_at  TEXT,
    changed_at  TEXT NOT NULL,   -- max(created_at, updated_at): what `since` compares
    version     TEXT NOT NULL,   -- updated_at, else created_at: what decides a replacement
    body        BLOB NOT NULL,   -- the point as JSON
    arrived_at  TEXT             -- when this version was stored; strictly increasing per commit
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
CREATE TABLE IF NOT EXISTS forgotten (  -- deleted points: only the id and what was deleted
    id          INTEGER PRIMARY KEY,
    version     TEXT NOT NULL     -- a version up to this one is never stored again
);
CREATE TABLE IF NOT EXISTS withheld (  -- pairs the collector kept out, counted, never their text
    point_id    INTEGER NOT NULL REFERENCES points (id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    pairs       INTEGER NOT NULL,
    PRIMARY KEY (point_id, reason)
);
"""

_KEYWORDS = msgspec.json.Encoder()
_NEVER = "0000-00-00T00:00:00.000000+00:00"  # sorts before every real time
_NEVER_ARRIVED = "0001-01-01T00:00:00.000000+00:00"  # a parseable "long ago"


def to_utc(at: datetime) -> datetime:
    """Timezone-aware UTC; a naive time is taken to be UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return to_utc(at).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


_PointRow = tuple[int, str | None, str | None, str, str, bytes]
_PairRow = tuple[int, int, str, str, str, str, str | None]
_WithheldRow = tuple[int, str, int]
_CHECKPOINT_EVERY = 2 << 20  # bytes of points written between background checkpoints
_WAL_LIMIT = 64 << 20  # a WAL beyond this is checkpointed by the writer itself
_MAX_PARAMS = 500  # ids per `IN (...)`, far below SQLite's bound-parameter limit


def _arrival(conn: sqlite3.Connection) -> str:
    """Now, or just after the newest arrival stored (a clock set back, or the same microsecond):
    inside the write transaction, so every commit arrives strictly after all earlier ones."""
    now = datetime.now(UTC)
    (latest,) = conn.execute("SELECT max(arrived_at) FROM points").fetchone()
    if latest is not None:
        now = max(now, datetime.fromisoformat(latest) + timedelta(microseconds=1))
    return now.isoformat(timespec="microseconds")


def _prepare(point: MemoryPoint, pairs: Sequence[Pair]) -> tuple[_PointRow, list[_PairRow]]:
    """The rows of one point, computed outside the lock (encoding is the costly part)."""
    created = _iso(point.created_at)
    # Usually one instant twice (a new point): format it once.
    updated = created if point.updated_at == point.created_at else _iso(point.updated_at)
    version = updated or created or _NEVER
    changed = max(created or _NEVER, updated or _NEVER)
    body = msgspec.json.encode(point)
    rows: list[_PairRow] = []
    # A point's pairs share its keywords and time: encode each distinct object once.
    keywords_obj: object = None
    keywords_json = ""
    at_obj: object = point.created_at  # what pairs_from_point gives them
    at_text = created
    for p in pairs:
        if p.keywords is not keywords_obj:
            keywords_obj = p.keywords
            keywords_json = _KEYWORDS.encode(list(p.keywords)).decode()
        if p.created_at is not at_obj:
            at_obj = p.created_at
            at_text = _iso(p.created_at)
        rows.append((point.id, p.turn, p.prompt, p.completion, p.kind, keywords_json, at_text))
    return (point.id, created, updated, changed, version, body), rows


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a corpus written by an older version up to this schema (idempotent)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(points)")}
    if "arrived_at" not in columns:
        # when older points arrived is unknown: their own time is the best guess
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("ALTER TABLE points ADD COLUMN arrived_at TEXT")
            conn.execute("UPDATE points SET arrived_at = changed_at")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.execute("CREATE INDEX IF NOT EXISTS points_arrived_at ON points (arrived_at)")


@dataclass(frozen=True)
class Snapshot:
    """Every pair with when its point arrived and which version of it: one consistent read."""

    pairs: list[Pair]  # by point id and turn
    arrived: dict[int, datetime]  # point id → when the collector stored its version
    versions: dict[int, str]  # point id → its version (updated_at, else created_at)

    @property
    def until(self) -> datetime | None:
        """The newest arrival read: whatever arrives later is newer than this."""
        return max(self.arrived.values(), default=None)


class _Checkpointer:
    """Copies the WAL back into the database file from a thread of its own.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so every
    ~1000 pages one write would wait for the copying and two fsyncs (half of the ingest time);
    here they overlap with the next writes instead (SQLite's documented alternative).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint:{path.name}", daemon=True
        )
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # the checkpoint's fsyncs: as the writer's
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closing:
                    return
                try:
                    # PASSIVE: copies what it can without waiting for readers or writers.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # e.g. busy: the next poke tries again
                    log.warning("checkpoint of %s failed: %r", self._path, exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()


def _pair(row: _PairRow) -> Pair:
    point_id, turn, prompt, completion, kind, keywords, created_at = row
    return Pair(
        prompt=prompt,
        completion=completion,
        point_id=point_id,
        turn=turn,
        kind=kind,
        keywords=tuple(msgspec.json.decode(keywords)),
        created_at=_parse(created_at),
    )


def _pair_rows(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[_PairRow]:
    return conn.execute(
        "SELECT q.point_id, q.turn, q.prompt, q.completion, q.kind, q.keywords, q.created_at"
        " FROM pairs q JOIN points p ON p.id = q.point_id" + where + " ORDER BY q.point_id, q.turn",
        args,
    ).fetchall()


class _Store:
    """The one owner of a corpus file's connections in this process: shared by every `Corpus`
    opened on that file, closed with the last of them."""

    def __init__(self, conn: sqlite3.Connection, path: Path, key: tuple[int, int]) -> None:
        self.conn = conn
        self.path = path
        self.key = key
        self.lock = threading.Lock()
        self.users = 0
        self._checkpointer: _Checkpointer | None = None  # started by the first write
        self._unchecked = 0  # bytes written since the last checkpoint was asked for

    @classmethod
    def connect(cls, path: Path) -> _Store:
        """Open (creating it 0600 when missing) and prepare the database; under _OWNERS_LOCK."""
        ensure_private_dir(path.parent)
        # SQLite creates the file with 0644 less the umask, and its -wal/-shm with the file's
        # mode; the umask is the process's, so it changes only under the lock every corpus
        # open takes, and meanwhile other threads can only create files more private.
        old_umask = os.umask(0o077)
        try:
            conn = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )  # autocommit; transactions are explicit
        finally:
            os.umask(old_umask)
        try:
            for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                _make_private(name)
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed point survives a crash of this process (the case that
            # matters for ack-after-store); only an OS crash can lose the last commits, and
            # FULL would cost an fsync per point (4x slower ingest).
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run in a thread of their own (see _Checkpointer); a WAL that still
            # outgrows it is checkpointed by the writer, and truncated once reset.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            conn.execute("PRAGMA foreign_keys=ON")
            # a deleted row's bytes are overwritten with zeros (a replaced version, a forgotten
            # point): free space never holds old text
            conn.execute("PRAGMA secure_delete=ON")
            conn.executescript(_SCHEMA)
            _migrate(conn)
            key = _file_key(path)
        except BaseException:
            conn.close()
            raise
        assert key is not None  # SQLite created the file
        return cls(conn, path, key)

    def close(self) -> None:
        with self.lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self.conn.close()  # the last connection to close checkpoints the rest

    def written(self, size: int) -> None:
        """After a commit of about `size` bytes: checkpoint in the background now and then.
        Called with `lock` held."""
        self._unchecked += size
        if self._unchecked < _CHECKPOINT_EVERY:
            return
        self._unchecked = 0
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.poke()
        with contextlib.suppress(OSError):
            if os.stat(f"{self.path}-wal").st_size > _WAL_LIMIT:
                # The thread cannot keep up (or its checkpoints keep missing the end): copy
                # it all now, so the next write can start the WAL over.
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _file_key(path: Path) -> tuple[int, int] | None:
    """The file's identity (device, inode): two paths of one file share one owner."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _make_private(path: Path) -> None:
    """0600 for a file made before us with a wider mode: by its name, never through a
    descriptor (see the module's docstring)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(os.stat(path).st_mode) != PRIVATE_FILE:
            os.chmod(path, PRIVATE_FILE)


_OWNERS_LOCK = threading.Lock()
_OWNERS: dict[tuple[int, int], _Store] = {}


def _forget_owners_after_fork() -> None:
    # A forked child shares none of its parent's connections: it opens its own.
    global _OWNERS_LOCK
    _OWNERS_LOCK = threading.Lock()
    _OWNERS.clear()


os.register_at_fork(after_in_child=_forget_owners_after_fork)


class Corpus:
    """Thread-safe handle on the corpus file; use as a context manager or call `close()`.

    Handles of one file in one process share its owner (`_Store`); closing a handle closes the
    file only when it was the last one.
    """

    def __init__(self, store: _Store, path: Path) -> None:
        self._store: _Store | None = store
        self.path = path
        self._point_decoder = msgspec.json.Decoder(MemoryPoint)

    @classmethod
    def open(cls, path: Path) -> Corpus:
        path = Path(path).expanduser()
        with _OWNERS_LOCK:
            key = _file_key(path)
            store = _OWNERS.get(key) if key is not None else None
            if store is None:
                store = _Store.connect(path)
                _OWNERS[store.key] = store
            store.users += 1
        return cls(store, path)

    def close(self) -> None:
        """Idempotent; the file's connections close with its last handle."""
        with _OWNERS_LOCK:
            store, self._store = self._store, None
            if store is None:
                return
            store.users -= 1
            if store.users == 0:
                del _OWNERS[store.key]
                store.close()

    def _live(self) -> _Store:
        store = self._store
        if store is None:
            raise sqlite3.ProgrammingError(f"the corpus {self.path} is closed")
        return store

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
    def upsert_point(self, point: MemoryPoint, pairs: Sequence[Pair]) -> Upsert:
        """Store `point` and its pairs, idempotently (`upsert_points` with one item).

        Unknown id: added. Known id with a newer `updated_at` (else `created_at`): its pairs are
        replaced, in one transaction. Same or older version (a redelivery): nothing changes.
        """
        return self.upsert_points([(point, pairs)])[0]

    def upsert_points(
        self,
        items: Sequence[tuple[MemoryPoint, Sequence[Pair]]],
        withheld: Sequence[Mapping[str, int]] | None = None,
    ) -> list[Upsert]:
        """Store many points with their pairs in ONE transaction; an outcome per item, in order.

        Same result, and same outcomes, as `upsert_point` on each item in turn: within the
        batch a later item with a newer version of an id replaces an earlier one ("updated"),
        one with the same or an older version is "unchanged". Only each id's winner is written.
        All or nothing: on an error nothing of the batch is stored. `withheld[i]`: reason →
        pairs of item i kept out of the corpus, stored as counts with the point.
        """
        if not items:
            return []
        prepared = [_prepare(point, pairs) for point, pairs in items]
        kept_out: list[list[_WithheldRow]] = [
            [(point.id, reason, n) for reason, n in counts.items() if n]
            for (point, _), counts in zip(items, withheld or [{}] * len(items), strict=True)
        ]
        ids = list({row[0] for row, _ in prepared})
        outcomes: list[Upsert] = []
        store = self._live()
        with store.lock:
            conn = store.conn
            # IMMEDIATE takes the write lock before the read, so two collectors cannot both
            # decide "added" for the same point.
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored: dict[int, str] = {}
                for i in range(0, len(ids), _MAX_PARAMS):
                    chunk = ids[i : i + _MAX_PARAMS]
                    marks = ",".join("?" * len(chunk))
                    stored.update(
                        conn.execute(
                            f"SELECT id, version FROM points WHERE id IN ({marks})", chunk
                        ).fetchall()
                    )
                existed = set(stored)
                tombs: dict[int, str] = {}
                for i in range(0, len(ids), _MAX_PARAMS):
                    chunk = ids[i : i + _MAX_PARAMS]
                    marks = ",".join("?" * len(chunk))
                    for pid, version in conn.execute(
                        f"SELECT id, version FROM forgotten WHERE id IN ({marks})", chunk
                    ):
                        # forgotten: only a version after the deletion comes back
                        stored[pid] = max(stored.get(pid) or version, version)
                        tombs[pid] = version
                winners: dict[int, int] = {}  # id -> index of the item whose version is kept
                for index, (row, _) in enumerate(prepared):
                    pid, version = row[0], row[4]
                    current = stored.get(pid)
                    if current is not None and version <= current:
                        gone = pid in tombs and version <= tombs[pid] and pid not in winners
                        outcomes.append("forgotten" if gone else "unchanged")
                        continue
                    outcomes.append("updated" if pid in existed or pid in winners else "added")
                    stored[pid] = version
                    winners[pid] = index
                if not winners:
                    conn.execute("ROLLBACK")
                    return outcomes
                arrived = _arrival(conn)
                replaced = [(pid,) for pid in winners if pid in existed]
                if replaced:
                    conn.executemany("DELETE FROM pairs WHERE point_id = ?", replaced)
                    conn.executemany("DELETE FROM withheld WHERE point_id = ?", replaced)
                conn.executemany(
                    "INSERT OR REPLACE INTO points"
                    " (id, created_at, updated_at, changed_at, version, body, arrived_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*prepared[i][0], arrived) for i in winners.values()],
                )
                conn.executemany(
                    "INSERT INTO pairs"
                    " (point_id, turn, prompt, completion, kind, keywords, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [pair for i in winners.values() for pair in prepared[i][1]],
                )
                conn.executemany(
                    "INSERT INTO withheld (point_id, reason, pairs) VALUES (?, ?, ?)",
                    [row for i in winners.values() for row in kept_out[i]],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            store.written(
                sum(len(prepared[i][0][5]) + 200 * len(prepared[i][1]) for i in winners.values())
            )
        return outcomes

    def forget(self, point_id: int, at: datetime) -> bool:
        """Delete the point and its pairs for good; True when the corpus held it.

        Deleted rows are overwritten (`secure_delete`) and the WAL is checkpointed and truncated,
        so no file of the corpus keeps the point's bytes. A tombstone (the id and the newest of
        the deleted version and `at`) makes a late copy of the point, up to that version, stay
        out; a version after the deletion is a new point and is stored.
        """
        store = self._live()
        with store.lock:
            conn = store.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT version FROM points WHERE id = ?", (point_id,)
                ).fetchone()
                old = conn.execute(
                    "SELECT version FROM forgotten WHERE id = ?", (point_id,)
                ).fetchone()
                version = max(v for v in (_iso(at), row and row[0], old and old[0]) if v)
                conn.execute("DELETE FROM pairs WHERE point_id = ?", (point_id,))
                conn.execute("DELETE FROM withheld WHERE point_id = ?", (point_id,))
                conn.execute("DELETE FROM points WHERE id = ?", (point_id,))
                conn.execute(
                    "INSERT OR REPLACE INTO forgotten (id, version) VALUES (?, ?)",
                    (point_id, version),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            # every frame of the WAL, old versions of the pages included, is copied back and
            # the file is cut to zero (readers of other processes: waited for, busy_timeout)
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log.warning("the corpus WAL is still in use; it is truncated by the next forget")
        return row is not None

    def forgotten_ids(self) -> set[int]:
        """Every forgotten point not stored again since."""
        store = self._live()
        with store.lock:
            rows = store.conn.execute(
                "SELECT id FROM forgotten f WHERE NOT EXISTS (SELECT 1 FROM points p"
                " WHERE p.id = f.id)"
            ).fetchall()
        return {pid for (pid,) in rows}

    def forgotten(self, point_id: int) -> bool:
        """Whether the point was forgotten (and not stored again since)."""
        store = self._live()
        with store.lock:
            gone = store.conn.execute(
                "SELECT 1 FROM forgotten f WHERE id = ?"
                " AND NOT EXISTS (SELECT 1 FROM points p WHERE p.id = f.id)",
                (point_id,),
            ).fetchone()
        return gone is not None

    def held_elsewhere(self, texts: Sequence[str], point_id: int) -> set[str]:
        """The texts that a pair (prompt or completion) or the summary of another point holds
        too: they do not tell that a file holds `point_id`."""
        store = self._live()
        found: set[str] = set()
        with store.lock:
            for text in texts:
                hit = (
                    store.conn.execute(
                        "SELECT 1 FROM pairs WHERE point_id != ? AND (prompt = ? OR completion = ?)"
                        " LIMIT 1",
                        (point_id, text, text),
                    ).fetchone()
                    or store.conn.execute(
                        "SELECT 1 FROM points WHERE id != ? AND instr(body, ?) > 0 LIMIT 1",
                        (point_id, msgspec.json.encode(text)),
                    ).fetchone()
                )
                if hit:
                    found.add(text)
        return found

    def point_with_pairs(self, point_id: int) -> tuple[MemoryPoint | None, list[Pair]]:
        """The stored point `point_id` and its pairs ((None, []) when it is not stored)."""
        store = self._live()
        with store.lock:
            body = store.conn.execute(
                "SELECT body FROM points WHERE id = ?", (point_id,)
            ).fetchone()
            rows = _pair_rows(store.conn, " WHERE p.id = ?", (point_id,))
        point = self._point_decoder.decode(body[0]) if body else None
        return point, [_pair(row) for row in rows]

    # --- reads ----------------------------------------------------------------------------------
    def _since_clause(self, since: datetime | None) -> tuple[str, tuple[Any, ...]]:
        if since is None:
            return "", ()
        return " WHERE p.changed_at > ?", (_iso(since),)

    def pairs(self, since: datetime | None = None) -> list[Pair]:
        """Pairs of the points changed after `since` (all when None), by point id and turn."""
        where, args = self._since_clause(since)
        store = self._live()
        with store.lock:
            rows = _pair_rows(store.conn, where, args)
        return [_pair(row) for row in rows]

    def snapshot(self) -> Snapshot:
        """All pairs, with their points' arrival and version, read in one transaction (a
        collector in another process may commit between two plain reads)."""
        store = self._live()
        with store.lock:
            conn = store.conn
            conn.execute("BEGIN")
            try:
                points = conn.execute("SELECT id, version, arrived_at FROM points").fetchall()
                rows = _pair_rows(conn, "", ())
            finally:
                conn.execute("COMMIT")
        arrived = {pid: datetime.fromisoformat(at or _NEVER_ARRIVED) for pid, _, at in points}
        versions = {pid: version for pid, version, _ in points}
        return Snapshot([_pair(row) for row in rows], arrived, versions)

    def points(self, since: datetime | None = None) -> list[MemoryPoint]:
        """The stored points changed after `since` (all when None), by id."""
        where, args = self._since_clause(since)
        store = self._live()
        with store.lock:
            rows = store.conn.execute(
                "SELECT p.body FROM points p" + where + " ORDER BY p.id", args
            ).fetchall()
        return [self._point_decoder.decode(body) for (body,) in rows]

    def stats(self, since: datetime | None = None) -> dict[str, int]:
        """Totals `points`, `pairs`; `pairs_since_watermark`: pairs of points after `since`;
        `points_without_pairs`: stored points that yielded no pair (no exchange, a note with
        neither summary nor keywords, or every pair withheld as sensitive)."""
        where, args = self._since_clause(since)
        store = self._live()
        with store.lock:
            n_points = store.conn.execute("SELECT count(*) FROM points").fetchone()[0]
            n_pairs = store.conn.execute("SELECT count(*) FROM pairs").fetchone()[0]
            n_since = store.conn.execute(
                "SELECT count(*) FROM pairs q JOIN points p ON p.id = q.point_id" + where, args
            ).fetchone()[0]
            n_empty = store.conn.execute(
                "SELECT count(*) FROM points p"
                " WHERE NOT EXISTS (SELECT 1 FROM pairs q WHERE q.point_id = p.id)"
            ).fetchone()[0]
        return {
            "points": n_points,
            "pairs": n_pairs,
            "pairs_since_watermark": n_since,
            "points_without_pairs": n_empty,
        }

    def withheld(self) -> dict[str, int]:
        """Pairs kept out of the corpus (secrets the filter would drop), by reason."""
        store = self._live()
        with store.lock:
            rows = store.conn.execute(
                "SELECT reason, sum(pairs) FROM withheld GROUP BY reason ORDER BY reason"
            ).fetchall()
        return dict(rows)
