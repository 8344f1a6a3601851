"""CLIP score with open_clip: 100 x max(cosine(image embedding, caption embedding), 0), averaged over images.

This is torchmetrics' CLIPScore definition (the clamp at 0 only matters for unrelated pairs), computed with
open_clip because torchmetrics' CLIPScore breaks with transformers 5. Papers use different CLIP models, so the
report always names the one used:

- ``shapes``: the shapes world's tiny open_clip model (``stepdistill.shapes_eval.load_shapes_clip``);
- an open_clip model name with ``--clip-pretrained``: a pretrained tag (``laion2b_s34b_b88k``; needs the weights in
  the local open_clip / Hugging Face cache when offline) or a local checkpoint path;
- ``hf-hub:ORG/NAME`` (open_clip's own syntax).

Default for non-shapes prompts: ViT-g-14 / laion2b_s34b_b88k, the CLIP used for COCO by GigaGAN and DMD2.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import StepdistillError

DEFAULT_CLIP = ("ViT-g-14", "laion2b_s34b_b88k")


class ClipScorer:
    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self.model, self.preprocess, self.tokenizer, self.name, self.device = model, preprocess, tokenizer, name, device

    def to(self, device) -> "ClipScorer":
        self.model = self.model.to(device)
        self.device = device
        return self

    def scores(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        """Per-image 100 x max(cos(image, caption), 0), float64 (N,)."""
        import torch

        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        t = self.tokenizer(list(captions))
        if isinstance(t, dict):  # HF-style tokenizer output
            t = t["input_ids"]
        t = t.to(self.device)
        with torch.no_grad():
            fi = self.model.encode_image(x).double()
            ft = self.model.encode_text(t).double()
        fi = fi / fi.norm(dim=-1, keepdim=True)
        ft = ft / ft.norm(dim=-1, keepdim=True)
        return (100.0 * (fi * ft).sum(-1)).clamp(min=0).cpu().numpy()


def load_clip(model: str, pretrained: str | None = None, device="cpu") -> ClipScorer:
    if model in ("shapes", "shapes-clip"):
        try:
            from .. import shapes_eval
        except ImportError as e:
            raise StepdistillError(f"the shapes world CLIP model is not available ({e}); pass --clip-model NAME "
                                   "--clip-pretrained TAG_OR_PATH") from None
        try:
            m, preprocess, tokenizer = shapes_eval.load_shapes_clip()
        except (FileNotFoundError, RuntimeError) as e:
            raise StepdistillError(f"the shapes CLIP model cannot be loaded ({str(e).splitlines()[0][:150]}); "
                                   "pass --clip-model NAME --clip-pretrained TAG_OR_PATH or --clip-model none") \
                from None
        name = getattr(m, "stepdistill_name", None) or "shapes-clip (stepdistill.shapes_eval)"
        return ClipScorer(m.to(device).eval(), preprocess, tokenizer, name, device)
    import open_clip

    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise StepdistillError(f"unknown open_clip model '{model}'; see open_clip.list_models() or use shapes")
    if pretrained and not os.path.exists(pretrained) and not model.startswith("hf-hub:"):
        tags = [t for m, t in open_clip.list_pretrained() if m == model]
        if pretrained not in tags:
            raise StepdistillError(f"--clip-pretrained '{pretrained}' is neither a file nor a tag of {model} "
                                   f"({', '.join(tags) or 'no tags'})")
    try:
        m, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StepdistillError(f"cannot load CLIP {model} / {pretrained}: {msg[:200]}; offline, pass "
                               "--clip-pretrained /path/to/open_clip_model.safetensors (or pre-fill the hub "
                               "cache)") from None
    name = f"open_clip {model}" + (f" / {os.path.basename(pretrained) if os.path.exists(pretrained) else pretrained}"
                                   if pretrained else " (random init)")
    return ClipScorer(m.eval(), preprocess, tokenizer, name, device)


def clip_score(scorer: ClipScorer, images: list[Image.Image], captions: list[str]) -> float:
    return float(np.mean(scorer.scores(images, captions)))
