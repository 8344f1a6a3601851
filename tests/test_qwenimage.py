"""Qwen-Image (MMDiT, rectified flow with dynamic shift and shift_terminal, 3D VAE with per-channel latent
statistics) teachers through the backbone interface: the adapter packs, calls and unpacks as QwenImagePipeline does,
our Euler loop reproduces the pipeline's with its norm-rescaled true CFG, schedule time reaches the network as the
pipeline's timestep, prompt conditioning is the pipeline's encode_prompt (variable lengths, padded and masked when
joined), objectives see (B, C, h, w) latents normalised per channel, and LoRA students train and round-trip
through QwenImagePipeline.load_lora_weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]
NEG = {"negative_prompt": ["", ""]}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """16 latent channels (z_dim), patch 2, 2 layers: 32x32 images on 4x4x16 latents (VAE factor 8), packed to 2x2 =
    4 tokens of 64 channels; Qwen-Image's scheduler config (dynamic shift, shift_terminal 0.02)."""
    from stepdistill.tiny_pipelines import build_tiny_qwenimage

    return str(build_tiny_qwenimage(tmp_path_factory.mktemp("tiny-qwen") / "pipe"))


def _teacher(path, resolution=32):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu").at_resolution(resolution)


def _pipe(path, scheduler=None):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=2):
    return torch.randn(b, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def _recording(pipe):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                      output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def _pipeline_cfg(v_c, v_n, s):
    """QwenImagePipeline's true CFG on packed velocities, as its __call__ writes it."""
    comb = v_n + s * (v_c - v_n)
    return comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def test_loads_with_dynamic_shifting_and_the_pipelines_prompt_encoding(tiny_qwen, one_thread):
    """Dynamic shift at the training resolution's packed token count (the pipeline's mu); the prompt encoder is
    encode_prompt(max_sequence_length=512) with its mask kept; rows of other lengths join padded and masked, which
    changes no prediction; packing is QwenImagePipeline's."""
    from diffusers import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from stepdistill.backbones import Conditioning, QwenImageBackbone
    from stepdistill.errors import StepdistillError
    from stepdistill.models import check_resolution
    from stepdistill.schedule import FlowSchedule

    teacher, pipe = _teacher(tiny_qwen), _pipe(tiny_qwen)
    assert teacher.pipeline_class == "QwenImagePipeline" and isinstance(teacher.backbone, QwenImageBackbone)
    sched, cfg = teacher.schedule, pipe.scheduler.config
    assert isinstance(sched, FlowSchedule) and sched.dynamic and sched.shift_terminal == 0.02
    assert sched.train_mu == pytest.approx(calculate_shift(4, cfg.base_image_seq_len, cfg.max_image_seq_len,
                                                           cfg.base_shift, cfg.max_shift), abs=1e-12)
    assert teacher.latent_shape(32) == (16, 4, 4) and teacher.backbone.vae_factor(teacher.vae) == pipe.vae_scale_factor
    check_resolution(48, teacher, teacher.net)  # VAE 8 x packing 2
    with pytest.raises(StepdistillError, match="multiple of 16"):
        check_resolution(40, teacher, teacher.net)

    cond = teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
        one, none = pipe.encode_prompt(PROMPTS[1:], max_sequence_length=512)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.mask, mask) and cond.pooled is None
    assert 0 < int(mask[0].sum()) < int(mask[1].sum()) == mask.shape[1]
    alone = teacher.prompt_encoder(PROMPTS[1:], 32)
    assert none is None and torch.equal(alone.embeds, one) and bool(alone.mask.all())
    empty = teacher.prompt_encoder([""], 32)
    joined = Conditioning.concat([empty, alone])  # 5 and 22 tokens: the shorter zero-padded, masked
    assert joined.embeds.shape[1] == 22 and torch.equal(joined.mask[0], torch.tensor([1] * 5 + [0] * 17))
    assert torch.equal(joined.embeds[0, :5], empty.embeds[0]) and not joined.embeds[0, 5:].any()
    den, x, t = teacher.denoiser(), _noise(1), torch.tensor([500, 500])
    with torch.no_grad():
        assert (den(x[:1], t[:1], empty) - den(x[:1], t[:1], empty.padded(30))).abs().max() < 1e-6
        assert (den(x, t, joined)[:1] - den(x[:1], t[:1], empty)).abs().max() < 1e-6

    z = torch.randn(2, 16, 6, 4)
    assert torch.equal(teacher.backbone.pipeline_latents(z), QwenImagePipeline._pack_latents(z, 2, 16, 6, 4))
    assert hasattr(QwenImagePipeline, "load_lora_weights")


