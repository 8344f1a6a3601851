"""PixArtTransformer2DModel: PixArt-Alpha / PixArt-Sigma (DiT with T5 cross-attention, discrete VP teachers)."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning


class PixArtBackbone(Backbone):
    """The PixArt pipelines' transformer call, for latents x (B, C, h, w):

        transformer(x, encoder_hidden_states=cond.embeds,   # T5 last hidden state (B, L, D)
                    encoder_attention_mask=cond.mask,       # (B, L) T5 tokenizer mask
                    timestep=timestep,                      # the integer DDPM timestep as it is
                    added_cond_kwargs={"resolution": ..., "aspect_ratio": ...}, return_dict=False)[0]

    The output is eps; with learned variance (out_channels = 2C) the adapter returns its first C channels, as the
    pipelines do. Micro-conditions: PixArtSigmaPipeline always passes None; PixArtAlphaPipeline passes (height,
    width) in pixels and height / width when transformer.config.sample_size == 128 (the 1024 px model, whose
    use_additional_conditions needs them). For that one `encode_prompt` puts (resolution, resolution, 1.0) of the
    square training resolution in Conditioning.time_ids, and `predict` passes them on; a network that needs them
    and gets none is refused.
    PixArt pipelines have no LoRA loader (`load_lora_weights` / `save_lora_weights`): a PixArt student is exported
    as a full pipeline (a LoRA student merged into its transformer). Sample tiny (non-binned) sizes with
    use_resolution_binning=False. Prompts are encoded as `__call__` encodes them by default: clean_caption=True,
    which the pipeline drops (with a warning) where bs4 or ftfy is missing.
    """

    kind = "pixart"
    network_class = "PixArtTransformer2DModel"
    pipelines = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # self- and cross-attention
    MAX_SEQUENCE_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}  # their __call__ defaults

    def predict(self, net, module, x, timestep, cond, guidance):
        micro = {"resolution": None, "aspect_ratio": None}
        if cond.time_ids is not None:
            micro = {"resolution": cond.time_ids[:, :2], "aspect_ratio": cond.time_ids[:, 2:]}
        elif module.use_additional_conditions:
            raise ValueError("this PixArt transformer takes resolution micro-conditions: encode the prompts with "
                             "the PixArtAlphaPipeline teacher's prompt encoder")
        out = net(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=timestep,
                  added_cond_kwargs=micro, return_dict=False)[0]
        return out[:, :x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out

    @torch.no_grad()
    def encode_prompt(self, pipe, prompts, resolution):
        name = type(pipe).__name__
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                device=next(pipe.text_encoder.parameters()).device,
                                                clean_caption=_can_clean_captions(),
                                                max_sequence_length=self.MAX_SEQUENCE_LENGTH.get(name, 300))
        time_ids = None
        if name == "PixArtAlphaPipeline" and pipe.transformer.config.sample_size == 128:
            res = float(resolution or pipe.transformer.config.sample_size * pipe.vae_scale_factor)
            time_ids = torch.tensor([[res, res, 1.0]], device=embeds.device).repeat(len(prompts), 1)
        return Conditioning(embeds.float(), mask=mask, time_ids=time_ids)


def _can_clean_captions() -> bool:
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()
