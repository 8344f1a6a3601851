"""Loss primitives and solver steps shared by the objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample mean of sqrt((pred - target)^2 + c^2) - c (iCT / LCM's pseudo-Huber)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).flatten(1).mean(1)


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float = 1e-3) -> torch.Tensor:
    if kind == "l2":
        return l2(pred, target)
    if kind == "huber":
        return pseudo_huber(pred, target, huber_c)
    raise ValueError(f"unknown distance {kind!r}")


def consistency_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out of the consistency parameterization f(x, t) = c_skip x + c_out x0_pred (LCM's scalings,
    with t scaled so that c_skip -> 1 only near t = 0)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def denoising_score_matching(pred_x0: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean x0-space denoising loss, optionally weighted per sample."""
    per = l2(pred_x0, x0)
    return (per * weight).mean() if weight is not None else per.mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()
