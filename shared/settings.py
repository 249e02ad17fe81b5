"""The one settings object: CLI flags > environment > defaults.

Every field can be set from the environment as `MINDX_<FIELD>` (upper case); a few keep the
names the ecosystem already uses (`NATS_URL`, `OLLAMA_HOST`, and natscli's `NATS_USER`,
`NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CREDS`, `NATS_NKEY`, `NATS_CA`, `NATS_CERT`, `NATS_KEY`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from shared import bundled
from shared.messages import ExportMode, LoraHyperparams, Mode
from shared.nats_client import NatsAuth, redact_url
from shared.subjects import MEMORY_RETENTION_DAYS

Backend = Literal["ollama", "local"]

DEFAULT_OLLAMA_EMBED_MODEL = "qllama/bge-small-zh-v1.5:latest"
DEFAULT_LOCAL_EMBED_MODEL = bundled.EMBED_NAMES[0]
DEFAULT_OLLAMA_BASE = "qwen3:0.6b"
DEFAULT_LOCAL_BASE = bundled.CHAT_NAMES[0]

# Environment names used by the wider ecosystem, besides MINDX_<FIELD>.
_ENV_ALIASES = {
    "nats": "NATS_URL",
    "ollama": "OLLAMA_HOST",
    # natscli's names
    "nats_user": "NATS_USER",
    "nats_password": "NATS_PASSWORD",
    "nats_token": "NATS_TOKEN",
    "nats_creds": "NATS_CREDS",
    "nats_nkey": "NATS_NKEY",
    "nats_tls_ca": "NATS_CA",
    "nats_tls_cert": "NATS_CERT",
    "nats_tls_key": "NATS_KEY",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LORA = LoraHyperparams()  # the LoRA defaults live there


class SettingsError(ValueError):
    """A setting has a value that cannot work."""


@dataclass(frozen=True)
class Settings:
    # where things live
    workspace: Path = Path(".")  # relative paths below resolve against it
    data_dir: Path = Path("data")
    training_dir: Path = Path("training")  # relative to data_dir
    config: Path = Path("config/models.json")
    watermark: Path = Path("~/.mindx/training/last_training.json")
    left_key: str = "brain.left"  # key path of the left-brain model in the config
    init_config: bool = False  # may a missing config be created (else: refused, a typo)
    keep_backups: int = 10
    keep_models: int = 3  # promoted models kept on the backend (rollback targets)

    # bus and backend
    nats: str | None = None  # None: start an embedded nats-server (user:password@ works)
    # how to authenticate with `nats` (an embedded server uses its own keys, see nats_auth)
    nats_user: str | None = None
    nats_password: str | None = field(default=None, repr=False)
    nats_token: str | None = field(default=None, repr=False)
    nats_creds: Path | None = None  # a .creds file (user JWT and nkey seed)
    nats_nkey: Path | None = None  # an nkey seed file
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    nats_inbox_prefix: str | None = None  # None: `_INBOX.<public key>` with an nkey, else _INBOX
    memory_retention_days: float = MEMORY_RETENTION_DAYS  # how long the stream keeps a point
    # copies of every stream and bucket on a NATS cluster's nodes (3 survives losing one);
    # 1 on a single server
    stream_replicas: int = 1
    backend: Backend = "ollama"
    ollama: str = "http://127.0.0.1:11434"
    # per try of an Ollama request (4 tries); generous: create and CPU chats are slow
    ollama_timeout_s: float = 600.0
    model: str | None = None  # base model; None: the backend's default
    embed_model: str | None = None  # None: the backend's default

    # the run
    mode: Mode = "message"
    min_corpus: int = 50
    max_pairs: int = 1000  # quality-score cap on the filtered set
    max_examples: int = 50  # few-shot messages baked into a message-mode model
    example_budget_chars: int = 6000  # baked examples must leave room in the context window
    max_chars: int = 2000  # longest prompt/completion kept (truncated on characters)
    dedupe_threshold: float = 0.9
    held_out: int = 20  # validation cases
    held_out_fraction: float = 0.2  # upper bound when the corpus is small
    similarity_threshold: float = 0.7
    min_effect: float = 0.0  # promote only if the CI's lower bound exceeds this
    bootstrap_samples: int = 2000
    max_error_rate: float = 0.25  # more scoring errors than this fails the run
    validation_concurrency: int = 4  # cases the trainer scores at once when no validator runs
    validation_timeout_s: float = 120.0  # no result for this long: the missing cases again
    # cases one validator scores at once (their chats run together, their embeddings are one
    # call); a run's cases spread over the validators by this, so it sets how they scale
    validator_concurrency: int = 5
    # how the app (the Brain) calls its model; validation asks both models the same way
    app_system_prompt: str | None = None  # None: the app sends none, the model's SYSTEM applies
    app_options: dict[str, Any] = field(default_factory=dict)  # Ollama options, e.g. temperature
    system_prompt: str = (
        "You are the user's personal assistant. Answer the way the example conversations do: "
        "same language, tone and level of detail."
    )
    temperature: float = 0.0
    seed: int = 42
    config_wait_s: float = 30.0  # how long a run waits for the config updater's answer
    run_timeout_s: float | None = None  # a run's deadline; None: by mode (run_deadline_s)

    # LoRA: the names are the flags' and MINDX_* variables'; lora_hyperparams() maps them
    epochs: int = _LORA.epochs
    batch_size: int = _LORA.batch_size
    learning_rate: float = _LORA.learning_rate
    max_length: int = _LORA.max_length
    lora_rank: int = _LORA.rank
    lora_alpha: int = _LORA.alpha
    target_modules: tuple[str, ...] = _LORA.target_modules
    time_budget_s: float | None = _LORA.time_budget_s
    base_weights: str | None = None
    export: ExportMode = _LORA.export

    # service behaviour
    max_deliver: int = 5
    log_level: str = "WARNING"  # of mindx's own loggers; a CLI's normal output stays clean

    extra: dict[str, Any] = field(default_factory=dict)

    # --- derived paths ----------------------------------------------------------------------
    def resolve(self, p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (self.workspace.expanduser() / p)

    @property
    def data_path(self) -> Path:
        return self.resolve(self.data_dir)

    @property
    def training_path(self) -> Path:
        t = self.training_dir.expanduser()
        return t if t.is_absolute() else self.data_path / t

    @property
    def lora_work_path(self) -> Path:
        """A LoRA worker's run dirs, one per run (its default work dir)."""
        return self.data_path / "lora-worker"

    @property
    def corpus_path(self) -> Path:
        return self.data_path / "corpus.sqlite3"

    @property
    def memory_path(self) -> Path:
        return self.data_path / "memory"

    @property
    def config_path(self) -> Path:
        return self.resolve(self.config)

    @property
    def watermark_path(self) -> Path:
        return self.resolve(self.watermark)

    @property
    def run_deadline_s(self) -> float:
        """How long a run may take before it is failed: `run_timeout_s`, else by mode.

        A message-mode run takes minutes even on a CPU (filter, 2 x held-out chats, one create):
        2 h is ample and still ends a hung server's run the same day. A LoRA run trains for its
        time budget, then exports and validates: the budget plus those 2 h; with no budget,
        CPU training of the defaults takes hours, so a day.
        """
        if self.run_timeout_s is not None:
            return self.run_timeout_s
        if self.mode == "lora":
            return (self.time_budget_s or 22 * 3600.0) + 2 * 3600.0
        return 2 * 3600.0

    @property
    def base_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_LOCAL_BASE if self.backend == "local" else DEFAULT_OLLAMA_BASE

    @property
    def embedding_model(self) -> str:
        if self.embed_model:
            return self.embed_model
        return DEFAULT_LOCAL_EMBED_MODEL if self.backend == "local" else DEFAULT_OLLAMA_EMBED_MODEL

    def cases_in_flight(self, cases: int) -> int:
        """Cases of one model the trainer scores at once in its own process. The local backend
        generates concurrent greedy chats of a model as one batch, where fewer at once only make
        smaller batches: there, all of them; elsewhere `validation_concurrency`."""
        if self.backend == "local":
            return max(self.validation_concurrency, cases)
        return self.validation_concurrency

    def validator_slots(self) -> int:
        """Cases one validator scores at once: `validator_concurrency`, and with the local
        backend at least a run's cases of one model (`held_out`), so that they batch."""
        if self.backend == "local":
            return max(self.validator_concurrency, self.held_out)
        return self.validator_concurrency

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> Settings:
        """Flags (None values ignored) over environment over defaults."""
        env = dict(os.environ if env is None else env)
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"MINDX_{f.name.upper()}")
            if raw is None and f.name in _ENV_ALIASES:
                raw = env.get(_ENV_ALIASES[f.name])
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, hints[f.name])
        for name, value in (flags or {}).items():
            if value is None or name not in hints or name == "extra":
                continue
            values[name] = _coerce(name, value, hints[name]) if isinstance(value, str) else value
        if "ollama" in values:
            values["ollama"] = normalize_ollama_host(values["ollama"])
        return cls(**values)

    def __repr__(self) -> str:
        # Settings are logged: never a password or token, in a field or in the NATS URL.
        shown = []
        for f in fields(self):
            if f.repr:
                value = getattr(self, f.name)
                if f.name == "nats" and value:
                    value = redact_url(value)
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like any other Settings."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        self.check()  # every way of making Settings (load, replace, direct) is validated

    def check(self) -> None:
        """Raise SettingsError naming the first value that cannot work."""
        for ok, message in self._rules():
            if not ok:
                raise SettingsError(message)

    def _rules(self) -> list[tuple[bool, str]]:
        def at_least(name: str, low: float) -> tuple[bool, str]:
            value = getattr(self, name)
            return value >= low, f"{name} must be >= {low}, got {value}"

        def within(name: str, ok: bool, bounds: str) -> tuple[bool, str]:
            return ok, f"{name} must be in {bounds}, got {getattr(self, name)}"

        def one_of(name: str, allowed: tuple[Any, ...]) -> tuple[bool, str]:
            value = getattr(self, name)
            return value in allowed, f"{name} must be one of {allowed}, got {value!r}"

        return [
            one_of("backend", get_args(Backend)),
            one_of("mode", get_args(Mode)),
            one_of("export", get_args(ExportMode)),
            (
                str(self.log_level).upper() in LOG_LEVELS,
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}",
            ),
            at_least("keep_backups", 1),
            at_least("keep_models", 1),
            within("memory_retention_days", self.memory_retention_days > 0, "(0, inf)"),
            within("stream_replicas", 1 <= self.stream_replicas <= 5, "[1, 5]"),
            (
                self.nats is None or any(u.strip() for u in self.nats.split(",")),
                "nats must name at least one URL (several: comma-separated)",
            ),
            at_least("min_corpus", 1),
            at_least("max_pairs", 1),
            at_least("max_examples", 1),
            at_least("example_budget_chars", 1),
            at_least("max_chars", 1),
            within("dedupe_threshold", 0.0 < self.dedupe_threshold <= 1.0, "(0, 1]"),
            at_least("held_out", 1),
            within("held_out_fraction", 0.0 < self.held_out_fraction < 1.0, "(0, 1)"),
            within("similarity_threshold", 0.0 < self.similarity_threshold <= 1.0, "(0, 1]"),
            # any finite effect works: one above the score scale is a gate that never opens
            (math.isfinite(self.min_effect), f"min_effect must be finite, got {self.min_effect}"),
            at_least("bootstrap_samples", 100),  # fewer cannot place a 95% interval's tails
            within("max_error_rate", 0.0 <= self.max_error_rate <= 1.0, "[0, 1]"),
            at_least("validation_concurrency", 1),
            at_least("validator_concurrency", 1),
            within("validation_timeout_s", self.validation_timeout_s > 0, "(0, inf)"),
            at_least("temperature", 0.0),
            within("config_wait_s", self.config_wait_s > 0, "(0, inf)"),
            within("ollama_timeout_s", self.ollama_timeout_s > 0, "(0, inf)"),
            within(
                "run_timeout_s",
                self.run_timeout_s is None or self.run_timeout_s > 0,
                "(0, inf) or unset",
            ),
            at_least("epochs", 1),
            at_least("batch_size", 1),
            within("learning_rate", self.learning_rate > 0, "(0, inf)"),
            at_least("max_length", 2),  # a prompt token and a reply token
            at_least("lora_rank", 1),
            within("lora_alpha", self.lora_alpha > 0, "(0, inf)"),
            (bool(self.target_modules), "target_modules must name at least one module"),
            within(
                "time_budget_s",
                self.time_budget_s is None or self.time_budget_s > 0,
                "(0, inf) or unset",
            ),
            at_least("max_deliver", 1),
            (
                isinstance(self.app_options, dict)
                and all(isinstance(k, str) for k in self.app_options),
                f"app_options must be a JSON object, got {self.app_options!r}",
            ),
            *((False, problem) for problem in self.nats_auth().problems()),
        ]

    def nats_auth(self) -> NatsAuth:
        """The connection options for `nats` (the one place setting names map to them)."""
        return NatsAuth(
            user=self.nats_user,
            password=self.nats_password,
            token=self.nats_token,
            creds=self.nats_creds,
            nkey=self.nats_nkey,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
            inbox_prefix=self.nats_inbox_prefix,
        )

    def lora_hyperparams(self) -> LoraHyperparams:
        """The LoRA job these settings ask for (the one place setting names map to job names)."""
        return LoraHyperparams(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            target_modules=tuple(self.target_modules),
            time_budget_s=self.time_budget_s,
            seed=self.seed,
            export=self.export,
        )


