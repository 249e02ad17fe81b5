"""Async client for a real Ollama server (the `ollama` Backend).

Follows ../shared/reference/ollama-api.md: the structured `/api/create` (never the removed
`modelfile` field), blobs uploaded by digest before create, every NDJSON line checked for `error`,
`DELETE /api/delete` with a JSON body. Transient failures (connect errors, timeouts, 5xx, 503 busy)
are retried with exponential backoff and jitter; 4xx never is.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import msgspec
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from shared.backend import (
    BackendError,
    BackendRejected,
    BackendUnavailable,
    ChatMessage,
    ChatResponse,
    CreateProgress,
    CreateRequest,
    ModelNotFound,
    ModelTag,
    ProgressCallback,
    ShowResponse,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

NAME = "ollama"  # the backend's name, also the prefix of its error messages

_CHUNK = 1 << 20  # blob upload/hash chunk


class _Version(msgspec.Struct):
    version: str


class _Tags(msgspec.Struct):
    models: list[ModelTag] = []


class _Embed(msgspec.Struct):
    embeddings: list[list[float]] = []


def error_for_status(path: str, status: int, message: str) -> BackendError:
    if status == 404:
        return ModelNotFound(path, message, status=status, backend=NAME)
    if 400 <= status < 500:
        return BackendRejected(path, message, status=status, backend=NAME)
    if status >= 500:
        return BackendUnavailable(path, message, status=status, backend=NAME)
    return BackendError(path, message, status=status, backend=NAME)


def _unavailable(path: str, message: str) -> BackendUnavailable:
    return BackendUnavailable(path, message, backend=NAME)


def _error(path: str, message: str, *, status: int | None = None) -> BackendError:
    return BackendError(path, message, status=status, backend=NAME)


def _server_message(body: bytes, fallback: str) -> str:
    """The `error` field of an error body; the raw text when it is not JSON; else the reason."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or fallback
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return body.decode("utf-8", "replace")[:500] or fallback


