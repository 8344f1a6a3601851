"""Tiny random diffusers pipelines for the transformer / flow-matching families, built from configs, fully offline.

Each ``build_tiny_<family>(folder, seed=0, **options) -> Path`` writes a pipeline folder with ``save_pretrained``
(random weights, tokenizers built locally over single characters / bytes, no sentencepiece, no downloads) that
samples a 32x32 image (128x128 for Sana: its DC-AE compresses 32x) in well under a second on one CPU thread.
Families: SD3, Flux.1, PixArt-Sigma, Sana, Qwen-Image, Z-Image. Each builder's docstring says how its pipeline
drives the transformer in one denoising step (checked against the diffusers 0.42.1 pipeline sources, and the first
call's latent shape / timestep value by tests/test_tiny_pipelines.py): reference for writing backbone adapters.

Loading back: ``<PipelineClass>.from_pretrained(folder, **load_kwargs(folder))``; ``load_kwargs`` is ``{}`` except
for SD3 built without T5 (``text_encoder_3=None, tokenizer_3=None``: diffusers 0.42.1 will not load a folder whose
model_index.json lists those two as ``[null, null]`` unless they are passed explicitly).
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

from .testing import write_char_tokenizer

PRINTABLE = [c for c in string.printable if not c.isspace()]  # T5 / Gemma / Qwen char vocabularies (94 chars)

# Real configs' VAE normalisation constants (so adapters see non-trivial scale/shift).
SD3_VAE_NORM = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_NORM = dict(scaling_factor=0.3611, shift_factor=0.1159)


# ----------------------------------------------------------------------------------------------------------- helpers
def load_kwargs(folder: str | Path) -> dict:
    """Extra kwargs ``<Pipeline>.from_pretrained(folder, ...)`` needs for a folder built here."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


def _tiny_vae(latent_channels: int, vae_scale: int = 8, **norm):
    """AutoencoderKL with ``vae_scale`` = 2 ** (len(block_out_channels) - 1) spatial compression, no quant convs
    (as SD3 / Flux's VAEs)."""
    from diffusers import AutoencoderKL

    n = {1: 1, 2: 2, 4: 3, 8: 4}[vae_scale]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) + (16,) * (n - 1), down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=4,
                         sample_size=32, use_quant_conv=False, use_post_quant_conv=False, **norm)


def _clip_config(hidden: int, projection: int | None = None, max_length: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                          intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
                          max_position_embeddings=max_length, vocab_size=96,  # write_char_tokenizer: 82 tokens
                          projection_dim=projection or hidden)


