"""What DMD and VSD share beyond the noise-to-sample student (noise_student.py): a fake score trained online on the
student's samples (a LoRA adapter "fake" on the teacher's frozen UNet, or a full copy of it).

    L_fake = ||eps_fake(x_t) - eps||^2 on sg(x0), t ~ U[0, T)      (or the x0 target: fake_loss = "x0")
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


def add_fake_adapter(net, rank: int, alpha: float, targets: list[str] | None = None) -> None:
    """Add the trainable "fake" LoRA adapter without disturbing the active adapter or its trainable flags
    (peft's add_adapter activates the new adapter and freezes the others)."""
    cfg = StudentConfig(type="lora", lora_rank=rank, lora_alpha=alpha)
    if targets:
        cfg.lora_targets = list(targets)
    with adapter_state_kept(net):
        add_lora(net, cfg, FAKE_ADAPTER)
    for p in adapter_params(net, FAKE_ADAPTER):
        p.requires_grad_(True)


@dataclass
class FakeScoreOptions(NoiseStudentOptions):
    guidance_scale: float = 3.0  # the real score's CFG scale (pred = uncond + w (cond - uncond))
    t_min: float = 0.02  # the generator loss noises the student output to t ~ U[t_min T, t_max T]
    t_max: float = 0.98
    fake_lr: float | None = None  # default: train.lr
    fake_lora_rank: int = 16  # the fake score's LoRA on the teacher (fake_score=lora)
    fake_lora_alpha: float = 16.0
    fake_loss: Literal["eps", "x0"] = "eps"  # denoising score matching target of the fake score
    def check(self) -> None:
        super().check()
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise StepdistillError("objective.options needs 0 <= t_min <= t_max <= 1")
        if self.guidance_scale < 0:
            raise StepdistillError("objective.options.guidance_scale must be >= 0")
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
        if self.fake_type == "lora":  # one frozen base: the teacher's network (also the LoRA student's)
            add_fake_adapter(teacher.net, o.fake_lora_rank, o.fake_lora_alpha)
            self.fake_module = teacher.net
            self.fake = Denoiser(teacher.net, self.schedule, adapter=FAKE_ADAPTER)
            self.fake_params = adapter_params(teacher.net, FAKE_ADAPTER)
        else:  # a full trainable copy of the teacher, without the student's adapter
            fake = copy.deepcopy(teacher.net).float()
            if getattr(fake, "_hf_peft_config_loaded", False):
                fake.unload_lora()
            self.fake_module = fake.requires_grad_(True).train()
            self.fake = Denoiser(fake, self.schedule)
            self.fake_params = list(fake.parameters())
        self.fake_train = self.fake

    def networks(self) -> dict[str, TrainedNetwork]:
        o, lr = self.opt, self.setup.lr
        return {**super().networks(), "fake": TrainedNetwork(self.fake_module, o.fake_lr or lr, params=self.fake_params)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.fake_train = Denoiser(wrapped["fake"], self.schedule, module=self.fake.module, adapter=self.fake.adapter)

    def sample_t(self, b: int, gen: torch.Generator, device, t_max: float | None = None) -> torch.Tensor:
        t_max = self.opt.t_max if t_max is None else t_max
        lo, hi = int(self.opt.t_min * self.T), min(int(t_max * self.T), self.T - 1)
        return torch.randint(lo, hi + 1, (b,), generator=gen, device=device)

    # --- the fake score --------------------------------------------------------------------------------------
    def fake_score_inputs(self, batch: Batch, gen: torch.Generator):
        """(x0, t, eps) of a denoising step: detached student samples, t ~ U[0, T), noise."""
        x0 = self.sampler.draw_student(batch, gen, train=False).x0
        t = torch.randint(0, self.T, (x0.shape[0],), generator=gen, device=x0.device)
        return x0, t, torch.randn(x0.shape, generator=gen, device=x0.device)

    def fake_loss(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Denoising score matching of the fake score on (detached) student samples."""
        x0, t, eps = self.fake_score_inputs(batch, gen)
        x0_pred, eps_pred = self.fake_train.x0_eps(self.schedule.add_noise(x0, eps, t), t, batch.cond)
        return {"loss": self.score_matching_loss(x0_pred, eps_pred, x0, eps)}

    def score_matching_loss(self, x0_pred, eps_pred, x0, eps) -> torch.Tensor:
        return l2(eps_pred, eps).mean() if self.opt.fake_loss == "eps" else denoising_score_matching(x0_pred, x0)
