"""Progressive and guided distillation: the target and loss against a hand-written computation (eps and v
teachers, gradients included), round boundaries, exact resume across one, per-round exports that sample like the
objective's own rollout."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.errors import StepdistillError
from stepdistill.models import build_student, load_teacher
from stepdistill.objectives import Batch, DistillSetup, get_objective, load_run_config
from stepdistill.objectives.progressive import grid_timestep


pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(teacher_path, student_type="full", max_steps=6, guidance_embedding=False, **opts):
    torch.manual_seed(0)
    teacher = load_teacher(ModelConfig(teacher=teacher_path), "cpu")
    student = build_student(teacher, StudentConfig(type=student_type, lora_rank=4, lora_alpha=8,
                                                   guidance_embedding=guidance_embedding, guidance_embedding_dim=16))
    with torch.no_grad():  # the student must differ from the teacher for the test to mean anything
        for n, p in student.named_parameters():
            if student_type == "full" or ".student." in n:
                p.add_(0.02 * torch.randn_like(p))
    cls = get_objective("progressive")
    obj = cls(DistillSetup(teacher, student, student_type, 1e-4, 32, torch.device("cpu"), max_steps),
              cls.parse_options(opts))
    obj.begin_stage(0, student)
    return teacher, student, obj


def _batch(teacher):
    g = torch.Generator().manual_seed(1)
    prompts = ["a red circle", "a blue square", "green", ""]
    latents = torch.randn(4, 4, 8, 8, generator=g)
    return Batch(prompts, teacher.prompt_encoder(prompts), teacher.prompt_encoder([""] * 4), latents)


def _alphas_cumprod(path):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod.double()


def _x0_eps(out, z, a, s, prediction_type):
    """The network output converted by hand: eps -> x0 = (z - s eps) / a; v -> x0 = a z - s v, eps = s z + a v."""
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    return a * z - s * out, s * z + a * out


def _hand_written_round_loss(path, prediction_type, teacher_unet, student_unet, batch, x0, noise, k, n, scale,
                             target_unet=None, t_top=None, target_t_top=None):
    """Two DDIM steps of the CFG teacher (or of `target_unet`), then the inversion of one DDIM step. `t_top`: the
    student is told (and converts at) this t where k = n; `target_t_top`: the target, at its own top (2k = 2n)."""
    ac = _alphas_cumprod(path)

    def alpha_sigma(t):
        abar = torch.where(t < 0, torch.ones(len(t), dtype=torch.float64), ac[t.clamp(min=0)])
        return abar.sqrt().float().reshape(-1, 1, 1, 1), (1 - abar).sqrt().float().reshape(-1, 1, 1, 1)

    emb, unc = batch.cond.embeds, batch.uncond.embeds
    t, t_mid, t_end = (k * 1000) // n - 1, ((2 * k - 1) * 1000) // (2 * n) - 1, ((k - 1) * 1000) // n - 1

    def target_pred(z, tt):
        a, s = alpha_sigma(tt)
        if target_unet is not None:
            return _x0_eps(target_unet(z, tt, encoder_hidden_states=emb).sample, z, a, s, prediction_type)
        cond = teacher_unet(z, tt, encoder_hidden_states=emb).sample
        uncond = teacher_unet(z, tt, encoder_hidden_states=unc).sample
        return _x0_eps(uncond + scale * (cond - uncond), z, a, s, prediction_type)

    t_in = t if t_top is None else torch.where(k == n, t_top, t)
    t_tgt = t if target_t_top is None else torch.where(k == n, target_t_top, t)
    with torch.no_grad():
        a, s = alpha_sigma(t)
        z = a * x0 + s * noise  # the trajectory's point: at T - 1 whatever the top step is told
        x_hat, eps_hat = target_pred(z, t_tgt)
        a1, s1 = alpha_sigma(t_mid)
        z1 = a1 * x_hat + s1 * eps_hat
        x_hat1, eps_hat1 = target_pred(z1, t_mid)
        a2, s2 = alpha_sigma(t_end)
        z2 = a2 * x_hat1 + s2 * eps_hat1
        a, s = alpha_sigma(t_in)
        target = (z2 - (s2 / s) * z) / (a2 - (s2 / s) * a)
    pred, _ = _x0_eps(student_unet(z, t_in, encoder_hidden_states=emb).sample, z, a, s, prediction_type)
    weight = torch.clamp((a / s) ** 2, min=1.0).flatten()  # truncated SNR
    return (weight * (pred - target).pow(2).flatten(1).mean(1)).mean()


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_round_loss_and_gradients_match_hand_written(tiny_sd, tiny_sd_v, prediction):
    path = tiny_sd if prediction == "epsilon" else tiny_sd_v
    teacher, student, obj = _objective(path, start_steps=8, end_steps=1, guidance_scale=3.0)
    assert teacher.schedule.prediction_type == prediction and obj.student_steps == 4
    batch = _batch(teacher)
    gen = torch.Generator().manual_seed(5)
    # the objective's draws, replayed: step index k, then noise
    k = torch.randint(1, 5, (4,), generator=gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    k[0] = 1  # the last student step lands on the clean end (t = -1: alpha 1, sigma 0)
    ours = obj.round_loss(obj.student_at(batch, noise, k, None), batch)["loss"]
    ours.backward()
    g_ours = _grads(student)
    student.zero_grad(set_to_none=True)
    theirs = _hand_written_round_loss(path, prediction, teacher.net, student, batch, batch.latents, noise, k, 4, 3.0)
    theirs.backward()
    g_theirs = _grads(student)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (float(ours), float(theirs))
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 10
    for name in g_ours:  # float32 sums in another order: compare against each tensor's scale
        err = (g_ours[name] - g_theirs[name]).abs().max()
        assert err <= 1e-5 * g_theirs[name].abs().max() + 1e-9, (name, float(err))
    # losses() draws k, then the noise, from the generator it is given
    gen = torch.Generator().manual_seed(6)
    k, noise = torch.randint(1, 5, (4,), generator=gen), torch.randn(batch.latents.shape, generator=gen)
    with torch.no_grad():
        replay = obj.losses("student", batch, torch.Generator().manual_seed(6))["loss"]
        assert torch.equal(replay, obj.round_loss(obj.student_at(batch, noise, k, None), batch)["loss"])


def _rule_t_top(path, bound):
    """The largest t with sigma/alpha <= bound, from diffusers' alphas (eps teacher)."""
    ac = _alphas_cumprod(path)
    return int(((1 - ac).sqrt() / ac.sqrt() <= bound).nonzero().max())


