"""The operator's commands: `doctor`, `status`, `watch`, `dlq replay|purge`. Flags, one library
call (services.app, services.operator) and the rendering (services.cli_render)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from services import app
from services.cli_render import EXIT_ERROR, EXIT_OK, PullBars, checks_text
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
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)


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
