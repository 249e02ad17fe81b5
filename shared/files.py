"""File writes that keep personal data private and never leave a half-written file."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def timestamp(at: datetime | None = None) -> str:
    """The seed's file-name timestamp, `YYYYMMDD_HHMMSS`."""
    return (at or datetime.now()).strftime("%Y%m%d_%H%M%S")


def ensure_private_dir(path: Path) -> Path:
    """Make `path` a directory; each directory made here, parents included, is 0700.

    mkdir's mode is masked by the umask and `parents=True` makes parents 0777 & ~umask, so each
    missing level is made and set on its own. A directory that exists keeps its mode: it is
    not ours to change.
    """
    path = Path(path)
    missing: list[Path] = []
    level = path
    while not level.exists() and level != level.parent:
        missing.append(level)
        level = level.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile by another process
        os.chmod(d, PRIVATE_DIR)
    path.mkdir(exist_ok=True)  # FileExistsError when `path` is a file
    return path


def _write_temp(path: Path, data: bytes | str, mode: int) -> str:
    """A fsynced temp file with `data` beside `path`; the caller renames or links it."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def create_new(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE) -> bool:
    """Write `path` atomically only if it does not exist yet; False if it did."""
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)  # unlike rename, link never replaces an existing file
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def write_private(path: Path, data: bytes | str) -> Path:
    """A file only its owner can read (personal conversations)."""
    return atomic_write(path, data, mode=PRIVATE_FILE)
