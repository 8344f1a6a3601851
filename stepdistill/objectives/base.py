"""The Objective interface and registry.

An objective says which networks it trains (each with its own optimizer and update frequency), computes
named losses for a batch, and knows how its student must be sampled. The math lives in `losses(...)`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..config import Config, from_dict, load_config
from ..errors import StepdistillError

if TYPE_CHECKING:  # pragma: no cover
    from ..denoiser import Conditioning
    from ..models import Teacher
    from ..sampling import SamplingSpec


@dataclass
class Batch:
    prompts: list[str]
    cond: "Conditioning"
    uncond: "Conditioning"  # empty-prompt conditioning, one row per sample
    latents: torch.Tensor | None = None  # scaled VAE latents of real images (image-caption data only)


@dataclass
class StudentSample:
    """A student output that terms judge: x0 (with grad in the student's update), plus what the objective that drew
    it needs to score it (consistency: x_t, t and the guidance weight). In a composition it is drawn once per update
    and handed to every term."""

    x0: torch.Tensor
    context: dict = field(default_factory=dict)


@dataclass
class TrainedNetwork:
    """A network an objective trains: its parameters that require grad go to their own AdamW."""

    module: torch.nn.Module
    lr: float
    update_every: int = 1  # updated on steps where step % update_every == 0 (two time-scale updates)
    # The parameters to optimize; default: all of `module` that require grad. Networks that share one
    # module (LoRA student and LoRA fake score on one frozen base) name their own adapter's parameters here.
    params: list[torch.nn.Parameter] | None = None
    betas: tuple[float, float] | None = None  # None: train.adam_beta1 / adam_beta2
    weight_decay: float | None = None  # None: train.weight_decay


@dataclass
class DistillSetup:
    """What an objective is built from."""

    teacher: "Teacher"
    student: torch.nn.Module  # the student UNet (for LoRA: the teacher's UNet with the student adapter)
    student_type: str  # "lora" | "full" | "small" (a small student is a full student of another architecture)
    lr: float
    resolution: int
    device: torch.device
    max_steps: int = 0  # train.max_steps (objectives with stages split it)


@dataclass
class Stage:
    """One stage of a multi-stage run (a progressive round, a guided-distillation stage, a recipe's phase).

    The trainer runs stages back to back: when a stage's steps are done it exports the student (if `export`),
    calls `Objective.begin_stage(next, source)` and, if `reset_optimizers`, clears the optimizers' moments.
    Its position is checkpointed, so `resume` is exact across a boundary.
    """

    name: str  # also the export folder under RUN/stages/
    steps: int  # trainer steps in this stage
    export: bool = True
    reset_optimizers: bool = True


class Objective:
    name: ClassVar[str]
    Options: ClassVar[type]
    needs_images: ClassVar[bool] = False

    def __init__(self, setup: DistillSetup, options: Any):
        self.setup = setup
        self.opt = options

    @classmethod
    def parse_options(cls, options: dict):
        parsed = from_dict(cls.Options, options, "objective.options")
        if hasattr(parsed, "check"):
            parsed.check()
        return parsed

    # --- what is trained -------------------------------------------------------------------------------
    def networks(self) -> dict[str, TrainedNetwork]:
        raise NotImplementedError

    def use_wrapped(self, wrapped: dict[str, torch.nn.Module]) -> None:
        """The trainer hands back the accelerate-prepared (e.g. DDP) modules, by network name."""
        self.wrapped = wrapped

    # --- the math --------------------------------------------------------------------------------------
    def losses(self, network: str, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Named losses for updating `network`; "loss" is the one that is backpropagated. The student's are those
        of one drawn sample; other networks are the objective's own."""
        if network == "student":
            return self.student_losses(self.draw_student(batch, gen, train=True), batch, gen)
        raise NotImplementedError

    # --- the student's update, split so that terms of a composition share one draw ------------------------------
    def draw_student(self, batch: Batch, gen: torch.Generator, train: bool) -> StudentSample:
        """A student sample for this batch (with grad when `train`): what this objective's student loss scores."""
        raise NotImplementedError

    def student_losses(self, sample: StudentSample, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The student's named losses ("loss" backpropagated) for a sample drawn by `draw_student`; an objective
        that reads only `sample.x0` can score another objective's sample (it composes as a second term)."""
        raise NotImplementedError

    # Whether student_losses needs the sample's context from this objective's own draw_student (then it must be
    # the first term of a composition, the one that draws).
    needs_own_sample: ClassVar[bool] = False

    def after_update(self, network: str) -> None:
        """Called after each optimizer step of `network` (e.g. to move an EMA target)."""

    # --- stages ------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The run's stages in order; [] means one stage, the whole run."""
        return []

    def begin_stage(self, index: int, source: torch.nn.Module) -> None:
        """Called once when stage `index` starts (index 0 at the start of a fresh run, never on resume: the
        objective's state_dict carries what a stage set up). `source` holds the weights the last stage ended
        with (the EMA shadow when train.ema_decay > 0, else the live student)."""

    # --- extra state and sampling ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sampling_spec(self) -> "SamplingSpec":
        """How the student must be sampled: its `student_spec`, on the teacher's kind of scheduler."""
        from ..sampling import for_schedule

        teacher = self.setup.teacher
        return for_schedule(self.student_spec(), teacher.schedule, teacher.scheduler_config)

    def student_spec(self) -> "SamplingSpec":
        """The student's sampler on the VP grid (LCM / DDIM / Euler at explicit schedule times)."""
        raise NotImplementedError


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    REGISTRY[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise StepdistillError(f"unknown objective '{name}'{hint}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def check_objective_options(cfg: Config):
    """The objective's parsed Options for `cfg`; an unknown objective or a bad option raises a one-line
    StepdistillError. Cheap (no model is loaded), so a run calls it before anything else."""
    return get_objective(cfg.objective.name).parse_options(cfg.objective.options)


def load_run_config(path, overrides: list[str] = ()) -> Config:
    """`config.load_config` for a run: the config, with its objective's options checked too, so a typo in
    objective.options stops `stepdistill train` (or export) in one line before any model is loaded."""
    cfg = load_config(path, overrides)
    check_objective_options(cfg)
    return cfg
