"""Chat records → token ids and labels for supervised fine-tuning.

A record is one line of `train_data_<ts>.jsonl`: `{"messages": [{"role": ..., "content": ...}]}`.
It is rendered with the base model's own chat template, so the model is trained on exactly the
prompt format Ollama will later feed it. Loss is taken on assistant tokens only: the labels are
-100 everywhere else, so the model learns to answer, not to imitate the user or the system prompt.

Assistant spans are found by rendering message prefixes with the template and diffing token counts:
the tokens between "everything before this turn + the generation prompt" and "everything up to and
including this turn" are what the model must produce for that turn (its text and end-of-turn
token). This works for any template that renders a conversation as a growing prefix, which is
what chat templates are for; a template that does not is refused with a clear error.

Pure: no file, network or model access; a tokenizer is the only collaborator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


class ChatTokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


class TemplateError(ValueError):
    """The chat template does not render a conversation as a growing prefix."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant spans

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Dataset:
    examples: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def supervised_tokens(self) -> int:
        return sum(e.supervised for e in self.examples)


def messages_of(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The messages of one record, checked: roles known, contents strings."""
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("record has no 'messages' list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no text content")
        out.append({"role": role, "content": content})
    return out


def _render(tok: ChatTokenizer, msgs: list[dict[str, str]], *, gen_prompt: bool) -> str:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    if not isinstance(text, str):
        raise TemplateError(f"chat template rendered {type(text).__name__}, not text")
    return text


def _encode(tok: ChatTokenizer, text: str) -> list[int]:
    # The template already wrote every special token it wants (BOS included, if any).
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(
    tok: ChatTokenizer, msgs: list[dict[str, str]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) span of each assistant turn.

    A span covers what the model has to generate for the turn: anything the template puts
    between the generation prompt and the text (e.g. an empty think block), the text, and the
    end-of-turn token. Layout whitespace after the end-of-turn token (ChatML's newline) is not
    supervised: the server stops at the end-of-turn token and never generates it.

    Spans are located on the rendered text, then turned into token positions by encoding the
    text up to each boundary and counting tokens. Templates that render an earlier assistant
    turn differently once more turns follow (Qwen3 drops the think block) are handled, because
    the end of a turn is found in the full rendering, not in a shorter one.
    """
    full = _render(tok, msgs, gen_prompt=False)
    ids = _encode(tok, full)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        text = m["content"].strip()
        if m["role"] != "assistant" or not text:
            continue
        # start: where the generation prompt for this turn ends
        before = _render(tok, msgs[:i], gen_prompt=True) if i else ""
        start_char = max(cursor, _common_prefix(before, full))
        pos = full.find(text, start_char)
        if pos < 0:
            raise TemplateError(f"chat template does not reproduce the text of turn {i}")
        end_char = pos + len(text)
        # end: the end-of-turn marker, as the template writes it after this turn's text
        alone = _render(tok, msgs[: i + 1], gen_prompt=False)
        tail = alone[alone.rfind(text) + len(text) :].rstrip()
        if tail and full.startswith(tail, end_char):
            end_char += len(tail)
        start, end = len(_encode(tok, full[:start_char])), len(_encode(tok, full[:end_char]))
        if ids[:end] != _encode(tok, full[:end_char]):
            raise TemplateError(f"tokenization of turn {i} changes when more text follows it")
        if end > start:
            spans.append((start, end))
        cursor = end_char
    return ids, spans


def tokenize_record(tok: ChatTokenizer, record: Mapping[str, Any], max_length: int) -> Example:
    """One record → an Example, truncated on the right to `max_length` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids, spans = assistant_spans(tok, messages_of(record))
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return Example(input_ids=ids[:max_length], labels=labels[:max_length])


def build_dataset(
    tok: ChatTokenizer, records: Iterable[Mapping[str, Any]], max_length: int
) -> Dataset:
    """Tokenize every record; records that cannot teach anything are dropped and counted."""
    examples: list[Example] = []
    dropped: dict[str, int] = {}
    for record in records:
        try:
            ex = tokenize_record(tok, record, max_length)
        except TemplateError:
            raise  # a template problem affects every record: fail loudly, once
        except ValueError as exc:
            reason = f"malformed: {exc}"
        else:
            if ex.supervised:
                examples.append(ex)
                continue
            reason = "no assistant tokens within max_length"
        dropped[reason] = dropped.get(reason, 0) + 1
    return Dataset(examples=examples, dropped=dropped)


def pad_batch(
    batch: Sequence[Example], pad_id: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Right-pad a batch to its own longest example: input_ids, attention_mask, labels."""
    width = max(len(e) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        mask.append([1] * len(e) + [0] * pad)
        labels.append(e.labels + [IGNORE_INDEX] * pad)
    return ids, mask, labels
