"""The evaluation run: generate per (model, step count), then FID / CLIP score / attribute accuracy / speed, then
the report. ``run_evaluation(EvalOptions(...))`` is what ``stepdistill evaluate`` calls; it runs the same under one
process or ``accelerate launch`` (see ``dist.py``)."""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import shapes_eval
from ..errors import StepdistillError
from ..sampling import load_pipeline, resolve_model
from ..utils import bundled_path, check_output_dir, quiet_libraries, resolve_dtype
from . import fid as fidmod
from .dist import Dist, sharded_map
from .generate import (_prompts_digest, check_meta, device_name, generate_folder, image_path, measure_speed,
                       weights_fingerprint)
from .prompts import load_prompts

FID_PROTOCOL = ("clean-fid style: images converted to RGB, center-cropped to square (references), resized with "
                "PIL bicubic to the backbone's input size, uint8; features in float64; unbiased covariance; "
                "scipy.linalg.sqrtm Frechet distance")
MIN_FID_IMAGES = 100  # below this, FID's small-sample bias dominates: a warning
SPEED_PROTOCOL = ("wall time of full pipeline calls (prompt encoding + all denoising steps + VAE decode + PIL "
                  "conversion) for the timed batches after one untimed warm-up batch, on rank 0, batch size as "
                  "listed; CUDA synchronized")


@dataclass
class ModelEntry:
    path: str
    label: str | None = None
    steps: list[int] | None = None  # None: the export's own num_inference_steps
    scheduler: str | None = None
    guidance: float | None = None
    role: str = "student"
    base_model: str | None = None  # LoRA exports: another base pipeline than the export names


@dataclass
class EvalOptions:
    models: list[ModelEntry]
    out: str = "eval"
    prompts: str = "shapes:test"
    prompt_column: str | None = None
    coco_subset: int = 0
    num_images: int = 1000
    seed: int = 0
    reference: str | None = "auto"          # folder / .npz / shapes:SPLIT / "none"; auto: shapes prompts -> same split
    reference_size: int | None = None       # shapes references: number of images (default num_images)
    floor_reference: str | None = "auto"    # second real set for the real-vs-real floor; auto: shapes val<->test
    backbone: str = "auto"                  # inception | shapes | auto (shapes for shapes references)
    inception_weights: str | None = None
    clip_model: str = "auto"                # shapes | open_clip name | none | auto
    clip_pretrained: str | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    speed_batches: int = 2
    device: str | None = None
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    overwrite: bool = False
    grid_images: int = 16
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def _labels(models: list[ModelEntry]) -> None:
    seen = set()
    for m in models:
        base = m.label or ("teacher" if m.role == "teacher" else Path(m.path.rstrip("/")).name or "model")
        base = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in base)
        label, k = base, 2
        while label in seen:
            label, k = f"{base}-{k}", k + 1
        seen.add(label)
        m.label = label


def _load_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def shapes_eval_available() -> bool:
    """True when the shapes world's committed evaluation models (assets/shapes-eval) are there."""
    return (shapes_eval.EVAL_DIR / shapes_eval.ENCODER_CONFIG).is_file()


def _attr_vector(res) -> list[float]:
    """attribute_accuracy's result as [all, per-attribute...] (dict with 'all', or a float)."""
    if isinstance(res, dict):
        keys = sorted(k for k in res if k != "all")
        overall = res.get("all", np.mean([res[k] for k in keys]))
        return [float(overall)] + [float(res[k]) for k in keys]
    return [float(res)]


def _attr_keys(res) -> list[str]:
    return ["all"] + sorted(k for k in res if k != "all") if isinstance(res, dict) else ["all"]


