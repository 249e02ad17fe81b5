"""The bus's stores: the object store (a LoRA run's dataset and artifacts travel through it)
and key-value records (the trainer's run records that validators and the config updater check).

A mixin of `shared.bus.Bus`, which provides the JetStream context and the denial guard. It also
holds `_retry`: how a JetStream write or read rides out a cluster's leader election.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from shared.bus_errors import BusError, ObjectNotFoundError
from shared.files import ensure_private_dir
from shared.messages import decode, encode
from shared.subjects import BUCKETS, LORA_OBJECT_BUCKET, BucketSpec

T = TypeVar("T")
log = logging.getLogger(__name__)

# What a JetStream call meets while a cluster elects a new leader (a stream's, or the meta
# leader), or while the client moves to another server: no answer, the server's "no
# responders", JetStream unavailable (503). They pass within seconds; the call is made again.
TRANSIENT: tuple[type[Exception], ...] = (
    TimeoutError,  # nats.errors.TimeoutError too
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
)
# Declaring streams and buckets: the same, except "no responders" from the JetStream API itself,
# which means a server without JetStream (no election ends that).
DECLARE_TRANSIENT: tuple[type[Exception], ...] = tuple(
    e for e in TRANSIENT if e is not nats.errors.NoRespondersError
)
# An election takes a few seconds: retry for up to this long, then fail.
RETRY_FOR_S = 30.0


class Storage:
    _nc: Client
    _js: JetStreamContext
    _objects: ObjectStore | None
    _buckets: dict[str, KeyValue]
    replicas: int  # of the buckets this bus creates (the Bus's --stream-replicas)

    async def _api(self, call: Awaitable[T], *subjects: str) -> T:
        raise NotImplementedError  # the Bus's: a denied call fails at once

    async def _update_stream(self, name: str, config: StreamConfig) -> None:
        raise NotImplementedError  # the Bus's: a refused change says what to do

    async def ensure_buckets(self) -> None:
        """Create the key-value buckets and the object bucket when missing, and give existing
        ones this bus's replica count. On a cluster they must exist before a node is lost: a
        new replicated bucket cannot be placed while one is down."""
        for spec in BUCKETS:
            await self._kv(spec, create=True)
        await self._bucket()
        for stream in [f"KV_{spec.name}" for spec in BUCKETS] + [f"OBJ_{LORA_OBJECT_BUCKET}"]:
            info = await self._retry(
                functools.partial(self._js.stream_info, stream), on=DECLARE_TRANSIENT
            )
            if (info.config.num_replicas or 1) != self.replicas:
                config = dataclasses.replace(info.config, num_replicas=self.replicas)
                await self._update_stream(stream, config)

    async def _retry(
        self,
        make: Callable[[], Awaitable[T]],
        *subjects: str,
        on: tuple[type[Exception], ...] = TRANSIENT,
        retry_for: float = RETRY_FOR_S,
    ) -> T:
        """`make()`'s call through the denial guard, made again on an error of `on` (with
        backoff, for up to `retry_for` seconds; then the last error is raised). The call must
        be safe to repeat: a publish keeps its Nats-Msg-Id, so the stream keeps one copy.
        A connection being drained or closed (this process stopping) is not waited for."""

        def again(exc: BaseException) -> bool:
            return isinstance(exc, on) and not (self._nc.is_draining or self._nc.is_closed)

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(again),
            stop=stop_after_delay(retry_for),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            reraise=True,
            before_sleep=lambda state: log.info(
                "bus call failed (%r); trying again",
                state.outcome.exception() if state.outcome else None,
            ),
        ):
            with attempt:
                return await self._api(make(), *subjects)
        raise AssertionError("unreachable: tenacity reraises the last error")

    # --- object store -------------------------------------------------------------------------

    async def _bucket(self) -> ObjectStore:
        if self._objects is None:
            try:
                self._objects = await self._api(self._js.object_store(LORA_OBJECT_BUCKET))
            except nats.js.errors.BucketNotFoundError:
                self._objects = await self._api(
                    self._js.create_object_store(
                        LORA_OBJECT_BUCKET, storage=StorageType.FILE, replicas=self.replicas
                    )
                )
        return self._objects

    async def put_object(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key` (streamed in chunks; replaces an older one)."""
        bucket = await self._bucket()
        with Path(path).open("rb") as f:  # noqa: ASYNC230 - nats-py reads it in a thread
            await self._api(bucket.put(key, f))

    async def get_object(self, key: str, dest: Path) -> Path:
        """Write the object `key` to `dest` (atomically, digest checked); returns `dest`."""
        bucket = await self._bucket()
        dest = Path(dest)
        ensure_private_dir(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    await self._api(bucket.get(key, writeinto=f))
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

    async def erase_objects(self, prefix: str) -> list[str]:
        """Erase every object whose name starts with `prefix` (e.g. `<run_id>/`): its chunks and
        its metadata messages are erased from the bucket's stream (no delete marker is left
        that names it); returns the names erased."""
        stream, meta = f"OBJ_{LORA_OBJECT_BUCKET}", f"$O.{LORA_OBJECT_BUCKET}.M.>"
        found: dict[str, set[str]] = {}  # name -> nuids of its chunks

        def ours(_: str, data: bytes) -> bool:
            try:
                info = json.loads(data)
                name, nuid = str(info.get("name", "")), str(info.get("nuid") or "")
            except (ValueError, AttributeError):
                return False
            if not name.startswith(prefix):
                return False
            found.setdefault(name, set()).add(nuid)
            return True

        await self.erase_messages(stream, meta, ours)
        for nuid in {n for nuids in found.values() for n in nuids if n}:
            chunks = f"$O.{LORA_OBJECT_BUCKET}.C.{nuid}"
            await self.erase_messages(stream, chunks, lambda _s, _d: True)
        return sorted(found)

    # --- erasing messages -----------------------------------------------------------------------

    async def erase_message(self, stream: str, seq: int) -> bool:
        """Erase one message (its bytes overwritten in the store); False when it was gone."""
        try:
            return bool(await self._api(self._js.delete_msg(stream, seq)))
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.Error as exc:
            raise BusError(f"cannot erase message {seq} of {stream}: {exc!r}") from exc

    async def find_messages(
        self, stream: str, subject: str, match: Callable[[str, bytes], bool]
    ) -> list[tuple[int, bytes]]:
        """`(sequence, payload)` of every message of `stream` on `subject` (wildcards work) for
        which `match(subject, payload)` is true, in stream order ([] without the stream)."""
        found: list[tuple[int, bytes]] = []
        seq = 1
        try:
            while True:
                try:
                    msg = await self._api(self._js.get_msg(stream, seq, subject=subject, next=True))
                except nats.js.errors.NotFoundError:  # nothing after `seq`, or no stream
                    return found
                seq = (msg.seq or seq) + 1
                data = msg.data or b""
                if match(msg.subject or "", data):
                    found.append((msg.seq or 0, data))
        except nats.errors.Error as exc:
            raise BusError(f"cannot read {stream} on {subject}: {exc!r}") from exc

    async def erase_messages(
        self, stream: str, subject: str, match: Callable[[str, bytes], bool]
    ) -> list[bytes]:
        """Erase every message `find_messages` finds; returns their payloads.

        JetStream's message delete without `no_erase` overwrites the message where the server
        stores it, so its bytes are gone from the store, not only hidden.
        """
        found = await self.find_messages(stream, subject, match)
        for seq, _ in found:
            await self.erase_message(stream, seq)
        return [data for _, data in found]

    # --- key-value records --------------------------------------------------------------------

    async def _kv(self, spec: BucketSpec, *, create: bool) -> KeyValue | None:
        if spec.name not in self._buckets:
            try:
                self._buckets[spec.name] = await self._retry(lambda: self._js.key_value(spec.name))
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    return None
                config = KeyValueConfig(
                    spec.name, ttl=spec.max_age_s, storage=StorageType.FILE, replicas=self.replicas
                )
                self._buckets[spec.name] = await self._api(self._js.create_key_value(config))
        return self._buckets[spec.name]

    async def put_record(self, spec: BucketSpec, key: str, payload: msgspec.Struct) -> int:
        """Store `payload` under `key` (replacing the older value); returns its revision."""
        try:
            kv = await self._kv(spec, create=True)
            assert kv is not None  # created when missing
            data = encode(payload)
            return await self._retry(lambda: kv.put(key, data))
        except nats.errors.Error as exc:
            raise BusError(f"cannot store {key!r} in bucket {spec.name}: {exc!r}") from exc

    async def get_record(self, spec: BucketSpec, key: str, typ: type[T]) -> T | None:
        """The value under `key` as `typ`; None when there is none. BusError when unreadable."""
        try:
            kv = await self._kv(spec, create=False)
            entry = await self._retry(lambda: kv.get(key)) if kv is not None else None
            return decode(entry.value or b"", typ) if entry is not None else None
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError too
            return None
        except (nats.errors.Error, msgspec.DecodeError) as exc:
            raise BusError(f"cannot read {key!r} from bucket {spec.name}: {exc!r}") from exc

    async def list_records(self, spec: BucketSpec, typ: type[T]) -> dict[str, T]:
        """Every key of the bucket with its value as `typ`, oldest write first ({} without a
        bucket). Reads message by message (what reading one record may do, no consumer); a
        value that does not decode is left out with a warning, so one bad record hides no other.
        """
        stream, prefix = f"KV_{spec.name}", f"$KV.{spec.name}."
        out: dict[str, T] = {}
        try:
            if await self._kv(spec, create=False) is None:
                return out
            seq = 1
            while True:
                try:
                    msg = await self._retry(
                        functools.partial(
                            self._js.get_msg, stream, seq, subject=f"{prefix}>", next=True
                        )
                    )
                except nats.js.errors.NotFoundError:  # nothing after `seq`
                    return out
                key = (msg.subject or "")[len(prefix) :]
                seq = (msg.seq or seq) + 1
                out.pop(key, None)  # a rewritten key moves to the end
                if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                    continue
                try:
                    out[key] = decode(msg.data or b"", typ)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("bucket %s: record %r unreadable: %s", spec.name, key, exc)
        except nats.errors.Error as exc:
            raise BusError(f"cannot list bucket {spec.name}: {exc!r}") from exc
