"""The app's model config file (`models.json`): the left-model edit, its files and its lock.

* `apply_left_model`: pure; a config dict in, the updated dict and the previous model out.
* files: `read_config`, `write_config` (in the file's own JSON style, a minimal diff),
  `backup_config`, `prune_backups`, `list_backups`, `restore` / `rollback`. Every write is atomic
  (temp file, fsync, rename), so a crash leaves the old config or the new one, never half of
  either. A backup is never overwritten.
* `config_lock`: `<config>.lock` beside the config, a cross-process lock for every change of the
  config, its journal and its backups (several updaters may serve one config).
* the journal `<config>.applied.json`: the runs already applied (model, previous model, backup,
  whether `model.updated` went out), written before the config so a redelivery finishes exactly
  what a crashed delivery left undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from shared.files import PRIVATE_FILE, atomic_write, create_new, ensure_private_dir, timestamp

log = logging.getLogger(__name__)

CONFIG_FILE_MODE = 0o644  # the model config holds no personal data
# Fields a new entry inherits from the previous left model when the base has no entry.
INHERITED_FIELDS = ("base_url", "temperature", "max_tokens")
APPLIED_SUFFIX = ".applied.json"
LOCK_SUFFIX = ".lock"
APPLIED_KEEP = 200  # runs remembered for redelivery checks


class ConfigError(ValueError):
    """The config cannot be read or does not have the shape an update needs."""


class BackupNotFound(ConfigError):
    """A rollback named a backup that is not one of this config's backups."""


# --- pure ---------------------------------------------------------------------------------------


def default_config(base_model: str) -> dict[str, Any]:
    """What a missing config is taken to be: the base model on the left, no entries."""
    return {"brain": {"left": base_model}, "models": []}


def missing_config(path: Path) -> str:
    """Why a config that does not exist is not made up, and what to do instead."""
    return (
        f"config {path} does not exist; check --config (or MINDX_CONFIG), "
        "or pass --init-config to create it"
    )


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


def model_entry(config: dict[str, Any], model: str) -> dict[str, Any]:
    """A copy of the `models` entry named `model`, or {} when there is none."""
    models = config.get("models")
    entry = _find_entry(models, model) if isinstance(models, list) else None
    return copy.deepcopy(entry) if entry is not None else {}


def names_in_use(config: dict[str, Any]) -> set[str]:
    """Every string the config holds outside its `models` entries (the left and right brain,
    and whatever else names a model): a model named there is in use."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.add(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in config.items() if k != "models"})
    return found


def without_entries(config: dict[str, Any], models: Iterable[str]) -> dict[str, Any]:
    """A copy of `config` without the `models` entries of `models` (the input is not modified;
    everything else keeps its value and position)."""
    drop = set(models)
    out = copy.deepcopy(config)
    entries = out.get("models")
    if isinstance(entries, list):
        out["models"] = [m for m in entries if not (isinstance(m, dict) and m.get("name") in drop)]
    return out


def backup_left_model(path: Path, backup: str, key_path: str = "brain.left") -> str | None:
    """The left model a backup of this config would restore (None: it names none)."""
    try:
        data = json.loads(find_backup(path, backup).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # restore() reports the broken backup
    return left_model(data, key_path) if isinstance(data, dict) else None


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
    """Copy the config to `<config>.backup.<YYYYMMDD_HHMMSS>` (`.2`, `.3`... within one second).

    The suffix follows the highest one of that second, so a name freed by pruning is never
    reused: a new backup always sorts as the newest.
    """
    path = Path(path)
    data = path.read_bytes()
    mode = path.stat().st_mode & 0o7777
    ts = timestamp(at)
    stem = f"{path.name}.backup.{ts}"
    taken = [
        key[1] for p in path.parent.iterdir() if (key := _backup_key(path, p)) and key[0] == ts
    ]
    n = max(taken, default=0) + 1
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


def config_key(path: Path | str) -> str:
    """The config's resolved path: how a rollback request names it, whoever started the updater."""
    return os.path.realpath(path)


def same_config(a: Path | str, b: Path | str) -> bool:
    """Whether two paths (one perhaps from the bus) name the same config file."""
    try:
        return config_key(a) == config_key(b)
    except ValueError:  # e.g. a NUL byte: names no file at all
        return False


def lock_path(path: Path) -> Path:
    real = Path(config_key(path))
    return real.with_name(real.name + LOCK_SUFFIX)


@contextlib.asynccontextmanager
async def config_lock(path: Path, *, poll_s: float = 0.01) -> AsyncIterator[None]:
    """Hold the config's cross-process lock (`<config>.lock`, beside the resolved config).

    flock, not POSIX record locks: a flock belongs to this open file, so another descriptor of
    the lock file closed elsewhere in the process cannot drop it. Waiting polls without blocking,
    so the event loop runs on and a cancelled wait leaves nothing behind.
    """
    p = lock_path(path)
    ensure_private_dir(p.parent)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        delay = poll_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        yield
    finally:
        os.close(fd)  # releases the lock


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
