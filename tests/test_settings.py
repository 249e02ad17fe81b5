"""Settings: every way of making them is validated; LoRA hyperparameters have one default table."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shared.messages import LoraHyperparams, LoraJob, decode, encode
from shared.settings import Settings, SettingsError

REJECTED: list[tuple[dict[str, Any], str]] = [
    ({"min_corpus": -5}, "min_corpus must be >= 1"),
    ({"min_corpus": 0}, "min_corpus must be >= 1"),
    ({"keep_backups": 0}, "keep_backups must be >= 1"),
    ({"max_pairs": 0}, "max_pairs must be >= 1"),
    ({"max_examples": 0}, "max_examples must be >= 1"),
    ({"example_budget_chars": 0}, "example_budget_chars must be >= 1"),
    ({"max_chars": 0}, "max_chars must be >= 1"),
    ({"dedupe_threshold": 0.0}, r"dedupe_threshold must be in \(0, 1\]"),
    ({"dedupe_threshold": 1.5}, r"dedupe_threshold must be in \(0, 1\]"),
    ({"held_out": 0}, "held_out must be >= 1"),
    ({"held_out_fraction": 0.0}, r"held_out_fraction must be in \(0, 1\)"),
    ({"held_out_fraction": 1.0}, r"held_out_fraction must be in \(0, 1\)"),
    ({"similarity_threshold": 0.0}, "similarity_threshold must be in"),
    ({"min_effect": float("nan")}, "min_effect must be finite"),
    ({"min_effect": float("inf")}, "min_effect must be finite"),
    ({"learning_rate": float("nan")}, "learning_rate must be in"),
    ({"bootstrap_samples": 10}, "bootstrap_samples must be >= 100"),
    ({"nats_password": "pw"}, "a NATS password needs a user"),
    ({"nats_token": "t", "nats_user": "u"}, "not both"),
    ({"max_error_rate": 1.5}, r"max_error_rate must be in \[0, 1\]"),
    ({"max_error_rate": -0.1}, r"max_error_rate must be in \[0, 1\]"),
    ({"validation_concurrency": 0}, "validation_concurrency must be >= 1"),
    ({"validation_timeout_s": 0.0}, "validation_timeout_s must be in"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"config_wait_s": 0.0}, "config_wait_s must be in"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate must be in"),
    ({"learning_rate": -1e-4}, "learning_rate must be in"),
    ({"max_length": 1}, "max_length must be >= 2"),
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"lora_alpha": 0}, "lora_alpha must be in"),
    ({"target_modules": ()}, "target_modules must name at least one module"),
    ({"time_budget_s": 0.0}, "time_budget_s must be in"),
    ({"time_budget_s": -3.0}, "time_budget_s must be in"),
    ({"max_deliver": 0}, "max_deliver must be >= 1"),
    ({"log_level": "LOUD"}, "log_level must be one of DEBUG, INFO, WARNING"),
    ({"mode": "fast"}, "mode must be one of"),
    ({"backend": "vllm"}, "backend must be one of"),
    ({"export": "zip"}, "export must be one of"),
    ({"stream_replicas": 0}, r"stream_replicas must be in \[1, 5\]"),
    ({"stream_replicas": 6}, r"stream_replicas must be in \[1, 5\]"),
    ({"nats": " , "}, "nats must name at least one URL"),
]


@pytest.mark.parametrize(("changes", "message"), REJECTED, ids=lambda v: str(v))
def test_replace_rejects_values_that_cannot_work(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings().replace(**changes)


@pytest.mark.parametrize(("changes", "message"), REJECTED, ids=lambda v: str(v))
def test_load_and_construction_reject_them_too(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**changes)
    with pytest.raises(SettingsError, match=message):
        Settings.load(changes, env={})


def test_a_bus_request_cannot_smuggle_in_a_bad_minimum() -> None:
    # what the trainer does with training.requested's fields
    with pytest.raises(SettingsError, match="min_corpus must be >= 1, got -5"):
        Settings.load({}, env={}).replace(min_corpus=-5)


def test_edge_values_that_work_are_accepted() -> None:
    Settings().replace(
        min_effect=2.0,  # a gate that never opens: a test's way to force "no improvement"
        max_error_rate=0.0,
        temperature=0.0,
        time_budget_s=None,
        bootstrap_samples=100,
        log_level="debug",
        held_out_fraction=0.5,
    )
    assert Settings.load({}, env={"MINDX_TIME_BUDGET_S": "30", "MINDX_LOG_LEVEL": "INFO"})


def test_env_values_are_validated() -> None:
    with pytest.raises(SettingsError, match="lora_rank must be >= 1"):
        Settings.load({}, env={"MINDX_LORA_RANK": "0"})
    with pytest.raises(SettingsError, match="log_level"):
        Settings.load({}, env={"MINDX_LOG_LEVEL": "chatty"})


def test_lora_defaults_come_from_the_hyperparams() -> None:
    s, h = Settings(), LoraHyperparams()
    assert s.lora_hyperparams() == h
    assert (s.epochs, s.batch_size, s.learning_rate, s.max_length) == (
        h.epochs,
        h.batch_size,
        h.learning_rate,
        h.max_length,
    )
    assert (s.lora_rank, s.lora_alpha, s.target_modules) == (h.rank, h.alpha, h.target_modules)
    assert (s.time_budget_s, s.export) == (h.time_budget_s, h.export)


def test_lora_hyperparams_map_the_setting_names() -> None:
    s = Settings.load(
        {"lora_rank": 4, "lora_alpha": 32, "epochs": 2, "export": "merged", "seed": 7},
        env={"MINDX_TARGET_MODULES": "q_proj,v_proj", "MINDX_TIME_BUDGET_S": "60"},
    )
    h = s.lora_hyperparams()
    assert (h.rank, h.alpha, h.epochs, h.export, h.seed) == (4, 32, 2, "merged", 7)
    assert h.target_modules == ("q_proj", "v_proj") and h.time_budget_s == 60.0


def test_the_job_wire_format_keeps_its_field_names() -> None:
    job = LoraJob(run_id="20250101_120000", dataset_object="r1/d.jsonl", base_model="m")
    wire = msgspec.json.decode(encode(job))
    assert wire["hyperparams"] == {
        "epochs": 3,
        "batch_size": 1,
        "learning_rate": 2e-4,
        "max_length": 512,
        "rank": 8,
        "alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "time_budget_s": None,
        "seed": 42,
        "export": "auto",
    }


def test_an_old_job_with_extra_keys_still_decodes() -> None:
    raw = (
        b'{"run_id": "20250101_120000", "dataset_object": "d", "base_model": "m", "hyperparams": '
        b'{"epochs": 1, "max_length": 64, "export": "adapter", "checkpoint_every": 1, "lr": 3}}'
    )
    job = decode(raw, LoraJob)
    assert job.hyperparams == LoraHyperparams(epochs=1, max_length=64, export="adapter")
    # a job with no hyperparams at all takes the defaults
    bare = decode(
        b'{"run_id": "20250101_120000", "dataset_object": "d", "base_model": "m"}', LoraJob
    )
    assert bare.hyperparams == LoraHyperparams()


def test_the_apps_request_options_are_read_as_a_json_object() -> None:
    s = Settings.load(
        {"app_options": '{"temperature": 0.7, "stop": ["\\n"]}'},
        env={"MINDX_APP_SYSTEM_PROMPT": "You are MindX."},
    )
    assert s.app_options == {"temperature": 0.7, "stop": ["\n"]}
    assert s.app_system_prompt == "You are MindX."
    assert Settings.load({}, env={"MINDX_APP_OPTIONS": "{}"}).app_options == {}
    with pytest.raises(SettingsError, match="app_options: cannot read"):
        Settings.load({}, env={"MINDX_APP_OPTIONS": "temperature=0.7"})
    with pytest.raises(SettingsError, match="app_options: cannot read"):
        Settings.load({"app_options": "[0.7]"}, env={})
    with pytest.raises(SettingsError, match="app_options must be a JSON object"):
        Settings(app_options=[0.7])  # type: ignore[arg-type]


def test_nats_connection_options_come_from_natscli_environment_names() -> None:
    env = {
        "NATS_URL": "nats://bus:4222",
        "NATS_USER": "alice",
        "NATS_PASSWORD": "pw",
        "NATS_CREDS": "/keys/service.creds",
        "NATS_CA": "/pki/ca.pem",
        "NATS_CERT": "/pki/client.pem",
        "NATS_KEY": "/pki/client.key",
    }
    auth = Settings.load({}, env=env).nats_auth()
    assert (auth.user, auth.password, auth.nkey) == ("alice", "pw", None)
    assert (str(auth.creds), str(auth.tls_ca), str(auth.tls_cert), str(auth.tls_key)) == (
        "/keys/service.creds",
        "/pki/ca.pem",
        "/pki/client.pem",
        "/pki/client.key",
    )
    # flags win; NATS_TOKEN and NATS_NKEY too
    flagged = Settings.load(
        {"nats_nkey": "/keys/op.nk"}, env={"NATS_TOKEN": "t", "NATS_NKEY": "/x.nk"}
    )
    assert (flagged.nats_token, str(flagged.nats_nkey)) == ("t", "/keys/op.nk")


def test_settings_never_show_a_password_or_token() -> None:
    s = Settings(nats="nats://alice:hunter2@bus:4222", nats_user="bob", nats_password="s3cret")
    shown = repr(s) + str(s)
    assert "hunter2" not in shown and "s3cret" not in shown
    assert "nats://alice:***@bus:4222" in shown and "nats_user='bob'" in shown
    assert "t0k" not in repr(Settings(nats="nats://t0k@bus:4222", nats_token="t0k"))


def test_the_local_backend_keeps_every_validation_case_of_a_model_in_flight() -> None:
    # its concurrent chats of one model are generated as one batch
    assert Settings(backend="local").cases_in_flight(20) == 20
    assert Settings(backend="local", validation_concurrency=32).cases_in_flight(20) == 32
    assert Settings(backend="ollama").cases_in_flight(20) == 4
    assert Settings(backend="ollama", validation_concurrency=8).cases_in_flight(20) == 8
    assert Settings(backend="local", held_out=20).validator_slots() == 20
    assert Settings(backend="local", validator_concurrency=32).validator_slots() == 32
    assert Settings(backend="ollama", held_out=20).validator_slots() == 5


def test_several_nats_urls_and_replicas_come_from_flags_or_the_environment() -> None:
    urls = "nats://a:4222,nats://b:4222, nats://c:4222"
    s = Settings.load({}, env={"NATS_URL": urls, "MINDX_STREAM_REPLICAS": "3"})
    assert (s.nats, s.stream_replicas) == (urls, 3)
    flag = Settings.load({"stream_replicas": 5}, env={"MINDX_STREAM_REPLICAS": "3"})
    assert flag.stream_replicas == 5
    assert Settings().stream_replicas == 1  # a single server's
