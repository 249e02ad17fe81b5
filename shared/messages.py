"""Every payload that crosses the bus, in one place.

JSON on the wire, decoded into typed msgspec Structs. Unknown fields are ignored (producers in
other languages may add fields); new fields always get defaults, existing types never change.
Run ids and model names are checked while decoding (`shared.names`): a message with a bad one
never reaches its handler and goes to the dead-letter stream.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from shared.names import MODEL_NAME_PATTERN, RUN_ID_PATTERN, ModelName, RunId

Mode = Literal["message", "lora"]
RunStatus = Literal[
    "success", "completed_no_improvement", "success_config_failed", "skipped", "failed"
]
RunStage = Literal["running", "validated", "finished"]
# candidate: created, not (yet) live; promoted: made live by the gate; rejected: lost the gate
# (deleted from the backend); retired: removed from the backend later (retention, forgetting);
# unconfirmed: won the gate, but no config updater answered in time (its model.validated waits
# on the bus: promoted once an updater applies it)
ModelStatus = Literal["candidate", "promoted", "rejected", "retired", "unconfirmed"]
# SQLite's INTEGER range: an id beyond it could be published, but never stored by the collector.
PointId = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Payload(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every bus payload."""


# --- memory -------------------------------------------------------------------------------------


class MemoryPoint(Payload, kw_only=True, frozen=True):
    """A MindX memory point (`memory.point.created`). Extra MindX fields are ignored."""

    id: PointId
    content: str
    keywords: list[str] | None = []  # null (Go's nil slice) reads as []
    summary: str | None = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.keywords is None:
            msgspec.structs.force_setattr(self, "keywords", [])


class Pair(msgspec.Struct, kw_only=True, frozen=True):
    """One user → assistant exchange taken from a memory point."""

    prompt: str
    completion: str
    point_id: int
    turn: int = 0  # position of the pair inside its point
    kind: Literal["dialogue", "note"] = "dialogue"
    keywords: tuple[str, ...] = ()
    created_at: datetime | None = None


class MemoryPointDeleted(Payload, kw_only=True, frozen=True):
    """`memory.point.deleted`: the point `id` is to be forgotten everywhere (the corpus, the
    MEMORY stream, run files and events, every model that holds it). Final for every version
    of the point stored so far: only a version newer than the deletion is collected again."""

    id: PointId


# --- training -----------------------------------------------------------------------------------


class TrainingRequested(Payload, kw_only=True, frozen=True):
    """`training.requested`: missing fields take the service's configured defaults."""

    request_id: str | None = None  # a repeated id starts no second run
    mode: Mode | None = None
    base_model: ModelName | None = None
    min_corpus: int | None = None
    force: bool = False
    since: datetime | None = None  # what arrived after it is new (default: the last promotion)


class TrainingStarted(Payload, kw_only=True, frozen=True):
    run_id: RunId
    request_id: str | None = None
    mode: Mode
    base_model: ModelName
    backend: str = "ollama"
    at: datetime = msgspec.field(default_factory=utc_now)


class TrainingProgress(Payload, kw_only=True, frozen=True):
    """`training.progress.<run_id>`: for UIs and CLIs; not persisted."""

    run_id: RunId
    stage: str
    done: int = 0
    total: int | None = None
    message: str = ""
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    at: datetime = msgspec.field(default_factory=utc_now)


class TrainingFinished(Payload, kw_only=True, frozen=True):
    """`training.completed` and `training.failed`."""

    run_id: RunId
    request_id: str | None = None
    status: RunStatus
    report: dict[str, Any] = {}
    report_path: str | None = None


# --- model --------------------------------------------------------------------------------------


class ModelValidated(Payload, kw_only=True, frozen=True):
    run_id: RunId
    base_model: ModelName
    new_model: ModelName
    mode: Mode
    base_score: float
    new_score: float
    base_accuracy: float
    new_accuracy: float
    improved: bool
    cases: int
    report_path: str = ""
    reason: str = ""
    request_id: str | None = None


class ModelUpdated(Payload, kw_only=True, frozen=True):
    """`model.updated`: the app's config now names `model`; everything a Brain needs to
    switch without reading the config file."""

    run_id: str  # the run that built `model`; a rollback: its request id
    role: str = "left"
    model: str
    previous_model: str | None = None
    config_path: str
    backup_path: str | None = None
    rolled_back: bool = False
    at: datetime = msgspec.field(default_factory=utc_now)
    restored_from: str | None = None  # the backup a rollback restored
    model_entry: dict[str, Any] = {}  # the config's `models` entry of `model` ({} if none)
    request_id: str | None = None  # of the training.requested that led here
    mode: Mode | None = None  # None on a rollback
    base_score: float | None = None  # the gate's mean scores; None on a rollback
    new_score: float | None = None
    restored_run_id: str | None = None  # a rollback: the run that built the restored model
    reason: str = ""  # a switch no run asked for (forgetting a point): why


