"""ZImageTransformer2DModel: Z-Image / Z-Image-Turbo (single-stream DiT, Qwen3 text, rectified flow)."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning


class ZImageBackbone(Backbone):
    """ZImagePipeline's transformer call, for latents x (B, C, h, w):

        out = transformer(list(x.unsqueeze(2).unbind(0)),     # B latents (C, 1, h, w): a frame axis, no packing
                          (1000 - timestep) / 1000,            # 1 - sigma: 0 is noise, 1 clean (times t_scale inside)
                          [e[m] for e, m in cond],             # B caption features (L_i, D), valid tokens only
                          return_dict=False)[0]                # B outputs (C, 1, h, w), predicting x0 - eps
        -> -stack(out).squeeze(2)                              # eps - x0, the flow velocity the scheduler steps

    Prompts: encode_prompt(max_sequence_length=512) as `__call__` runs it (Qwen3 chat template, enable_thinking,
    penultimate hidden state) returns a list of variable-length tensors; the Conditioning pads them to the
    batch's longest with a mask, and `predict` hands the network each row's masked tokens back as that list.
    (ZImagePipeline's encode_prompt rewrites the prompt list it is given into chat-templated text: callers pass
    copies.)
    Guidance: the pipeline's guidance_scale s gives pos + s (pos - neg), i.e. stepdistill's scale g = 1 + s, and
    applies CFG for any s > 0 (its default 5.0): `pipeline_guidance` passes s = g - 1, so a student's g = 1 is
    sampled without CFG. (cfg_normalization / cfg_truncation, off by default, are not modelled.) The pipeline
    always patchifies with patch_size 2 (`downsampling`); a tap's map is a layer's first (h/2)(w/2) tokens, the
    image stream of its unified [image, caption] sequence, row-major on the patch grid.
    """

    kind = "zimage"
    network_class = "ZImageTransformer2DModel"
    pipelines = ("ZImagePipeline",)
    # attention and SwiGLU feed-forward of the main layers and both refiners (not the AdaLN modulation)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s default

    def predict(self, net, module, x, timestep, cond, guidance):
        caps = [e[m.bool()] for e, m in zip(cond.embeds, cond.mask)]
        out = net(list(x.unsqueeze(2).unbind(0)), (1000 - timestep.to(x.device)) / 1000, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def pipeline_guidance(self, guidance_scale, batch):
        return {"guidance_scale": guidance_scale - 1.0}

    def downsampling(self, module):
        return 2  # ZImageTransformer2DModel.forward's patch_size, which the pipeline never changes

    def feature_taps(self, module):
        n = len(module.layers)
        return [f"layers.{i}" for i in sorted({n // 4, n // 2, 3 * n // 4, n - 1})]

    def feature_map(self, module, output, latent_hw):
        h, w = latent_hw[0] // 2, latent_hw[1] // 2
        return super().feature_map(module, output[:, :h * w], latent_hw)

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        embeds, _ = pipe.encode_prompt(list(prompts), device=next(pipe.text_encoder.parameters()).device,
                                       do_classifier_free_guidance=False, max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        return Conditioning.concat([Conditioning(e[None].float(), mask=torch.ones(1, len(e), dtype=torch.long,
                                                                                  device=e.device)) for e in embeds])
