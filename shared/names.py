"""The grammar of the names that arrive over the bus: run ids and model names.

A name from the bus is untrusted until it matches here; only then may it become a path, a
Modelfile line, a config value or a backend request. The message types carry these as msgspec
constraints (`RunId`, `ModelName`), so a bad name is a decode error and its message a dead letter.

- A run id is what the trainer makes: `YYYYMMDD_HHMMSS`, with `_xxxx` (four hex digits) when two
  runs share a second. It has no `/`, no `.`, and a fixed length.
- A model name follows Ollama's rules: `[host/][namespace/]model[:tag]`. Each part starts with a
  letter, digit or `_`, then letters, digits, `_`, `-` and `.`; a namespace has no `.`, a host may
  have `:` (a port). A host is at most 350 characters, every other part at most 80. The tag
  defaults to `latest`, and names compare without regard to case.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

# \A and \Z, not ^ and $: `$` also matches before a trailing newline.
RUN_ID_PATTERN = r"\A[0-9]{8}_[0-9]{6}(?:_[0-9a-f]{4})?\Z"
RUN_ID_MAX = len("YYYYMMDD_HHMMSS_xxxx")

_FIRST = "A-Za-z0-9_"
_HOST = rf"[{_FIRST}][{_FIRST}.:-]{{0,349}}"
_NAMESPACE = rf"[{_FIRST}][{_FIRST}-]{{0,79}}"
_PART = rf"[{_FIRST}][{_FIRST}.-]{{0,79}}"  # model and tag
MODEL_NAME_PATTERN = rf"\A(?:(?:{_HOST}/)?{_NAMESPACE}/)?{_PART}(?::{_PART})?\Z"
MODEL_NAME_MAX = 350 + 1 + 80 + 1 + 80 + 1 + 80
DEFAULT_TAG = "latest"

RunId = Annotated[str, msgspec.Meta(max_length=RUN_ID_MAX, pattern=RUN_ID_PATTERN)]
ModelName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN)
]


class InvalidName(ValueError):
    """A run id or model name outside the grammar."""


# The same patterns the messages decode with (msgspec applies them with re.search).
_RUN_ID = re.compile(RUN_ID_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def _shown(value: str) -> str:
    # a refused name may be huge: a log line or dead-letter reason shows its start
    return repr(value) if len(value) <= 60 else f"{value[:40]!r}… ({len(value)} characters)"


def is_run_id(value: object) -> bool:
    try:
        check_run_id(value)
    except InvalidName:
        return False
    return True


def check_run_id(value: object) -> str:
    """`value` if it is a run id; InvalidName otherwise."""
    if not isinstance(value, str):
        raise InvalidName(f"a run id must be a string, got {type(value).__name__}")
    if len(value) > RUN_ID_MAX or not _RUN_ID.search(value):
        raise InvalidName(f"invalid run id {_shown(value)}: expected YYYYMMDD_HHMMSS[_xxxx]")
    return value


def is_model_name(value: object) -> bool:
    try:
        check_model_name(value)
    except InvalidName:
        return False
    return True


def check_model_name(value: object) -> str:
    """`value` if it is a valid model name; InvalidName otherwise."""
    if not isinstance(value, str):
        raise InvalidName(f"a model name must be a string, got {type(value).__name__}")
    if len(value) > MODEL_NAME_MAX or not _MODEL_NAME.search(value):
        raise InvalidName(
            f"invalid model name {_shown(value)}: expected [host/][namespace/]model[:tag]"
        )
    return value


def normalize_model_name(value: object) -> str:
    """`[host/][namespace/]model:tag`, with `latest` as the default tag; InvalidName if invalid."""
    name = check_model_name(value)
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:{DEFAULT_TAG}"


def same_model(a: str, b: str) -> bool:
    """Whether two names name one model, as Ollama matches them (default tag, any case)."""
    try:
        return normalize_model_name(a).lower() == normalize_model_name(b).lower()
    except InvalidName:
        return False
