"""ConfigUpdater: points the app's left brain at a validated model, with backups and rollback.

Three layers, top to bottom:

* `apply_left_model`: pure; a config dict in, the updated dict and the previous model out.
* files: `backup_config`, `write_config`, `prune_backups`, `list_backups`, `rollback`.
  Every write is atomic (temp file, fsync, rename), so a crash leaves the old config or the new
  one, never half of either. A backup is never overwritten.
* `ConfigUpdater` and `serve`: the bus handlers for `model.validated` and
  `model.rollback.requested`, publishing `model.updated` / `model.update_failed`.

Only a verified `model.validated` is applied (`RunVerifier`): the trainer's run record for its run
id must say the same (decision, models, scores) and the new model must exist on the backend.
Anything else is dead-lettered with the reason and leaves the config untouched; the names in it
have already been checked against the name grammar while decoding.

The app owns `models.json`. When it does not exist yet (a fresh machine), the first update starts
from `{"brain": {"left": <base>}, "models": []}` so the app finds a config that names the new
model; there is nothing to back up in that case, so `backup_path` is null.

Idempotency: next to the config, `<config>.applied.json` records the runs already applied (model,
previous model, backup, whether `model.updated` went out). It is written before the config, so a
redelivered `model.validated` finishes exactly what the crashed delivery left undone and never
makes a second backup or a second event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from shared import subjects
from shared.backend import ModelNotFound
from shared.bus import Rejected
from shared.files import atomic_write, create_new, timestamp
from shared.messages import (
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    RollbackRequested,
    RunRecord,
)

if TYPE_CHECKING:
    from shared.backend import Backend
    from shared.bus import Bus, Delivery, Service
    from shared.settings import Settings

log = logging.getLogger(__name__)

CONFIG_FILE_MODE = 0o644  # the model config holds no personal data
# Fields a new entry inherits from the previous left model when the base has no entry.
INHERITED_FIELDS = ("base_url", "temperature", "max_tokens")
APPLIED_SUFFIX = ".applied.json"
APPLIED_KEEP = 200  # runs remembered for redelivery checks


class ConfigError(ValueError):
    """The config cannot be read or does not have the shape an update needs."""


class BackupNotFound(ConfigError):
    """A rollback named a backup that is not one of this config's backups."""


# --- pure ---------------------------------------------------------------------------------------


def default_config(base_model: str) -> dict[str, Any]:
    """What a missing config is taken to be: the base model on the left, no entries."""
    return {"brain": {"left": base_model}, "models": []}


def get_key(config: dict[str, Any], key_path: str) -> Any:
    """The value at a dot-separated key path, or None when any part is missing."""
    node: Any = config
    for part in _split_key(key_path):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def left_model(config: dict[str, Any], key_path: str = "brain.left") -> str | None:
    value = get_key(config, key_path)
    return value if isinstance(value, str) else None


def apply_left_model(
    config: dict[str, Any], *, new_model: str, base_model: str, key_path: str = "brain.left"
) -> tuple[dict[str, Any], str | None]:
    """Point `key_path` at `new_model` and give it a `models` entry; return (config, previous).

    The input is not modified. Every other key keeps its value and its position. The new entry
    is a copy of the base model's entry with the name replaced; without one, a minimal entry
    inheriting base_url/temperature/max_tokens from the previous left model's entry. An existing
    entry for `new_model` is replaced where it stands.
    """
    if not new_model:
        raise ConfigError("new_model is empty")
    out = copy.deepcopy(config)
    if not isinstance(out, dict):
        raise ConfigError(f"config must be a JSON object, got {type(out).__name__}")
    parts = _split_key(key_path)
    node: dict[str, Any] = out
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})  # a missing level is appended, order of others kept
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"config key {where!r} is {type(child).__name__}, not an object")
        node = child
    previous = node.get(parts[-1])
    if previous is not None and not isinstance(previous, str):
        raise ConfigError(f"config key {key_path!r} is {type(previous).__name__}, not a string")
    node[parts[-1]] = new_model

    models = out.setdefault("models", [])
    if not isinstance(models, list):
        raise ConfigError(f"config key 'models' is {type(models).__name__}, not a list")
    base_entry = _find_entry(models, base_model)
    if base_entry is not None:
        entry = {k: (new_model if k == "name" else copy.deepcopy(v)) for k, v in base_entry.items()}
    else:
        entry = {"name": new_model}
        prev_entry = _find_entry(models, previous) if previous else None
        for k in INHERITED_FIELDS:
            if prev_entry is not None and k in prev_entry:
                entry[k] = copy.deepcopy(prev_entry[k])
    for i, m in enumerate(models):
        if isinstance(m, dict) and m.get("name") == new_model:
            models[i] = entry
            break
    else:
        models.append(entry)
    return out, previous


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


def model_entry(config: dict[str, Any], model: str) -> dict[str, Any]:
    """A copy of the `models` entry named `model`, or {} when there is none."""
    models = config.get("models")
    entry = _find_entry(models, model) if isinstance(models, list) else None
    return copy.deepcopy(entry) if entry is not None else {}


