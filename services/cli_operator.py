"""The operator's commands: `doctor`, `status`, `watch`, `forget`, `dlq replay|purge`. Flags,
one call (services.app, services.operator) and the rendering (services.cli_render)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from services import app, operator
from services.cli_render import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_RUN_FAILED,
    ProgressBars,
    PullBars,
    checks_text,
    status_text,
)
from services.operator import STATUS_WAIT_S
from shared.messages import TrainingProgress
from shared.settings import Settings

Common = Callable[[argparse.ArgumentParser], None]


def add_commands(sub: Any, dlq: Any, common: Common) -> None:
    """Add the operator's commands to `mindx`'s subparsers (`dlq`: those of `mindx dlq`)."""
    p = sub.add_parser(
        "doctor",
        help="check the config, the memory, the backend and both models; exit 0 when all is well",
    )
    common(p)
    p.add_argument(
        "--pull",
        action="store_true",
        help="pull a missing base or embedding model (default: only report it)",
    )
    p.add_argument(
        "--init-config",
        dest="init_config",
        action="store_true",
        default=None,
        help="a config that does not exist is fine: it is created on the first switch "
        "(default: report it as a failure) [MINDX_INIT_CONFIG]",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "status",
        help="the bus, the services alive, the left model, the runs, the corpus, dead letters",
    )
    common(p)
    p.add_argument(
        "--wait",
        type=float,
        default=STATUS_WAIT_S,
        metavar="S",
        help="how long to collect the services' answers",
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", help="follow a run's progress live until it ends")
    common(p)
    p.add_argument(
        "run_id", nargs="?", help="the run to follow (default: the newest run in progress)"
    )
    p.add_argument("--json", action="store_true", help="print the run's end as JSON")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "forget",
        help="forget memory points everywhere: corpus, streams, run files, models "
        "(publishes memory.point.deleted)",
    )
    common(p)
    p.add_argument(
        "ids", nargs="+", type=point_id, metavar="ID", help="the memory points' ids (int64)"
    )
    p.set_defaults(func=cmd_forget)

    q = dlq.add_parser(
        "replay",
        help="re-publish dead letters to their original subject and remove them",
    )
    common(q)
    q.add_argument(
        "--subject",
        help="only the dead letters of this original subject; wildcards work (default: all)",
    )
    q.set_defaults(func=cmd_dlq_replay)
    q = dlq.add_parser("purge", help="remove dead letters for good (asks for --yes)")
    common(q)
    q.add_argument(
        "--subject",
        help="only the dead letters of this original subject; wildcards work (default: all)",
    )
    q.add_argument(
        "--yes", action="store_true", help="remove them (default: only say how many there are)"
    )
    q.set_defaults(func=cmd_dlq_purge)


def point_id(text: str) -> int:
    """A memory point id: a signed 64-bit integer, as `memory.point.created` carries it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer id") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is outside the 64-bit range of point ids")
    return value


async def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    done = await app.forget(settings, args.ids)
    ids = " ".join(str(i) for i in done.ids)
    if done.done:
        print(f"forgot memory point(s) {ids} in {done.seconds:.2f} s")
    else:
        print(f"asked the forgetter to forget memory point(s) {ids} (memory.point.deleted)")
    return EXIT_OK


async def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    pulls = PullBars()  # on stderr, with --json too: a pull can take minutes
    try:
        checks = await app.doctor(settings, pull=bool(args.pull), on_pull=pulls.update)
    finally:
        pulls.close()
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], ensure_ascii=False, indent=2))
    else:
        print(checks_text(checks))
    return EXIT_ERROR if any(c.level == "fail" for c in checks) else EXIT_OK


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    st = (await operator.status(settings, wait=args.wait)).as_dict()
    if args.json:
        print(json.dumps(st, ensure_ascii=False, indent=2))
    else:
        print(status_text(st, now=datetime.now(UTC)))
    return EXIT_OK


async def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    bars = ProgressBars()

    def progress(ev: TrainingProgress) -> None:
        bars.update(ev)

    try:
        finished = await operator.watch(settings, args.run_id, progress)
    finally:
        bars.close()
    if args.json:
        print(json.dumps(msgspec.to_builtins(finished), ensure_ascii=False, indent=2))
    else:
        reason = finished.report.get("decision_reason") or finished.report.get("error")
        line = f"run {finished.run_id}: {finished.status}" + (f" ({reason})" if reason else "")
        print(line + (f"; report: {finished.report_path}" if finished.report_path else ""))
    return EXIT_RUN_FAILED if finished.status in ("failed", "success_config_failed") else EXIT_OK


async def cmd_dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    done = await operator.dlq_replay(settings, args.subject)
    for entry, why in done.kept:
        print(f"kept {entry.subject} #{entry.seq}: {why}", file=sys.stderr)
    print(f"replayed {len(done.replayed)} dead letter(s); {len(done.kept)} kept")
    return EXIT_RUN_FAILED if done.kept else EXIT_OK


async def cmd_dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    removed = await operator.dlq_purge(settings, args.subject, yes=bool(args.yes))
    of = f" of {args.subject}" if args.subject else ""
    print(f"removed {removed} dead letter(s){of}" if removed else f"no dead letters{of}")
    return EXIT_OK
