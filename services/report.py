"""The run report: what happened, and why the gate decided what it did.

`RunReport` (in `shared.messages`) keeps the original's fields (§6) and adds what a person needs
to trust the decision. It is written as `report_<ts>.json` and as a self-contained
`report_<ts>.html` (inline CSS and SVG, no scripts, nothing fetched; see `report_render`), both
0600 because they quote personal conversations.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from services.report_render import render_html
from services.scoring import Comparison, Decision
from shared.files import ensure_private_dir, write_private
from shared.messages import RunReport
from shared.subjects import REPORT_GLOB, RunNames


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def apply_comparison(
    report: RunReport, cmp: Comparison, decision: Decision, incumbent: Comparison | None = None
) -> RunReport:
    """A copy of `report` with the gate's numbers and decision filled in (NaN → None);
    `incumbent`: new − the live model (`report.incumbent_model`) on the same cases."""
    if incumbent is not None:
        report = msgspec.structs.replace(
            report,
            incumbent_score=_finite(incumbent.base_mean),
            incumbent_accuracy=_finite(incumbent.base_accuracy),
            incumbent_ci_low=_finite(incumbent.ci_low),
            incumbent_ci_high=_finite(incumbent.ci_high),
        )
    errors = {"base": cmp.base_errors, "new": cmp.new_errors}
    if incumbent is not None:
        errors["incumbent"] = incumbent.base_errors
    return msgspec.structs.replace(
        report,
        base_score=_finite(cmp.base_mean),
        validation_score=_finite(cmp.new_mean),
        base_accuracy=_finite(cmp.base_accuracy),
        new_accuracy=_finite(cmp.new_accuracy),
        score_diff=_finite(cmp.mean_diff),
        ci_low=_finite(cmp.ci_low),
        ci_high=_finite(cmp.ci_high),
        confidence=cmp.confidence,
        threshold=cmp.threshold,
        min_effect=decision.min_effect,
        held_out_cases=cmp.cases,
        errors=errors,
        improved=decision.improved,
        decision_reason=decision.reason,
    )


# --- files --------------------------------------------------------------------------------------


def _enc_hook(obj: object) -> object:
    """numpy/torch scalars and arrays (loss values, metrics) as plain numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a run report")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.json.Decoder(RunReport)


class ReportNotFound(FileNotFoundError):
    """No report matches; the message says where we looked."""


def write_report(report: RunReport, training_dir: Path, names: RunNames) -> tuple[Path, Path]:
    """Write report_<run_id>.json and .html (0600); the report records both paths."""
    ensure_private_dir(training_dir)
    json_path = training_dir / names.report_json_file
    html_path = training_dir / names.report_html_file
    report = msgspec.structs.replace(
        report,
        artifacts={
            **report.artifacts,
            "report_json": str(json_path),
            "report_html": str(html_path),
        },
    )
    write_private(json_path, msgspec.json.format(_encoder.encode(report), indent=2) + b"\n")
    write_private(html_path, render_html(report))
    return json_path, html_path


def read_report(path: Path) -> RunReport:
    try:
        return _decoder.decode(Path(path).read_bytes())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{path}: not a run report: {exc}") from exc


def find_report(training_dir: Path, run_id: str | None = None) -> Path:
    """The newest report, or the newest one of `run_id` (matched against run_id, training_id
    or the file's timestamp)."""
    paths = sorted(Path(training_dir).glob(REPORT_GLOB), reverse=True)  # names sort by time
    if not paths:
        raise ReportNotFound(f"no run reports in {training_dir}")
    if run_id is None:
        return paths[0]
    for path in paths:
        if path.name == RunNames(run_id).report_json_file:
            return path
        try:
            report = read_report(path)
        except (ValueError, OSError):
            continue  # a foreign or broken file must not hide the others
        if run_id in (report.run_id, report.training_id):
            return path
    raise ReportNotFound(f"no report for run {run_id!r} among {len(paths)} in {training_dir}")
