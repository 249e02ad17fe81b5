"""The one bus adapter every service uses: JetStream consumers, core request/reply, objects.

It owns decoding, acks, retries and dead-lettering so handlers stay plain typed functions:
a handler gets a decoded payload (and a `Delivery`), and its message is acked only after it
returns. An undecodable payload, or one whose handler keeps failing, lands in the `DLQ` stream
with its reason instead of crashing the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.object_store import ObjectStore
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared.messages import DeadLetter, decode, encode
from shared.subjects import (
    DEAD_LETTER_PREFIX,
    LORA_OBJECT_BUCKET,
    STREAMS,
    ConsumerSpec,
    StreamSpec,
    dead_letter_subject,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"  # how nats-py hands over a JetStream status line (e.g. 404, 408)
DESCRIPTION_HEADER = "Description"
# The NATS micro convention for a failed request, so non-Python requesters understand it too.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
DLQ_STREAM = next(s.name for s in STREAMS if s.subjects == [f"{DEAD_LETTER_PREFIX}.>"])
# A dead letter must itself fit under the server's max_payload (1 MiB by default).
_MAX_DEAD_LETTER_DATA = 256 * 1024


# --- errors -------------------------------------------------------------------------------------


class BusError(Exception):
    """Anything the bus could not do; catch this to handle every bus failure."""


class RequestTimeoutError(BusError, TimeoutError):
    """No reply, or the awaited state, within the timeout."""


class NoRespondersError(BusError):
    """Nobody listens on the request subject (answered at once by the server)."""


class RemoteError(BusError):
    """The responder received the request but failed; the message is its error."""

    def __init__(self, message: str, code: str = "500") -> None:
        super().__init__(message)
        self.code = code


class ObjectNotFoundError(BusError, FileNotFoundError):
    """No such key in the object store bucket."""


# --- subject → stream (pure) --------------------------------------------------------------------


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` is one token, a trailing `>` one or more."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pat):
        if tok == ">":
            return len(sub) > i
        if i >= len(sub) or (tok != "*" and tok != sub[i]):
            return False
    return len(pat) == len(sub)


@lru_cache(maxsize=1024)
def stream_for(subject: str) -> str | None:
    """Name of the stream in STREAMS that captures `subject`, or None (core NATS only)."""
    for spec in STREAMS:
        if any(subject_matches(p, subject) for p in spec.subjects):
            return spec.name
    return None


def backoff_delay(spec: ConsumerSpec, num_delivered: int) -> float:
    """Delay before redelivering after the `num_delivered`-th attempt failed."""
    if not spec.backoff_s:
        return 1.0
    return spec.backoff_s[min(num_delivered, len(spec.backoff_s)) - 1]


def _stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=spec.retention,
        max_age=spec.max_age_s,
        storage=StorageType.FILE,
    )


def _header_text(text: str, limit: int = 1024) -> str:
    # Header values cannot carry CR/LF.
    return " ".join(text.split())[:limit]


def _num_delivered(msg: Msg) -> int:
    """Delivery count of a JetStream message: read straight from its reply subject in the
    common layout `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`,
    which costs a tenth of the client's full metadata parse (per message, on the hot path)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4])
    return msg.metadata.num_delivered  # other layouts (domains): the client's parser


# --- handler side -------------------------------------------------------------------------------


