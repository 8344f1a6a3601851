"""Train the shapes world's second kind of teacher, a tiny SD3-style flow-matching pipeline, from scratch.

    python tools/shapes/train_flow_teacher.py --out runs/shapes-build/flow-teacher --steps 8000 --max-minutes 75

Writes a StableDiffusion3Pipeline folder (SD3Transformer2DModel, an MMDiT on the VAE's 8x8x4 latents with
patch_size 1, i.e. 64 image tokens; FlowMatchEulerDiscreteScheduler; two CLIPTextModelWithProjection encoders;
no T5: text_encoder_3 = tokenizer_3 = None). The EMA weights are saved every --save-every-minutes and at the end,
each time followed by an attribute-accuracy check (flow-match Euler, 25 steps, CFG, --eval-prompts test prompts),
so a run stopped early still leaves a usable teacher. A resumable training state goes to --state (outside assets/).

Reused from the bundled UNet teacher (assets/shapes-teacher, see tools/shapes/README.md):
  * VAE: the committed AutoencoderKL weights (--vae). SD3's pipeline decodes `latents / scaling_factor +
    shift_factor`, and a `shift_factor: null` config (the bundled VAE's) makes that a TypeError, so the saved
    <out>/vae/config.json carries shift_factor = mean of the train split's unscaled latents and scaling_factor =
    1 / std of the shifted latents (one scalar each, as SD3's VAE). The transformer is trained on exactly the
    pipeline's convention z = (latent - shift_factor) * scaling_factor. The weights are copied; --link-assets (or
    --link-only on a finished folder) replaces the copy by a relative symlink to --vae's file (the VAE is frozen,
    so the two are the same tensors; this is checked before linking), and the tokenizer folders by links to
    --tokenizer. Link in the folder's final place (a relative link copied elsewhere points nowhere).
  * Tokenizer: the bundled CLIPTokenizer (model_max_length 24) for both tokenizer and tokenizer_2.
  * Text encoders: both CLIP encoders start from the bundled teacher's trained CLIPTextModel (hidden 128, 3
    layers), copied into CLIPTextModelWithProjection with text_projection = identity.
    **They are trained jointly** with the transformer (as the bundled UNet teacher trained its encoder), not frozen:
    SD3's encode_prompt does not read what the UNet teacher's loss shaped. It takes the *penultimate* hidden states
    (hidden_states[-2], before the last layer and the final layer norm; the UNet read last_hidden_state) and the
    pooled projection of the EOS token (which the UNet only used through cross-attention, and whose projection is
    new). The initial features already tell the world's words apart (so training starts from a text encoder that
    knows them), but the transformer should not be tied to features trained for another reader; the two copies
    may also specialise. Their forward and backward are about a quarter of a step (two encoders, 24 tokens, 3
    layers), most of which --freeze-text-encoders (keep the initial encoders) would save.

Conditioning is exactly what `pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)` returns
with text_encoder_3 None: prompt_embeds = [CLIP-L hidden_states[-2] | CLIP-G hidden_states[-2]] (2 x 128 = 256 =
joint_attention_dim wide, so no zero padding of the width) for the 24 CLIP tokens, followed by max_sequence_length
(256, the pipeline's default) all-zero "T5" tokens; pooled_prompt_embeds = [text_embeds_1 | text_embeds_2] (256).
The script reproduces that and asserts equality with the pipeline's own encode_prompt once at start-up. The empty
caption "" (the pipeline's default negative prompt) is the unconditional input: 10% of the captions are dropped to
it for classifier-free guidance.

The 256 zero tokens are identical in every layer (same input, per-token maps, same keys), so in training they are
computed once: one token whose attention logit gets + log(256), exactly the softmax over 256 copies of it. That
makes a step about 3.6x cheaper (89 instead of 344 tokens; measured) and is the same function of the weights; the
start-up check compares the transformer's output both ways (--full-context trains on the 280-token context as
is). The saved pipeline uses diffusers' own attention processor and the full context.

Flow matching as SD3 trains it (diffusers' train_dreambooth_sd3.py, weighting scheme "logit_normal"): u =
sigmoid(N(0, 1)), sigma = shift * u / (1 + (shift - 1) * u) (the scheduler's shift), x_t = (1 - sigma) x0 + sigma
noise, target velocity noise - x0, unit loss weights, timestep sigma * 1000 (continuous; the dreambooth script
rounds u to the scheduler's 1000 training timesteps first). The saved scheduler is
FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=--shift).
**shift 1.0** (the default): SD3's shift is resolution-dependent (its paper derives sqrt(m/n) for m pixels
against a base of n, its 256^2 stage trained unshifted, and uses 3.0 at 1024^2). A 256^2 SD3 latent is 32x32x16 =
16384 numbers in 256 tokens; ours is 8x8x4 = 256 numbers in 64 tokens, less redundant than that base, so noise
destroys the layout at least as early and no shift towards high noise is called for. What the UNet teacher needed
for position (README: "What it took") is here by construction: sampling starts at sigma = 1, pure noise (no
residual image to read the layout from, unlike SD's scaled_linear t=999), and the position embeddings tell each
token where it is (the UNet got that from a 7x7 conv_in). Not yet checked by a full run: if position lags in the
accuracy log, --shift 3 (more training at high noise) is the thing to try.

Transformer: SD3Transformer2DModel(sample_size 8, patch_size 1, pos_embed_max_size 8, in/out 4 channels,
--layers, --heads x --head-dim). pos_embed_max_size must be 8: PatchEmbed builds its sincos grid over
pos_embed_max_size positions spread over base_size = sample_size // patch_size = 8 units and crops the centre, so
SD3's default 96 would give the 8x8 latent positions 3.67..4.25 in steps of 1/12 (neighbouring embeddings 0.13
apart, at norm 8), while 8 gives 0..7 (1.47 apart). adaLN-Zero init (DiT): every block starts as the identity and
the output projection at zero.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import time

import common  # noqa: F401  (sets sys.path)
import torch
import torch.nn.functional as F
from common import Logger, images_tensor, seed_all, write_json
from train_teacher import encode_latents

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from stepdistill.backbones.sd3 import T5_TOKENS, use_repeated_token_attention  # the zero "T5" tokens as one

BUNDLED = os.path.join(common.ROOT, "assets", "shapes-teacher")
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------------- models
def clip_with_projection(src_folder: str) -> CLIPTextModelWithProjection:
    """A CLIPTextModelWithProjection holding a trained CLIPTextModel's weights, text_projection = identity."""
    src = CLIPTextModel.from_pretrained(src_folder)
    cfg = copy.deepcopy(src.config)
    cfg.projection_dim = cfg.hidden_size
    te = CLIPTextModelWithProjection(cfg)
    te.text_model.load_state_dict(getattr(src, "text_model", src).state_dict())  # transformers 5: no .text_model
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(cfg.hidden_size))
    return te


