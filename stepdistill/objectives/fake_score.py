"""What DMD and VSD share beyond the noise-to-sample student (noise_student.py): a fake score trained online on the
student's samples (a LoRA adapter "fake" on the teacher's frozen UNet, or a full copy of it).

    L_fake = ||eps_fake(x_t) - eps||^2 on sg(x0), t ~ U[0, T)      (or the x0 target: fake_loss = "x0")

An N-step student has one fake score for the mixture of its N steps' outputs (DMD2), or with `fake_per_step` one
LoRA fake score per step ("fake", "fake_step1", ...), each trained on and judging that step's outputs alone (as
Phased DMD does per phase): matching only the mixture to the data lets one step's excess make up for another's
shortfall. Measured on the flow DiT (docs/objectives.md): it narrows the gap between step counts but is worse at
each, every adapter getting 1/N of the fake updates; so it is off by default.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import StudentConfig
from ..denoiser import Denoiser
from ..errors import StepdistillError
from ..losses import denoising_score_matching, l2
from ..models import adapter_state_kept, add_lora
from .base import Batch, TrainedNetwork
from .noise_student import NoiseStudentOptions, NoiseToSample, adapter_params

FAKE_ADAPTER = "fake"


def fake_adapter_name(step: int) -> str:
    """The LoRA fake score of student step `step` (with fake_per_step; step 0, and every step without it: "fake")."""
    return FAKE_ADAPTER if step == 0 else f"{FAKE_ADAPTER}_step{step}"


def add_fake_adapter(net, rank: int, alpha: float, targets: list[str] | None = None,
                     name: str = FAKE_ADAPTER) -> None:
    """Add a trainable fake-score LoRA adapter without disturbing the active adapter or its trainable flags
    (peft's add_adapter activates the new adapter and freezes the others)."""
    cfg = StudentConfig(type="lora", lora_rank=rank, lora_alpha=alpha)
    if targets:
        cfg.lora_targets = list(targets)
    with adapter_state_kept(net):
        add_lora(net, cfg, name)
    for p in adapter_params(net, name):
        p.requires_grad_(True)


@dataclass
class FakeScoreOptions(NoiseStudentOptions):
    guidance_scale: float = 3.0  # the real score's CFG scale (pred = uncond + w (cond - uncond))
    # the real score is guided only where t >= guidance_t_min T, below it it is the conditional prediction (scale 1):
    # guidance at low noise levels reshapes fine detail (Kynkaanniemi et al. 2024, guidance in a limited interval)
    guidance_t_min: float = 0.0
    t_min: float = 0.02  # the generator loss noises the student output to t ~ U[t_min T, t_max T]
    t_max: float = 0.98
    fake_lr: float | None = None  # default: train.lr
    fake_lora_rank: int = 16  # the fake score's LoRA on the teacher (fake_score=lora)
    fake_lora_alpha: float = 16.0
    fake_loss: Literal["eps", "x0"] = "eps"  # denoising score matching target of the fake score
    # N-step students: one LoRA fake score per step, trained on and judging that step's outputs (module docstring)
    fake_per_step: bool = False

    def check(self) -> None:
        super().check()
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise StepdistillError("objective.options needs 0 <= t_min <= t_max <= 1")
        if self.guidance_scale < 0:
            raise StepdistillError("objective.options.guidance_scale must be >= 0")
        if not 0 <= self.guidance_t_min <= 1:
            raise StepdistillError("objective.options.guidance_t_min must be in [0, 1]")
        if self.fake_lr is not None and self.fake_lr <= 0:
            raise StepdistillError("objective.options.fake_lr must be > 0")
        if self.fake_lora_rank < 1:
            raise StepdistillError("objective.options.fake_lora_rank must be >= 1")


class DistributionMatching(NoiseToSample):
    """What DMD and VSD share: a noise-to-sample student, and a fake score trained online on its samples."""

    fake_type: str = "lora"

    def __init__(self, setup, options):
        super().__init__(setup, options)
        teacher, o = setup.teacher, options
        per_step = o.fake_per_step and o.num_student_steps() > 1
        if per_step and self.fake_type != "lora":
            raise StepdistillError("objective.options.fake_per_step needs fake_score: lora (one adapter per step)")
        if self.fake_type == "lora":  # one frozen base: the teacher's network (also the LoRA student's)
            names = [fake_adapter_name(i) for i in range(o.num_student_steps() if per_step else 1)]
            for name in names:
                add_fake_adapter(teacher.net, o.fake_lora_rank, o.fake_lora_alpha, name=name)
            self.fake_module = teacher.net
            self.fakes = [Denoiser(teacher.net, self.schedule, adapter=name) for name in names]
            self.fake_params = [p for name in names for p in adapter_params(teacher.net, name)]
        else:  # a full trainable copy of the teacher, without the student's adapter
            fake = copy.deepcopy(teacher.net).float()
            if getattr(fake, "_hf_peft_config_loaded", False):
                fake.unload_lora()
            self.fake_module = fake.requires_grad_(True).train()
            self.fakes = [Denoiser(fake, self.schedule)]
            self.fake_params = list(fake.parameters())
        self.fake, self.fakes_train = self.fakes[0], self.fakes  # fakes_train: through the DDP wrapper once wrapped

    def networks(self) -> dict[str, TrainedNetwork]:
        o, lr = self.opt, self.setup.lr
        return {**super().networks(), "fake": TrainedNetwork(self.fake_module, o.fake_lr or lr, params=self.fake_params)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.fakes_train = [Denoiser(wrapped["fake"], self.schedule, module=f.module, adapter=f.adapter)
                            for f in self.fakes]

    def fake_index(self, sample) -> int:
        """Which fake score judges `sample`: its student step's with fake_per_step, else the one for all steps."""
        if len(self.fakes) == 1:
            return 0
        if self.sampler is not self and getattr(self.sampler, "timesteps", None) != self.timesteps:
            raise StepdistillError("objective.options.fake_per_step needs the term that draws the student to have "
                                   "the same student_timesteps")
        return sample.context["step"]

    def sample_t(self, b: int, gen: torch.Generator, device, t_max: float | None = None) -> torch.Tensor:
        t_max = self.opt.t_max if t_max is None else t_max
        lo, hi = int(self.opt.t_min * self.T), min(int(t_max * self.T), self.T - 1)
        return torch.randint(lo, hi + 1, (b,), generator=gen, device=device)

    def real_guidance(self, t: torch.Tensor) -> torch.Tensor | float:
        """The real score's CFG scale at timesteps t: guidance_scale, or 1 below guidance_t_min T."""
        w = self.opt.guidance_scale
        if self.opt.guidance_t_min <= 0:
            return w
        return torch.where(t >= self.opt.guidance_t_min * self.T, w, 1.0).float()

    # --- the fake score --------------------------------------------------------------------------------------
    def fake_score_inputs(self, batch: Batch, gen: torch.Generator):
        """(x0, t, eps, k) of a denoising step: detached student samples, t ~ U[0, T), noise, and the index k of
        the fake score that learns from them."""
        sample = self.sampler.draw_student(batch, gen, train=False)
        x0 = sample.x0
        t = torch.randint(0, self.T, (x0.shape[0],), generator=gen, device=x0.device)
        return x0, t, torch.randn(x0.shape, generator=gen, device=x0.device), self.fake_index(sample)

    def fake_loss(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Denoising score matching of the fake score on (detached) student samples."""
        x0, t, eps, k = self.fake_score_inputs(batch, gen)
        x0_pred, eps_pred = self.fakes_train[k].x0_eps(self.schedule.add_noise(x0, eps, t), t, batch.cond)
        return {"loss": self.score_matching_loss(x0_pred, eps_pred, x0, eps)}

    def score_matching_loss(self, x0_pred, eps_pred, x0, eps) -> torch.Tensor:
        return l2(eps_pred, eps).mean() if self.opt.fake_loss == "eps" else denoising_score_matching(x0_pred, x0)
