"""The `stepdistill` command: train, export, sample, evaluate, benchmark, objectives."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import StepdistillError, TrainingInterrupted

DEFAULT_CONFIG = "configs/shapes/consistency_lora.yaml"


def _cmd_train(args) -> int:
    from .objectives import load_run_config
    from .trainer import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and not os.path.isfile(config) and ("=" in config or not config.endswith((".yaml", ".yml"))):
        # `train key=value ...` (or a mistyped `train key`): no CONFIG, so the override check names the problem
        config, overrides = None, [config, *overrides]
    if config is None:  # the bundled default, from any directory
        from .utils import BUNDLED_ROOTS, bundled_path

        config = bundled_path(DEFAULT_CONFIG)
        if not os.path.isfile(config):
            raise StepdistillError(f"the bundled default config '{DEFAULT_CONFIG}' is missing: not in this directory "
                                   f"nor in {' or '.join(str(r) for r in BUNDLED_ROOTS)}; give a CONFIG, or install "
                                   "stepdistill from its source tree (pip install -e .)")
    cfg = load_run_config(config, overrides)  # a typo in objective.options stops here, before any model
    run_dir = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"run folder: {run_dir}")
        samples = sorted((run_dir / "samples").glob("*.png"))
        if samples:
            print(f"sample grid: {samples[-1]}")
        if (run_dir / "export").is_dir():
            print(f"export: {run_dir / 'export'}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.format, args.out, args.checkpoint)
    print(f"export: {out}")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from .sampling import generate, load_pipeline
    from .utils import image_format, image_grid, save_image_atomic

    if args.num_images < 1:
        raise StepdistillError(f"--num-images must be at least 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise StepdistillError(f"--steps must be at least 1, got {args.steps}")
    image_format(args.out)  # an unknown image type stops here, not after sampling
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, spec = load_pipeline(args.model, device=device, scheduler=args.scheduler, base_model=args.base_model,
                               guidance_scale=args.guidance)
    prompts = args.prompt * args.num_images
    images = generate(pipe, spec, prompts, [args.seed + i for i in range(len(prompts))], steps=args.steps)
    save_image_atomic(image_grid(images), args.out)
    print(f"{len(images)} images ({args.steps or spec.num_inference_steps} steps, {spec.scheduler_class}, "
          f"guidance {spec.guidance_scale if args.guidance is None else args.guidance}): {args.out}")
    return 0


def _cmd_benchmark(args) -> int:
    import tempfile
    from pathlib import Path

    from .benchmark import markdown, run_benchmark, write_result
    from .objectives import load_run_config

    cfg = load_run_config(args.config, list(args.overrides))
    out = Path(args.out or Path("runs") / "benchmark" / cfg.name)
    from .utils import check_output_dir

    check_output_dir(out, "--out")
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's run folder: nothing of a benchmark is kept there
        cfg.train.output_dir, cfg.train.trackers = str(Path(tmp) / "run"), []
        result = run_benchmark(cfg, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                               teacher_memory=not args.no_teacher_memory, label=args.config)
    json_path, md_path = write_result(result, out)
    print(markdown(result))
    print(f"written: {json_path}, {md_path}")
    return 0


def _cmd_objectives(args) -> int:
    import dataclasses

    from .objectives import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        print(f"{name:14s} {getattr(cls, 'summary', '')}")
        if args.verbose and getattr(cls, "usage", None):
            print("\n".join("    " + line for line in cls.usage.splitlines()))
        elif args.verbose:
            for f in dataclasses.fields(cls.Options):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"    {f.name} = {default!r}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 2 like every other bad input (not a usage block)."""

    def error(self, message):
        raise StepdistillError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="stepdistill", description="Distil a many-step diffusion teacher into a few-step student.")
    p.add_argument("--version", action="version", version=f"stepdistill {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student from a YAML config")
    t.add_argument("config", nargs="?", default=None,
                   help=f"YAML config (default: the bundled {DEFAULT_CONFIG})")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="export a run's student as LoRA or a full pipeline")
    e.add_argument("run_dir")
    e.add_argument("--format", choices=["auto", "lora", "full"], default="auto")
    e.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint folder instead of the final weights")
    e.set_defaults(func=_cmd_export)

    s = sub.add_parser("sample", help="generate with an export, a run, or a diffusers pipeline")
    s.add_argument("model")
    s.add_argument("--prompt", action="append", required=True, help="repeatable")
    s.add_argument("--steps", type=int, default=None, help="default: the student's step count")
    s.add_argument("--guidance", type=float, default=None, help="default: the export's guidance scale")
    s.add_argument("--scheduler", default=None, help="override the scheduler (ddim, lcm, euler, or a class name)")
    s.add_argument("--base-model", default=None, help="base pipeline for a LoRA export (default: from the export)")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="grid.png")
    s.set_defaults(func=_cmd_sample)

    b = sub.add_parser("benchmark", help="time a training step phase by phase: overhead ratio and peak memory")
    b.add_argument("config", help="YAML config, as for train")
    b.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    b.add_argument("--steps", type=int, default=5, help="measured steps per round")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    b.add_argument("--repeats", type=int, default=3, help="rounds: STEPS steps, then one bare replay of each pass")
    b.add_argument("--no-teacher-memory", action="store_true", help="skip the teacher-alone memory process")
    b.add_argument("--out", default=None, help="folder for benchmark.json and benchmark.md "
                                               "(default: runs/benchmark/NAME)")
    b.set_defaults(func=_cmd_benchmark)

    o = sub.add_parser("objectives", help="list the registered objectives")
    o.add_argument("-v", "--verbose", action="store_true", help="show each objective's options")
    o.set_defaults(func=_cmd_objectives)

    from .evaluate import cli as evaluate_cli

    evaluate_cli.add_parser(sub)  # evaluate, fid-stats
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except StepdistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not args.verbose:
        from .utils import quiet_libraries  # here, not at the top: `stepdistill --help` needs no torch

        quiet_libraries()
    try:
        rc = int(args.func(args) or 0)
        from .evaluate.dist import release_process_group

        release_process_group()
        return rc
    except StepdistillError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # the trainer has printed the step and the checkpoint to resume from
        return err.exit_code  # 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
