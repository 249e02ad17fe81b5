"""The double is strict where the real server is: raw HTTP, no client in between."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.backend import parse_parameters
from tests.ollama_double import Fault, OllamaDouble, hashed_embedding, similarity

BASE = "qwen3:0.6b"
EMBEDDER = "qllama/bge-small-zh-v1.5:latest"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def http(ollama_double: OllamaDouble) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ollama_double.url, timeout=10) as c:
        yield c


def ndjson(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def create(http: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    r = http.post("/api/create", json=body)
    assert r.status_code == 200, r.text
    lines = ndjson(r)
    assert lines[-1] == {"status": "success"}, lines
    return lines


def chat(http: httpx.Client, model: str, *messages: tuple[str, str]) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in messages],
        "stream": False,
        "think": False,
    }
    r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- create -----------------------------------------------------------------------------------
def test_removed_modelfile_field_is_rejected(http: httpx.Client) -> None:
    r = http.post("/api/create", json={"model": "me", "modelfile": f"FROM {BASE}\nSYSTEM hi"})
    assert r.status_code == 400
    assert r.json() == {"error": "neither 'from' or 'files' was specified"}


def test_create_from_unknown_model_errors_after_pulling_manifest(http: httpx.Client) -> None:
    r = http.post("/api/create", json={"model": "me", "from": "ghost:7b"})
    assert r.status_code == 200
    assert ndjson(r) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    r = http.post("/api/create", json={"model": "me", "from": "ghost:7b", "stream": False})
    assert r.status_code == 500
    assert http.post("/api/show", json={"model": "me"}).status_code == 404


def test_create_rejects_paths_and_missing_blobs(http: httpx.Client) -> None:
    bad = {"model": "me", "from": "/models/base.gguf"}
    assert http.post("/api/create", json=bad).json()["error"] == "invalid model name"
    missing = "sha256:" + "0" * 64
    r = http.post("/api/create", json={"model": "me", "files": {"m.gguf": missing}})
    assert r.status_code == 500
    r = http.post("/api/create", json={"model": "me", "files": {"../m.gguf": missing}})
    assert r.json() == {"error": "file path must be relative"}
    r = http.post("/api/create", json={"model": "me", "from": BASE, "adapters": {"a.gguf": ""}})
    assert r.json() == {"error": "invalid digest format"}


def test_create_checks_gguf_magic_of_adapters(http: httpx.Client) -> None:
    data = b"not a gguf file"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    r = http.post("/api/create", json={"model": "me", "from": BASE, "adapters": {"a.gguf": digest}})
    assert r.status_code == 400
    assert r.json() == {"error": "supplied file was not in GGUF format"}


def test_create_merges_parameters_and_keeps_inherited_values(
    http: httpx.Client, ollama_double: OllamaDouble
) -> None:
    create(
        http,
        model="me:v1",
        **{"from": BASE},
        system="Be kind.",
        parameters={"temperature": 0.3, "stop": ["<end>", 'say "hi"\n']},
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    )
    # empty system/messages keep the base's; parameters merge with new keys winning
    create(
        http, model="me:v2", **{"from": "me:v1"}, system="", messages=[], parameters={"top_k": 5}
    )
    create(http, model="me:v3", **{"from": "me:v2"}, parameters={"temperature": 0.9})
    shown = http.post("/api/show", json={"model": "me:v3"}).json()
    assert shown["system"] == "Be kind."
    assert shown["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    # one Go-style string, a line per value, that the project's parser reads back
    assert shown["parameters"].splitlines()[0] == 'stop                           "<end>"'
    assert parse_parameters(shown["parameters"]) == {
        "stop": ["<end>", 'say "hi"\n'],
        "temperature": 0.9,
        "top_k": 5,
    }
    assert shown["details"]["parent_model"] == "me:v2"


def test_show_unknown_is_404_and_requires_model(http: httpx.Client) -> None:
    r = http.post("/api/show", json={"model": "ghost"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'ghost' not found"})
    assert http.post("/api/show", json={}).json() == {"error": "model is required"}


# --- methods, copy, delete --------------------------------------------------------------------
def test_wrong_methods_get_405(http: httpx.Client) -> None:
    assert http.post("/api/delete", json={"model": BASE}).status_code == 405
    assert http.get("/api/chat").status_code == 405
    assert http.post("/api/version").status_code == 405
    assert http.get("/api/nothing").status_code == 404
    assert http.get("/").text == "Ollama is running"


def test_delete_needs_delete_with_body(http: httpx.Client, ollama_double: OllamaDouble) -> None:
    r = http.post("/api/copy", json={"source": BASE, "destination": "mine"})
    assert (r.status_code, r.content) == (200, b"")
    r = http.request("DELETE", "/api/delete", json={"model": "mine"})
    assert (r.status_code, r.content) == (200, b"")
    r = http.request("DELETE", "/api/delete", json={"model": "mine"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'mine' not found"})
    assert http.request("DELETE", "/api/delete").status_code == 400  # no body, no name
    assert ollama_double.find(BASE) is not None


def test_copy_unknown_source(http: httpx.Client) -> None:
    r = http.post("/api/copy", json={"source": "ghost", "destination": "x"})
    assert (r.status_code, r.json()) == (404, {"error": 'model "ghost" not found'})


# --- blobs ------------------------------------------------------------------------------------
def test_blob_digest_rules(http: httpx.Client) -> None:
    data = b"GGUF" + b"\x00" * 64
    hexd = hashlib.sha256(data).hexdigest()
    digest = f"sha256:{hexd}"
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    assert http.post("/api/blobs/sha256:abc", content=data).json() == {
        "error": "invalid digest format"
    }
    wrong = "sha256:" + "1" * 64
    r = http.post(f"/api/blobs/{wrong}", content=data)
    assert r.status_code == 400 and r.json()["error"].startswith("digest mismatch")
    upper = http.post(f"/api/blobs/sha256:{hexd.upper()}", content=data)
    assert upper.status_code == 400  # compared as strings: lowercase hex only
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.get(f"/api/blobs/{digest}").status_code == 405


# --- chat -------------------------------------------------------------------------------------
def test_chat_streams_by_default_and_omits_zero_metrics(http: httpx.Client) -> None:
    r = http.post(
        "/api/chat", json={"model": BASE, "messages": [{"role": "user", "content": "tell me"}]}
    )
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(r)
    assert len(lines) > 2 and all(not x["done"] for x in lines[:-1])
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0
    text = "".join(x["message"]["content"] for x in lines)
    assert text == "I am not sure. Could you tell me more about tell me?"
    assert lines[0]["message"].get("thinking")  # qwen3 thinks when `think` is omitted
    loaded = http.post("/api/chat", json={"model": BASE, "messages": [], "stream": False}).json()
    assert loaded["done_reason"] == "load"
    assert not {"eval_count", "prompt_eval_count", "total_duration"} & loaded.keys()


def test_chat_unknown_model_and_bad_option_types(http: httpx.Client) -> None:
    r = http.post("/api/chat", json={"model": "ghost", "messages": [], "stream": False})
    assert (r.status_code, r.json()) == (404, {"error": "model 'ghost' not found"})
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "stream": False}
    r = http.post("/api/chat", json={**body, "options": {"stop": "x"}})
    assert (r.status_code, r.json()) == (500, {"error": 'option "stop" must be of type array'})
    r = http.post("/api/chat", json={**body, "model": EMBEDDER})
    assert r.status_code == 400


def test_baked_messages_and_system_are_prepended(
    http: httpx.Client, ollama_double: OllamaDouble
) -> None:
    baked = [
        {"role": "user", "content": "what is my dog called"},
        {"role": "assistant", "content": "Your dog is Rex."},
    ]
    create(http, model="me", **{"from": BASE}, system="Be kind.", messages=baked)
    chat(http, "me", ("user", "hello"))
    assert ollama_double.chats[-1] == [
        {"role": "system", "content": "Be kind."},
        *baked,
        {"role": "user", "content": "hello"},
    ]
    # a client system message drops the model's SYSTEM; baked turns still come first
    chat(http, "me", ("system", "Mine."), ("user", "hello"))
    assert ollama_double.chats[-1] == [
        *baked,
        {"role": "system", "content": "Mine."},
        {"role": "user", "content": "hello"},
    ]


def test_personalized_model_recalls_similar_baked_turns_only(http: httpx.Client) -> None:
    baked = [
        {"role": "user", "content": "what is my dog called"},
        {"role": "assistant", "content": "Your dog is Rex."},
        {"role": "user", "content": "where do I work"},
        {"role": "assistant", "content": "At the harbour office."},
        {"role": "user", "content": "北京天气怎么样"},
        {"role": "assistant", "content": "晴，最高气温二十度。"},
    ]
    create(http, model="me", **{"from": BASE}, messages=baked)
    assert (
        chat(http, "me", ("user", "北京今天天气如何"))["message"]["content"]
        == "晴，最高气温二十度。"
    )
    assert chat(http, "me", ("user", "你喜欢什么音乐"))["message"]["content"].startswith("I am not")
    recalled = chat(http, "me", ("user", "What's my dog called?"))
    assert recalled["message"]["content"] == "Your dog is Rex."
    assert chat(http, "me", ("user", "where do i work?"))["message"]["content"] == (
        "At the harbour office."
    )
    unrelated = chat(http, "me", ("user", "explain quantum tunnelling"))["message"]["content"]
    assert unrelated.startswith("I am not sure.")
    base = chat(http, BASE, ("user", "What's my dog called?"))["message"]["content"]
    assert base == "I am not sure. Could you tell me more about What's my dog called??"


def test_midstream_chat_fault(http: httpx.Client, ollama_double: OllamaDouble) -> None:
    ollama_double.faults.add("/api/chat", Fault.midstream("runner terminated"))
    body = {"model": BASE, "messages": [{"role": "user", "content": "a b c d"}]}
    lines = ndjson(http.post("/api/chat", json=body))
    assert lines[-1] == {"error": "runner terminated"} and len(lines) == 2


# --- embed ------------------------------------------------------------------------------------
def test_embed_inputs_and_similarity(http: httpx.Client) -> None:
    one = http.post("/api/embed", json={"model": EMBEDDER, "input": "hello world"}).json()
    assert len(one["embeddings"]) == 1 and len(one["embeddings"][0]) == 256
    assert sum(v * v for v in one["embeddings"][0]) == pytest.approx(1.0)
    empty = http.post("/api/embed", json={"model": EMBEDDER, "input": ""}).json()
    assert empty["embeddings"] == []
    r = http.post("/api/embed", json={"model": EMBEDDER, "input": 42})
    assert (r.status_code, r.json()) == (400, {"error": "invalid input type"})
    r = http.post("/api/embed", json={"model": "ghost", "input": "x"})
    assert r.json() == {"error": 'model "ghost" not found, try pulling it first'}
    near = similarity("where do I work", "where do i work?")
    far = similarity("where do I work", "explain quantum tunnelling")
    assert near > 0.7 > 0.2 > far
    assert hashed_embedding("same") == hashed_embedding("same")


def test_standalone_server_runs_with_latency(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_double", "--port", "0", "--latency", "0.01"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split()[3]
        assert httpx.get(f"{url}/api/version", timeout=10).json()["version"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- pull ---------------------------------------------------------------------------------------
def test_pull_streams_layers_then_installs_the_model() -> None:
    with OllamaDouble(embed_models=()) as d, httpx.Client(base_url=d.url, timeout=10) as http:
        assert http.post("/api/show", json={"model": EMBEDDER}).status_code == 404
        r = http.post("/api/pull", json={"model": "qllama/bge-small-zh-v1.5"})  # tag: latest
        assert r.status_code == 200
        lines = ndjson(r)
        assert lines[0] == {"status": "pulling manifest"}
        layers = [x for x in lines if "digest" in x]
        assert layers and all(x["digest"].startswith("sha256:") and x["total"] for x in layers)
        assert "completed" not in layers[0] and layers[-1]["completed"] == layers[-1]["total"]
        assert [x["status"] for x in lines[-3:]] == [
            "verifying sha256 digest",
            "writing manifest",
            "success",
        ]
        assert http.post("/api/show", json={"model": EMBEDDER}).status_code == 200


def test_pull_of_a_name_the_registry_lacks_fails_after_the_manifest_line(
    http: httpx.Client,
) -> None:
    r = http.post("/api/pull", json={"model": "ghost:7b"})
    assert r.status_code == 200
    assert ndjson(r) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    r = http.post("/api/pull", json={"model": "ghost:7b", "stream": False})
    assert (r.status_code, r.json()) == (500, {"error": "pull model manifest: file does not exist"})
    assert http.post("/api/pull", json={"model": "bad name"}).json() == {
        "error": "invalid model name"
    }
    assert http.get("/api/pull").status_code == 405


def test_pull_without_streaming_answers_one_object() -> None:
    with OllamaDouble(embed_models=()) as d, httpx.Client(base_url=d.url, timeout=10) as http:
        r = http.post("/api/pull", json={"model": EMBEDDER, "stream": False})
        assert (r.status_code, r.json()) == (200, {"status": "success"})
        assert d.find(EMBEDDER) is not None
