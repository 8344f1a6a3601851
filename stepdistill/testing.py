"""Tiny Stable-Diffusion-family pipelines built from configs (random weights, no downloads), for tests."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def write_char_tokenizer(folder: Path, max_length: int = 16):
    """A CLIPTokenizer over single characters (every word splits into letters): tiny and offline."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return tok


def tiny_unet_config(cross_attention_dim: int = 32, sdxl: bool = False) -> dict:
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
               attention_head_dim=8, norm_num_groups=8)
    if sdxl:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=1)
    return cfg


def build_tiny_pipeline(folder: str | Path, *, sdxl: bool = False, prediction_type: str = "epsilon", seed: int = 0,
                        beta_schedule: str = "scaled_linear") -> Path:
    """Write a tiny random SD (or SDXL) pipeline folder: 32x32 images, 8x8x4 latents; the DDIM scheduler's
    `prediction_type` (epsilon / v_prediction / sample) and `beta_schedule` (linear / scaled_linear /
    squaredcos_cap_v2) as given."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    text_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16, projection_dim=32)
    tok = write_char_tokenizer(folder / "_tok")
    text_cfg["vocab_size"] = len(tok)  # every token id has an embedding row (82: a word-final "'" or "-" is 80, 81)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    betas = {"linear": (0.0001, 0.02)}.get(beta_schedule, (0.00085, 0.012))
    scheduler = DDIMScheduler(beta_start=betas[0], beta_end=betas[1], beta_schedule=beta_schedule, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                              timestep_spacing="trailing")
    if sdxl:
        enc1 = CLIPTextModel(CLIPTextConfig(**text_cfg))
        enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_cfg, "hidden_size": 32}))
        unet = UNet2DConditionModel(**tiny_unet_config(64, sdxl=True))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=scheduler)
    else:
        unet = UNet2DConditionModel(**tiny_unet_config(32))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
