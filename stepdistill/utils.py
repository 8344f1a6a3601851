"""Small shared helpers: atomic writes, dtypes, quieting libraries, image grids."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import StepdistillError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by mkstemp / mkdtemp (mode 0600 / 0700) the mode an ordinary open() / mkdir() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        use_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    If the body fails, the temporary folder is removed and whatever was at `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    previous = final.with_name(f".{final.name}.old")
    if not final.exists() and previous.is_dir():  # a kill between the two renames below: put the old one back
        os.replace(previous, final)
    if final.exists() and not overwrite:
        raise StepdistillError(f"'{final}' already exists; pass --overwrite or choose another output folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        use_umask(tmp, directory=True)
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PACKAGE_DIR = Path(__file__).resolve().parent
# Where the bundled configs and assets are: package data of an installed wheel (stepdistill/_bundled, see
# setup.py), else the source tree the package sits in (an editable install or a checkout).
BUNDLED_ROOTS = (PACKAGE_DIR / "_bundled", PACKAGE_DIR.parent)


def bundled_path(path: str | os.PathLike) -> str:
    """`path` itself when it exists (or is absolute); else, for a relative path such as `assets/shapes-teacher` or
    `configs/shapes/consistency_lora.yaml`, the bundled copy, so the defaults work from any directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(path)
    for root in BUNDLED_ROOTS:
        if (root / p).exists():
            return str(root / p)
    return str(path)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype by name (fp32 / fp16 / bf16, or float32 / float16 / bfloat16); auto = fp16 on CUDA, else fp32."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise StepdistillError(f"unknown dtype '{name}'; use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def quiet_libraries() -> None:
    """diffusers / transformers chatter (load bars, deprecations, safety-checker notice) hides our own output."""
    import warnings

    import diffusers
    import huggingface_hub
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")


def image_grid(images, cols: int | None = None):
    """Paste equally sized PIL images into one grid image."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def _first_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (what a `mkdir(parents=True)` would create folders in)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _unwritable_folder(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (or in the folders a mkdir would make there), or None."""
    base = _first_existing(folder)
    if not base.is_dir():
        return f"'{base}' is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"folder '{base}' is not writable"
    return None


def check_output_dir(path: str | os.PathLike, what: str, replaced: bool = False) -> None:
    """Refuse, in one line and before any work, an output folder that cannot be created or written: a file is
    there, a file is where a parent folder should be, or the folder it would go in is not writable. `what` names
    the setting, e.g. "train.output_dir" or "--out". `replaced`: the folder is written whole beside itself and
    renamed into place (`atomic_directory`), so its parent must be writable, not the folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StepdistillError(f"{what} '{path}' is a file, not a folder; choose another {what}")
    why = _unwritable_folder(path if path.is_dir() and not replaced else path.parent)
    if why:
        raise StepdistillError(f"{what} '{path}' cannot be written: {why}; choose another {what}")


def check_output_file(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, in one line, an output file that cannot be written: it is a folder, a parent folder is a file, or
    the folder it goes in is not writable (a missing parent folder is fine: it is created)."""
    path = Path(path)
    if path.is_dir():
        raise StepdistillError(f"{what} '{path}' is a folder; give a file name such as "
                               f"'{path / 'grid.png'}'")
    why = _unwritable_folder(path.parent)
    if why:
        raise StepdistillError(f"cannot write {what} '{path}': {why}; choose another path")


def image_format(path: str | os.PathLike) -> str:
    """The PIL format a file name asks for (no suffix: PNG), or one line naming the suffixes PIL can write.

    It also refuses a path that cannot be written (`check_output_file`): `stepdistill sample` calls it before
    loading the model, so a bad --out stops there, not after sampling."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    fmt = "PNG"
    if suffix:
        Image.init()
        fmt = Image.registered_extensions().get(suffix)
        if fmt is None or fmt not in Image.SAVE:
            raise StepdistillError(f"cannot write an image as '{path}': unknown image type '{suffix}'; "
                                   "use .png, .jpg or .webp")
    check_output_file(path, "image")
    return fmt


def save_image_atomic(image, path: str | os.PathLike) -> None:
    path = Path(path)
    fmt = image_format(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format=fmt)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: one line, no half-written file
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StepdistillError(f"cannot write image '{path}': {err.strerror or err}; choose another path") from None


def load_error_line(err: BaseException, limit: int = 300) -> str:
    """One line for why diffusers / peft could not load a model: the first line of their message, or, for a weights
    file that does not parse (a truncated download, a copy cut short), which file."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    bad = re.search(r"Unable to load weights from checkpoint file for '([^']+)'", first)
    if bad:
        return f"'{bad.group(1)}' is truncated or corrupt"
    return first[:limit]
