"""FluxTransformer2DModel: Flux.1 dev / schnell (MMDiT double + single-stream blocks, rectified flow)."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, row-major over the packed grid (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents (B, C, h, w) (FluxPipeline._unpack_latents)."""
    b, _, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) rotary position ids [0, row, col] of the packed grid (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(Backbone):
    """FluxPipeline's transformer call, for unpacked latents x (B, C, h, w), C = in_channels / 4:

        transformer(hidden_states=pack(x),                   # (B, h/2 * w/2, 4C)
                    timestep=timestep.to(x.dtype) / 1000,    # sigma; the model multiplies by 1000 again
                    guidance=1 + w,                          # (B,) float32 guidance scale, config.guidance_embeds only
                    pooled_projections=cond.pooled,          # CLIP pooler_output
                    encoder_hidden_states=cond.embeds,       # T5 last hidden state (B, 512, D)
                    txt_ids=zeros(L, 3), img_ids=[0, row, col] of the packed grid)   -> unpacked to (B, C, h, w)

    `guidance` is the Denoiser's w, stepdistill's one guidance convention (LCM's: w = guidance_scale - 1, what the
    objectives pass a guidance-input student and what a spec's guidance_scale = 1 + w undoes): the network gets
    FluxPipeline's guidance_scale = 1 + w. For a guidance-embedding network (Flux-dev), guidance None means the
    pipeline's default guidance_scale DEFAULT_GUIDANCE = 3.5 (what a user's plain pipeline call gives it); a
    network without the embedding (schnell) ignores it. No classifier-free guidance batch: FluxPipeline runs a
    second, negative-prompt call only with true_cfg_scale > 1.
    Packing makes the token grid h/2 x w/2, so `downsampling` is 2 and the dynamic shift's image_seq_len (Teacher.
    at_resolution, FluxPipeline's mu) is (h/2) * (w/2). Both block types return (encoder_hidden_states,
    hidden_states): a tap's map is its image stream on the packed grid, (B, inner_dim, h/2, w/2).
    """

    kind = "flux"
    network_class = "FluxTransformer2DModel"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale
    MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s max_sequence_length
    # Attention and feed-forward projections of both block types (diffusers' Flux DreamBooth LoRA targets plus the
    # single blocks' proj_mlp / proj_out). "proj_out" also matches the network's final output projection.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")

    def predict(self, net, module, x, timestep, cond, guidance):
        b, _, h, w = x.shape
        if module.config.guidance_embeds:
            scale = self.DEFAULT_GUIDANCE if guidance is None else 1.0 + torch.as_tensor(guidance).float()
            guidance = torch.as_tensor(scale, dtype=torch.float32, device=x.device).expand(b)
        else:
            guidance = None
        out = net(hidden_states=pack_latents(x), timestep=timestep.to(device=x.device, dtype=x.dtype) / 1000,
                  guidance=guidance, pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                  txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    def guidance_input(self, module):
        return "scale" if module.config.guidance_embeds else None

    def latent_channels(self, module):
        return int(module.config.in_channels) // 4

    def downsampling(self, module):
        return 2

    def feature_taps(self, module):
        """A quarter, half, three quarters and the end of the depth, double blocks then single blocks."""
        blocks = [f"transformer_blocks.{i}" for i in range(len(module.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{i}" for i in range(len(module.single_transformer_blocks))]
        n = len(blocks)
        return [blocks[i] for i in sorted({n // 4, n // 2, 3 * n // 4, n - 1})]

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None,
                                               device=next(pipe.text_encoder_2.parameters()).device,
                                               max_sequence_length=self.MAX_SEQUENCE_LENGTH)
        return Conditioning(embeds.float(), pooled.float())

    def pipeline_latents(self, latents):
        return pack_latents(latents)
