"""Measure the shapes teacher with the real StableDiffusionPipeline + DDIM at several step counts.

    HF_HUB_OFFLINE=1 python tools/shapes/teacher_quality.py --teacher assets/shapes-teacher --n 500 \
        --steps 1 2 4 8 25 50 --guidance-scale 3 --out tools/shapes/teacher_quality.md

A thin use of `stepdistill evaluate` (`run_evaluation`): the same generation (image i of the first --n test
captions uses seed --seed + i), the same metrics, only the table is this one. Prints and writes a markdown table:
FID in shapes-encoder features (against the real test images), CLIP score (100 x cosine, shapes CLIP), attribute
accuracy per attribute and all-correct, plus the real-vs-real floor (val vs test real images). Generated images and
evaluate's own report go to --images; a rerun resumes there (its "gen. s" then counts only what it generated).
"""
from __future__ import annotations

import argparse
import os

import common  # noqa: F401  (sets sys.path)
import torch

from stepdistill.data.shapes import ATTRIBUTE_NAMES
from stepdistill.evaluate import EvalOptions, ModelEntry, run_evaluation


def quality_table(report: dict, n: int, seed: int, sampler: str = "DDIM") -> str:
    """evaluate's report rows as the teacher-quality table (the real row first)."""
    rows = sorted(report["rows"], key=lambda r: r["role"] != "real")
    head = ("| model | steps | CFG | FID (shapes enc.) | CLIP score | " + " | ".join(ATTRIBUTE_NAMES)
            + " | all | gen. s |\n|" + "---|" * (7 + len(ATTRIBUTE_NAMES)) + "\n")
    lines = []
    for r in rows:
        acc = r["attribute_accuracy_detail"]
        real = r["role"] == "real"
        lines.append(f"| {'real (val vs test)' if real else 'teacher ' + sampler} | {'-' if real else r['steps']} | "
                     f"{'-' if real else r['guidance']} | {r['fid']:.3f} | {r['clip_score']:.2f} | "
                     + " | ".join(f"{acc[k]:.3f}" for k in ATTRIBUTE_NAMES)
                     + f" | {acc['all']:.3f} | {0.0 if real else r['generation_seconds_rank0']:.1f} |")
    return head + "\n".join(lines) + f"\n\n{n} images per row, test-split prompts, image i with seed {seed} + i.\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25, 50])
    p.add_argument("--guidance-scale", type=float, nargs="+", default=[3.0])
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--scheduler", default="ddim",
                   help="sampler: ddim (the UNet teachers), or FlowMatchEulerDiscreteScheduler for the flow teacher "
                        "(tools/shapes/train_flow_teacher.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (always fp32)")
    p.add_argument("--images", default="runs/teacher_quality", help="evaluate's output folder (images, report)")
    p.add_argument("--out", default="tools/shapes/teacher_quality.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    models = [ModelEntry(path=a.teacher, label=f"teacher-cfg{g:g}", steps=a.steps, scheduler=a.scheduler, guidance=g,
                         role="teacher") for g in a.guidance_scale]
    report = run_evaluation(EvalOptions(
        models=models, out=a.images, prompts="shapes:test", num_images=a.n, seed=a.seed, reference="shapes:test",
        floor_reference="shapes:val", backbone="shapes", clip_model="shapes", batch_size=a.batch_size,
        speed_batches=0, device=a.device, dtype="fp32"))
    sampler = "DDIM" if a.scheduler.lower() in ("ddim", "ddimscheduler") else (
        "flow Euler" if a.scheduler == "FlowMatchEulerDiscreteScheduler" else a.scheduler)
    table = quality_table(report, a.n, a.seed, sampler)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