def t5_char_tokenizer(folder: Path | None = None, model_max_length: int = 512):
    """A T5Tokenizer (= T5TokenizerFast in transformers 5; Unigram via ``tokenizers``, no sentencepiece file) over
    single printable characters: <pad>=0, </s>=1, <unk>=2, '▁', then the 94 printable non-space ASCII characters; no
    <extra_id_*> sentinels (so 98 tokens)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in PRINTABLE]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


def _tiny_t5(d_model: int = 32, vocab_size: int = 128):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4,
                                   num_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def clip_char_tokenizer(max_length: int = 16):
    """stepdistill.testing's single-character CLIPTokenizer, written to a scratch folder (not the pipeline's)."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_char_tokenizer(Path(tmp), max_length=max_length)


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------------------------- SD3
def build_tiny_sd3(folder: str | Path, seed: int = 0, *, latent_channels: int = 16, patch_size: int = 2,
                   t5: bool = False, vae_scale: int = 8, image_size: int = 32) -> Path:
    """StableDiffusion3Pipeline: CLIP-L-like (hidden 16) + CLIP-G-like (hidden 32) CLIPTextModelWithProjection,
    ``text_encoder_3`` None (or ``t5=True``: tiny T5EncoderModel, d_model 64, + char T5 tokenizer),
    SD3Transformer2DModel 2 layers (``patch_size`` 1 or 2), AutoencoderKL (``latent_channels`` 16 or 4,
    scaling_factor 1.5305, shift_factor 0.0609), FlowMatchEulerDiscreteScheduler(shift=3.0).
    Load: ``StableDiffusion3Pipeline.from_pretrained(folder, **load_kwargs(folder))`` (without T5 that is
    ``text_encoder_3=None, tokenizer_3=None``).

    One step (CFG: batch [uncond, cond] concatenated when guidance_scale > 1; default 7.0)::

        noise_pred = transformer(hidden_states=latents,            # (B, C, H/8, W/8), unpacked; the model patchifies
                                 timestep=t.expand(B),              # t = sigma * 1000 (float, scheduler.timesteps)
                                 encoder_hidden_states=prompt_embeds,    # (B, 77 + 256; here 16 + 256, joint_dim)
                                 pooled_projections=pooled_prompt_embeds,  # (B, pooled_projection_dim)
                                 joint_attention_kwargs=..., return_dict=False)[0]
        latents = scheduler.step(noise_pred, t, latents)            # Euler: x += (sigma_next - sigma) * v

    Prediction: velocity v = noise - x0 (x_t = (1 - sigma) x0 + sigma noise). Sigmas (no ``sigmas`` passed):
    shift(linspace(1, sigma_min, N)) with shift(s) = 3s / (1 + 2s) and sigma_min = shift(1/1000) ~ 0.003 (diffusers
    shifts the already-shifted training sigma_min again), then a final 0; static shift (the pipeline passes ``mu``
    only if the scheduler has use_dynamic_shifting).
    Decode: ``vae.decode(latents / scaling_factor + shift_factor)``; encode: ``(z - shift_factor) * scaling_factor``.
    ``encode_prompt(prompt, prompt_2, prompt_3, device, num_images_per_prompt, do_classifier_free_guidance,
    negative_prompt..., max_sequence_length=256)`` -> ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds)``; prompt_embeds = cat([pad(cat(clip_l_hidden[-2], clip_g_hidden[-2], -1),
    to joint_attention_dim), t5_embeds (zeros when text_encoder_3 is None)], dim=-2); pooled = cat(clip_l.text_embeds,
    clip_g.text_embeds, -1). ``vae_scale_factor`` = 2 ** (len(vae.block_out_channels) - 1) (8 here, as real);
    height/width must be divisible by vae_scale_factor * patch_size; default size = transformer.sample_size * 8.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_char_tokenizer()
    enc1 = CLIPTextModelWithProjection(_clip_config(16))
    enc2 = CLIPTextModelWithProjection(_clip_config(32))
    joint_dim = 64
    transformer = SD3Transformer2DModel(
        sample_size=image_size // vae_scale, patch_size=patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=joint_dim, caption_projection_dim=32, pooled_projection_dim=16 + 32, pos_embed_max_size=32)
    vae = _tiny_vae(latent_channels, vae_scale, **SD3_VAE_NORM)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    enc3 = tok3 = None
    if t5:
        enc3 = _tiny_t5(joint_dim)
        tok3 = t5_char_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc1,
                                    tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok, text_encoder_3=enc3,
                                    tokenizer_3=tok3)
    return _save(pipe, folder)


# -------------------------------------------------------------------------------------------------------------- Flux
def build_tiny_flux(folder: str | Path, seed: int = 0, *, latent_channels: int = 16, guidance_embeds: bool = True,
                    vae_scale: int = 8, image_size: int = 32) -> Path:
    """FluxPipeline (Flux.1): CLIPTextModel (hidden 32, pooled only) + T5EncoderModel (d_model 32) with a char T5
    tokenizer, FluxTransformer2DModel 1 double + 1 single block (``guidance_embeds=True`` as Flux-dev; False as
    schnell), AutoencoderKL (``latent_channels`` 16 or 4, scaling_factor 0.3611, shift_factor 0.1159),
    FlowMatchEulerDiscreteScheduler as FLUX.1-dev's (shift 3.0, use_dynamic_shifting=True, base/max_image_seq_len
    256/4096, base/max_shift 0.5/1.15).

    One step (no CFG batch; ``guidance_scale`` (default 3.5) is only the embedded guidance; ``true_cfg_scale`` > 1
    with a negative prompt runs a second, uncond call)::

        noise_pred = transformer(hidden_states=latents,             # PACKED (B, (H/16)*(W/16), 4*C)
                                 timestep=t.expand(B) / 1000,        # = sigma in [0, 1]; the model multiplies by 1000
                                 guidance=full([B], guidance_scale)  # only if config.guidance_embeds else None
                                                                     # (also * 1000 inside)
                                 pooled_projections=pooled,          # (B, clip_hidden) CLIP pooler_output
                                 encoder_hidden_states=prompt_embeds,  # (B, max_sequence_length, t5_d_model)
                                 txt_ids=text_ids,                   # zeros (seq_len, 3)
                                 img_ids=latent_image_ids,           # (h*w, 3): [0, row, col] over the packed grid
                                 joint_attention_kwargs={}, return_dict=False)[0]   # packed, same shape as latents

    Prediction: velocity (noise - x0), Euler on sigmas. Sigmas: np.linspace(1, 1/N, N), then dynamic (exponential)
    time shift with mu = calculate_shift(image_seq_len = packed tokens, 256, 4096, 0.5, 1.15) (linear in seq_len):
    sigma' = e^mu / (e^mu + (1/sigma - 1)).
    Packing: latents (B, C, h, w), h = 2 * (H // 16): view(B, C, h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5)
    .reshape(B, h/2*w/2, 4C) (``_pack_latents``); ``_unpack_latents(latents, H, W, vae_scale_factor)`` inverts.
    Transformer in_channels = 4 * latent_channels; ``num_channels_latents = in_channels // 4``.
    Decode: unpack, then ``vae.decode(latents / scaling_factor + shift_factor)``.
    ``encode_prompt(prompt, prompt_2, device, num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
    max_sequence_length=512)`` -> ``(prompt_embeds [T5 last hidden], pooled_prompt_embeds [CLIP pooler_output],
    text_ids [zeros (seq, 3)])``. ``vae_scale_factor`` 8 (image_processor uses 16); H, W must be multiples of
    vae_scale_factor * 2 = 16 (else resized down with a warning). max_sequence_length <= 512.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_char_tokenizer()
    enc1 = CLIPTextModel(_clip_config(32))
    t5_dim = 32
    enc2 = _tiny_t5(t5_dim)
    tok2 = t5_char_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, out_channels=None,
                                         num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=t5_dim, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = _tiny_vae(latent_channels, vae_scale, **FLUX_VAE_NORM)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=enc1, tokenizer=tok, text_encoder_2=enc2,
                        tokenizer_2=tok2, transformer=transformer)
    return _save(pipe, folder)


