"""Variational score distillation for one-step text-to-image students (SwiftBrush).

The student maps pure noise x_T (conditioned on timestep T - 1, or `student_timesteps`) to x0. A LoRA on the
teacher (the "fake" score, as in ProlificDreamer) tracks the student's output distribution by denoising score
matching; the student follows

    x_t    = alpha_t x0 + sigma_t eps,               t ~ U[t_min T, t_max T]
    grad   = w(t) (eps_teacher_cfg(x_t) - eps_fake(x_t)),   w(t) = sigma_t^2 (= 1 - alpha_bar_t) by default
    L_G    = 0.5 ||x0 - sg(x0 - grad)||^2
    L_fake = ||eps_fake(x_t') - eps'||^2 on sg(x0)

Needs only prompts. Student and fake score alternate (ttur = 1) or the student is updated every `ttur` steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import StepdistillError
from ..losses import distribution_matching_surrogate, vsd_gradient
from .base import Batch, register
from .fake_score import DistributionMatching, FakeScoreOptions


@dataclass
class VSDOptions(FakeScoreOptions):
    guidance_scale: float = 4.5  # SwiftBrush's teacher CFG
    weighting: Literal["sigma2", "uniform", "dmd"] = "sigma2"  # w(t): 1 - alpha_bar_t, 1, or DMD's normaliser

    def check(self) -> None:
        super().check()
        if self.weighting not in ("sigma2", "uniform", "dmd"):
            raise StepdistillError("objective.options.weighting must be sigma2, uniform or dmd")


@register
class VSD(DistributionMatching):
    name = "vsd"
    Options = VSDOptions
    needs_images = False
    summary = "SwiftBrush: one-step student by variational score distillation against a LoRA fake score"
    fake_type = "lora"

    def losses(self, network: str, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if network == "fake":
            return self.fake_loss(batch, gen)
        return super().losses(network, batch, gen)

    def student_losses(self, sample, batch, gen):
        return self.generator_losses(sample.x0, batch, gen, self.fake_index(sample))

    def weight(self, x0, x0_real, t) -> torch.Tensor:
        kind = self.opt.weighting
        if kind == "sigma2":
            return self.schedule.alpha_sigma(t)[1].to(x0.device) ** 2
        if kind == "uniform":
            return torch.ones(x0.shape[0], device=x0.device)
        # "dmd": in eps units, x0_fake - x0_real = sigma/alpha (eps_real - eps_fake); normalise like DMD
        a, s = (v.to(x0.device) for v in self.schedule.alpha_sigma(t))
        return (s / a) / (x0.float() - x0_real.float()).abs().flatten(1).mean(1).clamp_min(1e-8)

    def generator_losses(self, x0: torch.Tensor, batch: Batch, gen: torch.Generator,
                         k: int = 0) -> dict[str, torch.Tensor]:
        b, dev = x0.shape[0], x0.device
        t = self.sample_t(b, gen, dev)
        x_t = self.schedule.add_noise(x0.detach(), torch.randn(x0.shape, generator=gen, device=dev), t)
        with torch.no_grad():
            x0_real, eps_real = self.teacher.guided_x0_eps(x_t, t, batch.cond, batch.uncond, self.real_guidance(t))
            _, eps_fake = self.fakes[k].x0_eps(x_t, t, batch.cond)
        grad = vsd_gradient(eps_real, eps_fake, self.weight(x0, x0_real, t))
        loss = distribution_matching_surrogate(x0, grad).mean() / x0[0].numel()
        return {"loss": loss, "vsd_loss": loss.detach()}
