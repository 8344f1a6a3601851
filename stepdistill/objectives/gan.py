"""GAN pieces shared by every objective with a discriminator (DMD2's head today; the adversarial objective next):
losses, discriminator heads, and the feature taps they read.

    L_D = softplus(-D(real)) + softplus(D(fake))        (logistic)
    L_G = softplus(-D(fake))                             (non-saturating)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..errors import StepdistillError


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


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
    """A light head on a backbone's feature map (size x size): two convs, global pooling, one logit.

    Shaped by the map it reads: the second conv strides only on maps of 4x4 and more, and each GroupNorm group
    spans at least 16 values (channels per group x map area). A normalisation over fewer collapses: over 2
    channels of a 1x1 map it outputs only (+1, -1) or (-1, +1), the sign of the pair's difference, which a
    pattern shared by all of a backbone's features fixes for every sample. That is what the shapes teacher's
    2x2 mid-block map gave the earlier fixed-stride, 32-group head, and why it stayed at chance in training
    (tests/test_gan_head.py)."""

    def __init__(self, channels: int, hidden: int = 256, size: int = 8):
        super().__init__()
        hidden = min(hidden, channels)
        stride = 2 if size >= 4 else 1
        out = (size + 1) // 2 if stride == 2 else size
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1), _group_norm(hidden, size), torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1), _group_norm(hidden, out), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


def _group_norm(channels: int, size: int, min_values: int = 16) -> torch.nn.GroupNorm:
    """GroupNorm with the most groups (at most 32) whose every group normalises at least `min_values` values."""
    groups = max(g for g in range(1, min(32, channels) + 1)
                 if channels % g == 0 and (channels // g) * size * size >= min(min_values, channels * size * size))
    return torch.nn.GroupNorm(groups, channels)
