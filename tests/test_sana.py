"""Sana (linear-attention DiT, DPM-Solver++ on flow sigmas, 32x DC-AE) teachers through the backbone interface:
the adapter + FlowSchedule(solver "dpm") reproduce SanaPipeline's own DPM-Solver loop with CFG, schedule time
reaches the network as the pipeline's timestep (truncated to integers by DPM-Solver, exact under the exported
FlowMatchEuler spec), prompt conditioning is the pipeline's encode_prompt as __call__ runs it (complex human
instruction for prompts, none for the negative ""), and LoRA students train and round-trip through
SanaPipeline.load_lora_weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]
SIZE = {"height": 128, "width": 128, "use_resolution_binning": False}


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory):
    """32 latent channels, patch 1, 2 layers: 128x128 images on 4x4x32 latents (DC-AE, factor 32), flow_shift 3."""
    from stepdistill.tiny_pipelines import build_tiny_sana

    return str(build_tiny_sana(tmp_path_factory.mktemp("tiny-sana") / "pipe"))


def _teacher(path):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu").at_resolution(128)


def _pipe(path, scheduler=None):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(path)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=2):
    return torch.randn(b, 32, 4, 4, generator=torch.Generator().manual_seed(seed))


def _recording(pipe):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in kwargs.items()}, output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def _spec(teacher, trained):
    from stepdistill.sampling import SamplingSpec, for_schedule

    return for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=len(trained[max(trained)]), timesteps=trained,
                                     resolution=128), teacher.schedule, teacher.scheduler_config)


def test_loads_with_a_dpm_flow_schedule_and_the_pipelines_prompt_encoding(tiny_sana, one_thread):
    """The DPM-Solver flow config becomes FlowSchedule(shift = flow_shift, solver "dpm"); the conditioning of a CFG
    call is exactly what __call__ hands the transformer ([negative "" without the instruction, prompts with it]);
    the DC-AE shows AutoencoderKL's encode (a point latent_dist) and its scaling factor."""
    import inspect

    from diffusers import SanaPipeline

    from stepdistill.backbones import SanaBackbone
    from stepdistill.errors import StepdistillError
    from stepdistill.models import check_resolution
    from stepdistill.schedule import FlowSchedule

    teacher, pipe = _teacher(tiny_sana), _pipe(tiny_sana)
    assert teacher.pipeline_class == "SanaPipeline" and isinstance(teacher.backbone, SanaBackbone)
    sched = teacher.schedule
    assert isinstance(sched, FlowSchedule) and (sched.solver, sched.shift, sched.dynamic) == ("dpm", 3.0, False)
    assert teacher.latent_shape(128) == (32, 4, 4)
    check_resolution(160, teacher, teacher.net)
    with pytest.raises(StepdistillError, match="multiple of 32"):
        check_resolution(144, teacher, teacher.net)
    with pytest.raises(StepdistillError, match="use_karras_sigmas"):
        FlowSchedule.from_scheduler_config({**teacher.scheduler_config, "use_karras_sigmas": True})

    calls, hook = _recording(pipe)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=1, guidance_scale=4.5, latents=_noise(0), output_type="latent", **SIZE)
    hook.remove()
    cond, uncond = teacher.prompt_encoder(PROMPTS, 128), teacher.prompt_encoder(["", ""], 128)
    kw = calls[0][1]
    assert torch.equal(uncond.cat(cond).embeds, kw["encoder_hidden_states"])
    assert torch.equal(uncond.cat(cond).mask, kw["encoder_attention_mask"])
    assert cond.embeds.shape == (2, 300, 32) and cond.pooled is None
    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, False, complex_human_instruction=default)
        plain, _, _, _ = pipe.encode_prompt(PROMPTS, False)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.mask, mask) and not torch.equal(embeds, plain)
    mixed = teacher.prompt_encoder(["", PROMPTS[1], "", PROMPTS[0]], 128)  # each row encoded as its group is
    assert torch.equal(mixed.embeds, torch.stack([uncond.embeds[0], cond.embeds[1], uncond.embeds[0], cond.embeds[0]]))

    assert teacher.backbone.latent_norm(teacher.vae) == (pytest.approx(0.41407), 0.0)
    pixels = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = teacher.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        assert torch.equal(z, pipe.vae.encode(pixels).latent) and z.shape == (1, 32, 4, 4)
        assert torch.equal(teacher.vae.decode(z).sample, pipe.vae.decode(z).sample)
    assert hasattr(SanaPipeline, "load_lora_weights")


