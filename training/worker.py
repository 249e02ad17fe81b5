"""The LoRA worker: consumes `lora.jobs` (JetStream work queue) and trains, one job at a time.

A job (shared.messages.LoraJob) names a dataset in the object store and a base model. The worker
fetches the dataset, resolves the base weights on *this* machine, trains with progress acks, exports
GGUF artifacts, uploads them under `<run_id>/...` and announces `lora.done.<run_id>` once
(one message id per run, so a redelivered job does not announce twice).

Everything for a run lives in `<workdir>/<run_id>/`: checkpoints let a job redelivered after a kill
resume where it stopped, and `done.json` lets a job redelivered after success re-announce instead
of retraining. A run id becomes that path only when it is one (`shared.names`), and the path is
always a child of the workdir: a job that names anything else is dead-lettered and touches nothing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.bus import Bus, Delivery, Rejected, Service, worker_name
from shared.files import ensure_private_dir, write_private
from shared.messages import LoraJob, LoraJobDone, TrainingProgress, decode, encode
from shared.names import InvalidName, check_run_id
from shared.subjects import LORA_WORKER, RunNames

if TYPE_CHECKING:
    from shared.backend import Backend
    from shared.settings import Settings
    from training.lora import TrainingArgs, TrainProgress

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


class JobRejected(ValueError):
    """The job cannot succeed on any retry (bad hyperparameters, no weights, bad data)."""


def run_dir(workdir: Path, run_id: str) -> Path:
    """`<workdir>/<run_id>` for a valid run id; InvalidName for anything that would leave it."""
    root = Path(workdir).resolve()
    path = (root / check_run_id(run_id)).resolve()
    if path.parent != root:  # e.g. a symlink planted under the workdir
        raise InvalidName(f"run dir of {run_id!r} leaves {root}")
    return path


def job_args(job: LoraJob) -> TrainingArgs:
    """The job's TrainingArgs; hyperparameters that cannot work reject the job."""
    from training.lora import TrainingArgs

    try:
        return TrainingArgs.from_hyperparams(job.hyperparams)
    except ValueError as exc:
        raise JobRejected(f"bad hyperparams: {exc}") from exc


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise JobRejected(f"dataset line {n} is not JSON: {exc}") from exc
    if not records:
        raise JobRejected("dataset is empty")
    return records


async def _publish_progress(bus: Bus, run_id: str, stage: str, **fields: Any) -> None:
    try:
        await bus.publish(
            RunNames(run_id).progress_subject,
            TrainingProgress(run_id=run_id, stage=stage, **fields),
        )
    except Exception:  # progress is best effort: never fail a job over it
        log.warning("progress for %s not published", run_id, exc_info=True)


def _thread_progress(
    bus: Bus, run_id: str, loop: asyncio.AbstractEventLoop
) -> Callable[[TrainProgress], None]:
    """A train() callback that publishes from the training thread, at most once a second."""
    last = [0.0]

    def on_step(p: TrainProgress) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S and p.step < p.total_steps:
            return
        last[0] = now
        coro = _publish_progress(
            bus,
            run_id,
            "lora.train",
            done=p.step,
            total=p.total_steps,
            loss=p.loss,
            tokens_per_s=p.tokens_per_s,
            eta_s=p.eta_s,
            message=f"epoch {p.epoch + 1}",
        )
        asyncio.run_coroutine_threadsafe(coro, loop)  # fire and forget: training never waits

    return on_step


def _export(peft_model: Any, base_gguf: Path, rundir: Path, mode: str) -> dict[str, Any]:
    """Run the exports `mode` asks for; returns {kind: path} plus timings and errors."""
    from training import gguf_lora

    kinds = ("adapter", "merged") if mode == "auto" else (mode,)
    out: dict[str, Any] = {"paths": {}, "seconds": {}, "errors": {}}
    for kind in kinds:
        target = rundir / f"{kind}.gguf"
        fn = gguf_lora.export_adapter if kind == "adapter" else gguf_lora.export_merged
        t0 = time.monotonic()
        try:
            fn(peft_model, base_gguf, target)
        except Exception as exc:
            if mode != "auto":
                if isinstance(exc, ValueError):  # GGUFLoraError: this base/adapter can't export
                    raise JobRejected(f"{kind} export: {exc}") from exc
                raise
            # auto: one artifact is enough to build a model; record why the other failed
            log.warning("%s export failed", kind, exc_info=True)
            out["errors"][kind] = f"{type(exc).__name__}: {exc}"
            continue
        out["paths"][kind] = target
        out["seconds"][kind] = round(time.monotonic() - t0, 3)
    if not out["paths"]:
        raise JobRejected(f"no export succeeded: {out['errors']}")
    return out


