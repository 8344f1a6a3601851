"""SD3 (MMDiT, rectified flow) teachers through the backbone interface (issue 12, item 7 for SD3): the adapter
reproduces the pipeline's own denoising, prompt conditioning is the pipeline's encode_prompt, every objective
trains on it, the exported spec samples the trained sigmas exactly, and LoRA / full exports round-trip."""
from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """4 latent channels, patch 1, no T5: 32x32 images on 8x8x4 latents (VAE factor 4), shift 3."""
    from stepdistill.tiny_pipelines import build_tiny_sd3

    return str(build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "pipe", latent_channels=4, patch_size=1,
                              vae_scale=4))


def _teacher(path):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu")


def _pipe(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_with_a_flow_schedule_and_the_pipelines_prompt_encoding(tiny_sd3, one_thread):
    from stepdistill.schedule import FlowSchedule

    teacher = _teacher(tiny_sd3)
    assert teacher.pipeline_class == "StableDiffusion3Pipeline" and teacher.family == "sd3"
    assert isinstance(teacher.schedule, FlowSchedule) and teacher.schedule.shift == 3.0
    assert teacher.latent_shape(32) == (4, 8, 8) and teacher.absent == ("text_encoder_3", "tokenizer_3")
    cond = teacher.prompt_encoder(PROMPTS, 32)
    embeds, _, pooled, _ = _pipe(tiny_sd3).encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.equal(cond.pooled, pooled)
    # without T5 the pipeline's 256 all-zero "T5" tokens are one token that stands for 256 (exact: the loop test)
    n = cond.embeds.shape[1] - 1
    assert embeds.shape[1] == n + 256 and torch.equal(cond.embeds[:, :n], embeds[:, :n])
    assert not cond.embeds[:, n:].any() and not embeds[:, n:].any()
    assert cond.repeats.tolist() == [[1.0] * n + [256.0]] * 2
    scale, shift = teacher.backbone.latent_norm(teacher.vae)
    z = torch.randn(2, 4, 8, 8)
    assert shift != 0 and torch.allclose(teacher.from_latents(teacher.to_latents(z)), z, atol=1e-6)


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (3, 4.0)])
def test_the_teacher_denoiser_reproduces_the_pipelines_sampling_loop(tiny_sd3, one_thread, steps, guidance):
    """Our Euler loop through the adapter (CFG in one batch, sigmas from FlowSchedule) lands on the latents
    StableDiffusion3Pipeline computes from the same noise."""
    teacher, pipe = _teacher(tiny_sd3), _pipe(tiny_sd3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   latents=x.clone(), output_type="latent").images
    sched, den = teacher.schedule, teacher.denoiser()
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    sigmas, timesteps = sched.sigmas_for_inference(steps)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), float(timesteps[i]))
            # the network sees diffusers' timestep: our schedule time for it is the table position, so call the
            # adapter directly with the pipeline's timestep and compare the step
            v = teacher.backbone.predict(den.net, den.module, torch.cat([x, x]), torch.cat([t, t]),
                                         uncond.cat(cond), None)
            v_u, v_c = v.chunk(2)
            x = sched.euler_step(x, v_u + guidance * (v_c - v_u), sigmas[i], sigmas[i + 1])
    assert (x - ref).abs().max() < 1e-5


def test_schedule_time_reaches_the_network_as_the_pipelines_timestep(tiny_sd3, one_thread):
    """Denoiser(x, t) at schedule time t calls the transformer with timestep sigma(t) * 1000, as the pipeline
    does at that sigma (t = 999 is the pipeline's first step, sigma 1)."""
    teacher, pipe = _teacher(tiny_sd3), _pipe(tiny_sd3)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                      with_kwargs=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, latents=x.clone(),
                   output_type="latent").images
    hook.remove()
    cond = teacher.prompt_encoder(PROMPTS[:1], 32)
    t = torch.tensor([999])
    assert torch.equal(teacher.schedule.timestep(t), seen[0])
    with torch.no_grad():
        x0, _ = teacher.denoiser().x0_eps(x, t, cond)
    assert (x0 - ref).abs().max() < 1e-5  # one Euler step from sigma 1 to 0 is x0 = x - v