def test_top_step_is_conditioned_where_the_schedule_rule_puts_it(tiny_sd_linear):
    """Linear betas (sigma/alpha = 157 at 999): a two-step round's top step is told t_top (730 at the default
    bound 15) and takes x0 there, against the hand-written loss; the four-step round, whose next point (749) is
    above t_top, keeps 999; the next round's target, the two-step student, is evaluated at its own t_top."""
    teacher, student, obj = _objective(tiny_sd_linear, start_steps=8, end_steps=1, guidance_scale=3.0)
    t_top = _rule_t_top(tiny_sd_linear, 15.0)
    assert obj.t_top == t_top == 730
    assert obj.sampling_spec().timesteps == {4: [999, 749, 499, 249]}
    batch = _batch(teacher)
    k = torch.tensor([2, 1, 2, 2])
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(4))
    obj.begin_stage(1, student)  # N = 2, target: the four-step student (its top at 999)
    assert obj.sampling_spec().timesteps == {2: [t_top, 499]}
    ours = obj.round_loss(obj.student_at(batch, noise, k, None), batch)["loss"]
    theirs = _hand_written_round_loss(tiny_sd_linear, "epsilon", teacher.net, student, batch, batch.latents, noise,
                                      k, 2, 3.0, target_unet=obj.target.module, t_top=t_top)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (float(ours), float(theirs))
    obj.begin_stage(2, student)  # N = 1, target: the two-step student (its top at t_top)
    assert obj.sampling_spec().timesteps == {1: [t_top]}
    k = torch.ones(4, dtype=torch.long)
    ours = obj.round_loss(obj.student_at(batch, noise, k, None), batch)["loss"]
    theirs = _hand_written_round_loss(tiny_sd_linear, "epsilon", teacher.net, student, batch, batch.latents, noise,
                                      k, 1, 3.0, target_unet=obj.target.module, t_top=t_top, target_t_top=t_top)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (float(ours), float(theirs))
    # a wrong target conditioning (999) gives another loss: the check above can fail
    wrong = _hand_written_round_loss(tiny_sd_linear, "epsilon", teacher.net, student, batch, batch.latents, noise,
                                     k, 1, 3.0, target_unet=obj.target.module, t_top=t_top)
    assert not torch.allclose(ours, wrong, rtol=1e-3)
    # explicit, and the rule's bound
    assert _objective(tiny_sd_linear, start_steps=2, end_steps=1, top_timestep=599)[2].sampling_spec().timesteps == {1: [599]}
    assert _objective(tiny_sd_linear, start_steps=2, end_steps=1, max_noise_amplification=12.0)[2].t_top == \
        _rule_t_top(tiny_sd_linear, 12.0)