def test_the_adapter_takes_timestep_scale(tiny_sana, one_thread):
    """The pipeline multiplies the scheduler timestep by transformer.config.timestep_scale: so does the adapter."""
    from diffusers import SanaTransformer2DModel

    teacher = _teacher(tiny_sana)
    net = SanaTransformer2DModel.from_config({**teacher.net.config, "timestep_scale": 0.5}).eval()
    net.load_state_dict(teacher.net.state_dict())
    seen = []
    hook = net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x, cond = _noise(1), teacher.prompt_encoder(PROMPTS, 128)
    with torch.no_grad():
        out = teacher.backbone.predict(net, net, x, torch.tensor([856, 856]), cond, None)
        ref = teacher.backbone.predict(teacher.net, teacher.net, x, torch.tensor([428, 428]), cond, None)
    hook.remove()
    assert torch.equal(seen[0], torch.tensor([428.0, 428.0])) and torch.equal(out, ref)


def _dpm_step(x, x0, prev_x0, sigmas, i):
    """DPMSolverMultistepScheduler.step (dpmsolver++, midpoint, lower_order_final) on flow sigmas, written out:
    first order at the first and the last step, second order (midpoint) between."""
    s_t, s0 = sigmas[i + 1], sigmas[i]
    a_t, a0 = 1 - s_t, 1 - s0
    lam = lambda a, s: torch.log(a) - torch.log(s)  # noqa: E731
    h = lam(a_t, s_t) - lam(a0, s0)
    if prev_x0 is None or i == len(sigmas) - 2:
        return (s_t / s0) * x - (a_t * (torch.exp(-h) - 1.0)) * x0
    s1 = sigmas[i - 1]
    r0 = (lam(a0, s0) - lam(1 - s1, s1)) / h
    d1 = (1.0 / r0) * (x0 - prev_x0)
    return (s_t / s0) * x - (a_t * (torch.exp(-h) - 1.0)) * x0 - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * d1


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (3, 4.5)])
def test_the_adapter_reproduces_the_pipelines_dpm_solver_loop(tiny_sana, one_thread, steps, guidance):
    """SanaPipeline's own loop (DPM-Solver++ 2M on flow sigmas, CFG on [uncond, cond]) from the same noise: our
    adapter at FlowSchedule.sigmas_for_inference's sigmas and int64 timesteps, CFG in one batch, x0 = x - sigma v
    and the solver's update written out land on the pipeline's latents."""
    teacher, pipe = _teacher(tiny_sana), _pipe(tiny_sana)
    x = _noise(2)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x.clone(),
                   output_type="latent", **SIZE).images
    sigmas, timesteps = teacher.schedule.sigmas_for_inference(steps)
    assert torch.equal(sigmas, pipe.scheduler.sigmas) and torch.equal(timesteps, pipe.scheduler.timesteps)
    den = teacher.denoiser()
    cond, uncond = teacher.prompt_encoder(PROMPTS, 128), teacher.prompt_encoder(["", ""], 128)
    prev = None
    with torch.no_grad():
        for i in range(steps):
            t = timesteps[i].expand(2)
            if guidance > 1:
                v_u, v_c = teacher.backbone.predict(den.net, den.module, torch.cat([x, x]), torch.cat([t, t]),
                                                    uncond.cat(cond), None).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v = teacher.backbone.predict(den.net, den.module, x, t, cond, None)
            x0 = x - sigmas[i] * v
            x, prev = _dpm_step(x, x0, prev, sigmas, i), x0
    assert (x - ref).abs().max() / ref.abs().max() < 1e-5


