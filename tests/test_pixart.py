"""PixArt-Sigma / PixArt-Alpha (DiT, discrete VP, eps with learned variance) teachers through the backbone
interface: schedule time reaches the network as the pipeline's integer timestep, the adapter returns the eps half of
the learned-variance output as the pipeline does, our CFG DDIM loop reproduces the pipeline's, prompt conditioning
is the pipeline's encode_prompt (embeds + attention mask), and PixArt-Alpha's resolution micro-conditions are
passed as its pipeline passes them."""
from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]
NO_BINNING = {"use_resolution_binning": False, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    """PixArt-Sigma, 2 layers, patch 2, learned sigma (8 output channels for 4 latent channels): 32x32 images on
    4x4x4 latents, DPM-Solver++ on linear betas."""
    from stepdistill.tiny_pipelines import build_tiny_pixart_sigma

    return str(build_tiny_pixart_sigma(tmp_path_factory.mktemp("tiny-pixart") / "pipe"))


@pytest.fixture(scope="module")
def tiny_pixart_alpha(tiny_pixart, tmp_path_factory):
    """A PixArtAlphaPipeline of the tiny parts with a transformer of sample_size 128 (the 1024 px model's, hence
    use_additional_conditions: the pipeline passes resolution and aspect ratio)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    parts = PixArtSigmaPipeline.from_pretrained(tiny_pixart).components
    torch.manual_seed(1)
    # inner_dim divisible by 3: the size embedding is 2 + 1 thirds of it
    net = PixArtTransformer2DModel.from_config({**parts["transformer"].config, "sample_size": 128,
                                                "use_additional_conditions": None, "attention_head_dim": 12,
                                                "cross_attention_dim": 48})
    assert net.use_additional_conditions
    folder = tmp_path_factory.mktemp("tiny-pixart-alpha") / "pipe"
    PixArtAlphaPipeline(**{**parts, "transformer": net}).save_pretrained(str(folder))
    return str(folder)


def _teacher(path):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu")


def _pipe(path, ddim=False):
    import diffusers

    from stepdistill.models import read_pipeline_class

    pipe = getattr(diffusers, read_pipeline_class(path)).from_pretrained(path)
    if ddim:  # deterministic DDIM on the teacher's betas, the steps [999, 499] -> -1 (alpha 1)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=2):
    return torch.randn(b, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_loads_with_a_vp_schedule_and_the_pipelines_prompt_encoding(tiny_pixart, one_thread):
    from diffusers import PixArtSigmaPipeline

    from stepdistill.backbones import PixArtBackbone
    from stepdistill.errors import StepdistillError
    from stepdistill.models import check_resolution
    from stepdistill.schedule import VPSchedule

    teacher, pipe = _teacher(tiny_pixart), _pipe(tiny_pixart)
    assert teacher.pipeline_class == "PixArtSigmaPipeline" and isinstance(teacher.backbone, PixArtBackbone)
    assert teacher.family == "pixart"
    assert isinstance(teacher.schedule, VPSchedule) and teacher.schedule.prediction_type == "epsilon"
    assert teacher.latent_shape(32) == (4, 4, 4)
    check_resolution(48, teacher, teacher.net)  # VAE 8 x patch 2
    with pytest.raises(StepdistillError, match="multiple of 16"):
        check_resolution(40, teacher, teacher.net)
    cond = teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():  # as __call__ runs it
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=300)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.mask, mask)
    assert cond.embeds.shape[:2] == cond.mask.shape == (2, 300) and cond.pooled is None and cond.time_ids is None
    assert 0 < int(cond.mask[0].sum()) < int(cond.mask[1].sum()) < 300
    assert teacher.backbone.latent_norm(teacher.vae) == (pytest.approx(0.13025), 0.0)
    assert not hasattr(PixArtSigmaPipeline, "load_lora_weights")  # hence full-pipeline exports


def test_schedule_time_reaches_the_network_as_the_pipelines_integer_timestep(tiny_pixart, one_thread):
    """At each step of the pipeline's own (DPM-Solver) loop, the Denoiser at schedule time t = the step's timestep
    calls the transformer with that int64 timestep and returns the eps half of its learned-variance output."""
    teacher, pipe = _teacher(tiny_pixart), _pipe(tiny_pixart)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kw, out: calls.append((args[0].clone(), kw["timestep"].clone(), out[0].clone())),
        with_kwargs=True)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, latents=_noise(0), output_type="latent",
             **NO_BINNING)
    hook.remove()
    cond, den = teacher.prompt_encoder(PROMPTS, 32), teacher.denoiser()
    assert [int(c[1][0]) for c in calls] == [999, 500]  # DPM-Solver's linspace spacing
    for x, timestep, out in calls:
        assert out.shape == (2, 8, 4, 4)
        t = torch.full((2,), int(timestep[0]), dtype=torch.long)
        assert torch.equal(teacher.schedule.timestep(t), timestep)  # value and dtype (int64)
        with torch.no_grad():
            ours = den(x, t, cond)
        assert (ours - out[:, :4]).abs().max() < 1e-5


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (2, 4.5)])
def test_the_denoiser_reproduces_the_pipelines_ddim_loop(tiny_pixart, one_thread, steps, guidance):
    """With DDIMScheduler swapped into the pipeline, our loop (guided_x0_eps in one batch + schedule.ddim_step)
    lands on the pipeline's latents from the same noise; the one-step sample is the pipeline's x0 prediction
    (PixArt returns the scheduler's pred_original_sample for one step)."""
    teacher, pipe = _teacher(tiny_pixart), _pipe(tiny_pixart, ddim=True)
    x = _noise(1)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x.clone(),
                   output_type="latent", **NO_BINNING).images
    ts = [int(t) for t in pipe.scheduler.timesteps] + [-1]
    assert ts == ([999, -1] if steps == 1 else [999, 499, -1])
    den, sched = teacher.denoiser(), teacher.schedule
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x0, eps = den.guided_x0_eps(x, torch.full((2,), t), cond, uncond, guidance)
            x = sched.ddim_step(x0, eps, torch.full((2,), t_next))
    # Relative to |x|: on linear betas x0 from t = 999 is eps-noise / alpha (1 / alpha ~ 160), so a random
    # network's samples reach |x| ~ 1e2..1e3 and float32 rounding of the two orders of CFG arithmetic scales with it
    assert (x - ref).abs().max() / ref.abs().max() < 1e-5


def test_pixart_alpha_gets_its_resolution_micro_conditions(tiny_pixart_alpha, one_thread):
    """PixArtAlphaPipeline (sample_size 128) passes resolution (H, W) and aspect ratio H / W: the prompt encoder
    carries them (time_ids) and the Denoiser reproduces the pipeline's CFG DDIM loop; without them the adapter
    refuses in one line."""
    teacher, pipe = _teacher(tiny_pixart_alpha), _pipe(tiny_pixart_alpha, ddim=True)
    assert teacher.pipeline_class == "PixArtAlphaPipeline"
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    assert cond.embeds.shape[1] == 120  # PixArtAlphaPipeline's max_sequence_length
    assert torch.equal(cond.time_ids, torch.tensor([[32.0, 32.0, 1.0]] * 2))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    x = _noise(2)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=4.5, latents=x.clone(), output_type="latent",
                   **NO_BINNING).images
    hook.remove()
    assert torch.equal(seen[0]["resolution"], cond.cat(uncond).time_ids[:, :2])
    assert torch.equal(seen[0]["aspect_ratio"], cond.cat(uncond).time_ids[:, 2:])
    den, sched = teacher.denoiser(), teacher.schedule
    with torch.no_grad():
        for t, t_next in [(999, 499), (499, -1)]:
            x0, eps = den.guided_x0_eps(x, torch.full((2,), t), cond, uncond, 4.5)
            x = sched.ddim_step(x0, eps, torch.full((2,), t_next))
        assert (x - ref).abs().max() / ref.abs().max() < 1e-5
        cond.time_ids = None
        with pytest.raises(ValueError, match="micro-conditions"):
            den(x, torch.full((2,), 999), cond)


