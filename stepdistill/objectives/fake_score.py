"""What DMD and VSD share: a noise-to-sample student and its multistep rollout, and a fake score trained online on
the student's samples (a LoRA adapter "fake" on the teacher's frozen UNet, or a full copy of it).

    x_T ~ N(0, I);  x0 = G(x_T, t_0);  step i > 0: x = alpha x0 + sigma eps at t_i (LCMScheduler's re-noising)
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
from ..models import STUDENT_ADAPTER, adapter_state_kept, add_lora
from ..sampling import SamplingSpec, lcm_config_for
from .base import Batch, Objective, TrainedNetwork

FAKE_ADAPTER = "fake"


def adapter_params(unet, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".{adapter}." in n]


def add_fake_adapter(unet, rank: int, alpha: float, targets: list[str] | None = None) -> None:
    """Add the trainable "fake" LoRA adapter without disturbing the active adapter or its trainable flags
    (peft's add_adapter activates the new adapter and freezes the others)."""
    cfg = StudentConfig(type="lora", lora_rank=rank, lora_alpha=alpha)
    if targets:
        cfg.lora_targets = list(targets)
    with adapter_state_kept(unet):
        add_lora(unet, cfg, FAKE_ADAPTER)
    for p in adapter_params(unet, FAKE_ADAPTER):
        p.requires_grad_(True)


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced timesteps from T - 1 down (999, 749, 499, 249 for 4 of 1000)."""
    return [num_train_timesteps - 1 - i * num_train_timesteps // steps for i in range(steps)]


@dataclass
class FakeScoreOptions:
    guidance_scale: float = 3.0  # the real score's CFG scale (pred = uncond + w (cond - uncond))
    t_min: float = 0.02  # the generator loss noises the student output to t ~ U[t_min T, t_max T]
    t_max: float = 0.98
    ttur: int = 1  # the generator is updated every `ttur` steps, the fake score (and discriminator) every step
    fake_lr: float | None = None  # default: train.lr
    fake_lora_rank: int = 16  # the fake score's LoRA on the teacher (fake_score=lora)
    fake_lora_alpha: float = 16.0
    fake_loss: Literal["eps", "x0"] = "eps"  # denoising score matching target of the fake score
    # The timesteps the student is conditioned on, one per step (default: the trailing grid 999, 749, ...). Its
    # input at the first one is pure noise whatever the timestep; a lower one (DMD2's one-step SDXL: 399) helps
    # where alpha_T is tiny, because an eps-prediction UNet's x0 = (x - sigma eps) / alpha amplifies eps errors
    # by sigma / alpha (160x at t = 999 of the linear-beta DDPM schedule, 15x for SD's scaled_linear).
    student_timesteps: list[int] | None = None

    def num_student_steps(self) -> int:
        return 1

    def check(self) -> None:
        ts = self.student_timesteps
        if ts is not None and (len(ts) != self.num_student_steps() or any(b >= a for a, b in zip(ts, ts[1:]))
                               or min(ts) < 0):
            raise StepdistillError(f"objective.options.student_timesteps must list {self.num_student_steps()} "
                                   "strictly decreasing timesteps >= 0")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise StepdistillError("objective.options needs 0 <= t_min <= t_max <= 1")
        if self.ttur < 1:
            raise StepdistillError("objective.options.ttur must be >= 1")
        if self.guidance_scale < 0:
            raise StepdistillError("objective.options.guidance_scale must be >= 0")
        if self.fake_lr is not None and self.fake_lr <= 0:
            raise StepdistillError("objective.options.fake_lr must be > 0")
        if self.fake_lora_rank < 1:
            raise StepdistillError("objective.options.fake_lora_rank must be >= 1")


class DistributionMatching(Objective):
    """What DMD and VSD share: a noise-to-sample student, a teacher, a fake score trained online on the student's
    samples, and the student's sampling spec (LCM-style multistep on exactly the trained timesteps)."""

    fake_type: str = "lora"

    def __init__(self, setup, options):
        super().__init__(setup, options)
        teacher, o = setup.teacher, options
        self.T = teacher.schedule.num_train_timesteps
        self.schedule = teacher.schedule
        ts = o.student_timesteps or trailing_timesteps(self.T, o.num_student_steps())
        if max(ts) >= self.T:
            raise StepdistillError(f"objective.options.student_timesteps must be < {self.T}")
        self._timesteps = [int(t) for t in ts]
        if getattr(setup.student.config, "time_cond_proj_dim", None) is not None:
            raise StepdistillError(f"objective '{self.name}' trains students without a guidance embedding; "
                                   "set student.guidance_embedding=false")
        self.lora = setup.student_type == "lora"
        self.student = Denoiser(setup.student, self.schedule, adapter=STUDENT_ADAPTER if self.lora else None)
        self.student_params = adapter_params(setup.student, STUDENT_ADAPTER) if self.lora else None
        if self.fake_type == "lora":  # one frozen base: the teacher's UNet (also the LoRA student's)
            add_fake_adapter(teacher.unet, o.fake_lora_rank, o.fake_lora_alpha)
            self.fake_module = teacher.unet
            self.fake = Denoiser(teacher.unet, self.schedule, adapter=FAKE_ADAPTER)
            self.fake_params = adapter_params(teacher.unet, FAKE_ADAPTER)
        else:  # a full trainable copy of the teacher, without the student's adapter
            fake = copy.deepcopy(teacher.unet).float()
            if getattr(fake, "_hf_peft_config_loaded", False):
                fake.unload_lora()
            self.fake_module = fake.requires_grad_(True).train()
            self.fake = Denoiser(fake, self.schedule)
            self.fake_params = list(fake.parameters())
        self.teacher = teacher.denoiser()
        self.student_train, self.fake_train = self.student, self.fake
        vae = teacher.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = setup.resolution // factor
        self.latent_shape = (setup.student.config.in_channels, size, size)

    # --- networks ------------------------------------------------------------------------------------------
    def networks(self) -> dict[str, TrainedNetwork]:
        o, lr = self.opt, self.setup.lr
        return {"student": TrainedNetwork(self.setup.student, lr, update_every=o.ttur, params=self.student_params),
                "fake": TrainedNetwork(self.fake_module, o.fake_lr or lr, params=self.fake_params)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.student_train = Denoiser(wrapped["student"], self.schedule, unet=self.student.unet, adapter=self.student.adapter)
        self.fake_train = Denoiser(wrapped["fake"], self.schedule, unet=self.fake.unet, adapter=self.fake.adapter)

    # --- the student as a sampler --------------------------------------------------------------------------
    @property
    def timesteps(self) -> list[int]:
        return self._timesteps

    def _t(self, t: int, b: int, device) -> torch.Tensor:
        return torch.full((b,), int(t), device=device, dtype=torch.long)

    def student_x0(self, x, t: int, cond, train: bool = False) -> torch.Tensor:
        den = self.student_train if train else self.student
        return den.x0_eps(x, self._t(t, x.shape[0], x.device), cond)[0]

    @torch.no_grad()
    def rollout(self, x_T: torch.Tensor, cond, steps: int, gen: torch.Generator) -> torch.Tensor:
        """The input of step `steps`: the student run from x_T through its first `steps` timesteps, each x0
        prediction re-noised with fresh noise to the next timestep (LCMScheduler's multistep sampling)."""
        x, ts = x_T, self.timesteps
        for j in range(steps):
            x0 = self.student_x0(x, ts[j], cond)
            noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            x = self.schedule.add_noise(x0, noise, self._t(ts[j + 1], x.shape[0], x.device))
        return x

    def student_sample(self, batch: Batch, gen: torch.Generator, train: bool) -> torch.Tensor:
        """x0 of a random step i of the student (always 0 for a one-step student), with grad when `train`."""
        b, dev = len(batch.cond), batch.cond.embeds.device
        ts = self.timesteps
        i = int(torch.randint(0, len(ts), (1,), generator=gen, device=dev)) if len(ts) > 1 else 0
        x = torch.randn((b, *self.latent_shape), generator=gen, device=dev)
        if i > 0 and not getattr(self.opt, "backward_simulation", True):  # DMD2 without simulation: real x_t
            x = self.schedule.add_noise(batch.latents, x, self._t(ts[i], b, dev))
        else:
            x = self.rollout(x, batch.cond, i, gen)
        with torch.set_grad_enabled(train):
            return self.student_x0(x, ts[i], batch.cond, train=train)

    def sample_t(self, b: int, gen: torch.Generator, device, t_max: float | None = None) -> torch.Tensor:
        t_max = self.opt.t_max if t_max is None else t_max
        lo, hi = int(self.opt.t_min * self.T), min(int(t_max * self.T), self.T - 1)
        return torch.randint(lo, hi + 1, (b,), generator=gen, device=device)

    # --- the fake score --------------------------------------------------------------------------------------
    def fake_score_inputs(self, batch: Batch, gen: torch.Generator):
        """(x0, t, eps) of a denoising step: detached student samples, t ~ U[0, T), noise."""
        x0 = self.student_sample(batch, gen, train=False)
        t = torch.randint(0, self.T, (x0.shape[0],), generator=gen, device=x0.device)
        return x0, t, torch.randn(x0.shape, generator=gen, device=x0.device)

    def fake_loss(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Denoising score matching of the fake score on (detached) student samples."""
        x0, t, eps = self.fake_score_inputs(batch, gen)
        x0_pred, eps_pred = self.fake_train.x0_eps(self.schedule.add_noise(x0, eps, t), t, batch.cond)
        return {"loss": self.score_matching_loss(x0_pred, eps_pred, x0, eps)}

    def score_matching_loss(self, x0_pred, eps_pred, x0, eps) -> torch.Tensor:
        return l2(eps_pred, eps).mean() if self.opt.fake_loss == "eps" else denoising_score_matching(x0_pred, x0)

    # --- export ----------------------------------------------------------------------------------------------
    def sampling_spec(self):
        ts = self.timesteps
        n = len(ts)
        # LCMScheduler reproduces training exactly: x0 = the student's prediction (a large timestep_scaling makes
        # c_skip < 1e-11 and c_out = 1 for t >= 249), re-noised with fresh noise to the next timestep;
        # original_inference_steps = T puts every timestep on its grid; set_timesteps(n) gives the trailing grid.
        config = dict(self.setup.teacher.scheduler_config)
        config.update(original_inference_steps=self.T, timestep_scaling=1000.0)
        # where it can, the scheduler's own grid is the trained timesteps, so `num_inference_steps=n` alone is right
        config = lcm_config_for(config, ts) or config
        timesteps = {k: ts[:: n // k] for k in range(1, n + 1) if n % k == 0}
        return SamplingSpec(format="lora" if self.lora else "full", scheduler_class="LCMScheduler",
                            scheduler_config=config, num_inference_steps=n, timesteps=timesteps, guidance_scale=1.0,
                            objective=self.name, resolution=self.setup.resolution,
                            extra={"trained_timesteps": list(ts)})