def _split_key(key_path: str) -> list[str]:
    parts = key_path.split(".")
    if not key_path or any(not p for p in parts):
        raise ConfigError(f"bad config key path {key_path!r}")
    return parts


def _find_entry(models: list[Any], name: str) -> dict[str, Any] | None:
    for m in models:
        if isinstance(m, dict) and m.get("name") == name:
            return m
    return None


# --- files --------------------------------------------------------------------------------------

_BACKUP_TAIL = re.compile(r"^(\d{8}_\d{6})(?:\.(\d+))?$")


def read_config(path: Path) -> dict[str, Any]:
    """The config as a dict (key order kept); ConfigError when it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class JsonStyle:
    """How a JSON file is laid out, so a rewrite changes only the lines that changed."""

    indent: str | None = "  "  # None: all on one line
    compact: bool = False  # one line without spaces after `,` and `:`
    ascii: bool = False  # non-ASCII written as \uXXXX
    go_escapes: bool = False  # `<`, `>`, `&` as \u003c, \u003e, \u0026 (Go's encoding/json)
    newline: str = "\n"
    final_newline: bool = True


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


def json_style(text: str) -> JsonStyle:
    """The layout of `text`: indent unit (spaces or tabs), escapes, line ends."""
    body = text.strip()
    nested = re.search(r"\n([ \t]+)\S", body)
    return JsonStyle(
        indent=nested.group(1) if nested else None,
        compact=nested is None and re.search(r"[,:]\s", body) is None,
        ascii=text.isascii() and re.search(r"\\u(?!00(3c|3e|26))", text, re.IGNORECASE) is not None,
        go_escapes=re.search(r"\\u00(3c|3e|26)", text, re.IGNORECASE) is not None,
        newline="\r\n" if "\r\n" in text else "\n",
        final_newline=text.endswith("\n") or not text,
    )


def render_config(data: dict[str, Any], style: JsonStyle = JsonStyle()) -> str:
    out = json.dumps(
        data,
        indent=style.indent,
        ensure_ascii=style.ascii,
        separators=(",", ":") if style.compact else None,
    )
    if style.go_escapes:  # outside strings JSON has none of these characters
        for char, escape in _GO_ESCAPES.items():
            out = out.replace(char, escape)
    if style.final_newline:
        out += "\n"
    return out.replace("\n", style.newline) if style.newline != "\n" else out


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Atomically replace the config in its own layout; keep the file's mode, or 0644 for a
    new one.

    A symlinked config is written through the link so the link survives.
    """
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode & 0o7777
        style = json_style(target.read_bytes().decode("utf-8"))  # line ends as they are
    except FileNotFoundError:
        mode, style = CONFIG_FILE_MODE, JsonStyle()
    except (OSError, UnicodeDecodeError):
        style = JsonStyle()
    return atomic_write(target, render_config(data, style), mode=mode)


def backup_config(path: Path, *, at: datetime | None = None) -> Path:
    """Copy the config to `<config>.backup.<YYYYMMDD_HHMMSS>` (`.2`, `.3`... within one second)."""
    path = Path(path)
    data = path.read_bytes()
    mode = path.stat().st_mode & 0o7777
    stem = f"{path.name}.backup.{timestamp(at)}"
    n = 1
    while True:
        dest = path.with_name(stem if n == 1 else f"{stem}.{n}")
        if create_new(dest, data, mode=mode):
            return dest
        n += 1


def _backup_key(path: Path, candidate: Path) -> tuple[str, int] | None:
    prefix = f"{path.name}.backup."
    if not candidate.name.startswith(prefix):
        return None
    m = _BACKUP_TAIL.match(candidate.name[len(prefix) :])
    if m is None:
        return None
    return m.group(1), int(m.group(2) or 1)


def list_backups(path: Path) -> list[Path]:
    """This config's backups, newest first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    keyed = []
    for p in path.parent.iterdir():
        key = _backup_key(path, p)
        if key is not None and p.is_file():
            keyed.append((key, p))
    keyed.sort(reverse=True)
    return [p for _, p in keyed]


def prune_backups(path: Path, keep: int = 10) -> list[Path]:
    """Delete all but the newest `keep` backups; return the deleted ones."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = list_backups(path)[keep:]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def find_backup(path: Path, backup: str | None) -> Path:
    """The named backup (file name or path) of this config, or the newest one."""
    path = Path(path)
    backups = list_backups(path)
    if not backups:
        raise BackupNotFound(f"no backups of {path}")
    if backup is None:
        return backups[0]
    wanted = Path(backup).expanduser()
    for b in backups:
        if (len(wanted.parts) == 1 and wanted.name == b.name) or (
            len(wanted.parts) > 1 and os.path.realpath(wanted) == os.path.realpath(b)
        ):
            return b
    names = ", ".join(b.name for b in backups[:5]) + (" ..." if len(backups) > 5 else "")
    raise BackupNotFound(f"{backup!r} is not a backup of {path}; backups: {names}")


@dataclasses.dataclass(frozen=True)
class RollbackResult:
    restored_from: Path
    model: str | None  # left model after the rollback
    previous: str | None  # left model before it (None when the config was missing or broken)
    backup_path: Path | None  # where the replaced config was saved, so the rollback can be undone


