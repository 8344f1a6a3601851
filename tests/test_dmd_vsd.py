"""DMD / DMD2 and VSD (SwiftBrush): generator gradients against hand-written formulas, the fake score's update,
GAN signs, the multi-step student's timesteps and sampling, and short end-to-end runs with export."""
import json

import pytest
import torch
from conftest import hand_schedule, hand_x0_eps

from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.models import build_student, load_teacher
from stepdistill.objectives import Batch, DistillSetup, get_objective, load_run_config
from stepdistill.errors import StepdistillError


pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(teacher_path, name, student_type="lora", **opts):
    torch.manual_seed(0)
    teacher = load_teacher(ModelConfig(teacher=teacher_path), "cpu")
    student = build_student(teacher, StudentConfig(type=student_type, lora_rank=4, lora_alpha=8))
    cls = get_objective(name)
    obj = cls(DistillSetup(teacher, student, student_type, 1e-4, 32, torch.device("cpu")), cls.parse_options(opts))
    with torch.no_grad():  # LoRA B starts at zero: perturb so student, fake score and teacher all differ
        for n, p in teacher.net.named_parameters():
            if ".fake." in n or ".student." in n:
                p.add_(0.05 * torch.randn_like(p))
    return teacher, student, obj


def _batch(teacher, images=False):
    g = torch.Generator().manual_seed(1)
    prompts = ["a red circle", "a blue square", "green", ""]
    latents = torch.randn(4, 4, 8, 8, generator=g) if images else None
    return Batch(prompts, teacher.prompt_encoder(prompts), teacher.prompt_encoder([""] * 4), latents)


def _raw_unet(unet, adapter):
    """A raw UNet call with exactly one adapter active (None: the frozen base = the teacher)."""
    def call(x, t, emb):
        flags = {p: p.requires_grad for p in unet.parameters()}
        previous = unet.active_adapters()
        if adapter is None:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapter(adapter)
        try:
            return unet(x, t, encoder_hidden_states=emb).sample
        finally:
            unet.enable_adapters()
            unet.set_adapter(previous)
            for p, f in flags.items():
                p.requires_grad_(f)
    return call


