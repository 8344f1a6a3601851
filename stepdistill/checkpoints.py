"""Where a run's checkpoints are: `RUN/checkpoints/checkpoint-N` folders, listed in step order.

Below both the trainer (which writes and resumes them) and export (which exports the latest when a run has no
final weights), so neither imports the other for it.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import StepdistillError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise StepdistillError(f"train.resume '{resume}' is not a complete checkpoint folder "
                               "(use 'latest' or a runs/NAME/checkpoints/checkpoint-N folder)")
    return path
