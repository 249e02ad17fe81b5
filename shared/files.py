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
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def atomic_write(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_private(path: Path, data: bytes | str) -> Path:
    """A file only its owner can read (personal conversations)."""
    return atomic_write(path, data, mode=PRIVATE_FILE)