def restore(
    path: Path,
    backup: str | None = None,
    *,
    key_path: str = "brain.left",
    keep: int | None = None,
) -> RollbackResult:
    """Restore a backup over the config, saving the current config first."""
    path = Path(path)
    source = find_backup(path, backup)  # chosen before the safety backup becomes the newest
    data = source.read_bytes()
    try:
        restored = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"backup {source.name} is not valid JSON: {exc}") from exc
    model = left_model(restored, key_path) if isinstance(restored, dict) else None
    previous: str | None = None
    saved: Path | None = None
    if path.exists():
        try:
            previous = left_model(read_config(path), key_path)
        except ConfigError:
            previous = None  # a broken config is exactly what a rollback is for
        saved = backup_config(path)
    target = Path(os.path.realpath(path))
    mode = target.stat().st_mode & 0o7777 if target.exists() else CONFIG_FILE_MODE
    atomic_write(target, data, mode=mode)  # the backup's bytes, as they were
    if keep is not None:
        protected = {source, saved}
        for p in list_backups(path)[keep:]:
            if p not in protected:
                p.unlink(missing_ok=True)
    return RollbackResult(source, model, previous, saved)


def rollback(
    path: Path, backup: str | None = None, *, key_path: str = "brain.left", keep: int | None = None
) -> tuple[Path, str | None, str | None]:
    """Restore the named or newest backup; return (restored_from, model, previous)."""
    r = restore(path, backup, key_path=key_path, keep=keep)
    return r.restored_from, r.model, r.previous


# --- applied-runs journal -----------------------------------------------------------------------


class AppliedRun(msgspec.Struct, kw_only=True):
    model: str
    previous_model: str | None = None
    backup_path: str | None = None
    published: bool = False
    changed: bool = True  # False: the config already named the model; nothing to announce
    restored_from: str | None = None  # rollbacks: the backup's file name, fixed before restoring


def applied_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + APPLIED_SUFFIX)


def load_applied(path: Path) -> dict[str, AppliedRun]:
    p = applied_path(path)
    try:
        return msgspec.json.decode(p.read_bytes(), type=dict[str, AppliedRun])
    except FileNotFoundError:
        return {}
    except (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("%s unreadable (%s); starting a new one", p, exc)
        return {}


def save_applied(path: Path, runs: dict[str, AppliedRun]) -> None:
    if len(runs) > APPLIED_KEEP:  # insertion order is age order
        runs = dict(list(runs.items())[-APPLIED_KEEP:])
    atomic_write(applied_path(path), msgspec.json.encode(runs), mode=CONFIG_FILE_MODE)


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


class ConfigUpdater:
    """Handlers for `model.validated` and `model.rollback.requested`.

    Both rewrite the same file, so a lock serializes them. Errors a redelivery cannot fix
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
    ) -> None:
        self.bus = bus
        self.verifier = verifier
        self.config_path = Path(config_path)
        self.key_path = key_path
        self.keep_backups = keep_backups
        self._lock = asyncio.Lock()

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
        async with self._lock:
            try:
                event = self._apply(ev)
            except (OSError, ConfigError) as exc:
                await self._failed(ev.run_id, exc)
                return
            if event is not None:
                await self.bus.publish(
                    subjects.MODEL_UPDATED, event, msg_id=f"{subjects.MODEL_UPDATED}.{ev.run_id}"
                )
                self._mark_published(ev.run_id, event)

    def _apply(self, ev: ModelValidated) -> ModelUpdated | None:
        """Do what is left to do for this run; the event to publish, or None."""
        path = self.config_path
        runs = load_applied(path)
        rec = runs.get(ev.run_id)
        if rec is not None and (rec.published or not rec.changed):
            log.info("run %s already applied; nothing to do", ev.run_id)
            return None
        exists = path.exists()
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
        run_id = ev.request_id or f"rollback-{timestamp()}"
        key = f"rollback:{ev.request_id}" if ev.request_id else None
        async with self._lock:
            try:
                runs = load_applied(self.config_path) if key else {}
                rec = runs.get(key) if key else None
                if rec is not None and rec.published:
                    log.info("rollback %s already done; nothing to do", run_id)
                    return
                if rec is None:
                    # Fix the source before restoring: on a redelivery "newest" would be the
                    # safety backup of this very rollback, which would undo it.
                    name = find_backup(self.config_path, ev.backup).name
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


async def serve(bus: Bus, settings: Settings, backend: Backend) -> list[Service]:
    """Start both durable consumers; the caller stops the returned services."""
    updater = ConfigUpdater(
        bus,
        verifier=RunVerifier(bus, backend),
        config_path=settings.config_path,
        key_path=settings.left_key,
        keep_backups=settings.keep_backups,
    )
    return [
        await bus.serve(subjects.CONFIG_UPDATER, ModelValidated, updater.on_model_validated),
        await bus.serve(subjects.CONFIG_ROLLBACK, RollbackRequested, updater.on_rollback),
    ]
