"""Subjects, JetStream streams and durable consumers, declared in one place."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import msgspec
from nats.js.api import RetentionPolicy

from shared.messages import (
    DeadLetter,
    LoraJob,
    LoraJobDone,
    MemoryPoint,
    MemoryPointDeleted,
    ModelUpdated,
    ModelUpdateFailed,
    ModelValidated,
    Payload,
    ProcessStatus,
    RollbackRequested,
    StatusRequest,
    TrainingFinished,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    ValidationCase,
    ValidationResult,
)

# --- subjects -------------------------------------------------------------------------------
MEMORY_POINT_CREATED = "memory.point.created"
MEMORY_POINT_DELETED = "memory.point.deleted"
TRAINING_REQUESTED = "training.requested"
TRAINING_STARTED = "training.started"
TRAINING_PROGRESS = "training.progress"  # + ".<run_id>"
TRAINING_COMPLETED = "training.completed"
TRAINING_FAILED = "training.failed"
MODEL_VALIDATED = "model.validated"
MODEL_UPDATED = "model.updated"
MODEL_UPDATE_FAILED = "model.update_failed"
MODEL_ROLLBACK_REQUESTED = "model.rollback.requested"
VALIDATION_CASE = "validation.case"  # + ".<run_id>": a work queue every validator pulls from
VALIDATION_RESULT = "validation.result"  # + ".<run_id>": core, the trainer of the run listens
LORA_JOBS = "lora.jobs"
LORA_DONE = "lora.done"  # + ".<run_id>"
DEAD_LETTER_PREFIX = "dlq"  # dlq.<original subject>
STATUS = "mindx.status"  # core request; every mindx process answers (no queue group)

LORA_OBJECT_BUCKET = "mindx-lora"


def dead_letter_subject(subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{subject}"


@dataclass(frozen=True)
class RunNames:
    """Every name derived from a run id: subjects, message ids, object keys and run files.

    The run id is also the run files' timestamp (`YYYYMMDD_HHMMSS`, a suffix when two runs share
    a second), so `report_<run_id>.json` keeps the original's file names.
    """

    run_id: str

    # subjects and message ids (a message id makes JetStream drop a repeated publish)
    @property
    def progress_subject(self) -> str:
        return f"{TRAINING_PROGRESS}.{self.run_id}"

    @property
    def lora_done_subject(self) -> str:
        return f"{LORA_DONE}.{self.run_id}"

    @property
    def case_subject(self) -> str:
        return f"{VALIDATION_CASE}.{self.run_id}"

    @property
    def result_subject(self) -> str:
        return f"{VALIDATION_RESULT}.{self.run_id}"

    @property
    def finished_msg_id(self) -> str:
        return f"finished-{self.run_id}"

    @property
    def validated_msg_id(self) -> str:
        return f"validated-{self.run_id}"

    @property
    def lora_job_msg_id(self) -> str:
        return f"lora-{self.run_id}"

    @property
    def lora_done_msg_id(self) -> str:
        return f"lora-done-{self.run_id}"

    # object-store keys (the LoRA dataset and artifacts travel through the object store)
    @property
    def dataset_object(self) -> str:
        return self.artifact_object("train_data.jsonl")

    def artifact_object(self, filename: str) -> str:
        return f"{self.run_id}/{filename}"

    # run files under the training dir
    @property
    def dataset_file(self) -> str:
        return f"train_data_{self.run_id}.jsonl"

    @property
    def modelfile_file(self) -> str:
        return f"Modelfile_{self.run_id}"

    @property
    def claim_file(self) -> str:
        """Reserves the run id until the run's report exists."""
        return f".run_{self.run_id}.claim"

    @property
    def report_json_file(self) -> str:
        return f"report_{self.run_id}.json"

    @property
    def report_html_file(self) -> str:
        return f"report_{self.run_id}.html"

    @property
    def lineage_file(self) -> str:
        return f"lineage_{self.run_id}.json"

    @staticmethod
    def run_of_file(name: str) -> str | None:
        """The run id in one of the run-file names above (a run id has no dot), or None."""
        stem = name.split(".", 1)[0]
        for prefix in ("train_data_", "Modelfile_", "report_", "lineage_"):
            if stem.startswith(prefix):
                return stem[len(prefix) :]
        return None

    def model_name(self, base_model: str) -> str:
        """`qwen3:0.6b` → `mindx-qwen3-0.6b:20261126-120501` (a valid Ollama name)."""
        stem = base_model.rsplit("/", 1)[-1]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"
        stem = stem[: 80 - len("mindx-")].rstrip("-.")  # a name part is at most 80 characters
        return f"mindx-{stem}:{self.run_id.replace('_', '-')}"


