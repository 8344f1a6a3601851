"""Z-Image (single-stream DiT, rectified flow; the network takes lists, timestep 1 - sigma, and predicts x0 - eps)
teachers through the backbone interface: the adapter calls the transformer as ZImagePipeline does, our Euler loop
with CFG reproduces the pipeline's (its guidance_scale s is stepdistill's 1 + s), schedule time reaches the network
as the pipeline's timestep, prompt conditioning is the pipeline's variable-length encode_prompt, and LoRA students
train and round-trip through ZImagePipeline.load_lora_weights, sampled without CFG at guidance 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]  # hand the pipeline copies: its __call__ rewrites the list


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory):
    """16 latent channels, patch 2, 2 layers + 1 noise / 1 context refiner: 32x32 images on 4x4x16 latents (VAE
    factor 8, Flux's scaling / shift factors), FlowMatchEuler shift 3."""
    from stepdistill.tiny_pipelines import build_tiny_zimage

    return str(build_tiny_zimage(tmp_path_factory.mktemp("tiny-zimage") / "pipe"))


def _teacher(path):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu").at_resolution(32)


def _pipe(path, scheduler=None):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=2):
    return torch.randn(b, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def _recording(pipe):
    """Each transformer call's (latent list, timestep, caption list, output list)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(([v.clone() for v in args[0]], args[1].clone(), [c.clone() for c in args[2]],
                      [o.clone() for o in output[0]]))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def _spec(teacher, trained, guidance=1.0):
    from stepdistill.sampling import SamplingSpec, for_schedule

    return for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=len(trained[max(trained)]), timesteps=trained,
                                     guidance_scale=guidance, resolution=32), teacher.schedule,
                        teacher.scheduler_config)


def test_loads_and_encodes_prompts_as_the_pipeline(tiny_zimage, one_thread):
    """A static-shift flow schedule; the Conditioning holds the pipeline's caption list padded and masked, and the
    adapter hands a CFG call exactly the pipeline's [prompts, negatives] list; Flux-style VAE normalisation."""
    from diffusers import ZImagePipeline

    from stepdistill.backbones import ZImageBackbone
    from stepdistill.errors import StepdistillError
    from stepdistill.models import check_resolution
    from stepdistill.schedule import FlowSchedule

    teacher, pipe = _teacher(tiny_zimage), _pipe(tiny_zimage)
    assert teacher.pipeline_class == "ZImagePipeline" and isinstance(teacher.backbone, ZImageBackbone)
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.schedule.shift == 3.0 and not teacher.schedule.dynamic
    assert teacher.latent_shape(32) == (16, 4, 4)
    check_resolution(48, teacher, teacher.net)
    with pytest.raises(StepdistillError, match="multiple of 16"):
        check_resolution(40, teacher, teacher.net)
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    with torch.no_grad():
        embeds, negs = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=True)
    assert [int(n) for n in cond.mask.sum(1)] == [len(e) for e in embeds] and cond.embeds.shape[1] == len(embeds[1])
    assert all(torch.equal(e, c[m.bool()]) for e, c, m in zip(embeds, cond.embeds, cond.mask))

    calls, hook = _recording(pipe)
    with torch.no_grad():
        pipe(list(PROMPTS), num_inference_steps=1, guidance_scale=3.0, height=32, width=32, latents=_noise(0),
             output_type="latent")
    hook.remove()
    seen = []
    spy = teacher.net.register_forward_pre_hook(lambda m, a, kw: seen.append(a[2]), with_kwargs=True)
    with torch.no_grad():
        teacher.denoiser()(torch.cat([_noise(0)] * 2), torch.full((4,), 999), cond.cat(uncond))
    spy.remove()
    assert len(seen[0]) == len(calls[0][2]) == 4 and all(torch.equal(a, b) for a, b in zip(seen[0], calls[0][2]))
    assert all(torch.equal(a, b) for a, b in zip(calls[0][2][2:], negs))
    assert teacher.backbone.latent_norm(teacher.vae) == (pytest.approx(0.3611), pytest.approx(0.1159))
    assert hasattr(ZImagePipeline, "load_lora_weights")


