"""The name grammar: run ids and model names, as checked and as decoded from the bus."""

from __future__ import annotations

import msgspec
import pytest

from shared.messages import LoraJob, ModelValidated, TrainingRequested, ValidationCase, decode
from shared.names import (
    InvalidName,
    check_model_name,
    check_run_id,
    is_model_name,
    is_run_id,
    normalize_model_name,
    same_model,
)
from shared.subjects import RunNames

GOOD_MODELS = [
    "qwen3:0.6b",
    "qwen3",
    "Qwen3:Latest",
    "smollm2:135m",
    "qllama/bge-small-zh-v1.5:latest",
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "localhost:5000/team/model:v1",
    "_x/y_:z",
    "a" * 80 + ":" + "b" * 80,
    "h" * 350 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80,
    "mindx-qwen3-0.6b:20261126-120501",
]
BAD_MODELS = [
    "",
    "../../x",
    "../x",
    "/etc/passwd",
    "./m",
    "a/../b",
    "m:",
    ":tag",
    "a//b",
    "a/b/c/d",  # at most host/namespace/model
    "ns.dotted/m",  # a namespace has no dot
    "h/ns:port/m",  # only a host may hold a colon
    "a:b:c",
    ".hidden",
    "-dash",
    'evil" SYSTEM "x',
    "evil\nFROM x",
    "m\n",
    " m",
    "m ",
    "naïve",
    "a\x00b",
    "a" * 81,
    "m:" + "t" * 81,
    "h" * 351 + "/n/m",
    "x" * 900_000,
]


@pytest.mark.parametrize("name", GOOD_MODELS)
def test_ollama_names_are_accepted(name: str) -> None:
    assert is_model_name(name)
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", BAD_MODELS)
def test_names_outside_the_grammar_are_refused(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(InvalidName, match="invalid model name"):
        check_model_name(name)


def test_a_refusal_never_echoes_a_huge_name() -> None:
    with pytest.raises(InvalidName) as info:
        check_model_name("x" * 900_000)
    assert len(str(info.value)) < 200 and "900000 characters" in str(info.value)


def test_not_a_string_is_refused() -> None:
    assert not is_model_name(None) and not is_run_id(20250101)


def test_normalized_names_have_a_tag_and_compare_without_case() -> None:
    assert normalize_model_name("qwen3") == "qwen3:latest"
    assert normalize_model_name("localhost:5000/ns/m") == "localhost:5000/ns/m:latest"
    assert normalize_model_name("ns/m:7b") == "ns/m:7b"
    assert same_model("Qwen3", "qwen3:latest")
    assert not same_model("qwen3:0.6b", "qwen3:latest")
    assert not same_model("../x", "../x")  # nothing invalid names a model
    with pytest.raises(InvalidName):
        normalize_model_name("../x")


@pytest.mark.parametrize("run_id", ["20250101_120000", "20261126_235959_0a9f"])
def test_run_ids_the_trainer_makes(run_id: str) -> None:
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize(
    "run_id",
    [
        "",
        "r1",
        "../20250101_120000",
        "/tmp/20250101_120000",
        "20250101_120000/..",
        "20250101_120000\n",
        "20250101_120000_ABCD",  # the suffix is lower-case hex
        "20250101_120000_abcde",
        "20250101-120000",
        "..",
        "2025010_120000",
    ],
)
def test_other_run_ids_are_refused(run_id: str) -> None:
    assert not is_run_id(run_id)
    with pytest.raises(InvalidName, match="invalid run id"):
        check_run_id(run_id)


def test_the_model_a_run_makes_is_a_valid_name() -> None:
    names = RunNames("20261126_120501_0a9f")
    for base in ["qwen3:0.6b", "hf.co/x/" + "y" * 80 + ":q4", "smollm2"]:
        assert is_model_name(names.model_name(base)), base


# --- the same grammar while decoding: a bad name never reaches a handler ------------------------


def _case(**fields: object) -> bytes:
    body = {"run_id": "20250101_120000", "case_id": 0, "model": "m", "prompt": "p", "expected": "e"}
    return msgspec.json.encode({**body, **fields})


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a\nb", "x" * 900_000])
def test_messages_with_a_bad_model_name_do_not_decode(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.model"):
        decode(_case(model=name), ValidationCase)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.base_model"):
        decode(msgspec.json.encode({"base_model": name}), TrainingRequested)
    job = {"run_id": "20250101_120000", "dataset_object": "d", "base_model": name}
    with pytest.raises(msgspec.ValidationError, match=r"\$\.base_model"):
        decode(msgspec.json.encode(job), LoraJob)


@pytest.mark.parametrize("run_id", ["/abs", "../../victim", "r1"])
def test_messages_with_a_bad_run_id_do_not_decode(run_id: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.run_id"):
        decode(_case(run_id=run_id), ValidationCase)
    job = {"run_id": run_id, "dataset_object": "d", "base_model": "m"}
    with pytest.raises(msgspec.ValidationError, match=r"\$\.run_id"):
        decode(msgspec.json.encode(job), LoraJob)


def test_model_validated_checks_both_names() -> None:
    body = {
        "run_id": "20250101_120000",
        "base_model": "qwen3:0.6b",
        "new_model": "mindx-qwen3-0.6b:20250101-120000",
        "mode": "message",
        "base_score": 0.5,
        "new_score": 0.6,
        "base_accuracy": 0.5,
        "new_accuracy": 0.6,
        "improved": True,
        "cases": 3,
    }
    assert decode(msgspec.json.encode(body), ModelValidated).new_model == body["new_model"]
    for key in ("base_model", "new_model"):
        with pytest.raises(msgspec.ValidationError, match=rf"\$\.{key}"):
            decode(msgspec.json.encode({**body, key: "../../x"}), ModelValidated)