def make_transformer(text_width: int, pooled_width: int, layers=4, heads=4, head_dim=32) -> SD3Transformer2DModel:
    tr = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_width, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_width, pos_embed_max_size=8,
    )
    with torch.no_grad():  # adaLN-Zero (DiT): zero modulation -> gates 0, every block the identity at init
        for m in tr.modules():
            if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous)):
                m.linear.weight.zero_(); m.linear.bias.zero_()
        tr.proj_out.weight.zero_(); tr.proj_out.bias.zero_()
    return tr


def clip_conditioning(te1, te2, ids, joint_dim):
    """(CLIP part of prompt_embeds (B, 24, joint_dim), pooled_prompt_embeds (B, 256)) as SD3's encode_prompt."""
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    return clip, torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)


def with_t5_zeros(clip, n=T5_TOKENS):
    return torch.cat([clip, clip.new_zeros(clip.shape[0], n, clip.shape[-1])], dim=1)


def repeats_kwargs(clip):
    """The transformer's joint_attention_kwargs for `with_t5_zeros(clip, 1)`: its last token stands for 256."""
    repeats = clip.new_ones(clip.shape[0], clip.shape[1] + 1)
    repeats[:, -1] = T5_TOKENS
    return {"context_repeats": repeats}


def flow_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_pipeline(vae, te1, te2, tok, transformer, shift) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift), vae=vae, text_encoder=te1, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )


def load_flow_pipeline(folder: str, **kwargs) -> StableDiffusion3Pipeline:
    """A saved flow teacher. Its model_index.json has `text_encoder_3: [null, null]` (and tokenizer_3), which
    StableDiffusion3Pipeline.from_pretrained refuses unless they are passed (they are not _optional_components)."""
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, **kwargs)


