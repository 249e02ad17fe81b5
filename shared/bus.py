"""The one bus adapter every service uses: JetStream consumers, core request/reply, objects.

It owns decoding, acks, retries and dead-lettering so handlers stay plain typed functions:
a handler gets a decoded payload (and a `Delivery`), and its message is acked only after it
returns. An undecodable payload, or one whose handler keeps failing, lands in the `DLQ` stream
with its reason instead of crashing the consumer. `publish_and_wait` publishes and returns the
first expected answer (e.g. `model.updated` for a `model.validated`), subscribing first so a
quick answer is never missed.

The fetch loop behind `serve` and `serve_batch` lives in shared.bus_consumer; its public names
are re-exported here, so `from shared.bus import ...` is the only import a service needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    Header,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.bus_consumer import (
    MSG_ID_HEADER,
    Delivery,
    PullConsumer,
    Puller,
    Rejected,
    Service,
    backoff_delay,
)
from shared.bus_dlq import DLQ_STREAM, DeadLetters, Letter
from shared.bus_errors import (
    BusError,
    NoRespondersError,
    ObjectNotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RemoteError,
    RequestTimeoutError,
)
from shared.bus_storage import DECLARE_TRANSIENT, TRANSIENT, Storage
from shared.bus_work import QueueLoad, WorkQueues
from shared.messages import decode, encode
from shared.nats_client import (
    Connecting,
    Denials,
    NatsAuth,
    reconnect_options,
    redact_url,
    server_urls,
)
from shared.subjects import (
    STREAMS,
    ConsumerSpec,
    StreamSpec,
    stream_for,
    subject_matches,
)

__all__ = [
    "DLQ_STREAM",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "MSG_ID_HEADER",
    "Bus",
    "BusError",
    "Delivery",
    "Expect",
    "Letter",
    "NoRespondersError",
    "ObjectNotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QueueLoad",
    "Rejected",
    "RemoteError",
    "RequestTimeoutError",
    "Service",
    "backoff_delay",
    "stream_for",
    "subject_matches",
    "worker_name",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The NATS micro convention for a failed request, so non-Python requesters understand it too.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


def _stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=spec.retention,
        max_age=spec.max_age_s,
        storage=StorageType.FILE,
        num_replicas=spec.replicas,
    )


# JetStream's answer when a stream asks for replicas and the server is not in a cluster
NOT_CLUSTERED = 10074


def _header_text(text: str, limit: int = 1024) -> str:
    # Header values cannot carry CR/LF.
    return " ".join(text.split())[:limit]


def worker_name() -> str:
    """`host:pid` of this process: how a worker names itself in the answers it publishes."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Expect(Generic[T]):
    """One kind of answer a publish waits for: the first decoded payload on `subject` that
    `match` accepts."""

    subject: str
    type: type[T]
    match: Callable[[T], bool] = lambda _: True


# --- the bus ------------------------------------------------------------------------------------


