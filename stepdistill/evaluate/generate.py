"""Image generation for evaluation: through ``stepdistill.sampling`` (load_pipeline / generate), resumable and
sharded, plus the speed measurement.

Layout: ``OUT/<label>/steps_<N>/<index:05d>.png`` and ``meta.json`` (what produced the images). Images are
written atomically (temporary name, then rename) after each batch; a rerun skips every chunk whose images all
exist and regenerates the others whole, so a batch always holds the same images as in an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import StepdistillError
from ..sampling import generate
from ..utils import save_image_atomic
from .dist import Dist, my_chunks


def image_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:05d}.png"


def _prompts_digest(prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    return [hashlib.sha1(f"{s}|{p}".encode()).hexdigest()[:12] for p, s in zip(prompts, seeds)]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MB = 1 << 20


def weights_fingerprint(folders: Sequence[str | os.PathLike]) -> str | None:
    """What a model's images came from: each weight file's name, size and mtime, and its content hash (the whole
    file up to 8 MB, else its first and last MB). None when no folder is local (a hub id)."""
    h, found = hashlib.sha256(), 0
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for p in sorted(Path(folder).rglob("*")):
            if p.suffix not in WEIGHT_SUFFIXES or not p.is_file():
                continue
            st = p.stat()
            h.update(f"{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            with open(p, "rb") as f:
                if st.st_size <= 8 * _MB:
                    h.update(f.read())
                else:
                    h.update(f.read(_MB))
                    f.seek(-_MB, os.SEEK_END)
                    h.update(f.read())
            found += 1
    return h.hexdigest()[:24] if found else None


def check_meta(folder: Path, meta: dict, digests: list[str], overwrite: bool, dist: Dist) -> None:
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


def generate_folder(pipe, spec, prompts: Sequence[str], seeds: Sequence[int], folder: Path, *,
                    steps: int, guidance: float | None, batch_size: int, dist: Dist,
                    height: int | None = None, width: int | None = None, log=print) -> int:
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
        images = generate(pipe, spec, [prompts[i] for i in idx], [int(seeds[i]) for i in idx], steps=steps,
                          guidance_scale=guidance, height=height, width=width, batch_size=len(idx))
        if len(images) != len(idx):
            raise RuntimeError(f"sampling.generate returned {len(images)} images for {len(idx)} prompts")
        for i, img in zip(idx, images):
            save_image_atomic(img, image_path(folder, i))
        made += len(idx)
        if (k + 1) % max(1, len(todo) // 10) == 0 or k + 1 == len(todo):  # about ten progress lines
            log(f"  [rank {dist.rank}] {folder.parent.name}/{folder.name}: {made} images generated "
                f"({k + 1}/{len(todo)} batches)")
    return made


def measure_speed(pipe, spec, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                  guidance: float | None, batch_size: int, batches: int, device: str,
                  height=None, width=None) -> dict | None:
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
    generate(pipe, spec, p, s, steps=steps, guidance_scale=guidance, height=height, width=width, batch_size=bs)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        generate(pipe, spec, p, s, steps=steps, guidance_scale=guidance, height=height, width=width, batch_size=bs)
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