# ---------------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def check_conditioning(pipe, te1, te2, tok, joint_dim, log):
    """Our conditioning equals the pipeline's own encode_prompt (text_encoder_3 None), "" included."""
    from stepdistill.data.shapes import shapes_prompts

    prompts = shapes_prompts("train", 3) + [""]
    pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    clip, ours_pooled = clip_conditioning(te1, te2, ids, joint_dim)
    ours = with_t5_zeros(clip)
    assert ours.shape == pe.shape and torch.equal(ours, pe), (ours.shape, pe.shape)
    assert torch.equal(ours_pooled, pooled)
    log(f"conditioning = pipe.encode_prompt: prompt_embeds {tuple(pe.shape)} ({tok.model_max_length} CLIP tokens "
        f"+ {T5_TOKENS} zero T5 tokens, width {pe.shape[-1]}), pooled {tuple(pooled.shape)}")
    return clip, ours_pooled


@torch.no_grad()
def check_repeated_token(transformer, clip, pooled, log):
    """The transformer on the 280-token context (diffusers' processor) = on 24 + 1 tokens with the log-repeats bias."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn((clip.shape[0], 4, 8, 8), generator=g)
    t = torch.linspace(1000.0, 50.0, clip.shape[0])
    probe = copy.deepcopy(transformer)
    with torch.no_grad():  # random modulation, so the check sees every path (the adaLN-Zero init hides them)
        for p in probe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    full = probe(x, encoder_hidden_states=with_t5_zeros(clip), pooled_projections=pooled, timestep=t).sample
    use_repeated_token_attention(probe)
    short = probe(x, encoder_hidden_states=with_t5_zeros(clip, 1), pooled_projections=pooled, timestep=t,
                  joint_attention_kwargs=repeats_kwargs(clip)).sample
    err = (full - short).abs().max().item()
    assert err < 1e-4 * max(1.0, full.abs().max().item()), err
    log(f"repeated-token attention = full context (max abs diff {err:.2e}, output scale {full.abs().max():.2f})")


# ---------------------------------------------------------------------------------------------------- sampling
def flow_spec(pipe, guidance_scale, steps=25):
    """How `stepdistill sample` / `evaluate` sample this teacher by default (flow-match Euler, CFG)."""
    from stepdistill.sampling import SamplingSpec

    return SamplingSpec(format="pipeline", scheduler_class="FlowMatchEulerDiscreteScheduler",
                        scheduler_config=dict(pipe.scheduler.config), num_inference_steps=steps,
                        guidance_scale=guidance_scale, resolution=32)


class _TransformerAsUnet:
    """For a `stepdistill.sampling.generate` that reads pipe.unet (channels, dtype) whatever the pipeline (the
    committed one, before stepdistill.backbones): an SD3 pipeline has a transformer."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return self._pipe.transformer if name == "unet" else getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        return self._pipe(*args, **kwargs)


def _for_generate(pipe):
    try:
        from stepdistill.backbones import backbone_for_pipeline
    except ImportError:
        backbone_for_pipeline = None
    if hasattr(pipe, "unet") or (backbone_for_pipeline and backbone_for_pipeline(type(pipe).__name__)):
        return pipe
    return _TransformerAsUnet(pipe)


def accuracy_check(pipe, n, guidance_scale, steps=25):
    """Attribute accuracy of `pipe` (flow-match Euler `steps`, CFG) on the first n test prompts, image i with seed
    i, through stepdistill's own `generate`; None without the shapes encoder."""
    from stepdistill.data.shapes import shapes_prompts
    from stepdistill.sampling import generate
    from stepdistill.shapes_eval import EVAL_DIR, ENCODER_FILE, attribute_accuracy

    if n <= 0 or not (EVAL_DIR / ENCODER_FILE).exists():
        return None
    prompts = shapes_prompts("test", n)
    pipe.set_progress_bar_config(disable=True)
    imgs = generate(_for_generate(pipe), flow_spec(pipe, guidance_scale, steps), prompts, list(range(n)),
                    batch_size=min(n, 50))
    return {k: round(v, 3) for k, v in attribute_accuracy(imgs, prompts).items()}


