"""Forgetting a memory point: what to erase and what to retire, decided without any I/O.

The shell (`services/forget.py`) reads the corpus, the streams, the lineages and the files, and
asks these functions what to do:

* `point_texts` / `needles`: the point's texts (its content, summary and every pair), and the
  byte strings they become in the places they are copied to (plain UTF-8, JSON strings at one
  and two levels of quoting, ASCII-escaped JSON, HTML, the Modelfile's sanitized text). A file or
  message that contains one of them holds the point.
* `plan`: the models whose lineage holds the point (all of them are retired), whether the live
  model is one of them, and which model replaces it: the newest promoted model that does not
  hold the point and that the backend still has, else the base.
* `scrub_jsonl` / `scrub_report`: a dataset without the records, a report without the cases,
  that hold the point (the rest of the file stays as it was).
* `file_action`: what happens to one run file that holds the point.
"""

from __future__ import annotations

import html
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from shared.messages import MemoryPoint, ModelLineage, Pair, RunReport
from shared.modelfile import sanitize_text
from shared.names import same_model

# Texts shorter than this say nothing about which point a file holds ("ok", "thanks!"): they
# are not searched for (the pairs and the content they are part of are).
MIN_NEEDLE = 12


def point_texts(points: Iterable[MemoryPoint], pairs: Iterable[Pair]) -> list[str]:
    """Every text of the point (each of its versions): content, summary and each pair's prompt
    and completion, stripped, at least MIN_NEEDLE characters, each once, longest first. The
    shell leaves out those another point holds as well (`Corpus.held_elsewhere`): a common
    reply or a shared summary would otherwise take other points' records with it."""
    found: set[str] = set()
    for point in points:
        found.update((point.content or "", point.summary or ""))
    for pair in pairs:
        found.update((pair.prompt, pair.completion))
    kept = {t.strip() for t in found if len(t.strip()) >= MIN_NEEDLE}
    return sorted(kept, key=lambda t: (-len(t), t))


def _json_body(text: str, *, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)[1:-1]


def needles(texts: Iterable[str]) -> list[bytes]:
    """The byte strings that show a text is present, in every encoding the project writes it."""
    out: set[bytes] = set()
    for text in texts:
        for t in {text, sanitize_text(text)}:
            once = _json_body(t, ascii_only=False)
            for form in (
                t,
                once,
                _json_body(once, ascii_only=False),  # a payload inside a dead letter's `data`
                _json_body(t, ascii_only=True),
                html.escape(t),
                html.escape(t, quote=False),
            ):
                if form:
                    out.add(form.encode("utf-8"))
    return sorted(out, key=lambda n: (-len(n), n))


def holds(data: bytes, found: Sequence[bytes]) -> bool:
    """Whether `data` contains any of the needles."""
    return any(n in data for n in found)


def scrub_jsonl(data: bytes, found: Sequence[bytes]) -> bytes:
    """The JSON lines of `data` without every line that holds a needle."""
    lines = data.splitlines(keepends=True)
    return b"".join(line for line in lines if not holds(line, found))


def scrub_report(report: RunReport, found: Sequence[bytes]) -> RunReport:
    """The report without the validation cases that hold a needle (prompt, expected answer or
    a model's answer); every other field as it was."""
    kept = [c for c in report.cases if not holds(msgspec.json.encode(c), found)]
    return msgspec.structs.replace(report, cases=kept)


FileAction = Literal["keep", "rewrite_jsonl", "rewrite_report", "delete"]


def file_action(name: str, data: bytes, found: Sequence[bytes]) -> FileAction:
    """What to do with one file of the training dir that may hold the point: datasets lose the
    records, JSON reports the cases, that hold it (the HTML page is rendered again from the
    JSON); anything else that holds it (a Modelfile, an HTML page without its JSON, a LoRA run's
    files) is deleted."""
    if not holds(data, found):
        return "keep"
    if name.endswith(".jsonl"):
        return "rewrite_jsonl"
    if name.startswith("report_") and name.endswith(".json"):
        return "rewrite_report"
    return "delete"


def lineage_holds(record: ModelLineage, point_id: int) -> bool:
    return any(pv.id == point_id for pv in record.points)


def still_held(decided: Plan, available: Collection[str]) -> bool:
    """Whether a model that holds the point is not retired yet: not marked, or on the backend."""
    live = ("candidate", "promoted", "unconfirmed")
    return any(
        x.status in live or any(same_model(x.model, m) for m in available) for x in decided.retire
    )


@dataclass(frozen=True)
class Plan:
    """What forgetting one point does to the models."""

    retire: list[ModelLineage]  # every model whose lineage holds the point
    live_retired: bool  # the config's live model is one of them
    switch_to: str | None  # the model the config then names (None: the live one stays)
    switch_run: str | None  # the run that built `switch_to` (None: the base)
    # a model without the point is to be trained: the live model held it, or the newest promoted
    # one did (a redelivery after a crash between the switch and the end)
    retrain: bool = False


def plan(
    point_id: int,
    lineages: Sequence[ModelLineage],
    *,
    live: str | None,
    available: Collection[str],
) -> Plan:
    """Retire every model that holds `point_id`; when the live model is one, switch to the
    newest promoted model that does not hold it and that the backend has (`available`), else
    to the base the live model was built on."""
    retire = [x for x in lineages if lineage_holds(x, point_id)]
    live_retired = bool(live) and any(same_model(x.model, live or "") for x in retire)
    promoted = [x for x in lineages if x.status == "promoted"]
    newest = max(promoted, key=lambda x: (x.promoted_at or x.created_at, x.run_id), default=None)
    retrain = live_retired or (newest is not None and lineage_holds(newest, point_id))
    if not live_retired:
        return Plan(retire, False, None, None, retrain)
    doomed = {x.model for x in retire}
    rivals = sorted(
        (
            x
            for x in lineages
            if x.status == "promoted"
            and x.model not in doomed
            and any(same_model(x.model, m) for m in available)
        ),
        key=lambda x: (x.promoted_at or x.created_at, x.run_id),
        reverse=True,
    )
    if rivals:
        return Plan(retire, True, rivals[0].model, rivals[0].run_id, True)
    built = next(x for x in retire if same_model(x.model, live or ""))
    return Plan(retire, True, built.base_model, None, True)