def test_feature_taps_and_lora_targets(tiny_pixart, one_thread):
    """Default taps are the transformer blocks; each map is the block's (B, N, C) tokens on the patch grid in
    PatchEmbed's row-major order. The default LoRA wraps every projection of the self-attention, cross-attention
    and feed-forward of each block and starts as the teacher."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import Denoiser, adapter_scope
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_pixart)
    bb, net = teacher.backbone, teacher.net
    taps = bb.feature_taps(net)
    assert taps == ["transformer_blocks.0", "transformer_blocks.1"]
    x, t, cond = _noise(3), torch.tensor([600, 600]), teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        grid = net.pos_embed.proj(x)  # (B, C, h/2, w/2), flattened row-major into tokens by PatchEmbed
        assert torch.equal(bb.feature_map(net, grid.flatten(2).transpose(1, 2), (4, 4)), grid)
        maps = teacher.denoiser().features(x, t, cond, taps)
        before = teacher.denoiser()(x, t, cond)
    assert [tuple(m.shape) for m in maps] == [(2, net.inner_dim, 2, 2)] * 2

    linears = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith("transformer_blocks.") and (".attn" in n or ".ff." in n)}
    add_lora(net, StudentConfig(lora_rank=2), "student")
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert linears == wrapped and any(".attn2." in n for n in wrapped)
    with torch.no_grad(), adapter_scope(net, "student"):
        after = Denoiser(net, teacher.schedule, adapter="student")(x, t, cond)
    assert torch.allclose(before, after, atol=1e-6)


def test_a_lora_student_trains_and_exports_as_a_full_pipeline(tiny_pixart, tmp_path, one_thread):
    """diffusers gives PixArtTransformer2DModel no PeftAdapterMixin: stepdistill adds it when it adds the LoRA, so a
    LoRA student trains (here consistency, with its in-run sample grid at the unbinned 32 px), merges into a full
    pipeline export that PixArtSigmaPipeline loads as a plain PixArtTransformer2DModel, whose prediction is the
    trained student's."""
    import json

    from conftest import run_config
    from diffusers import PixArtTransformer2DModel

    from stepdistill.denoiser import Denoiser
    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_pixart, tmp_path / "run", **{"data.resolution": 32, "train.max_steps": 2,
                                                       "train.export": "full"})
    trainer = Trainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in k for row in rows for k in row)
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    pipe, spec = load_pipeline(str(tmp_path / "run" / "export"))
    assert type(pipe.transformer) is PixArtTransformer2DModel and spec.format == "full"
    x, t = _noise(4), torch.tensor([700, 700])
    cond = trainer.teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        ours = Denoiser(trainer.student, trainer.teacher.schedule, adapter="student")(x, t, cond)
        theirs = Denoiser(pipe.transformer, trainer.teacher.schedule)(x, t, cond)
    assert (ours - theirs).abs().max() < 1e-5


def test_generate_samples_a_plain_pixart_pipeline_unbinned(tiny_pixart, one_thread):
    """`generate` samples at the requested (here the default, transformer.sample_size x 8 = 32 px) size, not at a
    resolution bin (tiny sizes have none)."""
    from stepdistill.sampling import generate, load_pipeline

    pipe, spec = load_pipeline(tiny_pixart)
    assert generate(pipe, spec, ["a red circle"], [0], steps=2)[0].size == (32, 32)
