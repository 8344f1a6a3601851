"""A noise-to-sample student and its multistep rollout: what DMD, VSD and adversarial distillation share.

    x_T ~ N(0, I);  x0 = G(x_T, t_0);  step i > 0: x = alpha x0 + sigma eps at t_i (LCMScheduler's re-noising)

Step i's input during training is the student's own rollout through steps 0..i-1 (DMD2's backward simulation),
so it trains on what it will see when sampled; its sampling spec is LCMScheduler on exactly these timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Denoiser
from ..errors import StepdistillError
from ..models import STUDENT_ADAPTER
from ..sampling import SamplingSpec, lcm_config_for
from .base import Batch, Objective, StudentSample, TrainedNetwork


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced timesteps from T - 1 down (999, 749, 499, 249 for 4 of 1000)."""
    return [num_train_timesteps - 1 - i * num_train_timesteps // steps for i in range(steps)]


def default_student_timesteps(schedule, steps: int, max_amplification: float) -> list[int]:
    """The trailing grid below t_0, the largest timestep at which an error in the network's output reaches its x0
    amplified at most `max_amplification` times: sigma/alpha for eps prediction (x0 = (x - sigma eps) / alpha),
    sigma for v (x0 = alpha x - sigma v), 1 for x0. SD's scaled_linear eps schedule keeps 999 (14.6x, DMD2's SD1.5
    setting); the linear-beta DDPM schedule gets 730 (157x at 999); v and x0 teachers keep 999."""
    T = schedule.num_train_timesteps
    alpha, sigma = (v.double() for v in schedule.alpha_sigma(torch.arange(T)))
    gain = {"epsilon": sigma / alpha, "v_prediction": sigma}.get(schedule.prediction_type, torch.ones_like(sigma))
    t0 = int((gain <= max_amplification).nonzero().max()) if bool((gain <= max_amplification).any()) else 0
    return [t0 - i * (t0 + 1) // steps for i in range(steps)]


def adapter_params(net, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in net.named_parameters() if f".{adapter}." in n]


@dataclass
class NoiseStudentOptions:
    ttur: int = 1  # the student is updated every `ttur` steps, its critics (fake score, discriminator) every step
    # The timesteps the student is conditioned on, one per step (default: derived from the schedule, below). Its
    # input at the first one is pure noise whatever the timestep; a lower one (DMD2's one-step SDXL: 399) helps
    # where alpha_T is tiny, because an eps-prediction UNet's x0 = (x - sigma eps) / alpha amplifies eps errors
    # by sigma / alpha (160x at t = 999 of the linear-beta DDPM schedule, 15x for SD's scaled_linear).
    student_timesteps: list[int] | None = None
    # the default student_timesteps (default_student_timesteps): the first is the largest t whose output-to-x0 error
    # amplification stays within this bound, the rest its trailing grid
    max_noise_amplification: float = 15.0

    def num_student_steps(self) -> int:
        return getattr(self, "num_steps", 1)  # objectives with multistep students have a num_steps option

    def check(self) -> None:
        if self.num_student_steps() < 1:
            raise StepdistillError("objective.options.num_steps must be >= 1")
        ts = self.student_timesteps
        if ts is not None and (len(ts) != self.num_student_steps() or any(b >= a for a, b in zip(ts, ts[1:]))
                               or min(ts) < 0):
            raise StepdistillError(f"objective.options.student_timesteps must list {self.num_student_steps()} "
                                   "strictly decreasing timesteps >= 0")
        if self.ttur < 1:
            raise StepdistillError("objective.options.ttur must be >= 1")
        if self.max_noise_amplification < 1:
            raise StepdistillError("objective.options.max_noise_amplification must be >= 1")


class NoiseToSample(Objective):
    """The student G as a sampler from noise, with the teacher beside it; objectives add their critics."""

    def __init__(self, setup, options):
        super().__init__(setup, options)
        teacher, o = setup.teacher, options
        self.T = teacher.schedule.num_train_timesteps
        self.schedule = teacher.schedule
        ts = o.student_timesteps or default_student_timesteps(self.schedule, o.num_student_steps(),
                                                              o.max_noise_amplification)
        if max(ts) >= self.T:
            raise StepdistillError(f"objective.options.student_timesteps must be < {self.T}")
        self._timesteps = [int(t) for t in ts]
        self.lora = setup.student_type == "lora"
        self.student = Denoiser(setup.student, self.schedule, adapter=STUDENT_ADAPTER if self.lora else None)
        if self.student.has_guidance_embedding:
            raise StepdistillError(f"objective '{self.name}' trains students without a guidance embedding; "
                                   "set student.guidance_embedding=false")
        self.student_params = adapter_params(setup.student, STUDENT_ADAPTER) if self.lora else None
        self.student_train = self.student
        self.sampler = self  # whose student samples the critics see: in a composition, its first term (compose sets it)
        self.teacher = teacher.denoiser()
        self.latent_shape = teacher.latent_shape(setup.resolution)

    def networks(self) -> dict[str, TrainedNetwork]:
        return {"student": TrainedNetwork(self.setup.student, self.setup.lr, update_every=self.opt.ttur,
                                          params=self.student_params)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.student_train = Denoiser(wrapped["student"], self.schedule, module=self.student.module,
                                      adapter=self.student.adapter)

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
        return self.draw_student(batch, gen, train).x0

    def draw_student(self, batch: Batch, gen: torch.Generator, train: bool) -> StudentSample:
        """The student's x0 at a random step i (always 0 for a one-step student; with grad when `train`), and i."""
        b, dev = len(batch.cond), batch.cond.embeds.device
        ts = self.timesteps
        i = int(torch.randint(0, len(ts), (1,), generator=gen, device=dev)) if len(ts) > 1 else 0
        x = torch.randn((b, *self.latent_shape), generator=gen, device=dev)
        if i > 0 and not getattr(self.opt, "backward_simulation", True):  # DMD2 without simulation: real x_t
            x = self.schedule.add_noise(batch.latents, x, self._t(ts[i], b, dev))
        else:
            x = self.rollout(x, batch.cond, i, gen)
        with torch.set_grad_enabled(train):
            return StudentSample(self.student_x0(x, ts[i], batch.cond, train=train), {"step": i})

    @torch.no_grad()
    def teacher_ode(self, z: torch.Tensor, batch: Batch, steps: int, guidance_scale: float) -> torch.Tensor:
        """The CFG teacher's deterministic DDIM solution from noise z on the trailing grid of `steps` steps."""
        b, dev, x = z.shape[0], z.device, z
        ts = trailing_timesteps(self.T, steps)
        for j, t in enumerate(ts):
            x0, eps = self.teacher.guided_x0_eps(x, self._t(t, b, dev), batch.cond, batch.uncond, guidance_scale)
            x = x0 if j == len(ts) - 1 else self.schedule.ddim_step(x0, eps, self._t(ts[j + 1], b, dev))
        return x

    # --- export ----------------------------------------------------------------------------------------------
    def student_spec(self):
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