class ModelUpdateFailed(Payload, kw_only=True, frozen=True):
    """`model.update_failed`: the config updater could not apply a validated model."""

    run_id: str
    error: str
    at: datetime = msgspec.field(default_factory=utc_now)


class RollbackRequested(Payload, kw_only=True, frozen=True):
    """`model.rollback.requested`: restore the named backup, or the newest one, of the config
    at `config_path`. Only that config's updater acts on it; a request naming no config cannot
    be decoded (dead-lettered), so no updater guesses which config is meant."""

    config_path: str  # resolved path of the config, as its updater resolves it
    request_id: str | None = None
    backup: str | None = None


class RunRecord(Payload, kw_only=True, frozen=True):
    """The trainer's record of a run (bucket `mindx-runs`, key = run id), written when the run
    starts, when it is decided and when it ends. Validators serve only cases of a `running` run
    and its two models; the config updater applies only a `model.validated` that matches it."""

    run_id: RunId
    stage: RunStage
    mode: Mode
    base_model: ModelName
    new_model: ModelName
    improved: bool = False
    base_score: float | None = None
    new_score: float | None = None
    base_accuracy: float | None = None
    new_accuracy: float | None = None
    cases: int = 0
    status: RunStatus | None = None  # once finished
    at: datetime = msgspec.field(default_factory=utc_now)
    incumbent_model: ModelName | None = None  # the live model, validated on the same cases


class PointVersion(msgspec.Struct, frozen=True, array_like=True):
    """One memory point as a model saw it: `[id, version]` (version: updated_at, else
    created_at, as the corpus stores it)."""

    id: int
    version: str


class ModelLineage(Payload, kw_only=True, frozen=True):
    """What a created model is made of (bucket `mindx-models`, key = run id, and
    `lineage_<run_id>.json` beside the run files). `points` are what the model holds: the baked
    examples in message mode, the training split in LoRA mode; a case from any other point is
    one it never saw."""

    run_id: RunId
    model: ModelName
    base_model: ModelName
    base_digest: str = ""  # the base model's digest on the backend when the run built on it
    mode: Mode
    points: list[PointVersion] = []
    dataset_sha256: str = ""  # of train_data_<run_id>.jsonl
    collected_until: datetime | None = None  # the newest arrival in the corpus the run read
    decision: str = ""  # the gate's reason
    status: ModelStatus = "candidate"
    created_at: datetime = msgspec.field(default_factory=utc_now)
    promoted_at: datetime | None = None
    retired_at: datetime | None = None
    retired_reason: str = ""


# --- validation (cases on the VALIDATION work queue, results on core NATS) ------------------------


class ValidationCase(Payload, kw_only=True, frozen=True):
    run_id: RunId
    case_id: int
    model: ModelName
    prompt: str
    expected: str
    system: str | None = None  # None: the model's own SYSTEM applies
    options: dict[str, Any] = {}


class ValidationResult(Payload, kw_only=True, frozen=True):
    run_id: RunId
    case_id: int
    model: str
    answer: str = ""
    score: float | None = None  # None when error is set
    error: str | None = None
    validator: str = ""
    latency_s: float = 0.0


# --- LoRA jobs (JetStream work queue) -----------------------------------------------------------


ExportMode = Literal["auto", "adapter", "merged"]  # auto: adapter and merged, either may fail


class LoraHyperparams(msgspec.Struct, kw_only=True, frozen=True):
    """What a LoRA job trains with. The one table of their defaults: the settings and the
    worker's TrainingArgs take theirs from here. Ranges are checked where they are used (the
    worker rejects a job it cannot run), so a bad value is announced, not dead-lettered."""

    epochs: int = 3
    batch_size: int = 1
    learning_rate: float = 2e-4
    max_length: int = 512  # tokens per example
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    time_budget_s: float | None = None  # None: no limit
    seed: int = 42
    export: ExportMode = "auto"


class LoraJob(Payload, kw_only=True, frozen=True):
    run_id: RunId
    dataset_object: str  # object-store key of the train_data jsonl
    base_model: ModelName
    base_weights: str | None = None  # GGUF path, HF dir or HF id; None: resolve on the worker
    hyperparams: LoraHyperparams = LoraHyperparams()


class LoraJobDone(Payload, kw_only=True, frozen=True):
    run_id: RunId
    ok: bool
    error: str | None = None
    artifacts: dict[str, str] = {}  # kind ("adapter", "merged", "metrics") → object-store key
    metrics: dict[str, Any] = {}
    worker: str = ""


# --- run report (the report of TrainingFinished; report_<ts>.json) -------------------------------


class FunnelStage(msgspec.Struct, kw_only=True):
    """One step of the pair funnel: collected → each filter → train / held-out."""

    stage: str
    count_in: int
    count_out: int
    dropped: dict[str, int] = {}  # reason → pairs dropped for it


