"""The right to be forgotten: `memory.point.deleted` removes the point everywhere.

`Forgetter.forget` does the I/O; what to erase and retire is decided by `services.forgetting`.
In order, so that a crash at any step leaves the point findable for the redelivery (the corpus,
where its texts are read, goes last):

1. the point's texts: from the corpus and from its messages in the MEMORY stream
   (`memory.point.created`/`updated` of that id; the deletion itself holds only the id);
2. every model whose lineage holds the point is retired: when it is the live model, the config
   names the newest promoted model without the point (or the base) at once and `model.updated`
   goes out; then the models are deleted from the backend and their lineage says `retired`;
3. the run files under the training dir: datasets lose the records, reports the cases, that
   hold the point (the HTML page is rendered again); anything else that holds it is deleted;
4. the `training.completed`/`failed` events, the validation cases of runs in progress and the
   dead letters that hold it are erased (not re-published: a redacted copy would be a second
   announcement of a finished run);
5. the object store's files of every affected run (a LoRA run's dataset, adapter and merged
   model) are erased, and a local LoRA worker's run dirs of those runs are deleted;
6. its MEMORY messages are erased, and the corpus drops the point for good (`Corpus.forget`:
   secure delete, WAL truncated) and keeps a tombstone: a late copy of a version up to the
   deletion is never stored again;
7. when the live model was retired, a retrain without the point is requested.

An id that nothing holds (never collected, or forgotten already) changes nothing. The time from
the deletion to no trace is logged and returned (`Forgotten.seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from services import forgetting, lineage
from services.collector import pairs_from_point
from services.model_config import left_model, read_config
from services.report import read_report, write_report
from shared import subjects
from shared.backend import ModelNotFound
from shared.files import atomic_write, timestamp
from shared.messages import MemoryPoint, MemoryPointDeleted, TrainingRequested, utc_now
from shared.names import InvalidName, check_run_id
from shared.subjects import RunNames

if TYPE_CHECKING:
    from services.config_updater import ConfigUpdater
    from shared.backend import Backend
    from shared.bus import Bus, Delivery, Service
    from shared.corpus import Corpus
    from shared.settings import Settings

log = logging.getLogger(__name__)

MEMORY_STREAM = next(s.name for s in subjects.STREAMS if s.subjects == ["memory.>"])
TRAINING_STREAM = "TRAINING"
VALIDATION_STREAM = subjects.VALIDATOR.stream  # the cases of runs in progress
DLQ_STREAM = next(
    s.name for s in subjects.STREAMS if s.subjects == [f"{subjects.DEAD_LETTER_PREFIX}.>"]
)


class _PointId(msgspec.Struct):
    id: int | None = None


_point_id = msgspec.json.Decoder(_PointId)


def _id_of(data: bytes) -> int | None:
    try:
        return _point_id.decode(data).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class Forgotten:
    """What forgetting one point did."""

    point_id: int
    found: bool = False  # anything held it; False: a no-op
    stream_messages: int = 0  # MEMORY messages erased
    retired: list[str] = field(default_factory=list)  # models retired
    switched_to: str | None = None  # the new live model, when the live one was retired
    files_rewritten: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    events_erased: int = 0  # training.completed/failed and dead letters
    objects_erased: list[str] = field(default_factory=list)
    retrain_request: str | None = None
    seconds: float = 0.0  # from the deletion's arrival to no trace


class Forgetter:
    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        corpus: Corpus,
        backend: Backend,
        updater: ConfigUpdater,
    ) -> None:
        self.bus, self.settings, self.corpus = bus, settings, corpus
        self.backend, self.updater = backend, updater
        self._lock = asyncio.Lock()

    async def on_point_deleted(self, ev: MemoryPointDeleted, delivery: Delivery | None) -> None:
        keep = delivery.keep_alive(every=5.0) if delivery is not None else contextlib.nullcontext()
        async with keep:
            await self.forget(ev.id)

    async def forget(self, point_id: int) -> Forgotten:
        async with self._lock:
            return await self._forget(point_id)

    async def _forget(self, point_id: int) -> Forgotten:
        t0 = time.perf_counter()
        at = utc_now()
        out = Forgotten(point_id)
        s = self.settings

        # 1. its texts, from the corpus and from its messages in the MEMORY stream (both are
        # erased last: a crash before leaves them for the redelivery to read)
        point, pairs = await asyncio.to_thread(self.corpus.point_with_pairs, point_id)
        messages = await self.bus.find_messages(
            MEMORY_STREAM,
            "memory.point.*",
            lambda subject, data: (
                subject != subjects.MEMORY_POINT_DELETED and _id_of(data) == point_id
            ),
        )
        out.stream_messages = len(messages)
        versions = [point] if point is not None else []
        for _, data in messages:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                versions.append(msgspec.json.decode(data, type=MemoryPoint))
        all_pairs = [*pairs, *(p for v in versions for p in pairs_from_point(v))]
        texts = forgetting.point_texts(versions, all_pairs)
        shared = await asyncio.to_thread(self.corpus.held_elsewhere, texts, point_id)
        found = forgetting.needles([t for t in texts if t not in shared])

        # 2. the models that hold it
        lineages = await lineage.load_all(self.bus)
        live = self._live()
        available = {t.name for t in await self.backend.tags()}
        decided = forgetting.plan(point_id, lineages, live=live, available=available)
        out.found = bool(point or messages or forgetting.still_held(decided, available))
        if not out.found:
            log.info("point %s: nothing holds it; nothing to forget", point_id)
            return out
        request_id = f"forget-{point_id}-{timestamp(at)}"
        reason = f"memory point {point_id} was deleted"
        if decided.retire:
            event = await self.updater.retire(
                [x.model for x in decided.retire],
                switch_to=decided.switch_to,
                switch_run=decided.switch_run,
                request_id=request_id,
                reason=reason,
            )
            out.switched_to = event.model if event is not None else None
        for record in decided.retire:
            with contextlib.suppress(ModelNotFound):
                await self.backend.delete(record.model)  # BackendError: retried on redelivery
            out.retired.append(record.model)
            if record.status in ("candidate", "promoted", "unconfirmed"):
                await lineage.save(
                    self.bus,
                    msgspec.structs.replace(
                        record, status="retired", retired_at=at, retired_reason=reason
                    ),
                    s.training_path,
                )

        # 3. run files, 4. events and dead letters, 5. the affected runs' objects
        runs = {x.run_id for x in decided.retire}
        if found:
            runs |= await asyncio.to_thread(self._scrub_files, found, out)
            for stream in (TRAINING_STREAM, VALIDATION_STREAM, DLQ_STREAM):
                out.events_erased += len(
                    await self.bus.erase_messages(
                        stream, ">", lambda _s, data: forgetting.holds(data, found)
                    )
                )
        for run_id in sorted(runs):
            out.objects_erased += await self.bus.erase_objects(f"{run_id}/")
        out.files_deleted += await asyncio.to_thread(self._drop_worker_runs, runs)

        # 6. the MEMORY stream and the corpus, 7. a model without the point
        for seq, _ in messages:
            await self.bus.erase_message(MEMORY_STREAM, seq)
        await asyncio.to_thread(self.corpus.forget, point_id, at)
        if decided.retrain:
            out.retrain_request = request_id
            await self.bus.publish(
                subjects.TRAINING_REQUESTED,
                TrainingRequested(request_id=request_id, force=True),
                msg_id=request_id,
            )
        out.seconds = round(time.perf_counter() - t0, 3)
        log.info(
            "point %s forgotten in %.2f s: %d stream messages, models retired %s, %d files "
            "rewritten, %d deleted, %d events erased, %d objects erased",
            point_id,
            out.seconds,
            out.stream_messages,
            out.retired,
            len(out.files_rewritten),
            len(out.files_deleted),
            out.events_erased,
            len(out.objects_erased),
        )
        return out

    def _live(self) -> str | None:
        try:
            return left_model(read_config(self.settings.config_path), self.settings.left_key)
        except (OSError, ValueError):
            return None

    def _scrub_files(self, found: list[bytes], out: Forgotten) -> set[str]:
        """Rewrite or delete every file under the training dir that holds the point; the run
        ids of the files touched (their objects are erased too)."""
        root = self.settings.training_path
        runs: set[str] = set()
        if not root.is_dir():
            return runs
        reports: list[Path] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("cannot read %s: %s", path, exc)
                continue
            action = forgetting.file_action(path.name, data, found)
            if action == "keep":
                continue
            run = _run_of(path, root)
            if run:
                runs.add(run)
            if action == "rewrite_jsonl":
                atomic_write(path, forgetting.scrub_jsonl(data, found))
                out.files_rewritten.append(str(path))
            elif action == "rewrite_report":
                reports.append(path)
            else:
                path.unlink(missing_ok=True)
                out.files_deleted.append(str(path))
        for path in reports:
            try:
                report = forgetting.scrub_report(read_report(path), found)
                names = RunNames(_run_of(path, root) or report.run_id)  # the file's own name
                json_path, html_path = write_report(report, root, names)
            except (OSError, ValueError, msgspec.DecodeError) as exc:
                log.warning("cannot rewrite %s (%s): deleted", path, exc)
                path.unlink(missing_ok=True)
                out.files_deleted.append(str(path))
                continue
            out.files_rewritten += [str(json_path), str(html_path)]
            for written in (json_path, html_path):  # a text outside the cases: deleted
                if forgetting.holds(written.read_bytes(), found):
                    written.unlink(missing_ok=True)
                    out.files_deleted.append(str(written))
        # an HTML page rewritten before its JSON was read again: check once more
        for path in sorted(root.glob("report_*.html")):
            if forgetting.holds(path.read_bytes(), found):
                path.unlink(missing_ok=True)
                out.files_deleted.append(str(path))
        return runs

    def _drop_worker_runs(self, runs: set[str]) -> list[str]:
        """A LoRA worker on this machine keeps each run's dataset, checkpoints and adapters
        under `<data-dir>/lora-worker/<run_id>`: those of the affected runs are deleted."""
        work = self.settings.lora_work_path.resolve()
        gone: list[str] = []
        for run_id in sorted(runs):
            try:
                path = (work / check_run_id(run_id)).resolve()
            except InvalidName:
                continue
            if path.parent == work and path.is_dir():
                shutil.rmtree(path)
                gone.append(str(path))
        return gone


def _run_of(path: Path, root: Path) -> str | None:
    """The run id a run file belongs to (`train_data_<run>.jsonl`, `<run>/...`), if any."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else RunNames.run_of_file(path.name)


async def serve(
    bus: Bus, settings: Settings, corpus: Corpus, backend: Backend, updater: ConfigUpdater
) -> Service:
    """Consume `memory.point.deleted` durably (one deletion at a time)."""
    forgetter = Forgetter(bus, settings, corpus, backend, updater)
    return await bus.serve(
        subjects.FORGETTER,
        MemoryPointDeleted,
        functools.partial(Forgetter.on_point_deleted, forgetter),
    )
