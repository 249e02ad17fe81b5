"""The run report for people: a terminal summary and a self-contained HTML page.

The page has inline CSS and SVG, no scripts and nothing fetched; every value from the report is
escaped, since prompts and answers are arbitrary text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from services.scoring import num, signed
from shared.messages import CaseResult, RunReport

# --- text ----------------------------------------------------------------------------------------

_BADGES: dict[str, tuple[str, str]] = {
    "success": ("promoted", "good"),
    "completed_no_improvement": ("not promoted", "neutral"),
    "success_config_failed": ("better, config not updated", "warn"),
    "skipped": ("skipped", "neutral"),
    "failed": ("failed", "bad"),
}


def _pct(x: float | None) -> str:
    return num(x, ".1%")


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _run_name(report: RunReport) -> str:
    return report.run_id or report.training_id or "(unnamed run)"


def _ci_text(report: RunReport, live: bool = False) -> str:
    low, high = (
        (report.incumbent_ci_low, report.incumbent_ci_high)
        if live
        else (report.ci_low, report.ci_high)
    )
    if low is None or high is None:
        return "CI —"
    return f"{num(report.confidence or 0.95, '.0%')} CI [{signed(low)}, {signed(high)}]"


def _live_diff(report: RunReport) -> float | None:
    new, live = report.validation_score, report.incumbent_score
    return new - live if new is not None and live is not None else None


def funnel_line(report: RunReport) -> str:
    """`collected 320 → dedupe 300 → quality 250 → train 226 / held-out 24`."""
    parts: list[str] = []
    if report.funnel:
        parts.append(f"collected {report.funnel[0].count_in}")
        parts.extend(f"{s.stage} {s.count_out}" for s in report.funnel)
    elif report.total_pairs:
        parts.append(f"collected {report.total_pairs}")
    tail = f"train {report.training_pairs} / held-out {report.held_out_cases}"
    return " → ".join([*parts, tail])


def summary_text(report: RunReport, html_path: Path | str | None = None) -> str:
    """A compact terminal summary of a run."""
    badge = _BADGES.get(report.status, (report.status, ""))[0]
    head = f"run {_run_name(report)} ({report.mode}"
    head += f", {report.backend})" if report.backend else ")"
    lines = [f"{head}: {report.status} — {badge}"]
    if report.base_model or report.new_model:
        lines.append(f"  model   {report.base_model or '—'} → {report.new_model or '—'}")
    if report.model_choice:
        lines.append(f"  models  {report.model_choice}")
    if report.error:
        lines.append(f"  error   {report.error}")
    if report.decision_reason:
        lines.append(f"  why     {report.decision_reason}")
    if report.base_score is not None or report.validation_score is not None:
        lines.append(
            f"  score   base {num(report.base_score)}  new {num(report.validation_score)}"
            f"  diff {signed(report.score_diff)}  {_ci_text(report)}"
        )
        thr = f"@{report.threshold:.2f}" if report.threshold is not None else ""
        if report.incumbent_model:
            lines.append(
                f"  live    {report.incumbent_model} {num(report.incumbent_score)}"
                f"  new − live {signed(_live_diff(report))}  {_ci_text(report, live=True)}"
            )
        lines.append(
            f"  acc{thr}  base {_pct(report.base_accuracy)}  new {_pct(report.new_accuracy)}"
            f"  errors base {report.errors.get('base', 0)} new {report.errors.get('new', 0)}"
            f"  cases {report.held_out_cases}"
        )
    lines.append(f"  pairs   {funnel_line(report)} ({report.new_pairs} new)")
    if report.validation_request:
        asked = report.validation_request
        system = "the app's system prompt" if asked.get("system_sent") else "the model's SYSTEM"
        lines.append(f"  asked   with {system}, options {json.dumps(asked.get('options', {}))}")
    if report.timings:
        total = sum(report.timings.values())
        steps = " · ".join(f"{k} {_duration(v)}" for k, v in report.timings.items())
        lines.append(f"  time    {steps} (total {_duration(total)})")
    if report.lora:
        tps = report.lora.get("tokens_per_s")
        lines.append(
            f"  lora    steps {report.lora.get('steps', '—')}  "
            f"tokens/s {num(tps, '.0f') if isinstance(tps, int | float) else '—'}"
        )
    if html_path is not None:
        lines.append(f"  report  {html_path}")
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------------


def esc(value: object) -> str:
    """Escape for text and attribute values alike."""
    return html.escape(str(value), quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_CSS = """
