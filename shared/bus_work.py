"""The bus's work queues: a durable shared by workers that each take only what they can start,
and what a producer may ask of it (is anyone pulling? drop what is left of a job).

A mixin of `shared.bus.Bus`, which provides the connection, the JetStream context, the denial
guard and the consumer setup.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.bus_consumer import ConcurrentConsumer, Delivery, Puller, RawPublish, Service
from shared.subjects import ConsumerSpec

T = TypeVar("T")


@dataclass(frozen=True)
class QueueLoad:
    """A work-queue durable as the server sees it."""

    waiting: int  # pull requests open now: workers with room
    in_flight: int  # messages handed out and not acked yet
    pending: int  # messages no worker has taken yet


class WorkQueues:
    _nc: Client
    _js: JetStreamContext
    publish_raw: RawPublish

    async def _api(self, call: Awaitable[T], *subjects: str) -> T:
        raise NotImplementedError  # the Bus's: a denied call fails at once

    async def _retry(self, make: Callable[[], Awaitable[T]], *subjects: str) -> T:
        raise NotImplementedError  # the Storage's: rides out a cluster's leader election

    async def _ensure_consumer(self, spec: ConsumerSpec) -> None:
        raise NotImplementedError  # the Bus's

    def _track(self, service: Service) -> Service:
        raise NotImplementedError  # the Bus's

    async def serve_concurrent(
        self,
        spec: ConsumerSpec,
        typ: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        *,
        limit: int,
        grace: float = 5.0,
    ) -> Service:
        """Like `serve`, but up to `limit` handler calls at once. It pulls a message only when
        a call is free to start it, so any number of workers share the durable by what each
        has room for; a running call's message is kept alive, and handed back on stop."""
        await self._ensure_consumer(spec)
        sub = Puller(self._nc, spec.stream, spec.durable, limit)
        await sub.start()
        consumer = ConcurrentConsumer(
            self._nc, self.publish_raw, spec, typ, handler, sub, limit=limit, grace=grace
        )
        return self._track(Service(f"consumer:{spec.durable}", consumer.stop))

    async def queue_load(self, spec: ConsumerSpec) -> QueueLoad | None:
        """The durable's load, or None when it does not exist (no worker ever started)."""
        try:
            info = await self._retry(
                functools.partial(self._js.consumer_info, spec.stream, spec.durable)
            )
        except nats.js.errors.NotFoundError:
            return None
        return QueueLoad(info.num_waiting or 0, info.num_ack_pending or 0, info.num_pending or 0)

    async def purge(self, stream: str, subject: str) -> None:
        """Drop the messages on `subject` that `stream` still holds."""
        await self._retry(functools.partial(self._js.purge_stream, stream, subject=subject))
