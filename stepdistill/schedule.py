"""Noise schedules: one object that knows alpha(t), sigma(t) and converts between parameterizations.

Every process here is x_t = alpha(t) * x0 + sigma(t) * eps. The network output is one of
  "epsilon"       eps
  "sample"        x0
  "v_prediction"  v = alpha * eps - sigma * x0            (variance preserving: alpha^2 + sigma^2 = 1)
  "flow"          u = eps - x0                             (flow matching: alpha = 1 - s, sigma = s)
Objectives ask for x0 / eps and never branch on the teacher family.
"""
from __future__ import annotations

import math

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
    """Rectified-flow schedule (SD3 / Flux / SANA): sigma = shift*s / (1 + (shift-1)*s), s = t / T."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.prediction_type = "flow"

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(t).float() / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sig = self.sigma(t)
        return 1 - sig, sig
