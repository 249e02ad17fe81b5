"""Payloads shared by the bus tests."""

from __future__ import annotations

from shared.messages import MemoryPoint


def point(i: int, content: str = "hello") -> MemoryPoint:
    return MemoryPoint(id=i, content=content)
