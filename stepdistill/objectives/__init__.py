"""Distillation objectives, registered by name (`stepdistill objectives` lists them)."""
from .base import REGISTRY, Batch, DistillSetup, Objective, TrainedNetwork, get_objective, register
from . import consistency  # noqa: F401  (registers)
from . import dmd, vsd  # noqa: F401  (register)

__all__ = ["REGISTRY", "Batch", "DistillSetup", "Objective", "TrainedNetwork", "get_objective", "register"]
