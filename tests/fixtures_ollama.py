"""Fixture `ollama_double`: a strict fake Ollama server over real HTTP, one per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ollama_double import OllamaDouble


@pytest.fixture
def ollama_double() -> Iterator[OllamaDouble]:
    with OllamaDouble() as double:
        yield double