# ------------------------------------------------------------------------------------------------------ PixArt-Sigma
def build_tiny_pixart_sigma(folder: str | Path, seed: int = 0, *, learned_sigma: bool = True, vae_scale: int = 8,
                            image_size: int = 32) -> Path:
    """PixArtSigmaPipeline: T5EncoderModel (d_model 32) + char T5 tokenizer, PixArtTransformer2DModel 2 layers
    (patch 2, ada_norm_single, ``out_channels`` = 2 * 4 with ``learned_sigma``, else 4; sample_size = latent size),
    AutoencoderKL 4 latent channels (scaling_factor 0.13025, SDXL VAE's; no shift), DPMSolverMultistepScheduler as
    PixArt-Sigma-XL-2-1024-MS's (dpmsolver++ order 2 midpoint, linear betas 1e-4..0.02, epsilon, linspace spacing).

    Sample with ``use_resolution_binning=False``: binning only knows transformer sample_size 32/64/128/256 (latent
    sizes of 256..2048 px) and raises "Invalid sample size" otherwise. ``clean_caption`` defaults to True in
    ``__call__`` and falls back to False with a warning (no bs4/ftfy).

    One step (CFG batch [uncond, cond] when guidance_scale > 1; default 4.5)::

        x_in = scheduler.scale_model_input(cat([latents] * 2), t)   # identity for DPM-Solver
        out = transformer(x_in,                                      # (B, 4, H/8, W/8) unpacked; model patchifies
                          encoder_hidden_states=prompt_embeds,       # (B, max_sequence_length=300, t5_d_model)
                          encoder_attention_mask=prompt_attention_mask,  # (B, 300) T5 tokenizer mask
                          timestep=t.expand(B),                      # INTEGER DDPM t in [0, 999] (int64)
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                          return_dict=False)[0]                      # (B, 8, h, w)
        eps = out.chunk(2, dim=1)[0] if transformer.out_channels // 2 == latent_channels else out  # drop variance
        latents = scheduler.step(eps, t, latents)

    Prediction: epsilon (+ learned variance channels, discarded at sampling), VP/DDPM alphas_cumprod from linear
    betas. Decode: ``vae.decode(latents / scaling_factor)`` (no shift). ``encode_prompt(prompt,
    do_classifier_free_guidance=True, negative_prompt="", num_images_per_prompt=1, device=None, ...,
    clean_caption=False, max_sequence_length=300)`` -> ``(prompt_embeds, prompt_attention_mask,
    negative_prompt_embeds, negative_prompt_attention_mask)`` (T5 last hidden state, run with the mask; negatives
    None without CFG). ``vae_scale_factor`` = 8; check_inputs wants H, W % 8 == 0, the patch-2 transformer needs even
latents, so multiples of 16. Transformer needs
    ``use_additional_conditions=False`` (the default for sample_size != 128), as the pipeline passes None micro-conds.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    t5_dim = 32
    enc = _tiny_t5(t5_dim)
    tok = t5_char_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=image_size // vae_scale, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
        caption_channels=t5_dim, in_channels=4, cross_attention_dim=32, out_channels=8 if learned_sigma else 4,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    vae = _tiny_vae(4, vae_scale, scaling_factor=0.13025)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", prediction_type="epsilon",
                                            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=transformer, scheduler=scheduler)
    return _save(pipe, folder)


# -------------------------------------------------------------------------------------------------------------- Sana
def gemma_char_tokenizer(model_max_length: int = 2048):
    """A GemmaTokenizer (= GemmaTokenizerFast in transformers 5; BPE via ``tokenizers``, no sentencepiece file, no
    merges) over single printable characters: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, '▁' (space), then chars;
    add_bos_token=True as Gemma's (Sana's select_index keeps position 0, the <bos>)."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", "\n"] + PRINTABLE)}
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False,
                          model_max_length=model_max_length)


