"""CLI for ``stepdistill evaluate`` and ``stepdistill fid-stats``.

Wiring (stepdistill/cli.py)::

    from stepdistill.evaluate import cli as evaluate_cli
    evaluate_cli.add_parser(subparsers)   # registers BOTH "evaluate" (func=run) and "fid-stats" (func=run_fid_stats)
    ...
    return args.func(args)                # each returns an int exit code; raises StepdistillError

(``add_evaluate_parser`` / ``add_fid_stats_parser`` register one each, for a CLI that wants them apart.)

Standalone (no top-level CLI needed): ``python -m stepdistill.evaluate evaluate ...`` / ``... fid-stats ...``.

Examples::

    stepdistill evaluate exports/lcm-lora --steps 1,2,4 --teacher assets/shapes-teacher --teacher-steps 1,2,4,25
    stepdistill fid-stats /data/coco/val2014 -o coco_val2014_inception.npz --inception-weights pt_inception.pth
    accelerate launch -m stepdistill evaluate EXPORT --prompts captions_val2014.json --coco-subset 30000 ...
"""
from __future__ import annotations

import argparse
import sys

from ..errors import StepdistillError


def _steps(text: str | None, option: str = "--steps") -> list[int] | None:
    """Parsed here, not by argparse: its errors are a usage block, not the one `error:` line of every other."""
    if text is None or isinstance(text, list):
        return text
    try:
        out = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        out = None
    if not out or any(s < 1 for s in out):
        raise StepdistillError(f"{option} must be comma-separated positive integers like 1,2,4, got '{text}'")
    return out


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="+",
                   help="export folder (stepdistill.json), training run folder, or plain diffusers pipeline "
                        "(folder or hub id; the teacher baseline)")
    p.add_argument("--label", default=None, help="comma-separated labels for the MODELs (default: folder names)")
    p.add_argument("--steps", default=None,
                   help="step counts, e.g. 1,2,4 (default: the export's own step count)")
    p.add_argument("--scheduler", default=None,
                   help="scheduler for plain pipelines (ddim, DDIMScheduler, euler, ...); exports carry their own")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the export's)")
    p.add_argument("--base-model", default=None, help="base pipeline for LoRA exports (default: the export's)")
    p.add_argument("--teacher", default=None, help="also evaluate this pipeline (the teacher) for comparison")
    p.add_argument("--teacher-steps", default=None, help="teacher step counts (default: 25)")
    p.add_argument("--teacher-scheduler", default="auto",
                   help="teacher scheduler (default auto: DDIM, or a flow-matching teacher's own scheduler)")
    p.add_argument("--teacher-guidance", type=float, default=None, help="teacher guidance scale")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default="shapes:test",
                   help="shapes:SPLIT, a .txt (one per line), .jsonl, .csv, or COCO captions .json "
                        "(default: shapes:test)")
    g.add_argument("--prompt-column", default=None, help="jsonl/csv column (default: prompt, caption or text)")
    g.add_argument("--coco-subset", type=int, default=0,
                   help="COCO annotations: draw this many images (one caption each) with --seed "
                        "(default: --num-images)")
    g.add_argument("--num-images", type=int, default=1000, help="images per model and step count (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i; also seeds the COCO subset")
    g = p.add_argument_group("metrics")
    g.add_argument("--reference", default="auto",
                   help="FID reference: image folder, stats .npz (fid-stats), shapes:SPLIT, or none "
                        "(default: the shapes split of the prompts, else none)")
    g.add_argument("--reference-size", type=int, default=None,
                   help="number of reference images (shapes default: --num-images; folders: all)")
    g.add_argument("--floor-reference", default="auto",
                   help="second real set for the real-vs-real FID floor (default: shapes val<->test; none)")
    g.add_argument("--backbone", default="auto", choices=["auto", "inception", "shapes"],
                   help="FID features: inception (2048-d) or shapes (default: shapes for shapes references)")
    g.add_argument("--inception-weights", default=None,
                   help="local Inception weights (weights-inception-2015-12-05-6726825d.pth) for offline FID")
    g.add_argument("--clip-model", default="auto",
                   help="shapes, an open_clip model name (e.g. ViT-g-14), or none (default: shapes for shapes "
                        "prompts, else ViT-g-14)")
    g.add_argument("--clip-pretrained", default=None,
                   help="open_clip pretrained tag (laion2b_s34b_b88k) or local checkpoint path")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="feature extraction batch size (default 64)")
    g.add_argument("--speed-batches", type=int, default=2,
                   help="timed batches per step count after one warm-up batch; 0 skips timing (default 2)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: accelerate's / cuda if available)")
    g.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 (default: fp16 on cuda, fp32 on cpu)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--out", "-o", default="eval", help="output folder (default ./eval)")
    g.add_argument("--overwrite", action="store_true", help="discard images already in --out")
    g.add_argument("--quiet", action="store_true")