# ---------------------------------------------------------------------------------------------------- saving
def _same_tensors(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _same_tokenizer(a: str, b: str) -> bool:
    from stepdistill.data.shapes import shapes_prompts

    ta, tb = CLIPTokenizer.from_pretrained(a), CLIPTokenizer.from_pretrained(b)
    caps = shapes_prompts("test", 50) + [""]
    return (ta.get_vocab() == tb.get_vocab() and ta.model_max_length == tb.model_max_length
            and ta(caps, padding="max_length").input_ids == tb(caps, padding="max_length").input_ids)


def _relative_link(target: str, link: str) -> str:
    rel = os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(link)))
    os.symlink(rel, link)
    return rel


def link_assets(out: str, vae_src: str, tok_src: str, log) -> None:
    """Replace the copies of frozen bundled files by relative symlinks (after checking they hold the same thing):
    <out>/vae's weights file (vae/config.json stays: it has this teacher's shift/scaling factors) and the
    tokenizer/ and tokenizer_2/ folders (as assets/shapes-teacher-v links its folders)."""
    dst, src = os.path.join(out, "vae", VAE_WEIGHTS), os.path.join(vae_src, VAE_WEIGHTS)
    if not os.path.islink(dst):
        if not _same_tensors(dst, src):
            raise SystemExit(f"{dst} and {src} hold different weights; not linking")
        os.unlink(dst)
        log(f"linked {dst} -> {_relative_link(src, dst)}")
    for name in ("tokenizer", "tokenizer_2"):
        d = os.path.join(out, name)
        if os.path.islink(d):
            continue
        if not _same_tokenizer(d, tok_src):
            raise SystemExit(f"{d} and {tok_src} are different tokenizers; not linking")
        shutil.rmtree(d)
        log(f"linked {d} -> {_relative_link(tok_src, d)}")


def _unlink_assets(out: str) -> None:
    """Before saving: save_pretrained would write through a link into the bundled teacher's files."""
    for path in (os.path.join(out, "vae", VAE_WEIGHTS), os.path.join(out, "tokenizer"),
                 os.path.join(out, "tokenizer_2")):
        if os.path.islink(path):
            os.unlink(path)


def save_pipeline(out, pipe, extra, link, log):
    _unlink_assets(out)
    pipe.save_pretrained(out, safe_serialization=True)
    write_json(os.path.join(out, "shapes_teacher.json"), extra)
    from stepdistill.sampling import SPEC_FILE

    write_json(os.path.join(out, SPEC_FILE), flow_spec(pipe, extra["guidance_scale"]).to_json())
    if link:
        link(out)
    log(f"saved pipeline -> {out}")


