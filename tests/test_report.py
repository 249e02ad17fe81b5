"""The run report: JSON round trip, a self-contained and escaped HTML page, lookup, summary."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import msgspec
import numpy as np
import pytest

from services.report import ReportNotFound, apply_comparison, find_report, read_report, write_report
from services.report_render import render_html, summary_text
from services.scoring import compare, decide
from shared.messages import CaseResult, FunnelStage, RunReport
from shared.subjects import RunNames

EVIL = '<script>alert("x")</script>'

PROMPTS = [
    "我想找一家在市中心的便宜酒店，有推荐吗？",
    "What time does the last train to Cambridge leave on Sunday?",
    "帮我订一辆出租车，明天早上八点从酒店去机场。",
    "Is there a museum near the centre that is free to enter?",
    "周杰伦的《晴天》是哪一年发行的？",
    "Can you book a table for 4 at an Italian place tonight?",
]


def realistic_report(n: int = 24, *, lora: bool = False) -> RunReport:
    """A message-mode run as the trainer would assemble it, with real-looking text."""
    rng = np.random.default_rng(0)
    base = np.clip(rng.uniform(0.3, 0.8, n), 0, 1)
    new = np.clip(base + rng.normal(0.1, 0.08, n), 0, 1)
    base_scores: list[float | None] = [float(x) for x in base]
    new_scores: list[float | None] = [float(x) for x in new]
    base_scores[3] = None  # the base timed out on one case
    cases = [
        CaseResult(
            case_id=i,
            prompt=PROMPTS[i % len(PROMPTS)] + f" (#{i})",
            expected=f"expected answer {i}\nwith a second line",
            base_answer="" if base_scores[i] is None else f"base says {i}",
            new_answer=f"new says {i}",
            base_score=base_scores[i],
            new_score=new_scores[i],
            base_error="timeout after 60 s" if base_scores[i] is None else None,
            topic=["hotel", "train", "taxi", "attraction", "music", "restaurant"][i % 6],
        )
        for i in range(n)
    ]
    cmp = compare(base_scores, new_scores, seed=0)
    decision = decide(cmp, cases=n)
    start = datetime(2025, 3, 3, 9, 0, 0, tzinfo=UTC)
    report = RunReport(
        training_id="20250303_090000",
        run_id="20250303_090000",
        request_id="req-1",
        start_time=start,
        end_time=start + timedelta(seconds=95.5),
        base_model="qwen3:0.6b",
        new_model="qwen3-0.6b-mindx-20250303_090000",
        total_pairs=320,
        filtered_pairs=250,
        training_pairs=226,
        training_time=2.5,
        status="success" if decision.improved else "completed_no_improvement",
        mode="lora" if lora else "message",
        backend="ollama",
        funnel=[
            FunnelStage(stage="dedupe", count_in=320, count_out=300, dropped={"exact": 20}),
            FunnelStage(
                stage="quality",
                count_in=300,
                count_out=250,
                dropped={"too_short": 30, "refusal": 15, "near_duplicate": 5},
            ),
            FunnelStage(stage="split", count_in=250, count_out=226, dropped={"held_out": n}),
        ],
        timings={"collect": 0.2, "filter": 1.1, "validate_base": 40.0, "create": 2.5},
        cases=cases,
        artifacts={"dataset": "/data/training/train_data_20250303_090000.jsonl"},
        config={"path": "/cfg/models.json", "backup_path": "/cfg/models.json.backup.x"},
        lora={
            "loss_curve": [[s, 2.5 * np.exp(-s / 40) + 0.3] for s in range(0, 200, 10)],
            "tokens_per_s": 812.4,
            "steps": 200,
            "elapsed_s": 312.0,
            "peak_memory_mb": 2048.0,
            "exports": ["adapter", "merged"],
        }
        if lora
        else None,
    )
    return apply_comparison(report, cmp, decision)


class TagBalance(HTMLParser):
    """Checks that every opened element is closed in order (void elements aside)."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        pass  # <line .../>

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def assert_well_formed(page: str) -> None:
    parser = TagBalance()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []


def assert_self_contained(page: str) -> None:
    low = page.lower()
    assert "http://" not in low and "https://" not in low
    assert "<script" not in low  # no scripts at all, inline or external
    assert not re.search(r"\b(src|href)\s*=", low)
    assert "@import" not in low and "url(" not in low
    assert "<link" not in low and "<iframe" not in low


# --- JSON ---------------------------------------------------------------------------------------


