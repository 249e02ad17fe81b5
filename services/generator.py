"""Generator: pairs → run files (a chat-format dataset and a Modelfile), with safe text.

Everything here is pure except `write_run_files`. Untrusted conversation text goes through
`shared.modelfile.sanitize_text` once, and the same sanitized text is used for the JSON `messages`
sent to `/api/create`, for the dataset and for the Modelfile (`shared.modelfile.render_modelfile`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from shared.backend import ChatMessage
from shared.files import ensure_private_dir, write_private
from shared.messages import Pair
from shared.modelfile import sanitize_text
from shared.subjects import RunNames

# --- dataset --------------------------------------------------------------------------------


def chat_messages(pairs: Sequence[Pair]) -> list[ChatMessage]:
    """user/assistant messages for `/api/create`, sanitized."""
    out: list[ChatMessage] = []
    for p in pairs:
        out.append(ChatMessage(role="user", content=sanitize_text(p.prompt)))
        out.append(ChatMessage(role="assistant", content=sanitize_text(p.completion)))
    return out


def dataset_records(pairs: Sequence[Pair], system: str | None) -> list[dict[str, Any]]:
    """Chat records `{"messages": [system?, user, assistant]}`, one per pair, sanitized."""
    sys_text = sanitize_text(system) if system else ""
    records: list[dict[str, Any]] = []
    for p in pairs:
        msgs: list[dict[str, str]] = []
        if sys_text:
            msgs.append({"role": "system", "content": sys_text})
        msgs.append({"role": "user", "content": sanitize_text(p.prompt)})
        msgs.append({"role": "assistant", "content": sanitize_text(p.completion)})
        records.append({"messages": msgs})
    return records


def select_examples(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """At most `n` pairs spread evenly over the list (first one included), in order."""
    if n <= 0:
        return []
    if len(pairs) <= n:
        return list(pairs)
    step = len(pairs) / n
    return [pairs[int(i * step)] for i in range(n)]


# --- files ----------------------------------------------------------------------------------


class RunFiles(NamedTuple):
    dataset: Path
    modelfile: Path


def dataset_jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    """One JSON object per line, UTF-8 (no \\u escapes for Chinese)."""
    enc = msgspec.json.Encoder()
    return b"".join(enc.encode(r) + b"\n" for r in records)


def write_run_files(
    training_dir: Path, names: RunNames, records: Iterable[Mapping[str, Any]], modelfile: str
) -> RunFiles:
    """`train_data_<run_id>.jsonl` and `Modelfile_<run_id>` under `training_dir`, both 0600."""
    ensure_private_dir(training_dir)
    dataset = write_private(training_dir / names.dataset_file, dataset_jsonl(records))
    mf = write_private(training_dir / names.modelfile_file, modelfile)
    return RunFiles(dataset=dataset, modelfile=mf)