def test_later_round_target_is_the_previous_student_and_the_teacher_is_not_called(tiny_sd):
    teacher, student, obj = _objective(tiny_sd, "lora", start_steps=8, end_steps=2)
    batch = _batch(teacher)
    obj.begin_stage(1, student)
    assert obj.student_steps == 2 and not obj.target_is_teacher
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 499)
    with torch.no_grad():
        assert torch.equal(obj.target(x, t, batch.cond), obj.student(x, t, batch.cond))
        before = obj.target(x, t, batch.cond).clone()
        for n, p in student.named_parameters():  # the student trains on; the frozen target does not move
            if ".student." in n:
                p.add_(0.05)
        assert torch.equal(obj.target(x, t, batch.cond), before)
        assert not torch.equal(obj.student(x, t, batch.cond), before)
    assert not any(p.requires_grad for n, p in student.named_parameters() if ".target." in n)

    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher was called after round 0")

    obj.teacher.__call__ = forbidden
    obj.teacher.x0_eps = forbidden
    obj.teacher.guided_x0_eps = forbidden
    assert obj.losses("student", batch, torch.Generator().manual_seed(0))["loss"].isfinite()


def test_guided_stage_matches_hand_written_and_exports_embedded_guidance(tiny_sd):
    from stepdistill.denoiser import guidance_scale_embedding

    teacher, student, obj = _objective(tiny_sd, "full", guidance_embedding=True, start_steps=4, end_steps=1,
                                       guided=True, guidance_min=2.0, guidance_max=4.0)
    assert [s.name for s in obj.stages()] == ["guided-4steps", "round-0-2steps", "round-1-1steps"]
    batch = _batch(teacher)
    gen = torch.Generator().manual_seed(3)
    ours = obj.losses("student", batch, gen)["loss"]
    gen = torch.Generator().manual_seed(3)  # replay: t, noise, scale
    t = torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    scale = 2.0 + 2.0 * torch.rand(4, generator=gen)
    ac = _alphas_cumprod(tiny_sd)[t]
    a, s = ac.sqrt().float().reshape(-1, 1, 1, 1), (1 - ac).sqrt().float().reshape(-1, 1, 1, 1)
    z = a * batch.latents + s * noise
    with torch.no_grad():
        c = teacher.net(z, t, encoder_hidden_states=batch.cond.embeds).sample
        u = teacher.net(z, t, encoder_hidden_states=batch.uncond.embeds).sample
        target = (z - s * (u + scale.reshape(-1, 1, 1, 1) * (c - u))) / a
    emb = guidance_scale_embedding(scale - 1.0, 16)  # what diffusers' pipelines feed: guidance_scale - 1
    pred = (z - s * student(z, t, encoder_hidden_states=batch.cond.embeds, timestep_cond=emb).sample) / a
    weight = torch.clamp((a / s) ** 2, min=1.0).flatten()
    theirs = (weight * (pred - target).pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(ours, theirs, rtol=1e-6), (float(ours), float(theirs))
    spec = obj.sampling_spec()
    assert spec.guidance_scale == 3.0 and spec.nfe(4) == 4 and spec.timesteps == {4: [999, 749, 499, 249]}


@pytest.mark.parametrize("teacher_name", ["tiny_sd", "tiny_sd_linear"])
def test_exported_student_samples_like_the_objective_rollout(teacher_name, request):
    """The export's scheduler (Euler with explicit timesteps = DDIM) reproduces the training-time DDIM rollout,
    a top step told t_top (linear betas, one and two steps) included."""
    import numpy as np

    from stepdistill.export import pipeline_with_net
    from stepdistill.sampling import generate, make_scheduler

    teacher, student, obj = _objective(request.getfixturevalue(teacher_name), "full", start_steps=8, end_steps=1)
    for stage in range(3):
        obj.begin_stage(stage, student)
        spec = obj.sampling_spec()
        n = obj.student_steps
        grid = [grid_timestep(k, n, 1000) for k in range(n, 0, -1)]
        if teacher_name == "tiny_sd_linear" and n <= 2:
            grid[0] = 730
        assert spec.timesteps == {n: grid}
        pipe = pipeline_with_net(teacher, student, make_scheduler(spec))
        pipe.set_progress_bar_config(disable=True)
        prompts, seeds = ["a red circle", "a blue square"], [11, 12]
        images = generate(pipe, spec, prompts, seeds)
        x_T = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
        with torch.no_grad():
            x0 = obj.rollout(x_T, teacher.prompt_encoder(prompts))
            decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
        ours = pipe.image_processor.postprocess(decoded, output_type="np")
        theirs = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
        assert np.abs(ours - theirs).max() <= 1.5 / 255, (stage, np.abs(ours - theirs).max())


def _config(teacher, out, **overrides):
    base = {"model.teacher": teacher, "train.output_dir": str(out), "train.max_steps": 4, "train.batch_size": 2,
            "train.progress": False, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
            "train.log_every": 1, "train.sample_prompts": ["a small red circle"], "data.max_samples": 16,
            "student.lora_rank": 4, "student.lora_alpha": 8, "objective.name": "progressive",
            "objective.options.start_steps": 4, "objective.options.end_steps": 1, "train.lr": 1e-3}
    base.update(overrides)
    return load_run_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("student_type", ["lora", "full"])
def test_resume_across_a_round_boundary_is_exact(tiny_sd, tmp_path, student_type):
    from stepdistill.trainer import Trainer

    Trainer(_config(tiny_sd, tmp_path / "straight", **{"student.type": student_type})).train()
    final = load_file(str(tmp_path / "straight" / "final" / "student.safetensors"))
    # the boundary is at step 2: resume from before it (crossed in the resumed run) and after it (target restored)
    for ckpt in (1, 3):
        src = tmp_path / "straight" / "checkpoints" / f"checkpoint-{ckpt}"
        dst = tmp_path / f"from-{ckpt}"
        shutil.copytree(src, dst / "checkpoints" / src.name)
        Trainer(_config(tiny_sd, dst, **{"student.type": student_type, "train.resume": "latest"})).train()
        resumed = load_file(str(dst / "final" / "student.safetensors"))
        assert resumed.keys() == final.keys()
        for k in final:
            assert torch.equal(resumed[k], final[k]), (ckpt, k)
    stages = tmp_path / "straight" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["round-0-2steps", "round-1-1steps"]
    assert json.loads((stages / "round-0-2steps" / "stepdistill.json").read_text())["timesteps"] == {"2": [999, 499]}
    assert json.loads((tmp_path / "straight" / "sampling_spec.json").read_text())["timesteps"] == {"1": [999]}


@pytest.mark.parametrize("opts,message", [
    ({"start_steps": 6, "end_steps": 1}, "power of 2"),
    ({"start_steps": 2, "end_steps": 2}, "power of 2"),
    ({"guided": True}, "guidance embedding"),
    ({"steps_per_round": 3}, "set train.max_steps"),
])
def test_bad_options_are_refused(tiny_sd, tmp_path, opts, message):
    from stepdistill.trainer import Trainer

    with pytest.raises(StepdistillError, match=message):
        cfg = _config(tiny_sd, tmp_path / "run", **{f"objective.options.{k}": v for k, v in opts.items()})
        Trainer(cfg)


def test_guided_run_exports_every_stage_with_embedded_guidance(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stepdistill.sampling import SamplingSpec
    from stepdistill.trainer import Trainer

    cfg = _config(tiny_sd, tmp_path / "run", **{"student.type": "full", "student.guidance_embedding": True,
                                                "student.guidance_embedding_dim": 16, "train.max_steps": 3,
                                                "objective.options.guided": True})
    Trainer(cfg).train()
    stages = tmp_path / "run" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["guided-4steps", "round-0-2steps", "round-1-1steps"]
    for name, steps in (("guided-4steps", 4), ("round-0-2steps", 2), ("round-1-1steps", 1)):
        spec = SamplingSpec.read(str(stages / name))
        assert spec.embedded_guidance and spec.guidance_scale == 3.0 and spec.nfe(steps) == steps
        assert spec.num_inference_steps == steps and spec.scheduler_class == "EulerDiscreteScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(str(stages / "round-1-1steps"))
    assert pipe.unet.config.time_cond_proj_dim == 16
