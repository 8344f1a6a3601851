"""Can the DMD2 discriminator head tell real latents from a one-step student's samples at all?

    python tools/gan_head_probe.py RUN/export [--teacher assets/shapes-teacher] [--t 20 100 250 500 750]
    python tools/gan_head_probe.py RUN/export --checkpoint RUN/checkpoints/checkpoint-N [--config CONFIG]

For each noise level t, a fresh `DiscriminatorHead` is trained (300 AdamW steps, batch 64) on mid-block features
of noised real latents (shapes train split) and noised student samples, then tested on held-out pairs. Prints
train and held-out accuracy per t. The features are the teacher UNet's, or with --checkpoint the trained fake
score's (the UNet the run's discriminator reads), and then the run's own trained head is tested too.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from stepdistill.config import ModelConfig
from stepdistill.data import image_to_tensor
from stepdistill.data.shapes import sample
from stepdistill.denoiser import Conditioning
from stepdistill.models import load_teacher
from stepdistill.objectives.dmd import DMDOptions
from stepdistill.objectives.gan import DiscriminatorHead
from stepdistill.sampling import load_pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export")
    p.add_argument("--teacher", default="assets/shapes-teacher")
    p.add_argument("--t", nargs="+", default=["20", "100", "250", "500", "750"],
                   help="noise levels: T for one fixed t, or LO-HI for t ~ U[LO, HI] per pair (as in training)")
    p.add_argument("--n", type=int, default=768, help="real and fake latents each; the last quarter is held out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=DMDOptions.disc_hidden,
                   help="the fresh head's width (DMD's disc_hidden)")
    p.add_argument("--checkpoint", default=None, help="a DMD run's checkpoint: probe its fake score's features")
    p.add_argument("--config", default="configs/shapes/dmd2_1step.yaml", help="the config of that run")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    teacher = load_teacher(ModelConfig(teacher=a.teacher), "cpu")
    den, trained_head = teacher.denoiser(), None
    if a.checkpoint:
        import tempfile

        from stepdistill.objectives import load_run_config
        from stepdistill.trainer import Trainer

        cfg = load_run_config(a.config, [f"model.teacher={a.teacher}", f"train.output_dir={tempfile.mkdtemp()}"])
        trainer = Trainer(cfg)
        trainer.accelerator.load_state(a.checkpoint)
        den, trained_head = trainer.objective.fake, trainer.objective.disc
        torch.manual_seed(a.seed)
    ac = den.schedule.alphas_cumprod
    pipe, spec = load_pipeline(a.export)
    t0 = spec.extra["trained_timesteps"][0]  # a one-step distribution-matching export
    items = [sample("train", i) for i in range(a.n)]
    with torch.no_grad():
        pixels = torch.stack([image_to_tensor(it["image"], 32) for it in items])
        real = teacher.vae.encode(pixels).latent_dist.mean * teacher.latent_scale
        cond = teacher.prompt_encoder([it["caption"] for it in items])
        x_T = torch.randn(real.shape)
        eps = pipe.unet(x_T, torch.full((a.n,), t0), encoder_hidden_states=cond.embeds).sample
        fake = (x_T - (1 - ac[t0]).sqrt() * eps) / ac[t0].sqrt()
    n_train = a.n * 3 // 4
    order = torch.randperm(a.n)
    train_idx = torch.cat([order[:n_train], order[:n_train] + a.n])
    test_idx = torch.cat([order[n_train:], order[n_train:] + a.n])
    labels = torch.cat([torch.ones(a.n), torch.zeros(a.n)])
    embeds = torch.cat([cond.embeds, cond.embeds])
    print(f"export {a.export}: student timestep {t0}; latent std real {real.std():.3f}, student {fake.std():.3f}; "
          f"features of the {'fake score in ' + a.checkpoint if a.checkpoint else 'teacher'}")
    for t in a.t:
        lo, _, hi = t.partition("-")
        with torch.no_grad():
            x0 = torch.cat([real, fake])
            tt = torch.randint(int(lo), int(hi or lo) + 1, (a.n,)).repeat(2)  # one t per (real, fake) pair
            scale = lambda v: v[tt].float().view(-1, 1, 1, 1)  # noqa: E731
            x_t = scale(ac).sqrt() * x0 + scale(1 - ac).sqrt() * torch.randn(x0.shape)
            feats = torch.cat([den.features(x_t[i:i + 256], tt[i:i + 256], Conditioning(embeds[i:i + 256]), ["mid_block"])[0]
                               for i in range(0, len(x0), 256)])
        # shaped as the run's head is (DMD's disc_hidden default, the map's own size: the GroupNorm rule)
        head = DiscriminatorHead(feats.shape[1], a.hidden, feats.shape[-1])
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        for _ in range(a.steps):
            b = train_idx[torch.randint(0, len(train_idx), (64,))]
            loss = F.binary_cross_entropy_with_logits(head(feats[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = lambda idx: float(((head(feats[idx]) > 0).float() == labels[idx]).float().mean())  # noqa: E731
            line = (f"t={t}: alpha_bar {float(ac[int(hi or lo)]):.3f}{' at ' + hi if hi else ''}, fresh head: "
                    f"train accuracy {acc(train_idx):.2f}, "
                    f"held-out accuracy {acc(test_idx):.2f}")
            if trained_head is not None:
                right = (trained_head(feats[test_idx]) > 0).float() == labels[test_idx]
                line += f"; the run's head: {float(right.float().mean()):.2f}"
            print(line)


if __name__ == "__main__":
    main()
