"""LoRA fine-tuning as a library: `TrainingArgs` + `train()`.

A plain PyTorch loop over a PEFT LoRA model. What it adds over a generic trainer:

- loss on assistant tokens only (labels from `training.data`), and the vocabulary projection is
  computed for those positions only, not for every token: on small models the LM head is a large
  share of the compute and of the activation memory;
- a time budget, so a job on a shared machine stops on time with a usable adapter;
- checkpoints (adapter + optimizer + step + RNG) every N steps and on stop, resumed exactly: the
  batch order is a pure function of (seed, epoch), so a resumed run sees the same batches an
  uninterrupted one would have seen;
- progress only through the injected `callback`: no bar, no bus; whoever calls `train()`
  decides how progress is shown (the worker publishes it as `training.progress` events, the CLI
  draws bars from those).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from shared.files import ensure_private_dir
from shared.messages import LoraHyperparams
from training.data import IGNORE_INDEX, Dataset, Example, build_dataset, pad_batch

log = logging.getLogger(__name__)

StopReason = Literal["completed", "max_steps", "time_budget", "stopped"]
CHECKPOINT_PREFIX = "step-"
# Keys of TrainingArgs that change what a checkpoint means; a mismatch starts fresh.
_RESUME_KEYS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "max_length",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "seed",
    "weight_decay",
    "max_grad_norm",
)
_JOB = LoraHyperparams()  # the defaults a job and these args share


@dataclass(frozen=True)
class TrainingArgs:
    epochs: int = _JOB.epochs
    batch_size: int = _JOB.batch_size
    learning_rate: float = _JOB.learning_rate
    max_length: int = _JOB.max_length
    rank: int = _JOB.rank
    alpha: float = _JOB.alpha
    dropout: float = 0.0  # 0: a step is a pure function of the weights (exact resume, simple)
    target_modules: tuple[str, ...] = _JOB.target_modules
    time_budget_s: float | None = _JOB.time_budget_s  # per call of train(); between steps
    max_steps: int | None = None
    seed: int = _JOB.seed
    checkpoint_every: int = 50  # steps; 0 disables periodic checkpoints (stop still saves)
    keep_checkpoints: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    device: str = "auto"  # auto: cuda (bf16 base) if available, else cpu (float32)
    threads: int | None = None  # CPU threads while training; None: torch's default

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (self.rank >= 1, "rank must be >= 1"),
            (self.alpha > 0, "alpha must be > 0"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (bool(self.target_modules), "target_modules must not be empty"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be > 0"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")

    @classmethod
    def from_hyperparams(cls, h: LoraHyperparams, **local: Any) -> TrainingArgs:
        """The args of a job: its hyperparams, plus what only this machine decides (`local`:
        device, threads, checkpointing, ...). Raises ValueError for values that cannot work."""
        return cls(
            epochs=h.epochs,
            batch_size=h.batch_size,
            learning_rate=h.learning_rate,
            max_length=h.max_length,
            rank=h.rank,
            alpha=h.alpha,
            target_modules=tuple(h.target_modules),
            time_budget_s=h.time_budget_s,
            seed=h.seed,
            **local,
        )


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    tokens_per_s: float
    eta_s: float
    elapsed_s: float


@dataclass
class TrainResult:
    model: Any  # the PEFT model, adapter attached
    loss_curve: list[float]  # one value per step, from step 1 (restored on resume)
    steps: int  # steps done in total (including those before a resume)
    total_steps: int
    tokens: int  # input tokens processed in this call
    tokens_per_s: float
    elapsed_s: float
    peak_memory_mb: float
    memory_kind: str  # "cuda_max_allocated" or "process_peak_rss"
    stopped: StopReason
    resumed_from: int | None
    trainable_params: int
    examples: int
    dropped: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"

    def metrics(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "model"}
        out["final_loss"] = self.loss_curve[-1] if self.loss_curve else None
        return out


Callback = Callable[[TrainProgress], None]


# --- model ----------------------------------------------------------------------------------


def attach_lora(model: Any, args: TrainingArgs) -> Any:
    """Wrap a base model with fresh LoRA layers (seeded, so the init is reproducible)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("train() takes a base model; this one already has adapters attached")
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=list(args.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fast_path_parts(peft_model: Any) -> tuple[Any, Any] | None:
    """(backbone, lm_head) when logits are a plain projection of the last hidden state."""
    base = peft_model.get_base_model()
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings()
    if backbone is None or head is None or backbone is base:
        return None
    return backbone, head


def supervised_loss(
    peft_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over supervised positions, and their count.

    Same value as `model(..., labels=labels).loss`, but the LM head runs only on the positions
    that carry a label.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    n = int(keep.sum())
    parts = _fast_path_parts(peft_model)
    if parts is None:
        logits = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        picked = logits[:, :-1][keep]
    else:
        backbone, head = parts
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        picked = head(hidden[:, :-1][keep])
    loss = F.cross_entropy(picked.float(), shift_labels[keep], reduction="sum") / max(n, 1)
    return loss, n


# --- batches and checkpoints ----------------------------------------------------------------


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices per step of `epoch`: a pure function, so a resumed run can skip ahead."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def dataset_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def _resume_view(args: TrainingArgs) -> dict[str, Any]:
    d = asdict(args)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in _RESUME_KEYS}


def save_checkpoint(
    directory: Path,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `step-NNNNNN/` atomically (temp dir + rename) and prune older checkpoints."""
    ensure_private_dir(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{state['step']:06d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_private_dir(tmp)  # save_pretrained would make it 0755
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # LoRA only
    torch.save(
        {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt"
    )
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def _load_checkpoint(
    path: Path, peft_model: Any, optimizer: torch.optim.Optimizer, device: str
) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"), device=device)
    set_peft_model_state_dict(peft_model, weights)
    blob = torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"].cpu())
    return json.loads((path / "state.json").read_text())


def _find_resumable(
    directory: Path, view: dict[str, Any], fingerprint: str
) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(list_checkpoints(directory)):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("args") == view and state.get("fingerprint") == fingerprint:
            return path, state
        log.warning("checkpoint %s was made with other args or data; not resuming from it", path)
    return None


def _peak_memory_mb(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024, "process_peak_rss"


# --- the loop -------------------------------------------------------------------------------


def train(
    model: Any,
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]] | Dataset,
    args: TrainingArgs = TrainingArgs(),
    *,
    callback: Callback | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    stop_event: threading.Event | None = None,
) -> TrainResult:
    """Fine-tune LoRA adapters on `records` (chat records) and return the PEFT model.

    `model` is a base model (as from `training.base_weights.load_base`); it is wrapped in place.
    With `checkpoint_dir`, checkpoints are written there and, with `resume`, the latest one
    made with the same args and data is continued. `stop_event` ends the run between steps
    (a checkpoint is saved); so does `time_budget_s`.
    """
    if args.threads is None:
        return _train(model, tokenizer, records, args, callback, checkpoint_dir, resume, stop_event)
    # process-wide setting: restored afterwards. On a loaded CPU fewer threads can be much faster
    # (OpenMP workers spin waiting for each other when cores are oversubscribed).
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train(model, tokenizer, records, args, callback, checkpoint_dir, resume, stop_event)
    finally:
        torch.set_num_threads(before)


def _train(
    model: Any,
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]] | Dataset,
    args: TrainingArgs,
    callback: Callback | None,
    checkpoint_dir: Path | None,
    resume: bool,
    stop_event: threading.Event | None,
) -> TrainResult:
    from training.base_weights import pick_device

    started = time.monotonic()
    device = pick_device(args.device)
    data = (
        records
        if isinstance(records, Dataset)
        else build_dataset(tokenizer, records, args.max_length)
    )
    if not data.examples:
        raise ValueError(f"no trainable examples (dropped: {data.dropped or 'no records'})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    peft_model = attach_lora(model, args).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)

    n = len(data.examples)
    per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * per_epoch
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    view, fingerprint = _resume_view(args), dataset_fingerprint(data.examples)

    step, loss_curve, resumed_from = 0, [], None
    if checkpoint_dir is not None and resume:
        found = _find_resumable(checkpoint_dir, view, fingerprint)
        if found is not None:
            state = _load_checkpoint(found[0], peft_model, optimizer, device)
            step, loss_curve, resumed_from = state["step"], list(state["loss_curve"]), state["step"]
            log.info("resuming from %s (step %d of %d)", found[0], step, total)

    def checkpoint() -> None:
        if checkpoint_dir is not None:
            state = {"step": step, "loss_curve": loss_curve, "args": view}
            state["fingerprint"] = fingerprint
            save_checkpoint(checkpoint_dir, peft_model, optimizer, state, args.keep_checkpoints)

    peft_model.train()
    tokens, loop_started, stopped = 0, time.monotonic(), "completed"
    first_step = step
    while step < total:
        if stop_event is not None and stop_event.is_set():
            stopped = "stopped"
            break
        if args.time_budget_s is not None and time.monotonic() - started >= args.time_budget_s:
            stopped = "time_budget"
            break
        epoch, index = divmod(step, per_epoch)
        batch = [
            data.examples[i] for i in epoch_batches(n, args.batch_size, args.seed, epoch)[index]
        ]
        step_loss, step_tokens = _step(peft_model, optimizer, params, batch, pad_id, args, device)
        step += 1
        tokens += step_tokens
        loss_curve.append(step_loss)
        spent = time.monotonic() - loop_started
        rate = tokens / spent if spent > 0 else 0.0
        eta = (total - step) * spent / (step - first_step)
        if callback is not None:
            callback(TrainProgress(step, total, epoch, loss_curve[-1], rate, eta, spent))
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total:
            checkpoint()
    else:
        if args.max_steps is not None and total < args.epochs * per_epoch:
            stopped = "max_steps"
    checkpoint()  # final or interrupted: a redelivered job resumes (or finds nothing to do)
    peft_model.eval()
    loop_s = time.monotonic() - loop_started
    peak, kind = _peak_memory_mb(device)
    return TrainResult(
        model=peft_model,
        loss_curve=loss_curve,
        steps=step,
        total_steps=total,
        tokens=tokens,
        tokens_per_s=tokens / loop_s if loop_s > 0 and tokens else 0.0,
        elapsed_s=time.monotonic() - started,
        peak_memory_mb=peak,
        memory_kind=kind,
        stopped=stopped,  # type: ignore[arg-type]
        resumed_from=resumed_from,
        trainable_params=trainable_parameters(peft_model),
        examples=n,
        dropped=dict(data.dropped),
        device=device,
    )


def _step(
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: list[Example],
    pad_id: int,
    args: TrainingArgs,
    device: str,
) -> tuple[float, int]:
    """One optimizer step; returns (loss, input tokens). Its own function so that no tensor of
    this step (graph, activations) is still referenced while the next step runs."""
    ids, mask, labels = (torch.tensor(x, device=device) for x in pad_batch(batch, pad_id))
    loss, _ = supervised_loss(peft_model, ids, mask, labels)
    loss.backward()
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), int(mask.sum())


def evaluate_loss(
    peft_model: Any, tokenizer: Any, records: Iterable[Mapping[str, Any]], max_length: int
) -> float:
    """Mean supervised loss per token over `records` (no gradient)."""
    data = build_dataset(tokenizer, records, max_length)
    device = next(peft_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with torch.no_grad():
        for e in data.examples:
            ids, mask, labels = (torch.tensor(x, device=device) for x in pad_batch([e], pad_id))
            loss, n = supervised_loss(peft_model, ids, mask, labels)
            total += float(loss) * n
            count += n
    return total / max(count, 1)
