"""Looking for a memory point's text where it must not be: its distinctive line, and every file
under some roots whose raw bytes hold it. Shared by the forgetting tests and bench."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from services.collector import pairs_from_point
from shared.messages import MemoryPoint


def distinctive(point: MemoryPoint, others: list[MemoryPoint], *, min_len: int) -> str | None:
    """The point's longest line of a pair, of at least `min_len` characters, that no other
    point's content holds (one line: raw in every file, JSON escapes nothing in it)."""
    lines = sorted(
        (
            line.strip()
            for p in pairs_from_point(point)
            for t in (p.prompt, p.completion)
            for line in t.splitlines()
        ),
        key=len,
        reverse=True,
    )
    for line in lines:
        if len(line) >= min_len and not any(line in o.content for o in others if o.id != point.id):
            return line
    return None


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def holders(needle: bytes, *roots: Path) -> list[str]:
    """Every file under `roots` whose raw bytes contain `needle`."""
    return [str(p) for p in files_under(*roots) if needle in p.read_bytes()]
