"""Train the shapes-world evaluation models into assets/shapes-eval/.

    python tools/shapes/build_eval_models.py --out assets/shapes-eval                   # both
    python tools/shapes/build_eval_models.py --only encoder --encoder-steps 1500
    python tools/shapes/build_eval_models.py --only clip --clip-steps 1500

* encoder: ShapesEncoder (stepdistill/shapes_eval.py), a small CNN with heads for shape, color, background, size
  and position, trained with cross-entropy on the train split with light augmentation (noise, blur, brightness).
  Its 128-d penultimate features are the world's FID features. Files: shapes_encoder.json/.safetensors.
* clip: "shapes-clip-tiny", an open_clip CLIP (ViT 32px patch 4, 3 layers width 96; text transformer 2 layers
  width 32, open_clip's default BPE tokenizer, context 24; embed 64) trained contrastively on (image, caption)
  pairs with soft targets (pairs whose attributes all match count as positives). Files: shapes-clip-tiny.json
  (open_clip model config) and shapes-clip-tiny.safetensors (fp16 weights).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import common  # noqa: F401  (sets sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from common import Logger, seed_all, write_json

from stepdistill.data.shapes import ATTRIBUTE_NAMES, TEMPLATES, caption_for, make_labels, shapes_arrays
from stepdistill.shapes_eval import (CLIP_CONFIG, CLIP_FILE, CLIP_MODEL_NAME, ENCODER_CONFIG, ENCODER_FILE,
                                     ShapesEncoder, _clip_tensor)

CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "mlp_ratio": 2.0,
                   "patch_size": 4},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "mlp_ratio": 4.0},
}


def data(split, n, seed=0):
    imgs, caps, labs = shapes_arrays(split, n, seed=seed)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), caps, {k: torch.from_numpy(v)
                                                                          for k, v in labs.items()}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """uint8 NCHW -> augmented uint8: random blur, brightness/contrast jitter, gaussian noise."""
    y = x.float() / 255.0
    n = y.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    y = y * (1 - a) + blurred * a
    y = y * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.06 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    y = y + torch.randn(y.shape, generator=g) * 0.04 * torch.rand(n, 1, 1, 1, generator=g)
    return (y.clamp(0, 1) * 255).round().to(torch.uint8)


def train_encoder(a, log):
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    x, _, labs = data("train", a.num_images)
    xv, _, labv = data("val", 2000)
    model = ShapesEncoder(width=32, num_features=128, image_size=32)
    log(f"encoder params {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = a.encoder_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (a.batch_size,), generator=g)
        lg = model.logits(augment(x[idx], g))
        loss = sum(F.cross_entropy(lg[k], labs[k][idx]) for k in ATTRIBUTE_NAMES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"encoder step {step} loss {loss.item():.4f}")
        if (time.time() - t0) / 60 > a.max_minutes:
            log(f"encoder: wall-clock limit at step {step}")
            break
    model.eval()
    pred = model.predict_attributes(xv)
    acc = {k: float((pred[k] == labv[k]).float().mean()) for k in ATTRIBUTE_NAMES}
    log(f"encoder val accuracy {acc}")
    from safetensors.torch import save_file

    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, ENCODER_FILE))
    write_json(os.path.join(a.out, ENCODER_CONFIG), {
        "width": 32, "num_features": 128, "image_size": 32, "val_accuracy": acc, "steps": step + 1,
        "minutes": (time.time() - t0) / 60})


def train_clip(a, log):
    import open_clip

    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)
    os.makedirs(a.out, exist_ok=True)
    cfg_path = os.path.join(a.out, CLIP_CONFIG)
    write_json(cfg_path, CLIP_CFG)
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(CLIP_MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    log(f"clip params {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M")
    x, _, labs = data("train", a.num_images)
    # every image with each caption template, tokenized once
    lab_rows = [make_labels(*(int(labs[k][i]) for k in ATTRIBUTE_NAMES)) for i in range(x.shape[0])]
    toks = torch.stack([tokenizer([caption_for(l, t) for l in lab_rows]) for t in range(len(TEMPLATES))], 1)
    key = sum(labs[k] * m for k, m in zip(ATTRIBUTE_NAMES, (1, 10, 100, 1000, 10000)))
    xv, capv, _ = data("val", 512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = a.clip_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    bs = a.clip_batch_size
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (bs,), generator=g)
        tsel = torch.randint(0, len(TEMPLATES), (bs,), generator=g)
        im = F.normalize(model.encode_image(_clip_tensor(augment(x[idx], g), model)), dim=-1)
        tx = F.normalize(model.encode_text(toks[idx, tsel]), dim=-1)
        logits = model.logit_scale.exp() * im @ tx.t()
        same = (key[idx][:, None] == key[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0:
            log(f"clip step {step} loss {loss.item():.4f} logit_scale {model.logit_scale.exp().item():.1f}")
        if (time.time() - t0) / 60 > a.max_minutes:
            log(f"clip: wall-clock limit at step {step}")
            break
    model.eval()
    with torch.no_grad():
        im = F.normalize(model.encode_image(_clip_tensor(xv, model)), dim=-1)
        tx = F.normalize(model.encode_text(tokenizer(capv)), dim=-1)
        sim = im @ tx.t()
        matched = sim.diag().mean().item()
        perm = torch.roll(torch.arange(len(capv)), 1)
        shuffled = sim[torch.arange(len(capv)), perm].mean().item()
        top1 = (sim.argmax(1) == torch.arange(len(capv))).float().mean().item()
    log(f"clip val: matched cos {matched:.3f}, shuffled cos {shuffled:.3f}, top1 text retrieval {top1:.3f}")
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              os.path.join(a.out, CLIP_FILE))
    write_json(os.path.join(a.out, "shapes-clip-tiny.metrics.json"), {
        "val_matched_cos": matched, "val_shuffled_cos": shuffled, "val_top1": top1, "steps": step + 1,
        "minutes": (time.time() - t0) / 60})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/shapes-eval")
    p.add_argument("--only", choices=["encoder", "clip"], default=None)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128, help="encoder batch size")
    p.add_argument("--encoder-steps", type=int, default=1500)
    p.add_argument("--clip-batch-size", type=int, default=256)
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=15.0, help="per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default="assets/shapes-build-logs/eval_models.log")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    log = Logger(a.log)
    seed_all(a.seed)
    log(f"args {vars(a)}")
    if a.only in (None, "encoder"):
        train_encoder(a, log)
    if a.only in (None, "clip"):
        train_clip(a, log)


if __name__ == "__main__":
    main()
