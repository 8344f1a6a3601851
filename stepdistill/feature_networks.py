"""Image feature networks for pixel-space discriminators (ADD: heads on a frozen image backbone's features).

A network is named `torchvision:NAME` or `timm:NAME` and built without downloading anything; its weights come from
a local file (safetensors, or a plain state dict read with `torch.load(weights_only=True)`), never from remote code.
Its features are the outputs of named modules (taps), read as (B, C, H, W) maps (a transformer's tokens are laid
back on their square grid).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .denoiser import recording_features
from .errors import StepdistillError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNetwork(torch.nn.Module):
    """A frozen image network: pixels in [-1, 1] -> its features at `taps` (gradients reach the pixels)."""

    def __init__(self, net: torch.nn.Module, taps: list[str], size: int):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.taps, self.size = list(taps), size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = (pixels.float().clamp(-1, 1) + 1) / 2
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        with recording_features(self.net, self.taps) as found:
            self.net((x - self.mean) / self.std)
        return [_as_map(f) for f in found]


def _as_map(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as is; (B, N, D) tokens as (B, D, s, s) on their grid (leading class/register tokens dropped)."""
    if f.ndim == 4:
        return f
    if f.ndim == 3:
        side = math.isqrt(f.shape[1])
        return f[:, f.shape[1] - side * side:].transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
    raise StepdistillError(f"a feature tap gave a {f.ndim}-d output; taps must give feature maps or tokens")


def _default_taps(net) -> list[str]:
    if all(hasattr(net, f"layer{i}") for i in (2, 3, 4)):  # torchvision / timm ResNets
        return ["layer2", "layer3", "layer4"]
    info = getattr(net, "feature_info", None)  # timm: where each stage's features are
    if info is not None:
        return [m for m in info.module_name()][-3:]
    raise StepdistillError(f"no default feature taps for {type(net).__name__}; name its modules in "
                           "objective.options.taps")


def load_feature_network(spec: str, weights: str | None, taps: list[str] | None, size: int) -> FeatureNetwork:
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        import torchvision

        try:
            net = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise StepdistillError(f"feature network '{spec}': torchvision has no model '{name}'") from None
    elif kind == "timm":
        import timm

        try:
            net = timm.create_model(name, pretrained=False)
        except RuntimeError as err:
            raise StepdistillError(f"feature network '{spec}': {str(err).splitlines()[0]}") from None
    else:
        raise StepdistillError(f"feature network '{spec}' must be torchvision:NAME or timm:NAME")
    if weights is not None:
        net.load_state_dict(_read_weights(weights, spec))
    return FeatureNetwork(net, taps or _default_taps(net), size)


def _read_weights(path: str, spec: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise StepdistillError(f"feature network weights '{path}' not found (a local .safetensors or .pt file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise StepdistillError(f"feature network weights '{path}' for {spec} do not load ({type(err).__name__})") from None
