"""FID: feature backbones, image preprocessing, feature statistics and the Frechet distance.

Protocol (clean-fid style, applied identically to generated and reference images):

1. reference images that are not square are center-cropped to a square (side = the shorter side);
2. every image is converted to RGB and resized with PIL bicubic to the backbone's input size
   (299x299 for Inception; the shapes encoder's own size) and quantized to uint8;
3. the uint8 tensor (N, 3, H, W) goes through the backbone; features are taken in float64;
4. mu / sigma (unbiased covariance, ``np.cov`` with ``rowvar=False``) in float64;
5. ``frechet_distance`` (``stepdistill.frechet``), the one implementation every part of stepdistill uses.

Backbones: ``inception`` is torchmetrics' ``NoTrainInceptionV3`` (``FrechetInceptionDistance(feature=2048)``'s
extractor: the TF-ported pt_inception-2015-12-05 weights, pool3 2048-d features); it needs its weights file
locally (``--inception-weights PATH``, ``$STEPDISTILL_INCEPTION_WEIGHTS``, or the torch hub cache). ``shapes`` is
the shapes world's own encoder from ``stepdistill.shapes_eval``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import StepdistillError
from ..frechet import frechet_distance

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set (what a stats .npz holds)."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    backbone: str
    image_size: int = 0
    source: str = ""

    @classmethod
    def from_features(cls, feats, backbone: str, image_size: int = 0, source: str = "") -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise StepdistillError(f"need at least 2 images for FID statistics, got {feats.shape[0]}; "
                                   "raise --num-images")
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=int(feats.shape[0]),
                   backbone=backbone, image_size=int(image_size), source=source)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), backbone=np.str_(self.backbone),
                 image_size=np.int64(self.image_size), source=np.str_(self.source))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "FeatureStats":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise StepdistillError(f"'{path}' is not a FID statistics file (no mu/sigma arrays); "
                                           "make one with `stepdistill fid-stats DIR -o stats.npz`")
                return cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                           n=int(z["n"]) if "n" in z else 0,
                           backbone=str(z["backbone"]) if "backbone" in z else "unknown",
                           image_size=int(z["image_size"]) if "image_size" in z else 0,
                           source=str(z["source"]) if "source" in z else str(path))
        except (OSError, ValueError) as e:
            raise StepdistillError(f"cannot read FID statistics '{path}': {e}") from None

    def fid(self, other: "FeatureStats") -> float:
        if self.backbone != other.backbone and "unknown" not in (self.backbone, other.backbone):
            raise StepdistillError(f"FID statistics come from different backbones ({self.backbone} vs "
                                   f"{other.backbone}); recompute the reference with --backbone {self.backbone}")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
def center_crop_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def preprocess(img: Image.Image, size: int | None, crop: bool = True) -> np.ndarray:
    """PIL image -> uint8 (3, size, size): RGB, center crop to square, PIL bicubic resize (clean-fid style)."""
    img = img.convert("RGB")
    if crop:
        img = center_crop_square(img)
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------------------------------------------
# backbones
class Backbone:
    """A feature extractor: uint8 (N, 3, S, S) -> (N, D) features, with the name written into stats files."""

    def __init__(self, name: str, module, image_size: int | None, num_features: int, device="cpu"):
        self.name, self.module, self.image_size, self.num_features = name, module, image_size, num_features
        self.device = device

    def to(self, device) -> "Backbone":
        self.module = self.module.to(device)
        self.device = device
        return self

    def features(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with torch.no_grad():
            f = self.module(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        f = f.reshape(f.shape[0], -1)
        # float32 network outputs stay float32 (lossless, half the bytes to gather); statistics are float64
        return (f.float() if f.dtype != torch.float64 else f).cpu().numpy()


def find_inception_weights(path: str | None = None) -> str:
    """The local Inception weights file: explicit path, $STEPDISTILL_INCEPTION_WEIGHTS, or the torch hub cache."""
    if path:
        if not os.path.isfile(path):
            raise StepdistillError(f"--inception-weights '{path}' does not exist")
        return path
    env = os.environ.get("STEPDISTILL_INCEPTION_WEIGHTS")
    if env:
        if not os.path.isfile(env):
            raise StepdistillError(f"$STEPDISTILL_INCEPTION_WEIGHTS '{env}' does not exist")
        return env
    import torch

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)
    if os.path.isfile(cached):
        return cached
    raise StepdistillError(
        f"FID Inception weights not found offline; download {INCEPTION_WEIGHTS_URL} on a connected machine and "
        f"pass --inception-weights PATH (or put it at {cached}), or use --backbone shapes")


def load_inception(weights: str | None = None, device="cpu") -> Backbone:
    path = find_inception_weights(weights)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover
        raise StepdistillError(f"torchmetrics' Inception needs torch-fidelity: pip install torch-fidelity ({e})")
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=path)
    except ModuleNotFoundError as e:
        raise StepdistillError(f"{e}".splitlines()[0]) from None
    except Exception as e:
        raise StepdistillError(f"cannot load Inception weights '{path}': {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    net = net.to(device).eval()
    return Backbone("inception-v3-2048", net, 299, 2048, device)


def load_shapes_backbone(device="cpu") -> Backbone:
    try:
        from .. import shapes_eval
    except ImportError as e:
        raise StepdistillError(f"the shapes world evaluation models are not available ({e}); "
                               "use --backbone inception") from None
    try:
        enc = shapes_eval.load_shapes_encoder()
    except FileNotFoundError as e:
        raise StepdistillError(f"the shapes encoder is missing ({e.filename}); use --backbone inception") from None
    enc = enc.to(device).eval()
    size = getattr(enc, "image_size", None) or getattr(enc, "input_size", None)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return Backbone("shapes-encoder", enc, int(size) if size else None, int(enc.num_features), device)


def load_backbone(name: str, inception_weights: str | None = None, device="cpu") -> Backbone:
    name = (name or "inception").lower()
    if name in ("inception", "inception-v3", "inception-v3-2048", "2048"):
        return load_inception(inception_weights, device)
    if name in ("shapes", "shapes-encoder"):
        return load_shapes_backbone(device)
    raise StepdistillError(f"unknown --backbone '{name}'; use inception or shapes")


# ----------------------------------------------------------------------------------------------------------------
# references
def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StepdistillError(f"reference folder '{folder}' does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise StepdistillError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{folder}'")
    return files


def folder_fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    d = os.environ.get("STEPDISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stepdistill")
    return Path(d) / "fid-stats"


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]


ImageSource = Callable[[int], Image.Image]
