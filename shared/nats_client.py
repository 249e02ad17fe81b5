"""How a client reaches a secured NATS: credentials, TLS, its inbox, and what the server refuses.

`NatsAuth` holds the connection options under natscli's names (user and password, token, a
creds file, an nkey seed file, TLS CA / client certificate / key) and turns them into nats-py's
`connect()` arguments. `Denials` collects the permission violations the server reports on a
connection, so a refused call fails at once with a clear error instead of waiting out its
timeout (the server answers a denied publish or subscription only with an `-ERR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.subjects import subject_matches

T = TypeVar("T")


def _not_start_tls_eof(record: logging.LogRecord) -> bool:
    # nats-py upgrades its TCP stream to TLS in place, so asyncio warns at every close of a
    # TLS connection that the stream's protocol "returns true from eof_received()": harmless.
    return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_not_start_tls_eof)

_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)


class PermissionDeniedError(Exception):
    """The server refused a publish or subscription: this user lacks the permission."""

    def __init__(self, action: str, subject: str) -> None:
        verb = "subscribe to" if action.startswith("sub") else "publish to"
        super().__init__(f"not permitted to {verb} {subject} (the NATS user lacks this permission)")
        self.action = action
        self.subject = subject  # in lower case: how nats-py hands the server's text over
        self.awaited = False  # a guarded call took it (and raises it)


@dataclass(frozen=True)
class NatsAuth:
    """Connection options of one NATS identity (all optional: an open server needs none)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: Path | None = None  # a `.creds` file: user JWT and its nkey seed
    nkey: Path | None = None  # an nkey seed file (`SU...`)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    inbox_prefix: str | None = None  # None: `_INBOX.<public key>` with an nkey, else `_INBOX`

    def problems(self) -> list[str]:
        """Combinations that cannot work, as messages (no file is read)."""
        out = []
        if self.password and not self.user:
            out.append("a NATS password needs a user (--nats-user)")
        if self.token and (self.user or self.password):
            out.append("use a NATS token or a user and password, not both")
        if self.creds and self.nkey:
            out.append("use a NATS creds file or an nkey seed file, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("a TLS client certificate and its key go together (--nats-tls-cert/-key)")
        return out

    @property
    def any(self) -> bool:
        """Whether any option is set (an embedded server ignores them all)."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def connect_kwargs(self) -> dict[str, Any]:
        """nats-py `connect()` arguments; FileNotFoundError names a missing file."""
        for what, path in (
            ("creds file", self.creds),
            ("nkey seed file", self.nkey),
            ("TLS CA file", self.tls_ca),
            ("TLS certificate", self.tls_cert),
            ("TLS key", self.tls_key),
        ):
            if path is not None and not path.expanduser().is_file():
                raise FileNotFoundError(f"NATS {what} not found: {path}")
        kw: dict[str, Any] = {}
        if self.user:
            kw["user"] = self.user
            kw["password"] = self.password or ""
        if self.token:
            kw["token"] = self.token
        if self.creds:
            kw["user_credentials"] = str(self.creds.expanduser())
        if self.nkey:
            kw["nkeys_seed"] = str(self.nkey.expanduser())
        if self.tls_ca or self.tls_cert:
            kw["tls"] = self.tls_context()
        prefix = self.inbox_prefix or self._nkey_inbox()
        if prefix:
            kw["inbox_prefix"] = prefix
        return kw

    def tls_context(self) -> ssl.SSLContext:
        """Verify the server with `tls_ca` (else the system's CAs); present the client cert."""
        ctx = ssl.create_default_context(
            cafile=str(self.tls_ca.expanduser()) if self.tls_ca else None
        )
        if self.tls_cert and self.tls_key:
            ctx.load_cert_chain(str(self.tls_cert.expanduser()), str(self.tls_key.expanduser()))
        return ctx

    def _nkey_inbox(self) -> str | None:
        # An nkey identity gets a private inbox (shared.nats_auth grants only that one).
        if not self.nkey:
            return None
        from shared.nats_auth import inbox_prefix, public_key

        return inbox_prefix(public_key(self.nkey.expanduser().read_bytes()))


class Connecting:
    """The errors of a connection being made. A certificate the other side rejects, or
    credentials the server refuses, end it at once: no retry fixes them (and nats-py may hang
    after a failed TLS handshake)."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self._fatal: asyncio.Future[Exception] | None = None

    def error(self, exc: Exception) -> None:
        self.errors.append(exc)
        fatal = isinstance(exc, ssl.SSLError) or _refused(exc)
        if fatal and self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(exc)

    async def run(self, connect: Awaitable[T]) -> T:
        """Await `connect`, or raise the first fatal error reported meanwhile."""
        self._fatal = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(connect)
        try:
            await asyncio.wait({task, self._fatal}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise self._fatal.result()
        finally:
            if not task.done():
                task.cancel()

    def reason(self, exc: Exception) -> str:
        """Why the connection failed, in words a user can act on."""
        seen = [*self.errors, exc]
        if any(_refused(e) for e in seen):
            return "authorization failed (check the user and password, token, nkey or creds)"
        tls = next((e for e in seen if isinstance(e, ssl.SSLError)), None)
        if tls is not None:
            return f"TLS failed: {getattr(tls, 'reason', None) or tls}"
        return str(exc) or type(exc).__name__


def _refused(exc: BaseException) -> bool:
    return "authorization" in str(exc).lower() or type(exc).__name__ == "AuthorizationError"


# How a connection rides out the loss of its server: it moves to another URL of the list (or,
# with one URL, waits for it to come back), trying every half second; a server that stops
# answering is given up after 3 pings 10 s apart (a crashed host sends no FIN).
RECONNECT_WAIT_S = 0.5
PING_INTERVAL_S = 10
MAX_OUTSTANDING_PINGS = 3


def server_urls(url: str) -> list[str]:
    """The servers of a `--nats` / NATS_URL value: one URL, or several comma-separated (natscli's
    form: the nodes of one cluster). ValueError when it names none."""
    urls = [one.strip() for one in url.split(",") if one.strip()]
    if not urls:
        raise ValueError(f"no NATS URL in {url!r}")
    return urls


def reconnect_options(initial_attempts: int) -> dict[str, Any]:
    """nats-py `connect()` arguments for reconnecting: `initial_attempts` per server while
    connecting (an unreachable bus is reported); a connected client sets
    `max_reconnect_attempts` to -1 and then retries for as long as it runs."""
    return {
        "allow_reconnect": True,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "max_reconnect_attempts": initial_attempts,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
    }


FLUSH_TRY_S = 2  # one ping's wait; a ping lost in a reconnect is sent again after it
FLUSH_WITHIN_S = 30.0


async def flush(nc: Client, within: float = FLUSH_WITHIN_S) -> None:
    """`nc.flush()` that rides out a reconnect: nats-py forgets the pings awaiting their pong
    when it reconnects, so a flush begun meanwhile would wait out its whole timeout; here each
    ping waits FLUSH_TRY_S, and another is sent until `within` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await nc.flush(timeout=FLUSH_TRY_S)
            return
        except TimeoutError:  # nats' FlushTimeoutError too
            if loop.time() >= deadline or nc.is_closed:
                raise


def redact_url(url: str) -> str:
    """The URL without its password or token (`nats://me:***@host:4222`)."""
    parts = []
    for one in url.split(","):
        u = urlsplit(one.strip())
        if u.password is None and not u.username:
            parts.append(one.strip())
            continue
        user = f"{u.username}:***" if u.password is not None else "***"
        host = u.hostname or ""
        netloc = f"{user}@{host}" + (f":{u.port}" if u.port else "")
        parts.append(urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment)))
    return ",".join(parts)


