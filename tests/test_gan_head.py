"""The DMD2 discriminator head learns (issue 11, item 4).

The cause of the head that stayed at chance on the shapes teacher: its second GroupNorm normalised groups of 2
channels on a 1x1 map (the 2x2 mid-block map after a stride-2 conv), which outputs only (+1, -1) or (-1, +1): the
sign of each pair's difference, which a pattern shared by all features fixes for every sample. The head is now
shaped by the map it reads (`objectives.gan.DiscriminatorHead`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepdistill.objectives.gan import DiscriminatorHead


def _old_layout(channels: int = 64) -> torch.nn.Module:
    """The earlier head: 32 groups and a stride-2 second conv whatever the map (the failing reference)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 64, 3, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1))


def _last_norm_outputs(net: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    seen = []
    handle = norms[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    net(features)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("hidden", [64, 256])
def test_every_group_normalises_at_least_16_values(size, hidden):
    head = DiscriminatorHead(hidden, hidden, size)
    maps = [size, size if size < 4 else (size + 1) // 2]
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    for norm, area in zip(norms, maps):
        assert norm.num_channels // norm.num_groups * area * area >= 16
    assert head(torch.randn(3, hidden, size, size)).shape == (3,)


def test_last_normalisation_of_a_2x2_map_keeps_more_than_signs():
    torch.manual_seed(0)
    features = torch.randn(64, 64, 2, 2)
    # the failure mode, measured on the old layout: nearly every output of its last normalisation is +-1
    assert (_last_norm_outputs(_old_layout(), features).abs() > 0.99).float().mean() > 0.8
    new = DiscriminatorHead(64, 256, 2)
    assert (_last_norm_outputs(new, features).abs() > 0.99).float().mean() < 0.45  # a unit normal: 0.32


def _train_and_test(head, real, fake, steps=200):
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    logits = lambda x: head(x).reshape(-1)  # noqa: E731
    for _ in range(steps):
        i = torch.randint(0, 384, (64,))
        loss = F.softplus(-logits(real[i])).mean() + F.softplus(logits(fake[i])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 0.5 * float((logits(real[384:]) > 0).float().mean() + (logits(fake[384:]) < 0).float().mean())


def test_head_separates_features_that_share_a_dominant_pattern():
    """Backbone features share a pattern much larger than what differs between samples. The old layout's last
    normalisation then keeps only the sign of each 2-channel group's difference, which the shared pattern fixes
    for every sample: it sees the same input for real and fake and stays at chance (as the in-loop head did)."""
    torch.manual_seed(0)
    pattern = 5 * torch.randn(1, 64, 2, 2)
    real, fake = pattern + torch.randn(512, 64, 2, 2) + 0.3, pattern + torch.randn(512, 64, 2, 2)
    torch.manual_seed(1)
    assert _train_and_test(_old_layout(), real, fake) < 0.6
    torch.manual_seed(1)
    assert _train_and_test(DiscriminatorHead(64, 256, 2), real, fake) > 0.95


@pytest.mark.slow
def test_dmd2_head_learns_in_the_trainer_loop(tmp_path):
    """Through the real trainer (optimizers, TTUR cadence, adapter scopes, `frozen`, the fake score's own use of
    the discriminator loss) on the shapes teacher, whose 2x2 mid-block map broke the earlier head: real images that
    are all white against the student's samples, trivially separable, are told apart on held-out draws."""
    from conftest import white_image_folder
    from stepdistill.objectives import load_run_config
    from stepdistill.trainer import Trainer

    data = white_image_folder(tmp_path / "white", 32)
    cfg = load_run_config("configs/shapes/dmd2_1step.yaml", [
        f"train.output_dir={tmp_path / 'run'}", f"data.source={data}", "train.batch_size=8", "train.max_steps=150",
        "train.progress=false", "train.export=none"])
    trainer = Trainer(cfg)
    obj = trainer.objective
    for _ in range(150):
        trainer._train_step()
        trainer.state.step += 1
    gen = torch.Generator().manual_seed(123)
    batch = trainer._batch(gen)
    with torch.no_grad():
        fake = obj.student_sample(batch, gen, train=False)
        x0 = torch.cat([batch.latents, fake])
        t = torch.randint(20, 201, (len(fake),), generator=gen).repeat(2)
        x_t = obj.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        real_logits, fake_logits = obj.disc(obj.fake.features(x_t, t, batch.cond.cat(batch.cond), ["mid_block"])[0]).chunk(2)
    acc = 0.5 * float((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    trainer.close()
    assert acc > 0.95, (acc, float(real_logits.mean()), float(fake_logits.mean()))


def test_text_vector_is_the_mean_over_the_prompts_own_tokens():
    """Without a pooled embedding, heads see the mean over unmasked tokens, each counted as often as it stands
    for (padding does not dilute a short prompt's vector)."""
    from stepdistill.backbones.base import Conditioning
    from stepdistill.objectives.gan import text_vector

    embeds = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    masked = Conditioning(embeds, mask=torch.tensor([[1, 1, 0]]))
    assert torch.allclose(text_vector(masked), torch.tensor([[2.0, 3.0]]))
    repeated = Conditioning(embeds[:, :2], repeats=torch.tensor([[1.0, 3.0]]))
    assert torch.allclose(text_vector(repeated), torch.tensor([[2.5, 3.5]]))
    pooled = Conditioning(embeds, pooled=torch.tensor([[7.0, 8.0]]))
    assert torch.equal(text_vector(pooled), torch.tensor([[7.0, 8.0]]))
