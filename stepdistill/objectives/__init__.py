"""Distillation objectives, registered by name (`stepdistill objectives` lists them)."""
from .base import (REGISTRY, Batch, DistillSetup, Objective, Stage, StudentSample, TrainedNetwork, check_objective_options,
                   get_objective, load_run_config, register)
from . import consistency  # noqa: F401  (registers)
from . import adversarial, compose, dmd, progressive, vsd  # noqa: F401  (register)

__all__ = ["REGISTRY", "Batch", "DistillSetup", "Objective", "Stage", "StudentSample", "TrainedNetwork", "check_objective_options",
           "get_objective", "load_run_config", "register"]