def test_schedule_time_reaches_the_network_as_the_pipelines_timestep(tiny_sana, one_thread):
    """Under the teacher's DPM-Solver the network gets int64(sigma * 1000): at its 3-step sigmas, which lie on the
    schedule's grid at t = 998, 665, 332, that is floor(schedule.timestep(t)) at sigma(t). Under the exported
    FlowMatchEuler spec (a 2-step student at [999, 499]) SanaPipeline steps through exactly the trained sigmas
    and hands the network exactly schedule.timestep(t), where the Denoiser gives the pipeline's output."""
    from stepdistill.sampling import generate, make_scheduler

    teacher, pipe = _teacher(tiny_sana), _pipe(tiny_sana)
    sched = teacher.schedule
    calls, hook = _recording(pipe)
    with torch.no_grad():
        pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=1.0, latents=_noise(3, 1), output_type="latent",
             **SIZE)
    hook.remove()
    t = torch.tensor([998, 665, 332])
    assert torch.allclose(sched.alpha_sigma(t)[1], pipe.scheduler.sigmas[:3], rtol=0, atol=1e-6)
    seen = torch.stack([kw["timestep"][0] for _, kw, _ in calls])
    assert torch.equal(seen, torch.tensor([999.0, 856.0, 599.0])) and torch.equal(sched.timestep(t).floor(), seen)

    trained = {1: [999], 2: [999, 499]}
    spec = _spec(teacher, trained)
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.num_inference_steps == 2
    assert set(spec.scheduler_config) == {"num_train_timesteps", "shift", "use_dynamic_shifting", "shift_terminal",
                                          "stochastic_sampling"}  # no DPM-Solver keys
    pipe.scheduler = make_scheduler(spec)
    den, cond = teacher.denoiser(), teacher.prompt_encoder(PROMPTS[:1], 128)
    for n, ts in trained.items():
        calls, hook = _recording(pipe)
        generate(pipe, spec, PROMPTS[:1], [0], steps=n)
        hook.remove()
        want = sched.sampling_sigmas(ts)
        assert spec.sigmas[n] == want and pipe.scheduler.sigmas.tolist() == [*torch.tensor(want).tolist(), 0.0]
        assert torch.equal(torch.stack([kw["timestep"][0] for _, kw, _ in calls]), sched.timestep(torch.tensor(ts)))
        for (x, _, out), t in zip(calls, ts):
            with torch.no_grad():
                assert (den(x, torch.tensor([t]), cond) - out).abs().max() < 1e-5
    assert sched.sampling_sigmas([499])[0] == pytest.approx(0.75)  # flow_shift 3 at s = 1/2


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_the_denoiser_reproduces_the_exported_spec_loop(tiny_sana, one_thread, guidance):
    """SanaPipeline with the FlowMatchEuler spec of a 2-step student at [999, 499], with CFG: our loop (Denoiser
    guided_x0_eps in one batch + schedule.ddim_step at the schedule times) gives the pipeline's latents."""
    from stepdistill.sampling import make_scheduler

    teacher = _teacher(tiny_sana)
    spec = _spec(teacher, {2: [999, 499]})
    pipe = _pipe(tiny_sana, make_scheduler(spec))
    x = _noise(4)
    with torch.no_grad():
        ref = pipe(PROMPTS, sigmas=spec.sigmas[2], guidance_scale=guidance, latents=x.clone(), output_type="latent",
                   **SIZE).images
        den, sched = teacher.denoiser(), teacher.schedule
        cond, uncond = teacher.prompt_encoder(PROMPTS, 128), teacher.prompt_encoder(["", ""], 128)
        for t, t_next in [(999, 499), (499, -1)]:
            x0, eps = den.guided_x0_eps(x, torch.full((2,), t), cond, uncond, guidance)
            x = sched.ddim_step(x0, eps, torch.full((2,), t_next))
    assert (x - ref).abs().max() / ref.abs().max() < 1e-5


