"""Subjects, JetStream streams and durable consumers, declared in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.js.api import RetentionPolicy

# --- subjects -------------------------------------------------------------------------------
MEMORY_POINT_CREATED = "memory.point.created"
TRAINING_REQUESTED = "training.requested"
TRAINING_STARTED = "training.started"
TRAINING_PROGRESS = "training.progress"  # + ".<run_id>"
TRAINING_COMPLETED = "training.completed"
TRAINING_FAILED = "training.failed"
MODEL_VALIDATED = "model.validated"
MODEL_UPDATED = "model.updated"
MODEL_UPDATE_FAILED = "model.update_failed"
MODEL_ROLLBACK_REQUESTED = "model.rollback.requested"
VALIDATION_CASE = "validation.case"  # core request/reply, served by a queue group
VALIDATOR_QUEUE = "validators"
LORA_JOBS = "lora.jobs"
LORA_DONE = "lora.done"  # + ".<run_id>"
DEAD_LETTER_PREFIX = "dlq"  # dlq.<original subject>

LORA_OBJECT_BUCKET = "mindx-lora"


def progress_subject(run_id: str) -> str:
    return f"{TRAINING_PROGRESS}.{run_id}"


def dead_letter_subject(subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{subject}"


# --- streams --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_s: float | None = None


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("MEMORY", ["memory.>"]),
    # progress events are live-only: not captured
    StreamSpec(
        "TRAINING",
        [TRAINING_REQUESTED, TRAINING_STARTED, TRAINING_COMPLETED, TRAINING_FAILED],
        max_age_s=30 * 24 * 3600,
    ),
    StreamSpec(
        "MODEL",
        [MODEL_VALIDATED, MODEL_UPDATED, MODEL_UPDATE_FAILED, MODEL_ROLLBACK_REQUESTED],
        max_age_s=30 * 24 * 3600,
    ),
    StreamSpec("LORA_JOBS", [LORA_JOBS], retention=RetentionPolicy.WORK_QUEUE),
    StreamSpec("LORA_DONE", [f"{LORA_DONE}.>"], max_age_s=7 * 24 * 3600),
    StreamSpec("DLQ", [f"{DEAD_LETTER_PREFIX}.>"], max_age_s=90 * 24 * 3600),
)


# --- durable consumers ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    stream: str
    subject: str
    ack_wait_s: float = 30.0  # unacked messages of a dead consumer come back within this
    max_deliver: int = 5  # then the message is dead-lettered
    backoff_s: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])


COLLECTOR = ConsumerSpec("collector", "MEMORY", MEMORY_POINT_CREATED)
TRAINER = ConsumerSpec("trainer", "TRAINING", TRAINING_REQUESTED, max_deliver=3)
CONFIG_UPDATER = ConsumerSpec("config-updater", "MODEL", MODEL_VALIDATED)
CONFIG_ROLLBACK = ConsumerSpec("config-rollback", "MODEL", MODEL_ROLLBACK_REQUESTED)
# training runs in a thread, so the keep-alive beats on time even during long steps
LORA_WORKER = ConsumerSpec("lora-worker", "LORA_JOBS", LORA_JOBS, max_deliver=3)
