"""Latent consistency distillation (LCM, LCM-LoRA).

The student f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student(x_t, t) must agree with a target network at the
previous point of the teacher's PF-ODE trajectory, reached by one DDIM step of the CFG teacher on a skipping
grid of `num_ddim_timesteps` timesteps:

    x_prev = DDIM(x_t, t -> t - k; teacher prediction cond + w (cond - uncond)),   w ~ U[w_min, w_max]
    loss   = d( f_student(x_t, t), sg f_target(x_prev, t - k) )

The target is an EMA of the student: of a full student's weights (LCM), or of a LoRA student's adapter in a
second adapter on the same base (`lora_ema_target`, the default; false: the LoRA student itself under no_grad, as
LCM-LoRA's reference script does, which drifts on v-prediction teachers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..denoiser import Denoiser
from ..ema import EMA
from ..errors import StepdistillError
from ..losses import consistency_boundary_scalings, distance
from ..models import STUDENT_ADAPTER, TARGET_ADAPTER, add_adapter_like, copy_adapter
from ..sampling import SamplingSpec, scheduler_timesteps
from .base import Batch, Objective, StudentSample, TrainedNetwork, register


@dataclass
class ConsistencyOptions:
    num_ddim_timesteps: int = 50  # the skipping grid (LCM's original_inference_steps)
    w_min: float = 3.0  # teacher guidance weight range (LCM convention: CFG scale = 1 + w)
    w_max: float = 8.0
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    ema_decay: float = 0.95  # target network of full students (and of LoRA students with lora_ema_target)
    # LoRA: the target is an EMA (ema_decay) of the student's adapter, in a second adapter on the same base; false:
    # the student itself (LCM-LoRA's reference script), which drifts on a v-prediction teacher (docs/objectives.md)
    lora_ema_target: bool = True
    num_inference_steps: int = 4  # the student's default step count in the export
    sample_guidance: float | None = None  # pipeline guidance_scale; default 1 (LoRA) or 1 + mean w (embedded)

    def check(self) -> None:
        if not 1 <= self.num_ddim_timesteps <= 1000:
            raise StepdistillError(f"objective.options.num_ddim_timesteps must be in [1, 1000], got "
                                   f"{self.num_ddim_timesteps}")
        if not 0 <= self.w_min <= self.w_max:
            raise StepdistillError(f"objective.options needs 0 <= w_min <= w_max, got w_min={self.w_min}, "
                                   f"w_max={self.w_max}")
        if not 0 <= self.ema_decay < 1:
            raise StepdistillError(f"objective.options.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 1 <= self.num_inference_steps <= self.num_ddim_timesteps:
            raise StepdistillError(f"objective.options.num_inference_steps must be in [1, num_ddim_timesteps="
                                   f"{self.num_ddim_timesteps}], got {self.num_inference_steps}")


@register
class Consistency(Objective):
    name = "consistency"
    Options = ConsistencyOptions
    needs_images = True
    needs_own_sample = True
    summary = "LCM / LCM-LoRA: map points of the teacher's CFG PF-ODE to its origin (skip-step DDIM solver)"

    def __init__(self, setup, options: ConsistencyOptions):
        super().__init__(setup, options)
        teacher = setup.teacher
        T = teacher.schedule.num_train_timesteps
        self.step_ratio = T // options.num_ddim_timesteps
        self.grid = (torch.arange(1, options.num_ddim_timesteps + 1) * self.step_ratio - 1).to(setup.device)
        self.teacher = teacher.denoiser()
        lora = setup.student_type == "lora"
        adapter = STUDENT_ADAPTER if lora else None
        self.student = Denoiser(setup.student, teacher.schedule, adapter=adapter)
        self.student_eval = Denoiser(setup.student, teacher.schedule, adapter=adapter)  # never the DDP wrapper
        # full students: an EMA copy (LCM); LoRA students: a frozen second adapter on the same base that trails
        # the student's, or (lora_ema_target false) the student itself (LCM-LoRA's reference script)
        self.ema = None if lora else EMA(setup.student, options.ema_decay)
        self.lora_ema = lora and options.lora_ema_target
        if self.lora_ema:
            add_adapter_like(setup.student, STUDENT_ADAPTER, TARGET_ADAPTER)
            copy_adapter(setup.student, STUDENT_ADAPTER, setup.student, TARGET_ADAPTER)
        self.target = Denoiser(setup.student if lora else self.ema.shadow, teacher.schedule,
                               adapter=TARGET_ADAPTER if self.lora_ema else adapter)

    def networks(self):
        return {"student": TrainedNetwork(self.setup.student, self.setup.lr)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.student.net = wrapped["student"]

    def consistency_fn(self, den: Denoiser, x_t, t, cond, w):
        c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in consistency_boundary_scalings(t, timestep_scaling=self.opt.timestep_scaling))
        x0, _ = den.x0_eps(x_t, t, cond, w)
        return c_skip * x_t + c_out * x0

    def draw_student(self, batch: Batch, gen: torch.Generator, train: bool) -> StudentSample:
        """f_student(x_t, t) at a random grid point t of noised real latents: the student's x0 estimate."""
        o, x0 = self.opt, batch.latents
        b, dev = x0.shape[0], x0.device
        t = self.grid[torch.randint(0, len(self.grid), (b,), generator=gen, device=dev)]
        x_t = self.teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen, device=dev), t)
        w = o.w_min + (o.w_max - o.w_min) * torch.rand(b, generator=gen, device=dev)
        with torch.set_grad_enabled(train):
            pred = self.consistency_fn(self.student if train else self.student_eval, x_t, t, batch.cond, w)
        return StudentSample(pred, {"x_t": x_t, "t": t, "w": w})

    def student_losses(self, sample: StudentSample, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """d(f_student(x_t, t), sg f_target(DDIM_teacher(x_t, t -> t - k), t - k))."""
        x_t, t, w = (sample.context[k] for k in ("x_t", "t", "w"))
        t_prev = (t - self.step_ratio).clamp(min=0)
        with torch.no_grad():
            x0_t, eps_t = self.teacher.guided_x0_eps(x_t, t, batch.cond, batch.uncond, 1.0 + w)
            x_prev = self.teacher.schedule.ddim_step(x0_t, eps_t, t_prev)
            target = self.consistency_fn(self.target, x_prev, t_prev, batch.cond, w)
        loss = distance(sample.x0, target, self.opt.loss, self.opt.huber_c).mean()
        return {"loss": loss}

    def after_update(self, network):
        if self.ema is not None:
            self.ema.update(self.setup.student)
        if self.lora_ema:
            copy_adapter(self.setup.student, STUDENT_ADAPTER, self.setup.student, TARGET_ADAPTER, 1.0 - self.opt.ema_decay)

    def _target_params(self):
        return {n: p for n, p in self.setup.student.named_parameters() if f".{TARGET_ADAPTER}." in n}

    def state_dict(self):
        if self.lora_ema:
            return {"target": {n: p.detach().clone() for n, p in self._target_params().items()}}
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    @torch.no_grad()
    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lora_ema:
            for n, p in self._target_params().items():
                p.copy_(state["target"][n])

    def student_spec(self):
        o = self.opt
        embedded = self.student.takes_guidance
        guidance = o.sample_guidance if o.sample_guidance is not None else (1.0 + (o.w_min + o.w_max) / 2 if embedded else 1.0)
        config = dict(self.setup.teacher.scheduler_config)
        config.update(original_inference_steps=o.num_ddim_timesteps, timestep_scaling=o.timestep_scaling,
                      timestep_spacing="leading")
        # LCMScheduler refuses more steps than its grid has (num_ddim_timesteps)
        steps = sorted(n for n in {1, 2, 4, 8, o.num_inference_steps} if n <= o.num_ddim_timesteps)
        return SamplingSpec(format="lora" if self.setup.student_type == "lora" else "full",
                            scheduler_class="LCMScheduler", scheduler_config=config,
                            num_inference_steps=o.num_inference_steps,
                            timesteps={n: scheduler_timesteps("LCMScheduler", config, n) for n in steps},
                            guidance_scale=guidance, embedded_guidance=embedded, objective=self.name,
                            resolution=self.setup.resolution)