@pytest.mark.parametrize("steps,s", [(1, 0.0), (3, 0.0), (3, 3.0)])
def test_the_adapter_reproduces_the_pipelines_sampling_loop(tiny_zimage, one_thread, steps, s):
    """Our Euler loop (adapter at the pipeline's timesteps, FlowSchedule.sigmas_for_inference with its sigmas
    linspace(1, 1/N, N) and shift 3) lands on ZImagePipeline's latents, with CFG pos + s (pos - neg) as the linear
    rule at scale 1 + s in one batched call."""
    teacher, pipe = _teacher(tiny_zimage), _pipe(tiny_zimage)
    x = _noise(1)
    with torch.no_grad():
        ref = pipe(list(PROMPTS), num_inference_steps=steps, guidance_scale=s, height=32, width=32, latents=x.clone(),
                   output_type="latent").images
    sched, den, bb = teacher.schedule, teacher.denoiser(), teacher.backbone
    sigmas, timesteps = sched.sigmas_for_inference(steps, sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), float(timesteps[i]))
            if s > 0:
                v_c, v_u = bb.predict(den.net, den.module, torch.cat([x, x]), torch.cat([t, t]), cond.cat(uncond),
                                      None).chunk(2)
                v = bb.guide(v_c, v_u, torch.full((2, 1, 1, 1), 1.0 + s))
            else:
                v = bb.predict(den.net, den.module, x, t, cond, None)
            x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
    assert (x - ref).abs().max() / ref.abs().max() < 1e-5


def test_schedule_time_reaches_the_network_as_the_pipelines_timestep(tiny_zimage, one_thread):
    """The pipeline's one-step sample (sigma 1, network timestep 1 - 1 = 0) is the Denoiser's x0 at t = 999. The
    exported FlowMatchEuler spec steps ZImagePipeline through exactly the trained sigmas: the network gets
    (1000 - schedule.timestep(t)) / 1000, and the Denoiser at t gives the velocity of its output, negated."""
    from stepdistill.sampling import generate, make_scheduler

    teacher, pipe = _teacher(tiny_zimage), _pipe(tiny_zimage)
    den, cond = teacher.denoiser(), teacher.prompt_encoder(PROMPTS, 32)
    x = _noise(2)
    calls, hook = _recording(pipe)
    with torch.no_grad():
        ref = pipe(list(PROMPTS), num_inference_steps=1, guidance_scale=0.0, height=32, width=32, latents=x.clone(),
                   output_type="latent").images
        x0, _ = den.x0_eps(x, torch.tensor([999, 999]), cond)
    hook.remove()
    assert torch.equal(calls[0][1], (1000 - teacher.schedule.timestep(torch.tensor([999, 999]))) / 1000)
    assert (x0 - ref).abs().max() < 1e-5

    trained = {1: [999], 2: [999, 499], 3: [999, 666, 333]}
    spec = _spec(teacher, trained)
    pipe.scheduler = make_scheduler(spec)
    one = teacher.prompt_encoder(PROMPTS[:1], 32)
    for n, ts in trained.items():
        calls, hook = _recording(pipe)
        generate(pipe, spec, PROMPTS[:1], [0], steps=n)
        hook.remove()
        want = teacher.schedule.sampling_sigmas(ts)
        assert spec.sigmas[n] == want and pipe.scheduler.sigmas.tolist() == [*torch.tensor(want).tolist(), 0.0]
        assert torch.equal(torch.stack([c[1][0] for c in calls]),
                           (1000 - teacher.schedule.timestep(torch.tensor(ts))) / 1000)
        for (xs, _, caps, out), t in zip(calls, ts):
            assert len(xs) == 1  # guidance 1: ZImagePipeline gets guidance_scale 0, no CFG batch
            with torch.no_grad():
                ours = den(xs[0].squeeze(1)[None], torch.tensor([t]), one)
            assert (ours + out[0].squeeze(1)[None]).abs().max() < 1e-5


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_the_exported_spec_samples_the_guided_rollout(tiny_zimage, one_thread, guidance):
    """A 2-step spec at [999, 499] with stepdistill guidance g: `generate` gives ZImagePipeline guidance_scale g - 1,
    and its image is our loop's (Denoiser.guided_x0_eps at scale g + schedule.ddim_step) decoded."""
    from stepdistill.sampling import generate, make_scheduler

    teacher = _teacher(tiny_zimage)
    spec = _spec(teacher, {2: [999, 499]}, guidance)
    pipe = _pipe(tiny_zimage, make_scheduler(spec))
    calls, hook = _recording(pipe)
    image = np.asarray(generate(pipe, spec, [PROMPTS[0]], [7])[0]).astype(int)
    hook.remove()
    assert len(calls[0][0]) == (2 if guidance > 1 else 1)
    x = torch.randn((16, 4, 4), generator=torch.Generator("cpu").manual_seed(7))[None]
    den, sched = teacher.denoiser(), teacher.schedule
    cond, uncond = teacher.prompt_encoder(PROMPTS[:1], 32), teacher.prompt_encoder([""], 32)
    with torch.no_grad():
        for t, t_next in [(999, 499), (499, -1)]:
            x0, eps = den.guided_x0_eps(x, torch.tensor([t]), cond, uncond, guidance)
            x = sched.ddim_step(x0, eps, torch.tensor([t_next]))
        pixels = teacher.vae.decode(teacher.from_latents(x)).sample
    rollout = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(image - rollout).max() <= 1


