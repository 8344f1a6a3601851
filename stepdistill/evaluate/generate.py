"""Image generation for evaluation: through ``stepdistill.sampling`` (load_pipeline / generate), resumable and
sharded, plus the speed measurement.

Layout: ``OUT/<label>/steps_<N>/<index:05d>.png`` and ``meta.json`` (what produced the images). Images are
written atomically (temporary name, then rename) after each batch; a rerun skips every chunk whose images all
exist and regenerates the others whole, so a batch always holds the same images as in an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence

from PIL import Image

from ..errors import StepdistillError
from .dist import Dist, my_chunks


# ----------------------------------------------------------------------------------------------------------------
# sampling API: the lead's stepdistill.sampling, or a private fallback for plain diffusers pipelines
def sampling_api():
    """(load_pipeline, generate) from stepdistill.sampling, or this module's fallback when it is missing."""
    try:
        from .. import sampling

        return sampling.load_pipeline, sampling.generate
    except ImportError:
        return _fallback_load_pipeline, _fallback_generate


@dataclasses.dataclass
class _FallbackSpec:
    format: str
    scheduler_class: str
    scheduler_config: dict
    num_inference_steps: int
    timesteps: Optional[dict]
    guidance_scale: float
    lora_scale: float = 1.0
    base_model: Optional[str] = None
    resolution: Optional[int] = None
    objective: Optional[str] = None

    def nfe(self, steps: int) -> int:
        return steps * (2 if self.guidance_scale > 1.0 else 1)


_SCHEDULER_ALIASES = {"ddim": "DDIMScheduler", "lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
                      "dpm": "DPMSolverMultistepScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
                      "pndm": "PNDMScheduler", "tcd": "TCDScheduler"}


def _fallback_load_pipeline(model, *, device="cpu", dtype=None, scheduler=None, base_model=None,
                            guidance_scale=None):  # pragma: no cover - replaced by stepdistill.sampling
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype or torch.float32, safety_checker=None)
    except Exception as e:
        raise StepdistillError(f"cannot load pipeline '{model}': {type(e).__name__}: {str(e).splitlines()[0]}")
    if scheduler:
        cls = getattr(diffusers, _SCHEDULER_ALIASES.get(scheduler.lower(), scheduler), None)
        if cls is None:
            raise StepdistillError(f"unknown scheduler '{scheduler}'")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    spec = _FallbackSpec("pipeline", type(pipe.scheduler).__name__, dict(pipe.scheduler.config), 25, None,
                         float(7.5 if guidance_scale is None else guidance_scale))
    return pipe, spec


def _fallback_generate(pipe, spec, prompts, seeds, *, steps=None, guidance_scale=None, height=None, width=None,
                       batch_size=16):  # pragma: no cover - replaced by stepdistill.sampling
    import torch

    out = []
    g = spec.guidance_scale if guidance_scale is None else guidance_scale
    for s in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in seeds[s:s + batch_size]]
        res = pipe(list(prompts[s:s + batch_size]), num_inference_steps=steps or spec.num_inference_steps,
                   guidance_scale=g, generator=gens, height=height, width=width, output_type="pil")
        out.extend(res.images)
    return out


# ----------------------------------------------------------------------------------------------------------------
def image_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:05d}.png"


def _save_atomic(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _prompts_digest(prompts: Sequence[str], seeds: Sequence[int]) -> List[str]:
    return [hashlib.sha1(f"{s}|{p}".encode()).hexdigest()[:12] for p, s in zip(prompts, seeds)]


def check_meta(folder: Path, meta: dict, digests: List[str], overwrite: bool, dist: Dist) -> None:
    """Refuse to mix images made with other settings into a resumed folder (rank 0 checks and writes)."""
    error = None
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        mfile = folder / "meta.json"
        if mfile.exists() and not overwrite:
            try:
                old = json.loads(mfile.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            keys = [k for k in meta if k not in ("num_images", "items")]
            diff = [k for k in keys if old.get(k) != meta[k]]
            olditems = old.get("items", [])
            m = min(len(olditems), len(digests))
            if diff or olditems[:m] != digests[:m]:
                what = ", ".join(diff) if diff else "prompts/seeds"
                error = (f"'{folder}' holds images generated with different settings ({what}); "
                         "use another --out or pass --overwrite")
        elif overwrite:
            for p in folder.glob("*.png"):
                p.unlink()
        if error is None:
            tmp = folder / ".meta.json.tmp"
            tmp.write_text(json.dumps({**meta, "items": digests}, indent=1))
            os.replace(tmp, mfile)
    error = dist.broadcast(error)
    if error:
        raise StepdistillError(error)


def generate_folder(pipe, spec, generate_fn, prompts: Sequence[str], seeds: Sequence[int], folder: Path, *,
                    steps: int, guidance: Optional[float], batch_size: int, dist: Dist,
                    height: Optional[int] = None, width: Optional[int] = None, log=print) -> int:
    """Generate this rank's missing chunks into `folder`; returns how many images this rank generated."""
    made = 0
    n = len(prompts)
    mine = my_chunks(n, batch_size, dist)
    todo = [c for c in mine if not all(image_path(folder, i).exists() for i in c)]
    if len(todo) < len(mine):
        log(f"  [rank {dist.rank}] {folder.parent.name}/{folder.name}: {len(mine) - len(todo)} of {len(mine)} "
            "batches already there (resumed)")
    for k, c in enumerate(todo):
        idx = list(c)
        images = generate_fn(pipe, spec, [prompts[i] for i in idx], [int(seeds[i]) for i in idx], steps=steps,
                             guidance_scale=guidance, height=height, width=width, batch_size=len(idx))
        if len(images) != len(idx):
            raise RuntimeError(f"sampling.generate returned {len(images)} images for {len(idx)} prompts")
        for i, img in zip(idx, images):
            _save_atomic(img, image_path(folder, i))
        made += len(idx)
        if (k + 1) % max(1, len(todo) // 10) == 0 or k + 1 == len(todo):  # about ten progress lines
            log(f"  [rank {dist.rank}] {folder.parent.name}/{folder.name}: {made} images generated "
                f"({k + 1}/{len(todo)} batches)")
    return made


def measure_speed(pipe, spec, generate_fn, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                  guidance: Optional[float], batch_size: int, batches: int, device: str,
                  height=None, width=None) -> Optional[dict]:
    """Time full pipeline calls (text encoding + denoising + VAE decode + PIL conversion) of `batches` batches of
    `batch_size` prompts after one untimed warm-up batch; CUDA is synchronized around the timed region."""
    if batches <= 0:
        return None
    import torch

    def sync():
        if str(device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()

    bs = max(1, min(batch_size, len(prompts)))
    p = [prompts[i % len(prompts)] for i in range(bs)]
    s = [int(seeds[i % len(seeds)]) for i in range(bs)]
    generate_fn(pipe, spec, p, s, steps=steps, guidance_scale=guidance, height=height, width=width, batch_size=bs)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        generate_fn(pipe, spec, p, s, steps=steps, guidance_scale=guidance, height=height, width=width,
                    batch_size=bs)
    sync()
    dt = time.perf_counter() - t0
    n = batches * bs
    return {"ms_per_image": 1000.0 * dt / n, "images_per_s": n / dt, "timed_images": n, "batch_size": bs,
            "timed_batches": batches, "warmup_batches": 1, "seconds": dt}


def device_name(device: str) -> str:
    import platform

    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"
