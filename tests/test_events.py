"""The published contract: every subject the code uses has a payload type, `mindx schema`
prints them all, and docs/events.md agrees with the types."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

from shared import subjects
from shared.bus import stream_for, subject_matches
from shared.subjects import PAYLOADS, REPLIES, ConsumerSpec, RunNames, dead_letter_subject

ROOT = Path(__file__).resolve().parents[1]
# Bus methods whose first argument is a subject, and the position of their payload type.
BUS_CALLS = {
    "publish": None,
    "publish_raw": None,
    "publish_and_wait": None,
    "request": 2,  # the reply type
    "gather": 2,
    "reply": 1,
    "subscribe": 1,
    "serve": 1,
    "serve_batch": 1,
    "serve_concurrent": 1,
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
    if isinstance(expr, ast.Call):  # a helper of shared.subjects that derives a ConsumerSpec
        helper = getattr(subjects, ast.unparse(expr.func).rsplit(".", 1)[-1], None)
        spec = helper(*(["ARG"] * len(expr.args))) if callable(helper) else None
        assert isinstance(spec, ConsumerSpec), f"{where}: {ast.unparse(expr)} is no ConsumerSpec"
        return [spec.subject]
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
        want = REPLIES[key] if use.call in ("request", "gather") else PAYLOADS[key]
        assert use.type_name == want.__name__, f"{use}: PAYLOADS says {want.__name__}"
    # dead letters are published by the bus itself, for any subject
    assert PAYLOADS[entry(dead_letter_subject(subjects.MODEL_VALIDATED)) or ""].__name__ == (
        "DeadLetter"
    )
    # and nothing is listed that no code uses
    used = {entry(u.subject) for u in uses} | {f"{subjects.DEAD_LETTER_PREFIX}.>"}
    assert set(PAYLOADS) == used
    assert set(REPLIES) <= {
        entry(u.subject) for u in uses if u.call in ("request", "gather", "reply")
    }


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
    # the collector stores ids as SQLite INTEGERs: a Go client's int64
    assert point["properties"]["id"] == {
        "type": "integer",
        "minimum": -(2**63),
        "maximum": 2**63 - 1,
    }
    assert {"type": "string", "format": "date-time"} in point["properties"]["created_at"]["anyOf"]
    assert not doc["subjects"]["training.requested"]["$defs"]["TrainingRequested"]["required"]
    updated = doc["subjects"]["model.updated"]["$defs"]["ModelUpdated"]
    assert updated["properties"]["at"] == {"type": "string", "format": "date-time"}
    reply = doc["subjects"]["validation.result.*"]["$defs"]["ValidationResult"]
    assert {"run_id", "case_id", "model"} <= set(reply["required"])


# --- docs/events.md -----------------------------------------------------------------------------


def type_text(t: msgspec.inspect.Type) -> str:
    """How the events page writes a field's type."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        return " \\| ".join(type_text(u) for u in t.types)
    if isinstance(t, mi.ListType | mi.VarTupleType):
        return f"[{type_text(t.item_type)}]"
    if isinstance(t, mi.LiteralType):
        return " \\| ".join(json.dumps(v) for v in t.values)
    if isinstance(t, mi.StructType):
        return "object"
    return {
        mi.IntType: "int",
        mi.FloatType: "float",
        mi.StrType: "string",
        mi.BoolType: "bool",
        mi.DateTimeType: "time",
        mi.NoneType: "null",
        mi.DictType: "object",
        mi.AnyType: "any",
    }[type(t)]


def field_rows(typ: type) -> list[tuple[str, str, str]]:
    """(field, type, required) of a payload, as the page's tables must list them."""
    info = msgspec.inspect.type_info(typ)
    assert isinstance(info, msgspec.inspect.StructType)
    return [
        (f"`{f.encode_name}`", type_text(f.type), "yes" if f.required else "no")
        for f in info.fields
    ]


EVENTS = ROOT / "docs" / "events.md"


