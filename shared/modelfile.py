'''The Modelfile grammar: safe text for its values and the one writer of its commands.

Grammar: Ollama's CLI parser, see ../shared/reference/ollama-api.md §6. The parser has no escapes;
a `"""…"""` value ends at the first newline at which the whitespace-trimmed buffer ends with
`"""`. So a value can break out only through a line of the text that ends, ignoring trailing
spaces/tabs, in `"""`. Our rule: in such a line the final `"` becomes `”` (U+201D). The line then
ends in `”`, which no trimming removes, so no line of the text can close the value; the opening
`"""` plus a first line of at most two quotes is shorter than the six characters the parser
needs. The parser also drops non-printable runes, so we remove them first (mapping Unicode spaces
to ' '): what the parser reads back is exactly our text.

`sanitize_text` is applied once to untrusted conversation text, and the same sanitized text is
used for the JSON `messages` sent to `/api/create`, for the dataset and for the Modelfile, so the
file describes exactly the model.
'''

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.backend import ChatMessage

MESSAGE_ROLES = frozenset({"system", "user", "assistant"})
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+")

# Control tokens of the chat templates in use (ChatML/Qwen, Llama 3, Gemma, Mistral, Phi, think
# tags). Any `<|…|>` token is also removed, which covers most other families.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|python_tag|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<think>", "</think>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
)  # fmt: skip
_PIPE_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|<｜[^<>｜\s]{1,64}｜>")
_TRIPLE_END = re.compile(r'"""(?=[ \t]*$)', re.M)


def _printable(ch: str) -> str:
    """What survives the Modelfile parser: letters, marks, numbers, punctuation, symbols, ' '."""
    if ch in "\n\t ":
        return ch
    cat = unicodedata.category(ch)
    if cat == "Zs":
        return " "  # NBSP, ideographic space…: the parser would drop them; keep the gap
    if cat in ("Zl", "Zp"):
        return "\n"
    return ch if cat[0] in "LMNPS" else ""


def strip_special_tokens(text: str, extra: Iterable[str] = ()) -> str:
    tokens = sorted({*SPECIAL_TOKENS, *(t for t in extra if t)}, key=len, reverse=True)
    while True:  # removing one token can join the halves of another: repeat until stable
        before = text
        text = _PIPE_TOKEN.sub("", text)
        for tok in tokens:
            text = text.replace(tok, "")
        if text == before:
            return text


def sanitize_text(text: str, *, special_tokens: Iterable[str] = ()) -> str:
    """Safe in a Modelfile triple-quoted value, in JSON content and in a chat template.

    `\\r\\n`/`\\r` → `\\n`; non-printable characters removed (Unicode spaces become ' '); control
    tokens removed; a line ending in `\"\"\"` gets its last quote replaced by `”`; outer whitespace
    stripped. Idempotent.
    """
    t = text.replace("\r\n", "\n").replace("\r", "\n")
    t = "".join(_printable(ch) for ch in t)
    t = strip_special_tokens(t, special_tokens)
    t = _TRIPLE_END.sub('""\u201d', t)
    return t.strip()


def _param_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    text = str(value).strip()
    if not text or any(ch in "\r\n\t" or _printable(ch) != ch for ch in text):
        raise ValueError(f"PARAMETER {name}: value must be one printable line, got {value!r}")
    if text.startswith('"'):
        # a leading quote would switch the parser to a quoted value
        raise ValueError(f"PARAMETER {name}: value must not start with a quote, got {value!r}")
    return text


def render_modelfile(
    base: str,
    system: str | None,
    messages: Sequence[ChatMessage],
    parameters: Mapping[str, Any],
) -> str:
    """A Modelfile nobody can break out of: one FROM, then SYSTEM, PARAMETERs, MESSAGEs.

    `base` and `parameters` are configuration: anything that would not parse as written raises
    ValueError. `system` and message contents are untrusted: they are sanitized.
    """
    b = base.strip()
    if not b or b.startswith('"') or b != "".join(_printable(ch) for ch in b) or "\n" in b:
        raise ValueError(f"FROM: not a model name or path: {base!r}")
    lines: list[str] = []
    for name, value in parameters.items():
        if not _PARAM_NAME.fullmatch(name):
            raise ValueError(f"PARAMETER name must match [A-Za-z0-9_]+, got {name!r}")
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:  # a list (stop) becomes one line per value
            lines.append(f"{name} {_param_value(name, v)}")
    for m in messages:
        if m.role not in MESSAGE_ROLES:
            raise ValueError(f"MESSAGE role must be one of {sorted(MESSAGE_ROLES)}, got {m.role!r}")
    return render_commands(
        b,
        system=sanitize_text(system) if system else "",
        parameters=lines,
        messages=[ChatMessage(role=m.role, content=sanitize_text(m.content)) for m in messages],
    )


def render_commands(
    base: str,
    *,
    adapters: Sequence[str] = (),
    template: str = "",
    system: str = "",
    parameters: Iterable[str] = (),
    messages: Sequence[ChatMessage] = (),
    license: Sequence[str] = (),
    comment: str = "",
) -> str:
    """The Modelfile commands in Ollama's order, each value written exactly as given.

    `parameters` are `name value` lines. Nothing is checked here: `render_modelfile` checks and
    sanitizes first. The local backend's `/api/show` calls this directly because it displays a
    model's stored values as Ollama does (a stop sequence may hold a newline, a template its
    control tokens), and must neither reject nor rewrite them.
    """
    lines = [f"# {comment}"] if comment else []
    lines.append(f"FROM {base}")
    lines += [f"ADAPTER {adapter}" for adapter in adapters]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER {line}" for line in parameters]
    lines += [f'MESSAGE {m.role} """{m.content}"""' for m in messages]
    lines += [f'LICENSE """{text}"""' for text in license]
    return "\n".join(lines) + "\n"