async def run_job(
    job: LoraJob,
    bus: Bus,
    settings: Settings,
    *,
    workdir: Path,
    backend: Backend | None = None,
    stop_event: threading.Event | None = None,
) -> LoraJobDone:
    """Do one job end to end and announce it; returns what was announced.

    JobRejected (and BaseWeightsUnavailable) are announced as a failed job; any other error is
    raised so the bus redelivers (the checkpoints make the retry cheap).
    """
    from training.base_weights import BaseWeightsUnavailable

    run_id = job.run_id
    rundir = ensure_private_dir(run_dir(workdir, run_id))  # before anything else
    names = RunNames(run_id)
    done_file = rundir / "done.json"
    if done_file.is_file():  # finished before a redelivery: announce again, do nothing else
        done = decode(done_file.read_bytes(), LoraJobDone)
        await bus.publish(names.lora_done_subject, done, msg_id=names.lora_done_msg_id)
        return done
    try:
        done = await _train_and_export(job, bus, settings, rundir, backend, stop_event)
    except (JobRejected, BaseWeightsUnavailable) as exc:
        log.warning("lora job %s rejected: %s", run_id, exc)
        done = LoraJobDone(run_id=run_id, ok=False, error=str(exc), worker=worker_name())
    write_private(done_file, encode(done))
    await bus.publish(names.lora_done_subject, done, msg_id=names.lora_done_msg_id)
    shutil.rmtree(rundir / "checkpoints", ignore_errors=True)  # the artifacts are what is kept
    await _publish_progress(bus, run_id, "lora.done", message="ok" if done.ok else "failed")
    return done


async def _train_and_export(
    job: LoraJob,
    bus: Bus,
    settings: Settings,
    rundir: Path,
    backend: Backend | None,
    stop_event: threading.Event | None,
) -> LoraJobDone:
    from training.base_weights import load_base, resolve_base_weights
    from training.lora import train

    run_id = job.run_id
    args, export_mode = job_args(job), job.hyperparams.export

    await _publish_progress(bus, run_id, "lora.fetch", message=job.dataset_object)
    dataset = await bus.get_object(job.dataset_object, rundir / "train_data.jsonl")
    os.chmod(dataset, 0o600)
    records = read_records(dataset)

    weights = await _resolve(job, settings, backend, resolve_base_weights)
    if weights.gguf is None:
        raise JobRejected(f"GGUF export needs a GGUF base; {weights.source} is a HF directory")
    await _publish_progress(bus, run_id, "lora.load", message=weights.source)
    model, tokenizer = await asyncio.to_thread(load_base, weights, device=args.device)

    stop = stop_event or threading.Event()
    loop = asyncio.get_running_loop()
    try:
        result = await asyncio.to_thread(
            train,
            model,
            tokenizer,
            records,
            args,
            callback=_thread_progress(bus, run_id, loop),
            checkpoint_dir=rundir / "checkpoints",
            stop_event=stop,
        )
    except asyncio.CancelledError:
        stop.set()  # the thread stops after its current step and checkpoints
        raise
    except ValueError as exc:  # no trainable examples, bad template
        raise JobRejected(str(exc)) from exc
    if result.stopped == "stopped":
        raise RuntimeError("training was stopped before it finished; a retry resumes it")

    await _publish_progress(bus, run_id, "lora.export", message=export_mode)
    exported = await asyncio.to_thread(_export, result.model, weights.gguf, rundir, export_mode)

    metrics = {
        **result.metrics(),
        "base_model": job.base_model,
        "base_weights": str(weights.path),
        "base_weights_source": weights.source,
        "args": asdict(args),
        "export": export_mode,
        "export_seconds": exported["seconds"],
        "export_errors": exported["errors"],
    }
    del model, result
    gc.collect()
    write_private(rundir / "metrics.json", json.dumps(metrics, indent=2, default=str))

    await _publish_progress(bus, run_id, "lora.upload")
    artifacts: dict[str, str] = {}
    for kind, path in [*exported["paths"].items(), ("metrics", rundir / "metrics.json")]:
        key = RunNames(run_id).artifact_object(path.name)
        await bus.put_object(key, path)
        artifacts[kind] = key
    return LoraJobDone(
        run_id=run_id, ok=True, artifacts=artifacts, metrics=metrics, worker=worker_name()
    )


async def _resolve(
    job: LoraJob,
    settings: Settings,
    backend: Backend | None,
    resolve: Callable[..., Awaitable[Any]],
) -> Any:
    explicit = job.base_weights or settings.base_weights
    if settings.backend != "ollama" or backend is not None:
        return await resolve(
            job.base_model,
            backend=backend,
            backend_name=settings.backend,
            base_weights=explicit,
        )
    from shared.ollama import OllamaClient

    # one quick /api/show; the manifest on disk is tried even if the server is unreachable
    async with OllamaClient(settings.ollama, attempts=1, timeout=30.0) as client:
        return await resolve(
            job.base_model, backend=client, backend_name="ollama", base_weights=explicit
        )


async def serve(
    bus: Bus,
    settings: Settings,
    *,
    workdir: Path | None = None,
    backend: Backend | None = None,
) -> Service:
    """Consume LORA_WORKER until the returned Service is stopped."""
    work = ensure_private_dir(workdir or settings.lora_work_path)

    async def handle(job: LoraJob, delivery: Delivery) -> None:
        async with delivery.keep_alive():
            try:
                await run_job(job, bus, settings, workdir=work, backend=backend)
            except InvalidName as exc:  # nothing was done, and no lora.done can name the run
                raise Rejected(str(exc)) from exc
            except Exception as exc:
                if delivery.num_delivered >= LORA_WORKER.max_deliver:
                    # last try: the trainer waits on lora.done, so tell it before dead-lettering
                    failed = LoraJobDone(
                        run_id=job.run_id,
                        ok=False,
                        error=f"{type(exc).__name__}: {exc}",
                        worker=worker_name(),
                    )
                    names = RunNames(job.run_id)
                    await bus.publish(
                        names.lora_done_subject, failed, msg_id=names.lora_done_msg_id
                    )
                raise

    return await bus.serve(LORA_WORKER, LoraJob, handle)