:root{--bg:#fff;--fg:#1d2430;--muted:#5c6675;--line:#d9dee5;--card:#f6f8fa;--good:#1a7f37;
--bad:#cf222e;--warn:#bc4c00;--neutral:#57606a;--accent:#0969da;--drop:#f4c7c3;--kept:#54aeff}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9da7b3;
--line:#30363d;--card:#161b22;--good:#3fb950;--bad:#f85149;--warn:#d29922;--neutral:#8b949e;
--accent:#58a6ff;--drop:#6e2b27;--kept:#1f6feb}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
main{max-width:1040px;margin:0 auto;padding:24px 20px 60px}
h1{font-size:24px;margin:0 0 4px;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
h2{font-size:18px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:0 0 6px}
.muted{color:var(--muted)}
.badge{font-size:13px;font-weight:600;padding:3px 10px;border-radius:999px;color:#fff}
.badge.good{background:var(--good)}.badge.bad{background:var(--bad)}
.badge.warn{background:var(--warn)}.badge.neutral{background:var(--neutral)}
.decision{border-left:5px solid var(--neutral);background:var(--card);padding:12px 16px;
border-radius:6px;margin-top:16px}
.decision.good{border-color:var(--good)}.decision.bad{border-color:var(--bad)}
.decision.warn{border-color:var(--warn)}
.decision p{margin:4px 0}.decision .big{font-size:17px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px}
.stat{background:var(--card);border-radius:6px;padding:10px 12px}
.stat .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.stat .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600}
td.n,th.n{text-align:right}
.bars .row{display:grid;grid-template-columns:170px 1fr;gap:10px;align-items:center;
margin:6px 0}
.bars .label{font-weight:600;overflow-wrap:anywhere}
.bar{display:flex;height:22px;border-radius:4px;overflow:hidden;background:var(--card)}
.bar .kept{background:var(--kept)}.bar .drop{background:var(--drop)}
.bars .note{grid-column:2;font-size:13px;color:var(--muted);margin-top:-4px}
svg{max-width:100%;height:auto;font:12px system-ui,sans-serif}
svg text{fill:var(--fg)}
svg .axis{stroke:var(--muted);stroke-width:1}
svg .grid{stroke:var(--line);stroke-width:1}
svg .diag{stroke:var(--muted);stroke-dasharray:4 4}
svg .gain{fill:var(--good)}svg .loss{fill:var(--bad)}svg .same{fill:var(--neutral)}
svg .ci{stroke:var(--accent);stroke-width:6;stroke-linecap:round}
svg .mean{fill:var(--accent);stroke:var(--bg);stroke-width:2}
svg .zero{stroke:var(--fg);stroke-width:1.5}
svg .min{stroke:var(--warn);stroke-width:1.5;stroke-dasharray:5 3}
svg .curve{fill:none;stroke:var(--accent);stroke-width:2}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.charts figure{margin:0;flex:1 1 360px}
figcaption{font-size:13px;color:var(--muted)}
.case{background:var(--card);border-radius:6px;padding:12px;margin:10px 0}
.case .texts{display:grid;grid-template-columns:1fr 1fr;gap:10px}
@media (max-width:700px){.case .texts{grid-template-columns:1fr}
.bars .row{grid-template-columns:1fr}.bars .note{grid-column:1}}
.text{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--bg);border:1px solid var(--line);
border-radius:4px;padding:6px 8px;font-size:13px;max-height:260px;overflow:auto}
.k2{font-size:12px;color:var(--muted);margin:0 0 2px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}
.err{color:var(--bad)}.up{color:var(--good)}
details summary{cursor:pointer;color:var(--accent)}
"""


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    """Map [lo, hi] linearly onto [a, b] (b < a flips the axis, as SVG's y needs)."""
    span = (hi - lo) or 1.0
    return lambda x: a + (x - lo) / span * (b - a)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _paired(report: RunReport) -> list[CaseResult]:
    return [c for c in report.cases if c.base_score is not None and c.new_score is not None]


def _diff(c: CaseResult) -> float:
    """new − base of a paired case."""
    return (c.new_score or 0.0) - (c.base_score or 0.0)


def _scatter_svg(report: RunReport) -> str:
    """Base score (x) against new score (y), one dot per paired case; above the diagonal = gain."""
    cases = _paired(report)
    values = [v for c in cases for v in (c.base_score, c.new_score) if v is not None]
    lo, hi = min([0.0, *values]), max([1.0, *values])
    size, m = 340, 44
    sx, sy = _scale(lo, hi, m, size - 12), _scale(lo, hi, size - m + 8, 12)
    out = [
        f'<svg viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
        f'aria-label="per-case scores, base against new">'
    ]
    for t in _ticks(lo, hi):
        out.append(
            f'<line class="grid" x1="{sx(t):.1f}" y1="{sy(lo):.1f}" x2="{sx(t):.1f}" '
            f'y2="{sy(hi):.1f}"/><line class="grid" x1="{sx(lo):.1f}" y1="{sy(t):.1f}" '
            f'x2="{sx(hi):.1f}" y2="{sy(t):.1f}"/>'
            f'<text x="{sx(t):.1f}" y="{sy(lo) + 16:.1f}" text-anchor="middle">{t:g}</text>'
            f'<text x="{sx(lo) - 6:.1f}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    if report.threshold is not None and lo <= report.threshold <= hi:
        th = report.threshold
        out.append(
            f'<line class="min" x1="{sx(th):.1f}" y1="{sy(lo):.1f}" x2="{sx(th):.1f}" '
            f'y2="{sy(hi):.1f}" opacity=".45"/><line class="min" x1="{sx(lo):.1f}" '
            f'y1="{sy(th):.1f}" x2="{sx(hi):.1f}" y2="{sy(th):.1f}" opacity=".45"/>'
        )
    out.append(
        f'<line class="diag" x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" '
        f'y2="{sy(hi):.1f}"/>'
        f'<text x="{(sx(lo) + sx(hi)) / 2:.1f}" y="{size - 4}" text-anchor="middle">'
        f"base score</text>"
        f'<text x="12" y="{(sy(lo) + sy(hi)) / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(sy(lo) + sy(hi)) / 2:.1f})">new score</text>'
    )
    for c in cases:
        assert c.base_score is not None and c.new_score is not None
        d = c.new_score - c.base_score
        cls = "gain" if d > 1e-9 else "loss" if d < -1e-9 else "same"
        out.append(
            f'<circle class="{cls}" cx="{sx(c.base_score):.1f}" cy="{sy(c.new_score):.1f}" '
            f'r="4.5" fill-opacity=".7"><title>case {c.case_id}: {c.base_score:.3f} → '
            f"{c.new_score:.3f} ({d:+.3f})\n{esc(_clip(c.prompt, 160))}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


def _diff_strip_svg(report: RunReport) -> str:
    """Per-case differences (new − base), sorted: how many cases gained, how many lost, how much."""
    diffs = sorted(((_diff(c), c) for c in _paired(report)), key=lambda t: (t[0], t[1].case_id))
    width, height, m = 340, 340, 44
    lo = min([-0.1, *(d for d, _ in diffs)])
    hi = max([0.1, *(d for d, _ in diffs)])
    sy = _scale(lo, hi, height - 30, 12)
    n = max(len(diffs), 1)
    bw = (width - m - 12) / n
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="per-case score differences, sorted">'
    ]
    for t in _ticks(lo, hi):
        out.append(
            f'<line class="grid" x1="{m}" y1="{sy(t):.1f}" x2="{width - 12}" y2="{sy(t):.1f}"/>'
            f'<text x="{m - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:+g}</text>'
        )
    for i, (d, c) in enumerate(diffs):
        cls = "gain" if d > 1e-9 else "loss" if d < -1e-9 else "same"
        y0, y1 = sy(0.0), sy(d)
        top, h = min(y0, y1), max(abs(y1 - y0), 1.0)
        out.append(
            f'<rect class="{cls}" x="{m + i * bw + bw * 0.1:.1f}" y="{top:.1f}" '
            f'width="{max(bw * 0.8, 0.8):.1f}" height="{h:.1f}"><title>case {c.case_id}: '
            f"{d:+.3f}\n{esc(_clip(c.prompt, 160))}</title></rect>"
        )
    out.append(
        f'<line class="zero" x1="{m}" y1="{sy(0.0):.1f}" x2="{width - 12}" y2="{sy(0.0):.1f}"/>'
        f'<text x="{(m + width - 12) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"held-out cases, sorted by new − base</text></svg>"
    )
    return "".join(out)


def _ci_svg(report: RunReport) -> str:
    """The CI of the mean difference against 0 and the minimum effect."""
    assert report.ci_low is not None and report.ci_high is not None
    min_effect = report.min_effect if report.min_effect is not None else 0.0
    mean = report.score_diff if report.score_diff is not None else report.ci_low
    pts = [report.ci_low, report.ci_high, 0.0, min_effect, mean]
    lo, hi = min(pts), max(pts)
    pad = max((hi - lo) * 0.15, 0.02)
    lo, hi = lo - pad, hi + pad
    width, height, m = 640, 110, 24
    sx = _scale(lo, hi, m, width - m)
    axis_y, bar_y = 78, 44
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="confidence interval of the score difference">'
        f'<line class="axis" x1="{m}" y1="{axis_y}" x2="{width - m}" y2="{axis_y}"/>'
    ]
    for t in _ticks(lo, hi, 8):
        out.append(
            f'<line class="axis" x1="{sx(t):.1f}" y1="{axis_y}" x2="{sx(t):.1f}" '
            f'y2="{axis_y + 5}"/><text x="{sx(t):.1f}" y="{axis_y + 18}" '
            f'text-anchor="middle">{t:+g}</text>'
        )
    out.append(
        f'<line class="zero" x1="{sx(0.0):.1f}" y1="14" x2="{sx(0.0):.1f}" y2="{axis_y}"/>'
        f'<text x="{sx(0.0):.1f}" y="11" text-anchor="middle">0</text>'
    )
    if abs(min_effect) > 1e-12:
        out.append(
            f'<line class="min" x1="{sx(min_effect):.1f}" y1="14" x2="{sx(min_effect):.1f}" '
            f'y2="{axis_y}"/><text x="{sx(min_effect):.1f}" y="11" text-anchor="middle">'
            f"min effect {min_effect:+.3f}</text>"
        )
    out.append(
        f'<line class="ci" x1="{sx(report.ci_low):.1f}" y1="{bar_y}" '
        f'x2="{sx(report.ci_high):.1f}" y2="{bar_y}"/>'
        f'<circle class="mean" cx="{sx(mean):.1f}" cy="{bar_y}" r="7"/>'
        f'<text x="{sx(report.ci_low):.1f}" y="{bar_y - 12}" text-anchor="middle">'
        f"{report.ci_low:+.3f}</text>"
        f'<text x="{sx(report.ci_high):.1f}" y="{bar_y - 12}" text-anchor="middle">'
        f"{report.ci_high:+.3f}</text></svg>"
    )
    return "".join(out)


def _loss_svg(curve: Sequence[Sequence[float]]) -> str:
    points = [(float(p[0]), float(p[1])) for p in curve if len(p) >= 2 and math.isfinite(p[1])]
    if not points:
        return '<p class="muted">No loss values were recorded.</p>'
    width, height, m = 640, 240, 48
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    sx, sy = _scale(x_lo, x_hi, m, width - 14), _scale(y_lo, y_hi, height - 34, 12)
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="training loss by step">'
    ]
    for t in _ticks(y_lo, y_hi):
        out.append(
            f'<line class="grid" x1="{m}" y1="{sy(t):.1f}" x2="{width - 14}" y2="{sy(t):.1f}"/>'
            f'<text x="{m - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    for t in _ticks(x_lo, x_hi, 6):
        out.append(f'<text x="{sx(t):.1f}" y="{height - 18}" text-anchor="middle">{t:g}</text>')
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    out.append(
        f'<polyline class="curve" points="{line}"/>'
        f'<text x="{(m + width) / 2:.1f}" y="{height - 2}" text-anchor="middle">step</text>'
        "</svg>"
    )
    return "".join(out)


def _bars(rows: Iterable[tuple[str, float, float, str]], scale_max: float) -> str:
    """Rows of (label, kept, dropped, note) as horizontal bars scaled to scale_max."""
    out = ['<div class="bars">']
    for label, kept, dropped, note in rows:
        k = 100 * kept / scale_max if scale_max else 0
        d = 100 * dropped / scale_max if scale_max else 0
        out.append(
            f'<div class="row"><div class="label">{esc(label)}</div><div class="bar">'
            f'<div class="kept" style="width:{k:.2f}%"></div>'
            f'<div class="drop" style="width:{d:.2f}%"></div></div>'
            + (f'<div class="note">{note}</div>' if note else "")
            + "</div>"
        )
    out.append("</div>")
    return "".join(out)


def _funnel_html(report: RunReport) -> str:
    if not report.funnel:
        return f'<p class="muted">{esc(funnel_line(report))}</p>'
    top = max([s.count_in for s in report.funnel] + [s.count_out for s in report.funnel] + [1])
    rows = []
    for s in report.funnel:
        dropped = max(s.count_in - s.count_out, 0)
        reasons = " · ".join(
            f"{esc(r)} {n}" for r, n in sorted(s.dropped.items(), key=lambda kv: -kv[1])
        )
        note = f"{s.count_in} → <b>{s.count_out}</b>"
        if dropped:
            note += f", dropped {dropped}" + (f": {reasons}" if reasons else "")
        rows.append((s.stage, float(s.count_out), float(dropped), note))
    return (
        _bars(rows, float(top))
        + f'<p class="muted">{esc(funnel_line(report))}. Blue: kept; red: dropped.</p>'
    )


def _timings_html(report: RunReport) -> str:
    if not report.timings:
        return '<p class="muted">No timings were recorded.</p>'
    top = max(report.timings.values()) or 1.0
    total = sum(report.timings.values())
    rows = [
        (stage, secs, 0.0, f"{_duration(secs)} ({100 * secs / total:.0f}%)" if total else "")
        for stage, secs in report.timings.items()
    ]
    return _bars(rows, top) + f'<p class="muted">Total {_duration(total)}.</p>'


def _text_block(title: str, text: str, error: str | None = None) -> str:
    body = f'<div class="text">{esc(_clip(text, 2000))}</div>' if text else ""
    if error:
        body += f'<div class="text err">error: {esc(_clip(error, 500))}</div>'
    if not body:
        body = '<div class="text muted">(empty)</div>'
    return f'<div><p class="k2">{esc(title)}</p>{body}</div>'


def _case_card(c: CaseResult, live: str | None = None) -> str:
    d = _diff(c)
    live_block = (
        _text_block(
            f"live model answer ({num(c.incumbent_score)})", c.incumbent_answer, c.incumbent_error
        )
        if live
        else ""
    )
    topic = f" · {esc(c.topic)}" if c.topic else ""
    return (
        f'<div class="case"><h3>case {c.case_id}{topic} · base {num(c.base_score)} → new '
        f'{num(c.new_score)} <span class="{"up" if d > 0 else "err"}">({d:+.3f})</span></h3>'
        f'<div class="texts">{_text_block("prompt", c.prompt)}'
        f"{_text_block('expected (held out, never trained on)', c.expected)}"
        f"{_text_block('base answer', c.base_answer, c.base_error)}"
        f"{_text_block('new answer', c.new_answer, c.new_error)}{live_block}</div></div>"
    )


def _changed_most(report: RunReport, k: int = 5) -> str:
    diffs = [(_diff(c), c) for c in _paired(report)]
    gains = sorted((t for t in diffs if t[0] > 0), key=lambda t: (-t[0], t[1].case_id))[:k]
    losses = sorted((t for t in diffs if t[0] < 0), key=lambda t: (t[0], t[1].case_id))[:k]
    out = [f"<h3>Largest gains ({len(gains)})</h3>"]
    live = report.incumbent_model
    out += [_case_card(c, live) for _, c in gains] or ['<p class="muted">No case improved.</p>']
    out.append(f"<h3>Largest losses ({len(losses)})</h3>")
    out += [_case_card(c, live) for _, c in losses] or ['<p class="muted">No case got worse.</p>']
    return "".join(out)


def _cases_table(report: RunReport) -> str:
    rows = []
    for c in report.cases:
        d = (
            f"{c.new_score - c.base_score:+.3f}"
            if c.base_score is not None and c.new_score is not None
            else "—"
        )
        errs = "; ".join(
            f"{side}: {_clip(e, 80)}"
            for side, e in (
                ("base", c.base_error),
                ("new", c.new_error),
                ("live", c.incumbent_error),
            )
            if e
        )
        rows.append(
            f'<tr><td class="n">{c.case_id}</td><td>{esc(c.topic)}</td>'
            f'<td class="n">{num(c.base_score)}</td><td class="n">{num(c.new_score)}</td>'
            f'<td class="n">{num(c.incumbent_score)}</td>'
            f'<td class="n">{d}</td><td>{esc(_clip(c.prompt, 140))}'
            + (f'<div class="err">{esc(errs)}</div>' if errs else "")
            + "</td></tr>"
        )
    return (
        f"<details><summary>All {len(report.cases)} held-out cases</summary><table>"
        '<tr><th class="n">case</th><th>topic</th><th class="n">base</th><th class="n">new</th>'
        '<th class="n">live</th><th class="n">new − base</th><th>prompt</th></tr>'
        f"{''.join(rows)}</table></details>"
    )


def _decision_html(report: RunReport, tone: str) -> str:
    base, new = esc(report.base_model or "the base model"), esc(report.new_model or "new model")
    live = f"<b>{esc(report.incumbent_model)}</b>" if report.incumbent_model else f"<b>{base}</b>"
    headline = {
        "success": f"<b>{new}</b> replaces {live} as the left-brain model.",
        "completed_no_improvement": f"{live} stays: {new} was not shown to be better.",
        "success_config_failed": (
            f"{new} is better than {base}, but the model config could not be updated."
        ),
        "skipped": "Nothing was trained.",
        "failed": "The run failed; the model config was not changed.",
    }.get(report.status, esc(report.status))
    parts = [f'<section class="decision {tone}"><p class="big">{headline}</p>']
    if report.decision_reason:
        parts.append(f"<p><b>Why:</b> {esc(report.decision_reason)}</p>")
    if report.error:
        parts.append(f'<p class="err"><b>Error:</b> {esc(report.error)}</p>')
    parts.append("</section>")
    return "".join(parts)


def _stat(label: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="muted">{sub}</div>' if sub else ""
    return (
        f'<div class="stat"><div class="k">{esc(label)}</div><div class="v">{value}</div>'
        f"{sub_html}</div>"
    )


def _scores_html(report: RunReport) -> str:
    if report.base_score is None and report.validation_score is None and not report.cases:
        return ""
    thr = f" (score ≥ {report.threshold:.2f})" if report.threshold is not None else ""
    stats = [
        _stat("held-out cases", str(report.held_out_cases), f"{len(_paired(report))} paired"),
        _stat("base score", num(report.base_score), f"accuracy {_pct(report.base_accuracy)}"),
        _stat("new score", num(report.validation_score), f"accuracy {_pct(report.new_accuracy)}"),
        _stat("difference", signed(report.score_diff), esc(_ci_text(report))),
        *(
            [
                _stat(
                    "live model score",
                    num(report.incumbent_score),
                    f"{esc(report.incumbent_model)}, accuracy {_pct(report.incumbent_accuracy)}",
                ),
                _stat("new − live", signed(_live_diff(report)), esc(_ci_text(report, live=True))),
            ]
            if report.incumbent_model
            else []
        ),
        _stat(
            "scoring errors",
            f"{report.errors.get('base', 0)} / {report.errors.get('new', 0)}",
            "base / new",
        ),
    ]
    out = [
        "<h2>Scores on held-out cases</h2>",
        f'<div class="grid">{"".join(stats)}</div>',
        '<p class="muted">Held-out prompts never appear in the training data'
        + (", nor among the live model's examples" if report.incumbent_model else "")
        + ". Means and "
        f"accuracy{esc(thr)} are over cases both models answered; a case with an error on "
        f"either side is left out of the comparison, not scored 0.</p>",
    ]
    if report.ci_low is not None and report.ci_high is not None:
        out += [
            "<h3>Confidence interval of the difference (new − base)</h3>",
            _ci_svg(report),
            '<p class="muted">Paired bootstrap over cases. The new model is promoted only when '
            + (
                "the whole interval lies above the minimum effect (dashed; solid: 0).</p>"
                if report.min_effect
                else "the whole interval lies above 0 (the solid line).</p>"
            ),
        ]
    if _paired(report):
        out += [
            '<div class="charts"><figure>',
            _scatter_svg(report),
            "<figcaption>Each dot is a case: above the diagonal the new model scored higher. "
            "Dashed: accuracy threshold.</figcaption></figure><figure>",
            _diff_strip_svg(report),
            "<figcaption>Score change per case, sorted.</figcaption></figure></div>",
        ]
    if report.cases:
        out += ["<h2>Cases that changed most</h2>", _changed_most(report), _cases_table(report)]
    return "".join(out)


def _lora_html(lora: dict[str, Any]) -> str:
    def val(key: str, fmt: str) -> str:
        v = lora.get(key)
        return num(float(v), fmt) if isinstance(v, int | float) else "—"

    exports = lora.get("exports") or lora.get("export_kinds") or []
    stats = [
        _stat("steps", val("steps", ".0f")),
        _stat("tokens / s", val("tokens_per_s", ",.0f")),
        _stat("training time", esc(_duration(lora.get("elapsed_s")))),
        _stat("peak memory", val("peak_memory_mb", ",.0f") + " MB"),
        _stat("exported", esc(", ".join(map(str, exports)) or "—")),
    ]
    return (
        "<h2>LoRA training</h2>"
        f'<div class="grid">{"".join(stats)}</div><h3 style="margin-top:14px">Loss</h3>'
        + _loss_svg(lora.get("loss_curve") or [])
    )


def _meta_html(report: RunReport) -> str:
    def when(t: datetime | None) -> str:
        return t.isoformat(sep=" ", timespec="seconds") if t else "—"

    duration = (
        _duration((report.end_time - report.start_time).total_seconds())
        if report.start_time and report.end_time
        else "—"
    )
    rows = [
        ("run", report.run_id),
        ("training id", report.training_id),
        ("request", report.request_id or ""),
        ("mode / backend", f"{report.mode} / {report.backend or '—'}"),
        ("base model", report.base_model),
        ("new model", report.new_model),
        ("live model", report.incumbent_model or ""),
        ("embeddings", report.embed_model),
        ("model choice", report.model_choice),
        ("started", when(report.start_time)),
        ("ended", f"{when(report.end_time)} ({duration})"),
        (
            "pairs",
            f"{report.total_pairs} collected, {report.filtered_pairs} after filters, "
            f"{report.training_pairs} trained on",
        ),
        ("training time", _duration(report.training_time)),
    ]
    rows += [(f"config {k}", str(v)) for k, v in report.config.items() if v]
    rows += [(k, v) for k, v in report.artifacts.items()]
    body = "".join(
        f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in rows if v
    )
    return f"<h2>Run details</h2><table>{body}</table>"


def render_html(report: RunReport) -> str:
    """The report as one self-contained page: inline CSS and SVG, no scripts, no fetches."""
    label, tone = _BADGES.get(report.status, (report.status, "neutral"))
    name = esc(_run_name(report))
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>mindx training {name}: {esc(label)}</title><style>{_CSS}</style></head>"
        f'<body><main><h1>Training run {name} <span class="badge {tone}">{esc(label)}</span>'
        f'</h1><div class="muted">{esc(report.mode)} mode'
        + (f" · {esc(report.backend)}" if report.backend else "")
        + (
            f" · {esc(report.base_model)} → {esc(report.new_model or '—')}"
            if report.base_model
            else ""
        )
        + (f" · live: {esc(report.incumbent_model)}" if report.incumbent_model else "")
        + "</div>",
        _decision_html(report, tone),
        _scores_html(report),
        "<h2>Pairs</h2>",
        _funnel_html(report),
        f'<p class="muted">{esc(report.selection)}.</p>' if report.selection else "",
        "<h2>Time per stage</h2>",
        _timings_html(report),
    ]
    if report.lora:
        parts.append(_lora_html(report.lora))
    parts.append(_meta_html(report))
    parts.append(
        '<p class="muted" style="margin-top:32px">This page quotes personal conversations; '
        "it is readable by its owner only.</p></main></body></html>\n"
    )
    return "".join(parts)
