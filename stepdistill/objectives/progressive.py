"""Progressive distillation (Salimans & Ho 2022) and guided distillation (Meng et al. 2023).

Rounds halve the step count. In a round whose student takes N DDIM steps, one student step from grid point
t = t(k, N) to t'' = t(k - 1, N) must land where two steps of the round's frozen target land (via t' = t(2k - 1, 2N)):

    z_t    = alpha_t x + sigma_t eps,                                     k ~ U{1..N}
    z_t'   = DDIM(z_t,  t -> t';  target),   z_t'' = DDIM(z_t', t' -> t''; target)
    x~     = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)   (one DDIM step lands on z_t'')
    loss   = w(t) ||x0_student(z_t) - x~||^2,   w = max(SNR, 1) ("truncated SNR") or SNR + 1

The target is the CFG teacher in round 0 and the previous round's student after (for a LoRA student: a frozen
"target" adapter on the same base). Grids nest: t(k, N) = k T / N - 1 (floor), t(0, N) = -1 is the clean end.

The top step of a round whose next grid point lies below t_top (one and two steps, usually) is conditioned at
t_top, the distribution-matching students' schedule rule (`max_noise_amplification`), not at T - 1: its input is
still z_T, but the UNet is told t_top and x0 = (z - sigma eps) / alpha is taken there, since at t = 999 of the
linear-beta schedule alpha is so small that an eps student's errors reach x0 160x (the paper's reason for x- and
v-prediction students). SD's schedules and v / x0 teachers keep T - 1.

Guided distillation, stage 1 (`guided: true`, a full student with a guidance-scale embedding): the student learns
the CFG teacher's x0 for any scale s ~ U[guidance_min, guidance_max], t ~ U{0..T-1}, so one evaluation replaces
two; the progressive rounds then start from it, with s kept as an input.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..denoiser import Denoiser
from ..errors import StepdistillError
from ..losses import l2
from ..models import STUDENT_ADAPTER, TARGET_ADAPTER, add_adapter_like, copy_adapter
from .base import Batch, Objective, Stage, StudentSample, TrainedNetwork, register
from .noise_student import default_student_timesteps



@dataclass
class ProgressiveOptions:
    start_steps: int = 32  # round 0's target: the teacher with this many DDIM steps (its student takes half)
    end_steps: int = 1  # the last round's student step count
    steps_per_round: int | None = None  # None: train.max_steps split evenly over the stages
    guidance_scale: float = 3.0  # the teacher's CFG scale (pipeline convention), distilled into the student
    weighting: Literal["truncated_snr", "snr_plus_one", "constant"] = "truncated_snr"
    guided: bool = False  # Meng et al. stage 1 first (needs student.type full/small + student.guidance_embedding)
    guidance_min: float = 2.0  # guided: the range of CFG scales the student learns
    guidance_max: float = 4.0
    guided_steps: int | None = None  # guided: stage-1 steps (None: an equal share of train.max_steps)
    sample_guidance: float | None = None  # guided: the export's guidance scale (default: middle of the range)
    reset_optimizer: bool = True  # clear Adam's moments at each round, as in the paper
    # t_top, where the top step of one- and two-step rounds is conditioned: the largest t whose output-to-x0 error
    # amplification is at most this (the dmd / vsd rule; 999 on SD's schedules), or `top_timestep` if given
    max_noise_amplification: float = 15.0
    top_timestep: int | None = None

    def num_rounds(self) -> int:
        return int(round(math.log2(self.start_steps / self.end_steps)))

    def check(self) -> None:
        ratio = self.start_steps / max(self.end_steps, 1)
        if self.end_steps < 1 or ratio < 2 or 2 ** round(math.log2(ratio)) != ratio:
            raise StepdistillError("objective.options.start_steps must be end_steps times a power of 2 (>= 2), "
                                   f"got start_steps={self.start_steps}, end_steps={self.end_steps}")
        if self.steps_per_round is not None and self.steps_per_round < 1:
            raise StepdistillError("objective.options.steps_per_round must be >= 1")
        if self.guided_steps is not None and self.guided_steps < 1:
            raise StepdistillError("objective.options.guided_steps must be >= 1")
        if not 1 <= self.guidance_min <= self.guidance_max:
            raise StepdistillError("objective.options needs 1 <= guidance_min <= guidance_max")
        if self.guidance_scale < 0:
            raise StepdistillError("objective.options.guidance_scale must be >= 0")
        if self.max_noise_amplification <= 0:
            raise StepdistillError("objective.options.max_noise_amplification must be > 0")


def grid_timestep(k: torch.Tensor | int, n: int, num_train_timesteps: int):
    """Point k of the n-step grid: k T / n - 1 (k = n: T - 1; k = 0: -1, the clean end). Grids of n and 2n nest."""
    return (k * num_train_timesteps) // n - 1


@register
class Progressive(Objective):
    name = "progressive"
    Options = ProgressiveOptions
    needs_images = True
    needs_own_sample = True
    summary = "progressive distillation: one student DDIM step matches two of the previous round's; guided variant"

    def __init__(self, setup, options: ProgressiveOptions):
        super().__init__(setup, options)
        o, teacher = options, setup.teacher
        self.schedule = teacher.schedule
        self.T = self.schedule.num_train_timesteps
        if o.start_steps > self.T:
            raise StepdistillError(f"objective.options.start_steps must be <= {self.T} (the teacher's timesteps)")
        if o.top_timestep is not None and not 0 <= o.top_timestep < self.T:
            raise StepdistillError(f"objective.options.top_timestep must be in [0, {self.T - 1}], got {o.top_timestep}")
        self.t_top = (o.top_timestep if o.top_timestep is not None
                      else default_student_timesteps(self.schedule, 1, o.max_noise_amplification)[0])
        self.lora = setup.student_type == "lora"
        self.student = Denoiser(setup.student, self.schedule, adapter=STUDENT_ADAPTER if self.lora else None)
        embedded = self.student.has_guidance_embedding
        if o.guided and not embedded:
            raise StepdistillError("objective.options.guided=true needs a student with a guidance embedding: set "
                                   "student.type=full (or small) and student.guidance_embedding=true")
        if embedded and not o.guided:
            raise StepdistillError("a student with a guidance embedding trains with objective.options.guided=true")
        self.teacher = teacher.denoiser()
        self.student_train = self.student
        self._stages = self._plan()
        self.stage = 0
        # The frozen target of the stages after the first: a second adapter on the one base for a LoRA student,
        # a frozen copy for a full one (a single round's target is the teacher).
        self.target = None
        if len(self._stages) > 1 and self.lora:
            add_adapter_like(setup.student, STUDENT_ADAPTER, TARGET_ADAPTER)
            self.target = Denoiser(setup.student, self.schedule, adapter=TARGET_ADAPTER)
        elif len(self._stages) > 1:
            self.target = Denoiser(copy.deepcopy(setup.student).requires_grad_(False).eval(), self.schedule)

    # --- stages --------------------------------------------------------------------------------------------
    def _plan(self) -> list[tuple[str, int]]:
        """(kind, student steps) per stage: optionally ("guided", start_steps), then ("round", N) halving."""
        o = self.opt
        plan = [("guided", o.start_steps)] if o.guided else []
        plan += [("round", o.start_steps // 2 ** (r + 1)) for r in range(o.num_rounds())]
        return plan

    def stages(self) -> list[Stage]:
        o, total = self.opt, self.setup.max_steps
        n = len(self._stages)
        fixed = {i: o.guided_steps for i, (kind, _) in enumerate(self._stages) if kind == "guided" and o.guided_steps}
        fixed.update({i: o.steps_per_round for i, (kind, _) in enumerate(self._stages)
                      if kind == "round" and o.steps_per_round})
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        if free and left < len(free):
            raise StepdistillError(f"progressive: train.max_steps={total} leaves {left} steps for {len(free)} stages; "
                                   "raise train.max_steps")
        steps = dict(fixed)
        for j, i in enumerate(free):  # an even split, the remainder to the last stages
            steps[i] = left // len(free) + (1 if j >= len(free) - left % len(free) else 0)
        return [Stage(self._stage_name(i), steps[i], reset_optimizers=o.reset_optimizer and i > 0) for i in range(n)]

    def begin_stage(self, index: int, source: torch.nn.Module) -> None:
        """From stage 1 on, the target is a frozen snapshot of the student as the last stage left it."""
        self.stage = index
        if index == 0:
            return
        with torch.no_grad():
            if self.lora:
                copy_adapter(source, STUDENT_ADAPTER, self.target.module, TARGET_ADAPTER)
            else:
                self.target.module.load_state_dict(source.state_dict())

    @property
    def kind(self) -> str:
        return self._stages[self.stage][0]

    @property
    def student_steps(self) -> int:
        return self._stages[self.stage][1]

    @property
    def target_is_teacher(self) -> bool:
        return self.stage == 0

    def cond_timestep(self, k, n: int):
        """The timestep a round-n student is told at grid point k: t(k, n), or t_top at the top (k = n) where t_top
        lies above the next grid point (so the grid still descends)."""
        top = self.t_top if grid_timestep(n - 1, n, self.T) < self.t_top else self.T - 1
        if torch.is_tensor(k):
            return torch.where(k == n, top, grid_timestep(k, n, self.T))
        return top if k == n else grid_timestep(k, n, self.T)

    # --- networks ------------------------------------------------------------------------------------------
    def networks(self):
        return {"student": TrainedNetwork(self.setup.student, self.setup.lr)}

    def use_wrapped(self, wrapped):
        super().use_wrapped(wrapped)
        self.student_train = Denoiser(wrapped["student"], self.schedule, module=self.student.module,
                                      adapter=self.student.adapter)

    # --- the math --------------------------------------------------------------------------------------------
    def weight(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self.schedule.alpha_sigma(t)
        snr = a.double() ** 2 / (s.double() ** 2)
        kind = self.opt.weighting
        w = snr.clamp(min=1.0) if kind == "truncated_snr" else snr + 1.0 if kind == "snr_plus_one" else torch.ones_like(snr)
        return w.float()

    def _w(self, scale: torch.Tensor | None):
        """The student's guidance-embedding input: diffusers' pipelines feed guidance_scale - 1."""
        return None if scale is None else scale - 1.0

    @torch.no_grad()
    def target_x0_eps(self, z, t, batch: Batch, scale: torch.Tensor | None):
        if self.target_is_teacher:
            s = self.opt.guidance_scale if scale is None else scale
            return self.teacher.guided_x0_eps(z, t, batch.cond, batch.uncond, s)
        return self.target.x0_eps(z, t, batch.cond, self._w(scale))

    def draw_student(self, batch: Batch, gen: torch.Generator, train: bool) -> StudentSample:
        o, x0 = self.opt, batch.latents
        b, dev = x0.shape[0], x0.device
        # draw order (tests replay it): step index or t, then noise, then the guidance scale
        if self.kind == "guided":
            step = torch.randint(0, self.T, (b,), generator=gen, device=dev)
        else:
            step = torch.randint(1, self.student_steps + 1, (b,), generator=gen, device=dev)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        scale = None
        if o.guided:
            scale = o.guidance_min + (o.guidance_max - o.guidance_min) * torch.rand(b, generator=gen, device=dev)
        return self.student_at(batch, noise, step, scale, train)

    def student_at(self, batch: Batch, noise, step, scale, train: bool = True) -> StudentSample:
        """The student's x0 at z_t = alpha_t x + sigma_t noise, t = t(k, N) for grid points k = `step` (a guided
        stage: t = `step`)."""
        k = None if self.kind == "guided" else step
        t = step if k is None else grid_timestep(k, self.student_steps, self.T)
        z = self.schedule.add_noise(batch.latents, noise, t)
        t_in = t if k is None else self.cond_timestep(k, self.student_steps)  # t_top at the top (module docstring)
        with torch.set_grad_enabled(train):
            pred = (self.student_train if train else self.student).x0_eps(z, t_in, batch.cond, self._w(scale))[0]
        return StudentSample(pred, {"z": z, "t": t, "t_in": t_in, "k": k, "scale": scale})

    def student_losses(self, sample: StudentSample, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if self.kind == "guided":
            return self.guided_loss(sample, batch)
        return self.round_loss(sample, batch)

    def round_loss(self, sample: StudentSample, batch: Batch) -> dict[str, torch.Tensor]:
        """One student step from t(k, N) against two target steps through t(2k - 1, 2N) to t(k - 1, N)."""
        n, T, sch = self.student_steps, self.T, self.schedule
        z, t, t_in, k, scale = (sample.context[key] for key in ("z", "t", "t_in", "k", "scale"))
        t_mid, t_end = grid_timestep(2 * k - 1, 2 * n, T), grid_timestep(k - 1, n, T)
        # the teacher (and a guided stage's student) at the trajectory's own t; a previous round's student where
        # that round conditioned it
        previous_round = self.stage > 0 and self._stages[self.stage - 1][0] == "round"
        t_target = self.cond_timestep(2 * k, 2 * n) if previous_round else t
        with torch.no_grad():
            z_mid = sch.ddim_step(*self.target_x0_eps(z, t_target, batch, scale), t_mid)
            z_end = sch.ddim_step(*self.target_x0_eps(z_mid, t_mid, batch, scale), t_end)
            target = sch.ddim_x0_target(z, t_in, z_end, t_end)  # one student DDIM step from (z, t_in) lands on z_end
        return {"loss": (self.weight(t_in) * l2(sample.x0, target)).mean()}

    def guided_loss(self, sample: StudentSample, batch: Batch) -> dict[str, torch.Tensor]:
        """Stage 1 of guided distillation: the student's x0 at (z_t, s) matches the CFG teacher's at scale s."""
        z, t, scale = (sample.context[key] for key in ("z", "t", "scale"))
        target, _ = self.target_x0_eps(z, t, batch, scale)
        return {"loss": (self.weight(t) * l2(sample.x0, target)).mean()}

    @torch.no_grad()
    def rollout(self, x_T: torch.Tensor, cond, scale: float | None = None) -> torch.Tensor:
        """The student's own deterministic DDIM sampling from x_T, in its current stage's step count."""
        n, x = self.student_steps, x_T
        w = None if scale is None else torch.full((x.shape[0],), float(scale) - 1.0, device=x.device)
        for k in range(n, 0, -1):
            t = torch.full((x.shape[0],), self.cond_timestep(k, n), device=x.device, dtype=torch.long)
            x0, eps = self.student.x0_eps(x, t, cond, w)
            x = self.schedule.ddim_step(x0, eps, torch.full_like(t, grid_timestep(k - 1, n, self.T)))
        return x

    # --- state and sampling ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.target_is_teacher:
            return {"stage": self.stage}
        params = self.target.module.named_parameters() if self.lora else self.target.module.state_dict().items()
        target = {n: p.detach().clone() for n, p in params if not self.lora or f".{TARGET_ADAPTER}." in n}
        return {"stage": self.stage, "target": target}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        if "target" not in state:
            return
        with torch.no_grad():
            if self.lora:
                params = dict(self.target.module.named_parameters())
                for n, v in state["target"].items():
                    params[n].copy_(v)
            else:
                self.target.module.load_state_dict(state["target"])

    def student_spec(self):
        from ..sampling import SamplingSpec

        o, n = self.opt, self.student_steps
        # DDIMScheduler takes no explicit timesteps; EulerDiscreteScheduler does, and its update in the
        # sigma/alpha coordinates it works in is exactly DDIM's, with a final sigma of 0 (our t = -1).
        # "leading" spacing only makes its initial noise sigma sqrt(sigma_max^2 + 1), i.e. x_T = N(0, I).
        config = {k: v for k, v in self.setup.teacher.scheduler_config.items() if not k.startswith("_")}
        config.update(timestep_spacing="leading", final_sigmas_type="zero", use_karras_sigmas=False,
                      interpolation_type="linear", timestep_type="discrete")
        timesteps = [int(self.cond_timestep(k, n)) for k in range(n, 0, -1)]
        guidance = (o.sample_guidance or (o.guidance_min + o.guidance_max) / 2) if o.guided else 1.0
        return SamplingSpec(format="lora" if self.lora else "full", scheduler_class="EulerDiscreteScheduler",
                            scheduler_config=config, num_inference_steps=n, timesteps={n: timesteps},
                            guidance_scale=guidance, embedded_guidance=o.guided, objective=self.name,
                            resolution=self.setup.resolution, extra={"stage": self._stage_name(self.stage),
                                   "sampler": "DDIM (as Euler with explicit timesteps)"})

    def _stage_name(self, index: int) -> str:
        kind, n = self._stages[index]
        return f"guided-{n}steps" if kind == "guided" else f"round-{index - int(self.opt.guided)}-{n}steps"