def test_latents_are_normalised_per_channel_on_an_image_view_of_the_vae(tiny_qwen, one_thread):
    """Teacher.vae encodes (B, 3, H, W) to (B, 16, h, w) and decodes back, the frame axis added and dropped inside;
    to_latents is (z - latents_mean) / latents_std per channel and from_latents is exactly the pipeline's decode
    input latents / (1 / latents_std) + latents_mean."""
    teacher, pipe = _teacher(tiny_qwen), _pipe(tiny_qwen)
    c = pipe.vae.config
    scale, shift = teacher.backbone.latent_norm(teacher.vae)
    assert scale.shape == shift.shape == (16, 1, 1)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = teacher.vae.encode(pixels).latent_dist
        ref = pipe.vae.encode(pixels[:, :, None]).latent_dist
        assert torch.equal(dist.mean, ref.mean[:, :, 0]) and dist.mean.shape == (2, 16, 4, 4)
        z = dist.sample(generator=torch.Generator().manual_seed(0))
        x = teacher.to_latents(z)
        mean, std = torch.tensor(c.latents_mean).view(1, 16, 1, 1), torch.tensor(c.latents_std).view(1, 16, 1, 1)
        assert torch.allclose(x, (z - mean) / std, atol=1e-6)
        assert torch.allclose(teacher.from_latents(x), z, atol=1e-5)
        decoded = teacher.from_latents(x)[:, :, None]
        assert torch.equal(decoded, x[:, :, None] / (1.0 / std[..., None]) + mean[..., None])  # the pipeline's
        assert torch.equal(teacher.vae.decode(decoded[:, :, 0]).sample, pipe.vae.decode(decoded).sample[:, :, 0])


@pytest.mark.parametrize("steps,true_cfg", [(2, 1.0), (3, 1.0), (3, 4.0)])
def test_the_adapter_reproduces_the_pipelines_sampling_loop(tiny_qwen, one_thread, steps, true_cfg):
    """Our Euler loop (adapter + FlowSchedule.sigmas_for_inference with the pipeline's sigmas and image_seq_len:
    dynamic shift, then shift_terminal) lands on QwenImagePipeline's latents from the same noise, with true CFG
    against an empty negative prompt in one batched call (the pipeline makes two) combined by the adapter's
    `guide`, the pipeline's per-token norm rescale. (One step of the pipeline's own scheduler is NaN: shift_terminal
    cannot stretch a grid that ends at sigma 1; the schedule refuses it.)"""
    from stepdistill.backbones.flux import pack_latents, unpack_latents

    teacher, pipe = _teacher(tiny_qwen), _pipe(tiny_qwen)
    x = _noise(0)
    kwargs = {"true_cfg_scale": true_cfg, **NEG} if true_cfg > 1 else {"true_cfg_scale": 1.0}
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, height=32, width=32, latents=pack_latents(x),
                   output_type="latent", **kwargs).images
    sched, den, bb = teacher.schedule, teacher.denoiser(), teacher.backbone
    sigmas, timesteps = sched.sigmas_for_inference(steps, image_seq_len=4, sigmas=np.linspace(1, 1 / steps, steps))
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), float(timesteps[i]))
            if true_cfg > 1:
                v_c, v_u = bb.predict(den.net, den.module, torch.cat([x, x]), torch.cat([t, t]), cond.cat(uncond),
                                      None).chunk(2)
                v = bb.guide(v_c, v_u, torch.full((2, 1, 1, 1), true_cfg))
                assert torch.equal(pack_latents(v), _pipeline_cfg(pack_latents(v_c), pack_latents(v_u), true_cfg))
            else:
                v = bb.predict(den.net, den.module, x, t, cond, None)
            x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
    assert (x - unpack_latents(ref, 4, 4)).abs().max() < 1e-5