def add_parser(subparsers):
    """Register `evaluate` and `fid-stats`; returns the evaluate parser."""
    p = add_evaluate_parser(subparsers)
    add_fid_stats_parser(subparsers)
    return p


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser("evaluate", help="FID, CLIP score and speed across step counts",
                              description="Generate with one or more models at several step counts and report "
                                          "FID, CLIP score, attribute accuracy (shapes world) and speed.")
    _evaluate_arguments(p)
    p.set_defaults(func=run)
    return p


def add_fid_stats_parser(subparsers):
    p = subparsers.add_parser("fid-stats", help="precompute FID reference statistics (.npz)",
                              description="Compute mu/sigma of a reference image set once, for --reference.")
    p.add_argument("source", help="image folder, or shapes:SPLIT")
    p.add_argument("-o", "--output", required=True, help="output .npz (mu, sigma, n, backbone)")
    p.add_argument("--backbone", default="inception", choices=["inception", "shapes"])
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--num-images", type=int, default=None, help="use the first N images (sorted by path)")
    p.add_argument("--image-size", type=int, default=None, help="shapes:SPLIT render size (default 32)")
    p.add_argument("--coco-annotations", default=None,
                   help="COCO captions json: use only the images of the seeded subset evaluate would draw")
    p.add_argument("--coco-subset", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_fid_stats)
    return p


register = add_parser


def options_from_args(args):
    from .core import EvalOptions, ModelEntry

    labels = [s for s in (args.label or "").split(",") if s] if args.label else []
    if labels and len(labels) != len(args.model):
        raise StepdistillError(f"--label has {len(labels)} names for {len(args.model)} models; give one per model")
    steps, teacher_steps = _steps(args.steps), _steps(args.teacher_steps, "--teacher-steps")
    models = [ModelEntry(path=m, label=labels[i] if labels else None, steps=steps, scheduler=args.scheduler,
                         guidance=args.guidance, base_model=args.base_model) for i, m in enumerate(args.model)]
    if args.teacher:
        models.append(ModelEntry(path=args.teacher, label="teacher", steps=teacher_steps or [25],
                                 scheduler=args.teacher_scheduler, guidance=args.teacher_guidance, role="teacher"))
    for name in ("num_images", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise StepdistillError(f"--{name.replace('_', '-')} must be at least 1")
    return EvalOptions(models=models, out=args.out, prompts=args.prompts, prompt_column=args.prompt_column,
                       coco_subset=args.coco_subset, num_images=args.num_images, seed=args.seed,
                       reference=args.reference, reference_size=args.reference_size,
                       floor_reference=args.floor_reference, backbone=args.backbone,
                       inception_weights=args.inception_weights, clip_model=args.clip_model,
                       clip_pretrained=args.clip_pretrained, batch_size=args.batch_size,
                       eval_batch_size=args.eval_batch_size, speed_batches=args.speed_batches, device=args.device,
                       dtype=args.dtype, height=args.height, width=args.width, overwrite=args.overwrite,
                       quiet=args.quiet)


def run(args) -> int:
    from .core import run_evaluation

    run_evaluation(options_from_args(args))
    return 0


def run_fid_stats(args) -> int:
    import os

    from . import fid as fidmod
    from .core import reference_stats
    from .dist import Dist

    dist = Dist(args.device)
    device = args.device or dist.default_device
    files = None
    if args.coco_annotations:
        import json

        from .prompts import coco_subset

        if args.source.startswith("shapes"):
            raise StepdistillError("--coco-annotations needs an image folder (COCO val2014), not shapes:SPLIT")
        with open(args.coco_annotations, encoding="utf-8") as f:
            _, images = coco_subset(json.load(f), args.coco_subset, args.seed)
        files = [os.path.join(args.source, im["file_name"]) for im in images]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise StepdistillError(f"{len(missing)} subset images missing from '{args.source}' (first: "
                                   f"{missing[0]}); point SOURCE at the COCO val2014 image folder")
        from pathlib import Path

        files = [Path(f) for f in files]
    backbone = fidmod.load_backbone(args.backbone, args.inception_weights, device)
    st = reference_stats(args.source, backbone, dist, image_size=args.image_size, n=args.num_images,
                         batch_size=args.batch_size, files=files, use_cache=False,
                         log=print if dist.is_main else (lambda *a: None))
    if dist.is_main:
        st.save(args.output)
        print(f"wrote {args.output}: {st.n} images, backbone {st.backbone}, {st.mu.shape[0]} features")
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepdistill.evaluate")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
