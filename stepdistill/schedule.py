"""Noise schedules: one object that knows alpha(t), sigma(t) and converts between parameterizations.

Every process here is x_t = alpha(t) * x0 + sigma(t) * eps, with t the *schedule time* objectives use: the
training grid 0..T-1 (T - 1 the noisiest point, -1 the clean end). A VP schedule's t is diffusers' integer
timestep; a flow schedule maps t to sigma through its (shifted) training table, and `timestep(t)` gives the
float sigma * T that its scheduler and pipeline hand the network. The network output is one of
  "epsilon"       eps
  "sample"        x0
  "v_prediction"  v = alpha * eps - sigma * x0            (variance preserving: alpha^2 + sigma^2 = 1)
  "flow"          u = eps - x0                             (flow matching: alpha = 1 - s, sigma = s)
Objectives ask for x0 / eps and never branch on the teacher family.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import StepdistillError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    prediction_type: str
    num_train_timesteps: int

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the teacher's diffusers scheduler gives the pipeline at schedule time t."""
        return t

    # --- forward process ---------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    # --- conversions -------------------------------------------------------------------------------------
    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a network output of the given parameterization."""
        kind = prediction_type or self.prediction_type
        a, s = (_bcast(v, x_t) for v in self.alpha_sigma(t))
        if kind == "epsilon":
            eps = output
            return (x_t - s * eps) / a, eps
        if kind == "sample":
            x0 = output
            return x0, (x_t - a * x0) / s
        if kind == "v_prediction":  # valid for VP schedules, where a^2 + s^2 = 1
            return a * x_t - s * output, s * x_t + a * output
        if kind == "flow":  # x_t = (1-s) x0 + s eps and u = eps - x0
            return x_t - s * output, x_t + a * output
        raise ValueError(f"unknown prediction type {kind!r}")

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        """The network output of parameterization `kind` that corresponds to (x0, eps)."""
        a, s = (_bcast(v, x0) for v in self.alpha_sigma(t))
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            return a * eps - s * x0
        if kind == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type {kind!r}")

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM / Euler step to t_next: re-noise the predicted x0 with the predicted eps."""
        return self.add_noise(x0, eps, t_next)

    def ddim_x0_target(self, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor,
                       t_next: torch.Tensor) -> torch.Tensor:
        """The x0 whose DDIM step from (x_t, t) lands exactly on x_next at t_next (progressive distillation's
        target): x_next = a' x0 + s' (x_t - a x0) / s, solved for x0."""
        a, s = (_bcast(v, x_t) for v in self.alpha_sigma(t))
        a_next, s_next = (_bcast(v, x_t) for v in self.alpha_sigma(t_next))
        ratio = s_next / s
        return (x_next - ratio * x_t) / (a_next - ratio * a)


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule (DDPM family): alpha_bar from the teacher's scheduler config."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise StepdistillError(f"VP teacher with prediction_type '{prediction_type}' is not supported; "
                                   "use epsilon, v_prediction or sample")
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler_config(cls, config) -> "VPSchedule":
        """Rebuild alphas_cumprod exactly as diffusers' DDPM/DDIM/LCM schedulers do."""
        cfg = dict(config)
        n = int(cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("beta_schedule", "linear")
        start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        else:
            raise StepdistillError(f"teacher scheduler beta_schedule '{kind}' is not supported")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod, cfg.get("prediction_type", "epsilon"))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha, sigma at integer t; t = -1 is the clean end of the process (alpha 1, sigma 0), where a
        deterministic sampler's last step lands (EulerDiscreteScheduler's final sigma 0)."""
        t = torch.as_tensor(t)
        ac = self.alphas_cumprod.to(t.device)[t.long().clamp(0, self.num_train_timesteps - 1)]
        ac = torch.where(t < 0, torch.ones_like(ac), ac)
        return ac.sqrt().float(), (1 - ac).sqrt().float()


class FlowSchedule(NoiseSchedule):
    """Rectified flow (SD3 / Flux / SANA), exactly as diffusers' FlowMatchEulerDiscreteScheduler.

    x_t = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0, and the timestep it is given is
    diffusers' float sigma * T. Two sigma grids exist:
      training   sigma(u), u on the uniform grid 1..T: the static shift  shift*s / (1 + (shift-1)*s), s = u / T
                 (scheduler.sigmas after construction), or with use_dynamic_shifting the shift by `mu` (the
                 training resolution's, `at_resolution`) that the family's pipeline applies at that size
      inference  sigmas_for_inference(n, ...): set_timesteps' table, shifted by `shift` or by mu (resolution)
    Schedule time t (what objectives draw, 0..T-1) is the training grid's u - 1: t = T - 1 is sigma = 1 (pure
    noise), t = -1 is sigma 0 (clean); `alpha_sigma(t)`, `add_noise` and the conversions take that t.

    A DPMSolverMultistepScheduler on flow sigmas (Sana's: use_flow_sigmas, flow_prediction, `flow_shift`) is the
    same process with shift = flow_shift (`solver` "dpm"). Only its inference table differs: sigmas
    shift(linspace(0.999, 0, n + 1)[:-1]), then 0, and int64 timesteps TRUNCATED from sigma * T (sigma 0.99967 ->
    999). Training keeps the float timestep sigma * T, which is what the exported FlowMatchEuler spec hands the
    network at the trained sigmas; the teacher's own DPM pipeline gives floor(sigma * T) at its sigmas, up to one
    unit of T lower (the networks embed the timestep continuously).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, *, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 shift_terminal: float | None = None, stochastic_sampling: bool = False, solver: str = "euler"):
        if solver not in ("euler", "dpm"):
            raise StepdistillError(f"flow solver must be 'euler' or 'dpm', got {solver!r}")
        self.solver = solver  # whose inference table sigmas_for_inference gives: FlowMatchEuler's or DPM-Solver's
        if time_shift_type not in ("exponential", "linear"):
            raise StepdistillError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        self.num_train_timesteps, self.shift = int(num_train_timesteps), float(shift)
        self.dynamic = use_dynamic_shifting  # then `shift` is unused: mu (from the resolution) shifts instead
        self.base_shift, self.max_shift, self.time_shift_type = base_shift, max_shift, time_shift_type
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.shift_terminal = shift_terminal
        self.stochastic_sampling = stochastic_sampling  # which step the teacher's sampler takes
        self.prediction_type = "flow"
        self.train_mu: float | None = None  # dynamic shifting: the shift of the training resolution
        # the ends of the training table bound set_timesteps' default grid (so with a static shift, twice shifted)
        self.sigma_max, self.sigma_min = self.sigma(self.num_train_timesteps).item(), self.sigma(1).item()

    @classmethod
    def from_scheduler_config(cls, config) -> "FlowSchedule":
        """From a FlowMatchEulerDiscreteScheduler config (dict or diffusers FrozenDict); diffusers' defaults."""
        cfg = dict(config)
        if cfg.get("use_flow_sigmas"):
            return cls._from_dpm_flow_config(cfg)
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
                       if cfg.get(k)]
        if unsupported:
            raise StepdistillError(f"flow scheduler option {unsupported[0]}=true is not supported")
        if cfg.get("prediction_type", "flow") != "flow":
            raise StepdistillError(f"flow scheduler with prediction_type '{cfg['prediction_type']}' is not supported")
        keys = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                "time_shift_type", "shift_terminal", "stochastic_sampling")
        return cls(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0),
                   **{k: cfg[k] for k in keys if k in cfg})

    @classmethod
    def _from_dpm_flow_config(cls, cfg: dict) -> "FlowSchedule":
        """A DPMSolverMultistepScheduler(use_flow_sigmas=True) config: static shift `flow_shift`. (SanaPipeline
        passes no mu, so its dynamic shifting is never used; the options that replace flow sigmas are refused.)"""
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                   "use_dynamic_shifting") if cfg.get(k)]
        if unsupported:
            raise StepdistillError(f"DPM-Solver flow scheduler option {unsupported[0]}=true is not supported")
        if cfg.get("prediction_type") != "flow_prediction":
            raise StepdistillError("DPM-Solver on flow sigmas needs prediction_type 'flow_prediction', got "
                                   f"{cfg.get('prediction_type')!r}")
        if cfg.get("final_sigmas_type", "zero") != "zero":
            raise StepdistillError(f"DPM-Solver flow scheduler final_sigmas_type '{cfg['final_sigmas_type']}' is not "
                                   "supported (only 'zero')")
        return cls(cfg.get("num_train_timesteps", 1000), cfg.get("flow_shift", 1.0), solver="dpm")

    def sigma(self, u) -> torch.Tensor:
        """Training sigma of uniform time u in [0, T] (diffusers' construction; float32 as there, so exact)."""
        s = torch.as_tensor(u).float() / self.num_train_timesteps
        if not self.dynamic:
            return self.shift * s / (1 + (self.shift - 1) * s)
        if self.train_mu is None:
            return s  # the scheduler's own (unshifted) training table
        m = math.exp(self.train_mu) if self.time_shift_type == "exponential" else self.train_mu
        return torch.where(s > 0, m / (m + (1 / s - 1)), s)

    def at_resolution(self, image_seq_len: int) -> "FlowSchedule":
        """With use_dynamic_shifting, train at the shift the family's pipeline samples this token count with."""
        if self.dynamic:
            self.train_mu = self.mu(image_seq_len)
        return self

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sig = self.sigma(torch.as_tensor(t).float() + 1).clamp(0, 1)
        return 1 - sig, sig

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """sigma * T, float32, as the scheduler's timesteps."""
        return self.sigma(torch.as_tensor(t).float() + 1).clamp(0, 1) * self.num_train_timesteps

    def sampling_sigmas(self, t) -> list[float]:
        """The sigmas of schedule times `t`: given to `set_timesteps(sigmas=...)` of a scheduler with
        `sampling_config`, it steps exactly through them (timesteps sigma * T, as in training)."""
        return [float(v) for v in self.sigma(torch.as_tensor(t).float() + 1).clamp(0, 1)]

    @staticmethod
    def sampling_config(config: dict, stochastic: bool) -> dict:
        """The teacher's scheduler config with its shift switched off (shift 1, no dynamic or terminal shift), so
        that explicit sigmas are used as given, and the multistep re-noising of `stochastic`."""
        if dict(config).get("use_flow_sigmas"):  # a DPM-Solver teacher (Sana): a FlowMatchEuler config of its own
            config = {"num_train_timesteps": dict(config).get("num_train_timesteps", 1000)}
        return {**dict(config), "shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
                "stochastic_sampling": bool(stochastic)}

    def mu(self, image_seq_len: int) -> float:
        """Resolution-dependent shift: linear in the token count (diffusers pipelines' calculate_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas_for_inference(self, num_steps: int, image_seq_len: int | None = None, sigmas=None,
                             mu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_steps + 1 sigmas ending in 0, num_steps timesteps), as scheduler.set_timesteps(num_steps, sigmas=,
        mu=) sets them. SD3 passes no sigmas; Flux passes np.linspace(1, 1/num_steps, num_steps) and mu.
        mu (or image_seq_len) is used only with dynamic shifting, as in diffusers.
        Numpy arithmetic as in diffusers (float64 default grid, float32 given sigmas), so the tables are equal.
        Solver "dpm": DPMSolverMultistepScheduler.set_timesteps(num_steps)'s flow table (no sigmas, no mu) and its
        int64 timesteps, truncated."""
        n = self.num_train_timesteps
        if self.solver == "dpm":
            if sigmas is not None:
                raise StepdistillError("DPMSolverMultistepScheduler takes no explicit sigmas")
            s = 1.0 - np.linspace(1, 1 / n, num_steps + 1)
            s = np.flip(self.shift * s / (1 + (self.shift - 1) * s))[:-1].copy()
            return (torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32)),
                    torch.from_numpy(s * n).to(torch.int64))
        if sigmas is None:
            s = np.linspace(self.sigma_max * n, self.sigma_min * n, num_steps) / n
        else:
            s = np.array(sigmas).astype(np.float32)
        if self.dynamic:
            if mu is None and image_seq_len is None:
                raise StepdistillError("use_dynamic_shifting needs image_seq_len or mu")
            mu = self.mu(image_seq_len) if mu is None else mu
            m = math.exp(mu) if self.time_shift_type == "exponential" else mu
            s = m / (m + (1 / s - 1))
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:  # stretch 1 - s so that the last sigma is shift_terminal (LTX-Video)
            one_minus = 1 - s
            if one_minus[-1] == 0:  # a schedule that ends at sigma 1 (one step) cannot stretch: diffusers gives NaN
                raise StepdistillError("shift_terminal needs a last sigma below 1 (at least 2 steps)")
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        s = torch.from_numpy(s).float()
        return torch.cat([s, torch.zeros(1)]), s * n

    # --- sampler steps: scheduler.step's arithmetic (float32 sample, result in v's dtype) -----------------
    def euler_step(self, x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        """x + (sigma_next - sigma) v."""
        sigma, sigma_next = _step_sigma(sigma, x), _step_sigma(sigma_next, x)
        return (x.float() + (sigma_next - sigma) * v).to(v.dtype)

    def stochastic_step(self, x: torch.Tensor, v: torch.Tensor, sigma, sigma_next,
                        noise: torch.Tensor) -> torch.Tensor:
        """stochastic_sampling=True: re-noise the predicted x0 = x - sigma v with fresh noise at sigma_next."""
        sigma, sigma_next = _step_sigma(sigma, x), _step_sigma(sigma_next, x)
        x0 = x.float() - sigma * v
        return ((1 - sigma_next) * x0 + sigma_next * noise).to(v.dtype)


def _step_sigma(v, like: torch.Tensor) -> torch.Tensor:
    """A step's sigma as float32; a scalar stays 0-dim so that dtype promotion is the scheduler's."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v
