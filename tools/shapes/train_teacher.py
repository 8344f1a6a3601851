"""Train the shapes-world teacher (tiny latent diffusion, SD layout) from scratch and save a diffusers folder.

    python tools/shapes/train_teacher.py --out assets/shapes-teacher --steps 8000 --batch-size 64 --max-minutes 55

Needs the VAE (tools/shapes/train_vae.py) in <out>/vae. Builds the tokenizer (tools/shapes/build_tokenizer.py) into
<out>/tokenizer, then trains a CLIPTextModel and a UNet2DConditionModel jointly on VAE latents of the train split
with eps prediction, min-SNR-5 loss weighting plus an up-weighting of high-noise timesteps (see
--high-noise-snr), 10% caption dropout (empty caption, for classifier-free guidance)
and an EMA of both. The EMA weights are written as a StableDiffusionPipeline folder (with a DDIMScheduler) every
--save-every-minutes and at the end, so a run stopped early (or by --max-minutes) still leaves a usable teacher;
at each save the saved teacher's attribute accuracy (DDIM, CFG) on --eval-prompts test prompts is logged.
A resumable training state goes to --state (outside assets/).
"""
from __future__ import annotations

import argparse
import json
import copy
import math
import os
import time

import common  # noqa: F401  (sets sys.path)
import torch
import torch.nn.functional as F
from common import Logger, images_tensor, seed_all, write_json

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# DDPM's linear betas, not SD's scaled_linear 0.00085-0.012: at t=999 the latter keeps sqrt(alpha_bar) = 0.068 of
# the image in x_t, enough for a network on 8x8 latents to read the layout off the noise during training, and
# then it ignores the prompt's position when sampling from pure noise (the "flawed noise schedule" problem of
# Lin et al. 2024). Linear 1e-4..0.02 leaves 0.0064 at t=999.
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="trailing",
)


def make_text_encoder(tok):
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=128,
    )
    return CLIPTextModel(cfg)


def make_unet(cross_dim, channels=(32, 64, 64), conv_in_kernel=7):
    # A 7x7 conv_in on 8x8 latents: its zero padding tells every latent pixel where it is (column 2 sees one padded
    # column, 4 none, 6 two), which the prompt's position needs and which 3x3 convs only learn slowly.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, conv_in_kernel=conv_in_kernel,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=min(32, channels[0] // 2),
    )


def scheduler_kwargs(prediction_type="epsilon", beta_schedule="linear"):
    """The teacher's DDIM settings: SCHEDULER_KWARGS, or SD2.1's scaled_linear betas / v-prediction for a second
    teacher (--prediction-type v_prediction --beta-schedule scaled_linear)."""
    kw = dict(SCHEDULER_KWARGS, prediction_type=prediction_type, beta_schedule=beta_schedule)
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return kw


def save_pipeline(out, vae, te, unet, tok, log, extra=None, sched_kwargs=SCHEDULER_KWARGS):
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**sched_kwargs),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if extra:
        write_json(os.path.join(out, "shapes_teacher.json"), extra)
        write_teacher_spec(out, extra["guidance_scale"], sched_kwargs=sched_kwargs)
    log(f"saved pipeline -> {out}")
    return pipe


def accuracy_check(pipe, n, guidance_scale, steps=25, sched_kwargs=SCHEDULER_KWARGS):
    """Attribute accuracy of `pipe` (DDIM `steps`, CFG) on the first n test prompts; None without the encoder."""
    from stepdistill.data.shapes import shapes_prompts
    from stepdistill.sampling import generate
    from stepdistill.shapes_eval import EVAL_DIR, ENCODER_FILE, attribute_accuracy

    if n <= 0 or not (EVAL_DIR / ENCODER_FILE).exists():
        return None
    prompts = shapes_prompts("test", n)
    pipe.set_progress_bar_config(disable=True)
    # as `stepdistill evaluate` samples the teacher: image i with seed i
    imgs = generate(pipe, teacher_spec(guidance_scale, steps, sched_kwargs), prompts, list(range(n)), batch_size=n)
    return {k: round(v, 3) for k, v in attribute_accuracy(imgs, prompts).items()}