def _hand_written_x_t_and_scores(teacher_path, unet, batch, x0, gen, w, t_range=(20, 980), fake_adapter="fake"):
    """Noise x0 to x_t with the objective's draw order (t, then eps); the CFG teacher's and the fake's (x0, eps),
    from their raw outputs (eps or v, as the teacher's scheduler says) converted by hand."""
    ac, prediction_type = hand_schedule(teacher_path)
    b = x0.shape[0]
    t = torch.randint(t_range[0], t_range[1] + 1, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0.detach() + s * noise
    w = w(t).view(-1, 1, 1, 1) if callable(w) else w  # a guidance interval: the scale depends on t
    with torch.no_grad():
        teacher, fake_score = _raw_unet(unet, None), _raw_unet(unet, fake_adapter)
        out_c, out_u = teacher(x_t, t, batch.cond.embeds), teacher(x_t, t, batch.uncond.embeds)
        real = hand_x0_eps(out_u + w * (out_c - out_u), x_t, a, s, prediction_type)
        fake = hand_x0_eps(fake_score(x_t, t, batch.cond.embeds), x_t, a, s, prediction_type)
    return t, x_t, a, s, real, fake


@pytest.mark.parametrize("student_type", ["lora", "full"])
def test_dmd_generator_gradient_matches_hand_written(any_tiny_sd, student_type):
    w = 2.5
    teacher, _, obj = _objective(any_tiny_sd, "dmd", student_type, guidance_scale=w)
    assert teacher.schedule.prediction_type == hand_schedule(any_tiny_sd)[1]
    batch = _batch(teacher)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = obj.generator_losses(x0, batch, torch.Generator().manual_seed(7))
    (grad_x0,) = torch.autograd.grad(out["loss"], x0)

    t, x_t, a, s, (x0_real, _), (x0_fake, _) = _hand_written_x_t_and_scores(any_tiny_sd, teacher.net, batch, x0,
                                                                            torch.Generator().manual_seed(7), w)
    x0d = x0.detach()
    grad = (x0_fake - x0_real) / (x0d - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = grad / x0.numel()  # loss = mean over batch and elements of 0.5 ||x0 - sg(x0 - grad)||^2
    assert grad.abs().max() > 1e-3  # fake != teacher: the test means something
    assert (grad_x0 - expected).abs().max() <= 1e-4 * expected.abs().max()  # fp32 op-order noise only


def test_dmd_guidance_interval_leaves_low_noise_levels_unguided(tiny_sd):
    """guidance_t_min: the real score is CFG-guided only at t >= guidance_t_min T, the conditional one below."""
    w, t_min = 2.5, 0.5
    teacher, _, obj = _objective(tiny_sd, "dmd", "lora", guidance_scale=w, guidance_t_min=t_min)
    batch = _batch(teacher)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    for seed in range(3):
        out = obj.generator_losses(x0, batch, torch.Generator().manual_seed(seed))
        (grad_x0,) = torch.autograd.grad(out["loss"], x0)
        scale_of_t = lambda t: torch.where(t >= t_min * 1000, w, 1.0)  # noqa: E731
        t, _, _, _, (x0_real, _), (x0_fake, _) = _hand_written_x_t_and_scores(
            tiny_sd, teacher.net, batch, x0, torch.Generator().manual_seed(seed), scale_of_t)
        expected = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) / x0.numel()
        assert (grad_x0 - expected).abs().max() <= 1e-4 * expected.abs().max()
    # the draws cover both sides of the interval, and the unguided side differs from a guided one
    _, _, _, _, (guided, _), _ = _hand_written_x_t_and_scores(tiny_sd, teacher.net, batch, x0,
                                                               torch.Generator().manual_seed(0), w)
    _, _, _, _, (mixed, _), _ = _hand_written_x_t_and_scores(tiny_sd, teacher.net, batch, x0,
                                                              torch.Generator().manual_seed(0), scale_of_t)
    t0 = _hand_written_x_t_and_scores(tiny_sd, teacher.net, batch, x0, torch.Generator().manual_seed(0), w)[0]
    low = t0 < t_min * 1000
    assert low.any() and (~low).any()
    assert torch.allclose(guided[~low], mixed[~low]) and (guided[low] - mixed[low]).abs().max() > 1e-4


@pytest.mark.parametrize("student_type", ["lora", "full"])
def test_vsd_generator_gradient_matches_hand_written(any_tiny_sd, student_type):
    w = 4.5
    teacher, _, obj = _objective(any_tiny_sd, "vsd", student_type, guidance_scale=w)
    assert teacher.schedule.prediction_type == hand_schedule(any_tiny_sd)[1]
    batch = _batch(teacher)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = obj.generator_losses(x0, batch, torch.Generator().manual_seed(9))
    (grad_x0,) = torch.autograd.grad(out["loss"], x0)

    t, x_t, a, s, (_, eps_real), (_, eps_fake) = _hand_written_x_t_and_scores(any_tiny_sd, teacher.net, batch, x0,
                                                                              torch.Generator().manual_seed(9), w)
    grad = (s**2) * (eps_real - eps_fake)  # w(t) = 1 - alpha_bar_t
    expected = grad / x0.numel()
    assert grad.abs().max() > 1e-4
    assert (grad_x0 - expected).abs().max() <= 1e-4 * expected.abs().max()  # fp32 op-order noise only


def test_generator_loss_reaches_student_weights_only(tiny_sd):
    teacher, student, obj = _objective(tiny_sd, "dmd", "lora", num_steps=2)
    batch = _batch(teacher)
    nets = obj.networks()
    loss = obj.losses("student", batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    student_grads = [p.grad for p in nets["student"].params]
    assert all(g is not None for g in student_grads) and sum(float(g.abs().sum()) for g in student_grads) > 0
    assert all(p.grad is None for p in nets["fake"].params)
    assert all(not p.requires_grad for n, p in student.named_parameters() if ".student." not in n and ".fake." not in n)


def test_per_step_fake_scores_judge_and_learn_from_their_own_step(tiny_sd):
    """fake_per_step: student step k's samples are judged by, and train, fake score k alone."""
    teacher, _, obj = _objective(tiny_sd, "dmd", "lora", num_steps=3, fake_per_step=True, guidance_scale=2.0)
    names = [f.adapter for f in obj.fakes]
    assert names == ["fake", "fake_step1", "fake_step2"]
    with torch.no_grad():  # make the three fake scores differ (_objective perturbs only "fake")
        for n, p in teacher.net.named_parameters():
            if ".fake_step" in n:
                p.add_(0.05 * torch.randn_like(p))
    batch = _batch(teacher)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    grads = []
    for k, name in enumerate(names):
        out = obj.generator_losses(x0, batch, torch.Generator().manual_seed(7), k)
        (grad_x0,) = torch.autograd.grad(out["loss"], x0)
        _, _, _, _, (x0_real, _), (x0_fake, _) = _hand_written_x_t_and_scores(
            tiny_sd, teacher.net, batch, x0, torch.Generator().manual_seed(7), 2.0, fake_adapter=name)
        expected = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) / x0.numel()
        assert (grad_x0 - expected).abs().max() <= 1e-4 * expected.abs().max()
        grads.append(grad_x0)
    assert (grads[0] - grads[2]).abs().max() > 1e-2 * grads[0].abs().max()  # the fakes differ: the test can fail

    params = {name: [p for n, p in teacher.net.named_parameters() if f".{name}." in n] for name in names}
    seen = set()
    for seed in range(12):  # the fake update: gradients only in the adapter of the step its sample came from
        step = obj.draw_student(batch, torch.Generator().manual_seed(seed), train=False).context["step"]
        teacher.net.zero_grad(set_to_none=True)
        obj.losses("fake", batch, torch.Generator().manual_seed(seed))["loss"].backward()
        for name, ps in params.items():
            touched = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in ps)
            assert touched == (name == names[step]), (seed, step, name)
        seen.add(step)
    assert seen == {0, 1, 2}
    with pytest.raises(StepdistillError, match="fake_per_step needs fake_score: lora"):
        _objective(tiny_sd, "dmd", "lora", num_steps=2, fake_per_step=True, fake_score="full")


