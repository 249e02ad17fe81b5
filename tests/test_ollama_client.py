"""OllamaClient against the strict double over real HTTP (MockTransport for old servers)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import httpx
import pytest

from shared.backend import (
    Backend,
    BackendError,
    BackendRejected,
    BackendUnavailable,
    ChatMessage,
    CreateProgress,
    CreateRequest,
    ModelNotFound,
)
from shared.ollama import OllamaClient
from tests.ollama_double import Fault, OllamaDouble, hashed_embedding

BASE = "qwen3:0.6b"
HELLO = [ChatMessage(role="user", content="hello there")]


def client(d: OllamaDouble, **kw: object) -> OllamaClient:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return OllamaClient(d.url, **kw)  # type: ignore[arg-type]


def gguf(tmp_path: Path, name: str = "adapter.gguf", payload: bytes = b"x" * 1000) -> Path:
    p = tmp_path / name
    p.write_bytes(b"GGUF" + payload)
    return p


async def test_client_is_a_backend(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        assert isinstance(c, Backend)
        assert c.name == "ollama"
        assert await c.version() == ollama_double.version
        names = {t.name for t in await c.tags()}
        assert {"qwen3:0.6b", "qllama/bge-small-zh-v1.5:latest"} <= names


@pytest.mark.parametrize(
    "fault",
    [Fault.error(500), Fault.error(503), Fault.dropped(), Fault.timeout(1.5)],
    ids=["500", "503-busy", "dropped", "timeout"],
)
async def test_transient_failures_are_retried_then_succeed(
    ollama_double: OllamaDouble, fault: Fault
) -> None:
    ollama_double.faults.add("/api/chat", fault, times=2)
    async with client(ollama_double, timeout=0.5) as c:
        reply = await c.chat(BASE, HELLO, think=False)
    assert reply.message.content.startswith("I am not sure.")
    assert ollama_double.count("/api/chat") == 3


async def test_retries_stop_after_attempts_with_server_message(
    ollama_double: OllamaDouble,
) -> None:
    ollama_double.faults.add("/api/chat", Fault.error(503), times=10)
    async with client(ollama_double, attempts=3) as c:
        with pytest.raises(BackendUnavailable) as info:
            await c.chat(BASE, HELLO)
    assert info.value.status == 503
    assert "server busy" in info.value.message
    assert str(info.value).startswith("ollama /api/chat: 503 server busy")
    assert ollama_double.count("/api/chat") == 3


async def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OllamaClient(f"http://127.0.0.1:{port}", attempts=2, backoff_s=0.01) as c:
        with pytest.raises(BackendUnavailable) as info:
            await c.version()
    assert info.value.status is None


async def test_404_is_not_retried(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(ModelNotFound) as info:
            await c.chat("nope", HELLO)
    assert str(info.value) == "ollama /api/chat: 404 model 'nope' not found"
    assert ollama_double.count("/api/chat") == 1


async def test_400_is_not_retried(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(BackendRejected) as info:
            await c.chat("smollm2:135m", HELLO, think=True)  # no thinking capability
    assert info.value.status == 400
    assert not isinstance(info.value, ModelNotFound)
    assert "does not support thinking" in info.value.message
    assert ollama_double.count("/api/chat") == 1


async def test_chat_sends_stream_false_and_think_only_when_set(
    ollama_double: OllamaDouble,
) -> None:
    async with client(ollama_double) as c:
        default = await c.chat(BASE, HELLO, options={"temperature": 0.0, "num_predict": 3})
        await c.chat(BASE, HELLO, think=False)
    first, second = [r.body for r in ollama_double.requests if r.path == "/api/chat"]
    assert first["stream"] is False and "think" not in first
    assert first["options"] == {"temperature": 0.0, "num_predict": 3}
    assert second["think"] is False
    # thinking models think when `think` is omitted; content stays separate
    assert default.message.thinking and default.done_reason == "length"
    assert default.message.content == "I am not"  # num_predict=3 tokens


async def test_create_success_streams_progress_and_never_sends_modelfile(
    ollama_double: OllamaDouble,
) -> None:
    seen: list[CreateProgress] = []
    req = CreateRequest(
        model="me:v1",
        from_=BASE,
        system="Be brief.",
        parameters={"temperature": 0.2},
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="yo"),
        ],
    )
    async with client(ollama_double) as c:
        await c.create(req, on_progress=seen.append)
        shown = await c.show("me:v1")
    body = next(r.body for r in ollama_double.requests if r.path == "/api/create")
    assert "modelfile" not in body and body["from"] == BASE and "from_" not in body
    assert seen[-1].status == "success" and len(seen) > 2
    assert shown.system == "Be brief." and shown.details.parent_model == BASE


async def test_create_async_progress_callback(ollama_double: OllamaDouble) -> None:
    seen: list[str] = []

    async def report(p: CreateProgress) -> None:
        seen.append(p.status)

    async with client(ollama_double) as c:
        await c.create(CreateRequest(model="me:v2", from_=BASE), on_progress=report)
    assert seen[-1] == "success"


async def test_create_midstream_error_raises_server_message_without_retry(
    ollama_double: OllamaDouble,
) -> None:
    ollama_double.faults.add("/api/create", Fault.midstream("write manifest: disk full"))
    async with client(ollama_double) as c:
        with pytest.raises(BackendError) as info:
            await c.create(CreateRequest(model="me:v1", from_=BASE, system="x"))
    assert info.value.message == "write manifest: disk full"
    assert ollama_double.count("/api/create") == 1  # output had started: not re-sent
    assert ollama_double.find("me:v1") is None


async def test_create_from_unknown_base_fails_after_pulling_manifest(
    ollama_double: OllamaDouble,
) -> None:
    seen: list[str] = []
    async with client(ollama_double) as c:
        with pytest.raises(BackendError, match="pull model manifest: file does not exist"):
            await c.create(
                CreateRequest(model="me:v1", from_="missing:1b"),
                on_progress=lambda p: seen.append(p.status),
            )
    assert seen == ["pulling manifest"]
    assert ollama_double.count("/api/create") == 1


async def test_pull_reports_progress_and_installs_the_model() -> None:
    seen: list[CreateProgress] = []
    with OllamaDouble(embed_models=()) as d:
        async with client(d) as c:
            with pytest.raises(ModelNotFound):
                await c.show("qllama/bge-small-zh-v1.5")
            await c.pull("qllama/bge-small-zh-v1.5", on_progress=seen.append)
            assert (await c.show("qllama/bge-small-zh-v1.5")).capabilities == ["embedding"]
    assert seen[0].status == "pulling manifest" and seen[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in seen)


async def test_pull_of_an_unknown_name_raises_the_registry_answer_without_retry(
    ollama_double: OllamaDouble,
) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(BackendError, match="pull model manifest: file does not exist"):
            await c.pull("ghost:7b")
    assert ollama_double.count("/api/pull") == 1  # the stream had started: not re-sent


async def test_pull_retried_when_failing_before_output(ollama_double: OllamaDouble) -> None:
    ollama_double.faults.add("/api/pull", Fault.error(503))
    async with client(ollama_double) as c:
        await c.pull(BASE)
    assert ollama_double.count("/api/pull") == 2


async def test_create_stream_without_success_line_raises(ollama_double: OllamaDouble) -> None:
    ollama_double.faults.add("/api/create", Fault.cut())
    async with client(ollama_double) as c:
        with pytest.raises(BackendError, match="without success"):
            await c.create(CreateRequest(model="me:v1", from_=BASE))
    assert ollama_double.count("/api/create") == 1


async def test_create_retried_when_failing_before_output(ollama_double: OllamaDouble) -> None:
    ollama_double.faults.add("/api/create", Fault.error(500))
    ollama_double.faults.add("/api/create", Fault.dropped())
    async with client(ollama_double) as c:
        await c.create(CreateRequest(model="me:v1", from_=BASE))
    assert ollama_double.count("/api/create") == 3
    assert ollama_double.find("me:v1") is not None


async def test_create_rejection_is_not_retried(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(BackendRejected, match="neither 'from' or 'files' was specified"):
            await c.create(CreateRequest(model="me:v1", system="only a system"))
    assert ollama_double.count("/api/create") == 1


async def test_old_server_early_error_line_is_classified_by_status() -> None:
    """Before v0.12.6 an early error is HTTP 200 + {"error", "status"}; 503 there is transient."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(200, content=b'{"error":"server busy","status":503}\n')
        return httpx.Response(200, content=b'{"status":"reading model"}\n{"status":"success"}\n')

    transport = httpx.MockTransport(handler)
    async with OllamaClient("http://ollama", transport=transport, backoff_s=0.01) as c:
        await c.create(CreateRequest(model="m", from_=BASE))
    assert calls == 2


