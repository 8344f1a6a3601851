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

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import StepdistillError
from ..losses import distribution_matching_surrogate, dmd_gradient, l2
from .base import Batch, TrainedNetwork, register
from .fake_score import DistributionMatching, FakeScoreOptions
from .gan import DiscriminatorHead, frozen, gan_discriminator_loss, gan_generator_loss



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
    # N-step students: step i > 0's samples are noised for the DM gradient only up to its input's timestep t_i,
    # the noise levels whose content that step still decides (above t_i its input already fixed it); false: the
    # same U[t_min T, t_max T] for every step (DMD2)
    dm_t_max_per_step: bool = False
    regression_weight: float = 0.0  # DMD1: l2 to teacher ODE outputs from the same noise (0 = off)
    regression_steps: int = 8  # teacher DDIM steps (with CFG) to make each regression target, on the fly

    def check(self) -> None:
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
            self.taps = self.fake.backbone.feature_taps(self.fake.module)[-1:]  # the deepest: a UNet's mid block
            with torch.no_grad():  # one dry pass: the map's channels and size shape the head
                z = torch.zeros((1, *self.latent_shape), device=setup.device)
                f = self.fake.features(z, self._t(self.T // 2, 1, z.device),
                                       setup.teacher.prompt_encoder([""], setup.resolution), self.taps)[0]
            self.disc = DiscriminatorHead(f.shape[1], o.disc_hidden, f.shape[-1]).to(setup.device)
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
        return super().losses(network, batch, gen)

    def student_losses(self, sample, batch, gen):
        step = sample.context.get("step", 0)
        t_max = None
        if self.opt.dm_t_max_per_step and step > 0:
            t_max = max(self.opt.t_min, min(self.opt.t_max, self.sampler.timesteps[step] / self.T))
        return self.generator_losses(sample.x0, batch, gen, self.fake_index(sample), t_max)

    def generator_losses(self, x0: torch.Tensor, batch: Batch, gen: torch.Generator,
                         k: int = 0, t_max: float | None = None) -> dict[str, torch.Tensor]:
        """The generator's losses for student samples x0 (a function of x0 alone, so tests can check d/dx0),
        judged by fake score k (fake_per_step: the step that drew them), noised up to t_max T (default t_max)."""
        o, b, dev, fake = self.opt, x0.shape[0], x0.device, self.fakes[k]
        t = self.sample_t(b, gen, dev, t_max)
        x_t = self.schedule.add_noise(x0.detach(), torch.randn(x0.shape, generator=gen, device=dev), t)
        with torch.no_grad():
            x0_real, _ = self.teacher.guided_x0_eps(x_t, t, batch.cond, batch.uncond, self.real_guidance(t))
            x0_fake, _ = fake.x0_eps(x_t, t, batch.cond)
        grad = dmd_gradient(x0, x0_real, x0_fake, o.normalize)
        dmd = distribution_matching_surrogate(x0, grad).mean() / x0[0].numel()
        out = {"dmd_loss": dmd}
        loss = dmd
        if self.disc is not None:
            t_d = self.sample_t(b, gen, dev, o.disc_t_max)
            x_d = self.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen, device=dev), t_d)
            with frozen(list(self.disc.parameters()) + list(self.fake_params)):  # only x0 gets gradients
                logits = self.disc(fake.features(x_d, t_d, batch.cond, self.taps)[0])
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
        """The discriminator head on the fake score's deepest features (a UNet's mid block) of noised real images vs student samples."""
        sample = self.sampler.draw_student(batch, gen, train=False)
        x_t, t = self.disc_inputs(batch, sample.x0, gen)
        with torch.no_grad():
            feats = self.fakes[self.fake_index(sample)].features(x_t, t, batch.cond.cat(batch.cond), self.taps)[0]
        real_logits, fake_logits = self.disc_train(feats).chunk(2)
        return {"loss": gan_discriminator_loss(real_logits, fake_logits),
                "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}

    def fake_loss_with_disc(self, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """DMD2's guidance update: denoising score matching + fake_disc_weight * the discriminator loss, whose
        gradient reaches the fake score through the tapped features (the head itself is frozen here and
        learns in its own update). One forward over both inputs: a DDP-wrapped fake score runs once per update."""
        x0, t, eps, k = self.fake_score_inputs(batch, gen)
        b = x0.shape[0]
        x_d, t_d = self.disc_inputs(batch, x0, gen)
        x_all = torch.cat([self.schedule.add_noise(x0, eps, t), x_d])
        cond = batch.cond.cat(batch.cond).cat(batch.cond)
        with self.fake.recording(self.taps, x0.shape) as mid, frozen(list(self.disc.parameters())):
            x0_pred, eps_pred = self.fakes_train[k].x0_eps(x_all, torch.cat([t, t_d]), cond)
            real_logits, fake_logits = self.disc(mid[0][b:]).chunk(2)
        dsm = self.score_matching_loss(x0_pred[:b], eps_pred[:b], x0, eps)
        cls = gan_discriminator_loss(real_logits, fake_logits)
        return {"loss": dsm + self.opt.fake_disc_weight * cls, "dsm_loss": dsm, "cls_loss": cls}

    def regression_loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """DMD1's regression term: the one-step student from noise z vs the CFG teacher's DDIM solution from z."""
        b, dev = len(batch.cond), batch.cond.embeds.device
        z = torch.randn((b, *self.latent_shape), generator=gen, device=dev)
        x = self.teacher_ode(z, batch, self.opt.regression_steps, self.opt.guidance_scale)
        pred = self.student_x0(z, self.timesteps[0], batch.cond, train=True)
        return l2(pred, x).mean()
