"""SD3Transformer2DModel: Stable Diffusion 3 / 3.5 (MMDiT, rectified flow)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from .base import Backbone, Conditioning

# StableDiffusion3Pipeline's default max_sequence_length: without a T5 it appends this many all-zero "T5" tokens
T5_TOKENS = 256


class RepeatedTokenJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' JointAttnProcessor2_0, plus an optional `context_repeats` (B, L): the text token j stands for
    context_repeats[:, j] identical tokens, so its key's attention logit gets + log(repeats), which is exactly the
    softmax over that many copies. Without it (the pipeline's own calls) this is JointAttnProcessor2_0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 context_repeats=None, **kwargs):
        if context_repeats is None or encoder_hidden_states is None:  # SD3.5's attn2 has no text stream
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n_image = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        cq = attn.norm_added_q(cq) if attn.norm_added_q is not None else cq
        ck = attn.norm_added_k(ck) if attn.norm_added_k is not None else ck
        bias = torch.cat([context_repeats.new_zeros(b, n_image), context_repeats.log()], dim=1)
        out = F.scaled_dot_product_attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2),
                                             attn_mask=bias[:, None, None, :].to(q.dtype), dropout_p=0.0)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def use_repeated_token_attention(module) -> None:
    """Give the network's attention modules RepeatedTokenJointAttnProcessor (once); calls without
    `context_repeats` compute exactly what they did."""
    if not getattr(module, "_stepdistill_repeated_tokens", False):
        module.set_attn_processor(RepeatedTokenJointAttnProcessor())
        module._stepdistill_repeated_tokens = True


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
        extra = {}
        if cond.repeats is not None:
            use_repeated_token_attention(module)
            extra["joint_attention_kwargs"] = {"context_repeats": cond.repeats.to(x.dtype)}
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds,
                   pooled_projections=cond.pooled, return_dict=False, **extra)[0]

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        """The pipeline's encode_prompt at its default max_sequence_length. Without a T5 its 256 "T5" tokens are
        zeros, identical in every layer of the network (same input, per-token maps, same keys), so they are
        computed as one token that stands for 256 (`Conditioning.repeats`): the same function, with 25 text tokens
        instead of 280 on the bundled flow teacher (test_sd3.py checks the pipeline loop on it)."""
        no_t5 = getattr(pipe, "text_encoder_3", None) is None
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                  device=next(pipe.text_encoder.parameters()).device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=1 if no_t5 else T5_TOKENS)
        repeats = None
        if no_t5:
            repeats = torch.ones(embeds.shape[:2], device=embeds.device)
            repeats[:, -1] = T5_TOKENS
        return Conditioning(embeds.float(), pooled.float(), repeats=repeats)