def test_json_round_trip_and_private_files(tmp_path: Path) -> None:
    report = realistic_report(lora=True)
    json_path, html_path = write_report(report, tmp_path / "training", RunNames("20250303_090000"))
    assert json_path.name == "report_20250303_090000.json"
    assert html_path.name == "report_20250303_090000.html"
    for path in (json_path, html_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = read_report(json_path)
    expected = msgspec.structs.replace(
        report,
        artifacts={
            **report.artifacts,
            "report_json": str(json_path),
            "report_html": str(html_path),
        },
    )
    assert loaded == expected
    # the seed's field names are in the JSON, with times as RFC 3339
    raw = msgspec.json.decode(json_path.read_bytes())
    for field in (
        "training_id start_time end_time base_model new_model total_pairs filtered_pairs "
        "training_pairs training_time base_score validation_score improved status error"
    ).split():
        assert field in raw
    assert raw["start_time"] == "2025-03-03T09:00:00Z"
    assert raw["errors"] == {"base": 1, "new": 0}


def test_gate_numbers_fill_the_report_and_nan_becomes_null(tmp_path: Path) -> None:
    report = realistic_report()
    assert report.improved and report.status == "success"
    assert report.ci_low is not None and report.ci_low > 0
    assert report.held_out_cases == 24 and report.errors == {"base": 1, "new": 0}
    assert "23 held-out cases" in report.decision_reason

    cmp = compare([0.5], [None])  # nothing paired: every statistic NaN
    bare = apply_comparison(RunReport(run_id="r1", status="failed"), cmp, decide(cmp, cases=1))
    assert bare.base_score is None and bare.ci_low is None and bare.score_diff is None
    json_path, _ = write_report(bare, tmp_path, RunNames("20250101_000000"))
    assert read_report(json_path).ci_low is None
    assert b"NaN" not in json_path.read_bytes()


def test_read_report_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "report_20250101_000000.json"
    bad.write_text('{"status": "exploded"}')
    with pytest.raises(ValueError, match=r"report_20250101_000000\.json"):
        read_report(bad)


# --- lookup -------------------------------------------------------------------------------------


def test_find_report_latest_by_run_and_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportNotFound, match=str(tmp_path)):
        find_report(tmp_path, None)
    write_report(RunReport(run_id="run-a", status="skipped"), tmp_path, RunNames("20250101_120000"))
    write_report(RunReport(run_id="run-c", status="failed"), tmp_path, RunNames("20250301_080000"))
    write_report(RunReport(run_id="run-b", status="skipped"), tmp_path, RunNames("20250201_000000"))
    (tmp_path / "report_20240101_000000.json").write_text("not json")  # ignored when searching
    assert find_report(tmp_path).name == "report_20250301_080000.json"
    assert find_report(tmp_path, "run-b").name == "report_20250201_000000.json"
    assert find_report(tmp_path, "20250101_120000").name == "report_20250101_120000.json"
    with pytest.raises(ReportNotFound, match="'run-z'"):
        find_report(tmp_path, "run-z")


# --- HTML ---------------------------------------------------------------------------------------


def test_html_is_self_contained_and_well_formed(tmp_path: Path) -> None:
    _, html_path = write_report(realistic_report(lora=True), tmp_path, RunNames("20250303_090000"))
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert_self_contained(page)
    assert_well_formed(page)


def test_html_shows_decision_funnel_scores_timings_and_loss(tmp_path: Path) -> None:
    report = realistic_report(lora=True)
    page = render_html(report)
    assert 'class="badge good">promoted<' in page
    assert "qwen3-0.6b-mindx-20250303_090000</b> replaces <b>qwen3:0.6b" in page
    assert report.decision_reason.replace("…", "…") in page
    # funnel: every stage with its counts and drop reasons
    assert "300 → <b>250</b>, dropped 50: too_short 30 · refusal 15 · near_duplicate 5" in page
    assert "collected 320 → dedupe 300 → quality 250 → split 226 → train 226 / held-out 24" in page
    # scatter: one dot per paired case (the base's error on case 3 is left out)
    scatter = page.split('aria-label="per-case scores, base against new"')[1].split("</svg>")[0]
    assert scatter.count("<circle") == 23
    assert "case 3:" not in scatter
    # the CI drawn against 0
    ci = page.split('aria-label="confidence interval')[1].split("</svg>")[0]
    assert f"{report.ci_low:+.3f}" in ci and f"{report.ci_high:+.3f}" in ci
    assert 'class="zero"' in ci
    # timings per stage
    for stage in report.timings:
        assert f'<div class="label">{stage}</div>' in page
    assert "40.0 s (91%)" in page
    # LoRA: loss curve with every point, tokens/s
    curve = page.split('aria-label="training loss by step"')[1].split("</svg>")[0]
    points = re.search(r'<polyline class="curve" points="([^"]+)"', curve)
    assert points and len(points.group(1).split()) == 20
    assert ">812<" in page


