"""One small adapter per backbone kind; `backbone_for` picks it from the network or the pipeline class."""
from __future__ import annotations

from .base import Backbone, Conditioning, ImageVAE
from .flux import FluxBackbone
from .pixart import PixArtBackbone
from .qwenimage import QwenImageBackbone
from .sana import SanaBackbone
from .sd3 import SD3Backbone
from .unet import UNetBackbone, guidance_scale_embedding
from .zimage import ZImageBackbone

BACKBONES: tuple[type[Backbone], ...] = (UNetBackbone, SD3Backbone, FluxBackbone, PixArtBackbone, SanaBackbone,
                                         QwenImageBackbone, ZImageBackbone)
PIPELINE_BACKBONES = {name: cls for cls in BACKBONES for name in cls.pipelines}


def backbone_for(module) -> Backbone:
    """The adapter of a diffusers network (unwrapped from DDP / torch.compile if needed)."""
    module = getattr(module, "module", module)
    module = getattr(module, "_orig_mod", module)
    for cls in BACKBONES:
        if any(c.__name__ == cls.network_class for c in type(module).__mro__):
            return cls()
    raise ValueError(f"no backbone adapter for {type(module).__name__}; supported: "
                     f"{', '.join(c.network_class for c in BACKBONES)}")


def backbone_for_pipeline(pipeline_class: str) -> Backbone | None:
    cls = PIPELINE_BACKBONES.get(pipeline_class)
    return cls() if cls else None


__all__ = ["BACKBONES", "Backbone", "Conditioning", "FluxBackbone", "ImageVAE", "PIPELINE_BACKBONES",
           "PixArtBackbone", "QwenImageBackbone", "SD3Backbone", "SanaBackbone", "UNetBackbone", "ZImageBackbone",
           "backbone_for", "backbone_for_pipeline", "guidance_scale_embedding"]