class Section:
    """One `### subject` section of the events page."""

    def __init__(self, heading: str, body: list[str]) -> None:
        self.subjects = re.findall(r"`([^`]+)`", heading)
        self.body = body
        self.tables: list[list[tuple[str, ...]]] = []
        rows: list[tuple[str, ...]] = []
        for line in [*body, ""]:
            if line.startswith("| `"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                rows.append(tuple(cells))
            elif rows:
                self.tables.append(rows)
                rows = []
        text = "\n".join(body)
        self.examples = re.findall(r"```json\n(.*?)\n```", text, re.DOTALL)

    def line(self, label: str) -> str:
        return next(line for line in self.body if line.startswith(f"- **{label}:**"))


def sections() -> list[Section]:
    out: list[Section] = []
    for line in EVENTS.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            out.append(Section(line, []))
        elif out:
            out[-1].body.append(line)
    return [Section("### " + " ".join(f"`{s}`" for s in x.subjects), x.body) for x in out]


def unknown_keys(value: object, t: msgspec.inspect.Type, path: str = "$") -> list[str]:
    """Keys of `value` that the type does not know (msgspec would silently ignore them)."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        return min((unknown_keys(value, u, path) for u in t.types), key=len)
    if isinstance(t, mi.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f.type for f in t.fields}
        out = [f"{path}.{k}" for k in value if k not in fields]
        for k, v in value.items():
            if k in fields:
                out += unknown_keys(v, fields[k], f"{path}.{k}")
        return out
    return []


def test_the_events_page_covers_every_subject_with_its_type_stream_and_fields() -> None:
    found = sections()
    assert sorted(s for sec in found for s in sec.subjects) == sorted(PAYLOADS)
    for sec in found:
        types = re.findall(r"`(\w+)`", sec.line("Type"))
        stream = re.findall(r"`(\w+)`", sec.line("Stream"))
        for subject in sec.subjects:
            reply = REPLIES.get(subject)
            assert types == [PAYLOADS[subject].__name__, *([reply.__name__] if reply else [])]
            sample = subject.replace("*", "RUN").replace(">", "memory.point.created")
            assert stream == ([stream_for(sample)] if stream_for(sample) else []), subject
            wanted = [PAYLOADS[subject], *([reply] if reply else [])]
            got = [[row[:3] for row in table] for table in sec.tables]
            # a payload without fields (an empty request) has no table
            assert got == [field_rows(t) for t in wanted if field_rows(t)], (
                f"{subject}: the tables should list\n"
                + "\n\n".join("\n".join(" | ".join(r) for r in field_rows(t)) for t in wanted)
            )


def test_every_example_on_the_events_page_decodes_as_its_type() -> None:
    from shared.messages import MemoryPoint, RunReport, TrainingFinished, decode

    count = 0
    for sec in sections():
        subject = sec.subjects[0]
        reply = REPLIES.get(subject)
        assert sec.examples, f"{subject}: no example"
        for i, example in enumerate(sec.examples):
            typ = reply if reply is not None and i == len(sec.examples) - 1 else PAYLOADS[subject]
            decoded = decode(example.encode(), typ)  # raises on a wrong type or a missing field
            if typ is not MemoryPoint:  # Memory's extra fields are the point of its example
                keys = unknown_keys(json.loads(example), msgspec.inspect.type_info(typ))
                assert keys == [], f"{subject}: fields the type does not have: {keys}"
            if isinstance(decoded, TrainingFinished):
                report_type = msgspec.inspect.type_info(RunReport)
                assert unknown_keys(decoded.report, report_type) == []
                msgspec.convert(decoded.report, RunReport)
            count += 1
    assert count >= len(PAYLOADS)


def test_the_events_page_lists_the_streams_as_declared() -> None:
    from nats.js.api import RetentionPolicy

    rows = {}
    for line in EVENTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([A-Z_]+)` \| (.*?) \| (.*?) \| (.*?) \|$", line)
        if m:
            rows[m.group(1)] = (re.findall(r"`([^`]+)`", m.group(2)), m.group(3), m.group(4))
    assert set(rows) == {s.name for s in subjects.STREAMS}
    for spec in subjects.STREAMS:
        listed, retention, kept = rows[spec.name]
        assert listed == spec.subjects, spec.name
        assert retention == (
            "work queue" if spec.retention == RetentionPolicy.WORK_QUEUE else "limits"
        )
        if spec.max_age_s is not None:
            days = spec.max_age_s / 86400
            assert kept == f"{days:g} day{'' if days == 1 else 's'}", spec.name
        else:
            assert kept in ("until deleted", "until a worker acks the job"), spec.name


def test_the_readme_links_the_events_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/events.md)" in readme
