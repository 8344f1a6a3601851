"""Train the shapes-world VAE: AutoencoderKL, 4 latent channels, 4x downsampling (32x32x3 -> 8x8x4).

    python tools/shapes/train_vae.py --out assets/shapes-teacher/vae --steps 2400 --batch-size 32 --max-minutes 20

Loss: L1 + MSE reconstruction + a small KL; pixels of the shape (those that differ from the background, read off
the image border) weigh --fg-weight times more, since a small shape covers about 5% of the image and an
unweighted loss learns the background first and the shape's color and outline last. --init-from continues from
a saved VAE (fresh optimizer and LR schedule). After training, the latent std over train images is measured and
written into the config as `scaling_factor` (so scaled latents have unit std, as SD expects). Every
--eval-every steps the shapes-world encoder (assets/shapes-eval, when present) predicts the attributes of
reconstructed validation images: the teacher can never be more accurate than its VAE's reconstructions.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import common  # noqa: F401  (sets sys.path)
import torch
from common import Logger, images_tensor, seed_all, write_json

from diffusers import AutoencoderKL


def make_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, scaling_factor=1.0,
    )


def pixel_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """(N,1,H,W) loss weights, mean 1 per image: fg_weight on pixels unlike the background (the border median)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values[..., None, None]
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
    w = 1 + (fg_weight - 1) * fg
    return w / w.mean(dim=(2, 3), keepdim=True)


def _recon_accuracy_fn(xv, captions):
    """vae -> per-attribute accuracy of the shapes encoder on its reconstructions of `xv`, or None without one."""
    from stepdistill.shapes_eval import EVAL_DIR, ENCODER_FILE, attribute_accuracy, load_shapes_encoder

    if not (EVAL_DIR / ENCODER_FILE).exists():
        return None
    encoder = load_shapes_encoder()

    @torch.no_grad()
    def accuracy(vae):
        vae.eval()
        rec = vae.decode(vae.encode(xv).latent_dist.mode()).sample.clamp(-1, 1)
        return {k: round(v, 3) for k, v in attribute_accuracy((rec + 1) / 2, captions, encoder).items()}

    return accuracy


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/shapes-teacher/vae")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--fg-weight", type=float, default=10.0, help="loss weight of shape pixels (background: 1)")
    p.add_argument("--init-from", default=None, help="a saved VAE folder to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", default="assets/shapes-build-logs/vae.log")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    log = Logger(a.log)
    seed_all(a.seed)
    x, _, _ = images_tensor("train", a.num_images)
    xv, caps_v, _ = images_tensor("val", 512)
    log(f"data {tuple(x.shape)}; args {vars(a)}")
    vae = AutoencoderKL.from_pretrained(a.init_from) if a.init_from else make_vae()
    log(f"vae params {sum(q.numel() for q in vae.parameters()) / 1e6:.3f}M")
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    g = torch.Generator().manual_seed(a.seed)
    recon_accuracy = _recon_accuracy_fn(xv, caps_v)
    t0 = time.time()
    vae.train()
    for step in range(a.steps):
        idx = torch.randint(0, x.shape[0], (a.batch_size,), generator=g)
        xb = x[idx]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        w = pixel_weights(xb, a.fg_weight)
        l1 = ((rec - xb).abs() * w).mean()
        mse = ((rec - xb).pow(2) * w).mean()
        kl = post.kl().mean() / xb[0].numel()
        loss = l1 + mse + a.kl_weight * kl * xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            log(f"step {step} loss {loss.item():.4f} l1 {l1.item():.4f} mse {mse.item():.5f} kl/dim {kl.item():.3f}")
        if recon_accuracy and (step + 1) % a.eval_every == 0:
            log(f"step {step + 1} reconstruction attribute accuracy {recon_accuracy(vae)}")
            vae.train()
        if (time.time() - t0) / 60 > a.max_minutes:
            log(f"wall-clock limit reached at step {step}")
            break
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.sample(generator=g) for i in range(0, 4096, 256)])
        std = z.std().item()
        rv = vae.decode(vae.encode(xv).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rv - xv) / 2).pow(2).mean().item()
        psnr = 10 * math.log10(1.0 / mse)
    acc = recon_accuracy(vae) if recon_accuracy else None
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    os.makedirs(a.out, exist_ok=True)
    vae.save_pretrained(a.out, safe_serialization=True)
    write_json(os.path.join(os.path.dirname(os.path.abspath(a.log)), "vae_metrics.json"),
               {"latent_std": std, "scaling_factor": 1.0 / std, "val_psnr": psnr, "recon_accuracy": acc,
                "steps": step + 1,
                "minutes": (time.time() - t0) / 60})
    log(f"saved {a.out}: latent std {std:.4f} -> scaling_factor {1 / std:.4f}; val PSNR {psnr:.2f} dB; "
        f"reconstruction attribute accuracy {acc}")


if __name__ == "__main__":
    main()