class Bus(Storage, DeadLetters, WorkQueues):
    """A NATS connection with the project's streams, consumers and conventions."""

    def __init__(
        self,
        nc: Client,
        url: str,
        denials: Denials | None = None,
        *,
        streams: Sequence[StreamSpec] = STREAMS,
        replicas: int = 1,
    ) -> None:
        self.url = redact_url(url)  # printable: no password or token
        self.streams = tuple(streams)  # what ensure_streams declares
        self.replicas = replicas  # of the buckets this bus creates
        self._nc = nc
        self._js = nc.jetstream()
        self._services: list[Service] = []
        self._objects: ObjectStore | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._denials = denials or Denials(PermissionDeniedError)
        inbox = nc.new_inbox().rsplit(".", 1)[0]
        # what a JetStream call may be refused: the API, objects, records, or the replies to
        # our inbox
        self._api_subjects = ("$JS.>", "$O.>", "$KV.>", f"{inbox}.>")

    async def _api(self, call: Awaitable[T], *subjects: str) -> T:
        """Await a call that needs the JetStream API (and `subjects`); a denial fails it now."""
        return await self._denials.guard(call, *self._api_subjects, *subjects)

    @property
    def nc(self) -> Client:
        """The underlying nats-py client (benchmarks, tests, advanced use)."""
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self._js

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str = "mindx",
        connect_timeout: float = 5.0,
        attempts: int = 5,
        streams: Sequence[StreamSpec] = STREAMS,
        auth: NatsAuth | None = None,
        manage_streams: bool = True,
        replicas: int | None = None,
    ) -> Bus:
        """Connect (trying each server `attempts` times) as `auth`'s identity, then create or
        update every stream of `streams` (unless `manage_streams` is False: a client that only
        uses them). `url` may name several servers, comma-separated (a cluster's nodes): the
        connection moves to another one when its server goes. `replicas`: of the buckets this
        bus creates (default: the streams' own)."""
        nc: Client | None = None
        denials = Denials(PermissionDeniedError)
        shown = redact_url(url)

        connecting = Connecting()  # its errors are reported once, by the BusError

        async def on_error(exc: Exception) -> None:
            if nc is None:
                connecting.error(exc)
                log.debug("nats %s: %r", name, exc)
                return
            denied = denials.record(exc)
            if denied is None or not denied.awaited:  # else the refused call raises it
                log.warning("nats %s: %s", name, denied or repr(exc))

        async def on_disconnected() -> None:
            if nc is not None and not (nc.is_closed or nc.is_draining):  # not our close()
                log.warning("nats %s: disconnected from %s", name, shown)

        async def on_reconnected() -> None:
            log.info("nats %s: reconnected to %s", name, shown)

        try:
            options = auth.connect_kwargs() if auth is not None else {}
            servers = server_urls(url)
            nc = await connecting.run(
                nats.connect(
                    servers,
                    name=name,
                    connect_timeout=connect_timeout,
                    **reconnect_options(attempts),
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    **options,
                )
            )
        except Exception as exc:
            why = connecting.reason(exc)
            raise BusError(f"cannot connect to NATS at {shown}: {why}") from exc
        # Once up, a service rides out server restarts and node losses of any length.
        nc.options["max_reconnect_attempts"] = -1
        if replicas is None:
            replicas = max((s.replicas for s in streams), default=1)
        bus = cls(nc, url, denials, streams=streams, replicas=replicas)
        try:
            if manage_streams:
                await bus.ensure_streams()
        except BaseException:
            await nc.close()
            raise
        return bus

    async def ensure_streams(self, streams: Sequence[StreamSpec] | None = None) -> None:
        """Create missing streams and update changed ones (idempotent; file storage), e.g. a
        new max_age or replica count; then the buckets, with this bus's replica count.
        `streams`: default, the ones this bus was connected with.

        A user not permitted to manage streams uses them as they are (someone else set them up).
        Replicas on a single server, or more than the cluster can place, fail with one line.
        """
        for spec in self.streams if streams is None else streams:
            config = _stream_config(spec)
            try:
                try:
                    await self._retry(
                        functools.partial(self._js.add_stream, config), on=DECLARE_TRANSIENT
                    )
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code == NOT_CLUSTERED:
                        raise self._not_clustered(spec.replicas) from exc
                    # Exists with another config (an older max_age, other replicas): update.
                    await self._update_stream(spec.name, config)
                except nats.js.errors.APIError as exc:
                    if exc.err_code == NOT_CLUSTERED:
                        raise self._not_clustered(spec.replicas) from exc
                    raise BusError(f"cannot create stream {spec.name}: {exc.description}") from exc
            except PermissionDeniedError as exc:
                log.info("streams are not ours to manage (%s); using them as they are", exc)
                return
        await self.ensure_buckets()

    async def _update_stream(self, name: str, config: StreamConfig) -> None:
        try:
            old = await self._retry(
                functools.partial(self._js.stream_info, name), on=DECLARE_TRANSIENT
            )
            await self._retry(
                functools.partial(self._js.update_stream, config), on=DECLARE_TRANSIENT
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == NOT_CLUSTERED:
                raise self._not_clustered(config.num_replicas or 1) from exc
            raise BusError(
                f"stream {name} exists with a config it cannot be changed to "
                f"({exc.description}); change or delete the stream by hand (nats stream edit)"
            ) from exc
        was = old.config.num_replicas or 1
        if was != (config.num_replicas or 1):
            log.warning("stream %s: replicas %d -> %d", name, was, config.num_replicas)

    def _not_clustered(self, replicas: int) -> BusError:
        return BusError(
            f"--stream-replicas {replicas} needs a NATS cluster with JetStream, and {self.url} "
            "is a single server: use --stream-replicas 1, or list the cluster's nodes in --nats"
        )

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
            self._check_size(subject, data, None)
            await self._nc.publish(subject, data)
            return
        # Without a caller id a fresh one still makes our own retries exactly-once.
        headers = {MSG_ID_HEADER: msg_id or uuid.uuid4().hex}
        # js.publish adds the expected-stream header; it counts against max_payload too
        self._check_size(subject, data, {**headers, Header.EXPECTED_STREAM: stream})
        try:
            # The same message id on every try: the stream keeps one copy (exactly once).
            await self._retry(
                lambda: self._js.publish(subject, data, stream=stream, headers=headers), subject
            )
        except PermissionDeniedError:
            raise
        except Exception as exc:
            raise BusError(f"publish to {subject} (stream {stream}) failed: {exc!r}") from exc

    def _check_size(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Refuse what the server would: it counts the header block and the payload together."""
        size = len(data)
        if headers:
            size += 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        limit = self._nc.max_payload
        if size > limit:
            raise PayloadTooLargeError(
                f"{subject}: a message of {size} bytes is over the server's "
                f"max_payload of {limit} bytes"
            )

    async def publish_and_wait(
        self,
        subject: str,
        payload: msgspec.Struct,
        *,
        expect: Sequence[Expect[Any]],
        timeout: float | None,  # noqa: ASYNC109 - the wait starts only after the publish
        msg_id: str | None = None,
    ) -> Any:
        """Subscribe to every expected answer, then publish (so no answer can be missed), and
        return the first matching answer. Raises TimeoutError after `timeout` seconds (None: wait
        forever). The subscriptions are always removed.

        The timeout counts from the end of the publish; a timeout raises RequestTimeoutError
        (a TimeoutError and a BusError). An answer that does not decode as its Expect's type,
        or that its `match` rejects, is ignored.
        """
        if not expect:
            raise ValueError("publish_and_wait needs at least one Expect")
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def taker(want: Expect[Any]) -> Callable[[Any], Awaitable[None]]:
            async def take(event: Any) -> None:
                if not answer.done() and want.match(event):
                    answer.set_result(event)

            return take

        subs: list[Service] = []
        try:
            for want in expect:
                subs.append(await self.subscribe(want.subject, want.type, taker(want)))
            await self.publish(subject, payload, msg_id=msg_id)
            try:
                return await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                waited = ", ".join(want.subject for want in expect)
                raise RequestTimeoutError(
                    f"no answer on {waited} within {timeout:g}s of publishing to {subject}"
                ) from None
        finally:
            for sub in subs:
                try:
                    await sub.stop()
                except Exception as exc:  # connection closed: the server dropped them already
                    log.debug("removing the subscription %s failed: %r", sub.name, exc)

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
        consumer = PullConsumer(
            self._nc, self.publish_raw, spec, typ, handler, sub, batch=batch, grace=grace
        )
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
        sub = Puller(self._nc, spec.stream, spec.durable, batch)
        await sub.start()

        async def one(event: T, delivery: Delivery) -> None:  # a message of a failed batch
            await handler([(event, delivery)])

        consumer = PullConsumer(
            self._nc,
            self.publish_raw,
            spec,
            typ,
            one,
            sub,
            batch=batch,
            grace=grace,
            batch_handler=handler,
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
            deliver_policy=DeliverPolicy.NEW if spec.deliver_new else DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            max_ack_pending=spec.max_ack_pending,
            # Unlimited on the server: we count deliveries ourselves, so a message whose
            # consumer keeps dying is dead-lettered instead of silently dropped.
            max_deliver=-1,
        )
        try:
            await self._api(self._js.add_consumer(spec.stream, config))  # create or update
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
                info = await self._api(self._js.consumer_info(spec.stream, spec.durable))
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return
                state = f"{info.num_pending} pending, {info.num_ack_pending} awaiting ack"
            except nats.js.errors.NotFoundError:
                pass
            except TRANSIENT as exc:  # a leader election, a reconnect: ask again
                state = f"consumer info failed: {exc!r}"
            if loop.time() >= deadline:
                raise RequestTimeoutError(f"{spec.durable} not idle after {timeout:g}s: {state}")
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.5)

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

        sub = await self._denials.subscribe(self._nc, subject, queue, on_msg)
        return self._track(Service(f"subscribe:{subject}", sub.unsubscribe))

    async def reply(
        self,
        subject: str,
        typ: type[T],
        handler: Callable[[T], Awaitable[msgspec.Struct]],
        *,
        queue: str | None = None,
        grace: float = 5.0,
    ) -> Service:
        """Answer requests on `subject`; with `queue`, responders share the requests. On stop,
        the requests already taken get `grace` seconds to be answered."""

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
            except Rejected as exc:
                log.warning("refused a request on %s: %s", msg.subject, exc)
                await fail(msg, "403", f"refused: {exc}")
                return
            except Exception as exc:
                log.exception("responder for %s failed", msg.subject)
                await fail(msg, "500", repr(exc))
                return
            await msg.respond(encode(answer))

        sub = await self._denials.subscribe(self._nc, subject, queue, on_msg)

        async def stop() -> None:
            # Take no more requests, and answer those already taken for up to `grace` seconds
            # (their requesters would otherwise wait their whole timeout, then ask again).
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(sub.drain(), grace)

        return self._track(Service(f"reply:{subject}", stop))

    async def gather(
        self,
        subject: str,
        payload: msgspec.Struct,
        reply_type: type[R],
        *,
        wait: float,
    ) -> list[R]:
        """A request every responder answers (no queue group): the typed replies that arrive
        within `wait` seconds, undecodable ones skipped. A refused publish raises at once."""
        replies: list[R] = []

        async def on_msg(msg: Msg) -> None:
            if not msg.data:  # the server's "no responders" status: nobody is listening
                return
            try:
                replies.append(decode(msg.data, reply_type))
            except msgspec.DecodeError as exc:
                log.warning("skipping an undecodable reply on %s: %s", subject, exc)

        inbox = self._nc.new_inbox()
        sub = await self._denials.subscribe(self._nc, inbox, None, on_msg)
        try:
            await self._nc.publish(subject, encode(payload), reply=inbox)
            await self._denials.guard(asyncio.sleep(wait), subject)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return replies

    async def request(
        self,
        subject: str,
        payload: msgspec.Struct,
        reply_type: type[R],
        *,
        timeout: float,  # noqa: ASYNC109 - the bus API; passed on to nats-py
    ) -> R:
        """One request, one typed reply.

        Raises NoRespondersError, RequestTimeoutError, RemoteError or PermissionDeniedError
        (all BusError).
        """
        try:
            msg = await self._api(
                self._nc.request(subject, encode(payload), timeout=timeout), subject
            )
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