def test_schedule_time_reaches_the_network_as_the_pipelines_timestep(tiny_qwen, one_thread):
    """The pipeline's first step (sigma 1, timestep 1000 / 1000) is the Denoiser at t = 999, and its own one-step
    grid is NaN (shift_terminal), which the schedule refuses in one line. The exported FlowMatchEuler spec (no
    dynamic or terminal shift) makes QwenImagePipeline, which always passes mu, step through exactly the trained
    sigmas: the network gets schedule.timestep(t) / 1000, packed latents from `generate`, and the Denoiser at t
    gives its output."""
    from stepdistill.backbones.flux import pack_latents, unpack_latents
    from stepdistill.errors import StepdistillError
    from stepdistill.sampling import SamplingSpec, for_schedule, generate, make_scheduler

    teacher, pipe = _teacher(tiny_qwen), _pipe(tiny_qwen)
    den, cond = teacher.denoiser(), teacher.prompt_encoder(PROMPTS, 32)
    x = _noise(2)
    calls, hook = _recording(pipe)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=2, height=32, width=32, latents=pack_latents(x), output_type="latent")
        ours = den(x, torch.tensor([999, 999]), cond)
    hook.remove()
    assert torch.equal(calls[0][0]["timestep"], teacher.schedule.timestep(torch.tensor([999, 999])) / 1000)
    assert (ours - unpack_latents(calls[0][1], 4, 4)).abs().max() < 1e-5
    with pytest.raises(StepdistillError, match="shift_terminal"):
        teacher.schedule.sigmas_for_inference(1, image_seq_len=4, sigmas=[1.0])
    with np.errstate(invalid="ignore"):
        pipe.scheduler.set_timesteps(sigmas=[1.0], mu=teacher.schedule.train_mu)
    assert pipe.scheduler.sigmas.isnan().any()

    trained = {1: [999], 2: [999, 499], 3: [999, 666, 333]}
    spec = for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=2, timesteps=trained, resolution=32),
                        teacher.schedule, teacher.scheduler_config)
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift_terminal"] is None
    pipe.scheduler = make_scheduler(spec)
    one = teacher.prompt_encoder(PROMPTS[:1], 32)
    for n, ts in trained.items():
        calls, hook = _recording(pipe)
        generate(pipe, spec, PROMPTS[:1], [0], steps=n)
        hook.remove()
        want = teacher.schedule.sampling_sigmas(ts)
        assert spec.sigmas[n] == want and pipe.scheduler.sigmas.tolist() == [*torch.tensor(want).tolist(), 0.0]
        assert torch.equal(torch.stack([kw["timestep"][0] for kw, _ in calls]),
                           teacher.schedule.timestep(torch.tensor(ts)) / 1000)
        for (kw, out), t in zip(calls, ts):
            assert kw["hidden_states"].shape == (1, 4, 64) and kw["img_shapes"] == [[(1, 2, 2)]]
            with torch.no_grad():
                ours = den(unpack_latents(kw["hidden_states"], 4, 4), torch.tensor([t]), one)
            assert (ours - unpack_latents(out, 4, 4)).abs().max() < 1e-5


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_the_denoiser_reproduces_the_exported_spec_loop(tiny_qwen, one_thread, true_cfg):
    """QwenImagePipeline with the FlowMatchEuler spec of a 2-step student at [999, 499], with and without true CFG:
    our loop (Denoiser.guided_x0_eps, which combines the outputs by the adapter's rescaled rule, + schedule.ddim_step
    at the schedule times) gives the pipeline's latents."""
    from stepdistill.backbones.flux import pack_latents, unpack_latents
    from stepdistill.sampling import SamplingSpec, for_schedule, make_scheduler

    teacher = _teacher(tiny_qwen)
    spec = for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=2, timesteps={2: [999, 499]}, resolution=32),
                        teacher.schedule, teacher.scheduler_config)
    pipe = _pipe(tiny_qwen, make_scheduler(spec))
    x = _noise(3)
    kwargs = {"true_cfg_scale": true_cfg, **NEG} if true_cfg > 1 else {"true_cfg_scale": 1.0}
    with torch.no_grad():
        ref = unpack_latents(pipe(PROMPTS, sigmas=spec.sigmas[2], height=32, width=32, latents=pack_latents(x),
                                  output_type="latent", **kwargs).images, 4, 4)
        den, sched = teacher.denoiser(), teacher.schedule
        cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
        for t, t_next in [(999, 499), (499, -1)]:
            x0, eps = den.guided_x0_eps(x, torch.full((2,), t), cond, uncond, true_cfg)
            x = sched.ddim_step(x0, eps, torch.full((2,), t_next))
    assert (x - ref).abs().max() < 1e-5


def test_feature_taps_and_lora_targets(tiny_qwen, one_thread):
    """Default taps are the blocks, each map its image stream (the output's second element) on the packed h/2 x w/2
    grid; the default LoRA wraps both streams' attention and MLP projections, not the modulation, and starts as
    the teacher."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import Denoiser, adapter_scope
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_qwen)
    bb, net = teacher.backbone, teacher.net
    taps = bb.feature_taps(net)
    assert taps == ["transformer_blocks.0", "transformer_blocks.1"]
    x, t, cond = _noise(4), torch.tensor([600, 600]), teacher.prompt_encoder(PROMPTS, 32)
    raw = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: raw.__setitem__(n, out[1].clone()))
             for n in taps]
    with torch.no_grad():
        maps = teacher.denoiser().features(x, t, cond, taps)
        before = teacher.denoiser()(x, t, cond)
    for h in hooks:
        h.remove()
    for name, fmap in zip(taps, maps):
        assert fmap.shape == (2, 32, 2, 2) and torch.equal(fmap.flatten(2).transpose(1, 2), raw[name])

    blocks = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_bl")
              and "_mod" not in n}
    add_lora(net, StudentConfig(lora_rank=2), "student")
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == blocks and len(wrapped) == 2 * 12
    with torch.no_grad(), adapter_scope(net, "student"):
        after = Denoiser(net, teacher.schedule, adapter="student")(x, t, cond)
    assert torch.allclose(before, after, atol=1e-6)


OBJECTIVES = {
    "consistency": {"objective.name": "consistency", "objective.options.num_ddim_timesteps": 10},
    "dmd": {"objective.name": "dmd", "objective.options.gan_weight": 0.1, "objective.options.num_steps": 2},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_lora_student_trains_and_round_trips_through_load_lora_weights(tiny_qwen, tmp_path, one_thread, name):
    """A few trainer steps (consistency; DMD with its GAN head, image data through the 3D VAE's image view):
    finite losses, the student moves, in-run samples; the LoRA export loaded by QwenImagePipeline.load_lora_weights
    predicts as the trained student, and its spec samples the trained sigmas."""
    import json

    from conftest import run_config

    from stepdistill.denoiser import Denoiser
    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_qwen, tmp_path / "run", **{"objective.options.num_ddim_timesteps": None,
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
