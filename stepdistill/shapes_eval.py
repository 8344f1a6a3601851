"""Evaluation models of the bundled shapes world (built by tools/shapes/build_eval_models.py, in assets/shapes-eval/).

* ``load_shapes_encoder()`` -> ShapesEncoder: a small CNN trained on the world's train split. ``forward(uint8
  (N,3,H,W) in [0,255])`` returns its penultimate features ``(N, num_features)`` (num_features = 128), the
  interface of torchmetrics ``FrechetInceptionDistance(feature=module)``; ``predict_attributes`` returns the
  argmax of its five heads (shape, color, background, size, position).
* ``attribute_accuracy(images, prompts)``: per-attribute and all-correct accuracy of generated images against
  the attributes parsed from their prompts.
* ``load_shapes_clip()`` -> (model, preprocess, tokenizer): a tiny open_clip model ("shapes-clip-tiny") trained
  contrastively on this world; ``clip_score(images, prompts)`` = mean of 100 * max(cos, 0).
* ``shapes_fid`` and ``feature_stats``; the Frechet distance is ``stepdistill.frechet.frechet_distance``.

Import-light: torch, numpy and PIL at import; scipy and open_clip only when used.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stepdistill.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTES, labels_from_captions
from stepdistill.frechet import frechet_distance
from stepdistill.utils import BUNDLED_ROOTS

# the bundled assets: package data of an installed wheel, else the source tree (stepdistill.utils.BUNDLED_ROOTS)
ASSETS_DIR = Path(os.environ.get("STEPDISTILL_ASSETS") or next(
    (root / "assets" for root in BUNDLED_ROOTS if (root / "assets").is_dir()), BUNDLED_ROOTS[-1] / "assets"))
EVAL_DIR = ASSETS_DIR / "shapes-eval"
TEACHER_DIR = ASSETS_DIR / "shapes-teacher"
# the second bundled teacher: v-prediction on SD2.1's scaled_linear betas (its text encoder, tokenizer and VAE are
# the first's, linked)
TEACHER_V_DIR = ASSETS_DIR / "shapes-teacher-v"
# the bundled flow-matching DiT teacher: StableDiffusion3Pipeline (MMDiT), no T5 (tools/shapes/train_flow_teacher.py)
FLOW_TEACHER_DIR = ASSETS_DIR / "shapes-flow-teacher"
ENCODER_FILE = "shapes_encoder.safetensors"
ENCODER_CONFIG = "shapes_encoder.json"
CLIP_MODEL_NAME = "shapes-clip-tiny"
CLIP_CONFIG = CLIP_MODEL_NAME + ".json"
CLIP_FILE = CLIP_MODEL_NAME + ".safetensors"

ImagesLike = torch.Tensor | np.ndarray | Sequence


# ----------------------------------------------------------------------------------------------------------------
def to_uint8(images: ImagesLike) -> torch.Tensor:
    """PIL list / uint8 HWC array / uint8 or [0,1] float NCHW tensor -> uint8 tensor (N,3,H,W)."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.dim() == 3:
            x = x[None]
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return x
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        return to_uint8(x.permute(0, 3, 1, 2) if x.dim() == 4 and x.shape[-1] == 3 else x)
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class ShapesEncoder(nn.Module):
    """Small CNN over 32x32 RGB; penultimate features are the world's FID features."""

    def __init__(self, width: int = 32, num_features: int = 128, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.num_features = int(num_features)
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w), block(w, w), nn.AvgPool2d(2),              # 16
            block(w, 2 * w), block(2 * w, 2 * w), nn.AvgPool2d(2),  # 8
            block(2 * w, 4 * w), nn.AvgPool2d(2),                   # 4
        )
        self.fc = nn.Linear(4 * w * 16, num_features)
        self.heads = nn.ModuleDict({a: nn.Linear(num_features, len(v)) for a, v in ATTRIBUTES.items()})

    def _prep(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float()
        if imgs.dtype == torch.uint8 or x.max() > 1.5:
            x = x / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - 0.5) / 0.5

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        h = self.body(self._prep(imgs)).flatten(1)
        return F.silu(self.fc(h))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.features(imgs)

    def logits(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(imgs)
        return {a: head(f) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict_attributes(self, imgs: ImagesLike, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = to_uint8(imgs)
        out = {a: [] for a in ATTRIBUTE_NAMES}
        for i in range(0, x.shape[0], batch_size):
            lg = self.logits(x[i:i + batch_size])
            for a in ATTRIBUTE_NAMES:
                out[a].append(lg[a].argmax(-1))
        return {a: torch.cat(v) for a, v in out.items()}


def load_shapes_encoder(path: str | Path | None = None) -> ShapesEncoder:
    """Load the committed encoder (a folder holding shapes_encoder.json + .safetensors); eval mode, no grad."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else EVAL_DIR
    if path.is_file():
        path = path.parent
    cfg = json.loads((path / ENCODER_CONFIG).read_text())
    model = ShapesEncoder(width=cfg["width"], num_features=cfg["num_features"], image_size=cfg["image_size"])
    model.load_state_dict(load_file(str(path / ENCODER_FILE)))
    model.eval().requires_grad_(False)
    return model


_ENCODER_CACHE: dict[str, ShapesEncoder] = {}


def _default_encoder(encoder: ShapesEncoder | None) -> ShapesEncoder:
    if encoder is not None:
        return encoder
    if "default" not in _ENCODER_CACHE:
        _ENCODER_CACHE["default"] = load_shapes_encoder()
    return _ENCODER_CACHE["default"]


def predict_attributes(images: ImagesLike, encoder: ShapesEncoder | None = None) -> dict[str, torch.Tensor]:
    return _default_encoder(encoder).predict_attributes(images)


def attribute_accuracy(images: ImagesLike, prompts: Sequence[str],
                       encoder: ShapesEncoder | None = None) -> dict[str, float]:
    """Accuracy of the encoder's attribute predictions against the attributes parsed from the prompts:
    {"shape", "color", "background", "size", "position", "all"} (all = every attribute right)."""
    pred = predict_attributes(images, encoder)
    target = labels_from_captions(prompts)
    out, ok_all = {}, None
    for a in ATTRIBUTE_NAMES:
        ok = pred[a].cpu().numpy() == target[a]
        out[a] = float(ok.mean())
        ok_all = ok if ok_all is None else ok_all & ok
    out["all"] = float(ok_all.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(images: ImagesLike, encoder: ShapesEncoder | None = None,
                     batch_size: int = 256) -> np.ndarray:
    enc = _default_encoder(encoder)
    x = to_uint8(images)
    return torch.cat([enc(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double().numpy()


def feature_stats(feats: np.ndarray):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def shapes_fid(images_a: ImagesLike, images_b: ImagesLike, encoder: ShapesEncoder | None = None) -> float:
    """FID between two image sets in shapes-encoder feature space."""
    return frechet_distance(*feature_stats(encoder_features(images_a, encoder)),
                            *feature_stats(encoder_features(images_b, encoder)))


# ----------------------------------------------------------------------------------------------------------------
def register_shapes_clip(path: str | Path | None = None) -> Path:
    import open_clip

    path = Path(path) if path is not None else EVAL_DIR
    if path.is_file():
        path = path.parent
    open_clip.add_model_config(path / CLIP_CONFIG)
    return path


def load_shapes_clip(path: str | Path | None = None):
    """(model, preprocess, tokenizer) of the tiny shapes CLIP, loaded by open_clip from local files only."""
    import open_clip

    path = register_shapes_clip(path)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL_NAME, pretrained=str(path / CLIP_FILE))
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(CLIP_MODEL_NAME)


_CLIP_CACHE: dict = {}


def _clip_tensor(x: torch.Tensor, model) -> torch.Tensor:
    """uint8 NCHW -> normalized float input (same as open_clip's preprocess for these 32x32 images)."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    y = x.float() / 255.0
    if y.shape[-1] != size or y.shape[-2] != size:
        y = F.interpolate(y, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (y - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@torch.no_grad()
def clip_similarity(images: ImagesLike, prompts: Sequence[str], clip=None, batch_size: int = 256) -> torch.Tensor:
    """Cosine similarity of each image with its own prompt, shape (N,)."""
    if clip is None:
        if "default" not in _CLIP_CACHE:
            _CLIP_CACHE["default"] = load_shapes_clip()
        clip = _CLIP_CACHE["default"]
    model, _, tokenizer = clip
    x = to_uint8(images)
    out = []
    for i in range(0, x.shape[0], batch_size):
        im = F.normalize(model.encode_image(_clip_tensor(x[i:i + batch_size], model)), dim=-1)
        tx = F.normalize(model.encode_text(tokenizer(list(prompts[i:i + batch_size]))), dim=-1)
        out.append((im * tx).sum(-1))
    return torch.cat(out)


def clip_score(images: ImagesLike, prompts: Sequence[str], clip=None) -> float:
    """CLIP score as torchmetrics defines it: mean of 100 * max(cos, 0), with the shapes CLIP."""
    return float((100 * clip_similarity(images, prompts, clip).clamp(min=0)).mean())


__all__ = [
    "ShapesEncoder", "load_shapes_encoder", "predict_attributes", "attribute_accuracy", "encoder_features",
    "feature_stats", "shapes_fid", "load_shapes_clip", "register_shapes_clip",
    "clip_similarity", "clip_score", "to_uint8", "EVAL_DIR", "TEACHER_DIR", "CLIP_MODEL_NAME",
]