@pytest.mark.parametrize("name,opts", [("dmd", {"fake_score": "lora"}), ("dmd", {"fake_score": "full"}), ("vsd", {})])
def test_fake_score_update_lowers_its_denoising_loss(tiny_sd, name, opts):
    teacher, _, obj = _objective(tiny_sd, name, "lora", **opts)
    batch = _batch(teacher)
    net = obj.networks()["fake"]
    opt = torch.optim.AdamW(net.params, lr=3e-3 if opts.get("fake_score") == "full" else 1e-2)
    fixed = lambda: obj.losses("fake", batch, torch.Generator().manual_seed(3))["loss"]  # noqa: E731
    with torch.no_grad():
        before = float(fixed())
    for _ in range(6):
        opt.zero_grad()
        fixed().backward()
        opt.step()
    with torch.no_grad():
        after = float(fixed())
    assert after < 0.9 * before, (before, after)


def test_gan_losses_have_the_right_signs():
    from stepdistill.objectives.gan import gan_discriminator_loss, gan_generator_loss

    real, fake = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    d = gan_discriminator_loss(real, fake)
    g_real, g_fake = torch.autograd.grad(d, [real, fake])
    assert (g_real < 0).all() and (g_fake > 0).all()  # D loss falls as real logits rise and fake logits fall
    assert gan_discriminator_loss(real + 1, fake - 1) < d
    (g,) = torch.autograd.grad(gan_generator_loss(fake), [fake])
    assert (g < 0).all() and gan_generator_loss(fake.detach() + 1) < gan_generator_loss(fake.detach())


