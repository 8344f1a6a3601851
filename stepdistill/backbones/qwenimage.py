"""QwenImageTransformer2DModel: Qwen-Image (MMDiT, Qwen2.5-VL text, Wan-style 3D VAE, rectified flow)."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning, ImageVAE
from .flux import pack_latents, unpack_latents


class QwenImageBackbone(Backbone):
    """QwenImagePipeline's transformer call, for unpacked latents x (B, C, h, w), C = in_channels / 4 = z_dim:

        transformer(hidden_states=pack(x),                     # (B, h/2 * w/2, 4C), 2x2 patches as Flux packs
                    timestep=timestep.to(x.dtype) / 1000,      # sigma
                    encoder_hidden_states=cond.embeds,         # Qwen2.5-VL last hidden state, template prefix dropped
                    encoder_hidden_states_mask=cond.mask,      # (B, L); None where every token is valid
                    img_shapes=[[(1, h/2, w/2)]] * B,          # (frames, packed rows, packed cols) for RoPE
                    guidance=None, return_dict=False)[0]       # -> unpacked to (B, C, h, w)

    The VAE is a video VAE: frames (B, C, 1, h, w) and per-channel latents_mean / latents_std (decode z * std +
    mean). `image_vae` shows it as an image VAE, (B, 3, H, W) <-> (B, C, h, w) with the frame axis added and dropped,
    and `latent_norm` gives (1 / std, mean) as (C, 1, 1) tensors, so objectives see (B, C, h, w) latents.
    Prompts: `encode_prompt(max_sequence_length=512)` as `__call__` runs it; it pads a batch to its longest prompt,
    so conditionings of other batches have other lengths: the mask is kept (all ones where the pipeline returns
    None) and Conditioning.concat pads with masked zeros (masked tokens change no image token).
    Guidance: the pipeline's true CFG (true_cfg_scale > 1 with a negative prompt) runs cond and negative as two
    calls and rescales each packed token of neg + s (cond - neg) to the norm of cond's: `guide` does the same on
    the batched outputs (nonlinear_guidance), and `pipeline_guidance` samples a spec's g > 1 that way (negative
    prompts ""). The pipeline's `guidance_scale` is only the input of guidance-distilled networks
    (config.guidance_embeds), which no released Qwen-Image has: such a network is refused. With its own scheduler
    (shift_terminal) one step is NaN: shift_terminal cannot stretch a grid that ends at sigma 1.
    The dynamic shift's image_seq_len is the packed token count (h/2) * (w/2), as the pipeline's mu.
    """

    kind = "qwenimage"
    network_class = "QwenImageTransformer2DModel"
    pipelines = ("QwenImagePipeline",)
    # both streams' attention and MLP projections (not the AdaLN modulation, img_mod / txt_mod)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default
    nonlinear_guidance = True

    def predict(self, net, module, x, timestep, cond, guidance):
        if module.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image networks (guidance_embeds) are not supported")
        b, _, h, w = x.shape
        mask = None if cond.mask is None or bool(cond.mask.all()) else cond.mask
        out = net(hidden_states=pack_latents(x), timestep=timestep.to(device=x.device, dtype=x.dtype) / 1000,
                  encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=mask,
                  img_shapes=[[(1, h // 2, w // 2)]] * b, guidance=None, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def guide(self, out_c, out_u, scale):
        h, w = out_c.shape[-2:]
        c, u = pack_latents(out_c), pack_latents(out_u)
        comb = u + scale.reshape(-1, 1, 1) * (c - u)
        return unpack_latents(comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)), h, w)

    def pipeline_guidance(self, guidance_scale, batch):
        if guidance_scale > 1:  # true CFG against the empty prompt (its guidance_scale is only a distilled input)
            return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * batch}
        return {"true_cfg_scale": 1.0}

    def latent_channels(self, module):
        return int(module.config.in_channels) // 4

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=next(pipe.text_encoder.parameters()).device,
                                          max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Conditioning(embeds.float(), mask=mask)

    def pipeline_latents(self, latents):
        return pack_latents(latents)

    def image_vae(self, vae):
        return _FrameVAE(vae)

    def vae_factor(self, vae):
        return 2 ** len(vae.config.temperal_downsample)  # QwenImagePipeline.vae_scale_factor

    def latent_norm(self, vae):
        c = vae.config
        return (1.0 / torch.tensor(c.latents_std)).view(-1, 1, 1), torch.tensor(c.latents_mean).view(-1, 1, 1)


class _FrameVAE(ImageVAE):
    """AutoencoderKLQwenImage on single frames: (B, 3, H, W) <-> (B, z_dim, h, w)."""

    def encode(self, x):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        params = self.vae.encode(x.unsqueeze(2)).latent_dist.parameters[:, :, 0]
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(params))

    def decode(self, z):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=self.vae.decode(z.unsqueeze(2)).sample[:, :, 0])
