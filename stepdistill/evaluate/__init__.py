"""Evaluation: FID, CLIP score, attribute accuracy (shapes world) and speed across step counts.

    stepdistill evaluate MODEL [MODEL ...] --steps 1,2,4 [--teacher PATH --teacher-steps 1,2,4,25] --out eval/
    stepdistill fid-stats DIR -o stats.npz

``frechet_distance`` (from ``stepdistill.frechet``) is the one Frechet distance every part of stepdistill uses.
"""
from ..frechet import frechet_distance
from .fid import FeatureStats, preprocess

__all__ = ["frechet_distance", "FeatureStats", "preprocess", "run_evaluation", "EvalOptions", "ModelEntry"]


def __getattr__(name):  # heavy imports only on use
    if name in ("run_evaluation", "EvalOptions", "ModelEntry"):
        from . import core

        return getattr(core, name)
    raise AttributeError(name)
