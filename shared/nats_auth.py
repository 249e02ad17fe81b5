"""Who may do what on the bus: the roles, their NATS permissions, and the server's auth config.

Every permission is derived from shared.subjects (streams, durable consumers, subjects), so a
new consumer or stream is granted in one place. A role may publish and subscribe only to what
its components really use, plus the JetStream API subjects behind them. Each identity gets a
private inbox, `_INBOX.<its public key>`, and may subscribe only there: with the usual
`_INBOX.>` any client could read the replies of every other one, including the memory points a
pull consumer is sent.

`auth_config` renders an `authorization { users = [...] }` block of nkey users that a real
nats-server loads with `-c`; it sets no port and no store, so command-line flags set those.
`init_auth_dir` writes that config and one seed file per role.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from shared.files import PRIVATE_DIR, PRIVATE_FILE, ensure_private_dir
from shared.subjects import (
    COLLECTOR,
    CONFIG_ROLLBACK,
    CONFIG_UPDATER,
    FORGETTER,
    LORA_DONE,
    LORA_JOBS,
    LORA_OBJECT_BUCKET,
    LORA_WORKER,
    MEMORY_POINT_CREATED,
    MEMORY_POINT_DELETED,
    MODEL_ROLLBACK_REQUESTED,
    MODEL_UPDATE_FAILED,
    MODEL_UPDATED,
    MODEL_VALIDATED,
    MODELS,
    RUNS,
    STATUS,
    STREAMS,
    TRAINER,
    TRAINING_COMPLETED,
    TRAINING_FAILED,
    TRAINING_PROGRESS,
    TRAINING_REQUESTED,
    TRAINING_STARTED,
    VALIDATION_CASE,
    VALIDATION_RESULT,
    VALIDATOR,
    BucketSpec,
    ConsumerSpec,
    dead_letter_subject,
)

Role = Literal["service", "validator", "lora-worker", "memory", "brain", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)

ROLE_PURPOSE: dict[Role, str] = {
    "service": "every component in one process (collector, trainer, validator, config-updater, "
    "lora-worker)",
    "validator": "a remote validator: pulls validation.case.* from the validators work queue and "
    "publishes validation.result.*, for runs whose record (read only) says they are running",
    "lora-worker": "a remote LoRA worker: consumes lora.jobs, moves run files through the "
    "object store, announces lora.done",
    "memory": "the app's memory: publishes memory points (created, updated, deleted) only",
    "brain": "the app's brain: reads model.updated and training events, publishes nothing",
    "operator": "a person: requests runs and rollbacks, reads run events, stream status, the "
    "services' status and dead letters, purges dead letters",
}

CONFIG_FILE = "nats-server.conf"
SEED_SUFFIX = ".nk"
INBOX = "_INBOX"

# The points the app's memory publishes; the MEMORY stream captures memory.> .
MEMORY_POINT_SUBJECTS = (
    MEMORY_POINT_CREATED,
    MEMORY_POINT_CREATED.rsplit(".", 1)[0] + ".updated",
    MEMORY_POINT_DELETED,
)
_JS = "$JS.API"


def inbox_prefix(public_key: str) -> str:
    """The private inbox of one nkey identity (replies, pull deliveries, object chunks)."""
    return f"{INBOX}.{public_key}"


# --- permissions: building blocks -------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    """What a NATS user may publish and subscribe to (NATS wildcards); nothing else."""

    publish: frozenset[str] = frozenset()
    subscribe: frozenset[str] = frozenset()
    # may answer a request it received, on the request's reply subject, once
    allow_responses: bool = False

    def __or__(self, other: Permissions) -> Permissions:
        return Permissions(
            self.publish | other.publish,
            self.subscribe | other.subscribe,
            self.allow_responses or other.allow_responses,
        )


def _pub(*subjects: str) -> Permissions:
    return Permissions(publish=frozenset(subjects))


def _sub(*subjects: str) -> Permissions:
    return Permissions(subscribe=frozenset(subjects))


def _union(parts: Iterable[Permissions]) -> Permissions:
    out = Permissions()
    for part in parts:
        out = out | part
    return out


def publish(*subjects: str) -> Permissions:
    """Publish (core, or JetStream: its ack comes back on the publisher's own inbox)."""
    return _pub(*subjects)


def listen(*subjects: str) -> Permissions:
    """Core subscriptions (events, the answers a publish waits for)."""
    return _sub(*subjects)


def manage_streams() -> Permissions:
    """Create every stream of STREAMS, or update its config."""
    return _union(
        _pub(f"{_JS}.STREAM.CREATE.{s.name}", f"{_JS}.STREAM.UPDATE.{s.name}") for s in STREAMS
    )


def stream_status() -> Permissions:
    """Read every stream's config and state."""
    return _union(_pub(f"{_JS}.STREAM.INFO.{s.name}") for s in STREAMS)


def durable_consumer(spec: ConsumerSpec) -> Permissions:
    """Create, read and pull from one durable, ack its messages and dead-letter them."""
    s, d = spec.stream, spec.durable
    return _pub(
        f"{_JS}.CONSUMER.CREATE.{s}.{d}.{spec.subject}",
        f"{_JS}.CONSUMER.INFO.{s}.{d}",
        f"{_JS}.CONSUMER.MSG.NEXT.{s}.{d}",
        f"$JS.ACK.{s}.{d}.>",  # ack, nak, in-progress, term
        dead_letter_subject(spec.subject),
    )


def object_store(bucket: str) -> Permissions:
    """Create, write and read one object-store bucket."""
    stream = f"OBJ_{bucket}"
    return _pub(
        f"{_JS}.STREAM.INFO.{stream}",
        f"{_JS}.STREAM.CREATE.{stream}",
        f"{_JS}.STREAM.NAMES",  # a read finds the bucket's stream by subject
        f"{_JS}.STREAM.PURGE.{stream}",  # replacing an object drops its old chunks
        f"{_JS}.STREAM.MSG.GET.{stream}",
        f"{_JS}.DIRECT.GET.{stream}.>",
        f"{_JS}.CONSUMER.CREATE.{stream}",  # a read is an ordered, ephemeral consumer
        f"{_JS}.CONSUMER.CREATE.{stream}.>",
        f"{_JS}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",  # its flow control
        f"$O.{bucket}.>",  # chunks and metadata
    )


def run_records(bucket: BucketSpec, *, write: bool) -> Permissions:
    """Read (and with `write`, create and put) one key-value bucket of records."""
    stream = f"KV_{bucket.name}"
    read = _pub(f"{_JS}.STREAM.INFO.{stream}", f"{_JS}.STREAM.MSG.GET.{stream}")
    if not write:
        return read
    return read | _pub(f"{_JS}.STREAM.CREATE.{stream}", f"$KV.{bucket.name}.>")


def read_dead_letters() -> Permissions:
    """List the DLQ stream: a short-lived consumer of its own, fetched and deleted."""
    dlq = next(s.name for s in STREAMS if s.subjects == [dead_letter_subject(">")])
    return _pub(
        f"{_JS}.STREAM.INFO.{dlq}",
        f"{_JS}.CONSUMER.CREATE.{dlq}.*.>",
        f"{_JS}.CONSUMER.MSG.NEXT.{dlq}.*",
        f"{_JS}.CONSUMER.DELETE.{dlq}.*",
    )


def manage_dead_letters() -> Permissions:
    """Remove dead letters: one by one (after a replay), or all of a subject (a purge)."""
    dlq = next(s.name for s in STREAMS if s.subjects == [dead_letter_subject(">")])
    return read_dead_letters() | _pub(f"{_JS}.STREAM.MSG.DELETE.{dlq}", f"{_JS}.STREAM.PURGE.{dlq}")


def answer_status() -> Permissions:
    """Answer `mindx.status` (every process does: no queue group)."""
    return Permissions(subscribe=frozenset({STATUS}), allow_responses=True)


# --- what each component does on the bus -----------------------------------------------------

_PROGRESS = f"{TRAINING_PROGRESS}.*"
_LORA_DONE = f"{LORA_DONE}.*"
_RUN_EVENTS = (TRAINING_STARTED, TRAINING_COMPLETED, TRAINING_FAILED, _PROGRESS)
_MODEL_ANSWERS = (MODEL_UPDATED, MODEL_UPDATE_FAILED)

# a late copy of a forgotten point is erased from the stream
COLLECTOR_PERMS = durable_consumer(COLLECTOR) | _pub(f"{_JS}.STREAM.MSG.DELETE.{COLLECTOR.stream}")
# a validator serves only cases of runs in progress: it reads the trainer's run records
VALIDATOR_PERMS = (
    durable_consumer(VALIDATOR) | publish(f"{VALIDATION_RESULT}.*") | run_records(RUNS, write=False)
)
CONFIG_UPDATER_PERMS = (
    durable_consumer(CONFIG_UPDATER)
    # one rollback durable per config, named after its path (subjects.config_rollback)
    | durable_consumer(replace(CONFIG_ROLLBACK, durable="*"))
    | publish(*_MODEL_ANSWERS)
    | run_records(RUNS, write=False)  # a model.validated is checked against its run's record
    | run_records(MODELS, write=True)  # marks a model promoted, prunes old ones
)
DLQ_NAME = next(s.name for s in STREAMS if s.subjects == [dead_letter_subject(">")])
# forgetting: its own durable, and the erasure of a point's messages wherever they are kept
FORGETTER_PERMS = (
    durable_consumer(FORGETTER)
    | _union(
        _pub(f"{_JS}.STREAM.MSG.GET.{s}", f"{_JS}.STREAM.MSG.DELETE.{s}")
        for s in ("MEMORY", "TRAINING", VALIDATOR.stream, DLQ_NAME, f"OBJ_{LORA_OBJECT_BUCKET}")
    )
    | publish(*_MODEL_ANSWERS, TRAINING_REQUESTED)  # the switch away, the retrain
    | publish(MEMORY_POINT_DELETED)  # `dlq replay` of a deletion that kept failing
    | run_records(MODELS, write=True)  # the retired models' lineage
)
LORA_WORKER_PERMS = (
    durable_consumer(LORA_WORKER)
    | publish(_LORA_DONE, _PROGRESS)
    | object_store(LORA_OBJECT_BUCKET)
)
TRAINER_PERMS = (
    durable_consumer(TRAINER)
    | publish(*_RUN_EVENTS, MODEL_VALIDATED, LORA_JOBS, f"{VALIDATION_CASE}.*")
    | listen(*_MODEL_ANSWERS, _LORA_DONE, f"{VALIDATION_RESULT}.*")  # the answers it waits for
    # whether a validator is pulling (else it scores in-process), and a run's leftover cases
    | _pub(f"{_JS}.CONSUMER.INFO.{VALIDATOR.stream}.{VALIDATOR.durable}")
    | _pub(f"{_JS}.STREAM.PURGE.{VALIDATOR.stream}")
    | object_store(LORA_OBJECT_BUCKET)
    | run_records(RUNS, write=True)
    | run_records(MODELS, write=True)  # each created model's lineage
)
# `train --run-once`, `memory import` and `rollback` also act as a client of the service they run
LOCAL_CLIENT_PERMS = publish(
    MEMORY_POINT_CREATED, TRAINING_REQUESTED, MODEL_ROLLBACK_REQUESTED
) | listen(TRAINING_COMPLETED, TRAINING_FAILED, _PROGRESS, *_MODEL_ANSWERS)

ROLE_PERMISSIONS: dict[Role, Permissions] = {
    "service": (
        manage_streams()
        | answer_status()
        | listen(*_RUN_EVENTS)  # a process with the trainer follows the runs for its status
        | manage_dead_letters()  # `dlq replay` re-publishes what its components consume
        | stream_status()
        | COLLECTOR_PERMS
        | TRAINER_PERMS
        | VALIDATOR_PERMS
        | CONFIG_UPDATER_PERMS
        | LORA_WORKER_PERMS
        | FORGETTER_PERMS
        | LOCAL_CLIENT_PERMS
    ),
    "validator": VALIDATOR_PERMS | answer_status(),
    "lora-worker": LORA_WORKER_PERMS | answer_status(),
    "memory": publish(*MEMORY_POINT_SUBJECTS),
    "brain": listen(MODEL_UPDATED, "training.>"),
    "operator": (
        publish(TRAINING_REQUESTED, MODEL_ROLLBACK_REQUESTED, MEMORY_POINT_DELETED)  # `forget`
        | listen(*_RUN_EVENTS, *_MODEL_ANSWERS)
        | stream_status()
        | manage_dead_letters()
        | run_records(MODELS, write=False)  # `mindx models`
        | publish(STATUS)  # ask who is running; the answers come to its own inbox
    ),
}


def permissions(role: Role, public_key: str) -> Permissions:
    """Everything the user `public_key` of `role` may do: the role's own, and its inbox."""
    if role not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return ROLE_PERMISSIONS[role] | listen(f"{inbox_prefix(public_key)}.>")


# --- the server config ------------------------------------------------------------------------


def _allow(items: frozenset[str]) -> str:
    # An empty allow list would mean no limit at all: deny everything instead.
    if not items:
        return '{ deny: [">"] }'
    return "{ allow: [" + ", ".join(json.dumps(s) for s in sorted(items)) + "] }"


def auth_config(users: Mapping[Role, str]) -> str:
    """An `authorization` block for nats-server: one nkey user per role (role → public key).

    Everything a role is not allowed is denied; the config sets no port, host or store.
    """
    lines = [
        "# mindx roles: one nkey user each, allowed exactly what its components do on the bus.",
        "# Load with: nats-server -js -c nats-server.conf [-p PORT] [-sd STORE]",
        "authorization {",
        "  users = [",
    ]
    for role, key in users.items():
        perms = permissions(role, key)
        lines += [
            f"    # {role}: {ROLE_PURPOSE[role]}",
            "    {",
            f"      nkey: {json.dumps(key)}",
            "      permissions: {",
            f"        publish: {_allow(perms.publish)}",
            f"        subscribe: {_allow(perms.subscribe)}",
        ]
        if perms.allow_responses:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


# --- keys and the auth dir --------------------------------------------------------------------


def new_user_seed() -> bytes:
    """A fresh nkey user seed (`SU...`)."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key (`U...`) of an nkey seed; nkeys.ErrInvalidSeed when it is not one."""
    import nkeys

    kp = nkeys.from_seed(bytearray(seed.strip()))
    try:
        return bytes(kp.public_key).decode()
    finally:
        kp.wipe()


@dataclass(frozen=True)
class AuthDir:
    """A directory written by `init_auth_dir`: the server config and a seed file per role."""

    path: Path
    roles: tuple[Role, ...] = field(default=ROLES)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    def seed_file(self, role: Role) -> Path:
        return self.path / f"{role}{SEED_SUFFIX}"

    def exists(self) -> bool:
        return self.config.is_file()


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def init_auth_dir(directory: Path) -> AuthDir:
    """Write `directory/nats-server.conf` and `<role>.nk` for each role (0600, dir 0700).

    Refuses (FileExistsError) when the directory already holds a config: its seeds may be in use.
    The files appear all at once: they are written into a private temp dir that is renamed.
    """
    directory = Path(directory)
    auth = AuthDir(directory)
    if auth.exists():
        raise FileExistsError(f"{auth.config} exists; keys are never replaced")
    ensure_private_dir(directory.parent)  # usually the data dir: made private, as everywhere
    tmp = directory.parent / f".{directory.name}.{os.getpid()}.tmp"
    tmp.mkdir(mode=PRIVATE_DIR)
    try:
        os.chmod(tmp, PRIVATE_DIR)  # whatever the umask
        keys: dict[Role, str] = {}
        for role in ROLES:
            seed = new_user_seed()
            _write_new(tmp / f"{role}{SEED_SUFFIX}", seed + b"\n")
            keys[role] = public_key(seed)
        _write_new(tmp / CONFIG_FILE, auth_config(keys).encode())
        _move_into_place(tmp, directory)
    except BaseException:
        for f in tmp.glob("*") if tmp.exists() else ():
            f.unlink()
        if tmp.exists():
            tmp.rmdir()
        raise
    return auth


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory` (an empty one is replaced); FileExistsError if it has files."""
    try:
        os.rename(tmp, directory)  # atomic; replaces only an empty directory
    except OSError as exc:
        if directory.is_dir() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty; choose an empty or new one") from exc
        raise


def ensure_auth_dir(directory: Path) -> AuthDir:
    """The auth dir at `directory`, written on first use (several processes may race: one
    writes it, the others use what it wrote)."""
    auth = AuthDir(Path(directory))
    if auth.exists():
        return auth
    try:
        return init_auth_dir(directory)
    except FileExistsError:
        if auth.exists():
            return auth
        raise
