"""Distribution matching distillation (DMD, DMD2).

The student G maps pure noise x_T (at its timestep(s)) to a sample x0 = G(x_T). Its gradient is the difference
between a *fake* score, trained online on the student's own samples, and the frozen CFG teacher (the *real*
score), both evaluated on the student output noised to a random t:

    x_t    = alpha_t x0 + sigma_t eps,                   t ~ U[t_min T, t_max T]
    grad   = (x0_fake(x_t) - x0_real(x_t)) / mean|x0 - x0_real(x_t)|    (per sample; x0_real with CFG w)
    L_G    = 0.5 ||x0 - sg(x0 - grad)||^2  [+ gan_weight * softplus(-D(x0))]  [+ regression_weight * ||x0 - ODE(x_T)||^2]
    L_fake = ||eps_fake(x_t') - eps'||^2 on sg(x0), t' ~ U[0, T)  [+ fake_disc_weight * L_D through the fake UNet]
    L_D    = softplus(-D(real x_t)) + softplus(D(sg(x0)_t))                   (D: a head on fake-UNet mid-block features)

DMD2 parts, each switchable: two time-scale updates (`ttur`: the generator is updated every K steps, fake score
and discriminator every step), the GAN head, and backward simulation for N-step students (step i's input is
the student's own rollout from noise through steps 0..i-1, its x0 re-noised with fresh noise: exactly what
LCMScheduler does at sampling time).

Networks: where student and fake score are LoRA, teacher, student and fake score are one frozen UNet with the
adapters "student" and "fake" (adapter None = the teacher). A full fake score is a copy of the teacher.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import StudentConfig
from ..denoiser import Denoiser
from ..errors import StepdistillError
from ..losses import (denoising_score_matching, distribution_matching_surrogate, dmd_gradient, gan_discriminator_loss,
                      gan_generator_loss, l2)
from ..models import STUDENT_ADAPTER, adapter_state_kept, add_lora
from ..sampling import SamplingSpec, lcm_config_for
from .base import Batch, Objective, TrainedNetwork, register

FAKE_ADAPTER = "fake"


# --- shared by dmd and vsd ---------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def frozen(params):
    """No gradients into `params` inside (the generator's GAN loss flows through the fake UNet to its input)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class _MidBlockOutput(Exception):
    def __init__(self, features):
        self.features = features


def mid_block_features(den: Denoiser, x_t, t, cond, frozen_params=()) -> torch.Tensor:
    """The UNet's mid-block output, via a forward hook; the up-blocks are never run. `frozen_params` get no
    gradient."""

    def hook(module, args, output):
        raise _MidBlockOutput(output)

    handle = den.unet.mid_block.register_forward_hook(hook)
    try:
        with frozen(list(frozen_params)):
            den(x_t, t, cond)
    except _MidBlockOutput as out:
        return out.features.float()
    finally:
        handle.remove()
    raise StepdistillError("the fake-score UNet never ran its mid_block")


@contextlib.contextmanager
def recording_mid_block(unet):
    """Records the UNet's mid-block output of every forward inside (the whole UNet still runs)."""
    outputs: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


class DiscriminatorHead(torch.nn.Module):
    """A light head on mid-block features: two convs (the second strided), global pooling, one logit."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        hidden = min(hidden, channels)
        groups = 32 if hidden % 32 == 0 else 8 if hidden % 8 == 0 else 1
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.GroupNorm(groups, hidden), torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), torch.nn.GroupNorm(groups, hidden), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


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


# --- DMD / DMD2 --------------------------------------------------------------------------------------------------

@dataclass
class DMDOptions(FakeScoreOptions):
    num_steps: int = 1  # the student's step count (1: DMD; 2-4: DMD2 multi-step)
    backward_simulation: bool = True  # DMD2: step i's input is the student's own rollout (else: noised real images)
    normalize: bool = True  # DMD's per-sample weighting 1 / mean|x0 - x0_real|
    fake_score: Literal["lora", "full"] = "lora"
    gan_weight: float = 0.0  # DMD2: generator's non-saturating GAN loss weight (0 = no discriminator)
    disc_lr: float | None = None  # default: fake_lr
    disc_hidden: int = 256
    # DMD2's guidance_cls_loss_weight: the discriminator loss, at this weight, also trains the fake score's UNet
    # (whose mid-block features the head reads) in the fake score's update; 0: only the head learns
    fake_disc_weight: float = 1e-2
    # the discriminator's inputs are noised to t ~ U[t_min T, disc_t_max T] (DMD2's diffusion_gan_max_timestep);
    # None: t_max. Where alpha_bar is tiny (t > 500 on a linear-beta schedule), real and fake are inseparable.
    disc_t_max: float | None = None
    regression_weight: float = 0.0  # DMD1: l2 to teacher ODE outputs from the same noise (0 = off)
    regression_steps: int = 8  # teacher DDIM steps (with CFG) to make each regression target, on the fly

    def num_student_steps(self) -> int:
        return self.num_steps

    def check(self) -> None:
        if self.num_steps < 1:
            raise StepdistillError("objective.options.num_steps must be >= 1")
        super().check()
        if self.gan_weight < 0 or self.regression_weight < 0 or self.fake_disc_weight < 0:
            raise StepdistillError("objective.options gan_weight, fake_disc_weight and regression_weight must be >= 0")
        if self.disc_t_max is not None and not self.t_min <= self.disc_t_max <= 1:
            raise StepdistillError("objective.options.disc_t_max must be in [t_min, 1]")
        if self.regression_steps < 1:
            raise StepdistillError("objective.options.regression_steps must be >= 1")


@register
class DMD(DistributionMatching):
    name = "dmd"
    Options = DMDOptions
    needs_images = False  # per run: True with a GAN head or without backward simulation (set in __init__)
    summary = "DMD / DMD2: real-minus-fake score gradient, online fake score, optional GAN head, TTUR, backward simulation"

    def __init__(self, setup, options: DMDOptions):
        self.fake_type = options.fake_score
        super().__init__(setup, options)
        o = options
        self.needs_images = o.gan_weight > 0 or (o.num_steps > 1 and not o.backward_simulation)
        self.disc = None
        if o.gan_weight > 0:
            channels = self.fake.unet.config.block_out_channels[-1]
            self.disc = DiscriminatorHead(channels, o.disc_hidden).to(setup.device)
        self.disc_train = self.disc

    def networks(self):
        nets = super().networks()
        if self.disc is not None:
            o = self.opt
            nets["disc"] = TrainedNetwork(self.disc, o.disc_lr or o.fake_lr or self.setup.lr)
        return nets

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        if self.disc is not None:
            self.disc_train = wrapped["disc"]

    def losses(self, network: str, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if network == "fake":
            if self.disc is not None and self.opt.fake_disc_weight > 0:
                return self.fake_loss_with_disc(batch, gen)
            return self.fake_loss(batch, gen)
        if network == "disc":
            return self.disc_loss(batch, gen)
        x0 = self.student_sample(batch, gen, train=True)
        return self.generator_losses(x0, batch, gen)

    def generator_losses(self, x0: torch.Tensor, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The generator's losses for student samples x0 (a function of x0 alone, so tests can check d/dx0)."""
        o, b, dev = self.opt, x0.shape[0], x0.device
        t = self.sample_t(b, gen, dev)
        x_t = self.schedule.add_noise(x0.detach(), torch.randn(x0.shape, generator=gen, device=dev), t)
        with torch.no_grad():
            x0_real, _ = self.teacher.guided_x0_eps(x_t, t, batch.cond, batch.uncond, o.guidance_scale)
            x0_fake, _ = self.fake.x0_eps(x_t, t, batch.cond)
        grad = dmd_gradient(x0, x0_real, x0_fake, o.normalize)
        dmd = distribution_matching_surrogate(x0, grad).mean() / x0[0].numel()
        out = {"dmd_loss": dmd}
        loss = dmd
        if self.disc is not None:
            t_d = self.sample_t(b, gen, dev, o.disc_t_max)
            x_d = self.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen, device=dev), t_d)
            with frozen(list(self.disc.parameters())):  # only x0 gets gradients
                logits = self.disc(mid_block_features(self.fake, x_d, t_d, batch.cond, self.fake_params))
            out["gan_loss"] = gan_generator_loss(logits)
            loss = loss + o.gan_weight * out["gan_loss"]
        if o.regression_weight > 0:
            out["reg_loss"] = self.regression_loss(batch, gen)
            loss = loss + o.regression_weight * out["reg_loss"]
        out["loss"] = loss
        return out

    def disc_inputs(self, batch: Batch, fake_x0: torch.Tensor, gen: torch.Generator):
        """Real latents and student samples (in that order), each pair noised to one t ~ U[t_min T, disc_t_max T]."""
        b, dev = fake_x0.shape[0], fake_x0.device
        x0 = torch.cat([batch.latents, fake_x0])
        t = self.sample_t(b, gen, dev, self.opt.disc_t_max).repeat(2)
        return self.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen, device=dev), t), t

    def disc_loss(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The discriminator head on the fake UNet's mid-block features of noised real images vs student samples."""
        x_t, t = self.disc_inputs(batch, self.student_sample(batch, gen, train=False), gen)
        with torch.no_grad():
            feats = mid_block_features(self.fake, x_t, t, batch.cond.cat(batch.cond))
        real_logits, fake_logits = self.disc_train(feats).chunk(2)
        return {"loss": gan_discriminator_loss(real_logits, fake_logits),
                "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}

    def fake_loss_with_disc(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """DMD2's guidance update: denoising score matching + fake_disc_weight * the discriminator loss, whose
        gradient reaches the fake UNet through the mid-block features (the head itself is frozen here and
        learns in its own update). One forward over both inputs: a DDP-wrapped fake score runs once per update."""
        x0, t, eps = self.fake_score_inputs(batch, gen)
        b = x0.shape[0]
        x_d, t_d = self.disc_inputs(batch, x0, gen)
        x_all = torch.cat([self.schedule.add_noise(x0, eps, t), x_d])
        cond = batch.cond.cat(batch.cond).cat(batch.cond)
        with recording_mid_block(self.fake.unet) as mid, frozen(list(self.disc.parameters())):
            x0_pred, eps_pred = self.fake_train.x0_eps(x_all, torch.cat([t, t_d]), cond)
            real_logits, fake_logits = self.disc(mid[-1][b:].float()).chunk(2)
        dsm = self.score_matching_loss(x0_pred[:b], eps_pred[:b], x0, eps)
        cls = gan_discriminator_loss(real_logits, fake_logits)
        return {"loss": dsm + self.opt.fake_disc_weight * cls, "dsm_loss": dsm, "cls_loss": cls}

    def regression_loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """DMD1's regression term: the one-step student from noise z vs the CFG teacher's DDIM solution from z."""
        b, dev = len(batch.cond), batch.cond.embeds.device
        z = torch.randn((b, *self.latent_shape), generator=gen, device=dev)
        with torch.no_grad():
            x = z
            ts = trailing_timesteps(self.T, self.opt.regression_steps)
            for j, t in enumerate(ts):
                x0, eps = self.teacher.guided_x0_eps(x, self._t(t, b, dev), batch.cond, batch.uncond,
                                                     self.opt.guidance_scale)
                x = x0 if j == len(ts) - 1 else self.schedule.ddim_step(x0, eps, self._t(ts[j + 1], b, dev))
        pred = self.student_x0(z, self.timesteps[0], batch.cond, train=True)
        return l2(pred, x).mean()


__all__ = ["DMD", "DMDOptions", "DistributionMatching", "FakeScoreOptions", "DiscriminatorHead", "FAKE_ADAPTER",
           "add_fake_adapter", "adapter_params", "mid_block_features", "recording_mid_block", "trailing_timesteps"]
