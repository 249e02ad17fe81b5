"""Quality table: base vs message-mode model on each shared data set, with the local backend.

Each data set gets a fresh workspace and one real run (`mindx train --run-once --backend local`),
so the numbers are exactly what the promotion gate saw: mean similarity of base and new answers
to the held-out replies, the paired bootstrap 95% CI of the difference, and the decision.

    python -m bench.bench_quality [--held-out 20] [--limit 500] [--data kdconv]
                                  [--model NAME] [--embed-model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(dataset: Path, held_out: int, limit: int, models: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as ws:
        memory = Path(ws) / "data" / "memory"
        memory.mkdir(parents=True)
        lines = dataset.read_text().splitlines()[:limit]
        (memory / dataset.name).write_text("\n".join(lines) + "\n")
        cmd = [
            sys.executable, "-m", "services.cli", "train", "--run-once", "--json",
            "--backend", "local", "--workspace", ws, "--watermark", "wm.json", "--init-config",
            "--held-out", str(held_out), *models,
        ]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        if out.returncode not in (0, 1):
            raise RuntimeError(f"{dataset.name}: {out.stderr.strip().splitlines()[-1:]}")
        report = json.loads(out.stdout)
        report["_wall_s"] = time.perf_counter() - t0
        return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--limit", type=int, default=500, help="memory points per data set")
    ap.add_argument("--data", action="append", help="data set name (default: all), repeatable")
    ap.add_argument("--model", help="chat model (default: the local backend's choice)")
    ap.add_argument("--embed-model", help="embedding model (default: the local backend's choice)")
    args = ap.parse_args()
    chosen = (("model", args.model), ("embed-model", args.embed_model))
    models = [f"--{flag}={value}" for flag, value in chosen if value]
    sets = [d for d in sorted(DATA.glob("*.memory.jsonl")) if not args.data or name(d) in args.data]
    rows = [(name(d), run(d, args.held_out, args.limit, models)) for d in sets]

    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:+.3f}" if x < 0 else f"{x:.3f}"

    print(f"local backend, message mode, {args.limit} points each")
    print(f"{'data set':<10}{'cases':>6}{'base':>8}{'new':>8}{'diff':>8}{'95% CI':>19}  decision")
    for label, r in rows:
        ci = f"[{f(r.get('ci_low'))}, {f(r.get('ci_high'))}]"
        print(
            f"{label:<10}{r.get('held_out_cases', 0):>6}{f(r.get('base_score')):>8}"
            f"{f(r.get('validation_score')):>8}{f(r.get('score_diff')):>8}{ci:>19}  "
            f"{r['status']} ({r['_wall_s']:.0f} s)"
        )
    for label, r in rows:
        models = r.get("model_choice") or f"embeddings {r.get('embed_model') or '?'}"
        near = sum(s["dropped"].get("duplicate:near", 0) for s in r.get("funnel", []))
        print(f"{label}: chat {r.get('base_model') or '?'}; {models}; {near} near-duplicates")


def name(dataset: Path) -> str:
    return dataset.name.split(".")[0]


if __name__ == "__main__":
    main()
