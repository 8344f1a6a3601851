"""Where a run's checkpoints are: `RUN/checkpoints/checkpoint-N` folders, listed in step order.

Below both the trainer (which writes and resumes them) and export (which exports the latest when a run has no
final weights), so neither imports the other for it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

from .errors import StepdistillError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path, expected: Iterable[str] = ()) -> str | None:
    """What makes checkpoint folder `path` unloadable (a missing, empty, truncated or unreadable file), or None.

    Checks `trainer_state.json` and every name in `expected`, then parses every weight and state file there:
    safetensors headers (which must cover the file), and .bin / .pkl files as torch archives (memory-mapped, so
    tensor data is not read: a truncated archive fails, a flipped bit inside a tensor does not). Cheap next to
    loading, and it leaves nothing half-loaded: resume checks before accelerate loads anything."""
    path = Path(path)
    for name in ["trainer_state.json", *expected]:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__}: {err})"
    for file in sorted(path.iterdir()):
        if file.suffix not in (".safetensors", ".bin", ".pkl") or not file.is_file():
            continue
        if file.stat().st_size == 0:
            return f"{file.name} is empty"
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), "pt"):
                    pass
            else:
                import torch

                torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure to parse means the file is bad
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            return f"{file.name} is truncated or corrupt ({reason})"
    return None


def resolve_resume(run_dir: Path, resume: str | None, expected: Iterable[str] = (),
                   report: Callable[[str], None] = print, set_aside: bool = False) -> Path | None:
    """The checkpoint to resume from: `resume` itself, or with "latest" the newest one that loads.

    A latest checkpoint that fails `checkpoint_problem` is reported in one line and the previous one is tried.
    Nothing is deleted: with `set_aside` (the trainer's main process) a bad checkpoint skipped for a good one is
    renamed `checkpoint-N.corrupt`, so the resumed run neither overwrites nor prunes it. When checkpoints exist but
    none loads, or an explicit folder is bad, it stops in one line rather than silently starting from scratch."""
    if resume is None:
        return None
    expected = list(expected)
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        bad, good = [], None
        for ckpt in reversed(ckpts):
            problem = checkpoint_problem(ckpt, expected)
            if problem is None:
                good = ckpt
                break
            bad.append((ckpt, problem))
        for ckpt, problem in bad:
            aside = good is not None and set_aside and not ckpt.with_name(f"{ckpt.name}.corrupt").exists()
            if aside:
                ckpt.rename(ckpt.with_name(f"{ckpt.name}.corrupt"))
            report(f"train.resume=latest: skipping checkpoint '{ckpt}': {problem}; "
                   f"{'resuming from an earlier one' if good else 'no earlier checkpoint loads'}"
                   f"{f' (kept as {ckpt.name}.corrupt)' if aside else ''}")
        if good is not None:
            return good
        if ckpts:
            raise StepdistillError(f"train.resume=latest: all {len(ckpts)} checkpoints in "
                                   f"'{Path(run_dir) / 'checkpoints'}' are corrupt or incomplete (see above); "
                                   "nothing was deleted; resume from a copy, or start anew in another output_dir")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise StepdistillError(f"train.resume '{resume}' is not a complete checkpoint folder "
                               "(use 'latest' or a runs/NAME/checkpoints/checkpoint-N folder)")
    problem = checkpoint_problem(path, expected)
    if problem is not None:
        raise StepdistillError(f"train.resume '{resume}' is corrupt or incomplete: {problem}")
    return path
