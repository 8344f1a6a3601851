"""SanaTransformer2DModel: Sana (linear-attention DiT, Gemma-2 text, 32x DC-AE, rectified flow)."""
from __future__ import annotations

import inspect

import torch

from .base import Backbone, Conditioning, ImageVAE


class SanaBackbone(Backbone):
    """SanaPipeline's transformer call, for latents x (B, C, h, w) as they are (no packing):

        transformer(x, encoder_hidden_states=cond.embeds,        # Gemma-2 last hidden state (B, 300, D)
                    encoder_attention_mask=cond.mask,            # (B, 300) tokenizer mask
                    timestep=timestep * config.timestep_scale,   # scheduler timestep (sigma * 1000) times the scale
                    return_dict=False)[0]                        # flow velocity eps - x0; first C channels if 2C

    Timesteps: the teacher's DPMSolverMultistepScheduler (use_flow_sigmas) hands the pipeline int64 timesteps
    truncated from sigma * 1000 (its first, sigma 0.99967 at flow_shift 3, is 999); the schedule (FlowSchedule,
    solver "dpm", shift = flow_shift) gives the float sigma * 1000 of each schedule time, which is what the exported
    FlowMatchEulerDiscreteScheduler spec hands the network at the trained sigmas. Either way the pipeline multiplies
    it by timestep_scale (a float tensor). No pooled text; CFG is the linear rule on [uncond, cond].
    Prompts are encoded as `__call__` encodes them: max_sequence_length 300, clean_caption False, and its default
    `complex_human_instruction` (an "Enhanced prompt" preamble, its tokens cut to [0] + the last 299) prepended to
    every non-empty prompt; the empty prompt is encoded as the pipeline encodes its negative prompt "", without it
    (stepdistill's unconditional row). A positive prompt "" would get the preamble in the pipeline, not here.
    The DC-AE is deterministic and returns `.latent`: `image_vae` gives it AutoencoderKL's latent_dist (a point).
    VAE factor 2 ** (len(encoder_block_out_channels) - 1) = 32; decode latents / scaling_factor (no shift).
    Sample tiny (non-binned) sizes with use_resolution_binning=False.
    """

    kind = "sana"
    network_class = "SanaTransformer2DModel"
    pipelines = ("SanaPipeline",)
    # self- and cross-attention projections, and the 1x1 convolutions of the GLUMBConv feed-forward
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted", "ff.conv_point")
    MAX_SEQUENCE_LENGTH = 300  # SanaPipeline.__call__'s default

    def predict(self, net, module, x, timestep, cond, guidance):
        out = net(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                  timestep=timestep.to(x.device) * module.config.timestep_scale, return_dict=False)[0]
        return out[:, :x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        groups = [[i for i, p in enumerate(prompts) if p], [i for i, p in enumerate(prompts) if not p]]
        parts = [self._encode(pipe, [prompts[i] for i in idx], instruction if k == 0 else None)
                 for k, idx in enumerate(groups) if idx]
        order = torch.argsort(torch.tensor(groups[0] + groups[1]))
        return Conditioning.concat(parts).map(lambda v: v[order.to(v.device)])

    def _encode(self, pipe, prompts, instruction):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                device=next(pipe.text_encoder.parameters()).device,
                                                clean_caption=False, max_sequence_length=self.MAX_SEQUENCE_LENGTH,
                                                complex_human_instruction=instruction)
        return Conditioning(embeds.float(), mask=mask)

    def image_vae(self, vae):
        return _DCAE(vae)

    def vae_factor(self, vae):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


class _Point:
    """The latent 'distribution' of a deterministic autoencoder."""

    def __init__(self, z):
        self.mean = z

    def sample(self, generator=None):
        return self.mean

    def mode(self):
        return self.mean


class _DCAE(ImageVAE):
    def encode(self, x):
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=_Point(self.vae.encode(x).latent))

    def decode(self, z):
        return self.vae.decode(z)
