"""The trainer's side of LoRA mode: hand the job to a worker, then build the model it trained.

The dataset and the artifacts travel through the JetStream object store, so a worker can run on
any machine that reaches NATS (a GPU box). The served model is created from the adapter when the
server can load it, else from the merged GGUF.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import subjects
from shared.backend import ChatMessage, CreateProgress, CreateRequest, parse_parameters
from shared.messages import LoraJob, LoraJobDone, TrainingProgress

if TYPE_CHECKING:
    from services.trainer import RunState, Trainer

log = logging.getLogger(__name__)


async def run_lora_job(trainer: Trainer, state: RunState, dataset: Path) -> LoraJobDone:
    """Publish the job and wait for its `lora.done.<run_id>`, relaying the worker's progress."""
    bus = trainer.bus
    s = state.settings
    loop = asyncio.get_running_loop()
    done: asyncio.Future[LoraJobDone] = loop.create_future()

    async def on_done(ev: LoraJobDone) -> None:
        if ev.run_id == state.run_id and not done.done():
            done.set_result(ev)

    sub = await bus.subscribe(f"{subjects.LORA_DONE}.{state.run_id}", LoraJobDone, on_done)
    try:
        key = f"{state.run_id}/train_data.jsonl"
        await bus.put_object(key, dataset)
        await bus.publish(
            subjects.LORA_JOBS,
            LoraJob(
                run_id=state.run_id,
                dataset_object=key,
                base_model=s.base_model,
                base_weights=s.base_weights,
                hyperparams=s.lora_hyperparams(),
            ),
            msg_id=f"lora-{state.run_id}",
        )
        budget = (s.time_budget_s or 6 * 3600) + 1800  # training plus export and uploads
        return await asyncio.wait_for(done, budget)
    finally:
        await sub.stop()


async def create_lora_model(
    trainer: Trainer, state: RunState, new_model: str, dataset: Path
) -> dict[str, Any]:
    """Train on a worker, fetch the artifacts, create the served model; returns the LoRA report."""
    result = await run_lora_job(trainer, state, dataset)
    if not result.ok:
        raise RuntimeError(f"LoRA job failed on {result.worker or 'a worker'}: {result.error}")
    bus, backend = trainer.bus, trainer.backend
    s = state.settings
    workdir = Path(tempfile.mkdtemp(prefix=f"mindx-lora-{state.run_id}-"))
    files: dict[str, Path] = {}
    for kind, key in result.artifacts.items():
        files[kind] = await bus.get_object(key, workdir / Path(key).name)
    metrics = dict(result.metrics)
    if "metrics" in files:
        metrics.update(json.loads(files["metrics"].read_text()))

    async def on_line(p: CreateProgress) -> None:
        await bus.publish(
            subjects.progress_subject(state.run_id),
            TrainingProgress(run_id=state.run_id, stage="create", message=p.status),
        )

    used = None
    if "adapter" in files and s.export in ("auto", "adapter"):
        digest = await backend.push_blob(files["adapter"])
        try:
            await backend.create(
                CreateRequest(
                    model=new_model, from_=s.base_model, adapters={"adapter.gguf": digest}
                ),
                on_progress=on_line,
            )
            # creating does not load the adapter: one short chat proves the server can serve it
            await backend.chat(
                new_model,
                [ChatMessage(role="user", content="hi")],
                options={"num_predict": 1},
            )
            used = "adapter"
        except Exception as exc:
            log.warning("server cannot serve the LoRA adapter (%s); trying the merged model", exc)
            try:
                await backend.delete(new_model)
            except Exception:
                log.debug("nothing to delete for %s", new_model)
            if "merged" not in files:
                raise
    if used is None:
        if "merged" not in files:
            raise RuntimeError("the worker produced no merged model and the adapter was unusable")
        base = await backend.show(s.base_model)
        digest = await backend.push_blob(files["merged"])
        await backend.create(
            CreateRequest(
                model=new_model,
                files={"model.gguf": digest},
                template=base.template or None,
                system=base.system or None,
                parameters=parse_parameters(base.parameters) or None,
            ),
            on_progress=on_line,
        )
        used = "merged"
    # the report plots [step, loss] points
    curve = metrics.get("loss_curve") or []
    metrics["loss_curve"] = [
        [i + 1, float(x)] if isinstance(x, int | float) else x for i, x in enumerate(curve)
    ]
    metrics["exports"] = sorted(k for k in files if k != "metrics")
    metrics["served_from"] = used
    metrics["worker"] = result.worker
    return metrics
