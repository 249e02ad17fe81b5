"""ConfigUpdater: points the app's left brain at a validated model, with backups and rollback.

`ConfigUpdater` and `serve` are the bus handlers for `model.validated` and
`model.rollback.requested`, publishing `model.updated` / `model.update_failed`; the config file
itself (the edit, backups, the lock, the applied-runs journal) is `services/model_config.py`.

Only a verified `model.validated` is applied (`RunVerifier`): the trainer's run record for its run
id must say the same (decision, models, scores) and the new model must exist on the backend.
Anything else is dead-lettered with the reason and leaves the config untouched; the names in it
have already been checked against the name grammar while decoding.

The app owns `models.json`. A missing one is an operator's mistake (a typo in `--config`) and the
update fails with that reason, unless `init_config` is set (`--init-config`, a fresh machine): then
the first update starts from `{"brain": {"left": <base>}, "models": []}` so the app finds a config
that names the new model; there is nothing to back up in that case, so `backup_path` is null.

Idempotency: the journal records the runs already applied before the config is written, so a
redelivered `model.validated` finishes exactly what the crashed delivery left undone and never
makes a second backup or a second event.

Retention: a model made live is marked promoted in its lineage; then every promoted model beyond
the newest `keep_models` that the config does not name is deleted from the backend, with its
`models` entry, and marked retired. A rollback restores only a backup whose left model the
backend still has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from services import lineage
from services.model_config import (
    AppliedRun,
    ConfigError,
    apply_left_model,
    backup_config,
    backup_left_model,
    config_key,
    config_lock,
    default_config,
    find_backup,
    left_model,
    load_applied,
    missing_config,
    model_entry,
    names_in_use,
    prune_backups,
    read_config,
    restore,
    same_config,
    save_applied,
    without_entries,
    write_config,
)
from services.pipeline import to_prune
from shared import subjects
from shared.backend import BackendError, ModelNotFound
from shared.bus import Rejected
from shared.files import timestamp
from shared.messages import (
    ModelLineage,
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    RollbackRequested,
    RunRecord,
    utc_now,
)
from shared.names import same_model

if TYPE_CHECKING:
    from shared.backend import Backend
    from shared.bus import Bus, Delivery, Service
    from shared.settings import Settings

log = logging.getLogger(__name__)

# what a model.validated must share with its run record
RECORD_FIELDS = (
    "mode",
    "base_model",
    "new_model",
    "improved",
    "base_score",
    "new_score",
    "base_accuracy",
    "new_accuracy",
    "cases",
)


def record_mismatch(ev: ModelValidated, record: RunRecord | None) -> str | None:
    """Why `ev` is not what the trainer decided for its run, or None when it matches."""
    if record is None:
        return f"run {ev.run_id} has no run record: no trainer decided it"
    if record.stage == "running":
        return f"run {ev.run_id} is still running: nothing was decided"
    differ = [
        f"{name} {_short(getattr(ev, name))} (run record: {_short(getattr(record, name))})"
        for name in RECORD_FIELDS
        if getattr(ev, name) != getattr(record, name)
    ]
    if differ:
        return f"run {ev.run_id} does not match its run record: " + "; ".join(differ)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:80] + "…"


# --- bus ----------------------------------------------------------------------------------------


class Publisher(Protocol):
    async def publish(
        self, subject: str, payload: msgspec.Struct, *, msg_id: str | None = None
    ) -> None: ...


class ModelMissing(Rejected):
    """A run whose record matches named a model the backend does not have."""


class Verifier(Protocol):
    async def verify(self, ev: ModelValidated) -> None:
        """Return when `ev` may be applied; raise Rejected with the reason when not."""
        ...


class RunVerifier:
    """A `model.validated` is genuine when the trainer's run record says the same and the new
    model exists on the backend."""

    def __init__(self, bus: Bus, backend: Backend) -> None:
        self.bus = bus
        self.backend = backend

    async def verify(self, ev: ModelValidated) -> None:
        record = await self.bus.get_record(subjects.RUNS, ev.run_id, RunRecord)
        why = record_mismatch(ev, record)
        if why is not None:
            raise Rejected(why)
        try:
            await self.backend.show(ev.new_model)
        except ModelNotFound as exc:
            raise ModelMissing(f"model {ev.new_model} is not on the backend ({exc})") from exc


class ModelGone(ConfigError):
    """A rollback would restore a model the backend no longer has."""


class ModelStore(Protocol):
    """The created models: their lineage, and the backend that serves them."""

    async def lineages(self) -> list[ModelLineage]: ...

    async def load(self, run_id: str) -> ModelLineage | None: ...

    async def save(self, record: ModelLineage) -> None: ...

    async def exists(self, model: str) -> bool: ...

    async def delete(self, model: str) -> None:
        """Remove `model` from the backend; one it does not have is no error."""
        ...


class BusModels:
    """`ModelStore` on the lineage bucket and a backend."""

    def __init__(self, bus: Bus, backend: Backend, training_dir: Path | None) -> None:
        self.bus, self.backend, self.training_dir = bus, backend, training_dir

    async def lineages(self) -> list[ModelLineage]:
        return await lineage.load_all(self.bus)

    async def load(self, run_id: str) -> ModelLineage | None:
        return await lineage.load(self.bus, run_id)

    async def save(self, record: ModelLineage) -> None:
        await lineage.save(self.bus, record, self.training_dir)

    async def exists(self, model: str) -> bool:
        try:
            await self.backend.show(model)
        except ModelNotFound:
            return False
        return True

    async def delete(self, model: str) -> None:
        with contextlib.suppress(ModelNotFound):
            await self.backend.delete(model)


class ConfigUpdater:
    """Handlers for `model.validated` and `model.rollback.requested`.

    Both rewrite the same file, so a lock serializes them: across processes too, since
    several updaters may serve one config. A rollback request is done only by an updater of the
    config it names; the others ack it and leave it alone. Errors a redelivery cannot fix
    (invalid config, unwritable path, unknown backup) are published as `model.update_failed`
    and the message is acked; only a failing publish raises (and is retried by the bus).
    """

    def __init__(
        self,
        bus: Publisher,
        *,
        verifier: Verifier,
        config_path: Path,
        key_path: str = "brain.left",
        keep_backups: int = 10,
        models: ModelStore | None = None,  # None: no lineage, no retention, no existence check
        keep_models: int = 3,
        init_config: bool = False,
    ) -> None:
        self.bus = bus
        self.init_config = init_config  # may a missing config be created?
        self.verifier = verifier
        self.config_path = Path(config_path)
        self.key_path = key_path
        self.keep_backups = keep_backups
        self.models = models
        self.keep_models = keep_models
        self._lock = asyncio.Lock()  # this process's handlers; config_lock: other processes

    async def on_model_validated(
        self, ev: ModelValidated, delivery: Delivery | None = None
    ) -> None:
        if not ev.improved:
            log.info(
                "run %s: %s is not better than %s; config kept",
                ev.run_id,
                ev.new_model,
                ev.base_model,
            )
            return
        try:
            await self.verifier.verify(ev)  # Rejected: dead-lettered, nothing else happens
        except ModelMissing as exc:  # a genuine run: its trainer waits for an answer
            await self._failed(ev.run_id, exc)
            raise
        if not self.init_config and not self.config_path.exists():
            # before the lock, whose file would make the mistyped path's directories
            await self._failed(ev.run_id, ConfigError(missing_config(self.config_path)))
            return
        async with self._lock, contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(config_lock(self.config_path))
                event = self._apply(ev)
            except (OSError, ConfigError) as exc:
                await self._failed(ev.run_id, exc)
                return
            await self._promoted(ev.run_id)  # before the event: a next run counts from it
            if event is not None:
                await self.bus.publish(
                    subjects.MODEL_UPDATED, event, msg_id=f"{subjects.MODEL_UPDATED}.{ev.run_id}"
                )
                self._mark_published(ev.run_id, event)
            await self._retain()

    def _apply(self, ev: ModelValidated) -> ModelUpdated | None:
        """Do what is left to do for this run; the event to publish, or None."""
        path = self.config_path
        runs = load_applied(path)
        rec = runs.get(ev.run_id)
        if rec is not None and (rec.published or not rec.changed):
            log.info("run %s already applied; nothing to do", ev.run_id)
            return None
        exists = path.exists()
        if not exists and not self.init_config:
            raise ConfigError(missing_config(path))
        config = read_config(path) if exists else default_config(ev.base_model)
        written = config  # what the config holds once this run is applied
        current = left_model(config, self.key_path)
        if rec is None and current == ev.new_model:
            runs[ev.run_id] = AppliedRun(model=ev.new_model, previous_model=current, changed=False)
            save_applied(path, runs)
            log.info("run %s: config already names %s", ev.run_id, ev.new_model)
            return None
        if rec is None or current != rec.model:
            # A fresh run, or a redelivery after a crash before the config was written; then
            # the recorded backup already holds this config and no second one is made.
            updated, previous = apply_left_model(
                config, new_model=ev.new_model, base_model=ev.base_model, key_path=self.key_path
            )
            fresh = rec is None
            made: Path | None = None
            try:
                if rec is None:
                    made = backup_config(path) if exists else None
                    rec = AppliedRun(
                        model=ev.new_model,
                        previous_model=previous,
                        backup_path=str(made) if made else None,
                    )
                    runs[ev.run_id] = rec
                    save_applied(path, runs)  # before the config, so a redelivery knows the backup
                write_config(path, updated)
            except BaseException:
                if made is not None:
                    made.unlink(missing_ok=True)
                if fresh and ev.run_id in runs:
                    del runs[ev.run_id]
                    with contextlib.suppress(OSError):
                        save_applied(path, runs)
                raise
            written = updated
            self._prune()
        return ModelUpdated(
            run_id=ev.run_id,
            role="left",
            model=rec.model,
            previous_model=rec.previous_model,
            config_path=str(path),
            backup_path=rec.backup_path,
            rolled_back=False,
            model_entry=model_entry(written, rec.model),
            request_id=ev.request_id,
            mode=ev.mode,
            base_score=ev.base_score,
            new_score=ev.new_score,
        )

    async def on_rollback(self, ev: RollbackRequested, delivery: Delivery | None = None) -> None:
        """Restore the named or newest backup; a repeated request_id restores nothing twice."""
        if not same_config(ev.config_path, self.config_path):
            log.debug(
                "rollback %s is for %s; %s is left alone",
                ev.request_id,
                ev.config_path,
                self.config_path,
            )
            return
        run_id = ev.request_id or f"rollback-{timestamp()}"
        key = f"rollback:{ev.request_id}" if ev.request_id else None
        async with self._lock, contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(config_lock(self.config_path))
                runs = load_applied(self.config_path) if key else {}
                rec = runs.get(key) if key else None
                if rec is not None and rec.published:
                    log.info("rollback %s already done; nothing to do", run_id)
                    return
                if rec is None:
                    # Fix the source before restoring: on a redelivery "newest" would be the
                    # safety backup of this very rollback, which would undo it.
                    name = find_backup(self.config_path, ev.backup).name
                    await self._check_restorable(name)
                    if key:
                        rec = AppliedRun(
                            model="", previous_model=self._current(), restored_from=name
                        )
                        runs[key] = rec
                        save_applied(self.config_path, runs)
                else:
                    name = rec.restored_from or ""
                r = restore(self.config_path, name, key_path=self.key_path, keep=self.keep_backups)
                if rec is not None:  # a redelivery must not report its own first attempt
                    r = dataclasses.replace(r, previous=rec.previous_model)
            except (OSError, ConfigError) as exc:
                await self._failed(run_id, exc)
                return
            log.info("rolled back %s to %s (left: %s)", self.config_path, r.restored_from, r.model)
            await self._drop_gone_entries(r.model)
            restored = self._restored(r.model)
            event = ModelUpdated(
                run_id=run_id,
                role="left",
                model=r.model or "",
                previous_model=r.previous,
                config_path=str(self.config_path),
                backup_path=str(r.backup_path) if r.backup_path else None,
                rolled_back=True,
                restored_from=str(r.restored_from),
                model_entry=restored[0],
                restored_run_id=restored[1],
            )
            await self.bus.publish(
                subjects.MODEL_UPDATED,
                event,
                msg_id=f"{subjects.MODEL_UPDATED}.{run_id}" if key else None,
            )
            if key:
                self._mark_published(key, event)

    async def retire(
        self,
        models: Collection[str],
        *,
        switch_to: str | None,
        switch_run: str | None,
        request_id: str,
        reason: str,
    ) -> ModelUpdated | None:
        """Drop the `models` entries of `models` and, when the config's live model is one of
        them, point it at `switch_to` at once (with a backup) and announce `model.updated`;
        the event, or None when the live model stays. Forgetting calls it before it deletes the
        models from the backend, so the Brain never names a model that is gone."""
        async with self._lock, config_lock(self.config_path):
            if not self.config_path.exists():
                return None
            config = read_config(self.config_path)
            current = left_model(config, self.key_path)
            live_goes = current is not None and any(same_model(current, m) for m in models)
            updated, previous = config, current
            if live_goes and switch_to:
                updated, previous = apply_left_model(
                    config, new_model=switch_to, base_model=switch_to, key_path=self.key_path
                )
            updated = without_entries(updated, [m for m in models if m != switch_to])
            if updated == config:
                return None
            made = backup_config(self.config_path) if live_goes else None
            write_config(self.config_path, updated)
            self._prune()
            if not live_goes:
                return None
            event = ModelUpdated(
                run_id=request_id,
                role="left",
                model=switch_to or "",
                previous_model=previous,
                config_path=str(self.config_path),
                backup_path=str(made) if made else None,
                model_entry=model_entry(updated, switch_to or ""),
                request_id=request_id,
                restored_run_id=switch_run,
                reason=reason,
            )
            await self.bus.publish(
                subjects.MODEL_UPDATED, event, msg_id=f"{subjects.MODEL_UPDATED}.{request_id}"
            )
            log.info("%s: the live model %s is now %s", reason, previous, switch_to)
            return event

    def _restored(self, model: str | None) -> tuple[dict[str, Any], str | None]:
        """The restored model's config entry, and the newest applied run that built it (None:
        a model no run of this journal built, e.g. the base)."""
        try:
            entry = model_entry(read_config(self.config_path), model or "")
        except (OSError, ConfigError):
            entry = {}
        runs = load_applied(self.config_path)
        built = [
            key
            for key, rec in runs.items()
            if not key.startswith("rollback:") and rec.changed and rec.model == model
        ]
        return entry, (built[-1] if built else None)

    async def _promoted(self, run_id: str) -> None:
        """Mark the run's model promoted in its lineage (the switch stands if this fails)."""
        if self.models is None:
            return
        try:
            record = await self.models.load(run_id)
            if record is not None and record.status in ("candidate", "unconfirmed"):
                await self.models.save(
                    msgspec.structs.replace(record, status="promoted", promoted_at=utc_now())
                )
        except Exception as exc:
            log.warning("run %s: the lineage does not say promoted: %s", run_id, exc)

    async def _retain(self) -> None:
        """Delete promoted models beyond the newest `keep_models` that the config does not
        name, from the backend and the config's `models`; under the config lock."""
        if self.models is None:
            return
        try:
            config = read_config(self.config_path)
            doomed = to_prune(
                await self.models.lineages(), keep=self.keep_models, in_use=names_in_use(config)
            )
            gone: list[ModelLineage] = []
            for record in doomed:
                try:
                    await self.models.delete(record.model)
                except BackendError as exc:  # still promoted: the next promotion tries again
                    log.warning("cannot delete %s from the backend: %s", record.model, exc)
                    continue
                gone.append(record)
            pruned = without_entries(config, [r.model for r in gone])
            if pruned != config:
                write_config(self.config_path, pruned)
            why = f"older than the newest {self.keep_models} promoted models"
            for record in gone:
                log.info("retired %s: %s", record.model, why)
                await self.models.save(
                    msgspec.structs.replace(
                        record, status="retired", retired_at=utc_now(), retired_reason=why
                    )
                )
        except Exception as exc:  # the update itself succeeded; the next one prunes again
            log.warning("retention of models in %s failed: %s", self.config_path, exc)

    async def _drop_gone_entries(self, keep: str | None) -> None:
        """After a restore: drop the `models` entries of models retired or rejected since the
        backup was made (the backend no longer has them), except the restored left model."""
        if self.models is None:
            return
        try:
            gone = [
                x.model
                for x in await self.models.lineages()
                if x.status in ("retired", "rejected") and not same_model(x.model, keep or "")
            ]
            config = read_config(self.config_path)
            pruned = without_entries(config, gone)
            if pruned != config:
                write_config(self.config_path, pruned)
        except Exception as exc:  # the rollback itself succeeded; the next update prunes again
            log.warning("entries of retired models stay in %s: %s", self.config_path, exc)

    async def _check_restorable(self, backup: str) -> None:
        """ModelGone when the backup's left model is no longer on the backend."""
        if self.models is None:
            return
        model = backup_left_model(self.config_path, backup, self.key_path)
        if not model:
            return
        try:
            exists = await self.models.exists(model)
        except BackendError as exc:  # a rollback is for bad times: it is not refused for this
            log.warning("cannot check that %s is on the backend (%s); restoring", model, exc)
            return
        if not exists:
            raise ModelGone(
                f"backup {backup} names {model}, which is no longer on the backend; "
                "choose another backup with --to (see mindx backups)"
            )

    def _current(self) -> str | None:
        try:
            return left_model(read_config(self.config_path), self.key_path)
        except (OSError, ConfigError):
            return None

    async def _failed(self, run_id: str, exc: Exception) -> None:
        log.error("run %s: config update failed: %s", run_id, exc)
        await self.bus.publish(
            subjects.MODEL_UPDATE_FAILED,
            ModelUpdateFailed(run_id=run_id, error=f"{type(exc).__name__}: {exc}"),
        )

    def _prune(self) -> None:
        try:
            prune_backups(self.config_path, self.keep_backups)
        except OSError as exc:  # the update itself succeeded; a leftover backup is harmless
            log.warning("pruning backups of %s failed: %s", self.config_path, exc)

    def _mark_published(self, key: str, event: ModelUpdated) -> None:
        runs = load_applied(self.config_path)
        runs[key] = AppliedRun(
            model=event.model,
            previous_model=event.previous_model,
            backup_path=event.backup_path,
            published=True,
            restored_from=event.restored_from,
        )
        save_applied(self.config_path, runs)


def updater_for(bus: Bus, settings: Settings, backend: Backend) -> ConfigUpdater:
    """The updater of the settings' config, with lineage and retention on the bus."""
    return ConfigUpdater(
        bus,
        verifier=RunVerifier(bus, backend),
        config_path=settings.config_path,
        key_path=settings.left_key,
        keep_backups=settings.keep_backups,
        models=BusModels(bus, backend, settings.training_path),
        keep_models=settings.keep_models,
        init_config=settings.init_config,
    )


async def serve(bus: Bus, settings: Settings, backend: Backend) -> list[Service]:
    """Start both durable consumers; the caller stops the returned services."""
    updater = updater_for(bus, settings, backend)
    return [
        await bus.serve(subjects.CONFIG_UPDATER, ModelValidated, updater.on_model_validated),
        await bus.serve(
            subjects.config_rollback(config_key(settings.config_path)),
            RollbackRequested,
            updater.on_rollback,
        ),
    ]
