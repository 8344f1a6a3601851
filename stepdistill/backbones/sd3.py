"""SD3Transformer2DModel: Stable Diffusion 3 / 3.5 (MMDiT, rectified flow)."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning


class SD3Backbone(Backbone):
    kind = "sd3"
    network_class = "SD3Transformer2DModel"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    # the image and text streams' attention and feed-forward projections of every joint block
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    # no kohya file: diffusers' SD3 loader converts no kohya / SAI layout (a lora_unet_joint_blocks_* or
    # diffusion_model.joint_blocks.* file loads as nothing, with a warning); ComfyUI reads the diffusers-format file
    kohya_prefix = None

    def predict(self, net, module, x, timestep, cond, guidance):
        # the pipeline passes scheduler timesteps (sigma * 1000) as they are
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds,
                   pooled_projections=cond.pooled, return_dict=False)[0]

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                  device=next(pipe.text_encoder.parameters()).device,
                                                  do_classifier_free_guidance=False)
        return Conditioning(embeds.float(), pooled.float())