class Evaluator:
    def __init__(self, opts: EvalOptions):
        self.o = opts
        self.dist = Dist(opts.device)
        self.device = opts.device or self.dist.default_device
        if self.dist.world > 1 and self.device == "cuda":  # one GPU per process, not all on cuda:0
            self.device = self.dist.default_device
        self.out = Path(opts.out)
        self.log: Callable = (lambda *a: print(*a, flush=True)) if (self.dist.is_main and not opts.quiet) \
            else (lambda *a: None)

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        o, dist = self.o, self.dist
        quiet_libraries()
        if not o.models:
            raise StepdistillError("give at least one MODEL to evaluate")
        if o.num_images < 1:
            raise StepdistillError("--num-images must be at least 1")
        check_output_dir(self.out, "--out")  # before any model loads
        for m in o.models:  # a missing or wrong MODEL stops here, before --out is made and metric models load
            resolve_model(m.path)
        _labels(o.models)
        # COCO annotations: a seeded subset of --num-images images (one caption each) unless --coco-subset says
        pset = load_prompts(o.prompts, column=o.prompt_column, coco_subset_size=o.coco_subset or o.num_images,
                            seed=o.seed, num=o.num_images)
        prompts = pset.take(o.num_images)
        seeds = [o.seed + i for i in range(o.num_images)]
        shapes_split = pset.shapes_split
        reference = o.reference
        if reference == "auto":
            reference = f"shapes:{shapes_split}" if shapes_split else None
        if reference in ("none", ""):
            reference = None
        backbone_name = o.backbone
        if backbone_name == "auto":
            backbone_name = "shapes" if (reference or "").startswith("shapes") else "inception"
        clip_name, clip_pre = o.clip_model, o.clip_pretrained
        if clip_name == "auto":
            if shapes_split:
                clip_name = "shapes"
            else:
                from .clip_score import DEFAULT_CLIP

                clip_name, clip_pre = DEFAULT_CLIP[0], clip_pre or DEFAULT_CLIP[1]
        # metric models load first (on the CPU), so a missing weights file stops the run before hours of sampling
        backbone = fidmod.load_backbone(backbone_name, o.inception_weights, "cpu") if reference else None
        if reference and reference.endswith(".npz"):
            self._reference_stats(reference, backbone, None)
        elif reference and not reference.startswith("shapes"):
            fidmod.list_images(reference)
        scorer = None
        if clip_name and clip_name != "none":
            from .clip_score import load_clip

            scorer = load_clip(clip_name, clip_pre, "cpu")
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.log(f"evaluate: {len(o.models)} model(s), {o.num_images} images per step count, prompts {pset.source},"
                 f" {dist.world} process(es), device {self.device}")

        # 1. generation + speed -----------------------------------------------------------------------------------
        rows = []
        for entry in o.models:
            rows += self._generate_model(entry, prompts, seeds, pset.source)

        # 2. metrics --------------------------------------------------------------------------------------------------
        gen_size = None
        if rows:
            with Image.open(image_path(Path(rows[0]["folder"]), 0)) as im:
                gen_size = im.size[0]
        report = {
            "stepdistill_evaluate": 1,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": device_name(self.device),
            "processes": dist.world,
            "num_images": o.num_images,
            "seed": o.seed,
            "seeds": f"image i uses seed {o.seed} + i (same noise across step counts and models)",
            "prompts": pset.source,
            "image_size": gen_size,
            "speed_protocol": SPEED_PROTOCOL,
        }
        ref_stats = None
        if reference:
            backbone.to(self.device)
            ref_stats = self._reference_stats(reference, backbone, gen_size)
            report["fid"] = {"backbone": backbone.name, "backbone_image_size": backbone.image_size,
                             "reference": reference, "reference_images": ref_stats.n, "protocol": FID_PROTOCOL}
            floor_ref = o.floor_reference
            if floor_ref == "auto":
                floor_ref = None
                if reference.startswith("shapes:"):
                    split = reference.split(":", 1)[1]
                    floor_ref = {"test": "shapes:val", "val": "shapes:test"}.get(split, "shapes:test")
            if floor_ref and floor_ref != "none":
                floor_stats = self._reference_stats(floor_ref, backbone, gen_size)
                report["fid"]["floor"] = {"fid": floor_stats.fid(ref_stats), "between": [floor_ref, reference],
                                          "images": [floor_stats.n, ref_stats.n]}
        else:
            report["fid"] = None
            self.log("no --reference: FID skipped")
        if scorer is not None:
            scorer.to(self.device)
            report["clip"] = {"model": scorer.name, "score": "mean over images of 100 * max(cos(image, caption), 0)"}
        attr_fn = None
        if shapes_split and shapes_eval_available():
            attr_fn = shapes_eval.attribute_accuracy
        elif shapes_split:
            self.log("shapes evaluation models not found (assets/shapes-eval): attribute accuracy skipped")

        def metrics_for(load: Callable[[int], Image.Image], captions: list[str]) -> dict:
            res = {}
            n = len(captions)
            if backbone is not None:
                feats = sharded_map(n, o.eval_batch_size, lambda idx: backbone.features(
                    np.stack([fidmod.preprocess(load(i), backbone.image_size, crop=True) for i in idx])), dist)
                st = fidmod.FeatureStats.from_features(feats, backbone.name, backbone.image_size or 0)
                res["fid"] = st.fid(ref_stats)
            if scorer is not None:
                sc = sharded_map(n, o.eval_batch_size,
                                 lambda idx: scorer.scores([load(i) for i in idx], [captions[i] for i in idx]), dist)
                res["clip_score"] = float(np.mean(sc))
            if attr_fn is not None:
                keys = []

                def chunk_acc(idx):
                    r = attr_fn([load(i) for i in idx], [captions[i] for i in idx])
                    keys[:] = _attr_keys(r)
                    return np.array([[len(idx)] + _attr_vector(r)])

                acc = sharded_map(n, o.eval_batch_size, chunk_acc, dist)
                keys = dist.broadcast(keys)
                mean = (acc[:, 1:] * acc[:, :1]).sum(0) / acc[:, 0].sum()
                res["attribute_accuracy"] = float(mean[0])
                if len(keys) > 1:
                    res["attribute_accuracy_detail"] = {k: float(v) for k, v in zip(keys, mean)}
            return res

        if backbone is not None and o.num_images < MIN_FID_IMAGES and dist.is_main:
            print(f"warning: FID from {o.num_images} images is biased upward (it falls as the number of images grows): "
                  f"compare only at equal --num-images, and use at least {MIN_FID_IMAGES}", file=sys.stderr)
        for row in rows:
            folder = Path(row["folder"])
            row.update(metrics_for(lambda i, f=folder: _load_rgb(image_path(f, i)), prompts))
            self.log(f"  {row['label']} steps {row['steps']} (NFE {row['nfe']}): "
                     + ", ".join(f"{k} {row[k]:.4g}" for k in ("fid", "clip_score", "attribute_accuracy")
                                 if row.get(k) is not None))
        real_row = None
        if shapes_split and gen_size:
            from ..data.shapes import sample

            real = metrics_for(lambda i: sample(shapes_split, i, gen_size, 0)["image"], prompts)
            real.pop("fid", None)
            if report["fid"] and report["fid"].get("floor"):
                real["fid"] = report["fid"]["floor"]["fid"]
            if real:
                real_row = {"label": f"real ({pset.source})", "role": "real", "steps": None, "nfe": None, **real}
        report["rows"] = [{k: v for k, v in r.items()} for r in rows] + ([real_row] if real_row else [])

        # 3. report -----------------------------------------------------------------------------------------------
        if dist.is_main:
            from .report import write_report

            table = write_report(report, self.out, grid_images=o.grid_images)
            self.log(table)
            self.log(f"report: {self.out / 'report.md'}")
        dist.barrier()
        return report

    # ------------------------------------------------------------------------------------------------------------
    def _generate_model(self, entry: ModelEntry, prompts, seeds, prompt_source) -> list[dict]:
        o, dist = self.o, self.dist
        self.log(f"loading {entry.label}: {entry.path}")
        kw = {}
        if entry.scheduler:
            kw["scheduler"] = entry.scheduler
        if entry.guidance is not None:
            kw["guidance_scale"] = entry.guidance
        if entry.base_model:
            kw["base_model"] = entry.base_model
        pipe, spec = load_pipeline(entry.path, device=self.device, dtype=resolve_dtype(o.dtype, self.device), **kw)
        steps_list = entry.steps or [int(spec.num_inference_steps)]
        guidance = float(spec.guidance_scale if entry.guidance is None else entry.guidance)
        # cached images belong to the weights and the spec that made them: a re-export or retraining invalidates them
        path = bundled_path(entry.path)
        folders = [os.path.join(path, "export") if os.path.isfile(os.path.join(path, "run.json")) else path]
        if spec.format == "lora":
            folders.append(bundled_path(entry.base_model or spec.base_model or ""))
        weights = weights_fingerprint(folders) if dist.is_main else None
        spec_json = json.loads(json.dumps(spec.to_json()))
        rows = []
        for steps in steps_list:
            folder = self.out / entry.label / f"steps_{steps}"
            meta = {"model": os.path.abspath(entry.path) if os.path.exists(entry.path) else entry.path,
                    "steps": steps, "guidance": guidance, "scheduler": spec.scheduler_class,
                    "prompts": prompt_source, "batch_size": o.batch_size, "height": o.height, "width": o.width,
                    "num_images": o.num_images, "weights": weights, "spec": spec_json}
            digests = _prompts_digest(prompts, seeds)
            check_meta(folder, meta, digests, o.overwrite, dist)
            t0 = time.perf_counter()
            made = generate_folder(pipe, spec, prompts, seeds, folder, steps=steps,
                                   guidance=entry.guidance, batch_size=o.batch_size, dist=dist, height=o.height,
                                   width=o.width, log=self.log)
            gen_s = time.perf_counter() - t0
            made = int(sum(dist.all_gather(made)))
            speed = None
            if dist.is_main and o.speed_batches > 0:
                speed = measure_speed(pipe, spec, prompts, seeds, steps=steps, guidance=entry.guidance,
                                      batch_size=o.batch_size, batches=o.speed_batches, device=self.device,
                                      height=o.height, width=o.width)
            speed = dist.broadcast(speed)
            rows.append({"label": entry.label, "role": entry.role, "model": meta["model"], "steps": steps,
                         "nfe": spec.nfe(steps, guidance), "guidance": guidance,
                         "scheduler": spec.scheduler_class, "format": spec.format,
                         "folder": str(folder), "generated_now": made,
                         "generation_seconds_rank0": gen_s, "speed": speed})
        del pipe
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
        return rows

    # ------------------------------------------------------------------------------------------------------------
    def _reference_stats(self, ref: str, backbone, gen_size: int | None) -> "fidmod.FeatureStats":
        o, dist = self.o, self.dist
        if ref.endswith(".npz"):
            if not os.path.isfile(ref):
                raise StepdistillError(f"reference statistics '{ref}' do not exist")
            st = fidmod.FeatureStats.load(ref)
            if st.backbone not in (backbone.name, "unknown"):
                raise StepdistillError(f"'{ref}' was computed with backbone {st.backbone}, not {backbone.name}; "
                                       f"recompute it with `stepdistill fid-stats ... --backbone`")
            return st
        return reference_stats(ref, backbone, dist, image_size=gen_size,
                               n=o.reference_size or (o.num_images if ref.startswith("shapes") else None),
                               batch_size=o.eval_batch_size, log=self.log)


