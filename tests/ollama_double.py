"""A strict fake Ollama server over real HTTP, for tests, benchmarks and demos.

It follows ../shared/reference/ollama-api.md where a client can notice: status codes and error
texts, NDJSON streaming (`stream` omitted means true), 405 for wrong methods, the structured
`/api/create` (the removed `modelfile` field gets 400), blobs by digest, baked `messages` and SYSTEM
prepended to every chat, metrics omitted when zero. What each endpoint answers, and the models
behind it, is tests.ollama_store; this module serves it over HTTP, with fault injection.

In tests:   with OllamaDouble() as d: ... d.url, d.faults, d.models, d.requests
Standalone: python -m tests.ollama_double --port 11435 --latency 0.2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from tests.ollama_store import (
    DEFAULT_CHAT_MODELS,
    DEFAULT_EMBED_MODELS,
    DIGEST,
    EMBED_DIM,
    THINKING_FAMILIES,
    HttpError,
    Model,
    OllamaStore,
    generic_reply,
    go_quote,
    hashed_embedding,
    normalize_name,
    parameters_text,
    similarity,
    tokens,
)

__all__ = [
    "BUSY",
    "DEFAULT_CHAT_MODELS",
    "DEFAULT_EMBED_MODELS",
    "EMBED_DIM",
    "THINKING_FAMILIES",
    "Call",
    "Fault",
    "Faults",
    "HttpError",
    "Model",
    "OllamaDouble",
    "generic_reply",
    "go_quote",
    "hashed_embedding",
    "main",
    "normalize_name",
    "parameters_text",
    "similarity",
    "tokens",
]

BUSY = "server busy, please try again.  maximum pending requests exceeded"


# --- faults -----------------------------------------------------------------------------------
@dataclass
class Fault:
    status: int | None = None  # answer this status with {"error": message}
    message: str = "injected failure"
    delay_s: float = 0.0  # sleep first (longer than the client's timeout = a timeout)
    drop: bool = False  # close the socket without any response
    stream_error: str | None = None  # 200, some output, then {"error": ...} (create/chat)
    stream_cut: bool = False  # 200, one line, then the stream ends cleanly (no success/done)

    @classmethod
    def error(cls, status: int = 500, message: str | None = None) -> Fault:
        return cls(status=status, message=message or (BUSY if status == 503 else "injected"))

    @classmethod
    def timeout(cls, delay_s: float) -> Fault:
        return cls(delay_s=delay_s)

    @classmethod
    def dropped(cls) -> Fault:
        return cls(drop=True)

    @classmethod
    def midstream(cls, message: str) -> Fault:
        return cls(stream_error=message)

    @classmethod
    def cut(cls) -> Fault:
        return cls(stream_cut=True)


class Faults:
    """Per-path queues: each request to `path` consumes the next fault, if any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}

    def add(self, path: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._queues.setdefault(path, deque()).extend([fault] * times)

    def take(self, path: str) -> Fault | None:
        with self._lock:
            q = self._queues.get(path)
            return q.popleft() if q else None

    def pending(self, path: str | None = None) -> int:
        with self._lock:
            if path is not None:
                return len(self._queues.get(path, ()))
            return sum(len(q) for q in self._queues.values())

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()


class Call(NamedTuple):
    method: str
    path: str
    body: Any  # decoded JSON, or None (no body, not JSON, or a blob upload)


# --- the server -------------------------------------------------------------------------------
class OllamaDouble(OllamaStore):
    """The fake server. Thread-safe; every handler runs in its own thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        chat_models: dict[str, str] | None = None,
        embed_models: Iterable[str] = DEFAULT_EMBED_MODELS,
        version: str = "0.13.0",
        latency_s: float = 0.0,
        recall_threshold: float = 0.25,
    ) -> None:
        super().__init__(
            chat_models=chat_models,
            embed_models=embed_models,
            version=version,
            recall_threshold=recall_threshold,
        )
        self.latency_s = latency_s
        self.faults = Faults()
        self.requests: list[Call] = []
        self._stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.double = self
        self._thread: threading.Thread | None = None

    def count(self, path: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for c in self.requests if c.path == path and method in (None, c.method))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # lifecycle
    def start(self) -> OllamaDouble:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.blob_dir, ignore_errors=True)

    def __enter__(self) -> OllamaDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)


# --- HTTP plumbing ----------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once
    allow_reuse_address = True
    double: OllamaDouble

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or disconnect are part of the tests


_ROUTES: dict[str, dict[str, str]] = {
    "/api/version": {"GET": "version_", "HEAD": "version_"},
    "/api/tags": {"GET": "tags", "HEAD": "tags"},
    "/api/show": {"POST": "show"},
    "/api/chat": {"POST": "chat"},
    "/api/embed": {"POST": "embed"},
    "/api/create": {"POST": "create"},
    "/api/pull": {"POST": "pull"},
    "/api/copy": {"POST": "copy"},
    "/api/delete": {"DELETE": "delete"},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the real server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # request/response helpers
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
        self.send_response(status)
        if body or status != 200:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _stream(self, items: Iterator[dict[str, Any]], fault: Fault | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        for item in items:
            if fault and fault.stream_cut and sent >= 1:
                break
            if fault and fault.stream_error and sent >= 1:
                item = {"error": fault.stream_error}
            self._chunk(json.dumps(item, ensure_ascii=False).encode() + b"\n")
            sent += 1
            if "error" in item:
                break
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        d = self.server.double
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        is_blob = path.startswith("/api/blobs/")
        body: Any = None
        bad_json: str | None = None
        if raw and not is_blob:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                bad_json = f"invalid character in JSON: {exc.msg}"
        with d.lock:
            d.requests.append(Call(method, path, body))
        if d.latency_s:
            d.sleep(d.latency_s)
        fault = d.faults.take(path)
        if fault is not None:
            if fault.delay_s:
                d.sleep(fault.delay_s)
            if fault.drop:
                return self._drop()
            if fault.status is not None:
                return self._send_error(fault.status, fault.message)
        try:
            if path in ("/", ""):
                if method not in ("GET", "HEAD"):
                    raise HttpError(405, "405 method not allowed")
                return self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
            if is_blob:
                return self._blob(method, path.removeprefix("/api/blobs/"), raw)
            route = _ROUTES.get(path)
            if route is None:
                return self._send(404, b"404 page not found", "text/plain")
            if method not in route:
                return self._send(405, b"405 method not allowed", "text/plain")
            if bad_json:
                raise HttpError(400, bad_json)
            result = getattr(d, route[method])(body)
            if fault and fault.stream_error and not isinstance(result, Iterator):
                if path in ("/api/chat", "/api/create", "/api/pull"):  # stream:false: real status
                    raise HttpError(500, fault.stream_error)
            if result is None:
                return self._send(200)
            if isinstance(result, Iterator):
                return self._stream(result, fault)
            return self._send(200, json.dumps(result, ensure_ascii=False).encode())
        except HttpError as exc:
            return self._send_error(exc.status, exc.message)

    def _blob(self, method: str, digest: str, raw: bytes) -> None:
        d = self.server.double
        if method not in ("HEAD", "POST"):
            return self._send(405, b"405 method not allowed", "text/plain")
        if not DIGEST.match(digest):
            raise HttpError(400, "invalid digest format")
        key = "sha256:" + digest[7:]
        if method == "HEAD":
            if key in d.blobs:
                return self._send(200)
            return self._send_error(404, f'blob "{digest}" not found')
        if key in d.blobs:
            return self._send(200)
        got = "sha256:" + hashlib.sha256(raw).hexdigest()
        if got != digest:  # compared as strings: upper-case hex or `sha256-` is a mismatch
            raise HttpError(400, f'digest mismatch, expected "{digest}", got "{got}"')
        path = d.blob_dir / ("sha256-" + got[7:])
        path.write_bytes(raw)
        with d.lock:
            d.blobs[got] = path
        return self._send(201)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the fake Ollama server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11435)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    p.add_argument("--version", default="0.13.0")
    args = p.parse_args(argv)
    double = OllamaDouble(
        host=args.host, port=args.port, latency_s=args.latency, version=args.version
    )
    double.start()
    print(f"fake ollama on {double.url} (latency {args.latency}s); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        double.stop()


if __name__ == "__main__":
    main()
