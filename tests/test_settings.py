"""Settings: LoRA hyperparameters have one default table, and the job's wire format holds."""

from __future__ import annotations

import msgspec

from shared.messages import LoraHyperparams, LoraJob, decode, encode
from shared.settings import Settings


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
    job = LoraJob(run_id="r1", dataset_object="r1/d.jsonl", base_model="m")
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
        b'{"run_id": "r1", "dataset_object": "d", "base_model": "m", "hyperparams": '
        b'{"epochs": 1, "max_length": 64, "export": "adapter", "checkpoint_every": 1, "lr": 3}}'
    )
    job = decode(raw, LoraJob)
    assert job.hyperparams == LoraHyperparams(epochs=1, max_length=64, export="adapter")
    # a job with no hyperparams at all takes the defaults
    bare = decode(b'{"run_id": "r1", "dataset_object": "d", "base_model": "m"}', LoraJob)
    assert bare.hyperparams == LoraHyperparams()