REPORT_GLOB = "report_*.json"


def point_msg_id(point: MemoryPoint) -> str:
    """A memory point's message id: its id and version, so a repeated import is dropped."""
    changed = point.updated_at or point.created_at
    return f"point-{point.id}-{changed.isoformat() if changed else ''}"


# --- streams --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_s: float | None = None
    replicas: int = 1  # copies on a cluster's nodes (`--stream-replicas`); 1 on a single server


DAY_S = 24 * 3600
# Memory points are personal: the stream keeps them only until a collector that was down has
# had ample time to catch up (the corpus holds what training needs). `--memory-retention`.
MEMORY_RETENTION_DAYS = 30.0

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("MEMORY", ["memory.>"], max_age_s=MEMORY_RETENTION_DAYS * DAY_S),
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
    # a run's cases: taken by validators as they have room, purged when the run has its results
    StreamSpec(
        "VALIDATION",
        [f"{VALIDATION_CASE}.*"],
        retention=RetentionPolicy.WORK_QUEUE,
        max_age_s=DAY_S,
    ),
    StreamSpec("LORA_DONE", [f"{LORA_DONE}.>"], max_age_s=7 * 24 * 3600),
    StreamSpec("DLQ", [f"{DEAD_LETTER_PREFIX}.>"], max_age_s=90 * 24 * 3600),
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` is one token, a trailing `>` one or more."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pat):
        if tok == ">":
            return len(sub) > i
        if i >= len(sub) or (tok != "*" and tok != sub[i]):
            return False
    return len(pat) == len(sub)


@lru_cache(maxsize=1024)
def stream_for(subject: str) -> str | None:
    """Name of the stream in STREAMS that captures `subject`, or None (core NATS only)."""
    for spec in STREAMS:
        if any(subject_matches(p, subject) for p in spec.subjects):
            return spec.name
    return None


def streams(
    memory_retention_days: float = MEMORY_RETENTION_DAYS, replicas: int = 1
) -> tuple[StreamSpec, ...]:
    """STREAMS with the MEMORY stream keeping points for `memory_retention_days`, each stream
    with `replicas` copies (a cluster's; its consumers have as many)."""
    return tuple(
        replace(
            s,
            replicas=replicas,
            max_age_s=memory_retention_days * DAY_S if s.name == "MEMORY" else s.max_age_s,
        )
        for s in STREAMS
    )


# --- key-value buckets ----------------------------------------------------------------------
@dataclass(frozen=True)
class BucketSpec:
    name: str
    max_age_s: float | None = None


# run id → the trainer's RunRecord: what validators and the config updater check messages against;
# kept longer than the MODEL stream keeps a model.validated
RUNS = BucketSpec("mindx-runs", max_age_s=90 * 24 * 3600)
# run id → the ModelLineage of the model the run created: kept as long as anything may ask what a
# model was trained on (retention and forgetting read it), so it never expires
MODELS = BucketSpec("mindx-models")
# every key-value bucket: declared with the streams, with as many replicas (a bucket created
# later, once a cluster node is down, could not be placed)
BUCKETS = (RUNS, MODELS)


# --- durable consumers ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    stream: str
    subject: str
    ack_wait_s: float = 30.0  # unacked messages of a dead consumer come back within this
    max_deliver: int = 5  # then the message is dead-lettered
    backoff_s: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    # a new durable starts at the stream's end: for requests only worth doing when they are made
    deliver_new: bool = False
    max_ack_pending: int = 1000  # messages handed out and not acked yet, over all its consumers


COLLECTOR = ConsumerSpec("collector", "MEMORY", MEMORY_POINT_CREATED)
# deletions are consumed apart from creations; the order between the two is kept by erasing the
# point's messages from the stream and by the corpus's tombstone (shared.corpus)
FORGETTER = ConsumerSpec("forgetter", "MEMORY", MEMORY_POINT_DELETED)
TRAINER = ConsumerSpec("trainer", "TRAINING", TRAINING_REQUESTED, max_deliver=3)
CONFIG_UPDATER = ConsumerSpec("config-updater", "MODEL", MODEL_VALIDATED)
# what every config's rollback consumer is (config_rollback names one)
CONFIG_ROLLBACK = ConsumerSpec(
    "config-rollback", "MODEL", MODEL_ROLLBACK_REQUESTED, deliver_new=True
)


def config_rollback(config_key: str) -> ConsumerSpec:
    """The rollback consumer of one config (`config_key`: its resolved path). A durable per
    config: every config sees every request, and its updaters act only on those naming it."""
    digest = hashlib.sha256(config_key.encode()).hexdigest()[:16]
    return replace(CONFIG_ROLLBACK, durable=f"{CONFIG_ROLLBACK.durable}-{digest}")


# Every validator pulls cases from one durable, as many as it has room for (its concurrency),
# and beats in_progress while it scores one: a validator that dies hands its cases back after
# ack_wait, and they cost one more delivery. max_ack_pending caps the cases in flight over all
# validators (e.g. 64 validators of 16).
VALIDATOR = ConsumerSpec(
    "validators", "VALIDATION", f"{VALIDATION_CASE}.*", ack_wait_s=10.0, max_deliver=3,
    backoff_s=[0.5, 1.0], max_ack_pending=1024,
)  # fmt: skip

# training runs in a thread, so the keep-alive beats on time even during long steps
LORA_WORKER = ConsumerSpec("lora-worker", "LORA_JOBS", LORA_JOBS, max_deliver=3)


# --- the contract: each subject's payload (`mindx schema`, docs/events.md) -----------------
# Keys are NATS subjects; a run-specific token is `*` (subscribe with the key as it is).
PAYLOADS: dict[str, type[Payload]] = {
    MEMORY_POINT_CREATED: MemoryPoint,
    MEMORY_POINT_DELETED: MemoryPointDeleted,
    TRAINING_REQUESTED: TrainingRequested,
    TRAINING_STARTED: TrainingStarted,
    f"{TRAINING_PROGRESS}.*": TrainingProgress,
    TRAINING_COMPLETED: TrainingFinished,
    TRAINING_FAILED: TrainingFinished,
    MODEL_VALIDATED: ModelValidated,
    MODEL_UPDATED: ModelUpdated,
    MODEL_UPDATE_FAILED: ModelUpdateFailed,
    MODEL_ROLLBACK_REQUESTED: RollbackRequested,
    f"{VALIDATION_CASE}.*": ValidationCase,
    f"{VALIDATION_RESULT}.*": ValidationResult,
    LORA_JOBS: LoraJob,
    f"{LORA_DONE}.*": LoraJobDone,
    f"{DEAD_LETTER_PREFIX}.>": DeadLetter,
    STATUS: StatusRequest,
}
# Request/reply subjects: the payload of the reply.
REPLIES: dict[str, type[Payload]] = {STATUS: ProcessStatus}


def contract_schema() -> dict[str, Any]:
    """`{"subjects": {subject: JSON Schema}, "replies": {subject: JSON Schema}}`."""
    return {
        "subjects": {subject: payload_schema(typ) for subject, typ in PAYLOADS.items()},
        "replies": {subject: payload_schema(typ) for subject, typ in REPLIES.items()},
    }


def payload_schema(typ: type[Payload]) -> dict[str, Any]:
    """The JSON Schema of one payload type. Times are marked `"format": "date-time"`
    (RFC 3339; msgspec leaves the format out because it also reads times without an offset,
    which it takes as UTC), so generated Go code gets a time.Time."""
    schema = msgspec.json.schema(typ)
    defs = schema.get("$defs", {})

    def walk(t: msgspec.inspect.Type) -> bool:
        """Mark the time fields of every struct within `t`; True when `t` itself is a time."""
        if isinstance(t, msgspec.inspect.DateTimeType):
            return True
        if isinstance(t, msgspec.inspect.UnionType):
            return any([walk(u) for u in t.types])
        if isinstance(t, msgspec.inspect.ListType | msgspec.inspect.DictType):
            walk(t.item_type if isinstance(t, msgspec.inspect.ListType) else t.value_type)
        if isinstance(t, msgspec.inspect.StructType):
            props = defs.get(t.cls.__name__, {}).get("properties", {})
            for f in t.fields:
                if walk(f.type):
                    _mark_time(props.get(f.encode_name, {}))
        return False

    walk(msgspec.inspect.type_info(typ))
    return schema


def _mark_time(prop: dict[str, Any]) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "string":
            option["format"] = "date-time"