def test_discriminator_head_learns_and_generator_gan_gradient_flows(tiny_sd):
    teacher, _, obj = _objective(tiny_sd, "dmd", "lora", gan_weight=0.5)
    assert obj.needs_images
    batch = _batch(teacher, images=True)
    disc = obj.networks()["disc"]
    opt = torch.optim.AdamW(disc.module.parameters(), lr=1e-2)
    fixed = lambda: obj.losses("disc", batch, torch.Generator().manual_seed(4))  # noqa: E731
    first = fixed()
    for _ in range(8):
        opt.zero_grad()
        fixed()["loss"].backward()
        opt.step()
    last = fixed()
    assert float(last["loss"]) < float(first["loss"])
    assert float(last["real_logit"] - last["fake_logit"]) > float(first["real_logit"] - first["fake_logit"])
    # the generator's GAN term reaches the student output but not the fake score or the head
    opt.zero_grad(set_to_none=True)
    x0 = torch.randn(4, 4, 8, 8).requires_grad_(True)
    out = obj.generator_losses(x0, batch, torch.Generator().manual_seed(0))
    out["gan_loss"].backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.fake_params) and all(p.grad is None for p in disc.module.parameters())


def test_fake_score_update_with_gan_head_matches_hand_written(any_tiny_sd):
    """DMD2's guidance update: DSM + fake_disc_weight * the discriminator loss, the latter reaching the fake
    UNet's weights through its mid-block features but not the head's, written out with separate forwards; the
    student's sample and the fake score's eps (fake_loss: eps) converted by hand from their raw outputs."""
    from stepdistill.objectives.gan import gan_discriminator_loss

    teacher, _, obj = _objective(any_tiny_sd, "dmd", "lora", gan_weight=0.5, fake_disc_weight=0.3, disc_t_max=0.3)
    ac, prediction_type = hand_schedule(any_tiny_sd)
    assert obj.opt.fake_loss == "eps" and teacher.schedule.prediction_type == prediction_type
    batch = _batch(teacher, images=True)
    out = obj.losses("fake", batch, torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out["loss"], obj.fake_params)
    assert all(p.grad is None for p in obj.disc.parameters())

    a = lambda tt: ac[tt].sqrt().view(-1, 1, 1, 1)  # noqa: E731
    s = lambda tt: (1 - ac[tt]).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    noised = lambda x, n, tt: a(tt) * x + s(tt) * n  # noqa: E731
    gen = torch.Generator().manual_seed(5)  # the objective's draws, in its order
    z, t_student = torch.randn(4, 4, 8, 8, generator=gen), torch.full((4,), 999)  # one-step student: x_T at 999
    with torch.no_grad():
        x0, _ = hand_x0_eps(_raw_unet(teacher.net, "student")(z, t_student, batch.cond.embeds), z, a(t_student),
                            s(t_student), prediction_type)
    t = torch.randint(0, 1000, (4,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t_d = torch.randint(20, 300 + 1, (4,), generator=gen).repeat(2)  # disc_t_max 0.3
    noise_d = torch.randn((8, *x0.shape[1:]), generator=gen)
    fake = _raw_unet(teacher.net, "fake")
    x_t = noised(x0, eps, t)
    _, eps_fake = hand_x0_eps(fake(x_t, t, batch.cond.embeds), x_t, a(t), s(t), prediction_type)
    dsm = ((eps_fake - eps) ** 2).mean()
    x_d = noised(torch.cat([batch.latents, x0]), noise_d, t_d)
    feats = obj.fake.features(x_d, t_d, batch.cond.cat(batch.cond), ["mid_block"])[0]
    real_logits, fake_logits = obj.disc(feats).chunk(2)
    cls = gan_discriminator_loss(real_logits, fake_logits)
    expected = dsm + 0.3 * cls
    want = torch.autograd.grad(expected, obj.fake_params, retain_graph=True)
    assert torch.allclose(out["dsm_loss"], dsm, rtol=1e-5) and torch.allclose(out["cls_loss"], cls, rtol=1e-5)
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)
    # the classification term is not zero: it changes the fake score's gradient
    cls_grads = torch.autograd.grad(cls, obj.fake_params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in cls_grads if g is not None) > 0


def test_multistep_student_exports_the_timesteps_it_was_trained_on(tiny_sd):
    from stepdistill.sampling import make_scheduler

    teacher, student, obj = _objective(tiny_sd, "dmd", "lora", num_steps=4)
    assert obj.timesteps == [999, 749, 499, 249]
    spec = obj.sampling_spec()
    assert spec.num_inference_steps == 4 and spec.timesteps[4] == obj.timesteps and spec.guidance_scale == 1.0
    assert spec.timesteps[2] == [999, 499] and spec.timesteps[1] == [999]
    sched = make_scheduler(spec)
    sched.set_timesteps(timesteps=spec.timesteps[4])
    assert sched.timesteps.tolist() == obj.timesteps
    sched.set_timesteps(4)  # the plain step count gives the same trailing grid
    assert sched.timesteps.tolist() == obj.timesteps

    # generate() reproduces the training-time rollout exactly: same timesteps, x0 re-noised with fresh noise
    def rollout_x0(x_T, cond, gen):
        return obj.student_x0(obj.rollout(x_T, cond, 3, gen), 249, cond)

    _assert_exported_sampling_matches(teacher, student, spec, rollout_x0)


def _assert_exported_sampling_matches(teacher, student, spec, student_x0_from_noise):
    """generate() through the exported pipeline == decoding `student_x0_from_noise(x_T, cond, gen)` for the same
    noise: image i's generator (seeded with seed i) draws its x_T, then any re-noising between steps."""
    import numpy as np

    from stepdistill.export import pipeline_with_net
    from stepdistill.sampling import generate, make_scheduler

    pipe = pipeline_with_net(teacher, student, make_scheduler(spec))
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle", "a blue square"], [11, 12]
    images = generate(pipe, spec, prompts, seeds)
    with torch.no_grad():
        x0 = []
        for prompt, seed in zip(prompts, seeds):
            gen = torch.Generator().manual_seed(seed)
            x_T = torch.randn((1, 4, 8, 8), generator=gen)
            x0.append(student_x0_from_noise(x_T, teacher.prompt_encoder([prompt]), gen))
        x0 = torch.cat(x0)
        decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    ours = pipe.image_processor.postprocess(decoded, output_type="np")
    theirs = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    assert np.abs(ours - theirs).max() <= 1.5 / 255


@pytest.mark.parametrize("name", ["dmd", "vsd"])
def test_one_step_student_at_a_lower_conditioning_timestep_samples_there(tiny_sd, name):
    teacher, student, obj = _objective(tiny_sd, name, "lora", student_timesteps=[699])
    assert obj.timesteps == [699]
    spec = obj.sampling_spec()
    assert spec.timesteps == {1: [699]} and spec.extra["trained_timesteps"] == [699]
    # the exported pipeline feeds pure noise to the student at t = 699 and decodes its x0, as in training
    _assert_exported_sampling_matches(teacher, student, spec, lambda x_T, cond, gen: obj.student_x0(x_T, 699, cond))


@pytest.mark.parametrize("opts,message", [
    ({"student_timesteps": [999, 499]}, "must list 1 strictly decreasing"),
    ({"num_steps": 2, "student_timesteps": [499, 999]}, "must list 2 strictly decreasing"),
    ({"student_timesteps": [1000]}, "must be < 1000"),
    ({"gan_weight": 0.1, "disc_t_max": 0.01}, "disc_t_max must be in"),
    ({"gan_weight": 0.1, "fake_disc_weight": -1}, "fake_disc_weight"),
    ({"guidance_t_min": 1.5}, "guidance_t_min must be in"),
])
def test_bad_options_are_refused(tiny_sd, opts, message):
    with pytest.raises(StepdistillError, match=message):
        _objective(tiny_sd, "dmd", "lora", **opts)


def _config(teacher, out, objective, student_type, **overrides):
    base = {"model.teacher": teacher, "train.output_dir": str(out), "train.max_steps": 2, "train.batch_size": 2,
            "train.progress": False, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.sample_prompts": ["a small red circle"], "data.max_samples": 16, "student.lora_rank": 4,
            "student.lora_alpha": 8, "student.type": student_type, "objective.name": objective,
            "objective.options.fake_lora_rank": 4}
    base.update(overrides)
    return load_run_config(None, [f"{k}={v}" for k, v in base.items()])


def test_logged_values_are_means_since_the_last_log_for_every_network(tiny_sd, tmp_path, monkeypatch):
    from stepdistill.trainer import Trainer

    # with ttur = 2 the student updates on even steps only; a row must still carry its loss
    scripted = iter([{"loss": 1.0, "fake/loss": 10.0}, {"fake/loss": 20.0},
                     {"loss": 3.0, "fake/loss": 30.0}, {"fake/loss": 50.0}])
    monkeypatch.setattr(Trainer, "_train_step", lambda self: next(scripted))
    cfg = _config(tiny_sd, tmp_path / "run", "dmd", "lora", **{"objective.options.ttur": 2, "train.log_every": 2,
                                                              "train.max_steps": 4, "train.checkpoint_every": 4})
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["fake/loss"]) for r in rows] == [(2, 1.0, 15.0), (4, 3.0, 40.0)]


