"""Flux.1 (dev-style, guidance-distilled; rectified flow with dynamic shifting) teachers through the backbone
interface: the adapter packs, calls and unpacks as FluxPipeline does, schedule time reaches the network as the
pipeline's timestep at the shift the pipeline samples the training resolution with, our Euler loop reproduces the
pipeline's, prompt conditioning is the pipeline's encode_prompt, and an exported spec's sigmas are stepped through
exactly even though FluxPipeline always passes mu."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle", "a blue square at the top"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """16 latent channels, 1 double + 1 single block, guidance_embeds: 32x32 images on 4x4x16 latents (VAE factor
    8), packed to 2x2 = 4 tokens of 64 channels; FLUX.1-dev's dynamic-shifting scheduler config."""
    from stepdistill.tiny_pipelines import build_tiny_flux

    return str(build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "pipe"))


def _teacher(path, resolution=32):
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    return load_teacher(ModelConfig(teacher=path), "cpu").at_resolution(resolution)


def _pipe(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0, b=2):
    return torch.randn(b, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def _recording(pipe):
    """Records each transformer call's keyword arguments and output."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                      output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def test_loads_with_dynamic_shifting_packing_and_the_pipelines_prompt_encoding(tiny_flux, one_thread):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from stepdistill.backbones import FluxBackbone
    from stepdistill.backbones.flux import image_ids, pack_latents, unpack_latents
    from stepdistill.errors import StepdistillError
    from stepdistill.models import check_resolution
    from stepdistill.schedule import FlowSchedule

    teacher, pipe = _teacher(tiny_flux), _pipe(tiny_flux)
    assert teacher.pipeline_class == "FluxPipeline" and isinstance(teacher.backbone, FluxBackbone)
    assert teacher.family == "flux" and teacher.absent == ()
    sched = teacher.schedule
    assert isinstance(sched, FlowSchedule) and sched.dynamic
    assert teacher.latent_shape(32) == (16, 4, 4)
    # training at 32 px: FluxPipeline's mu for its 2 x 2 packed tokens
    cfg = pipe.scheduler.config
    mu = calculate_shift(4, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert sched.train_mu == pytest.approx(mu, abs=1e-12)
    assert teacher.at_resolution(64).schedule.train_mu == pytest.approx(
        calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift), abs=1e-12)
    check_resolution(48, teacher, teacher.net)  # VAE 8 x packing 2
    with pytest.raises(StepdistillError, match="multiple of 16"):
        check_resolution(40, teacher, teacher.net)

    cond = teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():  # as __call__ runs it (T5 differs by ~1e-5 with autograd on)
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.embeds.shape == (2, 512, 32)  # FluxPipeline's default max_sequence_length

    x = torch.randn(2, 16, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(unpack_latents(packed, 6, 4), FluxPipeline._unpack_latents(packed, 6 * 8, 4 * 8, 8))
    assert torch.equal(image_ids(6, 4, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))
    assert torch.equal(teacher.backbone.pipeline_latents(x), packed)

    scale, shift = teacher.backbone.latent_norm(teacher.vae)
    assert (scale, shift) == (pytest.approx(0.3611), pytest.approx(0.1159))
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(teacher.from_latents(teacher.to_latents(z)), z, atol=1e-6)


def test_the_denoiser_at_schedule_time_is_the_pipelines_step(tiny_flux, one_thread):
    """The pipeline's one-step sample (sigma 1 -> 0, x0 = x - v) is the Denoiser's x0 at t = 999; over a 4-step
    run, the Denoiser at each step's schedule time (sigma = shift_mu((t + 1) / 1000), t = 1000 s - 1 for the
    pipeline's s = linspace(1, 1/4, 4)) calls the transformer with the pipeline's timestep and returns its output."""
    from stepdistill.backbones.flux import pack_latents, unpack_latents

    teacher, pipe = _teacher(tiny_flux), _pipe(tiny_flux)
    den = teacher.denoiser()
    cond = teacher.prompt_encoder(PROMPTS, 32)
    w = torch.full((2,), 2.5)  # w = guidance_scale - 1
    x = _noise(0)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=1, height=32, width=32, latents=pack_latents(x),
                   output_type="latent").images  # guidance_scale 3.5, the default
        x0, _ = den.x0_eps(x, torch.tensor([999, 999]), cond, w)
    assert (x0 - unpack_latents(ref, 4, 4)).abs().max() < 1e-5

    calls, hook = _recording(pipe)
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.5, height=32, width=32, latents=pack_latents(x),
             output_type="latent")
    hook.remove()
    for i, t in enumerate([999, 749, 499, 249]):
        kw, out = calls[i]
        t = torch.tensor([t, t])
        assert torch.allclose(teacher.schedule.timestep(t) / 1000, kw["timestep"], rtol=0, atol=1e-6)
        with torch.no_grad():
            ours = den(unpack_latents(kw["hidden_states"], 4, 4), t, cond, w)
        assert (ours - unpack_latents(out, 4, 4)).abs().max() < 1e-5


@pytest.mark.parametrize("steps,guidance,true_cfg", [(1, 3.5, 1.0), (3, 5.0, 1.0), (3, 3.5, 2.0)])
def test_the_adapter_reproduces_the_pipelines_sampling_loop(tiny_flux, one_thread, steps, guidance, true_cfg):
    """Our Euler loop (adapter + FlowSchedule.sigmas_for_inference with Flux's sigmas and image_seq_len) lands on
    FluxPipeline's latents from the same noise, with embedded guidance and with true CFG against an empty
    negative prompt (one batched call for both, where the pipeline makes two)."""
    from stepdistill.backbones.flux import pack_latents, unpack_latents

    teacher, pipe = _teacher(tiny_flux), _pipe(tiny_flux)
    x = _noise(0)
    cfg_kwargs = {"true_cfg_scale": true_cfg, "negative_prompt": ["", ""]} if true_cfg > 1 else {}
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   latents=pack_latents(x), output_type="latent", **cfg_kwargs).images
    sched, den = teacher.schedule, teacher.denoiser()
    cond, uncond = teacher.prompt_encoder(PROMPTS, 32), teacher.prompt_encoder(["", ""], 32)
    sigmas, timesteps = sched.sigmas_for_inference(steps, image_seq_len=4, sigmas=np.linspace(1, 1 / steps, steps))
    w = torch.full((4,), guidance - 1.0)  # the Denoiser's w: the network gets guidance_scale = 1 + w
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), float(timesteps[i]))
            if true_cfg > 1:
                v_u, v_c = teacher.backbone.predict(den.net, den.module, torch.cat([x, x]), torch.cat([t, t]),
                                                    uncond.cat(cond), w).chunk(2)
                v = v_u + true_cfg * (v_c - v_u)
            else:
                v = teacher.backbone.predict(den.net, den.module, x, t, cond, w[:2])
            x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
    assert (x - unpack_latents(ref, 4, 4)).abs().max() < 1e-5


def test_guidance_input(tiny_flux, one_thread):
    """Flux-dev takes a guidance scale ("scale"): the Denoiser's w, as guidance_scale = 1 + w; None is
    FluxPipeline's default 3.5. A network without the guidance embedding (schnell) takes none and ignores one."""
    from diffusers import FluxTransformer2DModel

    teacher = _teacher(tiny_flux)
    bb, net = teacher.backbone, teacher.net
    assert bb.guidance_input(net) == "scale" and teacher.denoiser().takes_guidance
    x, t = _noise(1), torch.tensor([700.0, 300.0])
    cond = teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        default = bb.predict(net, net, x, t, cond, None)
        assert torch.equal(default, bb.predict(net, net, x, t, cond, torch.full((2,), 2.5)))
        assert not torch.allclose(default, bb.predict(net, net, x, t, cond, torch.full((2,), 6.0)))
        seen = []
        hook = net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
        bb.predict(net, net, x, t, cond, torch.tensor([1.5, 6.0]))
        hook.remove()
        assert torch.equal(seen[0], torch.tensor([2.5, 7.0])) and seen[0].dtype == torch.float32
    schnell = FluxTransformer2DModel.from_config({**net.config, "guidance_embeds": False}).eval()
    assert bb.guidance_input(schnell) is None
    with torch.no_grad():
        assert torch.equal(bb.predict(schnell, schnell, x, t, cond, None),
                           bb.predict(schnell, schnell, x, t, cond, torch.full((2,), 6.0)))


def test_feature_taps_lie_on_the_packed_grid(tiny_flux, one_thread):
    """Default taps span the double and the single blocks; each map is the block's image stream (its output's
    second element) on the h/2 x w/2 packed grid, laid out as FluxPipeline packs: a packed latent maps back to
    pixel_unshuffle(x, 2)."""
    teacher = _teacher(tiny_flux)
    bb, net = teacher.backbone, teacher.net
    taps = bb.feature_taps(net)
    assert taps == ["transformer_blocks.0", "single_transformer_blocks.0"]
    x = _noise(2)
    packed_map = bb.feature_map(net, (None, bb.pipeline_latents(x)), (4, 4))
    assert torch.equal(packed_map, torch.nn.functional.pixel_unshuffle(x, 2))

    raw = {}
    hooks = [net.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: raw.__setitem__(name, out[1].detach().clone())) for name in taps]
    with torch.no_grad():
        maps = teacher.denoiser().features(x, torch.tensor([500, 500]), teacher.prompt_encoder(PROMPTS, 32), taps)
    for h in hooks:
        h.remove()
    inner = net.config.num_attention_heads * net.config.attention_head_dim
    for name, fmap in zip(taps, maps):
        assert fmap.shape == (2, inner, 2, 2)
        assert torch.equal(fmap.flatten(2).transpose(1, 2), raw[name])


def test_lora_targets_cover_both_block_types(tiny_flux, one_thread):
    """The default LoRA wraps every attention and feed-forward projection of the double and the single blocks
    (all their linear layers but the AdaLN modulation ones) and starts as the teacher."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import adapter_scope
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_flux)
    net = teacher.net
    x, t, cond = _noise(3), torch.tensor([600, 600]), teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        before = teacher.denoiser()(x, t, cond)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    linears = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)
               and ".norm" not in n}
    add_lora(net, StudentConfig(lora_rank=2), "student")
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert linears <= wrapped and {"proj_mlp", "proj_out"} <= {n.rsplit(".", 1)[-1] for n in wrapped}
    assert not any(".norm" in n for n in wrapped)
    from stepdistill.denoiser import Denoiser

    with torch.no_grad(), adapter_scope(net, "student"):
        after = Denoiser(net, teacher.schedule, adapter="student")(x, t, cond)
    assert torch.allclose(before, after, atol=1e-6)  # LoRA B starts at zero


def test_exported_sigmas_are_stepped_exactly_though_flux_passes_mu(tiny_flux, one_thread):
    """for_schedule's FlowMatchEulerDiscreteScheduler config (shift 1, no dynamic shifting) makes FluxPipeline,
    which always computes mu and passes it, step through the trained sigmas as given: the transformer sees
    exactly sigma(t) at the trained schedule times, and `generate` hands it packed latents."""
    from stepdistill.sampling import SamplingSpec, for_schedule, generate, make_scheduler

    teacher, pipe = _teacher(tiny_flux), _pipe(tiny_flux)
    trained = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}
    spec = for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=2, timesteps=trained, resolution=32),
                        teacher.schedule, teacher.scheduler_config)
    assert spec.scheduler_config["use_dynamic_shifting"] is False and spec.scheduler_config["shift"] == 1.0
    pipe.scheduler = make_scheduler(spec)
    for n, ts in trained.items():
        calls, hook = _recording(pipe)
        generate(pipe, spec, PROMPTS[:1], [0], steps=n)
        hook.remove()
        want = teacher.schedule.sampling_sigmas(ts)
        assert spec.sigmas[n] == want
        assert pipe.scheduler.sigmas.tolist() == [*torch.tensor(want).tolist(), 0.0]
        assert torch.equal(torch.stack([kw["timestep"][0] for kw, _ in calls]),
                           teacher.schedule.timestep(torch.tensor(ts)) / 1000)
        assert all(kw["hidden_states"].shape == (1, 4, 64) for kw, _ in calls)
    # and the shift that FluxPipeline's own scheduler would have applied is not a no-op here
    assert teacher.schedule.sampling_sigmas([499])[0] != pytest.approx(0.5, abs=1e-3)


def test_generate_samples_a_plain_flux_pipeline_at_its_default_size(tiny_flux, one_thread):
    """A plain FluxPipeline (its own dynamic-shifting scheduler: the step count is not pre-checked, only the
    pipeline knows mu) at its default size, default_sample_size 128 x 8 (the transformer has no sample_size)."""
    from stepdistill.sampling import generate, load_pipeline

    pipe, spec = load_pipeline(tiny_flux)
    assert generate(pipe, spec, ["a red circle"], [0], steps=1)[0].size == (1024, 1024)


def test_a_lora_student_trains_and_round_trips_through_load_lora_weights(tiny_flux, tmp_path, one_thread):
    """A consistency LoRA student on the default targets (both block types and the output projection) exports
    as diffusers LoRA that FluxPipeline.load_lora_weights takes; the loaded adapter predicts as the trained one, and
    the spec samples the trained sigmas with guidance_scale = 1 + w (the embedded guidance it trained at)."""
    from conftest import run_config

    from stepdistill.denoiser import Denoiser
    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_flux, tmp_path / "run", **{"data.resolution": 32, "train.max_steps": 2,
                                                     "train.export": "lora"})
    trainer = Trainer(cfg)
    trainer.train()
    pipe, spec = load_pipeline(str(tmp_path / "run" / "export"))
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler" and spec.embedded_guidance
    trained = spec.extra["trained_timesteps"]
    assert spec.sigmas[len(trained)] == trainer.teacher.schedule.sampling_sigmas(trained)
    x, t, w = _noise(5), torch.tensor([700, 700]), torch.full((2,), spec.guidance_scale - 1)
    cond = trainer.teacher.prompt_encoder(PROMPTS, 32)
    with torch.no_grad():
        ours = Denoiser(trainer.student, trainer.teacher.schedule, adapter="student")(x, t, cond, w)
        theirs = Denoiser(pipe.transformer, trainer.teacher.schedule, adapter="student")(x, t, cond, w)
        base = Denoiser(pipe.transformer, trainer.teacher.schedule)(x, t, cond, w)
    assert (ours - theirs).abs().max() < 1e-5 and (ours - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["dmd", "vsd"])
def test_distribution_matching_students_train_on_a_guidance_distilled_teacher(tiny_flux, tmp_path, one_thread, name):
    """FLUX.1-dev's guidance input is the family's, not a student's LCM-style embedding: dmd and vsd accept the
    student, the real score is one call with the scale as input, and the LoRA export loads."""
    from conftest import run_config

    from stepdistill.sampling import load_pipeline
    from stepdistill.trainer import Trainer

    cfg = run_config(tiny_flux, tmp_path / "run", **{"data.resolution": 32, "train.max_steps": 2,
                                                     "train.export": "lora", "objective.name": name,
                                                     "objective.options.num_ddim_timesteps": None})
    trainer = Trainer(cfg)
    assert not trainer.objective.student.has_guidance_embedding and trainer.objective.student.takes_guidance
    calls = []
    hook = trainer.teacher.net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["guidance"].clone()),
                                                         with_kwargs=True)
    b = 4
    t = torch.full((b,), 500)
    x = torch.randn(b, 16, 4, 4) if trainer.teacher.latent_shape(32)[0] == 16 else torch.randn(b, *trainer.teacher.latent_shape(32))
    cond = trainer.teacher.prompt_encoder(["a red circle"] * b, 32)
    with torch.no_grad():
        trainer.objective.teacher.guided_x0_eps(x, t, cond, cond, 3.0)
    hook.remove()
    assert len(calls) == 1 and torch.allclose(calls[0], torch.full((b,), 3.0))  # one call, the scale as input
    trainer.train()
    pipe, spec = load_pipeline(str(tmp_path / "run" / "export"))
    assert spec.scheduler_class == "FlowMatchEulerDiscreteScheduler"


# every linear layer of FluxTransformer2DModel: the default targets plus the modulation and embedding layers
ALL_LINEARS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
               "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
               "context_embedder", "linear_1", "linear_2"]


def _perturbed_lora(teacher, **student):
    """A LoRA student (rank 4, alpha 12: alpha != rank) on the teacher's network, every LoRA weight moved off its
    initialisation (B starts at zero)."""
    from stepdistill.config import StudentConfig
    from stepdistill.models import build_student

    torch.manual_seed(0)
    net = build_student(teacher, StudentConfig(lora_rank=4, lora_alpha=12, **student))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return net


def _spec(teacher):
    from stepdistill.sampling import SamplingSpec, for_schedule

    return for_schedule(SamplingSpec(format="full", scheduler_class="DDIMScheduler", scheduler_config={},
                                     num_inference_steps=1, timesteps={1: [999]}, resolution=32),
                        teacher.schedule, teacher.scheduler_config)


def _kohya_deltas(sd):
    """Each kohya module's weight change up @ down * alpha / rank, as ComfyUI applies it to the BFL weight."""
    names = {k.split(".")[0] for k in sd}
    return {n: sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"] * float(sd[f"{n}.alpha"])
            / sd[f"{n}.lora_down.weight"].shape[0] for n in names}


@pytest.mark.parametrize("targets", [None, ["to_q", "to_k", "add_k_proj", "proj_out"], ALL_LINEARS])
def test_the_kohya_file_is_the_adapter_on_bfl_module_names(tiny_flux, tmp_path, one_thread, targets):
    """The export's kohya file names Flux's BFL modules (sd-scripts keys, as ComfyUI and Forge read them). Each
    module's up @ down * alpha / rank is exactly the diffusers linears' LoRA changes stacked in BFL's row order (a
    fused q/k/v or q/k/v/MLP-in one block-diagonal of rank n r with alpha n alpha; a part not trained a zero block;
    the final adaLN's (scale, shift) swapped to BFL's (shift, scale)), so applying the file to the BFL weights is
    the trained student."""
    from safetensors.torch import load_file

    from stepdistill.backbones.flux import bfl_linears
    from stepdistill.export import KOHYA_FILE, export_student

    teacher = _teacher(tiny_flux)
    net = _perturbed_lora(teacher, lora_targets=targets)
    out = export_student(teacher, net, _spec(teacher), "lora", tmp_path / "lora", "lora")
    assert "ComfyUI and Forge" in (out / "README.md").read_text()
    sd = load_file(str(out / KOHYA_FILE))
    deltas = _kohya_deltas(sd)
    from peft.tuners.lora import LoraLayer

    lora = {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    mapping = bfl_linears(net)
    want = {"lora_unet_" + b for b, parts in mapping.items() if any(p in lora for p in parts)}
    assert set(deltas) == want
    if targets is None:  # the default targets: attention and MLPs of both block types, and the output layer
        assert {n.removeprefix("lora_unet_") for n in want} == {
            *(f"double_blocks_0_{s}_{m}" for s in ("img", "txt") for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")),
            "single_blocks_0_linear1", "single_blocks_0_linear2", "final_layer_linear"}
    if targets == ALL_LINEARS:
        assert set(lora) == {p for parts in mapping.values() for p in parts}  # every linear has a BFL name
    for b, parts in mapping.items():
        name = "lora_unet_" + b
        if name not in deltas:
            continue
        rows = []
        for p in parts:
            m = net.get_submodule(p)
            rows.append(m.get_delta_weight("student") if p in lora else torch.zeros_like(m.weight))
        expected = torch.cat(rows)
        if b == "final_layer_adaLN_modulation_1":
            expected = torch.cat(expected.chunk(2)[::-1])
        assert torch.allclose(deltas[name], expected, rtol=1e-5, atol=1e-8), b
        rank = sd[f"{name}.lora_down.weight"].shape[0]
        if b.startswith("final_layer"):  # diffusers ignores these two alphas: the scale is folded into lora_up
            assert float(sd[f"{name}.alpha"]) == rank == 4
        else:
            assert rank == 4 * len(parts) and float(sd[f"{name}.alpha"]) == 12.0 * len(parts)
    if targets == ["to_q", "to_k", "add_k_proj", "proj_out"]:  # the untrained parts are exact zero blocks
        up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        assert up.shape == (32 * 3 + 128, 16) and not up[64:].any() and not sd[
            "lora_unet_single_blocks_0_linear1.lora_down.weight"][8:].any()


def test_a_lora_without_a_bfl_name_is_refused(tiny_flux, one_thread):
    """A LoRA on a module that has no BFL counterpart stops the kohya export in one line (it is not dropped)."""
    from stepdistill.errors import StepdistillError

    teacher = _teacher(tiny_flux)
    teacher.net.add_module("extra", torch.nn.Linear(8, 8))
    net = _perturbed_lora(teacher, lora_targets=["extra", "to_q"])
    with pytest.raises(StepdistillError, match="LoRA on 'extra' has no counterpart") as err:
        teacher.backbone.kohya_state_dict(net, "student")
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_kohya_file_loads_in_diffusers_as_the_student_at_flux1_width(tiny_flux, tmp_path, one_thread):
    """FluxPipeline.load_lora_weights(folder, weight_name=kohya file) (diffusers' sd-scripts converter) gives a
    transformer that predicts as the trained student (alpha != rank, every linear layer of both block types).
    The converter splits single_blocks linear1 at FLUX.1's own widths (3 x 3072 + 12288), so this transformer is
    FLUX.1 wide (24 heads x 128) with one block of each kind and the tiny pipeline's text widths.
    diffusers 0.42 reads the network-level modules (img_in, txt_in, time_in, vector_in, guidance_in, final_layer)
    to the right weights but without the "transformer." prefix, so load_lora_weights drops them: those are checked
    on the converted state dict (ComfyUI reads them; the diffusers-format file is diffusers' own)."""
    import dataclasses

    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    from stepdistill.backbones.base import Conditioning
    from stepdistill.config import StudentConfig
    from stepdistill.denoiser import adapter_scope
    from stepdistill.export import KOHYA_FILE, export_student, pipeline_with_net
    from stepdistill.models import add_lora

    teacher = _teacher(tiny_flux)
    torch.manual_seed(0)
    wide = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    wide.requires_grad_(False).eval()
    teacher = dataclasses.replace(teacher, net=wide, components={**teacher.components, "transformer": wide})
    blocks = [t for t in ALL_LINEARS if t not in ("proj_out", "norm_out.linear", "x_embedder", "context_embedder",
                                                  "linear_1", "linear_2")] + ["single_transformer_blocks.0.proj_out"]
    net = _perturbed_lora(teacher, lora_targets=blocks)
    out = export_student(teacher, net, _spec(teacher), "lora", tmp_path / "lora", "lora")
    pipe = pipeline_with_net(teacher, net, teacher.components["scheduler"])
    pipe.load_lora_weights(str(out), weight_name=KOHYA_FILE, adapter_name="kohya")
    loaded = {n for n, m in net.named_modules() if isinstance(m, LoraLayer) and "kohya" in m.lora_A}
    assert loaded == {n for n, m in net.named_modules() if isinstance(m, LoraLayer) and "student" in m.lora_A}
    assert len(loaded) == 20

    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g))
    x, t, w = _noise(6), torch.tensor([700.0, 300.0]), torch.full((2,), 2.5)
    outs = {}
    with torch.no_grad():
        for adapter in ("student", "kohya", None):
            with adapter_scope(net, adapter):
                outs[adapter] = teacher.backbone.predict(net, net, x, t, cond, w)
    assert (outs["kohya"] - outs["student"]).abs().max() < 1e-5
    assert (outs["student"] - outs[None]).abs().max() > 1e-3

    # every linear layer (the network-level ones too): the converter maps each to the student's weight change
    add_lora(net, StudentConfig(lora_rank=4, lora_alpha=12, lora_targets=ALL_LINEARS), "all")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".all." in name:
                p.add_(0.02 * torch.randn_like(p))
    sd = FluxPipeline.lora_state_dict(teacher.backbone.kohya_state_dict(net, "all"))
    layers = {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer) and "all" in m.lora_A}
    assert len(layers) == 30
    for n, m in layers.items():
        key = f"transformer.{n}" if n.startswith(("transformer_blocks.", "single_transformer_blocks.")) else n
        delta = sd.pop(f"{key}.lora_B.weight") @ sd.pop(f"{key}.lora_A.weight")
        assert torch.allclose(delta, m.get_delta_weight("all"), rtol=1e-5, atol=1e-7), n
    assert not sd

    # fused modules the student trains only in part: the zero blocks come back as zero LoRAs of the other parts
    add_lora(net, StudentConfig(lora_rank=4, lora_alpha=12, lora_targets=["to_q", "add_k_proj"]), "some")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".some." in name:
                p.add_(0.02 * torch.randn_like(p))
    sd = FluxPipeline.lora_state_dict(teacher.backbone.kohya_state_dict(net, "some"))
    parts = {f"{b}.{p}" for b in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
             for p in ("to_q", "to_k", "to_v")} | {f"transformer_blocks.0.attn.add_{c}_proj" for c in "qkv"}
    assert {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in sd} == parts | {
        "single_transformer_blocks.0.proj_mlp"}
    for k in [k for k in sd if k.endswith("lora_A.weight")]:
        m = net.get_submodule(k.removeprefix("transformer.").rsplit(".", 2)[0])
        delta = sd[k.replace("lora_A", "lora_B")] @ sd[k]
        want = m.get_delta_weight("some") if "some" in m.lora_A else torch.zeros_like(delta)
        assert torch.allclose(delta, want, rtol=1e-5, atol=1e-7), k