def sha256_file(path: Path) -> str:
    """`sha256:<lowercase hex>`, the only digest form the server accepts."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def _notify(cb: ProgressCallback | None, progress: CreateProgress) -> None:
    if cb is None:
        return
    result = cb(progress)
    if inspect.isawaitable(result):
        await result


class OllamaClient:
    """One connection pool to one server. Use as `async with OllamaClient(url) as c:`."""

    name = NAME

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        attempts: int = 4,
        batch_size: int = 64,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # Read timeout is generous: create (conversion, quantizing) and CPU chat are slow.
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
        )
        self.base_url = base_url
        self.attempts = max(1, attempts)
        self.batch_size = max(1, batch_size)
        self._backoff = (backoff_s, backoff_max_s)

    async def __aenter__(self) -> OllamaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- retry machinery --------------------------------------------------------------------
    def _retrying(self, retry_if: Callable[[BaseException], bool] | None = None) -> AsyncRetrying:
        """A fresh retry policy per call: only transient errors, never 4xx."""

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, BackendUnavailable) and (retry_if is None or retry_if(exc))

        initial, maximum = self._backoff
        return AsyncRetrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    async def _send(
        self, method: str, path: str, *, json: Any = None, content: Any = None, **kw: Any
    ) -> httpx.Response:
        """One HTTP exchange; transport failures and error statuses become BackendError."""
        if json is not None:
            content = msgspec.json.encode(json)
            kw.setdefault("headers", {})["Content-Type"] = "application/json"
        try:
            r = await self._http.request(method, path, content=content, **kw)
        except httpx.TimeoutException as exc:
            raise _unavailable(path, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _unavailable(path, f"{type(exc).__name__}: {exc}") from exc
        if r.is_error:
            raise error_for_status(path, r.status_code, _server_message(r.content, r.reason_phrase))
        return r

    async def _call(
        self, method: str, path: str, reply: type[T] | None = None, *, json: Any = None
    ) -> T | None:
        async for attempt in self._retrying():
            with attempt:
                r = await self._send(method, path, json=json)
                if reply is None:
                    return None
                try:
                    return msgspec.json.decode(r.content, type=reply)
                except msgspec.DecodeError as exc:
                    status = r.status_code
                    raise _error(path, f"unexpected reply: {exc}", status=status) from exc
        raise AssertionError("unreachable")

    # --- Backend ----------------------------------------------------------------------------
    async def version(self) -> str:
        reply = await self._call("GET", "/api/version", _Version)
        assert reply is not None
        return reply.version

    async def tags(self) -> list[ModelTag]:
        reply = await self._call("GET", "/api/tags", _Tags)
        assert reply is not None
        return reply.models

    async def show(self, model: str) -> ShowResponse:
        reply = await self._call("POST", "/api/show", ShowResponse, json={"model": model})
        assert reply is not None
        return reply

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        *,
        options: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> ChatResponse:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False}
        if options:
            body["options"] = options
        if think is not None:  # omitted: the model's default (thinking models think)
            body["think"] = think
        reply = await self._call("POST", "/api/chat", ChatResponse, json=body)
        assert reply is not None
        return reply

    async def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start : start + self.batch_size]
            body = {"model": model, "input": batch}
            reply = await self._call("POST", "/api/embed", _Embed, json=body)
            assert reply is not None
            if len(reply.embeddings) != len(batch):
                raise _error(
                    "/api/embed", f"{len(reply.embeddings)} vectors for {len(batch)} inputs"
                )
            out.extend(reply.embeddings)
        return out

    async def create(
        self, request: CreateRequest, *, on_progress: ProgressCallback | None = None
    ) -> None:
        """Stream `/api/create`; returns only after a final `{"status":"success"}` line."""
        # `from_` goes out as "from"; no `modelfile` field
        await self._progress_stream("/api/create", msgspec.json.encode(request), on_progress)

    async def pull(self, model: str, *, on_progress: ProgressCallback | None = None) -> None:
        """Stream `/api/pull` (as `ollama pull` does); returns only after `{"status":"success"}`."""
        body = msgspec.json.encode({"model": model})
        await self._progress_stream("/api/pull", body, on_progress)

    async def _progress_stream(
        self, path: str, body: bytes, on_progress: ProgressCallback | None
    ) -> None:
        """POST `body` and follow its NDJSON progress lines until `success`."""
        lines_seen = 0

        # Retry only while no line has arrived. Once the server streams, it has begun the work
        # (pulling, converting, writing layers) and its failure is a verdict on this request;
        # re-sending would repeat minutes of work and replay progress to the caller.
        def before_output(_: BaseException) -> bool:
            return lines_seen == 0

        async for attempt in self._retrying(before_output):
            with attempt:
                last: CreateProgress | None = None
                async for line in self._stream_lines(path, body):
                    progress = self._progress_line(path, line, first=lines_seen == 0)
                    lines_seen += 1
                    last = progress
                    await _notify(on_progress, progress)
                if last is None or last.status != "success":
                    status = last.status if last else "no output"
                    raise _unavailable(path, f"stream ended without success (last: {status})")
                return

    @staticmethod
    def _progress_line(path: str, line: bytes, *, first: bool) -> CreateProgress:
        try:
            data = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise _error(path, f"unreadable progress line {line[:200]!r}") from exc
        if not isinstance(data, dict):
            raise _error(path, f"unexpected progress line {line[:200]!r}")
        if data.get("error"):
            message = str(data["error"])
            # Servers before v0.12.6 report early errors as HTTP 200 + {"error", "status": N}.
            status = data.get("status")
            if first and isinstance(status, int):
                raise error_for_status(path, status, message)
            raise _error(path, message)
        try:
            return msgspec.convert(data, CreateProgress)
        except msgspec.ValidationError as exc:
            raise _error(path, f"unexpected progress line {line[:200]!r}") from exc

    async def _stream_lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        try:
            async with self._http.stream(
                "POST", path, content=body, headers={"Content-Type": "application/json"}
            ) as r:
                if r.is_error:
                    raw = await r.aread()
                    raise error_for_status(
                        path, r.status_code, _server_message(raw, r.reason_phrase)
                    )
                async for text in r.aiter_lines():
                    if text.strip():
                        yield text.encode()
        except httpx.TimeoutException as exc:
            raise _unavailable(path, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _unavailable(path, f"{type(exc).__name__}: {exc}") from exc

    async def push_blob(self, path: Path) -> str:
        """Hash locally, HEAD the digest, POST the raw file only when the server lacks it."""
        # Hashing a multi-GB GGUF takes seconds: keep the event loop free.
        digest = await asyncio.to_thread(sha256_file, path)
        size = (await asyncio.to_thread(path.stat)).st_size
        url = f"/api/blobs/{digest}"

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                    yield chunk

        async for attempt in self._retrying():
            with attempt:
                try:
                    await self._send("HEAD", url)
                    return digest
                except ModelNotFound:
                    pass
                # Content-Length keeps the upload un-chunked, as the server expects.
                await self._send(
                    "POST", url, content=chunks(), headers={"Content-Length": str(size)}
                )
                return digest
        raise AssertionError("unreachable")

    async def copy(self, source: str, destination: str) -> None:
        await self._call("POST", "/api/copy", json={"source": source, "destination": destination})

    async def delete(self, model: str) -> None:
        path = "/api/delete"
        failed_before = False
        async for attempt in self._retrying():
            with attempt:
                try:
                    # httpx.delete() cannot carry a body; the server needs DELETE + JSON.
                    await self._send("DELETE", path, json={"model": model})
                    return
                except ModelNotFound:
                    # An earlier attempt that timed out may have deleted it already.
                    if failed_before:
                        return
                    raise
                except BackendUnavailable:
                    failed_before = True
                    raise
        raise AssertionError("unreachable")
