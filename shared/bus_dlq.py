"""The bus's dead letters: the `DLQ` stream read, counted, replayed and purged.

A mixin of `shared.bus.Bus`, which provides the JetStream context and the denial guard. A dead
letter is a `DeadLetter` published on `dlq.<original subject>` by the consumer that gave up on
the message (shared.bus_consumer); each one is addressed by its stream sequence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.bus_errors import BusError
from shared.messages import DeadLetter, decode
from shared.subjects import DEAD_LETTER_PREFIX, STREAMS, dead_letter_subject

log = logging.getLogger(__name__)

T = TypeVar("T")

DLQ_STREAM = next(s.name for s in STREAMS if s.subjects == [f"{DEAD_LETTER_PREFIX}.>"])


@dataclass(frozen=True)
class Letter:
    """A dead letter and where it is in the DLQ stream."""

    seq: int
    subject: str  # where it is filed: dlq.<original subject>
    letter: DeadLetter


class DeadLetters:
    _nc: Client
    _js: JetStreamContext

    async def _api(self, call: Awaitable[T], *subjects: str) -> T:
        raise NotImplementedError  # the Bus's: a denied call fails at once

    async def dead_letters(
        self, limit: int = 1000, *, subject: str | None = None
    ) -> list[DeadLetter]:
        """The newest `limit` dead letters (oldest first), optionally of one original subject
        (NATS wildcards work: `memory.>`)."""
        return [e.letter for e in await self.dead_letter_entries(limit, subject=subject)]

    async def dead_letter_entries(
        self, limit: int = 1000, *, subject: str | None = None
    ) -> list[Letter]:
        """Like `dead_letters`, each with its stream sequence (to delete it after a replay)."""
        try:
            info = await self._api(self._js.stream_info(DLQ_STREAM))
        except nats.js.errors.NotFoundError:
            return []  # not created yet: nothing was dead-lettered
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
        created = await self._api(self._js.add_consumer(DLQ_STREAM, config))
        letters: deque[Letter] = deque(maxlen=limit)
        try:
            left = created.num_pending or 0  # what matches now; later letters are not waited for
            sub = await self._js.pull_subscribe_bind(consumer=name, stream=DLQ_STREAM)
            while left > 0:
                try:
                    msgs = await self._api(sub.fetch(min(left, 256), timeout=5.0))
                except TimeoutError:
                    break  # messages removed meanwhile (max_age)
                for msg in msgs:
                    left -= 1
                    try:
                        letter = decode(msg.data, DeadLetter)
                    except msgspec.DecodeError as exc:
                        log.warning("skipping undecodable dead letter %s: %s", msg.subject, exc)
                        continue
                    letters.append(Letter(msg.metadata.sequence.stream, msg.subject, letter))
            await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(DLQ_STREAM, name)
        return list(letters)

    async def delete_dead_letter(self, seq: int) -> bool:
        """Remove one dead letter; False when it was gone already."""
        try:
            return bool(await self._api(self._js.delete_msg(DLQ_STREAM, seq)))
        except nats.js.errors.NotFoundError:
            return False
        except nats.js.errors.APIError as exc:
            if "no message found" in str(exc).lower():
                return False
            raise

    async def purge_dead_letters(self, subject: str | None = None) -> int:
        """Remove every dead letter (of one original subject, wildcards allowed); how many."""
        request = {"filter": dead_letter_subject(subject)} if subject else {}
        api = f"$JS.API.STREAM.PURGE.{DLQ_STREAM}"
        # nats-py's purge_stream drops the server's count; the API answers it
        msg = await self._api(self._nc.request(api, json.dumps(request).encode(), timeout=5.0))
        answer = json.loads(msg.data or b"{}")
        error = answer.get("error")
        if error:
            if error.get("code") == 404:  # no DLQ stream yet: nothing was dead-lettered
                return 0
            raise BusError(f"purging dead letters failed: {error.get('description', error)}")
        return int(answer.get("purged", 0))

    async def dead_letter_counts(self) -> dict[str, int]:
        """Original subject → how many of its messages are dead letters."""
        try:
            info = await self._api(
                self._js.stream_info(DLQ_STREAM, subjects_filter=f"{DEAD_LETTER_PREFIX}.>")
            )
        except nats.js.errors.NotFoundError:
            return {}
        prefix = f"{DEAD_LETTER_PREFIX}."
        return {s.removeprefix(prefix): n for s, n in sorted((info.state.subjects or {}).items())}
