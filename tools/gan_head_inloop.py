"""Does the DMD2 discriminator head learn inside the real training loop? Held-out accuracy of the run's own head.

    python tools/gan_head_inloop.py --head current --steps 200          # the head in stepdistill.objectives.gan
    python tools/gan_head_inloop.py --head old --steps 200              # the earlier fixed layout, for comparison
    python tools/gan_head_inloop.py --config configs/shapes/dmd2_1step.yaml --steps 200 train.batch_size=8

Trains the config through `Trainer._train_step` (its optimizers, TTUR cadence, adapter scopes and the fake score's
use of the discriminator loss) and every 50 steps tests the run's own head on a fresh batch: real latents vs the
student's samples, each noised to t ~ U[20, 200] and t ~ U[20, 980], the head reading the fake score's mid-block
features. `--head old` swaps in the layout the head had before (32 GroupNorm groups, stride-2 second conv on any
map), whose last normalisation saw 2 channels of a 1x1 map on the shapes teacher.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import stepdistill.objectives.dmd as dmd
from stepdistill.objectives import load_run_config
from stepdistill.trainer import Trainer


class OldLayoutHead(torch.nn.Module):
    def __init__(self, channels: int, hidden: int = 256, size: int | None = None):
        super().__init__()
        hidden = min(hidden, channels)
        groups = 32 if hidden % 32 == 0 else 8 if hidden % 8 == 0 else 1
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.GroupNorm(groups, hidden), torch.nn.SiLU(),
            torch.nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), torch.nn.GroupNorm(groups, hidden),
            torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(hidden, 1))

    def forward(self, features):
        return self.net(features).squeeze(1)


def accuracy(trainer, lo: int, hi: int) -> tuple[float, float, float]:
    obj, gen = trainer.objective, torch.Generator().manual_seed(123)
    batch = trainer._batch(gen)
    with torch.no_grad():
        fake = obj.student_sample(batch, gen, train=False)
        x0 = torch.cat([batch.latents, fake])
        t = torch.randint(lo, hi + 1, (len(fake),), generator=gen).repeat(2)
        x_t = obj.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        real, fake_logits = obj.disc(obj.fake.features(x_t, t, batch.cond.cat(batch.cond), ["mid_block"])[0]).chunk(2)
    acc = 0.5 * float((real > 0).float().mean() + (fake_logits < 0).float().mean())
    return acc, float(real.mean()), float(fake_logits.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shapes/dmd2_1step.yaml")
    p.add_argument("--head", choices=["current", "old"], default="current")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.head == "old":
        dmd.DiscriminatorHead = OldLayoutHead
    torch.manual_seed(0)
    cfg = load_run_config(a.config, [f"train.output_dir={tempfile.mkdtemp()}/run", "train.progress=false",
                                     f"train.max_steps={a.steps}", *a.overrides])
    trainer = Trainer(cfg)
    print(f"head ({a.head}): {trainer.objective.disc}")
    t0, losses = time.time(), []
    for s in range(a.steps):
        logs = trainer._train_step()
        trainer.state.step += 1
        if "disc/loss" in logs:
            losses.append(logs["disc/loss"])
        if (s + 1) % 50 == 0:
            low, full = accuracy(trainer, 20, 200), accuracy(trainer, 20, 980)
            print(f"step {s + 1}: discriminator loss (mean of the last 50) {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"(2 ln 2 = 1.3863); held-out accuracy t<=200 {low[0]:.2f} (mean logits real {low[1]:+.2f}, "
                  f"fake {low[2]:+.2f}), t<=980 {full[0]:.2f}; {time.time() - t0:.0f} s", flush=True)
    trainer.close()


if __name__ == "__main__":
    main()
