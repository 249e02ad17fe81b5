#!/usr/bin/env bash
# LoRA training throughput on one GPU: training.lora.train vs transformers.Trainer + PEFT,
# same data, same LoRA, same steps, interleaved runs (bench/bench_lora.py), 0.5B-class base.
#
# Prepare on the dev machine (the data lives outside the repo, so it has to travel):
#   mkdir -p .benchdata && cp /work/shared/data/multiwoz.memory.jsonl .benchdata/
#   grep -qx '/.benchdata/' .git/info/exclude || echo /.benchdata/ >> .git/info/exclude
# Run on the GPU box (carry .benchdata):  bash bench/gpu_lora.sh
#
# Base weights, first found: $BASE (GGUF file or HF dir); a cached HF Qwen2.5-0.5B(-Instruct) or
# Qwen3-0.6B snapshot; Ollama's qwen3:0.6b blob; ./models/*.gguf; else "synthetic-0.5b" (random
# init in Qwen2.5-0.5B's shape: fine for tokens/s and memory, meaningless for loss).
# A GGUF base needs the `gguf` package there (carry its wheel, see the device notes).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DATA=${DATA:-.benchdata/multiwoz.memory.jsonl}
[ -f "$DATA" ] || DATA=/work/shared/data/multiwoz.memory.jsonl
[ -f "$DATA" ] || { echo "no data: see the header of $0" >&2; exit 2; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

find_base() {
  local hub="${HF_HOME:-$HOME/.cache/huggingface}/hub" d m blob
  for d in "$hub"/models--Qwen--Qwen2.5-0.5B-Instruct "$hub"/models--Qwen--Qwen2.5-0.5B \
           "$hub"/models--Qwen--Qwen3-0.6B; do
    for snap in "$d"/snapshots/*/; do
      [ -f "$snap/config.json" ] && { echo "${snap%/}"; return; }
    done
  done
  m="${OLLAMA_MODELS:-$HOME/.ollama/models}/manifests/registry.ollama.ai/library/qwen3/0.6b"
  if [ -f "$m" ]; then
    blob=$("$PY" -c 'import json,sys; l=[x for x in json.load(open(sys.argv[1]))["layers"] if x["mediaType"].endswith("image.model")]; print(l[0]["digest"].replace(":","-"))' "$m")
    [ -r "${m%/manifests/*}/blobs/$blob" ] && { echo "${m%/manifests/*}/blobs/$blob"; return; }
  fi
  for f in models/*.gguf; do [ -f "$f" ] && { echo "$f"; return; }; done
  echo synthetic-0.5b
}

BASE=${BASE:-$(find_base)}
if [ -f "$BASE" ] && ! "$PY" -c 'import gguf' 2>/dev/null; then
  echo "base $BASE is GGUF but python has no gguf package; using synthetic-0.5b" >&2
  BASE=synthetic-0.5b
fi
echo "base: $BASE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

RESULTS=${OUT:-/tmp}/gpu_lora.jsonl
"$PY" bench/bench_lora.py --device cuda --base "$BASE" --data "$DATA" \
  --records "${RECORDS:-64}" --steps "${STEPS:-100}" --max-length "${MAX_LENGTH:-512}" \
  --repeats "${REPEATS:-2}" | tee "$RESULTS"
