"""Pull-consumer internals of the bus: what `Bus.serve` and `Bus.serve_batch` run.

A `PullConsumer` fetches from one durable in stream order, decodes each message, runs the
handler and acks after it returns; failures are naked with the spec's backoff and, after
spec.max_deliver tries (or at once when undecodable), published as a `DeadLetter` through the
publish function the bus hands in. `Delivery` is what a handler sees of its message, and
`Service` the handle of anything running on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shared.messages import DeadLetter, decode, encode
from shared.subjects import ConsumerSpec, dead_letter_subject

log = logging.getLogger(__name__)

T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"  # how nats-py hands over a JetStream status line (e.g. 404, 408)
DESCRIPTION_HEADER = "Description"
# A dead letter must itself fit under the server's max_payload (1 MiB by default).
_MAX_DEAD_LETTER_DATA = 256 * 1024


class Rejected(Exception):
    """A handler refuses its message for good (forged, forbidden, unverifiable): it is
    dead-lettered at once with this reason and never retried; a responder answers with it."""


class RawPublish(Protocol):
    """How a consumer publishes its dead letters (`Bus.publish_raw`)."""

    def __call__(
        self, subject: str, data: bytes, *, msg_id: str | None = None
    ) -> Awaitable[None]: ...


def backoff_delay(spec: ConsumerSpec, num_delivered: int) -> float:
    """Delay before redelivering after the `num_delivered`-th attempt failed."""
    if not spec.backoff_s:
        return 1.0
    return spec.backoff_s[min(num_delivered, len(spec.backoff_s)) - 1]


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


class Puller:
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
        # Why the server refused the last request, raised by the next fetch() as nats-py's own
        # fetch() would raise it, so both kinds of pull subscription fail alike.
        self.refused: nats.js.errors.APIError | None = None
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
                self.refused = nats.js.errors.APIError(
                    code=int(status) if status.isdigit() else None,
                    description=msg.headers.get(DESCRIPTION_HEADER, ""),
                )
        self.arrived.set()

    async def _request(self, *, wait: float | None, batch: int) -> None:
        loop = asyncio.get_running_loop()
        batch = max(1, min(batch, self.batch))
        if wait is None:
            # No expires: with it the server would ignore no_wait and linger.
            body: dict[str, object] = {"batch": batch, "no_wait": True}
            self.open_until = loop.time() + 5.0
        else:
            body = {"batch": batch, "expires": int(wait * 1e9)}
            self.open_until = loop.time() + wait + 1.0  # its 408 may be lost in a reconnect
        self.left = batch
        await self.nc.publish(self.api, json.dumps(body).encode(), reply=self.inbox)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        """Up to `batch` messages: what arrives at once, else the first ones within timeout.
        A new pull request asks the server for `batch` (at most the Puller's), no more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self.ready and loop.time() >= self.open_until:
            await self._request(wait=None, batch=batch)
        while len(self.ready) < batch:
            now = loop.time()
            is_open = now < self.open_until
            if self.refused is not None:
                refused, self.refused = self.refused, None
                raise refused
            if self.ready and not is_open:
                break  # the request delivered all it will
            if not self.ready and not is_open:
                if now + 0.05 >= deadline:
                    raise TimeoutError
                await self._request(wait=deadline - now - 0.01, batch=batch)
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


class PullConsumer(Generic[T]):
    """Fetch loop of one durable, in stream order.

    Without `batch_handler`, one message per handler call. With it, every fetched message that
    decodes goes to one call and all are acked after it returns; if that call fails, its
    messages are handled again one at a time, so only the failing one is retried or
    dead-lettered. The handler must therefore be all-or-nothing (e.g. one transaction).
    """

    def __init__(
        self,
        nc: Client,
        publish: RawPublish,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        sub: JetStreamContext.PullSubscription | Puller,
        *,
        batch: int,
        grace: float,
        batch_handler: Callable[[list[tuple[T, Delivery]]], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self.publish = publish
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
        self.failures = 0  # fetches failed in a row: the backoff grows with them
        self.task = asyncio.create_task(self._run(), name=f"consumer:{spec.durable}")
        self.holder: asyncio.Task[None] | None = None
        if batch > 1:
            self.holder = asyncio.create_task(self._hold(), name=f"hold:{spec.durable}")

    async def _fetch(self, n: int) -> list[Msg] | None:
        """Up to `n` messages: [] when none came in time or the fetch failed (then after a
        backoff), None once the connection is closed (the consumer ends)."""
        try:
            # A short fetch keeps shutdown quick and leaves few orphaned pull requests.
            msgs = await self.sub.fetch(n, timeout=2.0)
        except TimeoutError:
            return []
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected, reconnecting, server restarting
            if self.nc.is_closed:
                log.warning("%s: connection closed; consumer ends", self.spec.durable)
                return None
            self.failures += 1
            log.warning("%s: fetch failed (%r); retrying", self.spec.durable, exc)
            await asyncio.sleep(min(0.2 * 2**self.failures, 5.0))
            return []
        self.failures = 0
        return msgs

    async def _run(self) -> None:
        while not self.stopping:
            msgs = await self._fetch(self.batch)
            if msgs is None:
                return
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
        # Messages the server delivered to a Puller that no fetch() took yet.
        return list(self.sub.ready) if isinstance(self.sub, Puller) else []

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
        if isinstance(exc, Rejected):
            await self._dead_letter(msg, f"rejected: {exc}", tries)
        elif tries >= spec.max_deliver:
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
            await self._publish_dead_letter(msg, error, tries)
        except Exception as exc:  # keep the message; try again after a pause
            log.error("%s: dead-lettering %s failed: %r", self.spec.durable, msg.subject, exc)
            await msg.nak(delay=backoff_delay(self.spec, 1))
            return
        await msg.term()

    async def _publish_dead_letter(self, msg: Msg, error: str, tries: int) -> None:
        text = msg.data.decode("utf-8", errors="replace")
        if len(text) > _MAX_DEAD_LETTER_DATA:
            text = text[:_MAX_DEAD_LETTER_DATA] + f"…[truncated, {len(msg.data)} bytes]"
        consumer = self.spec.durable
        letter = DeadLetter(
            subject=msg.subject, error=error, data=text, consumer=consumer, deliveries=tries
        )
        meta = msg.metadata
        # Same id on a repeat (e.g. our term() was lost): the stream keeps one copy.
        msg_id = f"{meta.stream}:{meta.sequence.stream}:{consumer}"
        await self.publish(dead_letter_subject(msg.subject), encode(letter), msg_id=msg_id)
        log.warning("dead letter from %s on %s: %s", consumer, msg.subject, error)

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


class ConcurrentConsumer(PullConsumer[T]):
    """Up to `limit` handler calls at once, one per message, each acked when its call returns.

    It pulls only as many messages as it has free calls, so whatever it cannot start yet stays
    on the server for the other consumers of the durable; the messages it is handling get
    in_progress beats, so only a consumer that died hands them back (after ack_wait).
    """

    def __init__(
        self,
        nc: Client,
        publish: RawPublish,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        sub: Puller,
        *,
        limit: int,
        grace: float,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.running: dict[asyncio.Task[None], Msg] = {}
        self.freed = asyncio.Event()
        super().__init__(nc, publish, spec, typ, handler, sub, batch=1, grace=grace)
        self.holder = asyncio.create_task(self._beat(), name=f"beat:{spec.durable}")

    async def _run(self) -> None:
        while not self.stopping:
            room = self.limit - len(self.running)
            if room <= 0:
                self.freed.clear()
                await self.freed.wait()
                continue
            msgs = await self._fetch(room)
            if msgs is None:
                return
            for msg in msgs:
                task = asyncio.create_task(self._one(msg), name=f"handle:{msg.subject}")
                self.running[task] = msg
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self.freed.set()

    async def _one(self, msg: Msg) -> None:
        try:
            await self._deliver(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # one message never kills the consumer
            log.exception("%s: unexpected error handling a message", self.spec.durable)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.spec.ack_wait_s / 3)
            for msg in list(self.running.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def stop(self) -> None:
        self.stopping = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        if self.running:  # let the calls under way finish for a moment, then interrupt them
            await asyncio.wait(set(self.running), timeout=self.grace)
        held = list(self.running.items())
        for task, _ in held:
            task.cancel()
        for task, _ in held:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.holder is not None:
            self.holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.holder
        # Hand back what was interrupted or delivered but not started, for another consumer now.
        for msg in [*(msg for _, msg in held), *self._undelivered()]:
            with contextlib.suppress(Exception):
                await msg.nak()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
