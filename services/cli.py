"""`mindx`: the command line over the services.

Each command resolves one Settings object (flags > env > defaults), connects to the bus (an
embedded nats-server when none is given) and calls library code. Expected failures (bad settings,
an unreachable server, a missing file) print one line `mindx <command>: <message>` and exit 2;
`--debug` (or MINDX_DEBUG=1) adds the traceback. Anything else is a bug: its traceback is always
printed. `--log-level` sets the level of mindx's own loggers (default WARNING).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from services import app, cli_operator, operator
from services.app import UserFacingError
from services.cli_render import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_RUN_FAILED,
    ProgressBars,
    PullBars,
    bus_lines,
    show_defaults,
    warn,
)
from services.status import mindx_version
from shared.messages import RunReport, TrainingProgress
from shared.settings import DEFAULT_LOCAL_EMBED_MODEL, DEFAULT_OLLAMA_EMBED_MODEL, Settings

log = logging.getLogger("mindx")


# --- argument parsing ---------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--workspace", help="directory that relative paths resolve against")
    g.add_argument("--data-dir", dest="data_dir", help="data directory (default: data)")
    g.add_argument("--config", help="app model config (default: config/models.json)")
    g.add_argument("--training-dir", dest="training_dir", help="run files (default: training)")
    g.add_argument("--watermark", help="last-train-time file (relative: to --workspace)")
    g.add_argument(
        "--nats",
        help="NATS URL, user:password@ allowed; a cluster's nodes comma-separated "
        "(default: NATS_URL, else embedded)",
    )
    g.add_argument(
        "--stream-replicas",
        dest="stream_replicas",
        type=int,
        metavar="N",
        help="copies of each stream and bucket on a NATS cluster, 1-5; 3 survives losing a "
        "node; raising it updates existing streams (default: 1)",
    )
    _nats_flags(p)
    g.add_argument("--backend", choices=["ollama", "local"], help="model backend")
    g.add_argument("--ollama", help="Ollama URL (default: OLLAMA_HOST or 127.0.0.1:11434)")
    g.add_argument(
        "--embed-model",
        dest="embed_model",
        help=f"embedding model (default: {DEFAULT_OLLAMA_EMBED_MODEL}; "
        f"{DEFAULT_LOCAL_EMBED_MODEL} with --backend local)",
    )
    g.add_argument(
        "--log-level", dest="log_level", help="DEBUG, INFO, WARNING (default), ERROR, CRITICAL"
    )
    g.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also MINDX_DEBUG=1)"
    )
    g.add_argument(
        "-v", "--verbose", action="store_true", help="say which NATS server the command uses"
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--memory-retention",
        dest="memory_retention_days",
        type=float,
        metavar="DAYS",
        help="how long the MEMORY stream keeps a point (default: 30)",
    )
    lim.add_argument(
        "--keep-models",
        dest="keep_models",
        type=int,
        metavar="K",
        help="promoted models kept on the backend for rollback; older ones are pruned (default: 3)",
    )
    lim.add_argument(
        "--ollama-timeout",
        dest="ollama_timeout_s",
        type=float,
        metavar="S",
        help="seconds per try of an Ollama request, 4 tries (default: 600)",
    )
    lim.add_argument(
        "--run-timeout",
        dest="run_timeout_s",
        type=float,
        metavar="S",
        help="a run failing after this many seconds (default: 2 h; LoRA: time budget + 2 h, "
        "else 24 h)",
    )


def _nats_flags(p: argparse.ArgumentParser) -> None:
    """natscli's connection options; an embedded server uses its own keys instead."""
    g = p.add_argument_group("NATS connection (natscli's names; env in brackets)")
    g.add_argument("--nats-user", metavar="USER", help="user name [NATS_USER]")
    g.add_argument("--nats-password", metavar="PASSWORD", help="password [NATS_PASSWORD]")
    g.add_argument("--nats-token", metavar="TOKEN", help="token [NATS_TOKEN]")
    g.add_argument("--nats-creds", metavar="FILE", help="user JWT credentials file [NATS_CREDS]")
    g.add_argument("--nats-nkey", metavar="FILE", help="nkey seed file [NATS_NKEY]")
    g.add_argument("--nats-tls-ca", metavar="FILE", help="CA to verify the server [NATS_CA]")
    g.add_argument("--nats-tls-cert", metavar="FILE", help="client certificate [NATS_CERT]")
    g.add_argument("--nats-tls-key", metavar="FILE", help="client certificate key [NATS_KEY]")
    g.add_argument(
        "--nats-inbox-prefix",
        metavar="PREFIX",
        help="reply subjects' prefix (default: _INBOX.<public key> with an nkey, else _INBOX)",
    )


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-once", action="store_true", help="run one training and exit")
    p.add_argument("--mode", choices=["message", "lora"], help="training mode (default: message)")
    p.add_argument("--model", help="base model (default: qwen3:0.6b; smollm2:135m when local)")
    p.add_argument("--min-corpus", dest="min_corpus", type=int, help="minimum pairs (default: 50)")
    p.add_argument(
        "--since",
        help="count pairs that arrived after this RFC3339 time as new (default: since the "
        "corpus of the last promoted model); the run trains on the whole corpus either way",
    )
    p.add_argument("--force", action="store_true", help="run even below the corpus minimums")
    p.add_argument("--held-out", dest="held_out", type=int, help="validation cases (default: 20)")
    p.add_argument(
        "--min-effect",
        dest="min_effect",
        type=float,
        help="promote only when the 95%% CI's lower bound of the gain is above this",
    )
    p.add_argument(
        "--max-examples", dest="max_examples", type=int, help="few-shot examples (message mode)"
    )
    p.add_argument(
        "--validation-concurrency",
        dest="validation_concurrency",
        type=int,
        help="cases the trainer scores at once when no validator runs (default 4; with "
        "--backend local all of a model's cases: they batch)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    lg = p.add_argument_group("lora")
    lg.add_argument("--epochs", type=int, help="passes over the dataset")
    lg.add_argument("--batch-size", dest="batch_size", type=int, help="examples per step")
    lg.add_argument("--learning-rate", dest="learning_rate", type=float, help="AdamW's")
    lg.add_argument(
        "--max-length", dest="max_length", type=int, help="tokens per example (longer: cut)"
    )
    lg.add_argument("--lora-rank", dest="lora_rank", type=int, help="the adapter's rank")
    lg.add_argument("--lora-alpha", dest="lora_alpha", type=int, help="the adapter's alpha")
    lg.add_argument(
        "--time-budget",
        dest="time_budget_s",
        type=float,
        metavar="S",
        help="seconds of training at most (none: until the epochs are done)",
    )
    lg.add_argument(
        "--base-weights",
        dest="base_weights",
        help="GGUF path, HF dir or HF id (none: the weights the backend serves)",
    )
    lg.add_argument(
        "--export",
        choices=["auto", "adapter", "merged"],
        help="the GGUF to build the model from (auto: the adapter, else the merged model)",
    )


def _switch_flags(p: argparse.ArgumentParser) -> None:
    """Where a config updater or a trainer runs: a missing config, a missing model."""
    p.add_argument(
        "--no-pull",
        dest="no_pull",
        action="store_true",
        help="refuse to start when the base or embedding model is missing (default: pull it, "
        "with progress, as `ollama run` does)",
    )
    p.add_argument(
        "--init-config",
        dest="init_config",
        action="store_true",
        default=None,
        help="create the config if it does not exist (default: refuse: a missing config is "
        "usually a typo) [MINDX_INIT_CONFIG]",
    )


def _app_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation: call the models the way the app does")
    g.add_argument(
        "--app-system",
        dest="app_system_prompt",
        help="the system prompt the app sends (default: none; the model's SYSTEM applies)",
    )
    g.add_argument(
        "--app-options",
        dest="app_options",
        help="the Ollama options the app sends, as JSON (e.g. '{\"temperature\": 0.7}')",
    )
    g.add_argument(
        "--validator-concurrency",
        dest="validator_concurrency",
        type=int,
        help="cases a validator of this process scores at once (default 5; with --backend local "
        "at least --held-out: they batch)",
    )


class _Parser(argparse.ArgumentParser):
    """A mistyped command line is an expected error too: one line, exit 2 (argparse's own
    would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mindx", description="Personalize the local left-brain model from memory."
    )
    parser.add_argument("--version", action="version", version=f"mindx {mindx_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (a service, or one run with --run-once)")
    _common(p)
    _train_flags(p)
    _switch_flags(p)
    _app_flags(p)
    p.set_defaults(func=cmd_train)

    width = max(len(name) for name in COMPONENT_HELP)
    p = sub.add_parser(
        "serve",
        help="serve components: collector trainer validator ... | all",
        epilog="components:\n"
        + "\n".join(f"  {name:<{width}}  {what}" for name, what in COMPONENT_HELP.items())
        + f"\n  {'all':<{width}}  {' '.join(app.ALL)}",
    )
    _common(p)
    p.add_argument(
        "components",
        nargs="+",
        choices=[*app.COMPONENTS, "all"],
        metavar="COMPONENT",
        help="one or more of the components below, or all",
    )
    _switch_flags(p)
    _app_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("memory", help="memory points")
    msub = p.add_subparsers(dest="memory_command", required=True)
    q = msub.add_parser("import", help="publish memory points from .jsonl / .json files")
    _common(q)
    q.add_argument("files", nargs="+", type=Path, help="Memory's exports: .jsonl or .json")
    q.set_defaults(func=cmd_memory_import)

    p = sub.add_parser("corpus", help="the collected corpus")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    q = csub.add_parser("stats", help="points, pairs and pairs since the watermark")
    _common(q)
    q.add_argument("--json", action="store_true", help="print the counts as JSON")
    q.set_defaults(func=cmd_corpus_stats)

    p = sub.add_parser("rollback", help="restore a config backup and announce model.updated")
    _common(p)
    p.add_argument("--to", dest="to", help="backup file name (default: the newest)")
    p.add_argument("--json", action="store_true", help="print the model.updated event as JSON")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("backups", help="list config backups, newest first")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the backups as JSON")
    p.set_defaults(func=cmd_backups)

    p = sub.add_parser("models", help="the models runs created, with their lineage (* live)")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON array instead of the table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("dlq", help="dead-lettered messages")
    dsub = p.add_subparsers(dest="dlq_command", required=True)
    q = dsub.add_parser("list", help="list dead letters")
    _common(q)
    q.add_argument("--json", action="store_true", help="print them as JSON")
    q.set_defaults(func=cmd_dlq_list)

    cli_operator.add_commands(sub, dsub, _common)

    p = sub.add_parser("init", help="declare every stream on the bus, before any service runs")
    _common(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("schema", help="JSON Schema of every subject's payload, as one document")
    p.set_defaults(func=cmd_schema, debug=False)

    p = sub.add_parser("auth", help="NATS users for each role")
    asub = p.add_subparsers(dest="auth_command", required=True)
    q = asub.add_parser(
        "init", help="write DIR/nats-server.conf (an authorization block) and a seed per role"
    )
    q.add_argument("dir", type=Path, help="a new or empty directory (made 0700)")
    q.add_argument(
        "--keep-existing",
        action="store_true",
        help="when DIR already holds keys, keep them and succeed (default: refuse; "
        "keys are never replaced)",
    )
    q.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also MINDX_DEBUG=1)"
    )
    q.set_defaults(func=cmd_auth_init)

    p = sub.add_parser("report", help="summary of a run report (default: the latest)")
    _common(p)
    p.add_argument("run_id", nargs="?", help="the run (default: the latest)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_report)
    show_defaults(parser)
    return parser


COMPONENT_HELP = {
    "collector": "stores memory points in the corpus",
    "trainer": "runs the training requests",
    "validator": "answers validation cases (any number, anywhere)",
    "config-updater": "switches the app's config to a validated model, and rolls back",
    "forgetter": "forgets deleted memory points everywhere (corpus, streams, run files, models)",
    "lora-worker": "trains LoRA jobs (on a GPU machine; not part of all)",
}


# --- errors -----------------------------------------------------------------------------------


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can act on (a setting, a server, a path): one line, no traceback.
    Imported when needed, so `mindx --help` stays light."""
    from nats.errors import (
        AuthorizationError,
        ConnectionClosedError,
        NoServersError,
        StaleConnectionError,
    )

    from services.preflight import PreflightError
    from shared.backend import BackendError
    from shared.bus import BusError
    from shared.nats_server import NatsServerError
    from shared.settings import SettingsError

    return (
        UserFacingError,
        PreflightError,
        SettingsError,
        BackendError,
        BusError,
        NatsServerError,
        NoServersError,
        ConnectionClosedError,
        AuthorizationError,
        StaleConnectionError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
    )


def report_error(command: str, exc: BaseException, *, debug: bool) -> int:
    """Print a failure the way the CLI promises and return the exit code."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, expected_errors()):
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        for line in message.splitlines():  # several problems: one line each
            print(f"mindx {command}: {line}", file=sys.stderr)
        return EXIT_ERROR
    hint = f"mindx {command}: unexpected {type(exc).__name__}: {message} (a bug; traceback follows)"
    print(hint, file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return EXIT_ERROR


# --- commands: each one library call (services.app) and its rendering ----------------------------


async def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from services.report_render import summary_text

    if not args.run_once:
        return await _serve(settings, ["trainer"], args)

    def imported(result: app.Imported) -> None:
        for e in result.errors:
            print(f"skipped: {e}", file=sys.stderr)
        print(
            f"imported {result.published} memory points from {result.files} file(s)",
            file=sys.stderr,
        )

    bars = ProgressBars(enabled=not args.json)

    async def progress(ev: TrainingProgress) -> None:
        bars.update(ev)

    since = datetime.fromisoformat(args.since) if args.since else None
    pulls = PullBars()  # on stderr, with --json too: a pull can take minutes
    try:
        finished = await app.train_once(
            settings,
            force=bool(args.force),
            since=since,
            on_import=imported,
            on_progress=progress,
            checks=_checks(args, pulls),
        )
    finally:
        pulls.close()
        bars.close()
    report = msgspec.convert(finished.report, RunReport)
    if args.json:
        print(json.dumps(finished.report, ensure_ascii=False, indent=2))
    else:
        html = report.artifacts.get("report_html", "")
        print(summary_text(report, Path(html) if html else None))
    return EXIT_RUN_FAILED if report.status in ("failed", "success_config_failed") else EXIT_OK


def _checks(args: argparse.Namespace, pulls: PullBars) -> app.Checks:
    """The preflight of train and serve: pull (with progress) unless --no-pull; warnings shown."""
    command = command_name(args)
    return app.Checks(
        pull=not args.no_pull, on_pull=pulls.update, on_warning=lambda c: warn(command, c)
    )


async def _serve(settings: Settings, names: list[str], args: argparse.Namespace) -> int:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopped.set)
    pulls = PullBars()
    try:
        await app.serve_until(
            settings,
            names,
            stopped,
            ready=lambda line: print(line, file=sys.stderr),
            checks=_checks(args, pulls),
        )
    finally:
        pulls.close()
    return EXIT_OK


async def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return await _serve(settings, args.components, args)


async def cmd_memory_import(settings: Settings, args: argparse.Namespace) -> int:
    result = await app.import_memory(settings, args.files)
    for e in result.errors:
        print(f"skipped: {e}", file=sys.stderr)
    print(f"imported {result.published} memory points ({len(result.errors)} skipped)")
    return EXIT_RUN_FAILED if result.errors else EXIT_OK  # like cp: 1 when anything was left


async def cmd_corpus_stats(settings: Settings, args: argparse.Namespace) -> int:
    from services.memory_adapter import load_watermark
    from shared.corpus import Corpus

    with Corpus.open(settings.corpus_path) as corpus:
        stats = corpus.stats(load_watermark(settings.watermark_path))
        stats["withheld"] = sum(corpus.withheld().values())
    if args.json:
        print(json.dumps(stats))
    else:
        print(
            f"points {stats['points']}  pairs {stats['pairs']}  "
            f"pairs since watermark {stats['pairs_since_watermark']}  "
            f"points without pairs {stats['points_without_pairs']}  "
            f"withheld as sensitive {stats['withheld']}"
        )
    return EXIT_OK


async def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    outcome = await app.rollback(settings, args.to)
    if args.json:
        print(json.dumps(msgspec.to_builtins(outcome), ensure_ascii=False, indent=2))
        return EXIT_OK
    print(
        f"left brain in {outcome.config_path}: {outcome.previous_model} -> {outcome.model} "
        f"(restored {outcome.restored_from}; the replaced config is saved as {outcome.backup_path})"
    )
    return EXIT_OK


async def cmd_backups(settings: Settings, args: argparse.Namespace) -> int:
    from services.model_config import list_backups

    backups = list_backups(settings.config_path)
    if args.json:
        print(json.dumps([operator.backup_entry(b, settings.left_key) for b in backups], indent=2))
        return EXIT_OK
    if not backups:
        print(f"no backups of {settings.config_path}")
    for b in backups:
        print(b)
    return EXIT_OK


async def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from shared.names import same_model

    records, live = await app.models(settings)
    rows = [
        {**msgspec.to_builtins(r), "live": bool(live) and same_model(r.model, live or "")}
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no models created yet; live: {live or '—'}")
    for r, row in zip(records, rows, strict=True):
        print(
            f"{'*' if row['live'] else ' '} {r.model}  {r.status}  {r.mode}  "
            f"created {r.created_at:%Y-%m-%d %H:%M:%S}  {len(r.points)} points  "
            f"dataset {r.dataset_sha256[:12] or '—'}  from {r.base_model} {r.base_digest[:12]}"
        )
        why = r.retired_reason or r.decision
        if why:
            print(f"    {why}")
    return EXIT_OK


async def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    letters = await app.dead_letters(settings)
    rows = [
        {"subject": d.subject, "error": d.error, "data": d.data, "at": d.at.isoformat()}
        for d in letters
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    else:
        if not rows:
            print("no dead letters")
        for r in rows:
            print(f"{r['at']}  {r['subject']}  {r['error']}\n    {r['data'][:200]}")
    return EXIT_OK


async def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    url, streams = await app.init(settings)
    print(f"streams {', '.join(streams)} ready on {url}")
    return EXIT_OK


async def cmd_schema(settings: Settings, args: argparse.Namespace) -> int:
    from shared.subjects import contract_schema

    print(json.dumps(contract_schema(), indent=2, ensure_ascii=False))
    return EXIT_OK


async def cmd_auth_init(settings: Settings, args: argparse.Namespace) -> int:
    from shared.nats_auth import ROLE_PURPOSE, AuthDir, ensure_auth_dir, init_auth_dir

    if args.keep_existing and AuthDir(args.dir).exists():
        print(f"keeping the keys in {args.dir}")
        return EXIT_OK
    auth = ensure_auth_dir(args.dir) if args.keep_existing else init_auth_dir(args.dir)
    print(f"wrote {auth.config}")
    for role in auth.roles:
        print(f"  {auth.seed_file(role)}  {role}: {ROLE_PURPOSE[role]}")
    print(
        f"start the server with `nats-server -js -c {auth.config}`, and each component with "
        "--nats URL --nats-nkey <its role's seed file>"
    )
    return EXIT_OK


async def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from services.report import find_report, read_report
    from services.report_render import summary_text

    path = find_report(settings.training_path, args.run_id)
    report = read_report(path)
    if args.json:
        print(path.read_text())
        return EXIT_OK
    print(summary_text(report, path.with_suffix(".html")))
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------------


async def _cancellable(command: Coroutine[Any, Any, int]) -> int:
    """Run a command; SIGTERM cancels it like Ctrl-C, so an embedded server, open runs and
    services are closed on the way out."""
    task = asyncio.ensure_future(command)
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return 130


# mindx's own loggers; --log-level sets these, other libraries log warnings and worse
OWN_LOGGERS = ("mindx", "services", "shared", "training")


@contextlib.contextmanager
def log_level(level: str) -> Iterator[None]:
    """Our loggers at `level` for the duration of a command, on stderr unless the host process
    (a test runner) already routes logging; restored afterwards, so main() can run in-process."""
    value = logging.getLevelName(level.upper())
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    loggers = [root, *(logging.getLogger(name) for name in OWN_LOGGERS)]
    before = [lg.level for lg in loggers]
    root.setLevel(max(value, logging.WARNING))
    for lg in loggers[1:]:
        lg.setLevel(value)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)
        if handler is not None:
            root.removeHandler(handler)


_OFF = ("", "0", "false", "no", "off")  # MINDX_DEBUG values that leave debugging off


def command_name(args: argparse.Namespace) -> str:
    """`memory import`, `dlq list`, `train`: as the user typed it."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = command_name(args)
    debug = bool(args.debug) or os.environ.get("MINDX_DEBUG", "").lower() not in _OFF
    skip = ("func", "command", "debug", "verbose")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        settings = Settings.load(flags)
        with log_level(settings.log_level), bus_lines(command, getattr(args, "verbose", False)):
            log.debug("%s with %s", command, settings)
            return asyncio.run(_cancellable(args.func(settings, args)))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return report_error(command, exc, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