class Delivery:
    """What a JetStream handler may know and do about the message it is handling."""

    def __init__(self, msg: Msg, ack_wait: float) -> None:
        self.num_delivered: int = _num_delivered(msg)
        self.subject: str = msg.subject
        self._msg = msg
        self._ack_wait = ack_wait

    @property
    def stream_seq(self) -> int:
        return self._msg.metadata.sequence.stream

    @property
    def msg_id(self) -> str | None:
        return (self._msg.headers or {}).get(MSG_ID_HEADER)

    async def progress(self) -> None:
        """Tell the server this message is still being worked on (resets its ack_wait)."""
        try:
            await self._msg.in_progress()
        except Exception as exc:  # the connection may be reconnecting; the next beat retries
            log.warning("in_progress for %s failed: %r", self.subject, exc)

    @contextlib.asynccontextmanager
    async def keep_alive(self, every: float = 10.0) -> AsyncIterator[None]:
        """Send in_progress() every `every` s (at most ack_wait/2) while the block runs."""
        period = max(0.05, min(every, self._ack_wait / 2))

        async def beat() -> None:
            while True:
                await asyncio.sleep(period)
                await self.progress()

        await self.progress()
        task = asyncio.create_task(beat(), name=f"keep-alive:{self.subject}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Service:
    """A running consumer, subscription or responder; `stop()` ends it."""

    def __init__(self, name: str, stop: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._stop = stop
        self._stopped = False
        self.on_stop: Callable[[Service], None] | None = None

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._stop()
        finally:
            if self.on_stop is not None:
                self.on_stop(self)

    def __repr__(self) -> str:
        return f"Service({self.name!r})"


class _Puller:
    """Pull requests for one durable, answered into a plain inbox subscription (batch mode).

    nats-py's fetch() spends two tasks and a uuid per message, as much as the whole handling
    of a collected point; here the subscription callback just appends to `ready`. One pull
    request is open at a time: first a no-wait one (what is there now, up to `batch`), and
    only when that finds nothing a lingering one that waits for new messages.
    """

    def __init__(self, nc: Client, stream: str, durable: str, batch: int) -> None:
        self.nc = nc
        self.batch = batch
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.ready: deque[Msg] = deque()  # delivered to us, not yet taken by fetch()
        self.arrived = asyncio.Event()
        self.open_until = 0.0  # loop time by which the open request has surely ended
        self.left = 0  # messages the open request may still deliver
        self.refused: str | None = None  # why the server refused the last request
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS_HEADER) if msg.headers else None
        if status is None:
            self.ready.append(msg)
            self.left -= 1
            if self.left <= 0:
                self.open_until = 0.0  # the request got all it asked for
        elif status == "100":
            return  # heartbeat or flow control: not asked for, nothing ends
        else:
            # 404 nothing there (no-wait), 408 expired; anything else (409 consumer deleted,
            # limits): refused. Either way the request is over.
            self.open_until = 0.0
            if status not in ("404", "408"):
                self.refused = f"{status} {msg.headers.get(DESCRIPTION_HEADER, '')}".strip()
        self.arrived.set()

    async def _request(self, *, wait: float | None) -> None:
        loop = asyncio.get_running_loop()
        if wait is None:
            # No expires: with it the server would ignore no_wait and linger.
            body: dict[str, object] = {"batch": self.batch, "no_wait": True}
            self.open_until = loop.time() + 5.0
        else:
            body = {"batch": self.batch, "expires": int(wait * 1e9)}
            self.open_until = loop.time() + wait + 1.0  # its 408 may be lost in a reconnect
        self.left = self.batch
        await self.nc.publish(self.api, json.dumps(body).encode(), reply=self.inbox)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        """Up to `batch` messages: what arrives at once, else the first ones within timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self.ready and loop.time() >= self.open_until:
            await self._request(wait=None)
        while len(self.ready) < batch:
            now = loop.time()
            is_open = now < self.open_until
            if self.refused is not None:
                reason, self.refused = self.refused, None
                raise BusError(f"pull request refused: {reason}")
            if self.ready and not is_open:
                break  # the request delivered all it will
            if not self.ready and not is_open:
                if now + 0.05 >= deadline:
                    raise TimeoutError
                await self._request(wait=deadline - now - 0.01)
            # Once something is here, wait only a moment for the rest of the burst.
            wait = 0.002 if self.ready else deadline - now
            if wait <= 0:
                raise TimeoutError
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), wait)
            except TimeoutError:
                if not self.ready:
                    raise
                break
        n = min(batch, len(self.ready))
        return [self.ready.popleft() for _ in range(n)]

    async def unsubscribe(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


class _PullConsumer:
    """Fetch loop of one durable, in stream order.

    Without `batch_handler`, one message per handler call. With it, every fetched message that
    decodes goes to one call and all are acked after it returns; if that call fails, its
    messages are handled again one at a time, so only the failing one is retried or
    dead-lettered. The handler must therefore be all-or-nothing (e.g. one transaction).
    """

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        sub: JetStreamContext.PullSubscription | _Puller,
        *,
        batch: int,
        grace: float,
        batch_handler: Callable[[list[tuple[T, Delivery]]], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.typ = typ
        self.handler = handler
        self.batch_handler = batch_handler
        self.sub = sub
        self.batch = batch
        self.grace = grace
        self.buffer: deque[Msg] = deque()  # fetched, not handled yet
        self.singles: deque[Msg] = deque()  # of a failed batch, to handle one at a time
        self.current: list[Msg] = []  # being handled now
        self.stopping = False
        self.task = asyncio.create_task(self._run(), name=f"consumer:{spec.durable}")
        self.holder: asyncio.Task[None] | None = None
        if batch > 1:
            self.holder = asyncio.create_task(self._hold(), name=f"hold:{spec.durable}")

    async def _run(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                # A short fetch keeps shutdown quick and leaves few orphaned pull requests.
                msgs = await self.sub.fetch(self.batch, timeout=2.0)
                failures = 0
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, reconnecting, server restarting
                if self.bus.nc.is_closed:
                    log.warning("%s: connection closed; consumer ends", self.spec.durable)
                    return
                failures += 1
                log.warning("%s: fetch failed (%r); retrying", self.spec.durable, exc)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            self.buffer.extend(msgs)
            while (self.singles or self.buffer) and not self.stopping:
                try:
                    if self.batch_handler is not None and not self.singles:
                        self.current = list(self.buffer)
                        self.buffer.clear()
                        await self._deliver_batch(self.current)
                    else:
                        msg = (self.singles or self.buffer).popleft()
                        self.current = [msg]
                        await self._deliver(msg)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one message never kills the loop
                    log.exception("%s: unexpected error handling a message", self.spec.durable)
                self.current = []

    async def _hold(self) -> None:
        # Fetched-but-waiting messages would time out behind a slow handler: keep them alive.
        while True:
            await asyncio.sleep(self.spec.ack_wait_s / 3)
            for msg in [*self.singles, *self.buffer, *self._undelivered()]:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def _undelivered(self) -> list[Msg]:
        # Messages the server delivered to a _Puller that no fetch() took yet.
        return list(self.sub.ready) if isinstance(self.sub, _Puller) else []

    async def _admit(self, msg: Msg) -> tuple[T, Delivery] | None:
        """The decoded message, or None once it is dead-lettered (undecodable, or too many
        deliveries without an outcome)."""
        spec = self.spec
        delivery = Delivery(msg, spec.ack_wait_s)
        tries = delivery.num_delivered
        try:
            event = decode(msg.data, self.typ)
        except msgspec.DecodeError as exc:  # ValidationError too: a retry cannot help
            log.warning("%s: undecodable %s: %s", spec.durable, msg.subject, exc)
            await self._dead_letter(msg, f"decode: {exc}", tries)
            return None
        if tries > spec.max_deliver:
            # Delivered again without an outcome: earlier consumers died or overran ack_wait.
            await self._dead_letter(
                msg,
                f"no outcome after {tries - 1} deliveries (consumer died or ack_wait ran out)",
                tries,
            )
            return None
        return event, delivery

    async def _deliver(self, msg: Msg) -> None:
        admitted = await self._admit(msg)
        if admitted is None:
            return
        event, delivery = admitted
        try:
            await self.handler(event, delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(msg, delivery.num_delivered, exc)
            return
        await msg.ack()

    async def _deliver_batch(self, msgs: list[Msg]) -> None:
        ready: list[tuple[Msg, tuple[T, Delivery]]] = []
        for msg in msgs:
            admitted = await self._admit(msg)
            if admitted is not None:
                ready.append((msg, admitted))
        if not ready:
            return
        assert self.batch_handler is not None
        try:
            await self.batch_handler([admitted for _, admitted in ready])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(ready) == 1:
                msg, (_, delivery) = ready[0]
                await self._failed(msg, delivery.num_delivered, exc)
            else:
                log.warning(
                    "%s: batch of %d failed (%r); handling its messages one at a time",
                    self.spec.durable, len(ready), exc,
                )  # fmt: skip
                self.singles.extend(msg for msg, _ in ready)
            return
        # An ack is a plain publish: they leave together on the client's next flush.
        for msg, _ in ready:
            await msg.ack()

    async def _failed(self, msg: Msg, tries: int, exc: Exception) -> None:
        spec = self.spec
        if tries >= spec.max_deliver:
            log.error(
                "%s: giving up on %s after %d tries: %r", spec.durable, msg.subject, tries, exc
            )
            await self._dead_letter(msg, repr(exc), tries)
        else:
            delay = backoff_delay(spec, tries)
            log.warning(
                "%s: try %d of %s failed, retry in %.1fs: %r",
                spec.durable, tries, msg.subject, delay, exc,
            )  # fmt: skip
            await msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, error: str, tries: int) -> None:
        try:
            await self.bus._publish_dead_letter(msg, error, self.spec.durable, tries)
        except Exception as exc:  # keep the message; try again after a pause
            log.error("%s: dead-lettering %s failed: %r", self.spec.durable, msg.subject, exc)
            await msg.nak(delay=backoff_delay(self.spec, 1))
            return
        await msg.term()

    async def stop(self) -> None:
        self.stopping = True
        if not self.current:
            self.task.cancel()  # idle in fetch: nothing to lose
        else:
            # Let the running handler finish for a moment, then interrupt it.
            await asyncio.wait({self.task}, timeout=self.grace)
            self.task.cancel()
        for task in (self.task, self.holder):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # Hand back what we hold (interrupted or not yet started) so it is redelivered now;
        # a nak of a message acked meanwhile is refused by the client and changes nothing.
        held = [*self.current, *self.singles, *self.buffer, *self._undelivered()]
        self.current, self.singles, self.buffer = [], deque(), deque()
        for msg in held:
            with contextlib.suppress(Exception):
                await msg.nak()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()


# --- the bus ------------------------------------------------------------------------------------


class Bus:
    """A NATS connection with the project's streams, consumers and conventions."""

    def __init__(self, nc: Client, url: str) -> None:
        self.url = url
        self._nc = nc
        self._js = nc.jetstream()
        self._services: list[Service] = []
        self._objects: ObjectStore | None = None

    @property
    def nc(self) -> Client:
        """The underlying nats-py client (benchmarks, tests, advanced use)."""
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self._js

    @classmethod
    async def connect(
        cls, url: str, *, name: str = "mindx", connect_timeout: float = 5.0, attempts: int = 5
    ) -> Bus:
        """Connect (trying `attempts` times), then create or update every stream in STREAMS."""
        nc: Client | None = None

        async def on_error(exc: Exception) -> None:
            log.warning("nats %s: %r", name, exc)

        async def on_disconnected() -> None:
            if nc is not None and not (nc.is_closed or nc.is_draining):  # not our close()
                log.warning("nats %s: disconnected from %s", name, url)

        async def on_reconnected() -> None:
            log.info("nats %s: reconnected to %s", name, url)

        try:
            nc = await nats.connect(
                url,
                name=name,
                connect_timeout=connect_timeout,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=attempts,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        except Exception as exc:
            raise BusError(f"cannot connect to NATS at {url}: {exc!r}") from exc
        # Once up, a service rides out server restarts of any length.
        nc.options["max_reconnect_attempts"] = -1
        bus = cls(nc, url)
        try:
            await bus.ensure_streams()
        except BaseException:
            await nc.close()
            raise
        return bus

    async def ensure_streams(self) -> None:
        """Create missing streams and update changed ones (idempotent; file storage)."""
        for spec in STREAMS:
            config = _stream_config(spec)
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Exists with another config (e.g. an older max_age): update in place.
                try:
                    await self._js.update_stream(config)
                except nats.js.errors.APIError as exc:
                    raise BusError(
                        f"stream {spec.name} exists with incompatible config: {exc}"
                    ) from exc

    async def close(self) -> None:
        """Stop every service (handing back unfinished messages), then drain the connection."""
        for service in list(self._services):
            with contextlib.suppress(Exception):
                await service.stop()
        if self._nc.is_closed:
            return
        try:
            await self._nc.drain()
        except Exception as exc:
            log.debug("drain failed (%r); closing", exc)
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _track(self, service: Service) -> Service:
        self._services.append(service)
        service.on_stop = lambda s: self._services.remove(s) if s in self._services else None
        return service

    # --- publishing ---------------------------------------------------------------------------

    async def publish(
        self, subject: str, payload: msgspec.Struct, *, msg_id: str | None = None
    ) -> None:
        """JetStream publish (stored, acked) when a stream captures `subject`, else core publish."""
        await self.publish_raw(subject, encode(payload), msg_id=msg_id)

    async def publish_raw(self, subject: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish bytes as they are (e.g. JSON from other producers); same routing as publish."""
        stream = stream_for(subject)
        if stream is None:
            await self._nc.publish(subject, data)
            return
        # Without a caller id a fresh one still makes our own retries exactly-once.
        headers = {MSG_ID_HEADER: msg_id or uuid.uuid4().hex}
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(
                    (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError)
                ),
                stop=stop_after_attempt(4),
                wait=wait_exponential(multiplier=0.25, max=2.0),
                reraise=True,
            ):
                with attempt:
                    await self._js.publish(subject, data, stream=stream, headers=headers)
        except Exception as exc:
            raise BusError(f"publish to {subject} (stream {stream}) failed: {exc!r}") from exc

    async def _publish_dead_letter(self, msg: Msg, error: str, consumer: str, tries: int) -> None:
        text = msg.data.decode("utf-8", errors="replace")
        if len(text) > _MAX_DEAD_LETTER_DATA:
            text = text[:_MAX_DEAD_LETTER_DATA] + f"…[truncated, {len(msg.data)} bytes]"
        letter = DeadLetter(
            subject=msg.subject, error=error, data=text, consumer=consumer, deliveries=tries
        )
        meta = msg.metadata
        # Same id on a repeat (e.g. our term() was lost): the stream keeps one copy.
        msg_id = f"{meta.stream}:{meta.sequence.stream}:{consumer}"
        await self.publish_raw(dead_letter_subject(msg.subject), encode(letter), msg_id=msg_id)
        log.warning("dead letter from %s on %s: %s", consumer, msg.subject, error)

    # --- JetStream consumers ------------------------------------------------------------------

    async def serve(
        self,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        *,
        batch: int = 1,
        grace: float = 5.0,
    ) -> Service:
        """Run `handler` for each message of the durable pull consumer `spec`, one at a time.

        Ack after the handler returns; an exception naks with the spec's backoff, and at
        spec.max_deliver dead-letters; an undecodable payload is dead-lettered at once.
        `batch` > 1 fetches several messages per request (throughput for quick handlers).
        On stop, a running handler gets `grace` seconds before it is cancelled.
        """
        sub = await self._bind(spec)
        consumer = _PullConsumer(self, spec, typ, handler, sub, batch=batch, grace=grace)
        return self._track(Service(f"consumer:{spec.durable}", consumer.stop))

    async def serve_batch(
        self,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[list[tuple[T, Delivery]]], Awaitable[None]],
        *,
        batch: int = 64,
        grace: float = 5.0,
    ) -> Service:
        """Like `serve`, but `handler` gets every decodable message of a fetch (up to `batch`,
        in stream order) in one call, and they are all acked after it returns.

        Undecodable messages are dead-lettered one by one before the call. If the call raises,
        its messages are handled again one per call (a one-item list), each acked, retried or
        dead-lettered on its own, so one poison message cannot hold back the rest. The handler
        must be all-or-nothing and idempotent (a failed batch is seen again item by item), and
        should finish within ack_wait (or use each Delivery's keep_alive).
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        await self._ensure_consumer(spec)
        sub = _Puller(self._nc, spec.stream, spec.durable, batch)
        await sub.start()

        async def one(event: T, delivery: Delivery) -> None:  # a message of a failed batch
            await handler([(event, delivery)])

        consumer = _PullConsumer(
            self, spec, typ, one, sub, batch=batch, grace=grace, batch_handler=handler
        )
        return self._track(Service(f"consumer:{spec.durable}", consumer.stop))

    async def _bind(self, spec: ConsumerSpec) -> JetStreamContext.PullSubscription:
        """Create or update the durable of `spec` and bind a pull subscription to it."""
        await self._ensure_consumer(spec)
        try:
            return await self._js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        except nats.js.errors.Error as exc:
            raise BusError(f"cannot bind to consumer {spec.durable}: {exc}") from exc

    async def _ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create or update the durable pull consumer of `spec`."""
        config = ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            filter_subject=spec.subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            # Unlimited on the server: we count deliveries ourselves, so a message whose
            # consumer keeps dying is dead-lettered instead of silently dropped.
            max_deliver=-1,
        )
        try:
            await self._js.add_consumer(spec.stream, config)  # create or update
        except nats.js.errors.Error as exc:
            raise BusError(
                f"cannot create consumer {spec.durable} on {spec.stream}: {exc}"
            ) from exc

    async def wait_idle(self, spec: ConsumerSpec, *, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the consumer has nothing pending and nothing awaiting ack."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        state = "consumer not created"
        while True:
            try:
                info = await self._js.consumer_info(spec.stream, spec.durable)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return
                state = f"{info.num_pending} pending, {info.num_ack_pending} awaiting ack"
            except nats.js.errors.NotFoundError:
                pass
            if loop.time() >= deadline:
                raise RequestTimeoutError(f"{spec.durable} not idle after {timeout:g}s: {state}")
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.5)

    async def dead_letters(
        self, limit: int = 1000, *, subject: str | None = None
    ) -> list[DeadLetter]:
        """The newest `limit` dead letters (oldest first), optionally of one original subject."""
        info = await self._js.stream_info(DLQ_STREAM)
        state = info.state
        if state.messages == 0 or limit <= 0:
            return []
        name = f"dlq-read-{uuid.uuid4().hex[:12]}"
        config = ConsumerConfig(
            name=name,
            filter_subject=dead_letter_subject(subject) if subject else f"{DEAD_LETTER_PREFIX}.>",
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=30.0,  # the server removes it if we die before deleting it
        )
        if subject is None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = max(state.first_seq, state.last_seq - limit + 1)
        else:
            config.deliver_policy = DeliverPolicy.ALL
        created = await self._js.add_consumer(DLQ_STREAM, config)
        letters: deque[DeadLetter] = deque(maxlen=limit)
        try:
            left = created.num_pending or 0  # what matches now; later letters are not waited for
            sub = await self._js.pull_subscribe_bind(consumer=name, stream=DLQ_STREAM)
            while left > 0:
                try:
                    msgs = await sub.fetch(min(left, 256), timeout=5.0)
                except TimeoutError:
                    break  # messages removed meanwhile (max_age)
                for msg in msgs:
                    left -= 1
                    try:
                        letters.append(decode(msg.data, DeadLetter))
                    except msgspec.DecodeError as exc:
                        log.warning("skipping undecodable dead letter %s: %s", msg.subject, exc)
            await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(DLQ_STREAM, name)
        return list(letters)

    # --- core NATS ----------------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        typ: type[T],
        handler: Callable[[T], Awaitable[None]],
        *,
        queue: str | None = None,
    ) -> Service:
        """Core (not stored) subscription; undecodable messages and handler errors are logged."""

        async def on_msg(msg: Msg) -> None:
            try:
                event = decode(msg.data, typ)
            except msgspec.DecodeError as exc:
                log.warning("dropping undecodable %s: %s", msg.subject, exc)
                return
            try:
                await handler(event)
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        sub = await self._nc.subscribe(subject, queue=queue or "", cb=on_msg)
        return self._track(Service(f"subscribe:{subject}", sub.unsubscribe))

    async def reply(
        self,
        subject: str,
        typ: type[T],
        handler: Callable[[T], Awaitable[msgspec.Struct]],
        *,
        queue: str | None = None,
    ) -> Service:
        """Answer requests on `subject`; with `queue`, responders share the requests."""

        async def fail(msg: Msg, code: str, text: str) -> None:
            headers = {ERROR_HEADER: _header_text(text), ERROR_CODE_HEADER: code}
            await self._nc.publish(msg.reply, b"", headers=headers)

        async def on_msg(msg: Msg) -> None:
            if not msg.reply:
                log.warning("request on %s without a reply subject; ignored", msg.subject)
                return
            try:
                request = decode(msg.data, typ)
            except msgspec.DecodeError as exc:
                await fail(msg, "400", f"decode: {exc}")
                return
            try:
                answer = await handler(request)
            except Exception as exc:
                log.exception("responder for %s failed", msg.subject)
                await fail(msg, "500", repr(exc))
                return
            await msg.respond(encode(answer))

        sub = await self._nc.subscribe(subject, queue=queue or "", cb=on_msg)
        return self._track(Service(f"reply:{subject}", sub.unsubscribe))

    async def request(
        self,
        subject: str,
        payload: msgspec.Struct,
        reply_type: type[R],
        *,
        timeout: float,  # noqa: ASYNC109 - the bus API; passed on to nats-py
    ) -> R:
        """One request, one typed reply.

        Raises NoRespondersError, RequestTimeoutError or RemoteError (all BusError).
        """
        try:
            msg = await self._nc.request(subject, encode(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoRespondersError(f"no responders on {subject}") from None
        except TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject} within {timeout:g}s") from None
        headers = msg.headers or {}
        if ERROR_HEADER in headers:
            raise RemoteError(
                f"{subject}: {headers[ERROR_HEADER]}", headers.get(ERROR_CODE_HEADER, "500")
            )
        try:
            return decode(msg.data, reply_type)
        except msgspec.DecodeError as exc:
            raise BusError(f"undecodable reply on {subject}: {exc}") from exc

    # --- object store -------------------------------------------------------------------------

    async def _bucket(self) -> ObjectStore:
        if self._objects is None:
            try:
                self._objects = await self._js.object_store(LORA_OBJECT_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._objects = await self._js.create_object_store(
                    LORA_OBJECT_BUCKET, storage=StorageType.FILE
                )
        return self._objects

    async def put_object(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key` (streamed in chunks; replaces an older one)."""
        bucket = await self._bucket()
        with Path(path).open("rb") as f:  # noqa: ASYNC230 - nats-py reads it in a thread
            await bucket.put(key, f)

    async def get_object(self, key: str, dest: Path) -> Path:
        """Write the object `key` to `dest` (atomically, digest checked); returns `dest`."""
        bucket = await self._bucket()
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    await bucket.get(key, writeinto=f)
                except nats.js.errors.NotFoundError:  # missing or deleted
                    raise ObjectNotFoundError(
                        f"no object {key!r} in bucket {LORA_OBJECT_BUCKET}"
                    ) from None
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest
