"""Collector: memory points → user/assistant pairs, stored in the corpus.

The pure part (`pairs_from_point`) turns one MindX memory point into every exchange it holds;
`keep_private` keeps out of the corpus every pair the filter's `sensitive` stage would drop (and
the point's own text around it); the handler stores the rest idempotently (a redelivered point
changes nothing) and `serve` wires the handler to the durable `memory.point.created` consumer.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import msgspec

from services.filter import may_be_sensitive, sensitive_reason, sensitive_reason_text
from shared.messages import MemoryPoint, Pair
from shared.subjects import COLLECTOR

if TYPE_CHECKING:
    from shared.bus import Bus, Delivery, Service
    from shared.corpus import Corpus, Upsert
    from shared.settings import Settings

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]

# A turn starts with a role word and an ASCII or full-width colon, after optional indentation.
# English and Chinese role words are accepted on text of either language, in any letter case.
_TURN = re.compile(r"^[ \t\u3000]*(user|assistant|用户|助手)[ \t\u3000]*[:：][ \t\u3000]?", re.I)
# The same prefix at the start of any line of a text, with the rest of that line stripped
# (`\s` is str.isspace, as for str.strip; `[^\S\n]` is that without the line break).
_TURN_LINES = re.compile(_TURN.pattern + r"[^\S\n]*(.*\S)?[^\S\n]*$", re.I | re.M)
# Line breaks of str.splitlines beyond \n and \r, which the turn splitting does not use.
_OTHER_BREAKS = re.compile("[\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_ROLES: dict[str, Role] = {
    "user": "user",
    "用户": "user",
    "assistant": "assistant",
    "助手": "assistant",
}


_ROLE_WORDS: dict[str, Role] = {
    spelled: role for word, role in _ROLES.items() for spelled in (word, word.title(), word.upper())
}


def _role(word: str) -> Role:
    # Case-insensitive matching also admits look-alikes such as "uſer" (long s), which
    # lower() leaves unlisted; the word's length still tells the role.
    return _ROLES.get(word.lower()) or ("user" if len(word) == 4 else "assistant")


def _lines(content: str) -> str:
    return content.replace("\r\n", "\n").replace("\r", "\n")


def split_turns(content: str) -> list[tuple[Role, str]]:
    """Role-prefixed turns of `content`, consecutive turns of one role merged.

    A line without a role prefix continues the current turn (multi-line replies); lines before
    the first prefixed line belong to no turn. Empty turns are dropped.
    """
    text = _lines(content)
    found = _TURN_LINES.findall(text)
    if len(found) == text.count("\n") + 1:
        # Fast path (most points): every line starts a turn, so one regex call splits and
        # strips them; it holds while roles alternate and no turn is empty (nothing to merge).
        fast: list[tuple[Role, str]] = []
        last = None
        for word, said in found:
            role = _ROLE_WORDS.get(word) or _role(word)
            if role == last or not said:
                break
            fast.append((role, said))
            last = role
        else:
            return fast
    turns: list[tuple[Role, list[str]]] = []
    for line in text.split("\n"):
        m = _TURN.match(line)
        if m:
            role = _role(m.group(1))
            rest = line[m.end() :]
            if turns and turns[-1][0] == role:
                turns[-1][1].append(rest)  # same speaker twice in a row: one turn
            else:
                turns.append((role, [rest]))
        elif turns:
            turns[-1][1].append(line)
    out: list[tuple[Role, str]] = []
    for role, lines in turns:
        if len(lines) == 1:
            joined = lines[0].strip()
        else:
            joined = "\n".join(ln.rstrip() for ln in lines).strip()
        if not joined:
            continue
        if out and out[-1][0] == role:  # an empty turn between two of the same role
            out[-1] = (role, out[-1][1] + "\n" + joined)
        else:
            out.append((role, joined))
    return out


def is_conversation(content: str) -> bool:
    """True when any line starts with a role prefix; such a point is never read as a note."""
    if _TURN_LINES.search(_lines(content)):
        return True
    # str.splitlines also breaks at rarer characters: only then can a prefix hide after one.
    return bool(_OTHER_BREAKS.search(content)) and any(
        _TURN.match(line) for line in content.splitlines()
    )


def pairs_from_point(point: MemoryPoint) -> list[Pair]:
    """Every user → assistant exchange of `point`, in order (`Pair.turn` is the pair's index).

    A user turn with no reply after it makes no pair. A note (no role prefixes at all) becomes
    one pair: its summary, or else its keywords, as prompt and its content as completion; a note
    with neither makes no pair.
    """
    created = point.created_at or point.updated_at
    keywords = tuple(point.keywords)
    content = point.content or ""
    turns = split_turns(content)
    if not turns and not is_conversation(content):
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
    for role, text in turns:
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


def why_no_pairs(point: MemoryPoint) -> str:
    """Why `pairs_from_point` found nothing in `point` (the warning an operator reads)."""
    if is_conversation(point.content or ""):
        return "no 'User:'/'用户:' line is followed by an 'Assistant:'/'助手:' line"
    if not (point.content or "").strip():
        return "empty content"
    return "a note (no role lines) needs a summary or keywords as its prompt"


def keep_private(point: MemoryPoint) -> tuple[MemoryPoint, list[Pair], Counter[str]]:
    """What the corpus may hold of `point`: (point to store, its pairs, withheld reason → pairs).

    A pair the filter would drop as sensitive is never stored, only counted: secrets must not
    sit in the corpus for good while the datasets leave them out. When any of the point's text
    holds one, the stored point keeps only the kept pairs' turns, a clean summary and the clean
    keywords; a clean point is stored as it came.
    """
    summary = point.summary or ""
    if not may_be_sensitive("\n".join([point.content, summary, *point.keywords])):
        return point, pairs_from_point(point), Counter()  # the common case, checked at once
    keywords = [k for k in point.keywords if not sensitive_reason_text(k)]
    clean_keywords = len(keywords) == len(point.keywords)
    source = point if clean_keywords else msgspec.structs.replace(point, keywords=keywords)
    kept: list[Pair] = []
    withheld: Counter[str] = Counter()
    for pair in pairs_from_point(source):
        reason = sensitive_reason(pair)
        if reason is None:
            kept.append(pair)
        else:
            withheld[reason] += 1
    clean_summary = not sensitive_reason_text(summary)
    if (
        clean_keywords
        and clean_summary
        and not withheld
        and not sensitive_reason_text(point.content)
    ):
        return point, kept, withheld
    content = "\n".join(
        p.completion if p.kind == "note" else f"user: {p.prompt}\nassistant: {p.completion}"
        for p in kept
    )
    stored = msgspec.structs.replace(
        source, content=content, summary=summary if clean_summary else ""
    )
    return stored, kept, withheld


# --- bus adapter --------------------------------------------------------------------------------


async def on_memory_point(point: MemoryPoint, delivery: Delivery | None, corpus: Corpus) -> str:
    """Store the pairs of one point; returns "added", "updated" or "unchanged"."""
    return (await on_memory_points([(point, delivery)], corpus))[0]


async def on_memory_points(
    batch: Sequence[tuple[MemoryPoint, Delivery | None]],
    corpus: Corpus,
    bus: Bus | None = None,
) -> list[Upsert]:
    """Store the pairs of every point of a fetched batch; an outcome per point, in order.

    The write is one transaction, finished before the bus acks, so a crash before the acks
    only leads to a redelivery that `upsert_points` recognises and ignores; a failure stores
    nothing, and the bus then retries the points one at a time. Sensitive pairs are kept out
    (`keep_private`) and only counted.
    """
    private = [keep_private(point) for point, _ in batch]
    items = [(stored, pairs) for stored, pairs, _ in private]
    # one short local transaction (~1-3 ms for a batch): cheaper inline than a thread hop
    outcomes = corpus.upsert_points(items, [withheld for _, _, withheld in private])
    if bus is not None:
        # a late copy of a forgotten point: kept out of the corpus, and erased from the stream
        for (point, delivery), outcome in zip(batch, outcomes, strict=True):
            if outcome == "forgotten" and delivery is not None:
                log.info("point %s was forgotten: its late copy is erased", point.id)
                await bus.erase_message(COLLECTOR.stream, delivery.stream_seq)
    for (point, pairs, withheld), outcome in zip(private, outcomes, strict=True):
        if not pairs and outcome in ("added", "updated"):  # logged when stored, not per redelivery
            why = "every pair held a secret" if withheld else why_no_pairs(point)
            log.warning("point %s yields no pair: %s", point.id, why)
    if log.isEnabledFor(logging.DEBUG):
        for (point, delivery), (_, pairs), outcome in zip(batch, items, outcomes, strict=True):
            log.debug(
                "point %s: %s (%d pairs, delivery %s)",
                point.id,
                outcome,
                len(pairs),
                getattr(delivery, "num_delivered", "-"),
            )
    return outcomes


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


# Messages per fetch, stored in one transaction and acked together.
FETCH_BATCH = 64


async def serve(bus: Bus, settings: Settings, corpus: Corpus | None = None) -> CollectorService:
    """Consume `memory.point.created` durably into `<data-dir>/corpus.sqlite3`."""
    from shared.corpus import Corpus

    owns = corpus is None
    store = Corpus.open(settings.corpus_path) if corpus is None else corpus
    try:
        inner = await bus.serve_batch(
            COLLECTOR,
            MemoryPoint,
            functools.partial(on_memory_points, corpus=store, bus=bus),
            batch=FETCH_BATCH,
        )
    except BaseException:
        if owns:
            store.close()
        raise
    return CollectorService(inner, store, owns_corpus=owns)