def test_feature_taps_and_lora_targets(tiny_sana, one_thread):
    """Default taps are the transformer blocks, each map the block's tokens on the (patch 1) latent grid; the default
    LoRA wraps the self- and cross-attention projections and the feed-forward's 1x1 convolutions (not the
    depthwise one) and starts as the teacher."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import Denoiser, adapter_scope
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_sana)
    bb, net = teacher.backbone, teacher.net
    taps = bb.feature_taps(net)
    assert taps == ["transformer_blocks.0", "transformer_blocks.1"]
    x, t, cond = _noise(5), torch.tensor([600, 600]), teacher.prompt_encoder(PROMPTS, 128)
    raw = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: raw.__setitem__(n, out.clone()))
             for n in taps]
    with torch.no_grad():
        maps = teacher.denoiser().features(x, t, cond, taps)
        before = teacher.denoiser()(x, t, cond)
    for h in hooks:
        h.remove()
    for name, fmap in zip(taps, maps):
        assert fmap.shape == (2, 32, 4, 4) and torch.equal(fmap.flatten(2).transpose(1, 2), raw[name])

    add_lora(net, StudentConfig(lora_rank=2), "student")
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    kinds = {n.split(".", 2)[2] for n in wrapped}
    assert kinds == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point"}
    with torch.no_grad(), adapter_scope(net, "student"):
        after = Denoiser(net, teacher.schedule, adapter="student")(x, t, cond)
    assert torch.allclose(before, after, atol=1e-6)


OBJECTIVES = {
    "consistency": {"objective.name": "consistency", "objective.options.num_ddim_timesteps": 10},
    "dmd": {"objective.name": "dmd", "objective.options.gan_weight": 0.1, "objective.options.num_steps": 2},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_lora_student_trains_and_round_trips_through_load_lora_weights(tiny_sana, tmp_path, one_thread, name):
    """A few trainer steps (consistency; DMD with its GAN head on the blocks and image data through the DC-AE): finite
    losses, the student moves, in-run samples at 128 px; the LoRA export, loaded by SanaPipeline.load_lora_weights,
    predicts as the trained student, and its spec samples the trained sigmas."""
    import json

    from conftest import run_config

    from stepdistill.denoiser import Denoiser
    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_sana, tmp_path / "run", **{"objective.options.num_ddim_timesteps": None,
                                                     **OBJECTIVES[name], "data.resolution": 128,
                                                     "train.max_steps": 2, "train.export": "lora"})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.student.named_parameters() if v.requires_grad}
    trainer.train()
    after = dict(trainer.student.named_parameters())
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if "loss" in k and isinstance(v, (int, float))]
    assert losses and all(np.isfinite(float(v)) for v in losses)
    assert list((tmp_path / "run" / "samples").glob("*.png"))

    pipe, spec = load_pipeline(str(tmp_path / "run" / "export"))
    assert spec.format == "lora" and spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    trained = spec.extra["trained_timesteps"]
    pipe.scheduler.set_timesteps(sigmas=spec.sigmas[len(trained)])
    assert torch.equal(pipe.scheduler.timesteps, trainer.teacher.schedule.timestep(torch.tensor(trained)))
    x, t = _noise(6), torch.tensor([700, 700])
    cond = trainer.teacher.prompt_encoder(PROMPTS, 128)
    with torch.no_grad():
        ours = Denoiser(trainer.student, trainer.teacher.schedule, adapter="student")(x, t, cond)
        theirs = Denoiser(pipe.transformer, trainer.teacher.schedule, adapter="student")(x, t, cond)
        base = Denoiser(pipe.transformer, trainer.teacher.schedule)(x, t, cond)
    assert (ours - theirs).abs().max() < 1e-5 and (ours - base).abs().max() > 1e-6