def _tiny_dc_ae(latent_channels: int, vae_scale: int, scaling_factor: float = 0.41407):
    """AutoencoderDC (DC-AE) with 2 ** (stages - 1) = ``vae_scale`` compression (32 = Sana's f32c32: 6 stages, the
    last three EfficientViT blocks, pixel (un)shuffle resampling as the real one)."""
    from diffusers import AutoencoderDC

    n = {2: 2, 4: 3, 8: 4, 16: 5, 32: 6}[vae_scale]
    n_vit = min(3, n - 1)
    types = ("ResBlock",) * (n - n_vit) + ("EfficientViTBlock",) * n_vit
    chans = (8,) * (n - n_vit) + (max(16, latent_channels),) * n_vit  # in/out shortcuts need last >= latent
    qkv = ((),) * (n - n_vit) + ((5,),) * n_vit
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
                         encoder_block_types=types, decoder_block_types=types, encoder_block_out_channels=chans,
                         decoder_block_out_channels=chans, encoder_layers_per_block=(1,) * n,
                         decoder_layers_per_block=(1,) * n, encoder_qkv_multiscales=qkv, decoder_qkv_multiscales=qkv,
                         upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=scaling_factor)


def build_tiny_sana(folder: str | Path, seed: int = 0, *, latent_channels: int = 32, vae_scale: int = 32,
                    image_size: int | None = None, flow_shift: float = 3.0) -> Path:
    """SanaPipeline: Gemma2Model (hidden 32, 2 layers) + char GemmaTokenizer (no sentencepiece), SanaTransformer2DModel
    2 layers (patch 1, linear attention, no pos-embed as the real one), AutoencoderDC (``vae_scale`` 32 = real
    f32, ``latent_channels`` 32, scaling_factor 0.41407), DPMSolverMultistepScheduler as Sana_1600M_1024px's
    (use_flow_sigmas, flow_shift 3.0, prediction_type flow_prediction, dpmsolver++ order 2). ``image_size`` default:
    4 * vae_scale (128 px at f32 -> 4x4 latents; 32 px is the f32 minimum, 1x1 latents).

    Sample with ``use_resolution_binning=False`` (binning knows transformer sample_size 16/32/64/128 only, else
    "Invalid sample size"). ``__call__`` defaults ``complex_human_instruction`` to an 8-line "Enhanced prompt"
    instruction (~1000 chars; here ~1000 char tokens) prepended to the positive prompt only.

    One step (CFG batch [uncond, cond] when guidance_scale > 1; default 4.5)::

        noise_pred = transformer(latents,                            # (B, C, H/32, W/32) unpacked
                                 encoder_hidden_states=prompt_embeds,  # (B, max_sequence_length=300, gemma_hidden)
                                 encoder_attention_mask=prompt_attention_mask,  # (B, 300)
                                 timestep=t.expand(B) * transformer.config.timestep_scale,  # t: see below
                                 return_dict=False, attention_kwargs=...)[0].float()
        (learned-sigma chunk if out_channels // 2 == latent_channels; not for Sana)
        latents = scheduler.step(noise_pred, t, latents)             # DPM-Solver++ on flow sigmas

    Timestep: scheduler.timesteps = int64(sigma * 1000), TRUNCATED (sigma 0.9997 -> t 999) while the solver steps
    with the float sigmas (flip of shift*s/(1+(shift-1)s), s = 1 - linspace(1, 1/1000, N+1), last dropped, then 0);
    the transformer gets t * timestep_scale (1.0 here: a float tensor holding integers; other Sana configs may
    differ). Prediction: flow velocity v = noise - x0 (x0 = x_t - sigma * v). Decode:
    ``vae.decode(latents / scaling_factor)`` (no shift). ``encode_prompt(prompt, do_classifier_free_guidance=True,
    negative_prompt="", num_images_per_prompt=1, device=None, prompt_embeds=None, ..., clean_caption=False,
    max_sequence_length=300, complex_human_instruction=None, lora_scale=None)`` -> ``(prompt_embeds,
    prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)``; Gemma last hidden state with
    padding_side forced to "right"; with an instruction the tokens are cut to ``[0] + last (max_len - 1)``
    (select_index), the negative prompt gets no instruction. ``vae_scale_factor`` =
    2 ** (len(vae.encoder_block_out_channels) - 1) = 32; H, W divisible by 32 (PixArtImageProcessor).
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    image_size = image_size or 4 * vae_scale
    torch.manual_seed(seed)
    tok = gemma_char_tokenizer()
    hidden = 32
    enc = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    transformer = SanaTransformer2DModel(
        in_channels=latent_channels, out_channels=latent_channels, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=hidden, mlp_ratio=2.5, sample_size=image_size // vae_scale, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6)
    vae = _tiny_dc_ae(latent_channels, vae_scale)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", prediction_type="flow_prediction",
                                            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            lower_order_final=True, use_flow_sigmas=True, flow_shift=flow_shift,
                                            final_sigmas_type="zero", timestep_spacing="linspace", steps_offset=0)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=transformer, scheduler=scheduler)
    return _save(pipe, folder)


# --------------------------------------------------------------------------------------------------------- QwenImage
QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color",
                       " shape", " size", " texture", " quantity", " text", " spatial", " relationships", " of",
                       " objects", " and", " background")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen2_byte_tokenizer():
    """A Qwen2Tokenizer (= Qwen2TokenizerFast in transformers 5; byte-level BPE via ``tokenizers``): the 256 byte
    symbols, merges that spell the words of QwenImagePipeline's prompt template (so its system prefix is exactly 34
    tokens, as with the real Qwen2.5 tokenizer, and ``prompt_template_encode_start_idx`` = 34 drops exactly it), and
    <|endoftext|> <|im_start|> <|im_end|> as special tokens. Other text falls to single bytes."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    b2u = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(b2u[b] for b in range(256))}
    merges = []
    words = sorted(QWEN_TEMPLATE_WORDS, key=lambda w: not w.startswith(" "))  # 'Ġ' words first: no merge conflicts
    for word in words:
        enc = "".join(b2u[b] for b in word.encode())
        for k in range(1, len(enc)):
            if enc[:k + 1] not in vocab:
                merges.append((enc[:k], enc[k]))
                vocab[enc[:k + 1]] = len(vocab)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                   special_tokens=True)
    return tok


