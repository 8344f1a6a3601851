"""The bundled offline "shapes" world: a deterministic, procedural text-to-image data set.

Each sample is one shape (circle, square, triangle, diamond) of one of six colors, in one of two sizes, at one of
nine positions of a 3x3 grid, on one of four background colors, with small seeded jitter in position, size and
color. Captions come from a tiny grammar and ``parse_caption`` inverts it.

Samples are a pure function of (seed, split, index): each one is drawn from its own RNG seeded with a hash of the
three, so iteration order never matters and splits (whose name is part of the hash) are disjoint.

Only numpy and PIL are needed; torch is only imported for the ``Dataset`` base class.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

try:  # torch is optional for the pure-data helpers
    from torch.utils.data import Dataset as _TorchDataset
except Exception:  # pragma: no cover
    _TorchDataset = object

# ----------------------------------------------------------------------------------------------------------------
# vocabularies
SHAPES: list[str] = ["circle", "square", "triangle", "diamond"]
COLORS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange"]
BACKGROUNDS: list[str] = ["black", "white", "gray", "brown"]
SIZES: list[str] = ["small", "large"]
POSITIONS: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
ATTRIBUTES: dict[str, list[str]] = {
    "shape": SHAPES,
    "color": COLORS,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}
ATTRIBUTE_NAMES: list[str] = list(ATTRIBUTES)

COLOR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 220, 40),
    "purple": (150, 55, 190),
    "orange": (250, 145, 25),
}
BACKGROUND_RGB = {
    "black": (18, 18, 18),
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "brown": (96, 62, 34),
}

# caption grammar variants; {pos} is a position name
TEMPLATES: list[str] = [
    "a {size} {color} {shape} at the {pos} on a {bg} background",
    "a {size} {color} {shape} in the {pos} of a {bg} background",
    "{bg} background with a {size} {color} {shape} at the {pos}",
]
_GRAMMAR_WORDS = ["a", "at", "the", "on", "in", "of", "with", "background"]

SPLITS = ("train", "val", "test")
DEFAULT_LENGTHS = {"train": 100_000, "val": 10_000, "test": 10_000}

# geometry, as fractions of the image size
_GRID = (0.25, 0.5, 0.75)
_HALF_SIZE = {"small": 0.13, "large": 0.21}  # half the bounding box
_POS_JITTER = 0.035
_SIZE_JITTER = 0.08
_COLOR_JITTER = 6
_SUPERSAMPLE = 4


def all_words() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary)."""
    words = set(_GRAMMAR_WORDS)
    for values in ATTRIBUTES.values():
        for v in values:
            words.update(v.split())
    return sorted(words)


def max_caption_words() -> int:
    longest = 0
    for t in TEMPLATES:
        cap = t.format(size="small", color="purple", shape="triangle", pos="bottom right", bg="brown")
        longest = max(longest, len(cap.split()))
    return longest


# ----------------------------------------------------------------------------------------------------------------
# labels and captions
def make_labels(shape, color, background, size, position) -> dict:
    """Labels dict from ints or names: ints under the attribute name, names under '<attr>_name'."""
    out = {}
    for attr, value in zip(ATTRIBUTE_NAMES, (shape, color, background, size, position)):
        vocab = ATTRIBUTES[attr]
        idx = vocab.index(value) if isinstance(value, str) else int(value)
        out[attr] = idx
        out[attr + "_name"] = vocab[idx]
    return out


def caption_for(labels: dict, template: int = 0) -> str:
    return TEMPLATES[template].format(
        size=labels["size_name"], color=labels["color_name"], shape=labels["shape_name"],
        pos=labels["position_name"], bg=labels["background_name"],
    )