def teacher_spec(guidance_scale, steps=25, sched_kwargs=SCHEDULER_KWARGS):
    """How `stepdistill sample` / `evaluate` sample this teacher by default (DDIM, CFG)."""
    from stepdistill.sampling import SamplingSpec

    return SamplingSpec(format="pipeline", scheduler_class="DDIMScheduler",
                        scheduler_config=dict(DDIMScheduler(**sched_kwargs).config), num_inference_steps=steps,
                        guidance_scale=guidance_scale, resolution=32)


def write_teacher_spec(out, guidance_scale, steps=25, sched_kwargs=SCHEDULER_KWARGS):
    """stepdistill.json: the teacher's sampling spec."""
    from stepdistill.sampling import SPEC_FILE

    write_json(os.path.join(out, SPEC_FILE), teacher_spec(guidance_scale, steps, sched_kwargs).to_json())


def widen_conv_in(state, kernel):
    """A saved UNet state with its conv_in zero-padded to `kernel` (same function: the old kernel sits centered)."""
    w = state["conv_in.weight"]
    pad = (kernel - w.shape[-1]) // 2
    if pad > 0:
        state = dict(state, **{"conv_in.weight": F.pad(w, (pad, pad, pad, pad))})
    return state


@torch.no_grad()
def encode_latents(vae, x, bs=256):
    means, stds = [], []
    for i in range(0, x.shape[0], bs):
        d = vae.encode(x[i:i + bs]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/shapes-teacher")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--channels", default="32,64,64", help="UNet block_out_channels (CPU cost grows ~quadratically)")
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--conv-in-kernel", type=int, default=7)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--high-noise-snr", type=float, default=0.25,
                   help="below this SNR the eps loss is weighted by high_noise_snr / snr (at most --high-noise-cap). "
                        "In the eps loss an error in the implied x0 is scaled by snr, so at high noise (where the "
                        "layout is decided) the prompt's position barely moves the loss; 0 turns this off")
    p.add_argument("--high-noise-cap", type=float, default=20.0)
    p.add_argument("--max-minutes", type=float, default=55.0)
    p.add_argument("--save-every-minutes", type=float, default=6.0)
    p.add_argument("--eval-prompts", type=int, default=100, help="test prompts for the accuracy check at each save")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="default CFG recorded in shapes_teacher.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--state", default="runs/shapes-build/teacher_state.pt")
    p.add_argument("--resume", action="store_true", help="resume from --state if present")
    p.add_argument("--init-from", default=None,
                   help="start from the weights of a saved teacher folder (no optimizer state), e.g. to train the "
                        "committed assets/shapes-teacher further: --init-from assets/shapes-teacher --steps N")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "scaled_linear"],
                   help="linear: DDPM's 1e-4..0.02 (the bundled teacher); scaled_linear: SD's 0.00085..0.012")
    p.add_argument("--freeze-text-encoder", action="store_true",
                   help="train the UNet only (with --init-from: keep that teacher's text encoder, so a second "
                        "teacher can share its text_encoder, tokenizer and vae folders)")
    p.add_argument("--log", default="assets/shapes-build-logs/teacher.log")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    log = Logger(a.log)
    seed_all(a.seed)
    sched_kwargs = scheduler_kwargs(a.prediction_type, a.beta_schedule)
    log(f"args {vars(a)}; noise schedule {sched_kwargs}")

    from build_tokenizer import build_tokenizer

    tok = build_tokenizer(os.path.join(a.out, "tokenizer"))
    vae = AutoencoderKL.from_pretrained(os.path.join(a.out, "vae")).eval()
    vae.requires_grad_(False)
    sf = vae.config.scaling_factor

    t0 = time.time()
    x, caps, _ = images_tensor("train", a.num_images)
    mean, std = encode_latents(vae, x)
    del x
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    log(f"encoded {a.num_images} train images in {time.time() - t0:.1f}s; latent std*sf "
        f"{(mean * sf).std().item():.3f}")

    te = make_text_encoder(tok)
    unet = make_unet(te.config.hidden_size, [int(c) for c in a.channels.split(",")], a.conv_in_kernel)
    log(f"unet params {sum(q.numel() for q in unet.parameters()) / 1e6:.3f}M, text encoder "
        f"{sum(q.numel() for q in te.parameters()) / 1e6:.3f}M")
    te.requires_grad_(not a.freeze_text_encoder)
    params = list(unet.parameters()) + ([] if a.freeze_text_encoder else list(te.parameters()))
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    ema_params = list(ema_unet.parameters()) + ([] if a.freeze_text_encoder else list(ema_te.parameters()))
    noise_sched = DDPMScheduler(**{k: v for k, v in sched_kwargs.items() if k != "set_alpha_to_one"})
    ac = noise_sched.alphas_cumprod
    snr = ac / (1 - ac)
    g = torch.Generator().manual_seed(a.seed)
    step = 0
    if a.init_from:  # continue from a saved pipeline's (EMA) weights, e.g. the committed teacher
        te.load_state_dict(CLIPTextModel.from_pretrained(os.path.join(a.init_from, "text_encoder")).state_dict())
        saved = UNet2DConditionModel.from_pretrained(os.path.join(a.init_from, "unet")).state_dict()
        unet.load_state_dict(widen_conv_in(saved, a.conv_in_kernel))
        ema_te.load_state_dict(te.state_dict()); ema_unet.load_state_dict(unet.state_dict())
        ema_te.requires_grad_(False)
        done = json.load(open(os.path.join(a.init_from, "shapes_teacher.json"))).get("train_steps", 0)
        step = int(done)
        log(f"initialised from {a.init_from} (trained {step} steps before)")
    if a.resume and os.path.exists(a.state):
        st = torch.load(a.state, map_location="cpu")
        unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])
        ema_unet.load_state_dict(st["ema_unet"]); ema_te.load_state_dict(st["ema_te"])
        opt.load_state_dict(st["opt"]); step = st["step"]; g.set_state(st["gen"])
        log(f"resumed from {a.state} at step {step}")

    def save(final=False):
        pipe = save_pipeline(a.out, vae, ema_te, ema_unet, tok, log, extra={
            "guidance_scale": a.guidance_scale, "train_steps": step, "batch_size": a.batch_size,
            "caption_dropout": a.caption_dropout, "ema": a.ema, "final": final,
            "minutes": (time.time() - t_start) / 60, "prediction_type": a.prediction_type,
            "beta_schedule": a.beta_schedule, "init_from": a.init_from,
        }, sched_kwargs=sched_kwargs)
        acc = accuracy_check(pipe, a.eval_prompts, a.guidance_scale, sched_kwargs=sched_kwargs)
        if acc:
            log(f"step {step} EMA teacher, DDIM 25 steps CFG {a.guidance_scale}: attribute accuracy {acc}")
        os.makedirs(os.path.dirname(os.path.abspath(a.state)), exist_ok=True)
        torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                    "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step, "gen": g.get_state()},
                   a.state)

    t_start = last_save = time.time()
    warm = 200
    unet.train(); te.train(not a.freeze_text_encoder)
    loss_avg = None
    while step < a.steps:
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / warm)
        idx = torch.randint(0, mean.shape[0], (a.batch_size,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        cid = ids[idx].clone()
        drop = torch.rand(a.batch_size, generator=g) < a.caption_dropout
        cid[drop] = empty
        t = torch.randint(0, 1000, (a.batch_size,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        with torch.set_grad_enabled(not a.freeze_text_encoder):
            h = te(cid).last_hidden_state
        pred = unet(zt, t, h).sample
        # Weights are set on the implied x0 error (min-SNR, then the high-noise boost) and converted to the
        # prediction's own error: |eps err|^2 = snr |x0 err|^2, |v err|^2 = (snr + 1) |x0 err|^2.
        x0_weight = snr[t].clamp(max=a.min_snr_gamma) if a.min_snr_gamma > 0 else snr[t]
        if a.high_noise_snr > 0:
            x0_weight = x0_weight * (a.high_noise_snr / snr[t]).clamp(1.0, a.high_noise_cap)
        if a.prediction_type == "v_prediction":
            w, target = (x0_weight / (snr[t] + 1)).float(), noise_sched.get_velocity(z0, noise, t)
        else:
            w, target = (x0_weight / snr[t]).float(), noise
        loss = (w * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
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
        if step % 50 == 0:
            el = time.time() - t_start
            log(f"step {step} loss {loss_avg:.4f} ({el / 60:.1f} min, {el / step if not a.resume else 0:.3f} s/step)")
        if (time.time() - last_save) / 60 > a.save_every_minutes:
            save()
            last_save = time.time()
        if (time.time() - t_start) / 60 > a.max_minutes:
            log(f"wall-clock limit reached at step {step}")
            break
    save(final=True)
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
