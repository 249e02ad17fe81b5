"""The published contract: every subject the code uses has a payload type, `mindx schema`
prints them all, and docs/events.md agrees with the types."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from shared import subjects
from shared.bus import subject_matches
from shared.subjects import PAYLOADS, REPLIES, ConsumerSpec, RunNames, dead_letter_subject

ROOT = Path(__file__).resolve().parents[1]
# Bus methods whose first argument is a subject, and the position of their payload type.
BUS_CALLS = {
    "publish": None,
    "publish_raw": None,
    "publish_and_wait": None,
    "request": 2,  # the reply type
    "reply": 1,
    "subscribe": 1,
    "serve": 1,
    "serve_batch": 1,
}
BUS_RECEIVERS = {"bus", "self.bus"}


class Use:
    def __init__(self, where: str, call: str, subject: str, type_name: str | None) -> None:
        self.where, self.call, self.subject, self.type_name = where, call, subject, type_name

    def __repr__(self) -> str:
        return f"{self.where}: {self.call}({self.subject!r}, {self.type_name})"


def resolve(expr: ast.expr, where: str) -> list[str]:
    """The subjects an argument names, through shared.subjects only (a run id is `RUN`)."""
    if isinstance(expr, ast.IfExp):
        return [*resolve(expr.body, where), *resolve(expr.orelse, where)]
    if isinstance(expr, ast.JoinedStr):
        parts = [
            [str(v.value)] if isinstance(v, ast.Constant) else resolve(v.value, where)  # type: ignore[attr-defined]
            for v in expr.values
        ]
        assert all(len(p) == 1 for p in parts), f"{where}: one subject per f-string"
        return ["".join(p[0] for p in parts)]
    last = ast.unparse(expr).rsplit(".", 1)[-1]
    value = getattr(subjects, last, None)
    if isinstance(value, str):
        return [value]
    if isinstance(value, ConsumerSpec):
        return [value.subject]
    if isinstance(getattr(RunNames, last, None), property):
        return [str(getattr(RunNames("RUN"), last))]
    raise AssertionError(f"{where}: subject {ast.unparse(expr)} does not come from shared.subjects")


def type_name(call: ast.Call, pos: int | None) -> str | None:
    if pos is None:  # a publish: the payload, when it is built in the call
        arg = call.args[1] if len(call.args) > 1 else None
        return arg.func.id if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) else None
    arg = call.args[pos] if len(call.args) > pos else None
    return arg.id if isinstance(arg, ast.Name) else None


def bus_uses() -> Iterator[Use]:
    """Every subject services/ and training/ publish, consume, request or wait for."""
    for path in sorted([*(ROOT / "services").glob("*.py"), *(ROOT / "training").glob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            func = node.func
            if isinstance(func, ast.Name) and func.id == "Expect":
                for subject in resolve(node.args[0], where):
                    yield Use(where, "Expect", subject, type_name(node, 1))
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in BUS_CALLS
                and ast.unparse(func.value) in BUS_RECEIVERS
            ):
                for subject in resolve(node.args[0], where):
                    yield Use(where, func.attr, subject, type_name(node, BUS_CALLS[func.attr]))


def entry(subject: str) -> str | None:
    return next((key for key in PAYLOADS if subject_matches(key, subject)), None)


def test_every_subject_the_code_uses_has_its_payload_type() -> None:
    uses = list(bus_uses())
    assert len(uses) >= 15, uses  # the scan sees the code (not an empty walk)
    for use in uses:
        key = entry(use.subject)
        assert key is not None, f"{use}: no entry in shared.subjects.PAYLOADS"
        if use.type_name is None:
            continue
        want = REPLIES[key] if use.call == "request" else PAYLOADS[key]
        assert use.type_name == want.__name__, f"{use}: PAYLOADS says {want.__name__}"
    # dead letters are published by the bus itself, for any subject
    assert PAYLOADS[entry(dead_letter_subject(subjects.MODEL_VALIDATED)) or ""].__name__ == (
        "DeadLetter"
    )
    # and nothing is listed that no code uses
    used = {entry(u.subject) for u in uses} | {f"{subjects.DEAD_LETTER_PREFIX}.>"}
    assert set(PAYLOADS) == used
    assert set(REPLIES) <= {entry(u.subject) for u in uses if u.call in ("request", "reply")}


def test_mindx_schema_prints_one_json_schema_per_subject() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = json.loads(out)
    assert set(doc) == {"subjects", "replies"}
    assert set(doc["subjects"]) == set(PAYLOADS) and set(doc["replies"]) == set(REPLIES)
    point = doc["subjects"]["memory.point.created"]["$defs"]["MemoryPoint"]
    assert point["required"] == ["id", "content"]
    assert point["properties"]["id"] == {"type": "integer"}
    assert {"type": "string", "format": "date-time"} in point["properties"]["created_at"]["anyOf"]
    assert not doc["subjects"]["training.requested"]["$defs"]["TrainingRequested"]["required"]
    updated = doc["subjects"]["model.updated"]["$defs"]["ModelUpdated"]
    assert updated["properties"]["at"] == {"type": "string", "format": "date-time"}
    reply = doc["replies"]["validation.case"]["$defs"]["ValidationResult"]
    assert {"run_id", "case_id", "model"} <= set(reply["required"])
