"""Collector: memory points → user/assistant pairs, stored in the corpus.

The pure part (`pairs_from_point`) turns one MindX memory point into every exchange it holds;
the handler stores them idempotently (a redelivered point changes nothing) and `serve` wires the
handler to the durable `memory.point.created` consumer.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Literal

from shared.messages import MemoryPoint, Pair
from shared.subjects import COLLECTOR

if TYPE_CHECKING:
    from shared.bus import Bus, Delivery, Service
    from shared.corpus import Corpus
    from shared.settings import Settings

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]

# A turn starts with a role word and an ASCII or full-width colon, after optional indentation.
# English and Chinese role words are accepted on text of either language, in any letter case.
_TURN = re.compile(r"^[ \t\u3000]*(user|assistant|用户|助手)[ \t\u3000]*[:：][ \t\u3000]?", re.I)
_ROLES: dict[str, Role] = {
    "user": "user",
    "用户": "user",
    "assistant": "assistant",
    "助手": "assistant",
}


def split_turns(content: str) -> list[tuple[Role, str]]:
    """Role-prefixed turns of `content`, consecutive turns of one role merged.

    A line without a role prefix continues the current turn (multi-line replies); lines before
    the first prefixed line belong to no turn. Empty turns are dropped.
    """
    turns: list[tuple[Role, list[str]]] = []
    for line in content.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        m = _TURN.match(line)
        if m:
            role = _ROLES[m.group(1).lower()]
            text = line[m.end() :]
            if turns and turns[-1][0] == role:
                turns[-1][1].append(text)  # same speaker twice in a row: one turn
            else:
                turns.append((role, [text]))
        elif turns:
            turns[-1][1].append(line)
    out: list[tuple[Role, str]] = []
    for role, lines in turns:
        text = "\n".join(ln.rstrip() for ln in lines).strip()
        if not text:
            continue
        if out and out[-1][0] == role:  # an empty turn between two of the same role
            out[-1] = (role, out[-1][1] + "\n" + text)
        else:
            out.append((role, text))
    return out


def is_conversation(content: str) -> bool:
    """True when any line starts with a role prefix; such a point is never read as a note."""
    return any(_TURN.match(line) for line in content.splitlines())


def pairs_from_point(point: MemoryPoint) -> list[Pair]:
    """Every user → assistant exchange of `point`, in order (`Pair.turn` is the pair's index).

    A user turn with no reply after it makes no pair. A note (no role prefixes at all) becomes
    one pair: its summary, or else its keywords, as prompt and its content as completion; a note
    with neither makes no pair.
    """
    created = point.created_at or point.updated_at
    keywords = tuple(point.keywords)
    content = point.content or ""
    if not is_conversation(content):
        prompt = (point.summary or "").strip() or ", ".join(
            k.strip() for k in keywords if k.strip()
        )
        completion = content.strip()
        if not prompt or not completion:
            return []
        return [
            Pair(
                prompt=prompt,
                completion=completion,
                point_id=point.id,
                turn=0,
                kind="note",
                keywords=keywords,
                created_at=created,
            )
        ]

    pairs: list[Pair] = []
    pending: str | None = None  # the user turn waiting for its reply
    for role, text in split_turns(content):
        if role == "user":
            pending = text
        elif pending is not None:
            pairs.append(
                Pair(
                    prompt=pending,
                    completion=text,
                    point_id=point.id,
                    turn=len(pairs),
                    kind="dialogue",
                    keywords=keywords,
                    created_at=created,
                )
            )
            pending = None
        # an assistant turn with no user turn before it (a window that starts mid-dialogue)
        # has no prompt: skipped
    return pairs


# --- bus adapter --------------------------------------------------------------------------------


async def on_memory_point(point: MemoryPoint, delivery: Delivery | None, corpus: Corpus) -> str:
    """Store the pairs of one point; returns "added", "updated" or "unchanged".

    The write is one transaction, finished before the bus acks, so a crash before the ack only
    leads to a redelivery that `upsert_point` recognises and ignores.
    """
    pairs = pairs_from_point(point)
    # one short local transaction (~0.2 ms): cheaper inline than a thread hop per point
    outcome = corpus.upsert_point(point, pairs)
    log.debug(
        "point %s: %s (%d pairs, delivery %s)",
        point.id,
        outcome,
        len(pairs),
        getattr(delivery, "num_delivered", "-"),
    )
    return outcome


class CollectorService:
    """The consumer and its corpus; `stop()` stops consuming, then closes a corpus it opened."""

    def __init__(self, inner: Service, corpus: Corpus, *, owns_corpus: bool) -> None:
        self.inner = inner
        self.corpus = corpus
        self.owns_corpus = owns_corpus

    async def stop(self) -> None:
        try:
            await self.inner.stop()
        finally:
            if self.owns_corpus:
                self.corpus.close()


# Handlers are short, so fetching in batches halves the per-message bus overhead.
FETCH_BATCH = 64


async def serve(bus: Bus, settings: Settings, corpus: Corpus | None = None) -> CollectorService:
    """Consume `memory.point.created` durably into `<data-dir>/corpus.sqlite3`."""
    from shared.corpus import Corpus

    owns = corpus is None
    store = Corpus.open(settings.data_path / "corpus.sqlite3") if corpus is None else corpus
    try:
        inner = await bus.serve(
            COLLECTOR,
            MemoryPoint,
            functools.partial(on_memory_point, corpus=store),
            batch=FETCH_BATCH,
        )
    except BaseException:
        if owns:
            store.close()
        raise
    return CollectorService(inner, store, owns_corpus=owns)