def reference_stats(ref: str, backbone, dist: Dist, *, image_size: int | None = None, n: int | None = None,
                    batch_size: int = 64, files: list | None = None, log=print,
                    use_cache: bool = True) -> "fidmod.FeatureStats":
    """Statistics of a real image set (shapes:SPLIT or a folder), cached under $STEPDISTILL_CACHE/fid-stats."""
    if ref.startswith("shapes"):
        from ..data.shapes import SPLITS, sample

        split = ref.split(":", 1)[1] if ":" in ref else "test"
        if split not in SPLITS:
            raise StepdistillError(f"unknown shapes split '{split}'; use one of {', '.join(SPLITS)}")
        size = image_size or 32
        n = n or 10_000
        key = fidmod.cache_key("shapes", split, n, size, backbone.name, backbone.image_size)
        load = lambda i: sample(split, i, size, 0)["image"]  # noqa: E731
        source = f"shapes:{split} ({n} images, {size}px)"
    else:
        if files is None:
            files = fidmod.list_images(ref)
        if n:
            files = files[:n]
        n = len(files)
        key = fidmod.cache_key("folder", os.path.abspath(ref), fidmod.folder_fingerprint(files), backbone.name,
                               backbone.image_size)
        load = lambda i: _load_rgb(files[i])  # noqa: E731
        source = f"{ref} ({n} images)"
    cached = fidmod.cache_dir() / f"{key}.npz"
    have = dist.broadcast(cached.exists() if use_cache else False)
    if have:
        log(f"reference statistics (cached): {source}")
        return fidmod.FeatureStats.load(cached)
    log(f"reference statistics: {source} with {backbone.name}")
    feats = sharded_map(n, batch_size, lambda idx: backbone.features(
        np.stack([fidmod.preprocess(load(i), backbone.image_size, crop=True) for i in idx])), dist)
    st = fidmod.FeatureStats.from_features(feats, backbone.name, backbone.image_size or 0, source)
    if dist.is_main and use_cache:
        try:
            st.save(cached)
        except OSError as e:  # a read-only cache is not fatal
            print(f"warning: cannot cache reference statistics at {cached}: {e}", file=sys.stderr)
    return st


def run_evaluation(opts: EvalOptions) -> dict:
    return Evaluator(opts).run()