async def test_delete_is_http_delete_with_json_body(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        await c.copy(BASE, "me:copy")
        assert ollama_double.find("me:copy") is not None
        await c.delete("me:copy")
        with pytest.raises(ModelNotFound, match="model 'me:copy' not found"):
            await c.delete("me:copy")
    deletes = [r for r in ollama_double.requests if r.path == "/api/delete"]
    assert [(r.method, r.body) for r in deletes] == [("DELETE", {"model": "me:copy"})] * 2
    assert ollama_double.find("me:copy") is None


async def test_copy_unknown_source_is_not_found(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(ModelNotFound):
            await c.copy("ghost:1b", "me:copy")


async def test_push_blob_heads_then_posts_and_skips_when_present(
    ollama_double: OllamaDouble, tmp_path: Path
) -> None:
    path = gguf(tmp_path)
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    async with client(ollama_double) as c:
        assert await c.push_blob(path) == expected
        assert await c.push_blob(path) == expected
        await c.create(CreateRequest(model="me:lora", from_=BASE, adapters={"a.gguf": expected}))
    blob_calls = [(r.method, r.path) for r in ollama_double.requests if "/blobs/" in r.path]
    url = f"/api/blobs/{expected}"
    assert blob_calls == [("HEAD", url), ("POST", url), ("HEAD", url)]
    assert ollama_double.blobs[expected].read_bytes() == path.read_bytes()
    assert ollama_double.find("me:lora").adapters == {"a.gguf": expected}  # type: ignore[union-attr]


async def test_push_blob_retries_a_dropped_upload(
    ollama_double: OllamaDouble, tmp_path: Path
) -> None:
    path = gguf(tmp_path, payload=b"y" * (3 << 20))  # several upload chunks
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    url = f"/api/blobs/{digest}"
    ollama_double.faults.add(url, Fault())  # the HEAD passes
    ollama_double.faults.add(url, Fault.dropped())  # the upload is cut off
    async with client(ollama_double) as c:
        assert await c.push_blob(path) == digest
    calls = [r.method for r in ollama_double.requests if r.path == url]
    assert calls == ["HEAD", "POST", "HEAD", "POST"]
    assert ollama_double.blobs[digest].read_bytes() == path.read_bytes()


async def test_embed_batches_in_order(ollama_double: OllamaDouble) -> None:
    texts = [f"memory number {i}" for i in range(150)]
    async with client(ollama_double, batch_size=64) as c:
        vectors = await c.embed("qllama/bge-small-zh-v1.5", texts)
        assert await c.embed("qllama/bge-small-zh-v1.5", []) == []
    assert ollama_double.count("/api/embed") == 3
    sizes = [len(r.body["input"]) for r in ollama_double.requests if r.path == "/api/embed"]
    assert sizes == [64, 64, 22]
    assert vectors[149] == pytest.approx(hashed_embedding(texts[149]))
    assert vectors[0] == pytest.approx(hashed_embedding(texts[0]))


async def test_embed_unknown_model_is_not_found(ollama_double: OllamaDouble) -> None:
    async with client(ollama_double) as c:
        with pytest.raises(ModelNotFound, match="try pulling it first"):
            await c.embed("ghost-embedder", ["x"])
    assert ollama_double.count("/api/embed") == 1