OBJECTIVES = {
    "consistency": {"objective.name": "consistency", "objective.options.num_ddim_timesteps": 10},
    "dmd": {"objective.name": "dmd", "objective.options.gan_weight": 0.1, "objective.options.num_steps": 2},
    "vsd": {"objective.name": "vsd"},
    "progressive": {"objective.name": "progressive", "objective.options.start_steps": 8,
                    "objective.options.steps_per_round": 2, "objective.options.end_steps": 2},
    "adversarial": {"objective.name": "adversarial", "objective.options.real": "teacher",
                    "objective.options.teacher_steps": 2},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_trains_and_exports_on_sd3(tiny_sd3, tmp_path, one_thread, name):
    """A few trainer steps of each objective on the SD3 teacher: finite losses, the student moves, and the LoRA
    export loaded by StableDiffusion3Pipeline.load_lora_weights gives the trained student's prediction; its
    spec samples the trained sigmas."""
    from conftest import run_config

    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    import json

    cfg = run_config(tiny_sd3, tmp_path / "run", **{"objective.options.num_ddim_timesteps": None,
                                                    **OBJECTIVES[name], "train.export": "lora", "train.max_steps": 4})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.student.named_parameters() if v.requires_grad}
    trainer.train()
    after = dict(trainer.student.named_parameters())
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if "loss" in k and isinstance(v, (int, float))]
    assert losses and all(torch.isfinite(torch.tensor(float(v))) for v in losses)

    spec = trainer.objective.sampling_spec()
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.sigmas
    pipe, loaded = load_pipeline(str(tmp_path / "run" / "export"))
    n = loaded.num_inference_steps
    pipe.scheduler.set_timesteps(sigmas=loaded.sigmas[n])
    trained = spec.extra["trained_timesteps"]
    assert torch.equal(pipe.scheduler.timesteps, trainer.teacher.schedule.timestep(torch.tensor(trained)))

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = pipe.scheduler.timesteps[:1].expand(2)
    cond = trainer.teacher.prompt_encoder(PROMPTS, 32)
    from stepdistill.denoiser import adapter_scope

    with torch.no_grad(), adapter_scope(trainer.student, "student"):
        ours = trainer.student(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                               pooled_projections=cond.pooled).sample
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                                  pooled_projections=cond.pooled).sample
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("timesteps", [[999], [999, 499]], ids=["1step", "2step"])
def test_flow_spec_samples_the_trained_rollout(tiny_sd3, one_thread, timesteps):
    """A DMD student on the flow teacher, sampled by its exported spec through StableDiffusion3Pipeline
    (FlowMatchEuler, stochastic re-noising, explicit sigmas), gives the objective's own rollout."""
    import numpy as np

    from stepdistill.config import StudentConfig
    from stepdistill.export import pipeline_with_net
    from stepdistill.models import build_student
    from stepdistill.objectives import DistillSetup, get_objective
    from stepdistill.sampling import generate, make_scheduler

    teacher = _teacher(tiny_sd3)
    student = build_student(teacher, StudentConfig(type="full"))
    cls = get_objective("dmd")
    obj = cls(DistillSetup(teacher, student, "full", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({"num_steps": len(timesteps), "student_timesteps": timesteps}))
    spec = obj.sampling_spec()
    n = len(timesteps)
    assert spec.sigmas[n] == teacher.schedule.sampling_sigmas(timesteps) and spec.scheduler_config["stochastic_sampling"]
    pipe = pipeline_with_net(teacher, student.eval(), make_scheduler(spec))
    pipe.set_progress_bar_config(disable=True)
    image = np.asarray(generate(pipe, spec, [PROMPTS[0]], [7])[0]).astype(int)

    gen = torch.Generator("cpu").manual_seed(7)
    x = torch.randn((4, 8, 8), generator=gen)[None]
    cond = teacher.prompt_encoder(PROMPTS[:1], 32)
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            x0 = obj.student_x0(x, t, cond)
            if j + 1 < n:  # re-noised with fresh noise to the next sigma, as stochastic_sampling does
                x = obj.schedule.add_noise(x0, torch.randn((1, 4, 8, 8), generator=gen), torch.tensor([timesteps[j + 1]]))
        pixels = teacher.vae.decode(teacher.from_latents(x0)).sample
    rollout = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(image - rollout).max() <= 1


@pytest.mark.parametrize("fmt", ["lora", "full"])
def test_sd3_exports_load_and_their_model_card_snippet_runs(tiny_sd3, tmp_path, one_thread, fmt):
    """A 2-step DMD student on SD3: the LoRA export (peft dict + metadata, alpha != rank) and the full pipeline
    folder load into StableDiffusion3Pipeline with the student's exact prediction, and the model card's snippet,
    which passes the trained sigmas and the absent T5 encoder, runs as written."""
    import re

    from stepdistill.config import StudentConfig
    from stepdistill.export import export_student
    from stepdistill.models import build_student
    from stepdistill.objectives import DistillSetup, get_objective
    from stepdistill.sampling import load_pipeline

    teacher = _teacher(tiny_sd3)
    kind = "lora" if fmt == "lora" else "full"
    student = build_student(teacher, StudentConfig(type=kind, lora_rank=4, lora_alpha=2.0))
    with torch.no_grad():  # a student unlike the teacher
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    cls = get_objective("dmd")
    obj = cls(DistillSetup(teacher, student, kind, 1e-4, 32, torch.device("cpu")),
              cls.parse_options({"num_steps": 2, "student_timesteps": [999, 499]}))
    out = export_student(teacher, student, obj.sampling_spec(), fmt, tmp_path / "export", kind)
    pipe, spec = load_pipeline(str(out))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 500.0])
    cond = teacher.prompt_encoder(PROMPTS, 32)
    den = obj.student
    with torch.no_grad():
        ours = den.backbone.predict(den.net, den.module, x, t, cond, None) if kind == "full" else None
        if kind == "lora":
            from stepdistill.denoiser import adapter_scope

            with adapter_scope(student, "student"):
                ours = den.backbone.predict(student, student, x, t, cond, None)
        theirs = den.backbone.predict(pipe.transformer, pipe.transformer, x, t, cond, None)
    assert (ours - theirs).abs().max() < 1e-5

    card = (out / "README.md").read_text()
    assert "text_encoder_3=None, tokenizer_3=None" in card and "sigmas=[1.0, " in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('image.save("sample.png")', f'image.save("{tmp_path}/sample.png")')
    exec(compile(code, "model-card", "exec"), {})
    from PIL import Image

    assert Image.open(tmp_path / "sample.png").size == (32, 32)


