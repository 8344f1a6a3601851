"""Shared helpers for the shapes-world build scripts."""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stepdistill.data.shapes import shapes_arrays  # noqa: E402


class Logger:
    """Print and append to a log file."""

    def __init__(self, path: str | None):
        self.path = path
        self.t0 = time.time()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, *msg):
        line = f"[{time.time() - self.t0:7.1f}s] " + " ".join(str(m) for m in msg)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def images_tensor(split: str, n: int, size: int = 32, seed: int = 0, start: int = 0):
    """(float tensor (n,3,H,W) in [-1,1], captions, labels dict of int64 tensors)."""
    imgs, caps, labs = shapes_arrays(split, n, size=size, seed=seed, start=start)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, caps, {k: torch.from_numpy(v) for k, v in labs.items()}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
