"""Pixel statistics of evaluated image folders against a reference folder (same file names = same seeds):
mean, std, saturation (max - min over RGB), mean neighbour difference (sharpness), clipped fractions, and the
per-pixel MSE to the reference image of the same seed. For telling a global colour or sharpness shift apart from
a change in what is drawn.

    python tools/image_stats.py EVAL_DIR/teacher/steps_25 EVAL_DIR/MODEL/steps_1 EVAL_DIR/MODEL/steps_4 [--grid g.png]

--grid writes the first --n seeds of every folder side by side, one row per folder (3x nearest-neighbour), to see
what a statistic or FID is counting.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image


def load(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(f for f in folder.glob("*.png") if re.fullmatch(r"\d+\.png", f.name))  # not grids
    return {f.name: np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files}


def describe(images: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> str:
    x = np.stack(list(images.values()))
    sharp = np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()
    common = [k for k in images if k in ref]
    mse = np.mean([((images[k] - ref[k]) ** 2).mean() for k in common]) if common else float("nan")
    return (f"n={len(x)} mean {x.mean():.3f} std {x.std():.3f} saturation {(x.max(-1) - x.min(-1)).mean():.3f} "
            f"neighbour diff {sharp:.4f} >0.98 {(x > 0.98).mean():.3f} <0.02 {(x < 0.02).mean():.3f} "
            f"mse to reference {mse:.4f}")


def grid(folders: list[dict[str, np.ndarray]], n: int, out: Path, zoom: int = 3) -> None:
    names = sorted(folders[0])[:n]
    rows = [np.concatenate([f[k] for k in names], axis=1) for f in folders]
    img = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8).repeat(zoom, 0).repeat(zoom, 1)
    Image.fromarray(img).save(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path)
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--grid", type=Path, help="also write a side-by-side grid of the first --n seeds here")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args(argv)
    loaded = [load(f) for f in [args.reference, *args.folders]]
    for folder, images in zip([args.reference, *args.folders], loaded):
        print(f"{folder}: {describe(images, loaded[0])}")
    if args.grid:
        grid(loaded, args.n, args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
