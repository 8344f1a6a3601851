"""Loss primitives and solver steps shared by the objectives."""
from __future__ import annotations

import torch


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


# --- distribution matching (DMD, DMD2, VSD / SwiftBrush) -------------------------------------------------------

def distribution_matching_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * ||x - sg(x - grad)||^2 per sample (summed over the sample's elements).

    Its gradient with respect to x is exactly `grad`: the way DMD and VSD push a score difference, which is no
    loss's gradient, into the generator through autograd. Objectives average it over the batch and elements
    (DMD2's `reduction="mean"`), which scales the gradient by 1 / x.numel().
    """
    target = (x.float() - grad.float()).detach()
    return 0.5 * (x.float() - target).pow(2).flatten(1).sum(1)


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """DMD's generator gradient (x0_fake - x0_real), divided per sample by mean |x0 - x0_real| (DMD's weighting)."""
    grad = x0_fake.float() - x0_real.float()
    if normalize:
        scale = (x0.float() - x0_real.float()).abs().flatten(1).mean(1).reshape(-1, *([1] * (x0.ndim - 1)))
        grad = grad / scale.clamp_min(1e-8)
    return torch.nan_to_num(grad.detach())


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """VSD's generator gradient w(t) * (eps_teacher_cfg - eps_fake) (ProlificDreamer, SwiftBrush)."""
    w = weight.float().reshape(-1, *([1] * (eps_real.ndim - 1)))
    return torch.nan_to_num((w * (eps_real.float() - eps_fake.float())).detach())
