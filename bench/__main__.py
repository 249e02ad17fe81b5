"""Run the benchmarks: `python -m bench [bench_ingest ...]` (each prints its own ratios)."""

from __future__ import annotations

import subprocess
import sys

BENCHES = [
    "bench.bench_ingest",
    "bench.bench_filter",
    "bench.bench_validation",
    "bench.bench_local_batch",
    "bench.bench_quality",
    "bench.bench_loop",
    "bench.bench_forget",
    "bench.bench_lora",
]


def main() -> int:
    failed = 0
    chosen = [f"bench.{name}" for name in sys.argv[1:]] or BENCHES
    for mod in chosen:
        print(f"\n== {mod}", flush=True)
        failed += subprocess.call([sys.executable, "-m", mod]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
