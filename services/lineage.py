"""Model lineage: what each created model is made of, where every component can read it.

The record (`shared.messages.ModelLineage`) lives in the bucket `mindx-models` under the run id,
and as `lineage_<run_id>.json` (0600: it names memory points) beside the run's other files. The
trainer writes it when it creates a model and when the gate rejects one; the config updater when
it makes one live and when retention removes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared import subjects
from shared.files import write_private
from shared.messages import ModelLineage
from shared.subjects import RunNames

if TYPE_CHECKING:
    from shared.bus import Bus


async def load_all(bus: Bus) -> list[ModelLineage]:
    """Every model's lineage, oldest write first."""
    return list((await bus.list_records(subjects.MODELS, ModelLineage)).values())


async def load(bus: Bus, run_id: str) -> ModelLineage | None:
    return await bus.get_record(subjects.MODELS, run_id, ModelLineage)


async def save(
    bus: Bus, record: ModelLineage, training_dir: Path | None, *, new_file: bool = False
) -> None:
    """Store `record` in the bucket, and in its file under `training_dir` when that file exists
    (or `new_file`): a component on another machine than the run's files writes only the bucket."""
    await bus.put_record(subjects.MODELS, record.run_id, record)
    if training_dir is None:
        return
    path = Path(training_dir) / RunNames(record.run_id).lineage_file
    if new_file or path.exists():
        write_private(path, msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")


def read_file(path: Path) -> ModelLineage:
    return msgspec.json.decode(Path(path).read_bytes(), type=ModelLineage)