@pytest.mark.parametrize("objective,student_type,opts", [
    ("dmd", "lora", {"objective.options.num_steps": 2, "objective.options.gan_weight": 0.1,
                     "objective.options.ttur": 2, "objective.options.regression_weight": 0.5,
                     "objective.options.regression_steps": 2}),
    ("dmd", "full", {"objective.options.fake_score": "full"}),
    ("dmd", "lora", {"objective.options.num_steps": 2, "objective.options.fake_per_step": True,
                     "objective.options.gan_weight": 0.1}),
    ("vsd", "lora", {}),
    ("vsd", "full", {}),
])
def test_end_to_end_run_exports(tiny_sd, tmp_path, objective, student_type, opts):
    from stepdistill.trainer import Trainer

    Trainer(_config(tiny_sd, tmp_path / "run", objective, student_type, **opts)).train()
    export = tmp_path / "run" / "export"
    spec = json.loads((export / "stepdistill.json").read_text())
    assert spec["objective"] == objective and spec["scheduler_class"] == "LCMScheduler"
    n = opts.get("objective.options.num_steps", 1)
    assert spec["num_inference_steps"] == n and spec["timesteps"][str(n)] == spec["extra"]["trained_timesteps"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("fake/loss" in r for r in rows) and any("loss" in r for r in rows)
    if student_type == "lora":
        from safetensors.torch import load_file

        lora = load_file(str(export / "pytorch_lora_weights.safetensors"))
        assert lora and not any("fake" in k for k in lora)
    else:
        assert (export / "unet").is_dir()


@pytest.mark.parametrize("beta_schedule, prediction, steps, expected", [
    ("scaled_linear", "epsilon", 1, [999]),   # SD: sigma/alpha = 14.6 at 999, DMD2's SD1.5 setting
    ("linear", "epsilon", 1, [730]),          # DDPM linear betas: 157x at 999, 15x at 730
    ("linear", "epsilon", 4, [730, 548, 365, 182]),
    ("linear", "v_prediction", 2, [999, 499]),  # v: x0 = alpha x - sigma v, no amplification
    ("squaredcos_cap_v2", "epsilon", 1, [956]),
])
def test_default_student_timesteps_come_from_the_schedule(beta_schedule, prediction, steps, expected):
    """The rule, by hand: the largest t with sigma_t / alpha_t <= 15 (eps) or sigma_t <= 15 (v), then its trailing grid."""
    from diffusers import DDPMScheduler

    from stepdistill.objectives.noise_student import default_student_timesteps
    from stepdistill.schedule import VPSchedule

    kw = {"beta_start": 0.00085, "beta_end": 0.012} if beta_schedule == "scaled_linear" else {}
    config = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction, **kw).config
    ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
    gain = ((1 - ac) / ac).sqrt() if prediction == "epsilon" else (1 - ac).sqrt()
    t0 = int((gain <= 15).nonzero().max())
    assert [t0 - i * (t0 + 1) // steps for i in range(steps)] == expected
    assert default_student_timesteps(VPSchedule.from_scheduler_config(config), steps, 15.0) == expected


@pytest.mark.parametrize("per_step", [True, False])
def test_dm_noise_of_a_later_step_stays_below_its_input_timestep(tiny_sd, per_step):
    """dm_t_max_per_step: step i > 0's samples are noised for the DM gradient to t <= t_i (its input's timestep),
    step 0's over the whole U[t_min T, t_max T]; without the option every step uses the whole range."""
    from stepdistill.objectives.base import StudentSample

    teacher, _, obj = _objective(tiny_sd, "dmd", "lora", num_steps=4, dm_t_max_per_step=per_step)
    ts = obj.timesteps
    drawn = []
    sample_t = obj.sample_t
    obj.sample_t = lambda *a, **k: drawn.append(sample_t(*a, **k)) or drawn[-1]
    batch = _batch(teacher)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    highest = {}
    for step in (0, 2, 3):
        drawn.clear()
        for seed in range(25):
            obj.student_losses(StudentSample(x0, {"step": step}), batch, torch.Generator().manual_seed(seed))
        t = torch.cat(drawn)
        assert int(t.min()) >= int(obj.opt.t_min * obj.T)
        highest[step] = int(t.max())
    assert highest[0] > ts[2]
    if per_step:
        assert highest[2] <= ts[2] and highest[3] <= ts[3] and highest[2] > ts[3]
    else:
        assert highest[2] > ts[2] and highest[3] > ts[2]


def test_dmd_regression_loss_matches_hand_written_teacher_ode(any_tiny_sd):
    """DMD1's regression term: l2 between the one-step student from noise z and the CFG teacher's deterministic
    DDIM solution from the same z on diffusers' trailing grid, each step converted and taken by hand."""
    from diffusers import DDIMScheduler

    w, steps = 2.5, 4
    teacher, _, obj = _objective(any_tiny_sd, "dmd", "lora", guidance_scale=w, regression_weight=0.5,
                                 regression_steps=steps)
    batch = _batch(teacher)
    loss = obj.regression_loss(batch, torch.Generator().manual_seed(3))
    loss.backward()
    grad_norm = sum(float(p.grad.abs().sum()) for p in obj.networks()["student"].params if p.grad is not None)

    ac, prediction_type = hand_schedule(any_tiny_sd)
    grid = DDIMScheduler.from_pretrained(any_tiny_sd, subfolder="scheduler", timestep_spacing="trailing")
    grid.set_timesteps(steps)
    ts = [int(t) for t in grid.timesteps]
    assert ts == [999, 749, 499, 249]
    z = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    teacher_net, student_net = _raw_unet(teacher.net, None), _raw_unet(teacher.net, "student")
    with torch.no_grad():
        x = z
        for j, t in enumerate(ts):
            a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
            tt = torch.full((4,), t)
            out_c, out_u = teacher_net(x, tt, batch.cond.embeds), teacher_net(x, tt, batch.uncond.embeds)
            x0, eps = hand_x0_eps(out_u + w * (out_c - out_u), x, a, s, prediction_type)
            if j == steps - 1:
                x = x0
            else:
                a_next, s_next = ac[ts[j + 1]].sqrt(), (1 - ac[ts[j + 1]]).sqrt()
                x = a_next * x0 + s_next * eps
        t0 = obj.timesteps[0]
        a0, s0 = ac[t0].sqrt(), (1 - ac[t0]).sqrt()
        pred, _ = hand_x0_eps(student_net(z, torch.full((4,), t0), batch.cond.embeds), z, a0, s0, prediction_type)
    expected = (pred - x).pow(2).mean()
    assert expected > 1e-3  # student and teacher differ: the test means something
    assert abs(loss.item() - expected.item()) <= 1e-4 * expected.item()
    assert grad_norm > 0  # the term trains the student
