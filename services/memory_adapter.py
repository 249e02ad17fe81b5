"""MemoryAdapter: memory points exported as files, and the training watermark.

Files: `<data-dir>/memory/*.jsonl|*.json` as the Memory module exports them; `mindx memory
import` and `mindx train --run-once` publish their points on `memory.point.created`, and the
collector stores them in the corpus. A malformed record is reported as `file:line: reason` and
skipped; it never stops an import.

The watermark is the seed's `~/.mindx/training/last_training.json`,
`{"last_train_time": "<RFC3339>"}`; with none yet, the whole corpus counts as new.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared.files import PRIVATE_FILE, atomic_write, ensure_private_dir
from shared.messages import MemoryPoint

if TYPE_CHECKING:
    pass

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
    records, errors = read_memory_records(path)
    return [p for _, p in records], errors


def read_memory_records(path: Path) -> tuple[list[tuple[int, MemoryPoint]], list[str]]:
    """Like `read_memory_file`, each point with the line it starts on (for later errors)."""
    path = Path(path)
    points: list[tuple[int, MemoryPoint]] = []
    errors: list[str] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"{path}: {(exc.strerror or str(exc)).lower()}"]
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
        data = data[3:]
    records = _jsonl_records(data) if path.suffix == ".jsonl" else _json_records(data, errors, path)
    for line, raw in records:
        try:
            points.append((line, _point_decoder.decode(raw)))
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
