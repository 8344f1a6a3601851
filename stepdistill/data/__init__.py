"""Training data: prompt sources and image-caption sources.

Every source is a sequence of {"caption": str, "image": PIL.Image | None}. Sources:
  shapes                          the bundled procedural world (images + captions)
  DIR with metadata.jsonl         images with captions ({"file_name": ..., "text": ...} per line)
  FILE.txt                        prompts, one per line
  FILE.jsonl / FILE.csv           prompts (or image paths + captions) from columns
  anything else                   a Hugging Face `datasets` name or path (needs `pip install datasets`)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import StepdistillError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class CaptionSource(torch.utils.data.Dataset):
    """A list of captions and optional image paths / images."""

    def __init__(self, name: str, captions: list[str], images: list | None = None):
        self.name, self.captions, self.images = name, captions, images

    @property
    def has_images(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        image = None
        if self.images is not None:
            image = self.images[i]
            if isinstance(image, (str, Path)):
                image = _open_image(image)
        return {"caption": self.captions[i], "image": image}


class ShapesSource(torch.utils.data.Dataset):
    def __init__(self, split: str, size: int, length: int):
        from .shapes import ShapesDataset

        self.name = f"shapes:{split}"
        self.ds = ShapesDataset(split=split, size=size, length=length)
        self.has_images = True

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        return {"caption": item["caption"], "image": item["image"]}


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise StepdistillError(f"image '{path}' listed in the data source does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise StepdistillError(f"image '{path}' cannot be read ({err}); remove it from the metadata") from None


def _column(row: dict, column: str, where: str, fallbacks=("text", "caption", "prompt")) -> str:
    for key in (column, *fallbacks):
        if key in row:
            return str(row[key])
    raise StepdistillError(f"{where} has no column '{column}' (columns: {', '.join(map(str, row))}); "
                           "set data.caption_column")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StepdistillError(f"data file '{path}' is not UTF-8 text (byte {err.start} cannot be decoded); give a "
                               f"text {path.suffix or '.txt'} file") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: JSON may hold a raw U+2028
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise StepdistillError(f"{path}:{n} is not valid JSON ({err.msg} at column {err.colno}); every line "
                                       'must be one JSON object such as {"text": "a caption"}') from None
            if not isinstance(row, dict):
                raise StepdistillError(f"{path}:{n} is a JSON {type(row).__name__}, not an object; every line must "
                                       'be one JSON object such as {"text": "a caption"}')
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():  # more / fewer fields than the header names
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise StepdistillError(
                    f"{path}:{reader.line_num} has {fields} fields "
                    f"where the header has {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); put a field "
                    'that holds a comma or a line break in double quotes ("a, b"), and close every quote')
            rows.append(row)
    except csv.Error as err:
        raise StepdistillError(f"{path}:{reader.line_num} is not valid CSV ({err}); check its quoting") from None
    return rows


def _image_paths(rows: list[dict], column: str, base: Path, where: str) -> list[Path] | None:
    """The image of every row when the first row has an `column` column (else None: a prompt file)."""
    if not rows or column not in rows[0]:
        return None
    for n, r in enumerate(rows, 1):
        if not r.get(column):
            raise StepdistillError(f"{where}: row {n} has no '{column}' (the first row has one); give every row "
                                   "an image, or none (a prompt file)")
    return [base / str(r[column]) for r in rows]


def _check_images(ds: "CaptionSource") -> None:
    """Every listed image file is there and is an image PIL can open (its header is read, not the pixels): a bad
    one stops the run before anything is written, not at the batch that draws it."""
    from PIL import Image, UnidentifiedImageError

    for path in ds.images:
        if not isinstance(path, (str, Path)):
            continue  # decoded already (a `datasets` image column)
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:
            raise StepdistillError(f"image '{path}' listed in data source '{ds.name}' does not exist; fix its "
                                   "file name or remove its line") from None
        except (UnidentifiedImageError, OSError) as err:
            reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else err
            raise StepdistillError(f"image '{path}' in data source '{ds.name}' cannot be read ({reason}); replace "
                                   "it or remove its line") from None


def load_source(cfg: DataConfig, needs_images: bool):
    src = cfg.source
    if src == "shapes" or src.startswith("shapes:"):
        split = src.split(":", 1)[1] if ":" in src else cfg.split
        from .shapes import SPLITS

        if split not in SPLITS:
            raise StepdistillError(f"config key 'data.split' for the shapes world must be one of {', '.join(SPLITS)}, "
                                   f"got '{split}'")
        ds = ShapesSource(split, cfg.resolution, cfg.max_samples or 20000)
    else:
        path = Path(src)
        if path.is_dir():
            meta = path / "metadata.jsonl"
            if not meta.is_file():
                raise StepdistillError(f"image folder '{src}' has no metadata.jsonl (one line per image: "
                                       '{"file_name": "a.png", "text": "a caption"})')
            rows = _read_jsonl(meta)
            for n, r in enumerate(rows, 1):
                if "file_name" not in r:
                    raise StepdistillError(f"{meta}: line {n} has no 'file_name'; every line needs one, e.g. "
                                           '{"file_name": "a.png", "text": "a caption"}')
            ds = CaptionSource(src, [_column(r, cfg.caption_column, str(meta)) for r in rows],
                               [path / r["file_name"] for r in rows])
        elif path.suffix == ".txt":
            _must_exist(path)
            ds = CaptionSource(src, [line.strip() for line in _read_text(path).splitlines() if line.strip()])
        elif path.suffix in (".jsonl", ".csv"):
            _must_exist(path)
            rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
            images = _image_paths(rows, cfg.image_column, path.parent, str(path))
            ds = CaptionSource(src, [_column(r, cfg.caption_column, str(path)) for r in rows], images)
        elif path.suffix or src.startswith((".", "/")):
            raise StepdistillError(f"data source '{src}' not found or of an unknown kind; use 'shapes', an image "
                                   "folder with metadata.jsonl, or a .txt / .jsonl / .csv file")
        else:
            ds = _hf_dataset(cfg)
    if len(ds) == 0:
        raise StepdistillError(f"data source '{src}' has no samples; give a file with at least one prompt "
                               "(or an image folder with at least one image)")
    if needs_images and not ds.has_images:
        raise StepdistillError(f"this objective trains on images with captions, but data source '{src}' has only "
                               "prompts; use an image folder with metadata.jsonl, a dataset with images, or 'shapes'")
    if cfg.max_samples and len(ds) > cfg.max_samples and isinstance(ds, CaptionSource):
        ds = CaptionSource(ds.name, ds.captions[:cfg.max_samples], ds.images[:cfg.max_samples] if ds.images else None)
    if needs_images and isinstance(ds, CaptionSource):
        _check_images(ds)
    return ds


def _must_exist(path: Path) -> None:
    if not path.is_file():
        raise StepdistillError(f"data file '{path}' does not exist; check data.source")


def _hf_dataset(cfg: DataConfig):
    try:
        import datasets
    except ImportError:
        raise StepdistillError(f"data source '{cfg.source}' looks like a Hugging Face dataset; `pip install datasets` "
                               "to use it, or give a local folder / file") from None
    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except Exception as err:
        raise StepdistillError(f"could not load dataset '{cfg.source}' split '{cfg.split}': "
                               f"{str(err).strip().splitlines()[0][:200]}") from None
    if cfg.caption_column not in ds.column_names:
        raise StepdistillError(f"dataset '{cfg.source}' has no column '{cfg.caption_column}' "
                               f"(columns: {', '.join(ds.column_names)}); set data.caption_column")
    images = list(ds[cfg.image_column]) if cfg.image_column in ds.column_names else None
    return CaptionSource(cfg.source, [str(c) for c in ds[cfg.caption_column]], images)


def image_to_tensor(image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the short side to `resolution` (bicubic), crop to a square, scale to [-1, 1]; (3, R, R)."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left = (w - resolution) // 2 if center_crop else 0
    top = (h - resolution) // 2 if center_crop else 0
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


class BatchStream:
    """Deterministic, resumable order: epoch e is a permutation seeded by (seed, e); each process takes its slice
    of every global batch. The only state is how many samples were drawn, so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.drawn = 0
        self._epoch, self._perm = -1, None

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[pos]

    def next_indices(self) -> list[int]:
        start = self.drawn + self.rank * self.batch_size
        idx = [self._index(start + i) for i in range(self.batch_size)]
        self.drawn += self.batch_size * self.world
        return idx
