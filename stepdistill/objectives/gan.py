"""GAN pieces shared by every objective with a discriminator (DMD2's head, the adversarial objective): losses,
penalties, and discriminator heads. The features the heads read come from the backbone wrapper's taps
(`Denoiser.features`), so a head works on any backbone.

    non-saturating:  L_D = softplus(-D(real)) + softplus(D(fake)),   L_G = softplus(-D(fake))
    hinge:           L_D = relu(1 - D(real)) + relu(1 + D(fake)),     L_G = -D(fake)
    R1:              gamma / 2 * E ||grad_f D(f)||^2 at real inputs f
    approximate R1:  E (D(f) - D(f + s n))^2, n ~ N(0, I)   (LADD: no second-order gradient)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

GAN_LOSSES = ("non_saturating", "hinge")


def gan_generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's loss on D(fake): softplus(-D) (non-saturating) or -D (hinge)."""
    if kind == "hinge":
        return -fake_logits.float().mean()
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                           kind: str = "non_saturating") -> torch.Tensor:
    """The discriminator's loss: softplus(-D(real)) + softplus(D(fake)), or relu(1 - D(real)) + relu(1 + D(fake))."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def r1_penalty(real_logits: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """E ||d D / d inputs||^2 over the batch (summed over every input tensor); `inputs` must require grad and
    `real_logits` be computed from them. The graph is kept so the penalty itself can be backpropagated."""
    grads = torch.autograd.grad(real_logits.float().sum(), inputs, create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads).mean()


def approximate_r1_penalty(real_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """LADD's stand-in for R1: E (D(f) - D(f + s n))^2, the logits' change under a small input perturbation."""
    return (real_logits.float() - perturbed_logits.float()).pow(2).mean()


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


class DiscriminatorHead(torch.nn.Module):
    """A light head on a backbone's feature map (size x size): two convs, global pooling, one logit.

    Shaped by the map it reads: the second conv strides only on maps of 4x4 and more, and each GroupNorm group
    spans at least 16 values (channels per group x map area). A normalisation over fewer collapses: over 2
    channels of a 1x1 map it outputs only (+1, -1) or (-1, +1), the sign of the pair's difference, which a
    pattern shared by all of a backbone's features fixes for every sample. That is what the shapes teacher's
    2x2 mid-block map gave the earlier fixed-stride, 32-group head, and why it stayed at chance in training
    (tests/test_gan_head.py)."""

    def __init__(self, channels: int, hidden: int = 256, size: int = 8, cond_dim: int | None = None):
        super().__init__()
        hidden = min(hidden, channels)
        stride = 2 if size >= 4 else 1
        out = (size + 1) // 2 if stride == 2 else size
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1), _group_norm(hidden, size), torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1), _group_norm(hidden, out), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(hidden, 1))
        # a projection discriminator (Miyato & Koyama 2018) where a text vector is given: logit += <P c, h>
        self.project = None if cond_dim is None else torch.nn.Linear(cond_dim, hidden, bias=False)

    def forward(self, features: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.project is None:
            return self.net(features).squeeze(1)
        pooled = self.net[:-1](features)
        return self.net[-1](pooled).squeeze(1) + (self.project(cond.float()) * pooled).sum(1)


class FeatureHeads(torch.nn.Module):
    """One conditioned DiscriminatorHead per feature tap; forward gives the logits of every head, (heads, B)."""

    def __init__(self, shapes: list[tuple[int, int]], hidden: int, cond_dim: int | None):
        super().__init__()
        self.heads = torch.nn.ModuleList(DiscriminatorHead(c, hidden, size, cond_dim) for c, size in shapes)

    def forward(self, features: list[torch.Tensor], cond: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([head(f, cond) for head, f in zip(self.heads, features)])


def text_vector(cond) -> torch.Tensor:
    """What a head is conditioned on: the pooled text embedding where the backbone has one, else the mean of the
    per-token embeddings over the prompt's tokens (padding masked out, each token counted as often as it stands
    for: `Conditioning.mask`, `.repeats`)."""
    if cond.pooled is not None:
        return cond.pooled.float()
    weight = torch.ones(cond.embeds.shape[:2], device=cond.embeds.device)
    if cond.mask is not None:
        weight = weight * cond.mask.float()
    if cond.repeats is not None:
        weight = weight * cond.repeats.float()
    return (cond.embeds.float() * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1.0)


def _group_norm(channels: int, size: int, min_values: int = 16) -> torch.nn.GroupNorm:
    """GroupNorm with the most groups (at most 32) whose every group normalises at least `min_values` values."""
    groups = max(g for g in range(1, min(32, channels) + 1)
                 if channels % g == 0 and (channels // g) * size * size >= min(min_values, channels * size * size))
    return torch.nn.GroupNorm(groups, channels)