class CaseResult(msgspec.Struct, kw_only=True):
    """One held-out case, scored on both models. None score = that side errored."""

    case_id: int
    prompt: str
    expected: str
    base_answer: str = ""
    new_answer: str = ""
    base_score: float | None = None
    new_score: float | None = None
    base_error: str | None = None
    new_error: str | None = None
    topic: str = ""
    # the live model's answer on the same case, when there was one besides the base
    incumbent_answer: str = ""
    incumbent_score: float | None = None
    incumbent_error: str | None = None


def _no_errors() -> dict[str, int]:
    return {"base": 0, "new": 0}


class RunReport(msgspec.Struct, kw_only=True):
    """One training run. Everything has a default so skipped/failed runs need few fields.

    Scores are `None` where they were not measured (JSON null), never a made-up 0.
    `lora` holds, when the run was a LoRA run: loss_curve [[step, loss], …], tokens_per_s,
    steps, elapsed_s, peak_memory_mb, exports [kind, …].
    """

    # the original's fields
    training_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    base_model: str = ""
    new_model: str = ""
    total_pairs: int = 0
    filtered_pairs: int = 0
    training_pairs: int = 0
    training_time: float = 0.0  # seconds
    base_score: float | None = None
    validation_score: float | None = None  # the new model's score
    improved: bool = False
    status: RunStatus = "skipped"
    error: str = ""
    # added so a person can trust the decision
    run_id: str = ""
    request_id: str | None = None
    mode: str = "message"
    backend: str = ""
    embed_model: str = ""  # the model that embedded answers and pairs
    model_choice: str = ""  # why the run used these models, when the app chose them
    held_out_cases: int = 0
    threshold: float | None = None
    base_accuracy: float | None = None
    new_accuracy: float | None = None
    score_diff: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    min_effect: float | None = None
    decision_reason: str = ""
    errors: dict[str, int] = msgspec.field(default_factory=_no_errors)
    funnel: list[FunnelStage] = []
    timings: dict[str, float] = {}  # stage → seconds
    cases: list[CaseResult] = []
    artifacts: dict[str, str] = {}  # dataset, modelfile, report_json, report_html, …
    config: dict[str, Any] = {}  # path, backup_path
    # how validation asked the models: {"system_sent", "system", "options"}
    validation_request: dict[str, Any] = {}
    lora: dict[str, Any] | None = None
    # the live model (the incumbent) on the same cases; its CI is of new − incumbent
    incumbent_model: str | None = None
    incumbent_score: float | None = None
    incumbent_accuracy: float | None = None
    incumbent_ci_low: float | None = None
    incumbent_ci_high: float | None = None
    new_pairs: int = 0  # pairs that arrived since the last promoted model: the trigger
    selection: str = ""  # how the training set, held-out cases and examples were chosen


# --- status (core request, answered by every process) ----------------------------------------


class StatusRequest(Payload, kw_only=True, frozen=True):
    """`mindx.status`: asks every running mindx process for its `ProcessStatus`."""


class ProcessStatus(Payload, kw_only=True, frozen=True):
    """One process's answer to `mindx.status`."""

    id: str  # host:pid
    components: list[str]  # what it serves: collector, trainer, validator, ...
    version: str = ""  # of mindx-training
    started_at: datetime = msgspec.field(default_factory=utc_now)
    # the latest progress of each run in progress (a process with the trainer follows them)
    runs: list[TrainingProgress] = []


# --- dead letters -------------------------------------------------------------------------------


class DeadLetter(Payload, kw_only=True, frozen=True):
    subject: str
    error: str
    data: str  # the original payload, as text
    at: datetime = msgspec.field(default_factory=utc_now)
    consumer: str = ""
    deliveries: int = 1


def encode(payload: Payload | msgspec.Struct) -> bytes:
    return msgspec.json.encode(payload)


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


T = TypeVar("T")


# A dead letter's reason names the grammar a value broke, not its regex.
_GRAMMARS = {
    f"`str` matching regex {MODEL_NAME_PATTERN!r}": "a model name [host/][namespace/]model[:tag]",
    f"`str` matching regex {RUN_ID_PATTERN!r}": "a run id YYYYMMDD_HHMMSS[_xxxx]",
}


def decode(data: bytes, typ: type[T]) -> T:
    """Decode `data` as `typ`; raises msgspec.ValidationError/DecodeError with a clear message.

    An empty body is the empty object: a payload whose fields all have defaults may be sent
    with no body at all (e.g. a Go `nc.Publish(subject, nil)`); any other type then names the
    first missing field.
    """
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    if not data or data.isspace():
        data = b"{}"
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        for regex, grammar in _GRAMMARS.items():
            text = text.replace(regex, grammar)
        if text == str(exc):
            raise
        raise msgspec.ValidationError(text) from None
