"""Evaluation prompts: text / jsonl / csv files, COCO caption annotations (seeded subsets), the shapes world.

``load_prompts(source, ...)`` returns a ``PromptSet``: the prompts plus, for COCO, the image each caption belongs
to (so the FID reference can be restricted to the same images with ``fid-stats --coco-annotations``).

Sources:
- ``shapes:SPLIT`` — captions of the shapes world's split (``stepdistill.data.shapes.shapes_prompts``).
- ``*.txt`` — one prompt per line (blank lines and lines starting with '#' skipped).
- ``*.jsonl`` — one JSON object per line; the column ``--prompt-column`` (default: the first of prompt, caption,
  text) or a bare JSON string per line.
- ``*.csv`` / ``*.tsv`` — a header row; the column ``--prompt-column`` (same default).
- ``*.json`` — a COCO captions annotation file (``captions_val2014.json``): ``coco_subset`` images are drawn
  without replacement with ``numpy.random.default_rng(seed)`` from the images sorted by id, and one of each
  image's captions is drawn with the same generator (the usual FID-30K protocol); ``coco_subset=0`` keeps every
  caption. A plain JSON list of strings also works.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import StepdistillError

DEFAULT_COLUMNS = ("prompt", "caption", "text")


@dataclass
class PromptSet:
    prompts: list[str]
    source: str
    shapes_split: str | None = None          # set when the prompts are the shapes world's captions
    coco_images: list[dict] = field(default_factory=list)  # [{"id", "file_name"}] aligned with prompts (COCO)

    def take(self, n: int | None) -> list[str]:
        """The first n prompts, cycling through the set when n is larger."""
        if not self.prompts:
            raise StepdistillError(f"no prompts in '{self.source}'")
        if n is None:
            return list(self.prompts)
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


def _pick_column(keys, column: str | None, where: str) -> str:
    if column:
        if column not in keys:
            raise StepdistillError(f"column '{column}' not in {where} (columns: {', '.join(map(str, keys))}); "
                                   "fix --prompt-column")
        return column
    for c in DEFAULT_COLUMNS:
        if c in keys:
            return c
    raise StepdistillError(f"{where} has none of the columns {', '.join(DEFAULT_COLUMNS)}; "
                           "name the prompt column with --prompt-column")


def coco_subset(annotations: dict, subset: int, seed: int):
    """(captions, images) of a seeded COCO subset: `subset` distinct images, one random caption each."""
    by_image = {}
    for a in annotations.get("annotations", []):
        by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    files = {int(im["id"]): im.get("file_name", "") for im in annotations.get("images", [])}
    ids = sorted(by_image)
    rng = np.random.default_rng(seed)
    if subset and subset > 0:
        if subset > len(ids):
            raise StepdistillError(f"--coco-subset {subset} is larger than the {len(ids)} annotated images")
        chosen = [ids[i] for i in rng.choice(len(ids), size=subset, replace=False)]
        caps = [by_image[i][int(rng.integers(len(by_image[i])))] for i in chosen]
    else:
        chosen, caps = [], []
        for i in ids:
            for c in by_image[i]:
                chosen.append(i)
                caps.append(c)
    return caps, [{"id": i, "file_name": files.get(i, "")} for i in chosen]


def load_prompts(source: str, *, column: str | None = None, coco_subset_size: int = 0, seed: int = 0,
                 num: int | None = None) -> PromptSet:
    if source.startswith("shapes:") or source == "shapes":
        split = source.split(":", 1)[1] if ":" in source else "test"
        from ..data.shapes import SPLITS, shapes_prompts

        if split not in SPLITS:
            raise StepdistillError(f"unknown shapes split '{split}' in --prompts; use one of {', '.join(SPLITS)}")
        return PromptSet(shapes_prompts(split, num or 1000, seed=0), source, shapes_split=split)
    if not os.path.isfile(source):
        raise StepdistillError(f"prompt file '{source}' does not exist (use a .txt/.jsonl/.csv/.json file or "
                               "shapes:test)")
    ext = os.path.splitext(source)[1].lower()
    try:
        if ext == ".jsonl":
            out = []
            with open(source, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    obj = json.loads(line)
                    if isinstance(obj, str):
                        out.append(obj)
                    elif isinstance(obj, dict):
                        out.append(str(obj[_pick_column(list(obj), column, f"{source} line {n}")]))
                    else:
                        raise StepdistillError(f"{source} line {n} is neither a string nor an object")
            return PromptSet(out, source)
        if ext in (".csv", ".tsv"):
            with open(source, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
                col = _pick_column(reader.fieldnames or [], column, source)
                return PromptSet([row[col] for row in reader if row.get(col)], source)
        if ext == ".json":
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, list) and all(isinstance(x, str) for x in data):
                return PromptSet(list(data), source)
            if isinstance(data, dict) and "annotations" in data:
                caps, images = coco_subset(data, coco_subset_size, seed)
                return PromptSet(caps, source + (f" (COCO subset {coco_subset_size}, seed {seed})"
                                                 if coco_subset_size else " (all COCO captions)"),
                                 coco_images=images)
            raise StepdistillError(f"'{source}' is neither a COCO captions annotation file nor a JSON list of "
                                   "strings")
        with open(source, encoding="utf-8") as f:
            return PromptSet([ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")], source)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, KeyError) as e:
        raise StepdistillError(f"cannot read prompts from '{source}': {type(e).__name__}: {e}") from None
