"""LoRA training throughput: our loop (training.lora.train) vs transformers.Trainer + PEFT.

Both train the same base (SmolLM2-135M GGUF by default), the same LoRA config, the same tokenized
examples (assistant-only labels, dynamic padding, batch size 1) for the same number of steps.
Each run is its own subprocess, so peak RSS is that run's own; runs are interleaved
(ours, trainer, ours, trainer, ...) so load on a shared machine hits both alike.
Tokens/s counts non-padding input tokens over the training loop only (model load excluded).

    .venv/bin/python bench/bench_lora.py                 # CPU, a few minutes
    .venv/bin/python bench/bench_lora.py --device cuda --base /models/qwen2.5-0.5b --steps 200

Prints one JSON line per run and a summary with ratio = ours / trainer (aim >= 1.0). With
training/gguf_lora.py present, "ours" runs also time the GGUF adapter and merged exports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/multiwoz.memory.jsonl")


def records_from_memory(path: Path, n: int) -> list[dict[str, Any]]:
    """Chat records from dialogue memory points: every `User:`/`Assistant:` line is a turn."""
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        point = json.loads(line)
        if point.get("meta", {}).get("prefix_style") != "en":
            continue
        msgs = []
        for row in point["content"].splitlines():
            for prefix, role in (("User: ", "user"), ("Assistant: ", "assistant")):
                if row.startswith(prefix):
                    msgs.append({"role": role, "content": row[len(prefix) :].strip()})
        if len(msgs) >= 2 and msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant":
            out.append({"messages": msgs})
        if len(out) == n:
            break
    return out


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Peak resident memory during a block (ru_maxrss would include the model load's peak)."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s, self.peak_kb = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_mb(device: str, sampler: RssSampler) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return sampler.peak_kb / 1024


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2.5-0.5B's shape; random weights: throughput does not depend on their values.
SYNTHETIC_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def synthetic_base(records: list[dict[str, Any]], device: str) -> tuple[Any, Any]:
    """A 0.5B-class Qwen2 model (random init) and a ChatML BPE tokenizer trained on the data,
    for machines with no model files and no network."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in records for m in r["messages"]]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=specials))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = Qwen2ForCausalLM(Qwen2Config(**SYNTHETIC_05B)).to(dtype=dtype, device=device)
    return model, tok


def child(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shared.bundled import chat_gguf
    from training.base_weights import BaseWeights, load_base
    from training.data import build_dataset
    from training.lora import TrainingArgs, attach_lora, train

    torch.set_num_threads(opts.threads or torch.get_num_threads())
    records = records_from_memory(Path(opts.data), opts.records)
    weights = None
    if opts.base == "synthetic-0.5b":
        model, tok = synthetic_base(records, opts.device)
    else:
        p = Path(opts.base) if opts.base else chat_gguf()
        weights = BaseWeights("gguf" if p.is_file() else "hf_dir", p, str(p))
        model, tok = load_base(weights, device=opts.device)
    data = build_dataset(tok, records, opts.max_length)
    args = TrainingArgs(
        epochs=1000,
        max_steps=opts.steps,
        max_length=opts.max_length,
        checkpoint_every=0,
        device=opts.device,
        learning_rate=2e-4,
    )
    rss_loaded = current_rss_mb()
    out: dict[str, Any] = {"kind": opts.child, "examples": len(data.examples)}
    sampler = RssSampler()
    if opts.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if opts.child == "ours":
        with sampler:
            result = train(model, tok, data, args)
        out.update(
            steps=result.steps,
            tokens=result.tokens,
            train_s=result.tokens / result.tokens_per_s,
            tokens_per_s=result.tokens_per_s,
            final_loss=result.loss_curve[-1],
        )
        peft_model = result.model
    else:
        with sampler:
            peft_model = attach_lora(model, args)
            out.update(run_trainer(peft_model, tok, data, args, opts))
    out["peak_mb"] = round(peak_mb(opts.device, sampler), 1)  # during training only
    out["rss_after_load_mb"] = round(rss_loaded, 1)
    if (
        opts.child == "ours"
        and weights is not None
        and weights.kind == "gguf"
        and (ROOT / "training/gguf_lora.py").exists()
    ):
        out.update(time_exports(peft_model, weights.path))
    return out


def run_trainer(peft_model: Any, tok: Any, data: Any, args: Any, opts: argparse.Namespace) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from training.data import pad_batch

    counted = {"tokens": 0}

    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        ids, mask, labels = pad_batch(batch, tok.pad_token_id)
        counted["tokens"] += sum(map(sum, mask))
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
        }

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.start = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            Clock.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            max_grad_norm=args.max_grad_norm,
            weight_decay=args.weight_decay,
            optim="adamw_torch",
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            use_cpu=not opts.device.startswith("cuda"),
            bf16=opts.device.startswith("cuda"),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=peft_model,
            args=targs,
            train_dataset=data.examples,
            data_collator=collate,
            callbacks=[Clock()],
        )
        state = trainer.train()
    train_s = Clock.end - Clock.start
    return {
        "steps": trainer.state.global_step,
        "tokens": counted["tokens"],
        "train_s": train_s,
        "tokens_per_s": counted["tokens"] / train_s,
        "final_loss": state.training_loss,
    }


def time_exports(peft_model: Any, base_gguf: Path) -> dict[str, Any]:
    from training import gguf_lora

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, fn in (
            ("adapter", gguf_lora.export_adapter),
            ("merged", gguf_lora.export_merged),
        ):
            t0 = time.perf_counter()
            try:
                path = fn(peft_model, base_gguf, Path(tmp) / f"{kind}.gguf")
            except Exception as exc:
                out[f"export_{kind}_error"] = f"{type(exc).__name__}: {exc}"
                continue
            out[f"export_{kind}_s"] = round(time.perf_counter() - t0, 3)
            out[f"export_{kind}_mb"] = round(path.stat().st_size / 2**20, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base",
        help="GGUF file, HF directory, or synthetic-0.5b (default: bundled SmolLM2-135M GGUF)",
    )
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--records", type=int, default=20)  # = steps: both see every example once
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts)))
        return

    passthrough = sys.argv[1:]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trainer": []}
    for _ in range(opts.repeats):
        for kind in ("ours", "trainer"):
            proc = subprocess.run(
                [sys.executable, __file__, *passthrough, "--child", kind],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.exit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            runs[kind].append(result)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    summary = {
        "device": opts.device,
        "base": opts.base or "SmolLM2-135M-Instruct Q4_1 (bundled)",
        "steps": opts.steps,
        "max_length": opts.max_length,
        "ours_tokens_per_s": round(med("ours", "tokens_per_s"), 1),
        "trainer_tokens_per_s": round(med("trainer", "tokens_per_s"), 1),
        "ratio_tokens_per_s": round(
            med("ours", "tokens_per_s") / med("trainer", "tokens_per_s"), 3
        ),
        "ours_peak_mb": round(med("ours", "peak_mb"), 1),
        "trainer_peak_mb": round(med("trainer", "peak_mb"), 1),
    }
    for key in ("export_adapter_s", "export_merged_s"):
        if all(key in r for r in runs["ours"]):
            summary[key] = med("ours", key)
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
