"""MemoryAdapter: where a training run gets its memory points, and the training watermark.

`TrainingDataSource` is the port the trainer uses; two adapters implement it:

* `FileDataSource`: `<data-dir>/memory/*.jsonl|*.json` exported by the Memory module.
* `CorpusDataSource`: the collector's corpus, fed by `memory.point.created`.

The watermark is the seed's `~/.mindx/training/last_training.json`,
`{"last_train_time": "<RFC3339>"}`; with none yet, the whole corpus counts as new.
A malformed record is reported as `file:line: reason` and skipped; it never stops a run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from shared.files import PRIVATE_FILE, atomic_write, ensure_private_dir
from shared.messages import MemoryPoint, Pair

if TYPE_CHECKING:
    from shared.corpus import Corpus

log = logging.getLogger(__name__)

MEMORY_SUFFIXES = (".jsonl", ".json")

_point_decoder = msgspec.json.Decoder(MemoryPoint)


class Watermark(msgspec.Struct, kw_only=True):
    last_train_time: datetime


# --- reading memory files -----------------------------------------------------------------------


def read_memory_file(path: Path) -> tuple[list[MemoryPoint], list[str]]:
    """Points of one `.jsonl` (a point per line) or `.json` (an array of points, or one) file.

    Returns (points, errors); each error reads `file:line: reason`.
    """
    path = Path(path)
    points: list[MemoryPoint] = []
    errors: list[str] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"{path}: {exc.strerror or exc}"]
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
        data = data[3:]
    records = _jsonl_records(data) if path.suffix == ".jsonl" else _json_records(data, errors, path)
    for line, raw in records:
        try:
            points.append(_point_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            errors.append(f"{path}:{line}: {exc}")
    return points, errors


def _jsonl_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    for n, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield n, line


def _json_records(data: bytes, errors: list[str], path: Path) -> list[tuple[int, bytes]]:
    """The elements of a top-level array (or the one object), each with its line number.

    Scans element by element so one bad element costs only itself, and the reported line is
    where that element starts.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        errors.append(f"{path}:{line}: not UTF-8: {exc.reason}")
        return []
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return []
    if text[pos] != "[":
        return [(text.count("\n", 0, pos) + 1, text[pos:].encode())]
    out: list[tuple[int, bytes]] = []
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return out
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        try:
            _, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            errors.append(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}; rest of file skipped")
            return out
        out.append((line, text[pos:end].encode()))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return out
        break
    errors.append(f"{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON: expected ',' or ']'")
    return out


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def memory_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in MEMORY_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def read_memory_dir(directory: Path) -> tuple[list[MemoryPoint], list[str]]:
    """All points of `directory/*.jsonl|*.json` in file-name order; a missing directory is empty."""
    points: list[MemoryPoint] = []
    errors: list[str] = []
    for f in memory_files(directory):
        p, e = read_memory_file(f)
        points.extend(p)
        errors.extend(e)
    return points, errors


# --- watermark ----------------------------------------------------------------------------------


def load_watermark(path: Path) -> datetime | None:
    """The last training time, or None when there is none yet.

    An unreadable watermark also gives None (with a warning): training on the whole corpus
    again is safe, refusing to train is not.
    """
    path = Path(path).expanduser()
    try:
        return msgspec.json.decode(path.read_bytes(), type=Watermark).last_train_time
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("watermark %s unreadable (%s); the whole corpus counts as new", path, exc)
        return None


def save_watermark(path: Path, t: datetime) -> Path:
    """Write `{"last_train_time": "<RFC3339>"}` atomically, 0600; a naive time is local time."""
    path = Path(path).expanduser()
    if t.tzinfo is None:
        t = t.astimezone()
    ensure_private_dir(path.parent)
    return atomic_write(path, msgspec.json.encode(Watermark(last_train_time=t)), mode=PRIVATE_FILE)


def point_time(point: MemoryPoint) -> datetime | None:
    """When a point last changed: the later of created_at and updated_at (naive = UTC).

    The same rule as the corpus's `changed_at`, so both sources agree on what is new.
    """
    times = [
        t if t.tzinfo is not None else t.replace(tzinfo=UTC)
        for t in (point.created_at, point.updated_at)
        if t is not None
    ]
    return max(times) if times else None


def points_since(points: list[MemoryPoint], since: datetime | None) -> list[MemoryPoint]:
    """Points created or updated after `since` (all of them when None; undated ones always)."""
    if since is None:
        return list(points)
    if since.tzinfo is None:
        since = since.astimezone()
    return [p for p in points if (t := point_time(p)) is None or t > since]


# --- the port and its adapters ------------------------------------------------------------------


@runtime_checkable
class TrainingDataSource(Protocol):
    async def get_all_points(self) -> list[MemoryPoint]: ...

    async def get_last_train_time(self) -> datetime | None: ...

    async def update_last_train_time(self, t: datetime) -> None: ...


class _WatermarkFile:
    def __init__(self, watermark_path: Path) -> None:
        self.watermark_path = Path(watermark_path).expanduser()

    async def get_last_train_time(self) -> datetime | None:
        return load_watermark(self.watermark_path)

    async def update_last_train_time(self, t: datetime) -> None:
        await asyncio.to_thread(save_watermark, self.watermark_path, t)


class FileDataSource(_WatermarkFile):
    """Memory points exported as files; `errors` holds the last read's skipped records."""

    def __init__(self, memory_dir: Path, watermark_path: Path) -> None:
        super().__init__(watermark_path)
        self.memory_dir = Path(memory_dir).expanduser()
        self.errors: list[str] = []

    async def get_all_points(self) -> list[MemoryPoint]:
        points, self.errors = await asyncio.to_thread(read_memory_dir, self.memory_dir)
        for e in self.errors[:20]:
            log.warning("skipped memory record: %s", e)
        if len(self.errors) > 20:
            log.warning("... and %d more skipped records", len(self.errors) - 20)
        return points

    async def get_new_points(self) -> list[MemoryPoint]:
        """Points changed after the watermark; everything when there is none."""
        return points_since(await self.get_all_points(), await self.get_last_train_time())


class CorpusDataSource(_WatermarkFile):
    """The collector's corpus (`shared.corpus.Corpus`: `points`/`pairs(since=...)`)."""

    def __init__(self, corpus: Corpus, watermark_path: Path) -> None:
        super().__init__(watermark_path)
        self.corpus = corpus

    async def _call(self, method: Callable[..., Any], since: datetime | None) -> list[Any]:
        if inspect.iscoroutinefunction(method):
            return list(await method(since=since))
        return list(await asyncio.to_thread(method, since=since))  # SQLite reads block

    async def get_all_points(self) -> list[MemoryPoint]:
        return await self._call(self.corpus.points, None)

    async def get_new_points(self) -> list[MemoryPoint]:
        """Points the corpus has had since the watermark; the whole corpus when there is none."""
        return await self._call(self.corpus.points, await self.get_last_train_time())

    async def get_new_pairs(self) -> list[Pair]:
        """Pairs of the points changed since the watermark; all of them when there is none."""
        return await self._call(self.corpus.pairs, await self.get_last_train_time())