# ---------------------------------------------------------------------------------------------------- main
def latent_stats(mean, std):
    """(shift_factor, scaling_factor): the mean of the unscaled latents and 1 / std of the shifted latents, over
    the posterior samples training draws (var = var of the means + mean posterior variance)."""
    shift = mean.mean().item()
    var = (mean - shift).pow(2).mean().item() + std.pow(2).mean().item()
    return round(shift, 5), round(1.0 / math.sqrt(var), 5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/shapes-flow-teacher")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32, help="width = heads x head_dim")
    p.add_argument("--shift", type=float, default=1.0, help="FlowMatchEulerDiscreteScheduler shift (see above)")
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--max-minutes", type=float, default=75.0)
    p.add_argument("--save-every-minutes", type=float, default=12.0)
    p.add_argument("--eval-prompts", type=int, default=100, help="test prompts for the accuracy check at each save")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="default CFG recorded in shapes_teacher.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--state", default="runs/shapes-build/flow_teacher_state.pt")
    p.add_argument("--resume", action="store_true", help="resume from --state if present")
    p.add_argument("--init-from", default=None, help="start from the weights of a saved flow teacher folder")
    p.add_argument("--vae", default=os.path.join(BUNDLED, "vae"), help="frozen AutoencoderKL folder")
    p.add_argument("--tokenizer", default=os.path.join(BUNDLED, "tokenizer"))
    p.add_argument("--text-encoder", default=os.path.join(BUNDLED, "text_encoder"),
                   help="CLIPTextModel both CLIP encoders start from")
    p.add_argument("--freeze-text-encoders", action="store_true")
    p.add_argument("--full-context", action="store_true",
                   help="train on the 280-token context as is (not the exact repeated-token shortcut)")
    p.add_argument("--link-assets", action="store_true",
                   help="after each save, make <out>/vae's weights file and the tokenizer folders relative symlinks "
                        "to --vae's and --tokenizer's (saves 3.8 MB in the repository)")
    p.add_argument("--link-only", action="store_true", help="only do --link-assets on an existing --out, then exit")
    p.add_argument("--time-steps", type=int, default=0,
                   help="timing run: this many training steps (after 3 warm-up ones), print s/step, save nothing")
    p.add_argument("--log", default="assets/shapes-build-logs/flow-teacher.log")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    log = Logger(None if a.time_steps else a.log)
    link = functools.partial(link_assets, vae_src=a.vae, tok_src=a.tokenizer, log=log)
    if a.link_only:
        link(a.out)
        return
    seed_all(a.seed)
    log(f"args {vars(a)}")

    tok = CLIPTokenizer.from_pretrained(a.tokenizer)
    vae = AutoencoderKL.from_pretrained(a.vae).eval()
    vae.requires_grad_(False)
    t0 = time.time()
    x, caps, _ = images_tensor("train", a.num_images)
    mean, std = encode_latents(vae, x)
    del x
    shift_factor, scaling_factor = latent_stats(mean, std)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    log(f"encoded {a.num_images} train images in {time.time() - t0:.1f}s; vae shift_factor {shift_factor}, "
        f"scaling_factor {scaling_factor} (bundled VAE's: {AutoencoderKL.load_config(a.vae)['scaling_factor']})")

    te1, te2 = clip_with_projection(a.text_encoder), clip_with_projection(a.text_encoder)
    joint_dim = te1.config.hidden_size + te2.config.hidden_size
    pooled_dim = te1.config.projection_dim + te2.config.projection_dim
    tr = make_transformer(joint_dim, pooled_dim, a.layers, a.heads, a.head_dim)
    n_tr, n_te = (sum(q.numel() for q in m.parameters()) for m in (tr, te1))
    log(f"transformer params {n_tr / 1e6:.3f}M ({a.layers} layers, width {a.heads * a.head_dim}), text encoders "
        f"2 x {n_te / 1e6:.3f}M ({'frozen' if a.freeze_text_encoders else 'trained jointly'}), vae "
        f"{sum(q.numel() for q in vae.parameters()) / 1e6:.3f}M (frozen)")
    if a.init_from:  # continue from a saved flow teacher's (EMA) weights
        for m, sub, cls in ((te1, "text_encoder", CLIPTextModelWithProjection),
                            (te2, "text_encoder_2", CLIPTextModelWithProjection),
                            (tr, "transformer", SD3Transformer2DModel)):
            m.load_state_dict(cls.from_pretrained(os.path.join(a.init_from, sub)).state_dict())

    clip, pooled = check_conditioning(build_pipeline(vae, te1, te2, tok, tr, a.shift), te1, te2, tok, joint_dim, log)
    check_repeated_token(tr, clip, pooled, log)

    train_te = not a.freeze_text_encoders
    te1.requires_grad_(train_te); te2.requires_grad_(train_te)
    params = list(tr.parameters()) + (list(te1.parameters()) + list(te2.parameters()) if train_te else [])
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    ema_tr, ema_te1, ema_te2 = (copy.deepcopy(m).eval().requires_grad_(False) for m in (tr, te1, te2))
    ema_params = list(ema_tr.parameters()) + (list(ema_te1.parameters()) + list(ema_te2.parameters())
                                              if train_te else [])
    if not a.full_context:  # training copy only; ema_tr keeps diffusers' processor (it is what gets saved)
        use_repeated_token_attention(tr)
    t5_len = T5_TOKENS if a.full_context else 1
    g = torch.Generator().manual_seed(a.seed)
    step = 0
    if a.init_from:
        done = json.load(open(os.path.join(a.init_from, "shapes_teacher.json"))).get("train_steps", 0)
        step = int(done)
        log(f"initialised from {a.init_from} (trained {step} steps before)")
    if a.resume and os.path.exists(a.state):
        st = torch.load(a.state, map_location="cpu")
        if (st["shift_factor"], st["scaling_factor"]) != (shift_factor, scaling_factor):
            raise SystemExit(f"{a.state} was trained with shift/scaling {st['shift_factor']}/{st['scaling_factor']}, "
                             f"these latents give {shift_factor}/{scaling_factor} (other --num-images or --vae?)")
        for m, k in ((tr, "transformer"), (te1, "te1"), (te2, "te2"), (ema_tr, "ema_transformer"),
                     (ema_te1, "ema_te1"), (ema_te2, "ema_te2")):
            m.load_state_dict(st[k])
        opt.load_state_dict(st["opt"]); step = st["step"]; g.set_state(st["gen"])
        log(f"resumed from {a.state} at step {step}")

    def save(final=False):
        pipe = build_pipeline(vae, ema_te1, ema_te2, tok, ema_tr, a.shift)
        save_pipeline(a.out, pipe, {
            "kind": "flow_matching (StableDiffusion3Pipeline)", "guidance_scale": a.guidance_scale,
            "train_steps": step, "batch_size": a.batch_size, "lr": a.lr, "caption_dropout": a.caption_dropout,
            "ema": a.ema, "final": final, "minutes": (time.time() - t_start) / 60, "shift": a.shift,
            "weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
            "vae_shift_factor": shift_factor, "vae_scaling_factor": scaling_factor,
            "text_encoders": "frozen" if a.freeze_text_encoders else "trained jointly",
            "layers": a.layers, "width": a.heads * a.head_dim, "num_images": a.num_images, "init_from": a.init_from,
            "load": "StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)",
        }, link if a.link_assets else None, log)
        acc = accuracy_check(pipe, a.eval_prompts, a.guidance_scale)
        if acc:
            log(f"step {step} EMA teacher, flow-match Euler 25 steps CFG {a.guidance_scale}: attribute accuracy {acc}")
        os.makedirs(os.path.dirname(os.path.abspath(a.state)), exist_ok=True)
        torch.save({"transformer": tr.state_dict(), "te1": te1.state_dict(), "te2": te2.state_dict(),
                    "ema_transformer": ema_tr.state_dict(), "ema_te1": ema_te1.state_dict(),
                    "ema_te2": ema_te2.state_dict(), "opt": opt.state_dict(), "step": step, "gen": g.get_state(),
                    "shift_factor": shift_factor, "scaling_factor": scaling_factor}, a.state)

    warm = 200
    tr.train(); te1.train(train_te); te2.train(train_te)
    loss_avg = None
    start_step = step
    end_step = step + a.time_steps + 3 if a.time_steps else a.steps
    t_start = last_save = time.time()
    while step < end_step:
        if a.time_steps and step == start_step + 3:
            t_start = time.time()
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / warm)
        idx = torch.randint(0, mean.shape[0], (a.batch_size,), generator=g)
        latent = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        x0 = (latent - shift_factor) * scaling_factor  # the pipeline decodes x0 / scaling_factor + shift_factor
        cid = ids[idx].clone()
        cid[torch.rand(a.batch_size, generator=g) < a.caption_dropout] = empty
        u = compute_density_for_timestep_sampling("logit_normal", a.batch_size, logit_mean=0.0, logit_std=1.0,
                                                  generator=g)
        sigma = a.shift * u / (1 + (a.shift - 1) * u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.set_grad_enabled(train_te):
            clip, pooled = clip_conditioning(te1, te2, cid, joint_dim)
        pred = tr(xt, encoder_hidden_states=with_t5_zeros(clip, t5_len), pooled_projections=pooled,
                  timestep=sigma * 1000, joint_attention_kwargs=None if a.full_context else repeats_kwargs(clip)).sample
        loss = F.mse_loss(pred, noise - x0)  # logit_normal: unit weights (compute_loss_weighting_for_sd3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema_params, params):
                pe.lerp_(pm, 1 - d)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if a.time_steps:
            continue
        if step % 50 == 0:
            el = time.time() - t_start
            log(f"step {step} loss {loss_avg:.4f} ({el / 60:.1f} min, {el / (step - start_step):.3f} s/step)")
        if (time.time() - last_save) / 60 > a.save_every_minutes:
            save()
            last_save = time.time()
        if (time.time() - t_start) / 60 > a.max_minutes:
            log(f"wall-clock limit reached at step {step}")
            break
    if a.time_steps:
        el = time.time() - t_start
        log(f"timing: {a.time_steps} steps at batch {a.batch_size}, {a.threads} threads: {el / a.time_steps:.3f} "
            f"s/step (loss {loss_avg:.4f})")
        return
    save(final=True)
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