def test_repeated_token_attention_equals_the_full_context_on_sd35_blocks(one_thread):
    """SD3.5's qk-norm and dual-attention blocks: 256 identical text tokens computed as one (+ log 256) give the
    same image output as the full context, and a call without repeats is diffusers' own processor."""
    from diffusers import SD3Transformer2DModel

    from stepdistill.backbones.base import Conditioning
    from stepdistill.backbones.sd3 import SD3Backbone

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                                qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    with torch.no_grad():  # random modulation and outputs (SD3's zero inits would hide every path)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, pooled = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 100.0]), torch.randn(2, 8)
    text = torch.randn(2, 5, 16)
    zeros = torch.zeros(2, 256, 16)
    with torch.no_grad():
        full = net(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([text, zeros], 1),
                   pooled_projections=pooled).sample
        repeats = torch.ones(2, 6)
        repeats[:, -1] = 256
        short = SD3Backbone().predict(net, net, x, t, Conditioning(torch.cat([text, zeros[:, :1]], 1), pooled,
                                                                    repeats=repeats), None)
        again = net(hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([text, zeros], 1),
                    pooled_projections=pooled).sample  # now through our processor, without repeats
    assert (full - short).abs().max() < 1e-5 * max(1.0, full.abs().max().item())
    assert torch.equal(full, again)


def test_auto_baseline_scheduler_keeps_a_flow_teachers_own(tiny_sd3, tiny_sd, one_thread):
    """`evaluate --teacher` samples a flow teacher with its FlowMatch scheduler (DDIM on flow sigmas is wrong)
    and a VP teacher with DDIM."""
    from stepdistill.sampling import load_pipeline

    pipe, spec = load_pipeline(tiny_sd3, scheduler="auto")
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" == type(pipe.scheduler).__name__
    pipe, spec = load_pipeline(tiny_sd, scheduler="auto")
    assert spec.scheduler_class == "DDIMScheduler" == type(pipe.scheduler).__name__
