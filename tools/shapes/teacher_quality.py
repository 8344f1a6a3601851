"""Measure the shapes teacher with the real StableDiffusionPipeline + DDIM at several step counts.

    HF_HUB_OFFLINE=1 python tools/shapes/teacher_quality.py --teacher assets/shapes-teacher --n 500 \
        --steps 1 2 4 8 25 50 --guidance-scale 3 --out tools/shapes/teacher_quality.md

Prints and writes a markdown table: FID in shapes-encoder features (against real test images), CLIP score
(100 x cosine, shapes CLIP), attribute accuracy per attribute and all-correct, plus the real-vs-real floor
(val vs test real images). Prompts are the first --n captions of the test split; generation is seeded.
"""
from __future__ import annotations

import argparse
import os
import time

import common  # noqa: F401  (sets sys.path)
import numpy as np
import torch
from common import Logger

from stepdistill.data.shapes import ATTRIBUTE_NAMES, shapes_arrays
from stepdistill.evaluate.fid import frechet_distance
from stepdistill.shapes_eval import (attribute_accuracy, clip_score, encoder_features, feature_stats,
                                     load_shapes_clip, load_shapes_encoder)


def generate(pipe, prompts, steps, guidance, seed, batch_size):
    out = []
    for i in range(0, len(prompts), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(list(prompts[i:i + batch_size]), height=32, width=32, num_inference_steps=steps,
                   guidance_scale=guidance, generator=g, output_type="np")
        out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--eval-dir", default="assets/shapes-eval")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25, 50])
    p.add_argument("--guidance-scale", type=float, nargs="+", default=[3.0])
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="tools/shapes/teacher_quality.md")
    p.add_argument("--log", default="assets/shapes-build-logs/teacher_quality.log")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    log = Logger(a.log)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(a.teacher)
    pipe.set_progress_bar_config(disable=True)
    enc = load_shapes_encoder(a.eval_dir)
    clip = load_shapes_clip(a.eval_dir)
    real_test, prompts, _ = shapes_arrays("test", a.n)
    real_val, _, _ = shapes_arrays("val", a.n)
    ref = feature_stats(encoder_features(real_test, enc))
    rows = []
    floor = frechet_distance(*feature_stats(encoder_features(real_val, enc)), *ref)
    acc = attribute_accuracy(real_test, prompts, enc)
    rows.append(("real (val vs test)", "-", "-", floor, clip_score(real_test, prompts, clip), acc, 0.0))
    log(f"real floor FID {floor:.3f} acc {acc}")
    for cfg in a.guidance_scale:
        for steps in a.steps:
            t0 = time.time()
            imgs = generate(pipe, prompts, steps, cfg, a.seed, a.batch_size)
            dt = time.time() - t0
            fid = frechet_distance(*feature_stats(encoder_features(imgs, enc)), *ref)
            acc = attribute_accuracy(imgs, prompts, enc)
            cs = clip_score(imgs, prompts, clip)
            rows.append(("teacher DDIM", steps, cfg, fid, cs, acc, dt))
            log(f"steps {steps} cfg {cfg}: FID {fid:.3f} CLIP {cs:.2f} acc {acc} ({dt:.1f}s)")
    head = ("| model | steps | CFG | FID (shapes enc.) | CLIP score | " + " | ".join(ATTRIBUTE_NAMES)
            + " | all | gen. s |\n|" + "---|" * (7 + len(ATTRIBUTE_NAMES)) + "\n")
    lines = [f"| {m} | {s} | {c} | {f:.3f} | {cs:.2f} | " + " | ".join(f"{acc[k]:.3f}" for k in ATTRIBUTE_NAMES)
             + f" | {acc['all']:.3f} | {dt:.1f} |" for m, s, c, f, cs, acc, dt in rows]
    table = head + "\n".join(lines) + f"\n\n{a.n} images per row, test-split prompts, seed {a.seed}.\n"
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
