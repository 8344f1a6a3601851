"""UNet2DConditionModel: Stable Diffusion 1.x / 2.x and SDXL (discrete VP teachers)."""
from __future__ import annotations

import math

import torch

from .base import Backbone, Conditioning


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight, as diffusers' LCM pipelines compute it (w scaled by 1000)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class UNetBackbone(Backbone):
    kind = "unet"
    network_class = "UNet2DConditionModel"
    component = "unet"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "LatentConsistencyModelPipeline",
                 "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
    kohya_prefix = "lora_unet_"

    def predict(self, net, module, x, timestep, cond, guidance):
        kwargs = {"encoder_hidden_states": cond.embeds}
        if cond.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        dim = getattr(module.config, "time_cond_proj_dim", None)
        if dim is not None:
            if guidance is None:
                raise ValueError("this network has a guidance embedding: pass the guidance weight w")
            kwargs["timestep_cond"] = guidance_scale_embedding(guidance, dim).to(x)
        return net(x, timestep, **kwargs).sample

    def guidance_input(self, module):
        return "embedding" if getattr(module.config, "time_cond_proj_dim", None) is not None else None

    def downsampling(self, module):
        return 2 ** (len(module.config.down_block_types) - 1)

    def feature_taps(self, module):
        """Every down block and the mid block (the encoder half: the network stops there)."""
        return [f"down_blocks.{i}" for i in range(len(module.down_blocks))] + ["mid_block"]

    def feature_map(self, module, output, latent_hw):
        return output[0] if isinstance(output, tuple) else output  # down blocks: (hidden states, skip connections)

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        """As the SD / SDXL pipelines' encode_prompt (no clip_skip, no LoRA scale): SD takes the last hidden
        states of its one encoder; SDXL the penultimate of both, concatenated, the second's pooled output, the
        time ids of a square `resolution` and, with force_zeros_for_empty_prompt, zeros for an empty prompt."""
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is None:
            tok, enc = pairs[0]
            return Conditioning(enc(_ids(tok, prompts, enc))[0].float())
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        hidden, pooled = [], None
        for tok, enc in pairs:
            out = enc(_ids(tok, prompts, enc), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds, pooled = torch.cat(hidden, dim=-1).float(), pooled.float()
        if bool(pipe.config.get("force_zeros_for_empty_prompt", True)):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        res = resolution or 1024
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=embeds.device)
        return Conditioning(embeds, pooled, time_ids.repeat(len(prompts), 1))


def _ids(tok, prompts, enc):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(next(enc.parameters()).device)