def parse_caption(caption: str) -> dict:
    """Inverse of the grammar: caption -> labels dict (ints and names). Raises ValueError when unparseable."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()

    def one(vocab, what):
        found = [w for w in words if w in vocab]
        if len(found) != 1:
            raise ValueError(f"cannot parse {what} from caption {caption!r}")
        return found[0]

    shape = one(SHAPES, "shape")
    color = one(COLORS, "color")
    background = one(BACKGROUNDS, "background")
    size = one(SIZES, "size")
    vert = [w for w in words if w in ("top", "bottom")]
    horiz = [w for w in words if w in ("left", "right")]
    center = "center" in words
    if len(vert) > 1 or len(horiz) > 1 or (center and (vert or horiz)) or not (vert or horiz or center):
        raise ValueError(f"cannot parse position from caption {caption!r}")
    position = "center" if center else " ".join(vert + horiz)
    return make_labels(shape, color, background, size, position)


# ----------------------------------------------------------------------------------------------------------------
# sampling and rendering
def _sample_seed(split: str, index: int, seed: int) -> int:
    h = hashlib.blake2b(f"shapes|{seed}|{split}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list | None:
    if shape == "square":
        r = r * 0.9
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        h = r * 0.95
        return [(cx, cy - h), (cx + r, cy + h), (cx - r, cy + h)]
    return None


def render(labels: dict, size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Render one image for the labels (jitter drawn from rng; no jitter when rng is None)."""
    S = size * _SUPERSAMPLE
    if rng is not None:
        jx, jy = rng.uniform(-_POS_JITTER, _POS_JITTER, size=2)
        js = rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
        jc = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=6)
    else:
        jx = jy = js = 0.0
        jc = np.zeros(6, dtype=int)
    pos = labels["position"]
    cx = (_GRID[pos % 3] + jx) * S
    cy = (_GRID[pos // 3] + jy) * S
    r = _HALF_SIZE[labels["size_name"]] * (1.0 + js) * S

    def clip(c, j):
        return tuple(int(min(255, max(0, v + d))) for v, d in zip(c, j))

    bg = clip(BACKGROUND_RGB[labels["background_name"]], jc[:3])
    fg = clip(COLOR_RGB[labels["color_name"]], jc[3:])
    img = Image.new("RGB", (S, S), bg)
    draw = ImageDraw.Draw(img)
    shape = labels["shape_name"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fg)
    return img.resize((size, size), Image.BOX)


def sample(split: str = "train", index: int = 0, size: int = 32, seed: int = 0) -> dict:
    """The sample (split, index, seed): {"image", "caption", "labels"}; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng(_sample_seed(split, index, seed))
    labels = make_labels(*(int(rng.integers(len(ATTRIBUTES[a]))) for a in ATTRIBUTE_NAMES))
    template = int(rng.integers(len(TEMPLATES)))
    image = render(labels, size=size, rng=rng)
    return {"image": image, "caption": caption_for(labels, template), "labels": labels}


class ShapesDataset(_TorchDataset):
    """Map-style dataset over the shapes world; items are {"image": PIL RGB, "caption": str, "labels": dict}."""

    def __init__(self, split: str = "train", size: int = 32, length: int | None = None, seed: int = 0,
                 transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.size, self.seed, self.transform = split, size, seed, transform
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        item = sample(self.split, index, self.size, self.seed)
        if self.transform is not None:
            item["image"] = self.transform(item["image"])
        return item


def shapes_prompts(split: str = "test", n: int = 100, seed: int = 0, start: int = 0) -> list[str]:
    """Captions of samples start..start+n-1 of a split (cheap: no rendering)."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(_sample_seed(split, i, seed))
        labels = make_labels(*(int(rng.integers(len(ATTRIBUTES[a]))) for a in ATTRIBUTE_NAMES))
        out.append(caption_for(labels, int(rng.integers(len(TEMPLATES)))))
    return out


def shapes_arrays(split: str = "train", n: int = 1000, size: int = 32, seed: int = 0, start: int = 0):
    """Batch helper: (uint8 array (n, size, size, 3), captions, labels as dict of int arrays)."""
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    caps: list[str] = []
    labs = {a: np.empty(n, dtype=np.int64) for a in ATTRIBUTE_NAMES}
    for k in range(n):
        s = sample(split, start + k, size, seed)
        imgs[k] = np.asarray(s["image"])
        caps.append(s["caption"])
        for a in ATTRIBUTE_NAMES:
            labs[a][k] = s["labels"][a]
    return imgs, caps, labs


def labels_from_captions(captions: Sequence[str]) -> dict[str, np.ndarray]:
    parsed = [parse_caption(c) for c in captions]
    return {a: np.array([p[a] for p in parsed], dtype=np.int64) for a in ATTRIBUTE_NAMES}


__all__ = [
    "SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "POSITIONS", "ATTRIBUTES", "ATTRIBUTE_NAMES", "TEMPLATES",
    "all_words", "make_labels", "caption_for", "parse_caption", "render", "sample", "ShapesDataset",
    "shapes_prompts", "shapes_arrays", "labels_from_captions",
]
