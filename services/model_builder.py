"""Creating the personalized model on the backend, in either mode.

- message: the base model plus a SYSTEM and baked few-shot messages (`/api/create`, seconds).
- lora: a job on `lora.jobs` for any LoRA worker; the dataset and the artifacts travel through the
  JetStream object store, so a worker can run on any machine that reaches NATS (a GPU box). The
  served model is created from the GGUF adapter when the server can load it, else from the
  merged GGUF.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.backend import Backend, ChatMessage, CreateProgress, CreateRequest, parse_parameters
from shared.bus import Expect
from shared.messages import LoraJob, LoraJobDone
from shared.modelfile import sanitize_text
from shared.settings import Settings
from shared.subjects import LORA_JOBS, RunNames

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger(__name__)

StatusSink = Callable[[str], Awaitable[None]]  # one line of create progress, for the run's events

# kind → file name: the only artifacts a lora.done may name, each under its run's own keys
LORA_ARTIFACTS = {"adapter": "adapter.gguf", "merged": "merged.gguf", "metrics": "metrics.json"}
LORA_EXPORT_SLACK_S = 1800  # beyond the training budget: export and uploads
LORA_DEFAULT_BUDGET_S = 6 * 3600


def _on_progress(status: StatusSink) -> Callable[[CreateProgress], Awaitable[None]]:
    async def relay(p: CreateProgress) -> None:
        await status(p.status)

    return relay


async def create_message_model(
    backend: Backend,
    s: Settings,
    new_model: str,
    examples: list[ChatMessage],
    status: StatusSink,
) -> None:
    await backend.create(
        CreateRequest(
            model=new_model,
            from_=s.base_model,
            system=sanitize_text(s.system_prompt),
            messages=examples,
        ),
        on_progress=_on_progress(status),
    )


async def run_lora_job(bus: Bus, s: Settings, names: RunNames, dataset: Path) -> LoraJobDone:
    """Upload the dataset, publish the job and wait for the worker's `lora.done.<run_id>`."""
    await bus.put_object(names.dataset_object, dataset)
    job = LoraJob(
        run_id=names.run_id,
        dataset_object=names.dataset_object,
        base_model=s.base_model,
        base_weights=s.base_weights,
        hyperparams=s.lora_hyperparams(),
    )
    done: LoraJobDone = await bus.publish_and_wait(
        LORA_JOBS,
        job,
        msg_id=names.lora_job_msg_id,
        expect=[Expect(names.lora_done_subject, LoraJobDone, lambda ev: ev.run_id == names.run_id)],
        timeout=(s.time_budget_s or LORA_DEFAULT_BUDGET_S) + LORA_EXPORT_SLACK_S,
    )
    return done


async def create_lora_model(
    bus: Bus,
    backend: Backend,
    s: Settings,
    names: RunNames,
    new_model: str,
    dataset: Path,
    status: StatusSink,
) -> dict[str, Any]:
    """Train on a worker, fetch the artifacts, create the served model; returns the LoRA report."""
    result = await run_lora_job(bus, s, names, dataset)
    if not result.ok:
        raise RuntimeError(f"LoRA job failed on {result.worker or 'a worker'}: {result.error}")
    for kind, key in result.artifacts.items():
        filename = LORA_ARTIFACTS.get(kind)
        if filename is None or key != names.artifact_object(filename):
            raise RuntimeError(f"lora.done names an artifact this run never makes: {kind}={key!r}")
    # the backend keeps its own copy of what it is given: the fetched artifacts go afterwards
    with tempfile.TemporaryDirectory(prefix=f"mindx-lora-{names.run_id}-") as tmp:
        workdir = Path(tmp)
        files: dict[str, Path] = {}
        for kind, key in result.artifacts.items():
            files[kind] = await bus.get_object(key, workdir / LORA_ARTIFACTS[kind])
        return await _create_from_artifacts(backend, s, new_model, files, result, status)


async def _create_from_artifacts(
    backend: Backend,
    s: Settings,
    new_model: str,
    files: dict[str, Path],
    result: LoraJobDone,
    status: StatusSink,
) -> dict[str, Any]:
    metrics = dict(result.metrics)
    if "metrics" in files:
        metrics.update(json.loads(files["metrics"].read_text()))
    on_line = _on_progress(status)

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