def test_feature_taps_and_lora_targets(tiny_zimage, one_thread):
    """Default taps are the main layers, each map the layer's image tokens (the first (h/2)(w/2) of its unified
    [image, caption] sequence) on the patch grid; the default LoRA wraps attention and feed-forward of the layers and
    both refiners, not the modulation, and starts as the teacher."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import Denoiser, adapter_scope
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_zimage)
    bb, net = teacher.backbone, teacher.net
    taps = bb.feature_taps(net)
    assert taps == ["layers.0", "layers.1"]
    x, t, cond = _noise(3), torch.tensor([600, 600]), teacher.prompt_encoder(PROMPTS, 32)
    raw = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: raw.__setitem__(n, out.clone()))
             for n in taps]
    with torch.no_grad():
        maps = teacher.denoiser().features(x, t, cond, taps)
        before = teacher.denoiser()(x, t, cond)
    for h in hooks:
        h.remove()
    for name, fmap in zip(taps, maps):
        assert fmap.shape == (2, 32, 2, 2) and torch.equal(fmap.flatten(2).transpose(1, 2), raw[name][:, :4])

    linears = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("layers.", "noise_refiner.", "context_refiner.")) and "adaLN" not in n}
    add_lora(net, StudentConfig(lora_rank=2), "student")
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == linears and len(wrapped) == 4 * 7
    with torch.no_grad(), adapter_scope(net, "student"):
        after = Denoiser(net, teacher.schedule, adapter="student")(x, t, cond)
    assert torch.allclose(before, after, atol=1e-6)


OBJECTIVES = {
    "consistency": {"objective.name": "consistency", "objective.options.num_ddim_timesteps": 10},
    "dmd": {"objective.name": "dmd", "objective.options.gan_weight": 0.1, "objective.options.num_steps": 2},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_lora_student_trains_and_round_trips_through_load_lora_weights(tiny_zimage, tmp_path, one_thread, name):
    """A few trainer steps (consistency; DMD with its GAN head on the layers): finite losses, the student moves,
    in-run samples; the LoRA export loaded by ZImagePipeline.load_lora_weights predicts as the trained student, its
    spec samples the trained sigmas, and the model card passes guidance_scale=0.0 (no CFG at guidance 1)."""
    import json

    from conftest import run_config

    from stepdistill.denoiser import Denoiser
    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_zimage, tmp_path / "run", **{"objective.options.num_ddim_timesteps": None,
                                                       **OBJECTIVES[name], "data.resolution": 32,
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
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert spec.guidance_scale == 1.0 and "guidance_scale=0.0" in card
    trained = spec.extra["trained_timesteps"]
    pipe.scheduler.set_timesteps(sigmas=spec.sigmas[len(trained)])
    assert torch.equal(pipe.scheduler.timesteps, trainer.teacher.schedule.timestep(torch.tensor(trained)))
    x, t = _noise(5), torch.tensor([700, 700])
    cond = trainer.teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        ours = Denoiser(trainer.student, trainer.teacher.schedule, adapter="student")(x, t, cond)
        theirs = Denoiser(pipe.transformer, trainer.teacher.schedule, adapter="student")(x, t, cond)
        base = Denoiser(pipe.transformer, trainer.teacher.schedule)(x, t, cond)
    assert (ours - theirs).abs().max() < 1e-5 and (ours - base).abs().max() > 1e-6


def test_generate_samples_a_plain_zimage_pipeline_at_its_default_size(tiny_zimage, one_thread):
    """ZImagePipeline has no default_sample_size (nor its transformer a sample_size): `generate` falls back to its
    __call__ default, 1024 px; the plain pipeline's spec guidance 7.5 becomes its guidance_scale 6.5."""
    from stepdistill.sampling import generate, load_pipeline

    pipe, spec = load_pipeline(tiny_zimage)
    assert not hasattr(pipe, "default_sample_size") and spec.guidance_scale == 7.5
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(len(a[0])), with_kwargs=True)
    assert generate(pipe, spec, ["a red circle"], [0], steps=1)[0].size == (1024, 1024)
    hook.remove()
    assert seen == [2] and pipe.guidance_scale == 6.5