def build_tiny_qwenimage(folder: str | Path, seed: int = 0) -> Path:
    """QwenImagePipeline: Qwen2_5_VLForConditionalGeneration (text hidden 32, 2 layers, mrope; tiny unused vision
    tower) + byte-level Qwen2Tokenizer (template-exact 34-token prefix), QwenImageTransformer2DModel 2 layers
    (patch 2, in_channels 64 = 4 * 16 packed, out_channels 16), AutoencoderKLQwenImage (Wan-2.1-style causal 3D VAE,
    z_dim 16, 8x spatial, the real latents_mean / latents_std), FlowMatchEulerDiscreteScheduler as Qwen-Image's
    (use_dynamic_shifting, base/max_shift 0.5/0.9, base/max_image_seq_len 256/8192, shift_terminal 0.02,
    exponential time shift).

    One step (no CFG batch: ``true_cfg_scale`` (default 4.0) > 1 AND a negative_prompt run a second call, then
    comb = neg + s * (cond - neg) rescaled per token to ||cond||)::

        noise_pred = transformer(hidden_states=latents,              # PACKED (B, (H/16)*(W/16), 64)
                                 timestep=t.expand(B) / 1000,         # = sigma in [0, 1] (time_proj scale=1000)
                                 guidance=None,                       # (only if config.guidance_embeds)
                                 encoder_hidden_states_mask=mask,     # (B, L) or None when all ones
                                 encoder_hidden_states=prompt_embeds,  # (B, L, text hidden), template prefix dropped
                                 img_shapes=[[(1, H//16, W//16)]] * B,  # (frames, packed rows, packed cols)
                                 attention_kwargs={}, return_dict=False)[0]   # packed (B, N, 64)
        latents = scheduler.step(noise_pred, t, latents)

    Prediction: velocity (noise - x0). Sigmas: np.linspace(1, 1/N, N), dynamic exponential shift with mu =
    calculate_shift(packed tokens, 256, 8192, 0.5, 0.9), then stretched so the last sigma is shift_terminal 0.02.
    Packing as Flux (2x2 patches -> 4C channels) but latents are 5D (B, 1, C, h, w) before packing;
    ``_unpack_latents`` returns (B, C, 1, h, w). Decode: ``latents * latents_std + latents_mean`` (per channel, shape
    (1, z_dim, 1, 1, 1)), ``vae.decode(...)[0][:, :, 0]`` (drop the frame axis). Encode: (z - mean) / std.
    ``encode_prompt(prompt, device, num_images_per_prompt=1, prompt_embeds=None, prompt_embeds_mask=None,
    max_sequence_length=1024)`` -> ``(prompt_embeds, prompt_embeds_mask)``: template.format(prompt) tokenized,
    text_encoder(input_ids, attention_mask, output_hidden_states=True).hidden_states[-1], first 34 tokens dropped,
    valid tokens re-padded with zeros; mask None if all ones. ``vae_scale_factor`` = 2 ** len(temperal_downsample)
    = 8; H, W multiples of 16 (else resized with a warning); default 1024 px (default_sample_size 128).
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = qwen2_byte_tokenizer()
    hidden = 32
    vocab = len(tok)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
                         bos_token_id=vocab - 3, eos_token_id=vocab - 1, pad_token_id=vocab - 3),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab + 2, video_token_id=vocab + 3, vision_start_token_id=vocab, vision_end_token_id=vocab + 1)
    enc = Qwen2_5_VLForConditionalGeneration(cfg)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential", invert_sigmas=False,
                                                stochastic_sampling=False)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=enc, tokenizer=tok, transformer=transformer)
    return _save(pipe, folder)


# ----------------------------------------------------------------------------------------------------------- Z-Image
QWEN3_CHAT_TEMPLATE = (  # the part of Qwen3's template ZImagePipeline exercises (user turns, generation prompt)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def build_tiny_zimage(folder: str | Path, seed: int = 0, *, vae_scale: int = 8) -> Path:
    """ZImagePipeline (Z-Image / Z-Image-Turbo): Qwen3Model (hidden 32, 3 layers) + byte-level Qwen2Tokenizer with a
    Qwen3-style chat template, ZImageTransformer2DModel (dim 32, 2 layers + 1 noise / 1 context refiner, patch 2),
    AutoencoderKL 16 ch (Flux VAE's scaling_factor 0.3611 / shift_factor 0.1159), FlowMatchEulerDiscreteScheduler
    (shift 3.0, no dynamic shifting: the ``mu`` the pipeline passes is ignored).

    One step (CFG when guidance_scale > 0, default 5.0; Turbo samples with 0.0; cfg_truncation/normalization)::

        x_list = list(latents.unsqueeze(2).unbind(0))      # B tensors (C, 1, h, w); CFG: latents.repeat(2) and
                                                            # prompt list = cond + uncond (cond first)
        out_list = transformer(x_list,                      # positional: list of unpacked latents (frame axis 1)
                               (1000 - t.expand(B)) / 1000,  # = 1 - sigma: 0 = noise, 1 = clean (model * t_scale 1000)
                               prompt_embeds_list,           # list of (L_i, cap_feat_dim), variable length, no pad
                               joint_attention_kwargs=..., return_dict=False)[0]  # list of (C, 1, h, w)
        v = -stack(out_list).squeeze(2)                     # the model predicts x0 - noise; the scheduler wants
        latents = scheduler.step(v, t, latents)             #   noise - x0 (sign flip)

    Timestep convention: scheduler.timesteps = sigma * 1000 (sigmas = linspace(1, 1/N, N) then shift 3.0); the
    transformer sees 1 - sigma. CFG: pred = pos + s * (pos - neg) (note: s * (pos - neg) added to pos, not to neg).
    Decode: ``vae.decode(latents / scaling_factor + shift_factor)``. ``encode_prompt(prompt, device,
    do_classifier_free_guidance=True, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
    max_sequence_length=512)`` -> ``(prompt_embeds, negative_prompt_embeds)``, each a LIST of (L_i, hidden) tensors:
    chat template (user turn, add_generation_prompt, enable_thinking=True), padded to max_sequence_length,
    text_encoder(...).hidden_states[-2] (penultimate layer) masked to the valid tokens; negatives [] without CFG.
    ``vae_scale_factor`` 8 (image_processor 16); H, W must be multiples of 16 (else ValueError); default 1024 px.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = qwen2_byte_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    hidden = 32
    vocab = len(tok)
    enc = Qwen3Model(Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 max_position_embeddings=1024, bos_token_id=vocab - 3, eos_token_id=vocab - 1,
                                 pad_token_id=vocab - 3))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=hidden, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    vae = _tiny_vae(16, vae_scale, **FLUX_VAE_NORM)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=enc, tokenizer=tok, transformer=transformer)
    return _save(pipe, folder)