def test_html_lists_top_five_gains_and_losses(tmp_path: Path) -> None:
    diffs = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, -0.05, -0.1, -0.2, -0.3, -0.4, -0.5, 0.0]
    cases = [
        CaseResult(
            case_id=i,
            prompt=f"prompt {i}",
            expected="e",
            base_score=0.5,
            new_score=0.5 + d,
            base_answer=f"base answer {i}",
            new_answer=f"new answer {i}",
        )
        for i, d in enumerate(diffs)
    ]
    page = render_html(RunReport(run_id="r", status="completed_no_improvement", cases=cases))
    gains = page.split("Largest gains")[1].split("Largest losses")[0]
    losses = page.split("Largest losses")[1].split("<details>")[0]
    shown = lambda part: [int(x) for x in re.findall(r"<h3>case (\d+) ", part)]  # noqa: E731
    assert shown(gains) == [0, 1, 2, 3, 4]
    assert shown(losses) == [11, 10, 9, 8, 7]
    assert "new answer 0" in gains and "base answer 11" in losses
    assert page.count("<tr><td") == len(cases)  # the full table lists every case


def test_user_text_is_escaped_everywhere() -> None:
    case = CaseResult(
        case_id=1,
        prompt=EVIL,
        expected=EVIL,
        base_answer=EVIL,
        new_answer=EVIL,
        base_score=0.2,
        new_score=0.9,
        new_error=None,
        topic=EVIL,
    )
    errored = CaseResult(case_id=2, prompt=EVIL, expected="x", base_score=0.3, base_error=EVIL)
    report = RunReport(
        run_id=EVIL,
        base_model=EVIL,
        new_model=EVIL,
        backend=EVIL,
        mode=EVIL,
        status="failed",
        error=EVIL,
        decision_reason=EVIL,
        base_score=0.2,
        validation_score=0.9,
        cases=[case, errored],
        funnel=[FunnelStage(stage=EVIL, count_in=2, count_out=1, dropped={EVIL: 1})],
        timings={EVIL: 1.0},
        artifacts={EVIL: EVIL},
        config={"path": EVIL},
        lora={"exports": [EVIL], "elapsed_s": EVIL, "loss_curve": []},
    )
    page = render_html(report)
    assert "<script" not in page.lower()
    assert '"x"' not in page  # quotes escaped too (attribute safety)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert_well_formed(page)


def test_skipped_and_failed_reports_render(tmp_path: Path) -> None:
    skipped = RunReport(
        run_id="r-skip",
        status="skipped",
        decision_reason="only 3 new pairs since the last run (min_corpus 50)",
        total_pairs=3,
    )
    failed = RunReport(run_id="r-fail", status="failed", error="ollama: connection refused")
    for report in (skipped, failed, RunReport()):
        _, html_path = write_report(report, tmp_path, RunNames("20250101_000000"))
        page = html_path.read_text(encoding="utf-8")
        assert_self_contained(page)
        assert_well_formed(page)
    assert "Nothing was trained." in render_html(skipped)
    assert "min_corpus 50" in render_html(skipped)
    assert "ollama: connection refused" in render_html(failed)
    assert 'class="badge bad">failed<' in render_html(failed)


# --- terminal -----------------------------------------------------------------------------------


def test_summary_text_has_the_decision_and_where_the_page_is() -> None:
    report = realistic_report(lora=True)
    text = summary_text(report, Path("/data/training/report_20250303_090000.html"))
    lines = text.splitlines()
    assert lines[0] == "run 20250303_090000 (lora, ollama): success — promoted"
    assert "qwen3:0.6b → qwen3-0.6b-mindx-20250303_090000" in text
    assert report.decision_reason in text
    assert f"95% CI [{report.ci_low:+.3f}, {report.ci_high:+.3f}]" in text
    assert "acc@0.70" in text and "errors base 1 new 0" in text
    assert "collected 320 → dedupe 300" in text
    assert "validate_base 40.0 s" in text and "total 43.8 s" in text
    assert "tokens/s 812" in text
    assert lines[-1] == "  report  /data/training/report_20250303_090000.html"
    assert len(lines) <= 12

    failed = summary_text(RunReport(run_id="x", status="failed", error="boom"), None)
    assert "failed — failed" in failed and "error   boom" in failed and "score" not in failed


def test_the_report_says_which_embedding_model_scored_the_run_and_why() -> None:
    why = "embeddings use-multilingual-v3: 97% of the memory points are Chinese"
    report = msgspec.structs.replace(
        realistic_report(), embed_model="use-multilingual-v3", model_choice=why
    )
    assert f"  models  {why}" in summary_text(report).splitlines()
    page = render_html(report)
    assert "<th>embeddings</th><td><code>use-multilingual-v3</code>" in page
    assert f"<th>model choice</th><td><code>{why}</code>" in page
    assert "models" not in summary_text(realistic_report())