def normalize_ollama_host(value: str) -> str:
    """OLLAMA_HOST rules: no scheme → http, port 11434; scheme without port → 80/443."""
    v = value.strip().strip("\"'").rstrip("/")
    if "://" not in v:
        scheme, rest = "http", v
        default_port = 11434
    else:
        scheme, rest = v.split("://", 1)
        default_port = 443 if scheme == "https" else 80
    hostport, _, path = rest.partition("/")
    if hostport.startswith(":"):
        hostport = "127.0.0.1" + hostport
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, str(default_port)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    args = [a for a in get_args(typ) if a is not type(None)]
    base = args[0] if args and typ.__class__.__name__ == "UnionType" else typ
    try:
        if base is Path or (args and Path in args):
            return Path(raw)
        if base is bool:
            return str(raw).lower() in ("1", "true", "yes", "on")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if getattr(base, "__origin__", None) is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if getattr(base, "__origin__", None) is tuple or base is tuple:
            return tuple(x.strip() for x in str(raw).split(",") if x.strip())
        if getattr(typ, "__origin__", None) is Literal:
            if raw not in get_args(typ):
                raise SettingsError(f"{name} must be one of {get_args(typ)}, got {raw!r}")
            return raw
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        kind = "a JSON object" if getattr(base, "__origin__", None) is dict else typ
        raise SettingsError(f"{name}: cannot read {raw!r} as {kind}") from exc
    return raw