def _matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match, ignoring case (nats-py hands the server's error text over in lower
    case)."""
    return subject_matches(pattern.lower(), subject.lower())


class Denials:
    """The permission violations one connection was told about (its error callback feeds
    `record`), and `guard` to fail a call as soon as a violation for its subjects arrives."""

    def __init__(self, error: type[PermissionDeniedError] = PermissionDeniedError) -> None:
        self._error = error  # the class raised (the bus raises its own, a BusError)
        self.seen: deque[PermissionDeniedError] = deque(maxlen=64)
        # guarded calls in flight: the subjects they may be refused, and the denial if they were
        self._calls: dict[asyncio.Future[Any], tuple[tuple[str, ...], list[Exception]]] = {}

    def record(self, error: BaseException) -> PermissionDeniedError | None:
        """The denial that `error` reports, or None when it is something else."""
        found = _VIOLATION.search(str(error))
        if not found:
            return None
        denied = self._error(found.group(1).lower(), found.group(2))
        self.seen.append(denied)
        for call, (patterns, refused) in self._calls.items():
            if any(_matches(p, denied.subject) for p in patterns) and call.cancel():
                refused.append(denied)
                denied.awaited = True
        return denied

    def denied(self, subject: str) -> PermissionDeniedError | None:
        """A denial already seen for `subject` (e.g. a subscription, after a flush)."""
        return next((d for d in reversed(self.seen) if _matches(subject, d.subject)), None)

    async def subscribe(
        self, nc: Client, subject: str, queue: str | None, cb: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """Subscribe, and raise the denial if the server refuses it (the server says so before
        it answers a ping sent after the SUB)."""
        sub = await nc.subscribe(subject, queue=queue or "", cb=cb)
        # nats-py writes a flush's PING ahead of the queued SUB; by the first PONG the SUB is
        # on the wire, so the second ping follows it
        await flush(nc)
        await flush(nc)
        denied = self.denied(subject)
        if denied is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise denied
        return sub

    async def guard(self, call: Awaitable[T], *patterns: str) -> T:
        """Await `call`; raise PermissionDeniedError instead if, meanwhile, the server denies a
        subject matching one of `patterns` (`record` cancels the call)."""
        task = asyncio.ensure_future(call)
        refused: list[Exception] = []
        self._calls[task] = (patterns, refused)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if refused and not (current and current.cancelling()):  # not our caller's cancel
                raise refused[0] from None
            raise
        finally:
            del self._calls[task]
